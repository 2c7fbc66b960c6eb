//! A fault of the engine's internal port (row 4): taken before a restart and stolen between the
//! agent's check and the engine's bind. The agent tries another port; a lost race is no crash.

use std::time::Instant;

use metalkube_testkit::cgroup::CpuThrottle;
use metalkube_testkit::processes::{processes_mentioning, signal};
use nix::sys::signal::Signal;

use crate::row::{Pulse, Row, bounded, secs};
use crate::standalone::{AgentOpts, pid_of, serving, serving_tiny, wait_model};

/// The `--port` a process was started with.
fn port_arg(pid: u32) -> Option<u16> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    args.iter().position(|a| a == "--port").and_then(|i| args.get(i + 1)?.parse().ok())
}

// --- row 4 ----------------------------------------------------------------------------------

pub async fn port_stolen(row: Row) {
    let (mut agent, before, load, _) = serving_tiny(&row, AgentOpts::default(), Pulse::Calm, "3s", 3).await;
    let (old, old_port) = (pid_of(&before).unwrap(), before["internalPort"].as_u64().unwrap() as u16);
    let (first, last) = row.engine_ports();
    let next = if old_port == last { first } else { old_port + 1 };
    // Another process listens on the port the agent would take next: its check skips it.
    let _listener = std::net::TcpListener::bind(("127.0.0.1", next)).unwrap();
    // And the port it takes instead is stolen between its check and the engine's bind. That
    // window is a few milliseconds; starving the agent's CPU group (which the engine it spawns
    // joins) stretches it to seconds, so the theft lands there every time.
    let throttle = CpuThrottle::new("fault-port", 1000, 100_000);
    throttle.add(agent.pid());
    let killed = Instant::now();
    signal(old, Signal::SIGKILL);
    let models = row.models.lock().unwrap().clone();
    let (raced_pid, raced) = bounded("a new engine process", || {
        let found = models
            .iter()
            .flat_map(|m| processes_mentioning(m))
            .find(|p| *p != old)
            .and_then(|p| Some((p, port_arg(p)?)));
        async move { found }
    })
    .await;
    let stolen = std::net::TcpListener::bind(("127.0.0.1", raced)).unwrap_or_else(|e| {
        panic!("the engine (pid {raced_pid}) bound port {raced} before the test could take it: {e}")
    });
    throttle.lift();
    row.note(format!(
        "port {next} taken before the restart; port {raced} stolen from engine {raced_pid} before its bind"
    ));
    let after = wait_model(&agent.api, "tiny", "serving on a new engine", |m| {
        serving(m) && pid_of(m).is_some_and(|p| p != old && p != raced_pid)
    })
    .await;
    let back = killed.elapsed();
    let port = after["internalPort"].as_u64().unwrap() as u16;
    assert!(port != next && port != raced, "serving on port {port}, neither taken one");
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(log.contains("engine could not bind its port; trying another"), "the bind failure was noticed");
    assert_eq!(after["restarts"].as_u64(), Some(1), "a lost bind race is not counted as a crash: {after:#}");
    row.tally.completions_since(Instant::now(), 5, "completions on the new port").await;
    load.stop().await;
    agent.stop();
    drop((stolen, throttle));
    row.summarize(format!("{next} skipped, {raced} lost at bind; serving on {port} after {}", secs(back)));
}
