//! Load shapes into request plans, pure. Each client has its own seeded generator, so a run with
//! the same seed and concurrency sends the same requests whatever the timing.
//!
//! Prompts vary (a tag unique to the client and request, then words drawn at random) so that
//! llama-server's prompt cache cannot make the load cheaper than real traffic.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// The traffic calibrate sends through the serving port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// Chat turns, short completions and long prompts, streaming and not.
    Mixed,
    /// Short chat turns (`/v1/chat/completions`), mostly streamed.
    Chat,
    /// Long prompts with short answers (`/v1/completions`): prompt processing dominates.
    Long,
    /// Short chat turns from every client at once for 2 s, then 4 s of silence.
    Burst,
}

/// Which OpenAI-compatible path a request takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Api {
    /// `/v1/chat/completions`
    Chat,
    /// `/v1/completions`
    Completions,
}

impl Api {
    pub fn path(self) -> &'static str {
        match self {
            Api::Chat => "/v1/chat/completions",
            Api::Completions => "/v1/completions",
        }
    }
}

/// One request a client sends, after waiting `pause_before`.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestPlan {
    pub api: Api,
    pub stream: bool,
    pub prompt: String,
    pub max_tokens: u32,
    pub pause_before: Duration,
}

impl RequestPlan {
    /// The JSON body, as an OpenAI client sends it.
    pub fn body(&self) -> serde_json::Value {
        match self.api {
            Api::Chat => serde_json::json!({
                "messages": [{"role": "user", "content": self.prompt}],
                "max_tokens": self.max_tokens,
                "stream": self.stream,
                "temperature": 0.7,
            }),
            Api::Completions => serde_json::json!({
                "prompt": self.prompt,
                "max_tokens": self.max_tokens,
                "stream": self.stream,
                "temperature": 0.7,
            }),
        }
    }
}

/// Burst shape: every client sends for this long…
pub const BURST_ON: Duration = Duration::from_secs(2);
/// …then all are silent for this long.
pub const BURST_OFF: Duration = Duration::from_secs(4);

/// Tokens a chat template and the answer's framing may add to a prompt (the tiny test model's
/// template adds about 20).
const TEMPLATE_TOKENS: u32 = 64;

/// What fits one slot's context. A token covers at least one byte of ASCII text in the
/// tokenizers llama.cpp ships, so a prompt of `b` bytes is at most `b` tokens: sizing prompts
/// in bytes never overflows the context, whatever the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextBudget {
    /// Tokens of one slot's context (llama-server `/props` `default_generation_settings.n_ctx`).
    pub slot_tokens: u32,
}

impl ContextBudget {
    fn usable(self) -> u32 {
        self.slot_tokens.saturating_sub(TEMPLATE_TOKENS).max(16)
    }

    /// (prompt bytes, max tokens) capped so that both fit together.
    fn fit(self, prompt_bytes: u32, max_tokens: u32) -> (u32, u32) {
        let usable = self.usable();
        let max_tokens = max_tokens.clamp(1, usable / 2);
        (prompt_bytes.clamp(8, usable - max_tokens), max_tokens)
    }
}

/// The kinds of request a shape mixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ChatTurn,
    ShortCompletion,
    LongPrompt,
}

/// Plans one client's requests.
pub struct Planner {
    shape: Shape,
    budget: ContextBudget,
    client: u32,
    sent: u64,
    rng: StdRng,
}

const WORDS: &[&str] = &[
    "engine", "slot", "token", "latency", "queue", "model", "metal", "kernel", "cache", "prompt", "answer", "river",
    "granite", "orbit", "lantern", "meadow", "circuit", "harbor", "pulse", "signal", "window", "garden", "compass",
    "ledger", "violet", "thunder", "canvas", "summit", "willow", "ember", "quartz", "falcon", "harvest", "mirror",
    "anchor", "saffron", "glacier", "cobalt", "paper", "voyage",
];

const CHAT_OPENERS: &[&str] = &[
    "Explain briefly why",
    "Write one sentence about",
    "List three facts on",
    "Summarise in plain words:",
    "What is the link between",
    "Give a short example of",
];

impl Planner {
    /// Client `client` of a run seeded with `seed`: its own stream of plans.
    pub fn new(shape: Shape, seed: u64, client: u32, budget: ContextBudget) -> Self {
        // Distinct, well-spread seeds per client from one run seed (the golden-ratio step).
        let client_seed = seed ^ u64::from(client).wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Self { shape, budget, client, sent: 0, rng: StdRng::seed_from_u64(client_seed) }
    }

    /// The next request, `elapsed` into the run (the burst shape waits for its next window).
    pub fn next(&mut self, elapsed: Duration) -> RequestPlan {
        let kind = match self.shape {
            Shape::Chat | Shape::Burst => Kind::ChatTurn,
            Shape::Long => Kind::LongPrompt,
            Shape::Mixed => match self.rng.random_range(0..100) {
                0..60 => Kind::ChatTurn,
                60..80 => Kind::ShortCompletion,
                _ => Kind::LongPrompt,
            },
        };
        let (api, stream_percent, bytes, tokens, think_ms) = match kind {
            Kind::ChatTurn => (Api::Chat, 70, 40..=240, 16..=64, 0..=300),
            Kind::ShortCompletion => (Api::Completions, 50, 20..=120, 8..=48, 0..=300),
            Kind::LongPrompt => (Api::Completions, 30, 1_500..=6_000, 8..=32, 0..=500),
        };
        let stream = self.rng.random_range(0..100) < stream_percent;
        let (prompt_bytes, max_tokens) = self.budget.fit(self.rng.random_range(bytes), self.rng.random_range(tokens));
        let prompt = self.prompt(kind, prompt_bytes as usize);
        let think = Duration::from_millis(self.rng.random_range(think_ms));
        let pause_before = match self.shape {
            Shape::Burst => burst_pause(elapsed, think / 10),
            _ => think,
        };
        self.sent += 1;
        RequestPlan { api, stream, prompt, max_tokens, pause_before }
    }

