//! API keys of a model's serving port, held as SHA-256 digests only: the agent never keeps a
//! key in plaintext (the controller sends digests; standalone, a key file is hashed on reading).
//! A presented key is hashed and compared with every digest in constant time, so neither the
//! comparison nor which digest matched shows in the timing.

pub use metalkube_api::keys::{KeyDigest, digest, digests_of_key_lines};

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
            ApiKeys::Digests(digests) => metalkube_api::keys::fingerprint(digests),
        }
    }
}

/// The key a request presents: `Authorization: Bearer <key>` or `x-api-key: <key>`.
pub fn presented_key(headers: &http::HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get(http::header::AUTHORIZATION) {
        let v = v.as_bytes();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
            return Some(v[7..].trim_ascii());
        }
    }
    headers.get("x-api-key").map(|v| v.as_bytes().trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    #[test]
    fn bearer_or_x_api_key() {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, http::HeaderValue::from_static("Bearer  sk-1 "));
        assert_eq!(presented_key(&h), Some(&b"sk-1"[..]));
        let mut h = http::HeaderMap::new();
        h.insert("x-api-key", http::HeaderValue::from_static("sk-2"));
        assert_eq!(presented_key(&h), Some(&b"sk-2"[..]));
        let mut h = http::HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, http::HeaderValue::from_static("Basic dXNlcg=="));
        assert_eq!(presented_key(&h), None);
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
