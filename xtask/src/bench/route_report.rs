//! The figures and tables of `cargo xtask bench route`: per window, what `metalkube-routeload`
//! recorded request by request, read into latencies, counts and rates; across rounds, median
//! [min–max]; the issue's goals against the baselines of the same round; Markdown and JSON.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::stats::{Figure, Goal, Rounds, Table, cell, paired_diff, ratio, spread, verdict};

/// A figure whose label is built at run time (one row per Mac).
type OwnedFigure = (String, usize, Box<dyn Fn(&Run) -> Option<f64>>);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Strategy {
    RandomConnection,
    RoundRobin,
    LeastInFlight,
    Router,
}

impl Strategy {
    /// The name `metalkube-routeload` takes.
    pub fn slug(self) -> &'static str {
        match self {
            Strategy::RandomConnection => "random-connection",
            Strategy::RoundRobin => "round-robin",
            Strategy::LeastInFlight => "least-in-flight",
            Strategy::Router => "router",
        }
    }

    /// A column's title.
    fn title(self) -> &'static str {
        match self {
            Strategy::RandomConnection => "random conn. (kube-proxy)",
            Strategy::RoundRobin => "round-robin",
            Strategy::LeastInFlight => "least-in-flight",
            Strategy::Router => "metalkube-router",
        }
    }
}

/// What a window measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// Poisson arrivals at this fraction of the fleet's capacity.
    Steady(f64),
    /// 80% with the Mac of this index stopped a third of the way in.
    Failover { stopped: usize },
    /// Twice the capacity.
    Overload,
    /// 500 one-token answers per second to one agent, directly (round-robin over one) and
    /// through the router.
    AddedLatency,
}

/// One request as `metalkube-routeload` recorded it.
#[derive(Debug, Clone, Default)]
pub struct Rec {
    pub at_ms: f64,
    pub target: usize,
    pub stream: bool,
    pub max_tokens: u64,
    pub status: u16,
    pub ttft_ms: Option<f64>,
    pub total_ms: Option<f64>,
    pub retry_after: Option<String>,
    pub error: Option<String>,
    /// The Mac (index into the fleet) that had it: the target a client-side strategy sent it to,
    /// or the one the router's answer names (`x-metalkube-replica`); None when no Mac answered
    /// the router.
    pub mac: Option<usize>,
}

impl Rec {
    fn ok(&self) -> bool {
        self.error.is_none() && (200..300).contains(&self.status)
    }
    /// Answered by a refusal a client can act on.
    fn refused(&self) -> bool {
        self.error.is_none() && matches!(self.status, 429 | 503)
    }
    /// Neither answered nor refused: a transport error, a broken answer, a timeout, another
    /// error status.
    fn lost(&self) -> bool {
        !self.ok() && !self.refused()
    }
}

/// One window: every request's record.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub recs: Vec<Rec>,
    pub deadline_ms: f64,
    pub stopped_at_ms: Option<f64>,
    pub generator_late_max: Option<f64>,
    /// How many addresses the client spread over (1: the router, which picks for it).
    pub targets: usize,
    /// Failover: requests that reached the stopped Mac's serving port within a second of the
    /// stop and later, read from the kernel's socket table (whoever sent them).
    pub port_first_second: Option<f64>,
    pub port_later: Option<f64>,
    /// The earliest each of the later ones can have arrived, in ms after the stop.
    pub port_later_not_before: Vec<f64>,
}

fn percentile(mut xs: Vec<f64>, p: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * xs.len() as f64).ceil() as usize;
    xs.get(rank.saturating_sub(1).min(xs.len() - 1)).copied()
}

