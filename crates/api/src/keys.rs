//! API keys as the controller and the agents share them: never the keys, only their SHA-256
//! digests, and a fingerprint of the set so the controller can tell whether an agent holds the
//! current keys.

use sha2::{Digest, Sha256};

pub type KeyDigest = [u8; 32];

pub fn digest(key: &[u8]) -> KeyDigest {
    Sha256::digest(key).into()
}

/// The keys of a Secret value or key file: one per line, surrounding whitespace ignored, empty
/// lines and `#` comments skipped.
pub fn digests_of_key_lines(text: &[u8]) -> Vec<KeyDigest> {
    text.split(|b| *b == b'\n')
        .map(|l| l.trim_ascii())
        .filter(|l| !l.is_empty() && !l.starts_with(b"#"))
        .map(digest)
        .collect()
}

/// A short, order-free fingerprint of a set of digests.
pub fn fingerprint(digests: &[KeyDigest]) -> String {
    let mut sorted = digests.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut h = Sha256::new();
    for d in &sorted {
        h.update(d);
    }
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Which hub token an agent holds, comparable without the token (empty: none). The
/// controller sends the token again when the fingerprint it computes differs.
pub fn token_fingerprint(token: Option<&str>) -> String {
    let Some(token) = token.filter(|t| !t.is_empty()) else { return String::new() };
    let mut h = Sha256::new();
    h.update(b"metalkube hub token\0");
    h.update(token.as_bytes());
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Who may use a model's serving port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ApiKeys {
    /// No `spec.auth`: anyone who reaches the port.
    #[default]
    Open,
    /// Clients presenting one of these keys (by digest). Empty (a missing Secret): nobody, so a
    /// model that asks for keys never serves without them.
    Digests(Vec<KeyDigest>),
}

/// Equal in time independent of where the digests differ.
fn same(a: &KeyDigest, b: &KeyDigest) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ApiKeys {
    pub fn is_open(&self) -> bool {
        matches!(self, ApiKeys::Open)
    }

    /// Whether `presented` (the key a client sent, if any) is accepted.
    pub fn accepts(&self, presented: Option<&[u8]>) -> bool {
        match self {
            ApiKeys::Open => true,
            ApiKeys::Digests(digests) => {
                let Some(key) = presented.filter(|k| !k.is_empty()) else { return false };
                let d = digest(key);
                // Every digest is compared, whichever matches.
                digests.iter().fold(false, |found, known| found | same(known, &d))
            }
        }
    }

    /// A short fingerprint of the accepted set (order-free), so the controller can tell whether
    /// an agent holds the current keys without seeing them.
    pub fn fingerprint(&self) -> String {
        match self {
            ApiKeys::Open => String::new(),
            ApiKeys::Digests(digests) => fingerprint(digests),
        }
    }
}

/// The key a request presents, from its `Authorization` (`Bearer <key>`) or `x-api-key` header.
pub fn presented_key<'a>(authorization: Option<&'a [u8]>, x_api_key: Option<&'a [u8]>) -> Option<&'a [u8]> {
    if let Some(v) = authorization
        && v.len() > 7
        && v[..7].eq_ignore_ascii_case(b"bearer ")
    {
        return Some(v[7..].trim_ascii());
    }
    x_api_key.map(<[u8]>::trim_ascii)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn lines_are_keys_and_the_fingerprint_ignores_order_and_duplicates() {
        assert_eq!(digests_of_key_lines(b"# rotation\nold\n\n  new  \r\n"), vec![digest(b"old"), digest(b"new")]);
        let a = fingerprint(&digests_of_key_lines(b"a\nb"));
        assert_eq!(a, fingerprint(&digests_of_key_lines(b"b\na\na")));
        assert_ne!(a, fingerprint(&digests_of_key_lines(b"a")));
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn keys_are_lines_and_any_of_them_is_accepted() {
        let keys = ApiKeys::Digests(digests_of_key_lines(b"# rotation\nold-key\n\n  new-key  \r\n"));
        assert!(keys.accepts(Some(b"old-key")));
        assert!(keys.accepts(Some(b"new-key")));
        assert!(!keys.accepts(Some(b"other")));
        assert!(!keys.accepts(None));
        assert!(!keys.accepts(Some(b"")));
        assert!(!ApiKeys::Digests(Vec::new()).accepts(Some(b"anything")), "no keys: nobody");
        assert!(ApiKeys::Open.accepts(None));
    }

    proptest! {
        #[test]
        fn exactly_the_listed_keys_are_accepted(keys in proptest::collection::vec("[a-zA-Z0-9_-]{1,40}", 1..5), other in "[a-zA-Z0-9_-]{1,40}") {
            let text = keys.join("\n");
            let accepted = ApiKeys::Digests(digests_of_key_lines(text.as_bytes()));
            for k in &keys {
                prop_assert!(accepted.accepts(Some(k.as_bytes())));
            }
            prop_assert_eq!(accepted.accepts(Some(other.as_bytes())), keys.contains(&other));
        }
    }
}
