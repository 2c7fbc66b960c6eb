//! How deep a JSON text nests, read byte by byte without building it.
//!
//! llama-server walks some request fields recursively (JSON schemas become grammars, tool
//! parameters and template arguments are parsed and converted), and a value nested tens of
//! thousands of levels deep overflows its stack: the engine dies with SIGSEGV, and every client
//! of the model loses it. Parsing the body here first would recurse in the same way, so the
//! nesting is measured by a flat scan before anything parses it.

/// Where a JSON text nests deeper than allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooDeep {
    /// The top-level field the deep value is under (None: the body itself is an array, or the
    /// depth is reached before any key).
    pub field: Option<String>,
    /// Byte offset of the bracket that went over the limit.
    pub offset: usize,
}

/// Longest key kept for a message: a key is the client's text, and a message needs only its start.
const KEY_CHARS: usize = 64;

/// Checks that no object or array in `json` nests deeper than `limit` levels (the outermost
/// object is level 1). Brackets inside strings do not count. The text need not be valid JSON:
/// validity is the parser's job, which runs once this check has passed.
pub fn check_nesting(json: &[u8], limit: usize) -> Result<(), TooDeep> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    // The top-level key being read or last read, for the message.
    let mut key: Option<Vec<u8>> = None;
    let mut reading_key = false;
    let mut expect_key = false;
    for (offset, &b) in json.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
                reading_key = false;
            }
            if reading_key
                && let Some(k) = key.as_mut()
                && k.len() < KEY_CHARS
            {
                k.push(b);
            }
            continue;
        }
        match b {
            b'"' => {
                in_string = true;
                if depth == 1 && expect_key {
                    key = Some(Vec::new());
                    reading_key = true;
                    expect_key = false;
                }
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > limit {
                    let field = key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned());
                    return Err(TooDeep { field, offset });
                }
                expect_key = depth == 1 && b == b'{';
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => expect_key = true,
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nested(field: &str, levels: usize) -> String {
        format!(r#"{{"model": "x", "{field}": {}1{}}}"#, "[".repeat(levels), "]".repeat(levels))
    }

    #[test]
    fn real_requests_pass() {
        let chat = br#"{"messages":[{"role":"user","content":"[[[{{{ not brackets \" ]]]"}],
            "response_format":{"type":"json_schema","json_schema":{"schema":{"type":"object",
            "properties":{"a":{"type":"array","items":{"type":"object"}}}}}}}"#;
        assert_eq!(check_nesting(chat, 64), Ok(()));
    }

    #[test]
    fn a_deep_value_is_found_with_its_field() {
        let body = nested("json_schema", 20_000);
        let err = check_nesting(body.as_bytes(), 64).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("json_schema"));
        assert_eq!(&body[err.offset..err.offset + 1], "[");
        // Exactly at the limit passes: the object is level 1, so 63 brackets inside it.
        assert_eq!(check_nesting(nested("a", 63).as_bytes(), 64), Ok(()));
        assert!(check_nesting(nested("a", 64).as_bytes(), 64).is_err());
    }

    #[test]
    fn the_field_is_the_top_level_key_not_an_inner_one() {
        let body = format!(r#"{{"tools": [{{"function": {{"parameters": {}}}}}]}}"#, "{\"a\":".repeat(100));
        assert_eq!(check_nesting(body.as_bytes(), 32).unwrap_err().field.as_deref(), Some("tools"));
        let top_array = "[".repeat(100);
        assert_eq!(check_nesting(top_array.as_bytes(), 32).unwrap_err().field, None);
    }

    #[test]
    fn escaped_quotes_and_brackets_in_strings_do_not_count() {
        let body = format!(r#"{{"prompt": "\"{}\\"}}"#, "[{".repeat(1000));
        assert_eq!(check_nesting(body.as_bytes(), 4), Ok(()));
    }

    proptest! {
        /// The scan agrees with a real parser on the depth of any value serde can build.
        #[test]
        fn agrees_with_serde_on_generated_values(levels in 1usize..120, limit in 1usize..120) {
            let body = nested("x", levels);
            let total = levels + 1;
            prop_assert_eq!(check_nesting(body.as_bytes(), limit).is_ok(), total <= limit);
        }

        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000), limit in 0usize..50) {
            let _ = check_nesting(&bytes, limit);
        }
    }
}
