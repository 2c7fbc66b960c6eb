//! The `metalkube-agent` binary started from a shell with a low soft open-files limit (a macOS
//! terminal hands out 256): it raises the limit to the hard one at start and exports it; with a
//! low hard limit it says so, in the log and in `metalkube_agent_open_files_limit_low`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::GUARD;

struct AgentProc(Child);

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The agent, standalone with no models, started by `sh` after `ulimit_args` (e.g. `-Sn 256`).
fn start_under_ulimit(ulimit_args: &str, dir: &std::path::Path, port: u16) -> AgentProc {
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit {ulimit_args} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_metalkube-agent"))
        .arg("run")
        .arg("--models-dir")
        .arg(dir)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--engine")
        .arg(metalkube_testkit::real_engine())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        // The log goes to stdout.
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    AgentProc(child)
}

/// Polls `/metrics` until it answers: the agent is another process, there is no event to await.
async fn metrics(port: u16) -> String {
    let deadline = tokio::time::Instant::now() + GUARD;
    while tokio::time::Instant::now() < deadline {
        if let Ok(resp) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await
            && let Ok(text) = resp.text().await
        {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no /metrics on port {port} within {GUARD:?}");
}

fn gauge(text: &str, name: &str) -> u64 {
    let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name}:\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// The soft limit of `pid`, from /proc (Linux).
fn soft_limit_of(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_low_soft_limit_is_raised_to_the_hard_limit_and_a_low_hard_limit_is_reported() {
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    assert!(hard > 4096, "this test needs a hard open-files limit above 4096, the machine has {hard}");
    let dir = tempfile::tempdir().unwrap();

    let port = free_port();
    let agent = start_under_ulimit("-Sn 256", dir.path(), port);
    let text = metrics(port).await;
    assert_eq!(gauge(&text, "metalkube_agent_open_files_limit"), hard, "raised to the hard limit");
    assert_eq!(gauge(&text, "metalkube_agent_open_files_limit_low"), 0);
    assert_eq!(soft_limit_of(agent.0.id()), hard);
    drop(agent);

    let port = free_port();
    let mut agent = start_under_ulimit("-n 256", dir.path(), port);
    let text = metrics(port).await;
    assert_eq!(gauge(&text, "metalkube_agent_open_files_limit"), 256, "the hard limit caps it");
    assert_eq!(gauge(&text, "metalkube_agent_open_files_limit_low"), 1);
    let _ = agent.0.kill();
    let mut log = String::new();
    std::io::Read::read_to_string(&mut agent.0.stdout.take().unwrap(), &mut log).unwrap();
    assert!(log.contains("open-files limit 256") && log.contains("raise the hard limit"), "{log}");
}
