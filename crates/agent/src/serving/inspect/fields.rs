//! The fields of a request body the serving port reads, and the bounds it holds them to. Only
//! these are read; everything else passes unread (its nesting was already bounded).
//!
//! The bounds are where llama-server's handling of a field stops being safe for the other
//! clients of the model: work that grows without limit in one field (a `logit_bias` of a
//! million entries is applied to every sampled token; `n_probs` sorts the vocabulary for every
//! token and multiplies the answer's size), or input that crashes the engine outright.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::RequestRefusal;

/// Probabilities per generated token a request may ask for (`n_probs`, `top_logprobs`,
/// `logprobs` as a number). Each costs a partial sort of the vocabulary and a detokenized entry
/// per generated token, unbounded by the engine.
pub const MAX_N_PROBS: u64 = 100;
/// `logit_bias` entries; each is applied at every sampled token.
pub const MAX_LOGIT_BIAS: u64 = 4096;
/// Tokens a penalty looks back over (`repeat_last_n`, `dry_penalty_last_n`): the engine allocates
/// a buffer of this many tokens, 8 to 16 GiB at the type's limit.
pub const MAX_LOOKBACK_TOKENS: i64 = 1 << 16;
/// `dry_sequence_breakers` entries and their length: each entry costs a detokenization of the
/// whole vocabulary on the engine's main loop.
pub const MAX_SEQUENCE_BREAKERS: usize = 16;
pub const MAX_SEQUENCE_BREAKER_CHARS: usize = 40;
/// `stop` strings and their length: every generated token is checked against each.
pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_CHARS: usize = 256;
/// `response_fields` entries: each copies the whole response.
pub const MAX_RESPONSE_FIELDS: usize = 16;

/// Fields llama-server takes for its own use, never a client's: each has a path to an abort or
/// an endless recursion in the pinned engine (a `grammar_triggers` type out of range asserts; a
/// `chat_parser` that names itself recurses until the stack ends; `generation_prompt` feeds
/// end-of-generation tokens into the grammar, which aborts; an unknown `chat_format` makes the
/// next `/slots` read throw on the main loop), or makes the engine rebuild its compute graph.
pub const ENGINE_INTERNAL_FIELDS: [&str; 13] = [
    "grammar_triggers",
    "chat_parser",
    "generation_prompt",
    "grammar_type",
    "chat_format",
    "preserved_tokens",
    "message_delimiters",
    "reasoning_budget_start_tag",
    "reasoning_budget_end_tag",
    "reasoning_budget_end_tags",
    "reasoning_budget_message",
    "backend_sampling",
    "n_cache_reuse",
];

/// The fields read of a request body.
#[derive(Debug, Default, Deserialize)]
pub struct Fields<'a> {
    #[serde(default)]
    stream: Option<Value>,
    #[serde(default)]
    prompt: Option<Shape>,
    #[serde(default)]
    input: Option<Shape>,
    #[serde(default)]
    content: Option<Shape>,
    #[serde(default)]
    documents: Option<Shape>,
    #[serde(default)]
    texts: Option<Shape>,
    #[serde(default)]
    pub(super) n: Option<Value>,
    #[serde(default)]
    pub(super) n_cmpl: Option<Value>,
    #[serde(default)]
    n_probs: Option<Value>,
    #[serde(default)]
    top_logprobs: Option<Value>,
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    logit_bias: Option<Shape>,
    #[serde(default)]
    n_predict: Option<Value>,
    #[serde(default)]
    max_tokens: Option<Value>,
    #[serde(default)]
    max_completion_tokens: Option<Value>,
    #[serde(default)]
    n_keep: Option<Value>,
    #[serde(default)]
    repeat_last_n: Option<Value>,
    #[serde(default)]
    dry_penalty_last_n: Option<Value>,
    #[serde(default)]
    dry_sequence_breakers: Option<Value>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    response_fields: Option<Value>,
    #[serde(default, borrow)]
    grammar: Option<Cow<'a, str>>,
    /// Schema-bearing fields (their schemas are checked in `schema`).
    #[serde(default)]
    json_schema: Option<Value>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    grammar_triggers: Option<IgnoredAny>,
    #[serde(default)]
    chat_parser: Option<IgnoredAny>,
    #[serde(default)]
    generation_prompt: Option<IgnoredAny>,
    #[serde(default)]
    grammar_type: Option<IgnoredAny>,
    #[serde(default)]
    chat_format: Option<IgnoredAny>,
    #[serde(default)]
    preserved_tokens: Option<IgnoredAny>,
    #[serde(default)]
    message_delimiters: Option<IgnoredAny>,
    #[serde(default)]
    reasoning_budget_start_tag: Option<IgnoredAny>,
    #[serde(default)]
    reasoning_budget_end_tag: Option<IgnoredAny>,
    #[serde(default)]
    reasoning_budget_end_tags: Option<IgnoredAny>,
    #[serde(default)]
    reasoning_budget_message: Option<IgnoredAny>,
    #[serde(default)]
    backend_sampling: Option<IgnoredAny>,
    #[serde(default)]
    n_cache_reuse: Option<IgnoredAny>,
}

