//! Every string of a request body, read once: what the engine's tokenizer and media loader
//! would do with it.
//!
//! - Tokenizers without a hand-written pre-splitter fall back to a regular expression that
//!   recurses per character of a run of one class: an unbroken run of some 26,000 letters (or
//!   digits, or punctuation) overflows the engine's stack. Runs are bounded here, whatever
//!   field they are in, escaped or not (the strings are read decoded).
//! - Media parts (`image_url`, `video_url`, `audio_url`, `url`) are fetched by the engine when
//!   they are web addresses: the Mac would fetch any address a client names, inside its
//!   network. Only inline `data:` media pass.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

use super::RequestRefusal;

/// Characters of one class in a row (letters, digits, white space, or other symbols).
pub const MAX_RUN: usize = 4096;

/// Keys whose string value the engine loads as media (an address or a `data:` URI).
const MEDIA_KEYS: [&str; 3] = ["image_url", "video_url", "audio_url"];
/// Objects whose `url` is media (OpenAI's `{"image_url": {"url": …}}`, Anthropic's
/// `{"source": {"type": "url", "url": …}}`).
const MEDIA_CONTAINERS: [&str; 5] = ["image_url", "video_url", "audio_url", "input_audio", "source"];
/// Keys whose string value is raw base64 media the engine decodes, never tokenizes.
const INLINE_MEDIA_KEYS: [&str; 2] = ["data", "multimodal_data"];

/// Checks every string of `body` (a JSON text whose nesting is already bounded).
pub fn check(body: &[u8]) -> Result<(), RequestRefusal> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let mut found: Option<RequestRefusal> = None;
    let walked = Strings { key: None, container: None, found: &mut found }.deserialize(&mut de);
    if let Some(problem) = found {
        return Err(problem);
    }
    walked.map_err(RequestRefusal::NotJson)
}

/// Walks one value; `key` is the object key it is under, `container` the key its object is
/// under.
struct Strings<'k, 'f> {
    key: Option<&'k str>,
    container: Option<&'k str>,
    found: &'f mut Option<RequestRefusal>,
}

impl<'de> DeserializeSeed<'de> for Strings<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strings<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<(), E> {
        if self.found.is_none() {
            *self.found = judge(self.key, self.container, s);
        }
        // Stop reading at the first problem: serde's error is replaced by ours.
        if self.found.is_some() { Err(E::custom("refused")) } else { Ok(()) }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        // A list's elements stand where the list stands.
        while seq.next_element_seed(Strings { key: self.key, container: self.container, found: self.found })?.is_some()
        {
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if let Some(problem) = judge(None, None, &key) {
                *self.found = Some(problem);
                return Err(de::Error::custom("refused"));
            }
            map.next_value_seed(Strings { key: Some(&key), container: self.key, found: self.found })?;
        }
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}

