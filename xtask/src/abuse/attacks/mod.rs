//! The attacks, in the order they run: the issue's defects (`defects.rs`), then what a person
//! who wants the model down tries next (`inputs.rs`: hostile input in every field, sampler and
//! grammar bombs, features the model does not have, floods of cheap paths). Each is bounded in
//! requests and time, sends from the attacker's address with the attacker's key, and counts
//! what came back. An attack that can leave the agent unable to serve runs last.

mod defects;
mod inputs;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::agent::ATTACKER_KEY;
use super::net::{self, ATTACKER, Answer};
use super::watch::{Watch, alive};

/// One attack.
pub struct Attack {
    pub slug: &'static str,
    /// The issue's defect it reproduces, if any (`#1` … `#10`, `leak`, `cheap paths`).
    pub issue: &'static str,
    /// What was sent, short.
    pub sent: &'static str,
    /// Part of `--quick` (`cargo xtask test`).
    pub quick: bool,
    pub run: fn(&Arena) -> anyhow::Result<Tally>,
}

/// Every attack, in running order.
pub fn all() -> Vec<Attack> {
    let mut out = defects::attacks();
    out.extend(inputs::attacks());
    // Running out of descriptors can leave the agent unable to serve until it is restarted:
    // whatever else is measured must come before.
    out.sort_by_key(|a| a.slug == defects::IDLE_AGENT_CONNECTIONS);
    out
}

/// What an attack can reach and how big it may be.
pub struct Arena<'a> {
    pub serving: u16,
    pub api: u16,
    pub watch: &'a Watch,
    pub quick: bool,
    /// `spec.admission.queueTimeout`.
    pub queue_timeout: Duration,
}

/// What an attack saw: answers counted by label, one example message per label, findings.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub answers: BTreeMap<String, u32>,
    pub examples: BTreeMap<String, String>,
    pub notes: Vec<String>,
    /// The requests after which the engine process was gone, with their labels.
    pub engine_deaths: Vec<String>,
    /// What the attack got that no client may get (a smuggled request served, the engine's
    /// paths shown): each fails the row, as a restart does.
    pub breaches: Vec<String>,
    /// Each probe: what it was, what came back, how long it took.
    pub probes: Vec<String>,
}

impl Tally {
    pub fn count(&mut self, label: impl Into<String>) {
        *self.answers.entry(label.into()).or_default() += 1;
    }

    pub fn answer(&mut self, a: &Answer) {
        let label = a.label();
        if let Some(m) = a.message() {
            self.examples.entry(label.clone()).or_insert(m);
        }
        self.count(label);
    }

    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    pub fn breach(&mut self, text: impl Into<String>) {
        self.breaches.push(text.into());
    }
}

/// How long one hostile request may take: longer than a hang takes the pulse to call.
const PROBE_TIMEOUT: Duration = Duration::from_secs(45);

impl Arena<'_> {
    fn auth() -> String {
        format!("Bearer {ATTACKER_KEY}")
    }

    /// A request with the attacker's key and `Content-Type: application/json`.
    pub fn wire(&self, method: &str, path: &str, body: &[u8]) -> Vec<u8> {
        let auth = Self::auth();
        net::request_bytes(method, path, &[("Content-Type", "application/json"), ("Authorization", &auth)], body)
    }

    pub fn send(&self, wire: &[u8], timeout: Duration) -> Answer {
        net::exchange(ATTACKER, self.serving, wire, timeout)
    }

    /// One hostile request, counted; if the engine died during it, that is recorded against
    /// `what` (a crash one request caused, the report's most wanted line) and the model is
    /// given time to come back before the next request, which would otherwise be blamed.
    pub fn probe(&self, tally: &mut Tally, what: &str, method: &str, path: &str, body: &[u8]) -> Answer {
        let engine = self.watch.engine_pid();
        let a = self.send(&self.wire(method, path, body), PROBE_TIMEOUT);
        tally.answer(&a);
        tally.probes.push(format!("{what} → {} ({:.1} s)", a.label(), a.latency.as_secs_f64()));
        if let Some(pid) = engine {
            // The agent reaps a crashed engine at once; give the observer's next look a moment.
            std::thread::sleep(Duration::from_millis(300));
            if !alive(pid) {
                tally.engine_deaths.push(format!("{what}: {}", a.label()));
                self.wait_serving(Duration::from_secs(if self.quick { 30 } else { 60 }));
            }
        }
        a
    }

    /// Waits until the model serves again (phase Serving, grade not red, engine alive).
    pub fn wait_serving(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let l = self.watch.latest();
            if l.phase.as_deref() == Some("Serving")
                && l.grade.as_deref() != Some("Red")
                && l.engine_pid.is_some_and(alive)
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        false
    }

    /// `quick` or `full`, by mode.
    pub fn size(&self, quick: usize, full: usize) -> usize {
        if self.quick { quick } else { full }
    }

    pub fn seconds(&self, quick: u64, full: u64) -> Duration {
        Duration::from_secs(if self.quick { quick } else { full })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attacks_are_named_once_and_the_descriptor_exhaustion_runs_last() {
        let all = all();
        let mut slugs: Vec<&str> = all.iter().map(|a| a.slug).collect();
        assert_eq!(slugs.last(), Some(&defects::IDLE_AGENT_CONNECTIONS));
        slugs.sort_unstable();
        slugs.dedup();
        assert_eq!(slugs.len(), all.len(), "slugs are unique");
        for issue in ["#1", "#2", "#3", "#4", "#5", "#6", "#9"] {
            assert!(all.iter().any(|a| a.quick && a.issue == issue), "quick covers defect {issue}");
        }
    }
}
