//! The tables of `cargo xtask bench proxy`: figures down, targets across, every cell the median
//! and range over the rounds, and the goals against HAProxy compared round by round.

use super::proxy_windows::{LIMITED, Overloaded, Results, Steady};
use super::stats::{Figure, Goal, Table, added, rounds};

pub(super) fn tables(upstream: &str, r: &Results, rounds_n: u32) -> String {
    let names = ["direct", "metalkube", "haproxy", "nginx"];
    let mut t =
        Table::new(format!("upstream: {upstream} — steady load (wrk), median [min–max] of {rounds_n} rounds"), &names);
    let figures: [Figure<Steady>; 8] = [
        ("req/s", 0, &|s| s.rps),
        ("p50 ms", 2, &|s| s.p50),
        ("p99 ms", 2, &|s| s.p99),
        ("non-2xx", 0, &|s| s.non_2xx),
        ("CPU ms/1k req, proxy", 1, &|s| s.proxy_cpu),
        ("CPU ms/1k req, upstream", 1, &|s| s.upstream_cpu),
        ("CPU ms/1k req, wrk", 1, &|s| s.client_cpu),
        ("neighbours' load, cores", 2, &|s| s.neighbours),
    ];
    t.figure_rows(&r.steady, &names, &figures);
    t.added_rows(
        &r.steady,
        &names,
        &[("added p50 ms vs direct", 2, &|s: &Steady| s.p50), ("added p99 ms vs direct", 2, &|s: &Steady| s.p99)],
    );
    let mut out = t.render();

    let mut o = Table::new(
        format!(
            "upstream: {upstream} — 10x overload ({} req/s offered, open loop), median [min–max] of {rounds_n} rounds",
            r.rate
        ),
        &LIMITED,
    );
    let figures: [Figure<Overloaded>; 13] = [
        ("answered 2xx", 0, &|o| o.ok),
        ("refused (429/503)", 0, &|o| o.refused),
        ("errors (transport)", 0, &|o| o.errors),
        ("shed by the generator", 0, &|o| o.shed),
        ("time to a refusal p50 ms", 2, &|o| o.refused_p50),
        ("time to a refusal p99 ms", 2, &|o| o.refused_p99),
        ("2xx p99 ms", 1, &|o| o.ok_p99),
        ("peak open fds of the proxy", 0, &|o| o.peak_fds),
        ("generator's worst lateness ms", 1, &|o| o.generator_late_max),
        ("CPU ms/1k answers, proxy", 1, &|o| o.proxy_cpu),
        ("CPU ms/1k answers, upstream", 1, &|o| o.upstream_cpu),
        ("CPU ms/1k answers, loadgen", 1, &|o| o.client_cpu),
        ("neighbours' load, cores", 2, &|o| o.neighbours),
    ];
    o.figure_rows(&r.overload, &LIMITED, &figures);
    out.push_str(&o.render());

    let mut g = Table::new(
        format!("upstream: {upstream} — metalkube against HAProxy (issue 9's goals), compared round by round"),
        &["metalkube", "haproxy", "metalkube − haproxy", "ratio of medians", "goal"],
    );
    let steady = |name: &str, f: &dyn Fn(&Steady) -> Option<f64>| rounds(&r.steady, name, f);
    let over = |name: &str, f: &dyn Fn(&Overloaded) -> Option<f64>| rounds(&r.overload, name, f);
    let cpu = |s: &Steady| s.proxy_cpu;
    g.goal_row("CPU ms/1k req (steady) ≤", &steady("metalkube", &cpu), &steady("haproxy", &cpu), 1, Goal::AtMost);
    let cpu = |o: &Overloaded| o.proxy_cpu;
    g.goal_row("CPU ms/1k answers (overload) ≤", &over("metalkube", &cpu), &over("haproxy", &cpu), 1, Goal::AtMost);
    let refusal = |o: &Overloaded| o.refused_p99;
    g.goal_row("time to a refusal p99 ms ≤", &over("metalkube", &refusal), &over("haproxy", &refusal), 2, Goal::AtMost);
    for (label, f) in [
        ("added p99 ms ≤", &(|s: &Steady| s.p99) as &dyn Fn(&Steady) -> Option<f64>),
        ("added p50 ms ≤", &|s: &Steady| s.p50),
    ] {
        g.goal_row(label, &added(&r.steady, "metalkube", f), &added(&r.steady, "haproxy", f), 2, Goal::AtMost);
    }
    let rps = |s: &Steady| s.rps;
    g.goal_row("req/s ≥", &steady("metalkube", &rps), &steady("haproxy", &rps), 0, Goal::AtLeast);
    out.push_str(&g.render());
    out
}
