//! API keys of a model's serving port, held as SHA-256 digests only (`metalkube_api::keys`, shared
//! with the router, which turns away a client without a valid key before it takes a place), and
//! the key a request presents.

pub use metalkube_api::keys::{ApiKeys, KeyDigest, digest, digests_of_key_lines};

/// The key a request presents: `Authorization: Bearer <key>` or `x-api-key: <key>`.
pub fn presented_key(headers: &http::HeaderMap) -> Option<&[u8]> {
    metalkube_api::keys::presented_key(
        headers.get(http::header::AUTHORIZATION).map(http::HeaderValue::as_bytes),
        headers.get("x-api-key").map(http::HeaderValue::as_bytes),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
