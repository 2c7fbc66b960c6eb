//! Bounds on a GBNF `grammar` string. llama-server parses a grammar on its main loop (every
//! slot waits meanwhile) by recursive descent, one level per parenthesised group, and expands
//! every bounded repetition `x{m,n}` into copies of `x`:
//!
//! - tens of thousands of nested parentheses overflow its stack (SIGSEGV);
//! - a chain of rules each offering the next rule twice (`a1 ::= a2 | a2`) costs 2^n in its
//!   left-recursion check: 30 such lines hold the engine for 20 s;
//! - nested repetitions multiply (`("a"{0,1000}){0,1000}`), and counts over 2000 are refused
//!   or silently unbounded;
//! - tens of thousands of rules make its checks quadratic.
//!
//! All of it is measured here by a flat scan of the text, before the engine sees it.

use std::collections::HashMap;

use super::RequestRefusal;

/// A grammar's text.
pub const MAX_BYTES: usize = 32 * 1024;
/// Rules of one grammar.
pub const MAX_RULES: usize = 500;
/// Parenthesised groups nested in one another.
pub const MAX_GROUP_DEPTH: usize = 32;
/// The largest count of a repetition `{m,n}`.
pub const MAX_REPEAT: u64 = 2000;
/// Copies the repetitions of a grammar expand into, all rules together.
pub const MAX_EXPANSION: u64 = 100_000;
/// Paths from the root rule through rule references (loops cut).
pub const MAX_PATHS: u64 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token<'a> {
    Name(&'a str),
    Defines,
    Open,
    Close,
    /// `{m}`, `{m,}`, `{m,n}`: the largest count it names (u64::MAX when one does not parse).
    Repeat(u64),
    /// A string literal or a character class.
    Terminal,
}

/// The grammar's tokens, comments and white space left out.
fn tokens(text: &str) -> Vec<Token<'_>> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            quote @ (b'"' | b'[') => {
                let close = if quote == b'"' { b'"' } else { b']' };
                i += 1;
                while i < bytes.len() && bytes[i] != close {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                out.push(Token::Terminal);
            }
            b'(' => out.push(Token::Open),
            b')' => out.push(Token::Close),
            b'{' => {
                let end = bytes[i..].iter().position(|b| *b == b'}').map_or(bytes.len(), |p| i + p);
                let most = text[i + 1..end]
                    .split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(|c| c.parse::<u64>().unwrap_or(u64::MAX))
                    .max()
                    .unwrap_or(1);
                out.push(Token::Repeat(most));
                i = end;
            }
            b':' if text[i..].starts_with("::=") => {
                out.push(Token::Defines);
                i += 2;
            }
            b if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' => {
                let start = i;
                while i + 1 < bytes.len()
                    && (bytes[i + 1].is_ascii_alphanumeric() || matches!(bytes[i + 1], b'-' | b'_'))
                {
                    i += 1;
                }
                out.push(Token::Name(&text[start..=i]));
            }
            b'.' => out.push(Token::Terminal),
            _ => {}
        }
        i += 1;
    }
    out
}

/// Checks a grammar's size, nesting, repetitions and rule references. What is not GBNF is left
/// for the engine to refuse: only what could hurt it is judged here.
pub fn check(grammar: &str) -> Result<(), RequestRefusal> {
    let refuse =
        |problem: String, allowed: String| RequestRefusal::Field { field: "grammar".to_owned(), problem, allowed };
    if grammar.len() > MAX_BYTES {
        return Err(refuse(format!("is {} bytes long", grammar.len()), format!("at most {MAX_BYTES} bytes")));
    }
    let tokens = tokens(grammar);
    // Rules: each name followed by `::=` starts one; its body runs to the next.
    let mut rules: Vec<(&str, Vec<Token<'_>>)> = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if let (Token::Name(name), Some(Token::Defines)) = (&tokens[i], tokens.get(i + 1)) {
            rules.push((name, Vec::new()));
            i += 2;
            continue;
        }
        if let Some((_, body)) = rules.last_mut() {
            body.push(tokens[i].clone());
        }
        i += 1;
    }
    if rules.len() > MAX_RULES {
        return Err(refuse(format!("has {} rules", rules.len()), format!("at most {MAX_RULES} rules")));
    }
    let mut expansion: u64 = 0;
    for (_, body) in &rules {
        expansion = expansion.saturating_add(expand(body).map_err(|(problem, allowed)| refuse(problem, allowed))?);
        if expansion > MAX_EXPANSION {
            return Err(refuse(
                format!("expands to more than {MAX_EXPANSION} copies through its repetitions {{m,n}}"),
                format!(
                    "repetitions that expand to at most {MAX_EXPANSION} copies in all (use * or + for open-ended ones)"
                ),
            ));
        }
    }
    let references: HashMap<&str, Vec<&str>> = rules
        .iter()
        .map(|(name, body)| {
            let refs = body.iter().filter_map(|t| if let Token::Name(n) = t { Some(*n) } else { None }).collect();
            (*name, refs)
        })
        .collect();
    let root = if references.contains_key("root") { "root" } else { rules.first().map_or("root", |r| r.0) };
    let mut counting = PathCount { references: &references, memo: HashMap::new(), visiting: Vec::new() };
    if counting.paths(root) > MAX_PATHS {
        return Err(refuse(
            format!(
                "has more than {MAX_PATHS} paths through its rule references (a rule naming the next one twice, level after level, doubles them)"
            ),
            format!("rules whose references make at most {MAX_PATHS} paths from the root"),
        ));
    }
    Ok(())
}

