//! `cargo xtask bench proxy --perf DIR`: where the CPU goes while the limited proxies work,
//! recorded in an extra round that the tables do not count (perf's own cost would skew it).

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::Context;

use super::proxy_windows::{LIMITED, overload, steady};
use super::{Ctx, Options, Rig, Target};

/// An extra round for the two limited proxies, not counted in the tables: a steady window and
/// an overload window each, under two perf sessions. `perf record -a` (no call graphs, cheap)
/// says where the 2 cores go, process by process; `perf record -g -p <proxy>` what the proxy
/// spends its share on. Returns the per-process table for the report; the rest is in `dir`.
pub(super) fn profile(
    ctx: &mut Ctx,
    rig: &Rig,
    dir: &Path,
    slug: &str,
    opts: &Options,
    script: &Path,
    rate: u32,
) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)?;
    let seconds = opts.seconds.to_string();
    let mut summary = String::new();
    for name in LIMITED {
        let t = rig.target(name).context("target")?;
        let pids: Vec<String> = t.pids.iter().map(u32::to_string).collect();
        let pids = pids.join(",");
        for phase in ["steady", "overload"] {
            let base = dir.join(format!("{slug}-{name}-{phase}"));
            let all = base.with_extension("all.perf.data");
            let proxy = base.with_extension("proxy.perf.data");
            rig.settle()?;
            let record = |args: &[&str], out: &Path| {
                Command::new("perf")
                    .arg("record")
                    .args(args)
                    .arg("-o")
                    .arg(out)
                    .args(["--", "sleep", &seconds])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting perf")
            };
            let mut perf_all = record(&["-a", "-F", "499"], &all)?;
            let mut perf_proxy = record(&["-g", "-F", "1999", "-p", &pids], &proxy)?;
            ctx.note(format!(
                "perf record -a -F 499 -o <data> -- sleep {seconds}   (during the window: CPU by process)"
            ));
            ctx.note(format!(
                "perf record -g -F 1999 -p <proxy pids> -o <data> -- sleep {seconds}   (during the window)"
            ));
            let measured = if phase == "steady" {
                format!("{:?}", steady(ctx, rig, t, script, opts.seconds)?)
            } else {
                format!("{:?}", overload(ctx, rig, t, opts.seconds, rate)?)
            };
            perf_all.wait()?;
            perf_proxy.wait()?;
            eprintln!("[{slug} profile] {name} {phase} under perf: {measured}");
            let table = by_process(&all, rig, t)?;
            summary.push_str(&format!("\n{slug}, {name}, {phase} (perf record -a; 100% = both cores):\n{table}"));
            std::fs::write(base.with_extension("by-process.txt"), &table)?;
            let reports: [(&str, &[&str]); 2] = [
                ("symbols", &["--no-children", "--sort", "dso,sym", "--percent-limit", "0.5", "-g", "none"]),
                (
                    "callers",
                    &[
                        "--children",
                        "--sort",
                        "sym",
                        "--percent-limit",
                        "3",
                        "-g",
                        "caller,0.5,callee,function,percent",
                    ],
                ),
            ];
            for (what, args) in reports {
                let out =
                    Command::new("perf").arg("report").arg("-i").arg(&proxy).arg("--stdio").args(args).output()?;
                std::fs::write(base.with_extension(format!("{what}.txt")), &out.stdout)?;
            }
        }
    }
    ctx.note(
        "perf report -i <proxy data> --stdio --no-children --sort dso,sym -g none   (the proxy's top symbols)".into(),
    );
    eprintln!("perf data and reports in {}", dir.display());
    Ok(summary)
}

/// Samples per process (not per thread) of a system-wide recording, named by what the
/// benchmark knows them as.
fn by_process(data: &Path, rig: &Rig, t: &Target) -> anyhow::Result<String> {
    let out = Command::new("perf").arg("script").arg("-i").arg(data).args(["-F", "pid,tid,comm"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let engine = rig.engine_pids();
    let mut samples: HashMap<u32, u64> = HashMap::new();
    let mut names: HashMap<u32, String> = HashMap::new();
    let mut total = 0u64;
    for line in text.lines() {
        // "<comm> <pid>/<tid>": comm may hold spaces.
        let Some((comm, ids)) = line.trim().rsplit_once(' ') else { continue };
        let Some((pid, tid)) = ids.split_once('/') else { continue };
        let (Ok(pid), Ok(tid)) = (pid.parse::<u32>(), tid.parse::<u32>()) else { continue };
        total += 1;
        *samples.entry(pid).or_default() += 1;
        if pid == tid || !names.contains_key(&pid) {
            names.insert(pid, comm.trim().to_owned());
        }
    }
    let label = |pid: u32| -> String {
        let comm = names.get(&pid).cloned().unwrap_or_default();
        if pid == 0 {
            "idle".into()
        } else if t.pids.contains(&pid) {
            format!("{} (the proxy) [{comm}]", t.name)
        } else if engine.contains(&pid) {
            format!("engine [{comm}]")
        } else if pid == rig.agent_pid {
            format!("metalkube-agent (not measured now) [{comm}]")
        } else {
            comm
        }
    };
    let mut rows: Vec<(u32, u64)> = samples.into_iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1));
    let mut table = String::new();
    for (pid, n) in rows.into_iter().filter(|(_, n)| *n * 200 >= total) {
        table.push_str(&format!("  {:>6.1}%  {:>7}  {}\n", 100.0 * n as f64 / total.max(1) as f64, pid, label(pid)));
    }
    Ok(table)
}