    /// At most `bytes` bytes (ASCII): a tag no other request has, then random words.
    fn prompt(&mut self, kind: Kind, bytes: usize) -> String {
        let mut text = format!("[c{} r{}] ", self.client, self.sent);
        if kind == Kind::ChatTurn {
            text.push_str(CHAT_OPENERS[self.rng.random_range(0..CHAT_OPENERS.len())]);
        }
        loop {
            let word = WORDS[self.rng.random_range(0..WORDS.len())];
            if text.len() + 1 + word.len() > bytes {
                break;
            }
            text.push(' ');
            text.push_str(word);
        }
        text.truncate(bytes);
        text
    }
}

/// How long to wait before sending, `elapsed` into a burst run: `jitter` inside an on-window
/// (bursts are not one instant), else until the next window opens.
pub fn burst_pause(elapsed: Duration, jitter: Duration) -> Duration {
    let period = BURST_ON + BURST_OFF;
    let into = Duration::from_nanos((elapsed.as_nanos() % period.as_nanos()) as u64);
    if into < BURST_ON { jitter } else { period - into }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ROOMY: ContextBudget = ContextBudget { slot_tokens: 8192 };

    fn plans(shape: Shape, seed: u64, client: u32, n: usize, budget: ContextBudget) -> Vec<RequestPlan> {
        let mut p = Planner::new(shape, seed, client, budget);
        (0..n).map(|_| p.next(Duration::ZERO)).collect()
    }

    #[test]
    fn a_seed_gives_the_same_plans_and_clients_differ() {
        assert_eq!(plans(Shape::Mixed, 7, 0, 50, ROOMY), plans(Shape::Mixed, 7, 0, 50, ROOMY));
        assert_ne!(plans(Shape::Mixed, 7, 0, 50, ROOMY), plans(Shape::Mixed, 7, 1, 50, ROOMY));
        assert_ne!(plans(Shape::Mixed, 7, 0, 50, ROOMY), plans(Shape::Mixed, 8, 0, 50, ROOMY));
    }

    #[test]
    fn prompts_never_repeat_within_a_run() {
        let mut all: Vec<String> =
            (0..4).flat_map(|c| plans(Shape::Chat, 1, c, 100, ROOMY)).map(|p| p.prompt).collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n);
    }

    #[test]
    fn mixed_uses_both_paths_streamed_and_not_and_long_prompts() {
        let p = plans(Shape::Mixed, 3, 0, 400, ROOMY);
        for api in [Api::Chat, Api::Completions] {
            for stream in [true, false] {
                assert!(p.iter().any(|r| r.api == api && r.stream == stream), "{api:?} stream={stream}");
            }
        }
        assert!(p.iter().any(|r| r.prompt.len() >= 1_500), "long prompts are in the mix");
        assert!(
            plans(Shape::Long, 3, 0, 50, ROOMY).iter().all(|r| r.api == Api::Completions && r.prompt.len() >= 1_000)
        );
        assert!(plans(Shape::Chat, 3, 0, 50, ROOMY).iter().all(|r| r.api == Api::Chat && r.prompt.len() <= 240));
    }

    #[test]
    fn bodies_are_what_openai_clients_send() {
        let mut p = Planner::new(Shape::Chat, 1, 0, ROOMY);
        let plan = p.next(Duration::ZERO);
        let body = plan.body();
        assert_eq!(body["messages"][0]["content"], plan.prompt.as_str());
        assert_eq!(body["max_tokens"], plan.max_tokens);
        let completion = RequestPlan { api: Api::Completions, ..plan };
        assert_eq!(completion.body()["prompt"], completion.prompt.as_str());
    }

    #[test]
    fn bursts_wait_for_the_next_window() {
        let j = Duration::from_millis(5);
        assert_eq!(burst_pause(Duration::ZERO, j), j);
        assert_eq!(burst_pause(Duration::from_millis(1_999), j), j);
        assert_eq!(burst_pause(Duration::from_secs(2), j), Duration::from_secs(4));
        assert_eq!(burst_pause(Duration::from_secs(5), j), Duration::from_secs(1));
        assert_eq!(burst_pause(Duration::from_secs(6), j), j, "the next period's window");
    }

    proptest! {
        #[test]
        fn every_plan_fits_the_context(slot_tokens in 0u32..10_000, seed: u64, shape_i in 0usize..4) {
            let shape = [Shape::Mixed, Shape::Chat, Shape::Long, Shape::Burst][shape_i];
            let budget = ContextBudget { slot_tokens };
            let usable = slot_tokens.saturating_sub(TEMPLATE_TOKENS).max(16) as usize;
            for plan in plans(shape, seed, 0, 20, budget) {
                prop_assert!(plan.max_tokens >= 1);
                prop_assert!(plan.prompt.len() + plan.max_tokens as usize <= usable, "{} + {}", plan.prompt.len(), plan.max_tokens);
                prop_assert!(plan.prompt.is_ascii() && !plan.prompt.is_empty());
            }
        }
    }
}