/// The copies one rule's body expands into, and its group nesting.
fn expand(body: &[Token<'_>]) -> Result<u64, (String, String)> {
    // Size of each open group so far; the bottom entry is the rule.
    let mut sizes: Vec<u64> = vec![0];
    // Size of the element just read, which a repetition would copy.
    let mut last: u64 = 0;
    for token in body {
        match token {
            Token::Name(_) | Token::Terminal => {
                last = 1;
                add(&mut sizes, 1);
            }
            Token::Open => {
                sizes.push(0);
                if sizes.len() - 1 > MAX_GROUP_DEPTH {
                    return Err((
                        format!("nests groups deeper than {MAX_GROUP_DEPTH} levels"),
                        format!("at most {MAX_GROUP_DEPTH} nested parentheses"),
                    ));
                }
            }
            Token::Close => {
                if sizes.len() > 1 {
                    last = sizes.pop().unwrap_or(0);
                    add(&mut sizes, last);
                }
            }
            Token::Repeat(most) => {
                if *most > MAX_REPEAT {
                    return Err((
                        format!(
                            "has a repetition count of {}",
                            if *most == u64::MAX { "beyond u64".to_owned() } else { most.to_string() }
                        ),
                        format!("repetition counts {{m,n}} of at most {MAX_REPEAT}"),
                    ));
                }
                // The element was counted once already; the repetition adds the other copies.
                add(&mut sizes, last.saturating_mul(most.saturating_sub(1)));
                last = last.saturating_mul(*most);
            }
            Token::Defines => {}
        }
        if sizes.iter().any(|s| *s > MAX_EXPANSION) {
            return Ok(u64::MAX);
        }
    }
    Ok(sizes.first().copied().unwrap_or(0))
}

fn add(sizes: &mut [u64], n: u64) {
    if let Some(top) = sizes.last_mut() {
        *top = top.saturating_add(n);
    }
}

/// Paths through rule references, each rule's count remembered, loops cut.
struct PathCount<'a, 'r> {
    references: &'r HashMap<&'a str, Vec<&'a str>>,
    memo: HashMap<&'a str, u64>,
    visiting: Vec<&'a str>,
}

impl<'a> PathCount<'a, '_> {
    fn paths(&mut self, rule: &'a str) -> u64 {
        if let Some(n) = self.memo.get(rule) {
            return *n;
        }
        if self.visiting.contains(&rule) {
            return 1;
        }
        let Some(refs) = self.references.get(rule) else { return 1 };
        self.visiting.push(rule);
        let mut total: u64 = 0;
        for r in refs {
            total = total.saturating_add(self.paths(r));
            if total > MAX_PATHS {
                break;
            }
        }
        self.visiting.pop();
        let total = total.max(1);
        self.memo.insert(rule, total);
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn real_grammars_pass() {
        let json_like = r#"
            root   ::= object
            object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
            value  ::= object | array | string | number | ("true" | "false" | "null") ws
            array  ::= "[" ws ( value ("," ws value)* )? "]" ws
            string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
            number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ws
            ws ::= | " " | "\n" [ \t]{0,20} # comment with ( ( ( and {999999}
        "#;
        assert!(check(json_like).is_ok());
        assert!(check(r#"root ::= "a"{0,1000}"#).is_ok());
    }

    #[test]
    fn deep_groups_and_multiplying_repetitions_are_refused() {
        let deep = format!("root ::= {}\"a\"{}", "(".repeat(5000), ")".repeat(5000));
        let err = check(&deep).unwrap_err().to_string();
        assert!(err.contains("`grammar`") && err.contains("32 nested"), "{err}");
        let err = check(r#"root ::= ("a"{0,1000}){0,1000}"#).unwrap_err().to_string();
        assert!(err.contains("100000 copies"), "{err}");
        assert!(check(r#"root ::= "a"{0,2001}"#).unwrap_err().to_string().contains("at most 2000"));
        assert!(check(r#"root ::= "a"{0,18446744073709551616}"#).is_err(), "a count past u64 is refused");
    }

    #[test]
    fn doubling_rule_chains_and_rule_floods_are_refused() {
        let chain: String = (0..30).map(|i| format!("a{i} ::= a{} | a{}\n", i + 1, i + 1)).collect();
        let err = check(&format!("root ::= a0\n{chain}a30 ::= \"x\"\n")).unwrap_err().to_string();
        assert!(err.contains("10000 paths"), "{err}");
        let flood: String = (0..600).map(|i| format!("r{i} ::= \"x\"\n")).collect();
        assert!(check(&flood).unwrap_err().to_string().contains("600 rules"));
        assert!(check(&"#".repeat(40_000)).unwrap_err().to_string().contains("bytes"));
        // A recursive rule is a loop, not a blow-up.
        assert!(check("root ::= item | item root\nitem ::= \"a\"").is_ok());
    }

    proptest! {
        #[test]
        fn any_text_never_panics(text in "[ -~\n]{0,300}") {
            let _ = check(&text);
        }
    }
}
