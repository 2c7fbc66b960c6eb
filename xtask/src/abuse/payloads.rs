//! What the attacks send, as pure functions of their size: the bodies are built here and
//! measured by the tests below (a "20,000 levels" body must really be 20,000 levels deep; a
//! "million entries" must be a million), so the table's "sent" column can be trusted.
//!
//! Bodies are JSON text built by hand, not by serde: some must hold what serde would never
//! write (a lone surrogate escape, invalid UTF-8, nesting past any parser's limit).

/// Nesting the attacks use: tens of thousands of levels, the issue's crash.
pub const DEEP: usize = 25_000;

/// `[[[…]]]`, `depth` arrays deep.
pub fn nested_arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// A JSON schema of arrays of arrays, `depth` schemas deep: what a schema-to-grammar converter
/// walks recursively.
pub fn nested_schema(depth: usize) -> String {
    format!("{}{{}}{}", r#"{"type":"array","items":"#.repeat(depth), "}".repeat(depth))
}

/// A GBNF grammar whose only rule nests parentheses `depth` deep.
pub fn nested_grammar(depth: usize) -> String {
    format!(r#"root ::= {}"a"{}"#, "(".repeat(depth), ")".repeat(depth))
}

/// A string field's worth of what breaks text handling, as JSON string content (escapes kept
/// as written): NUL, BEL, a lone high and a lone low surrogate, right-to-left override and
/// mark, a byte-order mark, a zero-width joiner, a combining mark on nothing.
pub const HOSTILE_TEXT: &str = r"a\u0000b\u0007\ud800c\udfff\u202eevil\u200f\ufeff\u200d\u0301";

/// `bytes` bytes (rounded down to whole characters) of a four-byte emoji.
pub fn emoji(bytes: usize) -> String {
    "\u{1F608}".repeat(bytes / 4)
}

/// `[[id, 1], …]` with `entries` pairs, ids cycling through the first 100 tokens (a million
/// fit under the port's 8 MiB body limit).
pub fn logit_bias_pairs(entries: usize) -> String {
    let mut out = String::with_capacity(entries * 7);
    out.push('[');
    for i in 0..entries {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!("[{},1]", i % 100));
    }
    out.push(']');
    out
}

/// `{"w0": 1.0, "w1": 1.0, …}`: string keys, each tokenized by the engine.
pub fn logit_bias_words(entries: usize) -> String {
    let words: Vec<String> = (0..entries).map(|i| format!("\"w{i}\":1.0")).collect();
    format!("{{{}}}", words.join(","))
}

/// `n` short prompts in one JSON array.
pub fn prompt_array(n: usize) -> String {
    let prompts: Vec<String> = (0..n).map(|i| format!("\"tell me about {i}\"")).collect();
    format!("[{}]", prompts.join(","))
}

/// A chat body with one user message of JSON string content `content` (escapes as written).
pub fn chat(content: &str, max_tokens: &str, extra: &str) -> String {
    format!(r#"{{"messages":[{{"role":"user","content":"{content}"}}],"max_tokens":{max_tokens}{extra}}}"#)
}

/// The victim's request: small, valid, the kind every client sends.
pub fn victim_chat() -> String {
    chat("Say hi.", "4", "")
}

/// The deepest nesting of `[` and `{` in JSON text, strings skipped. The tests' measure.
pub fn json_depth(text: &str) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for c in text.chars() {
        match (in_string, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (true, false, '"') => in_string = false,
            (true, false, _) => {}
            (false, _, '"') => in_string = true,
            (false, _, '[' | '{') => {
                depth += 1;
                max = max.max(depth);
            }
            (false, _, ']' | '}') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_bodies_are_as_deep_as_they_say() {
        assert_eq!(json_depth(&nested_arrays(DEEP)), DEEP);
        // Each level of the schema is one object; `items` holds the next.
        assert_eq!(json_depth(&nested_schema(DEEP)), DEEP + 1);
        let g = nested_grammar(3);
        assert_eq!(g, r#"root ::= ((("a")))"#);
        assert_eq!(json_depth(r#"{"a":"[[[[", "b":[{"c":"\"]"}]}"#), 3, "brackets in strings do not count");
        // Shallow copies stay valid JSON (serde stops at 128 levels, so only these are checked).
        for text in [nested_arrays(100), nested_schema(100)] {
            assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok(), "{text}");
        }
    }

    #[test]
    fn sizes_are_what_the_table_says() {
        let pairs = logit_bias_pairs(1_000_000);
        let v: serde_json::Value = serde_json::from_str(&pairs).unwrap_or_default();
        assert_eq!(v.as_array().map(Vec::len), Some(1_000_000));
        assert!(pairs.len() < 8 << 20, "fits under the port's 8 MiB body limit: {}", pairs.len());
        let words: serde_json::Value = serde_json::from_str(&logit_bias_words(1000)).unwrap_or_default();
        assert_eq!(words.as_object().map(serde_json::Map::len), Some(1000));
        assert_eq!(emoji(1 << 20).len(), 1 << 20);
        let prompts: serde_json::Value = serde_json::from_str(&prompt_array(120)).unwrap_or_default();
        assert_eq!(prompts.as_array().map(Vec::len), Some(120));
    }

    #[test]
    fn hostile_text_is_json_that_no_rust_string_could_hold() {
        let body = chat(HOSTILE_TEXT, "1", "");
        // A lone surrogate is legal JSON escape syntax but no valid Unicode scalar: strict
        // parsers refuse it, lenient ones pass it on.
        assert!(serde_json::from_str::<serde_json::Value>(&body).is_err());
        assert!(body.contains(r"\u0000") && body.contains(r"\ud800") && body.contains(r"\u202e"));
        let v: serde_json::Value = serde_json::from_str(&victim_chat()).unwrap_or_default();
        assert_eq!(v["max_tokens"], 4);
    }
}
