//! Engines a test starts itself, outside any agent (the simulator, llama-server): on a free
//! port, killed when the test ends however it ends, and waited for until `/health` answers.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::sim::SimStartup;

/// A bound on an engine becoming healthy: a guard against a hung test, never a performance
/// claim.
const HEALTHY_WITHIN: Duration = Duration::from_secs(90);

/// A process the test started; killed (and reaped) when dropped.
pub struct Running(pub Child);

impl Running {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("a free port: {e}"));
    listener.local_addr().unwrap_or_else(|e| panic!("a free port: {e}")).port()
}

/// Starts `command` (its output dropped) and waits until the engine on `port` answers
/// `/health` with a success.
pub async fn start(command: &mut Command, port: u16) -> Running {
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {:?}: {e}", command.get_program()));
    let running = Running(child);
    wait_healthy(port).await;
    running
}

/// A simulator on a free port, with `startup` as its model file's faults (written beside the
/// model file `file` in `dir`) and `args` (parallel slots, host) on its command line.
pub async fn start_sim(dir: &Path, file: &str, startup: &SimStartup, args: &[&str]) -> (Running, u16) {
    let model = dir.join(file);
    let faults = serde_json::to_vec(startup).unwrap_or_else(|e| panic!("the simulator's faults: {e}"));
    std::fs::write(format!("{}.sim.json", model.display()), faults)
        .unwrap_or_else(|e| panic!("writing the simulator's faults beside {}: {e}", model.display()));
    let port = free_port();
    let mut command = Command::new(crate::sim_engine());
    command.args(["--port", &port.to_string()]).args(args).arg("--model").arg(&model);
    (start(&mut command, port).await, port)
}

async fn wait_healthy(port: u16) {
    let deadline = tokio::time::Instant::now() + HEALTHY_WITHIN;
    while tokio::time::Instant::now() < deadline {
        if reqwest::get(format!("http://127.0.0.1:{port}/health")).await.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("engine on {port} not healthy within {HEALTHY_WITHIN:?}");
}
