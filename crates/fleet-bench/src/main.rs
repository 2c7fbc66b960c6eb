//! `metalkube-fleetbench`: the controller at fleet scale (`cargo xtask bench fleet` builds and
//! runs it). Exits 1 when a count that must hold did not (a write in steady state, a model not
//! converged); times are reported, never enforced.

mod bench;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = bench::Args::parse();
    if !bench::run(args)? {
        eprintln!("fleet: a count that must hold did not (see the goals above)");
        std::process::exit(1);
    }
    Ok(())
}
