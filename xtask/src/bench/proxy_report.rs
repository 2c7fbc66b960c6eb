//! The tables of `cargo xtask bench proxy`: figures down, targets across, every cell the median
//! and range over the rounds, and the goals against HAProxy compared round by round.

use super::proxy::{LIMITED, Overloaded, Results, Steady};
use super::stats::{Goal, Rounds, Table, cell, paired_diff, ratio, spread, verdict};

pub(super) fn tables(upstream: &str, r: &Results, rounds: u32) -> String {
    let names = ["direct", "metalkube", "haproxy", "nginx"];
    let steady = |name: &str, f: &dyn Fn(&Steady) -> Option<f64>| -> Rounds {
        r.steady.get(name).map(|v| v.iter().map(f).collect()).unwrap_or_default()
    };
    let over = |name: &str, f: &dyn Fn(&Overloaded) -> Option<f64>| -> Rounds {
        r.overload.get(name).map(|v| v.iter().map(f).collect()).unwrap_or_default()
    };
    let added = |name: &str, f: &dyn Fn(&Steady) -> Option<f64>| paired_diff(&steady(name, f), &steady("direct", f));

    let mut t =
        Table::new(format!("upstream: {upstream} — steady load (wrk), median [min–max] of {rounds} rounds"), &names);
    type Fig<'a> = (&'a str, usize, &'a dyn Fn(&Steady) -> Option<f64>);
    let figures: [Fig; 8] = [
        ("req/s", 0, &|s| s.rps),
        ("p50 ms", 2, &|s| s.p50),
        ("p99 ms", 2, &|s| s.p99),
        ("non-2xx", 0, &|s| s.non_2xx),
        ("CPU ms/1k req, proxy", 1, &|s| s.proxy_cpu),
        ("CPU ms/1k req, upstream", 1, &|s| s.upstream_cpu),
        ("CPU ms/1k req, wrk", 1, &|s| s.client_cpu),
        ("neighbours' load, cores", 2, &|s| s.neighbours),
    ];
    for (label, precision, f) in figures {
        t.row(label, names.iter().map(|n| cell(spread(&steady(n, f)), precision)).collect());
    }
    for (label, f) in [
        ("added p50 ms vs direct", &(|s: &Steady| s.p50) as &dyn Fn(&Steady) -> Option<f64>),
        ("added p99 ms vs direct", &|s: &Steady| s.p99),
    ] {
        let cells = names.iter().map(|n| if *n == "direct" { "-".into() } else { cell(spread(&added(n, f)), 2) });
        t.row(label, cells.collect());
    }
    let mut out = t.render();

    let mut o = Table::new(
        format!(
            "upstream: {upstream} — 10x overload ({} req/s offered, open loop), median [min–max] of {rounds} rounds",
            r.rate
        ),
        &LIMITED,
    );
    type OFig<'a> = (&'a str, usize, &'a dyn Fn(&Overloaded) -> Option<f64>);
    let figures: [OFig; 13] = [
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
    for (label, precision, f) in figures {
        o.row(label, LIMITED.iter().map(|n| cell(spread(&over(n, f)), precision)).collect());
    }
    out.push_str(&o.render());

    let mut g = Table::new(
        format!("upstream: {upstream} — metalkube against HAProxy (issue 9's goals), compared round by round"),
        &["metalkube", "haproxy", "metalkube − haproxy", "ratio of medians", "goal"],
    );
    let goal = |g: &mut Table, label: &str, ours: Rounds, theirs: Rounds, precision: usize, dir: Goal| {
        let diff = paired_diff(&ours, &theirs);
        g.row(
            label,
            vec![
                cell(spread(&ours), precision),
                cell(spread(&theirs), precision),
                cell(spread(&diff), precision),
                ratio(spread(&ours), spread(&theirs)),
                verdict(&ours, &theirs, dir),
            ],
        );
    };
    goal(
        &mut g,
        "CPU ms/1k req (steady) ≤",
        steady("metalkube", &|s| s.proxy_cpu),
        steady("haproxy", &|s| s.proxy_cpu),
        1,
        Goal::AtMost,
    );
    goal(
        &mut g,
        "CPU ms/1k answers (overload) ≤",
        over("metalkube", &|o| o.proxy_cpu),
        over("haproxy", &|o| o.proxy_cpu),
        1,
        Goal::AtMost,
    );
    goal(
        &mut g,
        "time to a refusal p99 ms ≤",
        over("metalkube", &|o| o.refused_p99),
        over("haproxy", &|o| o.refused_p99),
        2,
        Goal::AtMost,
    );
    goal(&mut g, "added p99 ms ≤", added("metalkube", &|s| s.p99), added("haproxy", &|s| s.p99), 2, Goal::AtMost);
    goal(&mut g, "added p50 ms ≤", added("metalkube", &|s| s.p50), added("haproxy", &|s| s.p50), 2, Goal::AtMost);
    goal(&mut g, "req/s ≥", steady("metalkube", &|s| s.rps), steady("haproxy", &|s| s.rps), 0, Goal::AtLeast);
    out.push_str(&g.render());
    out
}
