//! How much of the engine's context its running requests hold, read from llama-server's
//! `/slots`: the figure the Gateway API inference extension's model-server protocol calls KV-cache
//! utilization.
//!
//! What it rests on, measured on the pinned llama-server (tiny model, `-c 512 -np 2`): every slot
//! says its context `n_ctx`; a slot at work (`is_processing`) says `n_prompt_tokens`, which counts
//! its prompt *and* the tokens decoded so far (it grew 52, 55, 57, 59 while `n_decoded` went 0,
//! 3, 5, 7): the cells of the KV cache its request holds. An idle slot keeps its last
//! conversation's cells for prompt reuse, but any request may take them, so they count as free
//! (vLLM counts its reusable prefix-cache blocks as free the same way).
//!
//! The capacity depends on how the engine laid its cache out, which `/slots` does not say: split
//! (llama-server's default with an explicit `--parallel`), each slot's `n_ctx` is its own share
//! and the cache is their sum; shared (`--kv-unified`), every slot reports the whole cache
//! (`-c 512 -np 2 --kv-unified` showed `n_ctx` 512 twice). The caller knows which from the command
//! line it started the engine with. The context size asked for is no substitute: llama-server
//! rounds it (`-c 100 -np 3` gave three slots of 256).

/// How the engine's KV cache is laid out over its slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheLayout {
    /// Each slot has a context of its own (`n_ctx` each; the cache is their sum).
    Split,
    /// All slots share one context (`--kv-unified`; each slot reports all of it).
    Shared,
}

/// The fraction (0 to 1) of the engine's context held by the requests it is working on, from its
/// `/slots` answer. None when the answer does not support the figure: not a list of slots, a slot
/// without a context size, or a slot at work that does not say how many tokens it holds (another
/// llama.cpp version): an unknown is not guessed. Outside input: never a panic.
pub fn context_use(body: &[u8], layout: CacheLayout) -> Option<f64> {
    let slots: Vec<serde_json::Value> = serde_json::from_slice(body).ok()?;
    let mut capacity: u64 = 0;
    let mut held: u64 = 0;
    for slot in &slots {
        let n_ctx = slot.get("n_ctx")?.as_u64()?;
        capacity = match layout {
            CacheLayout::Split => capacity.saturating_add(n_ctx),
            CacheLayout::Shared => capacity.max(n_ctx),
        };
        if slot.get("is_processing").and_then(serde_json::Value::as_bool) == Some(true) {
            // A slot cannot hold more than its context, whatever it claims.
            let tokens = slot.get("n_prompt_tokens")?.as_u64()?.min(n_ctx);
            held = held.saturating_add(tokens);
        }
    }
    if capacity == 0 {
        return None;
    }
    // Shared, the slots' claims may add up past the one cache only if the engine lies: clamp.
    Some((held as f64 / capacity as f64).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Captured from the pinned llama-server (`-c 512 -np 2`) while one completion decoded.
    const BUSY: &[u8] = br#"[{"id":0,"n_ctx":256,"speculative":false,"is_processing":false},
        {"id":1,"n_ctx":256,"speculative":false,"is_processing":true,"id_task":208,"n_prompt_tokens":59,
         "n_prompt_tokens_processed":1,"n_prompt_tokens_cache":51,"params":{},
         "next_token":[{"has_next_token":true,"has_new_line":false,"n_remain":193,"n_decoded":7}]}]"#;
    const IDLE: &[u8] = br#"[{"id":0,"n_ctx":256,"speculative":false,"is_processing":false},
        {"id":1,"n_ctx":256,"speculative":false,"is_processing":false}]"#;

    #[test]
    fn the_tokens_of_slots_at_work_over_the_whole_cache() {
        assert_eq!(context_use(BUSY, CacheLayout::Split), Some(59.0 / 512.0));
        assert_eq!(context_use(IDLE, CacheLayout::Split), Some(0.0), "an idle engine holds nothing for anyone");
        let shared = br#"[{"id":0,"n_ctx":512,"is_processing":true,"n_prompt_tokens":128},
            {"id":1,"n_ctx":512,"is_processing":true,"n_prompt_tokens":128}]"#;
        assert_eq!(context_use(shared, CacheLayout::Shared), Some(0.5), "shared: one cache, not two");
    }

    #[test]
    fn what_does_not_support_the_figure_is_not_guessed() {
        assert_eq!(context_use(b"not json", CacheLayout::Split), None);
        assert_eq!(context_use(br#"{"error":"slots disabled"}"#, CacheLayout::Split), None);
        assert_eq!(context_use(b"[]", CacheLayout::Split), None, "no slots: no capacity");
        assert_eq!(context_use(br#"[{"id":0,"is_processing":false}]"#, CacheLayout::Split), None);
        assert_eq!(
            context_use(br#"[{"id":0,"n_ctx":256,"is_processing":true}]"#, CacheLayout::Split),
            None,
            "a slot at work that does not say what it holds"
        );
        assert_eq!(context_use(br#"[{"n_ctx":-5,"is_processing":false}]"#, CacheLayout::Split), None);
    }

    #[test]
    fn a_slot_never_counts_more_than_its_context() {
        let over =
            br#"[{"n_ctx":100,"is_processing":true,"n_prompt_tokens":1000},{"n_ctx":100,"is_processing":false}]"#;
        assert_eq!(context_use(over, CacheLayout::Split), Some(0.5));
        assert_eq!(context_use(over, CacheLayout::Shared), Some(1.0));
    }

    proptest! {
        #[test]
        fn any_answer_reads_as_a_fraction_or_nothing(
            slots in proptest::collection::vec((0u64..1 << 40, any::<bool>(), proptest::option::of(0u64..1 << 40)), 0..8),
            shared in any::<bool>(),
        ) {
            let body = serde_json::Value::Array(slots.iter().map(|(n_ctx, busy, tokens)| {
                let mut s = serde_json::json!({"n_ctx": n_ctx, "is_processing": busy});
                if let Some(t) = tokens { s["n_prompt_tokens"] = serde_json::json!(t); }
                s
            }).collect());
            let layout = if shared { CacheLayout::Shared } else { CacheLayout::Split };
            if let Some(f) = context_use(body.to_string().as_bytes(), layout) {
                prop_assert!((0.0..=1.0).contains(&f), "{f}");
            }
        }
    }
}
