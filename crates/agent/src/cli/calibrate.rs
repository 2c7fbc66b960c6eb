//! `metalkube-agent calibrate`: its flags are `metalkube_calibrate::CalibrateArgs`, beside the
//! measuring (the `metalkube-calibrate` crate); here, its own runtime and what it prints.

use anyhow::Context;
use metalkube_calibrate::CalibrateArgs;

/// Drives the load, printing each interval's progress, then the summary and where the reports are.
pub fn run(args: CalibrateArgs) -> anyhow::Result<()> {
    let settings = args.settings()?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let finished = runtime.block_on(metalkube_calibrate::run(settings, |i| eprintln!("{}", i.progress_line())))?;
    print!("{}", finished.report.summary_text());
    println!("report: {} and {}", finished.json_path.display(), finished.html_path.display());
    Ok(())
}