fn refuse(field: &str, problem: String, allowed: String) -> RequestRefusal {
    RequestRefusal::Field { field: field.to_owned(), problem, allowed }
}

/// `value`, when present, must be a whole number in `range`.
fn whole_in(field: &str, value: &Option<Value>, range: std::ops::RangeInclusive<i64>) -> Result<(), RequestRefusal> {
    let Some(v) = value else { return Ok(()) };
    if v.is_null() || v.as_i64().is_some_and(|n| range.contains(&n)) {
        return Ok(());
    }
    Err(refuse(
        field,
        format!("is {}", describe(v)),
        format!("a whole number from {} to {}", range.start(), range.end()),
    ))
}

/// `value`, when present, must be a list of at most `most` strings of at most `chars`
/// characters (or one such string).
fn strings_within(field: &str, value: &Option<Value>, most: usize, chars: usize) -> Result<(), RequestRefusal> {
    let allowed = || format!("at most {most} strings of at most {chars} characters");
    let too_long = |s: &str| s.chars().count() > chars;
    match value {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) if !too_long(s) => Ok(()),
        Some(Value::Array(items)) => {
            if items.len() > most {
                return Err(refuse(field, format!("has {} entries", items.len()), allowed()));
            }
            match items.iter().find(|i| i.as_str().is_none_or(too_long)) {
                Some(bad) => Err(refuse(field, format!("holds {}", describe(bad)), allowed())),
                None => Ok(()),
            }
        }
        Some(other) => Err(refuse(field, format!("is {}", describe(other)), allowed())),
    }
}

