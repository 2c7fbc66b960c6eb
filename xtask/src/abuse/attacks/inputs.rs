//! What a person who wants the model down tries after the known defects: hostile text in every
//! string field, the sampler's and the grammar engine's worst cases, numbers at their types'
//! limits, token ids the vocabulary does not have, features the model was not started with,
//! floods of the paths that skip admission, and what `/props` tells a stranger.

use std::time::{Duration, Instant};

use super::{Arena, Attack, Tally};
use crate::abuse::payloads::{self, HOSTILE_TEXT};

pub fn attacks() -> Vec<Attack> {
    vec![
        Attack {
            slug: "hostile-text",
            issue: "new",
            sent: "NUL, BEL, lone surrogates (\\ud800 \\udfff), RTL override, BOM in content, role, name, model, stop, user, prompt, tokenize; invalid UTF-8; 1 MiB of emoji",
            quick: false,
            run: hostile_text,
        },
        Attack {
            slug: "engine-500-flood",
            issue: "new",
            sent: "60 chats with a lone surrogate in the content (the engine answers 500), 4 at once: does the breaker open for everyone?",
            quick: false,
            run: engine_500_flood,
        },
        Attack {
            slug: "sampler-bombs",
            issue: "new",
            sent: "n_probs 2^31-1 and 10^6, top_logprobs 10^6, logit_bias with 10^6 pairs and 10^5 word keys, max_tokens at i32/i64/u64 limits, negative, float, string",
            quick: false,
            run: sampler_bombs,
        },
        Attack {
            slug: "grammar-bombs",
            issue: "new",
            sent: "grammars (\"a\"{0,1000}){0,1000}, \"a\"{1000000}, left recursion; json_schema minItems 10^6, pattern ^(a+)+$",
            quick: false,
            run: grammar_bombs,
        },
        Attack {
            slug: "token-ids-and-cache",
            issue: "new",
            sent: "prompt token ids 999999, -1, 2^31-1; detokenize of the same; id_slot 4 (the pulse's), 2^31-1, -2; n_keep -1 with n_discard 2^31-1; n_cache_reuse 2^31-1",
            quick: false,
            run: token_ids_and_cache,
        },
        Attack {
            slug: "missing-features",
            issue: "new",
            sent: "embeddings (1,000 inputs), rerank, infill, image_url (data: and http://127.0.0.1 agent port), input_audio",
            quick: false,
            run: missing_features,
        },
        Attack {
            slug: "tokenize-1mib",
            issue: "cheap paths",
            sent: "one /tokenize with_pieces of 1 MiB less 1 KiB (the agent reads at most 1 MiB of a cheap path's body)",
            quick: false,
            run: tokenize_one_mib,
        },
        Attack {
            slug: "cheap-flood",
            issue: "cheap paths",
            sent: "8 clients: 1 MiB /tokenize with_pieces and 1 MiB /apply-template, 20 s, at most 6 requests each",
            quick: false,
            run: cheap_flood,
        },
        Attack { slug: "props", issue: "leak", sent: "GET /props with the attacker's key", quick: true, run: props },
    ]
}

fn probe_all(arena: &Arena, requests: &[(&str, &str, String)]) -> Tally {
    let mut tally = Tally::default();
    for (what, path, body) in requests {
        arena.probe(&mut tally, what, "POST", path, body.as_bytes());
    }
    tally
}