impl Run {
    /// `macs`: the fleet's names, in the order of the client-side strategies' targets.
    pub fn from_json(v: &Value, macs: &[String]) -> anyhow::Result<Self> {
        let targets = v["targets"].as_u64().unwrap_or(1) as usize;
        let recs = v["records"]
            .as_array()
            .context("no records")?
            .iter()
            .map(|r| Rec {
                at_ms: r["at_ms"].as_f64().unwrap_or(0.0),
                target: r["target"].as_u64().unwrap_or(0) as usize,
                stream: r["stream"].as_bool().unwrap_or(false),
                max_tokens: r["max_tokens"].as_u64().unwrap_or(0),
                status: r["status"].as_u64().unwrap_or(0) as u16,
                ttft_ms: r["ttft_ms"].as_f64(),
                total_ms: r["total_ms"].as_f64(),
                retry_after: r["retry_after"].as_str().map(str::to_owned),
                error: r["error"].as_str().map(str::to_owned),
                mac: match r["replica"].as_str() {
                    Some(name) => macs.iter().position(|m| m == name),
                    None if targets > 1 => r["target"].as_u64().map(|t| t as usize),
                    None => None,
                },
            })
            .collect();
        let ports = &v["stopped_port_requests"];
        Ok(Self {
            recs,
            deadline_ms: v["deadline_s"].as_f64().unwrap_or(60.0) * 1000.0,
            stopped_at_ms: v["stopped_at_ms"].as_f64(),
            generator_late_max: v["generator_late_ms_max"].as_f64(),
            targets,
            port_first_second: ports["first_second"].as_f64(),
            port_later: ports["later"].as_f64(),
            port_later_not_before: ports["later_not_before_ms"]
                .as_array()
                .map(|xs| xs.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default(),
        })
    }

    pub fn ok_count(&self) -> usize {
        self.recs.iter().filter(|r| r.ok()).count()
    }

    fn lost(&self) -> usize {
        self.recs.iter().filter(|r| r.lost()).count()
    }

    /// TTFT percentile of the streamed requests `keep` selects that were not refused. One with
    /// no first byte (lost) counts as the client's deadline: a stalled stream is the slowest
    /// start there is, not a missing sample.
    pub fn ttft_percentile(&self, p: f64, keep: impl Fn(&Rec) -> bool) -> Option<f64> {
        let xs = self
            .recs
            .iter()
            .filter(|r| r.stream && !r.refused() && keep(r))
            .map(|r| r.ttft_ms.unwrap_or(self.deadline_ms))
            .collect();
        percentile(xs, p)
    }

    /// Answers per second from the first arrival to the end of the last answer: a strategy that
    /// leaves a backlog finishes later, and its rate is lower.
    fn answers_per_s(&self) -> Option<f64> {
        let end = self.recs.iter().filter(|r| r.ok()).filter_map(|r| Some(r.at_ms + r.total_ms?)).fold(0.0, f64::max);
        (end > 0.0).then(|| self.ok_count() as f64 / (end / 1000.0))
    }

    /// Answers per second that ended within the window of `window_s` seconds: what the fleet got
    /// done while the load came, less the backlog still open at its end. Unlike the rate to the
    /// last answer, one long answer on a slow Mac near the end cannot move it by seconds.
    fn answers_within(&self, window_s: f64) -> Option<f64> {
        let end_ms = window_s * 1000.0;
        let n = self.recs.iter().filter(|r| r.ok() && r.total_ms.is_some_and(|t| r.at_ms + t <= end_ms)).count();
        (window_s > 0.0).then(|| n as f64 / window_s)
    }

    /// Generated tokens per second, the same way.
    fn tokens_per_s(&self) -> Option<f64> {
        let end = self.recs.iter().filter(|r| r.ok()).filter_map(|r| Some(r.at_ms + r.total_ms?)).fold(0.0, f64::max);
        let tokens: u64 = self.recs.iter().filter(|r| r.ok()).map(|r| r.max_tokens).sum();
        (end > 0.0).then(|| tokens as f64 / (end / 1000.0))
    }

    fn total_percentile(&self, p: f64, keep: impl Fn(&Rec) -> bool) -> Option<f64> {
        percentile(self.recs.iter().filter(|r| keep(r)).filter_map(|r| r.total_ms).collect(), p)
    }

    /// Share of requests each Mac had, in percent of all requests: where a client-side strategy
    /// sent them, or which Mac the router's answer names (a refusal names none).
    fn shares(&self, n: usize) -> Vec<f64> {
        let total = self.recs.len().max(1) as f64;
        (0..n).map(|i| self.recs.iter().filter(|r| r.mac == Some(i)).count() as f64 * 100.0 / total).collect()
    }

    pub fn summary(&self) -> String {
        format!(
            "{} requests, {} ok, {} refused, {} lost, TTFT p50 {:.0} p99 {:.0} ms, {:.1} answers/s",
            self.recs.len(),
            self.ok_count(),
            self.recs.iter().filter(|r| r.refused()).count(),
            self.lost(),
            self.ttft_percentile(50.0, |_| true).unwrap_or(f64::NAN),
            self.ttft_percentile(99.0, |_| true).unwrap_or(f64::NAN),
            self.answers_per_s().unwrap_or(f64::NAN),
        )
    }

    /// Failover: the stop time, when the run reached it.
    fn stop(&self) -> Option<f64> {
        self.stopped_at_ms
    }

    /// Requests sent to the stopped Mac more than a second after it stopped: what reached its
    /// serving port (the kernel's count, for every strategy); without it, what a client-side
    /// strategy sent there. A request the router sent there cannot be seen in its answer: the
    /// Mac stays stopped to the end of the window, so another Mac answers it, or nobody.
    fn dispatched_after(&self, stopped: usize) -> Option<f64> {
        if self.port_later.is_some() {
            return self.port_later;
        }
        let stop = self.stop().filter(|_| self.targets > 1)?;
        Some(self.recs.iter().filter(|r| r.target == stopped && r.at_ms > stop + 1000.0).count() as f64)
    }

    /// Requests that had not started (no first byte before the stop, or due after it) and still
    /// got no answer.
    fn unstarted_errors(&self) -> Option<f64> {
        let stop = self.stop()?;
        let started_before = |r: &Rec| r.ttft_ms.is_some_and(|t| r.at_ms + t <= stop);
        Some(self.recs.iter().filter(|r| r.lost() && !started_before(r)).count() as f64)
    }

    /// TTFT percentile before the stop (requests whose first byte came before it: one caught
    /// by the stop is the stop's, not the fleet's usual) and from a second after it (every
    /// request, those a baseline still sends to the stopped Mac included).
    fn ttft_before_after(&self, p: f64) -> (Option<f64>, Option<f64>) {
        let Some(stop) = self.stop() else { return (None, None) };
        let before = |r: &Rec| r.at_ms < stop && r.ttft_ms.is_some_and(|t| r.at_ms + t <= stop);
        (self.ttft_percentile(p, before), self.ttft_percentile(p, |r| r.at_ms >= stop + 1000.0))
    }

    /// Whether `r` was caught by the stop: in flight on the stopped Mac without its first byte
    /// (due before the stop, first byte after it, or none), or sent there in the second after.
    /// A client-side strategy knows where it sent each request. The router's answer names the
    /// Mac that answered in the end, not the one that stalled, so for the router: due before a
    /// second after the stop and first byte (or none) only after that second, when the router
    /// sees the Mac's figures go stale: what the stop held up, on the Mac or in the queue.
    fn caught(&self, r: &Rec, stopped: usize) -> bool {
        let Some(stop) = self.stop() else { return false };
        let first_byte_after = |by: f64| r.ttft_ms.is_none_or(|t| r.at_ms + t > by);
        if self.targets > 1 {
            r.target == stopped && r.at_ms < stop + 1000.0 && first_byte_after(stop)
        } else {
            r.at_ms < stop + 1000.0 && first_byte_after(stop + 1000.0)
        }
    }

    /// TTFT percentile of the others, from a second after the stop: requests not caught by it
    /// (for a client-side strategy: not sent to the stopped Mac; for the router: every one, the
    /// count at the Mac's port shows whether it sent any there).
    fn ttft_others_after(&self, p: f64, stopped: usize) -> Option<f64> {
        let stop = self.stop()?;
        self.ttft_percentile(p, |r| r.at_ms >= stop + 1000.0 && r.mac != Some(stopped))
    }

    /// TTFT percentile of the requests caught by the stop (they pay the detection and a retry).
    fn ttft_caught(&self, p: f64, stopped: usize) -> Option<f64> {
        self.ttft_percentile(p, |r| self.caught(r, stopped))
    }

    fn caught_count(&self, stopped: usize) -> Option<f64> {
        self.stop()?;
        Some(self.recs.iter().filter(|r| r.stream && !r.refused() && self.caught(r, stopped)).count() as f64)
    }

    fn refusal_percentile(&self, p: f64) -> Option<f64> {
        self.total_percentile(p, Rec::refused)
    }

    /// Refusals without a Retry-After.
    fn refusals_without_retry_after(&self) -> f64 {
        self.recs.iter().filter(|r| r.refused() && r.retry_after.is_none()).count() as f64
    }

    /// Requests that waited past the queue deadline: a streamed answer whose first byte, or a
    /// refusal that, came more than a second after it (a first token takes well under a second
    /// on every Mac here). A non-streamed answer's wait cannot be told from its generation.
    fn waited_past(&self, deadline_ms: f64) -> f64 {
        let late = |t: Option<f64>| t.is_none_or(|t| t > deadline_ms + 1000.0);
        self.recs
            .iter()
            .filter(|r| (r.stream && !r.refused() && late(r.ttft_ms)) || (r.refused() && late(r.total_ms)))
            .count() as f64
    }
}

/// A Mac's measured figures.
#[derive(Debug, Clone)]
pub struct Mac {
    pub name: String,
    pub speed: Option<f64>,
    /// Completions per second with every place busy, measured.
    pub capacity: f64,
    /// The same, computed from the simulator's per-token times (simulators only).
    pub computed: Option<f64>,
    pub ttft_p50: Option<f64>,
    /// The agent's figure of decode time per token.
    pub per_token_ms: Option<f64>,
}

pub struct Report {
    pub quick: bool,
    pub rounds: u32,
    pub seconds: f64,
    pub with_router: bool,
    pub settings: String,
    pub macs: Vec<Mac>,
    pub capacity: f64,
    /// The router's --queue-capacity in the steady, failover and overload rows.
    pub router_queue: usize,
    pub runs: Vec<(Load, u32, Strategy, Run)>,
    pub commands: Vec<String>,
}

/// The queue deadline of the overload row, in ms (agents' queueTimeout, router's --queue-timeout).
const DEADLINE_MS: f64 = 5000.0;
/// The failover row's load, as a share of what the fleet without the stopped Mac carries by the
/// capacity measurement. That measurement (each Mac saturated by closed-loop clients) overstates
/// what the three survivors carry together under open-loop arrivals of the mix: measured, about
/// 21.5 completions/s of a summed 31.3. At 80% of the sum the survivors were over capacity and
/// every strategy's queue grew, which measures arithmetic, not failover; half the sum is about
/// three quarters of what they really carry.
pub const FAILOVER_LOAD: f64 = 0.5;

/// A goal, its figures, whether it is a count CI enforces.
struct Verdict {
    what: String,
    met: Option<bool>,
    figures: String,
    enforced: bool,
}

impl Report {
    pub fn new(quick: bool, rounds: u32, seconds: f64, with_router: bool) -> Self {
        Self {
            quick,
            rounds,
            seconds,
            with_router,
            settings: String::new(),
            macs: Vec::new(),
            capacity: 0.0,
            router_queue: 0,
            runs: Vec::new(),
            commands: Vec::new(),
        }
    }

