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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_keys_and_the_fingerprint_ignores_order_and_duplicates() {
        assert_eq!(digests_of_key_lines(b"# rotation\nold\n\n  new  \r\n"), vec![digest(b"old"), digest(b"new")]);
        let a = fingerprint(&digests_of_key_lines(b"a\nb"));
        assert_eq!(a, fingerprint(&digests_of_key_lines(b"b\na\na")));
        assert_ne!(a, fingerprint(&digests_of_key_lines(b"a")));
        assert_eq!(a.len(), 16);
    }
}