/// What is wrong with string `s` under `key` (in an object under `container`), if anything.
fn judge(key: Option<&str>, container: Option<&str>, s: &str) -> Option<RequestRefusal> {
    let media = key.is_some_and(|k| MEDIA_KEYS.contains(&k))
        || (key == Some("url") && container.is_some_and(|c| MEDIA_CONTAINERS.contains(&c)));
    if media && !s.starts_with("data:") {
        return Some(RequestRefusal::Field {
            field: key.unwrap_or("url").to_owned(),
            problem: "names media by address; the engine would fetch it from this Mac's network".to_owned(),
            allowed: "inline media as a data: URI (data:image/png;base64,...)".to_owned(),
        });
    }
    // Inline media is decoded, never tokenized.
    if media || key.is_some_and(|k| INLINE_MEDIA_KEYS.contains(&k)) {
        return None;
    }
    // Tool-call arguments are JSON in a string, which chat templates parse again.
    if key == Some("arguments")
        && let Err(too_deep) = super::depth::check_nesting(s.as_bytes(), super::MAX_JSON_DEPTH)
    {
        return Some(RequestRefusal::Field {
            field: "arguments".to_owned(),
            problem: format!(
                "holds JSON nested deeper than {} levels (at byte {})",
                super::MAX_JSON_DEPTH,
                too_deep.offset
            ),
            allowed: format!("arguments of at most {} levels", super::MAX_JSON_DEPTH),
        });
    }
    let run = longest_run(s);
    (run > MAX_RUN).then(|| RequestRefusal::Field {
        field: key.unwrap_or("a string").to_owned(),
        problem: format!(
            "has a run of {run} characters of one kind (letters, digits, spaces or symbols) without a break"
        ),
        allowed: format!(
            "runs of at most {MAX_RUN} characters of one kind; the engine's tokenizer cannot split longer ones safely"
        ),
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Digit,
    Space,
    Other,
}

fn class(c: char) -> Class {
    if c.is_alphabetic() {
        Class::Letter
    } else if c.is_numeric() {
        Class::Digit
    } else if c.is_whitespace() {
        Class::Space
    } else {
        Class::Other
    }
}

/// The longest run of characters of one class in `s`.
fn longest_run(s: &str) -> usize {
    let (mut longest, mut run, mut prev) = (0, 0, None);
    for c in s.chars() {
        let k = class(c);
        run = if Some(k) == prev { run + 1 } else { 1 };
        prev = Some(k);
        longest = longest.max(run);
    }
    longest
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn problem(body: serde_json::Value) -> Option<String> {
        check(body.to_string().as_bytes()).err().map(|e| e.to_string())
    }

    #[test]
    fn ordinary_text_and_inline_media_pass() {
        let body = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "describe this ".repeat(2000)},
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", "A".repeat(100_000))}}
        ]}]});
        assert_eq!(problem(body), None);
    }

    #[test]
    fn long_runs_of_one_kind_are_refused_escaped_or_not() {
        let plain = problem(json!({"prompt": "a".repeat(30_000)})).unwrap();
        assert!(plain.contains("`prompt`") && plain.contains("30000 characters"), "{plain}");
        // The same letters written as \u escapes are the same run once decoded.
        let escaped = format!(r#"{{"prompt": "{}"}}"#, "\\u0061".repeat(5000));
        assert!(check(escaped.as_bytes()).is_err());
        assert!(problem(json!({"messages": [{"content": "1".repeat(5000)}]})).unwrap().contains("`content`"));
        assert!(problem(json!({"x": "!".repeat(5000)})).is_some());
        assert!(problem(json!({"prompt": "ab1 ".repeat(20_000)})).is_none());
    }

    #[test]
    fn media_by_address_is_refused() {
        for url in ["http://10.0.0.1/admin", "https://example.com/cat.png", "file:///etc/passwd"] {
            let body =
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]});
            let message = problem(body).unwrap();
            assert!(message.contains("`url`") && message.contains("data:"), "{message}");
        }
        assert!(
            problem(json!({"input": [{"type": "input_image", "image_url": "https://example.com/x.png"}]})).is_some()
        );
        let anthropic = json!({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://10.0.0.1/"}}]}]});
        assert!(problem(anthropic).is_some());
        // A `url` that is not media (a citation in the history) is text.
        let citation = json!({"messages": [{"role": "assistant", "content": "see", "annotations": [{"type": "url_citation", "url_citation": {"url": "https://example.com"}}]}]});
        assert_eq!(problem(citation), None);
    }

    #[test]
    fn inline_media_is_not_tokenized_but_data_text_elsewhere_is() {
        let audio = json!({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "A".repeat(20_000), "format": "wav"}}]}]});
        assert_eq!(problem(audio), None);
        assert!(problem(json!({"prompt": format!("data:{}", "a".repeat(30_000))})).is_some());
    }

    #[test]
    fn tool_call_arguments_are_held_to_the_json_depth() {
        let deep = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
        let body = json!({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": deep}}]}]});
        assert!(problem(body).unwrap().contains("`arguments`"));
        let fine = json!({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{\"city\": \"Paris\"}"}}]}]});
        assert_eq!(problem(fine), None);
    }
}
