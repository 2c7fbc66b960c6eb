//! The fault matrix of issue 9: one row per fault a Mac or the cluster can suffer, each injected
//! while a few clients stream and post chat completions through a serving port, on the real
//! llama-server wherever the OS can make the fault. Every row counts what its clients saw:
//! accepted (got past the TCP connect), completed (a whole 2xx body; a stream that reached
//! `[DONE]`), definite errors (an HTTP error with a body, an SSE `event: error`, a reset or EOF
//! the client sees at once), lost (no answer within `CLIENT_TIMEOUT`: must be 0), and the engines
//! left running once the row's agent is stopped (orphans: must be 0). Each row also asserts its
//! own expectation, and the test prints one table at the end.
//!
//! Rows run one after another (two shared cores: parallel rows would measure each other).
//! `METALKUBE_FAULT_ROWS=1,4` runs only those rows.
//!
//! One test binary; a module per fault family (`engine`, `engine_port`, `model_files`,
//! `agent_loss`, `controller_restart`, `api_errors`) beside what the rows share (`clients`,
//! `row`, `standalone`, `cluster`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

mod agent_loss;
mod api_errors;
mod clients;
mod cluster;
mod controller_restart;
mod engine;
mod engine_port;
mod model_files;
mod row;
mod standalone;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::clients::Counts;
use crate::row::{Row, secs};

/// A client that has no answer after this long has lost its request.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest any one wait in a row may take; needing it is a failure, not a slow pass.
pub const STEP: Duration = Duration::from_secs(45);
/// Longest a whole row may take.
const ROW_BOUND: Duration = Duration::from_secs(150);
/// Tokens of the stream a row injects its fault into: long enough to be mid-stream when the
/// fault lands (about a second on the tiny model), short enough to finish when it may.
pub const LONG_STREAM_TOKENS: u32 = 1500;

// ---------------------------------------------------------------------------------------------
// The matrix

type RowFn = fn(Row) -> Pin<Box<dyn Future<Output = ()> + Send>>;

const ROWS: [(&str, RowFn); 10] = [
    ("engine SIGKILL mid-stream", |r| Box::pin(engine::engine_sigkill(r))),
    ("engine SIGSTOP mid-stream", |r| Box::pin(engine::engine_sigstop(r))),
    ("engine CPU throttled", |r| Box::pin(engine::cpu_throttled(r))),
    ("internal port stolen", |r| Box::pin(engine_port::port_stolen(r))),
    ("truncated model", |r| Box::pin(model_files::truncated_model(r))),
    ("agent SIGKILL mid-stream", |r| Box::pin(agent_loss::agent_sigkill(r))),
    ("agent SIGTERM", |r| Box::pin(agent_loss::agent_sigterm(r))),
    ("model larger than the free disk", |r| Box::pin(model_files::disk_full_download(r))),
    ("controller restart", |r| Box::pin(controller_restart::controller_restart(r))),
    ("API 409/500 injected", |r| Box::pin(api_errors::api_faults(r))),
];

struct RowResult {
    n: u16,
    name: &'static str,
    counts: Counts,
    orphans: usize,
    happened: String,
    failure: Option<String>,
}

/// Runs one row within ROW_BOUND, then counts its orphans (its agents are stopped by then,
/// whether it passed or not).
async fn run_row(n: u16, name: &'static str, f: RowFn) -> RowResult {
    let row = Row::new(n);
    println!("\n== row {n}: {name}");
    let started = Instant::now();
    let mut task = tokio::spawn(f(row.clone()));
    let mut failure = match tokio::time::timeout(ROW_BOUND, &mut task).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) if e.is_panic() => {
            let panic = e.into_panic();
            Some(
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "panicked".into()),
            )
        }
        Ok(Err(e)) => Some(format!("{e}")),
        Err(_) => {
            task.abort();
            let _ = task.await;
            Some(format!("did not finish within {ROW_BOUND:?}"))
        }
    };
    // Whatever was left is an orphan; it gets a moment to finish dying first.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut left = row.engines();
    while !left.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = row.engines();
    }
    for pid in &left {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), Signal::SIGKILL);
    }
    let counts = row.tally.counts();
    if failure.is_none() && counts.lost > 0 {
        failure = Some(format!("{} requests lost", counts.lost));
    }
    if failure.is_none() && !left.is_empty() {
        failure = Some(format!("orphan engines {left:?}"));
    }
    if let Some(f) = &failure {
        println!("row {n} FAILED after {}: {f}", secs(started.elapsed()));
        for log in row.logs.lock().unwrap().iter() {
            print_tail(log);
        }
    } else {
        println!("row {n} passed in {}", secs(started.elapsed()));
    }
    let happened = row.summary.lock().unwrap().clone();
    RowResult { n, name, counts, orphans: left.len(), happened, failure }
}

fn print_tail(path: &Path) {
    let files: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
    } else {
        vec![path.to_owned()]
    };
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        println!("---- last lines of {} ----", file.display());
        for l in &lines[lines.len().saturating_sub(30)..] {
            println!("{l}");
        }
    }
}

fn print_table(results: &[RowResult]) {
    println!("\n| # | fault | accepted | completed | definite errors | lost | orphans | what happened |");
    println!("|---|---|---:|---:|---:|---:|---:|---|");
    for r in results {
        let happened = match &r.failure {
            Some(f) => format!("FAILED: {}", f.lines().next().unwrap_or_default()),
            None => r.happened.clone(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.n, r.name, r.counts.accepted, r.counts.completed, r.counts.definite, r.counts.lost, r.orphans, happened
        );
    }
    println!("\ndefinite errors by what the client saw (and connections refused, not accepted):");
    for r in results {
        println!("  {:>2} {}: {:?}; refused {}", r.n, r.name, r.counts.kinds, r.counts.refused);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix() {
    let only: Option<Vec<u16>> = std::env::var("METALKUBE_FAULT_ROWS")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect());
    let started = Instant::now();
    let mut results = Vec::new();
    for (i, (name, f)) in ROWS.iter().enumerate() {
        let n = i as u16 + 1;
        if only.as_ref().is_some_and(|o| !o.contains(&n)) {
            continue;
        }
        results.push(run_row(n, name, *f).await);
    }
    print_table(&results);
    println!("\nfault matrix: {} rows in {}", results.len(), secs(started.elapsed()));
    let failed: Vec<String> =
        results.iter().filter_map(|r| r.failure.as_ref().map(|f| format!("row {} ({}): {f}", r.n, r.name))).collect();
    assert!(failed.is_empty(), "{failed:#?}");
}
