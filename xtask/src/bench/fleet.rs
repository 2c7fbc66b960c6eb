//! `cargo xtask bench fleet`: the controller at fleet scale. The work is in the
//! `metalkube-fleetbench` binary (crates/fleet-bench): the real controller against the test API
//! server and simulated agents, seven scenarios, each timed and counted. This builds both and runs
//! it: 100 Macs and 1,000 models on release binaries, or with `--quick` 10 Macs and 100 models on
//! the dev binaries `cargo xtask test` has just built, with short grace and lease times.

use std::process::Command;

use anyhow::bail;

use crate::{cargo, run, target_dir};

pub fn fleet(quick: bool) -> anyhow::Result<()> {
    let mut build = cargo();
    build.args(["build", "-p", "metalkube-controller", "-p", "metalkube-fleetbench", "--bins"]);
    if !quick {
        build.arg("--release");
    }
    run(&mut build)?;
    let bins = target_dir().join(if quick { "debug" } else { "release" });
    let out = target_dir().join("bench/fleet");
    let mut bench = Command::new(bins.join("metalkube-fleetbench"));
    bench.arg("--controller").arg(bins.join("metalkube-controller")).arg("--out").arg(&out);
    if quick {
        bench.args(["--agents", "10", "--models", "100", "--steady", "20s", "--grace-period", "5s"]);
        bench.args(["--lease-duration", "6s", "--name", "fleet-quick"]);
    }
    if run(&mut bench).is_err() {
        bail!("bench fleet: a count that must hold did not (the goals table above says which)");
    }
    Ok(())
}