impl Fields<'_> {
    /// `"stream": true` (anything else is not a stream, as llama-server reads it).
    pub fn streams(&self) -> bool {
        self.stream == Some(Value::Bool(true))
    }

    /// Prompts of a completion: `prompt` split as llama-server splits it (1 when absent).
    pub fn prompts(&self) -> u64 {
        self.prompt.map_or(1, Shape::prompts)
    }

    /// Inputs of an embedding request (`input`, or llama.cpp's `content`).
    pub fn embedding_inputs(&self) -> u64 {
        self.input.or(self.content).map_or(1, Shape::prompts)
    }

    /// Documents of a rerank request (`documents`, or its alias `texts`).
    pub fn documents(&self) -> u64 {
        self.documents.or(self.texts).map_or(1, Shape::entries)
    }

    /// The schemas the engine turns into grammars, with the field each came in.
    pub fn schemas(&self) -> Vec<(String, &Value)> {
        let mut found = Vec::new();
        if let Some(s) = &self.json_schema {
            found.push(("json_schema".to_owned(), s));
        }
        if let Some(format) = &self.response_format {
            if let Some(s) = format.get("schema") {
                found.push(("response_format.schema".to_owned(), s));
            }
            if let Some(s) = format.get("json_schema").and_then(|j| j.get("schema")) {
                found.push(("response_format.json_schema.schema".to_owned(), s));
            }
        }
        if let Some(Value::Array(tools)) = &self.tools {
            for (i, tool) in tools.iter().enumerate() {
                let places = [
                    ("function.parameters", tool.get("function").and_then(|f| f.get("parameters"))),
                    ("parameters", tool.get("parameters")),
                    ("input_schema", tool.get("input_schema")),
                ];
                for (place, schema) in places {
                    if let Some(s) = schema {
                        found.push((format!("tools[{i}].{place}"), s));
                    }
                }
            }
        }
        found
    }

    /// The bounds each read field is held to.
    pub fn check(&self) -> Result<(), RequestRefusal> {
        let internal = [
            &self.grammar_triggers,
            &self.chat_parser,
            &self.generation_prompt,
            &self.grammar_type,
            &self.chat_format,
            &self.preserved_tokens,
            &self.message_delimiters,
            &self.reasoning_budget_start_tag,
            &self.reasoning_budget_end_tag,
            &self.reasoning_budget_end_tags,
            &self.reasoning_budget_message,
            &self.backend_sampling,
            &self.n_cache_reuse,
        ];
        if let Some(i) = internal.iter().position(|f| f.is_some()) {
            return Err(refuse(
                ENGINE_INTERNAL_FIELDS[i],
                "is set by the engine for its own use; clients may not send it".to_owned(),
                "leave it out (the engine derives it from the model and the other fields)".to_owned(),
            ));
        }
        let probs = 0..=MAX_N_PROBS as i64;
        whole_in("n_probs", &self.n_probs, probs.clone())?;
        whole_in("top_logprobs", &self.top_logprobs, probs.clone())?;
        if !self.logprobs.as_ref().is_some_and(Value::is_boolean) {
            whole_in("logprobs", &self.logprobs, probs)?;
        }
        if let Some(bias) = self.logit_bias.map(Shape::entries)
            && bias > MAX_LOGIT_BIAS
        {
            return Err(refuse(
                "logit_bias",
                format!("has {bias} entries"),
                format!("at most {MAX_LOGIT_BIAS} entries"),
            ));
        }
        // The engine reads these as 32-bit numbers and wraps what does not fit (2^32 + 5 is 5).
        let tokens = -1..=i64::from(i32::MAX);
        whole_in("n_predict", &self.n_predict, tokens.clone())?;
        whole_in("max_tokens", &self.max_tokens, tokens.clone())?;
        whole_in("max_completion_tokens", &self.max_completion_tokens, tokens)?;
        whole_in("n_keep", &self.n_keep, -1..=MAX_LOOKBACK_TOKENS)?;
        whole_in("repeat_last_n", &self.repeat_last_n, -1..=MAX_LOOKBACK_TOKENS)?;
        whole_in("dry_penalty_last_n", &self.dry_penalty_last_n, -1..=MAX_LOOKBACK_TOKENS)?;
        strings_within(
            "dry_sequence_breakers",
            &self.dry_sequence_breakers,
            MAX_SEQUENCE_BREAKERS,
            MAX_SEQUENCE_BREAKER_CHARS,
        )?;
        strings_within("stop", &self.stop, MAX_STOP_STRINGS, MAX_STOP_CHARS)?;
        strings_within("response_fields", &self.response_fields, MAX_RESPONSE_FIELDS, MAX_STOP_CHARS)?;
        if let Some(grammar) = &self.grammar {
            super::grammar::check(grammar)?;
        }
        for (field, schema) in self.schemas() {
            super::schema::check(&field, schema)?;
        }
        Ok(())
    }
}

/// A client's value, described for a message without repeating much of it.
pub fn describe(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) if s.chars().count() <= 16 => format!("the string {s:?}"),
        Value::String(_) => "a string".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".to_owned(),
        Value::Array(_) => "a list".to_owned(),
        Value::Object(_) => "an object".to_owned(),
    }
}

/// What a value is, read without copying it: enough to count prompts and entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Null,
    Number,
    /// A string or a boolean.
    Scalar,
    /// A list: its length, and how many of its elements are numbers.
    List {
        len: u64,
        numbers: u64,
    },
    Object {
        len: u64,
    },
}

impl Shape {
    /// Prompts in a `prompt`, `input` or `content` value, as llama-server splits it: a list
    /// holding any number is one prompt (tokens, possibly mixed with text); any other list is
    /// one prompt per element; a string or a multimodal object is one.
    fn prompts(self) -> u64 {
        match self {
            Shape::List { numbers: 0, len } => len.max(1),
            _ => 1,
        }
    }

    /// Entries of a list or an object (none for null, one for anything else).
    fn entries(self) -> u64 {
        match self {
            Shape::List { len, .. } | Shape::Object { len } => len,
            Shape::Null => 0,
            Shape::Number | Shape::Scalar => 1,
        }
    }
}

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ShapeVisitor)
    }
}