    /// The fleet's measured capacity without the Mac of this index.
    pub fn capacity_without(&self, stopped: usize) -> f64 {
        self.macs.iter().enumerate().filter(|(i, _)| *i != stopped).map(|(_, m)| m.capacity).sum()
    }

    fn strategies(&self) -> Vec<Strategy> {
        let mut s = vec![Strategy::RandomConnection, Strategy::RoundRobin, Strategy::LeastInFlight];
        if self.with_router {
            s.push(Strategy::Router);
        }
        s
    }

    /// Figure `f` per round of `strategy` in windows of `load`.
    fn rounds(&self, load: Load, strategy: Strategy, f: &dyn Fn(&Run) -> Option<f64>) -> Rounds {
        (0..self.rounds)
            .map(|round| {
                self.runs.iter().find(|(l, r, s, _)| *l == load && *r == round && *s == strategy).and_then(|x| f(&x.3))
            })
            .collect()
    }

    fn loads(&self) -> Vec<f64> {
        let mut v: Vec<f64> =
            self.runs.iter().filter_map(|(l, ..)| if let Load::Steady(x) = l { Some(*x) } else { None }).collect();
        v.sort_by(f64::total_cmp);
        v.dedup();
        v
    }

    fn table(&self, title: String, load: Load, figures: &[Figure<'_, Run>]) -> Table {
        let strategies = self.strategies();
        let cols: Vec<&str> = strategies.iter().map(|s| s.title()).collect();
        let mut t = Table::new(title, &cols);
        for (label, precision, f) in figures {
            t.row(*label, strategies.iter().map(|s| cell(spread(&self.rounds(load, *s, *f)), *precision)).collect());
        }
        t
    }

    fn tables(&self) -> Vec<Table> {
        let mut out = Vec::new();
        let mut fleet = Table::new(
            format!("the fleet: capacity measured {:.1} completions/s in all", self.capacity),
            &["speed", "capacity /s", "computed /s", "TTFT p50 ms, saturated", "agent's decode ms/token"],
        );
        for m in &self.macs {
            let opt = |x: Option<f64>, p: usize| x.map_or("-".into(), |x| format!("{x:.p$}"));
            fleet.row(
                m.name.clone(),
                vec![
                    m.speed.map_or("real engine".into(), |s| format!("{s}")),
                    format!("{:.1}", m.capacity),
                    opt(m.computed, 1),
                    opt(m.ttft_p50, 0),
                    opt(m.per_token_ms, 2),
                ],
            );
        }
        out.push(fleet);
        let n_macs = self.macs.len();
        let window = self.seconds;
        for fraction in self.loads() {
            let load = Load::Steady(fraction);
            let mut figures: Vec<OwnedFigure> = vec![
                ("requests".into(), 0, Box::new(|r: &Run| Some(r.recs.len() as f64))),
                ("lost".into(), 0, Box::new(|r: &Run| Some(r.lost() as f64))),
                (
                    "refused (429/503)".into(),
                    0,
                    Box::new(|r: &Run| Some(r.recs.iter().filter(|x| x.refused()).count() as f64)),
                ),
                ("TTFT p50 ms (streamed)".into(), 0, Box::new(|r: &Run| r.ttft_percentile(50.0, |_| true))),
                ("TTFT p99 ms (streamed)".into(), 0, Box::new(|r: &Run| r.ttft_percentile(99.0, |_| true))),
                (
                    "answer p99 ms (not streamed)".into(),
                    0,
                    Box::new(|r: &Run| r.total_percentile(99.0, |x| !x.stream && x.ok())),
                ),
                ("answers/s (to the last answer)".into(), 2, Box::new(|r: &Run| r.answers_per_s())),
                ("answers/s ended within the window".into(), 2, Box::new(move |r: &Run| r.answers_within(window))),
                ("tokens/s".into(), 0, Box::new(|r: &Run| r.tokens_per_s())),
                ("generator's worst lateness ms".into(), 1, Box::new(|r: &Run| r.generator_late_max)),
            ];
            for (i, m) in self.macs.iter().enumerate() {
                figures.push((
                    format!("% sent to {}", m.name),
                    0,
                    Box::new(move |r: &Run| r.shares(n_macs).get(i).copied()),
                ));
            }
            let refs: Vec<Figure<'_, Run>> = figures.iter().map(|(l, p, f)| (l.as_str(), *p, f.as_ref())).collect();
            out.push(self.table(
                format!(
                    "{:.0}% of capacity ({:.1} requests/s, Poisson), median [min–max] of {} rounds",
                    fraction * 100.0,
                    fraction * self.capacity,
                    self.rounds
                ),
                load,
                &refs,
            ));
        }
        if let Some((Load::Failover { stopped }, ..)) =
            self.runs.iter().find(|(l, ..)| matches!(l, Load::Failover { .. }))
        {
            let stopped = *stopped;
            let load = Load::Failover { stopped };
            let name = self.macs.get(stopped).map_or("?".into(), |m| m.name.clone());
            let figures: [Figure<'_, Run>; 15] = [
                ("requests", 0, &|r| Some(r.recs.len() as f64)),
                ("stopped at s", 1, &|r| r.stop().map(|s| s / 1000.0)),
                ("reached its port in the first second", 0, &|r| r.port_first_second),
                ("reached its port > 1 s after (sent to it)", 0, &|r| r.dispatched_after(stopped)),
                ("the latest of those arrived ≥ s after the stop", 2, &|r| {
                    r.port_later_not_before.iter().copied().reduce(f64::max).map(|ms| ms / 1000.0)
                }),
                ("errors to unstarted requests", 0, &|r| r.unstarted_errors()),
                ("lost, all", 0, &|r| Some(r.lost() as f64)),
                ("refused (429/503)", 0, &|r| Some(r.recs.iter().filter(|x| x.refused()).count() as f64)),
                ("TTFT p99 ms before", 0, &|r| r.ttft_before_after(99.0).0),
                ("TTFT p99 ms from 1 s after, all", 0, &|r| r.ttft_before_after(99.0).1),
                ("TTFT p50 ms from 1 s after, the others", 0, &|r| r.ttft_others_after(50.0, stopped)),
                ("TTFT p99 ms from 1 s after, the others", 0, &|r| r.ttft_others_after(99.0, stopped)),
                ("the others' TTFT p99 after / before", 2, &|r| others_ratio(r, stopped)),
                ("streams caught on it", 0, &|r| r.caught_count(stopped)),
                ("TTFT p99 ms of those caught", 0, &|r| r.ttft_caught(99.0, stopped)),
            ];
            out.push(self.table(
                format!(
                    "failover: {name} (agent and engine) SIGSTOPped a third of the way in, resumed after the window, client deadline 10 s; load {:.1} requests/s, {:.0}% of what the fleet carries without it ({:.0}% of the whole fleet's capacity); the others = not sent to it (router: all); caught = in flight on it without a first byte, or sent to it in the second after (router: due before 1 s after the stop, first byte only after that); a stream the router ends with an error event is lost; median [min–max] of {} rounds",
                    FAILOVER_LOAD * self.capacity_without(stopped),
                    FAILOVER_LOAD * 100.0,
                    FAILOVER_LOAD * self.capacity_without(stopped) / self.capacity * 100.0,
                    self.rounds
                ),
                load,
                &figures,
            ));
        }
        let figures: [Figure<'_, Run>; 8] = [
            ("requests", 0, &|r| Some(r.recs.len() as f64)),
            ("answered 2xx", 0, &|r| Some(r.ok_count() as f64)),
            ("refused (429/503)", 0, &|r| Some(r.recs.iter().filter(|x| x.refused()).count() as f64)),
            ("lost", 0, &|r| Some(r.lost() as f64)),
            ("time to a refusal p99 ms", 2, &|r| r.refusal_percentile(99.0)),
            ("refusals without Retry-After", 0, &|r| Some(r.refusals_without_retry_after())),
            ("waited past the 5 s deadline", 0, &|r| Some(r.waited_past(DEADLINE_MS))),
            ("answers/s", 2, &|r| r.answers_per_s()),
        ];
        out.push(self.table(
            format!(
                "overload: 2x capacity ({:.1} requests/s), queue deadline 5 s (agents' queue 64, router's --queue-capacity {}); median [min–max] of {} rounds",
                2.0 * self.capacity,
                self.router_queue,
                self.rounds
            ),
            Load::Overload,
            &figures,
        ));
        if self.with_router {
            let mut t = Table::new(
                format!(
                    "router added latency: 500 one-token answers/s to one agent, median [min–max] of {} rounds",
                    self.rounds
                ),
                &["direct to the agent", "through metalkube-router", "added (paired by round)"],
            );
            for (label, p) in [("p50 ms", 50.0), ("p99 ms", 99.0)] {
                let f = move |r: &Run| r.total_percentile(p, Rec::ok);
                let direct = self.rounds(Load::AddedLatency, Strategy::RoundRobin, &f);
                let router = self.rounds(Load::AddedLatency, Strategy::Router, &f);
                t.row(
                    label,
                    vec![
                        cell(spread(&direct), 2),
                        cell(spread(&router), 2),
                        cell(spread(&paired_diff(&router, &direct)), 2),
                    ],
                );
            }
            out.push(t);
        }
        out
    }

    fn verdicts(&self) -> Vec<Verdict> {
        let mut out = Vec::new();
        let at80 = Load::Steady(0.8);
        let p99 = |r: &Run| r.ttft_percentile(99.0, |_| true);
        let count = |xs: &Rounds| xs.iter().flatten().sum::<f64>();
        // Losses where nothing fails are the harness's or the fleet's fault whatever the
        // strategy: every strategy is held to 0 in the steady rows.
        for s in self.strategies() {
            let lost: f64 =
                self.loads().iter().map(|f| count(&self.rounds(Load::Steady(*f), s, &|r| Some(r.lost() as f64)))).sum();
            out.push(Verdict {
                what: format!("{}: 0 requests lost under steady load", s.title()),
                met: Some(lost == 0.0),
                figures: format!("{lost} lost"),
                enforced: true,
            });
        }
        if !self.with_router {
            out.push(Verdict {
                what: "metalkube-router's goals".into(),
                met: None,
                figures: "not measured: the workspace has no metalkube-router binary yet".into(),
                enforced: false,
            });
            return out;
        }
        let router = |load: Load, f: &dyn Fn(&Run) -> Option<f64>| self.rounds(load, Strategy::Router, f);
        let rr = self.rounds(at80, Strategy::RoundRobin, &p99);
        let ours = router(at80, &p99);
        let third: Rounds = rr.iter().map(|x| x.map(|x| x / 3.0)).collect();
        out.push(Verdict {
            what: "80%: TTFT p99 at least 3x lower than per-request round-robin".into(),
            met: Some(verdict(&ours, &third, Goal::AtMost).starts_with("MET")),
            figures: format!(
                "{} vs {}: {}",
                cell(spread(&ours), 0),
                cell(spread(&rr), 0),
                ratio(spread(&rr), spread(&ours))
            ),
            enforced: false,
        });
        let lif = self.rounds(at80, Strategy::LeastInFlight, &p99);
        out.push(Verdict {
            what: "80%: TTFT p99 lower than least-in-flight".into(),
            met: Some(verdict(&ours, &lif, Goal::AtMost).starts_with("MET")),
            figures: format!(
                "{} vs {} ({})",
                cell(spread(&ours), 0),
                cell(spread(&lif), 0),
                verdict(&ours, &lif, Goal::AtMost)
            ),
            enforced: false,
        });
        // Throughput: answers that ended within the window. Every strategy answers the same
        // requests at 80% (none lost), so the rate to the last answer differs only by where the
        // last long answer landed; it is printed beside, not judged.
        let window = self.seconds;
        let tput = move |r: &Run| r.answers_within(window);
        let to_last = |r: &Run| r.answers_per_s();
        for s in [Strategy::RandomConnection, Strategy::RoundRobin, Strategy::LeastInFlight] {
            let theirs = self.rounds(at80, s, &tput);
            let mine = router(at80, &tput);
            out.push(Verdict {
                what: format!("80%: throughput not below {} (answers ended within the window)", s.title()),
                met: Some(verdict(&mine, &theirs, Goal::AtLeast).starts_with("MET")),
                figures: format!(
                    "{} vs {} answers/s; to the last answer {} vs {}",
                    cell(spread(&mine), 2),
                    cell(spread(&theirs), 2),
                    cell(spread(&router(at80, &to_last)), 2),
                    cell(spread(&self.rounds(at80, s, &to_last)), 2)
                ),
                enforced: false,
            });
        }
        let f99 = |r: &Run| r.total_percentile(99.0, Rec::ok);
        let added = paired_diff(
            &router(Load::AddedLatency, &f99),
            &self.rounds(Load::AddedLatency, Strategy::RoundRobin, &f99),
        );
        out.push(Verdict {
            what: "router added latency p99 ≤ 1 ms at 500 requests/s".into(),
            met: spread(&added).map(|s| s.median <= 1.0),
            figures: format!("{} ms", cell(spread(&added), 2)),
            enforced: false,
        });
        let lost: f64 = self.loads().iter().map(|f| count(&router(Load::Steady(*f), &|r| Some(r.lost() as f64)))).sum();
        out.push(Verdict {
            what: "router: 0 requests lost".into(),
            met: Some(lost == 0.0),
            figures: format!("{lost}"),
            enforced: true,
        });
        if let Some((load, ..)) = self.runs.iter().find(|(l, ..)| matches!(l, Load::Failover { .. })) {
            let unstarted = count(&router(*load, &|r| r.unstarted_errors()));
            out.push(Verdict {
                what: "failover: no client whose request had not started gets an error".into(),
                met: Some(unstarted == 0.0),
                figures: format!("{unstarted}"),
                enforced: true,
            });
            let stopped = match load {
                Load::Failover { stopped } => *stopped,
                _ => 0,
            };
            let sent = router(*load, &|r| r.dispatched_after(stopped));
            out.push(Verdict {
                what: "failover: nothing dispatched to the stopped Mac more than 1 s later".into(),
                met: (!sent.iter().all(Option::is_none)).then(|| count(&sent) == 0.0),
                figures: format!(
                    "{} reached its port; the latest not before {} s after the stop",
                    count(&sent),
                    cell(
                        spread(&router(*load, &|r| r
                            .port_later_not_before
                            .iter()
                            .copied()
                            .reduce(f64::max)
                            .map(|ms| ms / 1000.0))),
                        2
                    )
                ),
                enforced: false,
            });
            let ratio_after = router(*load, &|r| others_ratio(r, stopped));
            out.push(Verdict {
                what: "failover: TTFT p99 of the others within 2x its value before".into(),
                met: spread(&ratio_after).map(|s| s.max <= 2.0),
                figures: format!(
                    "{}x; {} ms before, {} ms after; those caught on it {} ms",
                    cell(spread(&ratio_after), 2),
                    cell(spread(&router(*load, &|r| r.ttft_before_after(99.0).0)), 0),
                    cell(spread(&router(*load, &|r| r.ttft_others_after(99.0, stopped))), 0),
                    cell(spread(&router(*load, &|r| r.ttft_caught(99.0, stopped))), 0),
                ),
                enforced: false,
            });
        }
        let refusal = router(Load::Overload, &|r| r.refusal_percentile(99.0));
        out.push(Verdict {
            what: "overload: refusals in under 5 ms p99".into(),
            met: spread(&refusal).map(|s| s.max < 5.0),
            figures: format!("{} ms", cell(spread(&refusal), 2)),
            enforced: false,
        });
        let without = count(&router(Load::Overload, &|r| Some(r.refusals_without_retry_after())));
        out.push(Verdict {
            what: "overload: every refusal carries Retry-After".into(),
            met: Some(without == 0.0),
            figures: format!("{without} without"),
            enforced: true,
        });
        let late = count(&router(Load::Overload, &|r| Some(r.waited_past(DEADLINE_MS))));
        out.push(Verdict {
            what: "overload: no request waits past its deadline".into(),
            met: Some(late == 0.0),
            figures: format!("{late} waited"),
            enforced: false,
        });
        let lost = count(&router(Load::Overload, &|r| Some(r.lost() as f64)));
        out.push(Verdict {
            what: "overload: 0 requests lost (refused, not dropped)".into(),
            met: Some(lost == 0.0),
            figures: format!("{lost}"),
            enforced: true,
        });
        out
    }

    fn goals_text(&self, md: bool) -> String {
        let mut out = String::new();
        for v in self.verdicts() {
            let word = match v.met {
                Some(true) => "met",
                Some(false) => "NOT met",
                None => "not measured",
            };
            let kind = if v.enforced { "count, enforced by --quick" } else { "printed only" };
            if md {
                out.push_str(&format!("- {}: **{word}** ({}; {kind})\n", v.what, v.figures));
            } else {
                out.push_str(&format!("  {}: {word} ({}; {kind})\n", v.what, v.figures));
            }
        }
        out
    }

    pub fn render(&self) -> String {
        let mut out = self.settings.clone();
        out.push_str(&format!(
            "{} interleaved rounds of {} s windows (every strategy at every load, then the failover and overload rows, then the next round)\n",
            self.rounds, self.seconds
        ));
        for t in self.tables() {
            out.push_str(&t.render());
        }
        out.push_str("\ngoals:\n");
        out.push_str(&self.goals_text(false));
        out.push_str("\ncommands:\n");
        for c in &self.commands {
            out.push_str(&format!("  {c}\n"));
        }
        out
    }

    /// `route.{md,json}` (`route-quick.*` for `--quick`) under `dir`.
    pub fn write(&self, dir: &Path, text: &str, only: Option<&str>) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let name = match (only, self.quick) {
            (Some(row), true) => format!("route-quick-{row}"),
            (Some(row), false) => format!("route-{row}"),
            (None, true) => "route-quick".to_owned(),
            (None, false) => "route".to_owned(),
        };
        let mut md = format!(
            "### `cargo xtask bench route{}`\n\n```\n{}```\n",
            if self.quick { " --quick" } else { "" },
            self.settings
        );
        for t in self.tables() {
            md.push_str(&format!("\n**{}**\n\n| | {} |\n|---|", t.title, t.columns.join(" | ")));
            md.push_str(&"---|".repeat(t.columns.len()));
            md.push('\n');
            for (label, cells) in &t.rows {
                md.push_str(&format!("| {label} | {} |\n", cells.join(" | ")));
            }
        }
        md.push_str("\nGoals:\n");
        md.push_str(&self.goals_text(true));
        md.push_str(&format!("\n<details><summary>full output</summary>\n\n```\n{text}```\n</details>\n"));
        std::fs::write(dir.join(format!("{name}.md")), md)?;
        let tables: Vec<Value> = self
            .tables()
            .iter()
            .map(|t| {
                let rows: BTreeMap<&str, &Vec<String>> = t.rows.iter().map(|(l, c)| (l.as_str(), c)).collect();
                json!({"title": t.title, "columns": t.columns, "rows": rows})
            })
            .collect();
        let runs: Vec<Value> = self
            .runs
            .iter()
            .map(|(load, round, s, r)| {
                let load = match load {
                    Load::Steady(f) => json!({"steady": f}),
                    Load::Failover { stopped } => json!({"failover": self.macs.get(*stopped).map(|m| m.name.clone())}),
                    Load::Overload => json!("overload"),
                    Load::AddedLatency => json!("addedLatency"),
                };
                json!({
                    "load": load, "round": round + 1, "strategy": s.slug(), "requests": r.recs.len(), "ok": r.ok_count(),
                    "lost": r.lost(), "ttftP50Ms": r.ttft_percentile(50.0, |_| true), "ttftP99Ms": r.ttft_percentile(99.0, |_| true),
                    "answersPerSecond": r.answers_per_s(), "refusalP99Ms": r.refusal_percentile(99.0),
                    "stoppedAtMs": r.stopped_at_ms, "unstartedErrors": r.unstarted_errors(),
                })
            })
            .collect();
        let goals: Vec<Value> = self
            .verdicts()
            .into_iter()
            .map(|v| json!({"goal": v.what, "met": v.met, "figures": v.figures, "enforced": v.enforced}))
            .collect();
        let macs: Vec<Value> = self
            .macs
            .iter()
            .map(|m| json!({"name": m.name, "speed": m.speed, "capacityPerSecond": m.capacity, "computedPerSecond": m.computed, "decodeMsPerToken": m.per_token_ms}))
            .collect();
        let doc = json!({
            "quick": self.quick, "rounds": self.rounds, "seconds": self.seconds, "capacityPerSecond": self.capacity,
            "fleet": macs, "tables": tables, "runs": runs, "goals": goals, "commands": self.commands,
        });
        std::fs::write(dir.join(format!("{name}.json")), serde_json::to_string_pretty(&doc)?)?;
        Ok(())
    }
}

/// The others' TTFT p99 from a second after the stop over the TTFT p99 before it.
fn others_ratio(r: &Run, stopped: usize) -> Option<f64> {
    match (r.ttft_before_after(99.0).0, r.ttft_others_after(99.0, stopped)) {
        (Some(b), Some(a)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// What `--quick` enforces: the counts that must hold. Never a time: the machine is shared.
pub fn check_counts(report: &Report) -> anyhow::Result<()> {
    let missed: Vec<String> = report
        .verdicts()
        .into_iter()
        .filter(|v| v.enforced && v.met == Some(false))
        .map(|v| format!("{} ({})", v.what, v.figures))
        .collect();
    if !missed.is_empty() {
        bail!("bench route: {}", missed.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(at_ms: f64, target: usize, ttft: Option<f64>, status: u16, error: Option<&str>) -> Rec {
        Rec {
            at_ms,
            target,
            stream: true,
            max_tokens: 10,
            status,
            ttft_ms: ttft,
            total_ms: ttft.map(|t| t + 100.0),
            retry_after: None,
            error: error.map(str::to_owned),
            mac: Some(target),
        }
    }

    #[test]
    fn failover_counts_read_the_records_around_the_stop() {
        let run = Run {
            recs: vec![
                rec(0.0, 0, Some(10.0), 200, None),
                // Started before the stop at 1,000 ms, broken after: allowed.
                rec(900.0, 0, Some(20.0), 200, Some("broken")),
                // In flight on the stopped Mac without a first byte: an unstarted error.
                rec(950.0, 0, None, 0, Some("timeout")),
                // Sent to it 1.5 s after the stop.
                rec(2500.0, 0, None, 0, Some("timeout")),
                rec(2600.0, 1, Some(30.0), 200, None),
                rec(2700.0, 1, None, 429, None),
            ],
            deadline_ms: 20_000.0,
            stopped_at_ms: Some(1000.0),
            generator_late_max: None,
            targets: 2,
            ..Run::default()
        };
        assert_eq!(run.dispatched_after(0), Some(1.0));
        assert_eq!(run.unstarted_errors(), Some(2.0));
        assert_eq!(run.lost(), 3);
        // Before: the two whose first byte came before the stop; after: 30 ms and a lost one counted
        // at the deadline (the refusal is not a start).
        assert_eq!(run.ttft_before_after(99.0), (Some(20.0), Some(20_000.0)));
        assert_eq!(run.refusals_without_retry_after(), 1.0);
        // The others: not sent to the stopped Mac; caught: the two in flight on it without a
        // first byte before the stop (950 ms, and the broken one's 920 ms is before it: not).
        assert_eq!(run.ttft_others_after(99.0, 0), Some(30.0));
        assert_eq!(run.caught_count(0), Some(1.0));
        // The port's count, when there is one, is what reached the stopped Mac.
        let counted = Run { port_later: Some(0.0), ..run.clone() };
        assert_eq!(counted.dispatched_after(0), Some(0.0));
    }

    #[test]
    fn the_routers_records_are_placed_by_the_mac_its_answer_names() {
        let v = json!({"targets": 1, "deadline_s": 10.0, "stopped_at_ms": 1000.0,
            "stopped_port_requests": {"first_second": 2, "later": 0},
            "records": [
                {"at_ms": 0.0, "target": 0, "stream": true, "status": 200, "ttft_ms": 50.0, "total_ms": 90.0, "replica": "b"},
                // Due before the stop, first byte 1.4 s after it: caught, retried on another Mac.
                {"at_ms": 900.0, "target": 0, "stream": true, "status": 200, "ttft_ms": 1400.0, "total_ms": 1500.0, "replica": "b"},
                {"at_ms": 2500.0, "target": 0, "stream": true, "status": 200, "ttft_ms": 80.0, "total_ms": 90.0, "replica": "c"},
                {"at_ms": 2600.0, "target": 0, "stream": false, "status": 429, "total_ms": 1.0, "retry_after": "1"}]});
        let names = ["a", "b", "c"].map(str::to_owned);
        let run = Run::from_json(&v, &names).expect("records");
        assert_eq!(run.shares(3), vec![0.0, 50.0, 25.0]);
        assert_eq!(run.dispatched_after(0), Some(0.0));
        assert_eq!(run.port_first_second, Some(2.0));
        assert_eq!(run.caught_count(0), Some(1.0));
        assert_eq!(run.ttft_caught(99.0, 0), Some(1400.0));
        assert_eq!(run.ttft_others_after(99.0, 0), Some(80.0));
    }

    #[test]
    fn throughput_runs_to_the_last_answer() {
        let run = Run {
            recs: vec![rec(0.0, 0, Some(100.0), 200, None), rec(1000.0, 1, Some(900.0), 200, None)],
            ..Run::default()
        };
        // The last answer ends at 1,000 + 900 + 100 ms: 2 answers in 2 s.
        assert_eq!(run.answers_per_s(), Some(1.0));
        // Within a 1.5 s window only the first ended.
        assert_eq!(run.answers_within(1.5), Some(1.0 / 1.5));
        assert_eq!(run.tokens_per_s(), Some(10.0));
    }
}