fn hostile_text(arena: &Arena) -> anyhow::Result<Tally> {
    let t = HOSTILE_TEXT;
    let msg = |field: &str| format!(r#"{{"messages":[{{"role":"user","content":"hi",{field}}}],"max_tokens":4}}"#);
    let mut tally = probe_all(
        arena,
        &[
            ("content", "/v1/chat/completions", payloads::chat(t, "4", "")),
            (
                "role",
                "/v1/chat/completions",
                format!(r#"{{"messages":[{{"role":"{t}","content":"hi"}}],"max_tokens":4}}"#),
            ),
            ("name", "/v1/chat/completions", msg(&format!(r#""name":"{t}""#))),
            ("model", "/v1/chat/completions", payloads::chat("hi", "4", &format!(r#","model":"{t}""#))),
            ("stop", "/v1/chat/completions", payloads::chat("hi", "4", &format!(r#","stop":["{t}"]"#))),
            ("user", "/v1/chat/completions", payloads::chat("hi", "4", &format!(r#","user":"{t}""#))),
            ("prompt", "/completion", format!(r#"{{"prompt":"{t}","n_predict":4}}"#)),
            ("tokenize", "/tokenize", format!(r#"{{"content":"{t}","with_pieces":true}}"#)),
            ("1 MiB emoji", "/v1/chat/completions", payloads::chat(&payloads::emoji(1 << 20), "1", "")),
        ],
    );
    // Bytes that are no UTF-8 at all inside a JSON string.
    let mut raw = br#"{"prompt":"a"#.to_vec();
    raw.extend_from_slice(&[0xff, 0xfe, 0xc0, 0x80, 0xed, 0xa0, 0x80]);
    raw.extend_from_slice(br#"","n_predict":4}"#);
    arena.probe(&mut tally, "invalid UTF-8", "POST", "/completion", &raw);
    Ok(tally)
}

fn engine_500_flood(arena: &Arena) -> anyhow::Result<Tally> {
    let wire = arena.wire("POST", "/v1/chat/completions", payloads::chat(HOSTILE_TEXT, "4", "").as_bytes());
    let answers: Vec<crate::abuse::net::Answer> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| (0..15).map(|_| arena.send(&wire, Duration::from_secs(30))).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).flatten().collect()
    });
    let mut tally = Tally::default();
    for a in &answers {
        tally.answer(a);
    }
    Ok(tally)
}

fn sampler_bombs(arena: &Arena) -> anyhow::Result<Tally> {
    let completion = |extra: &str| format!(r#"{{"prompt":"hi","n_predict":4{extra}}}"#);
    let mut requests = vec![
        ("n_probs 2^31-1", "/completion", completion(r#","n_probs":2147483647"#)),
        ("n_probs 10^6", "/completion", completion(r#","n_probs":1000000"#)),
        (
            "top_logprobs 10^6",
            "/v1/chat/completions",
            payloads::chat("hi", "4", r#","logprobs":true,"top_logprobs":1000000"#),
        ),
        (
            "logit_bias 10^6 pairs",
            "/completion",
            completion(&format!(r#","logit_bias":{}"#, payloads::logit_bias_pairs(1_000_000))),
        ),
        (
            "logit_bias 10^5 words",
            "/completion",
            completion(&format!(r#","logit_bias":{}"#, payloads::logit_bias_words(100_000))),
        ),
    ];
    for limit in
        ["2147483647", "9223372036854775807", "18446744073709551615", "-1", "-2147483649", "1.5", "1e300", "\"16\""]
    {
        requests.push(("max_tokens", "/v1/chat/completions", payloads::chat("hi", limit, "")));
    }
    let mut tally = probe_all(arena, &requests);
    tally.note("max_tokens: 2^31-1, 2^63-1, 2^64-1, -1, -2^31-1, 1.5, 1e300, \"16\"");
    Ok(tally)
}

fn grammar_bombs(arena: &Arena) -> anyhow::Result<Tally> {
    let grammar = |g: &str| format!(r#"{{"prompt":"hi","n_predict":8,"grammar":"{}"}}"#, g.replace('"', "\\\""));
    let schema = |s: &str| format!(r#"{{"prompt":"hi","n_predict":8,"json_schema":{s}}}"#);
    Ok(probe_all(
        arena,
        &[
            ("grammar (\"a\"{0,1000}){0,1000}", "/completion", grammar(r#"root ::= ("a"{0,1000}){0,1000}"#)),
            ("grammar \"a\"{1000000}", "/completion", grammar(r#"root ::= "a"{1000000}"#)),
            ("grammar left recursion", "/completion", grammar(r#"root ::= root "a" | "a""#)),
            (
                "json_schema minItems 10^6",
                "/completion",
                schema(r#"{"type":"array","minItems":1000000,"items":{"type":"string"}}"#),
            ),
            ("json_schema pattern", "/completion", schema(r#"{"type":"string","pattern":"^(a+)+$"}"#)),
        ],
    ))
}

fn token_ids_and_cache(arena: &Arena) -> anyhow::Result<Tally> {
    let completion = |extra: &str| format!(r#"{{"prompt":"hi","n_predict":8{extra}}}"#);
    Ok(probe_all(
        arena,
        &[
            ("prompt ids", "/completion", r#"{"prompt":[999999,-1,2147483647],"n_predict":4}"#.to_owned()),
            ("mixed prompt ids", "/completion", r#"{"prompt":[["hi",99999999]],"n_predict":4}"#.to_owned()),
            ("detokenize", "/detokenize", r#"{"tokens":[999999,-1,2147483647]}"#.to_owned()),
            ("id_slot 4", "/completion", completion(r#","id_slot":4"#)),
            ("id_slot 2^31-1", "/completion", completion(r#","id_slot":2147483647"#)),
            ("id_slot -2", "/completion", completion(r#","id_slot":-2"#)),
            (
                "n_keep/n_discard",
                "/completion",
                completion(r#","cache_prompt":true,"n_keep":-1,"n_discard":2147483647"#),
            ),
            ("n_cache_reuse", "/completion", completion(r#","cache_prompt":true,"n_cache_reuse":2147483647"#)),
        ],
    ))
}

/// A 1×1 PNG.
const PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

fn missing_features(arena: &Arena) -> anyhow::Result<Tally> {
    let inputs: Vec<String> = (0..1000).map(|i| format!("\"text {i}\"")).collect();
    let image = |url: &str| {
        format!(
            r#"{{"messages":[{{"role":"user","content":[{{"type":"text","text":"what is this?"}},{{"type":"image_url","image_url":{{"url":"{url}"}}}}]}}],"max_tokens":4}}"#
        )
    };
    Ok(probe_all(
        arena,
        &[
            ("embeddings", "/v1/embeddings", format!(r#"{{"input":[{}]}}"#, inputs.join(","))),
            ("embedding", "/embedding", r#"{"content":"hi"}"#.to_owned()),
            ("rerank", "/v1/rerank", r#"{"query":"a","documents":["b","c"]}"#.to_owned()),
            (
                "infill",
                "/infill",
                r#"{"input_prefix":"def f(","input_suffix":")","input_extra":[{"filename":"x.py","text":"pass"}],"n_predict":4}"#
                    .to_owned(),
            ),
            ("image data:", "/v1/chat/completions", image(&format!("data:image/png;base64,{PNG}"))),
            ("image http://agent", "/v1/chat/completions", image(&format!("http://127.0.0.1:{}/api/v1/models", arena.api))),
            (
                "input_audio",
                "/v1/chat/completions",
                r#"{"messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{"data":"UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAIA+AAACABAAZGF0YQAAAAA=","format":"wav"}}]}],"max_tokens":4}"#
                    .to_owned(),
            ),
        ],
    ))
}

/// Prose as JSON string content, short enough that a body of it stays under the 1 MiB the
/// agent reads of a cheap path's body (the issue's "1 MiB /tokenize").
fn one_mib_text() -> String {
    "the quick brown fox jumps over the lazy dog. ".repeat(((1 << 20) - 1024) / 45)
}

fn tokenize_one_mib(arena: &Arena) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    let body = format!(r#"{{"content":"{}","with_pieces":true}}"#, one_mib_text());
    let a = arena.probe(&mut tally, "tokenize 1 MiB", "POST", "/tokenize", body.as_bytes());
    tally.note(format!(
        "answer {:.1} MB in {:.2} s for a {:.1} MB request",
        a.bytes as f64 / 1e6,
        a.latency.as_secs_f64(),
        body.len() as f64 / 1e6
    ));
    Ok(tally)
}

fn cheap_flood(arena: &Arena) -> anyhow::Result<Tally> {
    let text = one_mib_text();
    let tokenize = arena.wire("POST", "/tokenize", format!(r#"{{"content":"{text}","with_pieces":true}}"#).as_bytes());
    let template = arena.wire("POST", "/apply-template", payloads::chat(&text, "4", "").as_bytes());
    let window = Duration::from_secs(20);
    let started = Instant::now();
    let answers: Vec<(&str, crate::abuse::net::Answer)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (kind, wire) = if i % 2 == 0 { ("tokenize", &tokenize) } else { ("apply-template", &template) };
                s.spawn(move || {
                    let mut out = Vec::new();
                    while started.elapsed() < window && out.len() < 6 {
                        out.push((kind, arena.send(wire, Duration::from_secs(30))));
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).flatten().collect()
    });
    let mut tally = Tally::default();
    for (kind, a) in &answers {
        tally.count(format!("{kind} {}", a.label()));
    }
    let bytes: u64 = answers.iter().map(|(_, a)| a.bytes).sum();
    let slowest = answers.iter().map(|(_, a)| a.latency.as_secs_f64()).fold(0.0, f64::max);
    tally.note(format!(
        "{} requests in {:.0} s, {:.0} MB of answers, slowest {slowest:.1} s",
        answers.len(),
        started.elapsed().as_secs_f64(),
        bytes as f64 / 1e6
    ));
    Ok(tally)
}

fn props(arena: &Arena) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    let a = arena.send(&arena.wire("GET", "/props", b""), Duration::from_secs(10));
    tally.answer(&a);
    let shown: Vec<&str> = ["model_path", "build_info", "media_marker"]
        .into_iter()
        .filter(|k| a.body.contains(&format!("\"{k}\"")))
        .collect();
    if !shown.is_empty() {
        tally.breach(format!("/props shows {}", shown.join(", ")));
    }
    Ok(tally)
}