struct ShapeVisitor;

impl<'de> Visitor<'de> for ShapeVisitor {
    type Value = Shape;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
        let (mut len, mut numbers) = (0u64, 0u64);
        // Elements are shaped too (their nesting is bounded before this runs), never copied.
        while let Some(e) = seq.next_element::<Shape>()? {
            len += 1;
            numbers += u64::from(e == Shape::Number);
        }
        Ok(Shape::List { len, numbers })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
        let mut len = 0;
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {
            len += 1;
        }
        Ok(Shape::Object { len })
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Shape, E> {
        Ok(Shape::Number)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Shape, E> {
        Ok(Shape::Number)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Shape, E> {
        Ok(Shape::Number)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Shape, E> {
        Ok(Shape::Scalar)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Shape, E> {
        Ok(Shape::Scalar)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Shape, E> {
        Ok(Shape::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: &str) -> Result<(), RequestRefusal> {
        serde_json::from_str::<Fields<'_>>(body).unwrap().check()
    }

    #[test]
    fn bounded_fields_name_themselves_and_their_bounds() {
        assert!(check(r#"{"n_probs": 5, "logit_bias": {"15043": 1.0}, "logprobs": true, "top_logprobs": 3}"#).is_ok());
        assert!(
            check(r#"{"max_tokens": -1, "n_predict": 2147483647, "stop": ["\n", "END"], "repeat_last_n": 64}"#).is_ok()
        );
        let err = check(r#"{"n_probs": 100000}"#).unwrap_err().to_string();
        assert!(err.contains("`n_probs`") && err.contains("0 to 100"), "{err}");
        assert!(check(r#"{"n_probs": -1}"#).is_err());
        assert!(check(r#"{"logprobs": 1000}"#).is_err());
        for limit in ["2147483648", "4294967301", "1.5", "\"9\"", "-2"] {
            let err = check(&format!(r#"{{"max_tokens": {limit}}}"#)).unwrap_err().to_string();
            assert!(err.contains("`max_tokens`") && err.contains("-1 to 2147483647"), "{limit}: {err}");
        }
        let err = check(r#"{"repeat_last_n": 2147483647}"#).unwrap_err().to_string();
        assert!(err.contains("`repeat_last_n`") && err.contains("65536"), "{err}");
        assert!(check(r#"{"dry_penalty_last_n": 2147483647}"#).is_err());
        let breakers: Vec<String> = (0..17).map(|i| format!("b{i}")).collect();
        assert!(check(&serde_json::json!({"dry_sequence_breakers": breakers}).to_string()).is_err());
        assert!(check(&serde_json::json!({"stop": ["x".repeat(257)]}).to_string()).is_err());
        let million: String = (0..5000).map(|i| format!("[{i}, 1.0]")).collect::<Vec<_>>().join(",");
        let err = check(&format!(r#"{{"logit_bias": [{million}]}}"#)).unwrap_err().to_string();
        assert!(err.contains("`logit_bias`") && err.contains("5000 entries"), "{err}");
    }

    #[test]
    fn fields_the_engine_keeps_for_itself_are_refused() {
        for field in ENGINE_INTERNAL_FIELDS {
            let err = check(&format!(r#"{{"{field}": 1}}"#)).unwrap_err().to_string();
            assert!(err.contains(&format!("`{field}`")) && err.contains("clients may not send it"), "{err}");
        }
        let self_naming_parser =
            r#"{"chat_parser": {"parsers": [{"type": "sequence", "children": [0]}], "rules": {}, "root": 0}}"#;
        assert!(check(self_naming_parser).is_err());
    }

    #[test]
    fn schemas_are_found_in_every_field_that_carries_one() {
        let body = r#"{"json_schema": {}, "response_format": {"type": "json_schema", "json_schema": {"schema": {}}},
            "tools": [{"type": "function", "function": {"parameters": {}}}, {"name": "t", "input_schema": {}}]}"#;
        let fields: Fields<'_> = serde_json::from_str(body).unwrap();
        let names: Vec<String> = fields.schemas().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            names,
            [
                "json_schema",
                "response_format.json_schema.schema",
                "tools[0].function.parameters",
                "tools[1].input_schema"
            ]
        );
    }
}
