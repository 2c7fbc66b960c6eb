//! How busy this host was over each interval, so that the report can say whether a slow
//! interval was the engine or the machine. A window (`metalkube_vitals::host::pressure::Window`)
//! opens at an interval's start and is read at its end, as the agent does over a pulse round;
//! the host's slower figures (memory level, heat, GPU) come from the same periodic reading the
//! agent keeps, and the scheduling probe times calibrate's own timers.

use std::sync::Arc;

use metalkube_vitals::host::pressure::{SchedulingProbe, Window};
use metalkube_vitals::host::{HostCollector, follow_host};

use super::record::HostCell;
use super::target::NoPressure;

/// The window of the interval under way, on one engine pid.
struct Open {
    pid: u32,
    engine: Window,
    /// The same window on calibrate's own process: its `engine_cpu` is calibrate's share, which
    /// the engine's `others_cpu` includes.
    calibrate: Window,
}

/// Watches the host for a run; its background readers stop when it is dropped.
pub struct HostWatch {
    collector: Arc<HostCollector>,
    probe: SchedulingProbe,
    tasks: Vec<tokio::task::AbortHandle>,
    open: Option<Open>,
    /// Why the last interval had no window, when it had none.
    not_read: Option<NoPressure>,
}

impl HostWatch {
    /// Starts the periodic host reading and the scheduling probe, and opens the first window.
    pub fn start(pid: Result<u32, NoPressure>) -> Self {
        let collector = Arc::new(HostCollector::default());
        let probe = SchedulingProbe::default();
        let tasks = vec![
            tokio::spawn(follow_host(collector.clone())).abort_handle(),
            tokio::spawn(probe.clone().run()).abort_handle(),
        ];
        let mut watch = Self { collector, probe, tasks, open: None, not_read: None };
        watch.follow(pid);
        watch
    }

    /// Keeps the window on `pid`: one on another pid (the agent replaced the engine) is
    /// reopened on the new one from now, and none is open when there is no pressure to read.
    pub fn follow(&mut self, pid: Result<u32, NoPressure>) {
        match pid {
            Ok(pid) if self.open.as_ref().is_some_and(|o| o.pid == pid) => {}
            Ok(pid) => {
                self.open = Some(Open { pid, engine: Window::open(pid), calibrate: Window::open(std::process::id()) });
                self.not_read = None;
            }
            Err(why) => {
                self.open = None;
                self.not_read = Some(why);
            }
        }
    }

    /// The pressure since the window opened (the interval's start), and a new window from now on
    /// the same pid for the next interval. None when no window was open.
    pub fn read_and_restart(&mut self) -> Option<HostCell> {
        let open = self.open.as_mut()?;
        let host = self.collector.get();
        let pressure = open.engine.read(&host, &self.probe);
        let calibrate_cpu = open.calibrate.read(&host, &self.probe).engine_cpu;
        let pid = open.pid;
        *open = Open { pid, engine: Window::open(pid), calibrate: Window::open(std::process::id()) };
        Some(HostCell::new(pid, pressure, calibrate_cpu))
    }

    /// Why the current interval has no window, if it has none.
    pub fn not_read(&self) -> Option<&NoPressure> {
        self.not_read.as_ref()
    }
}

impl Drop for HostWatch {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
