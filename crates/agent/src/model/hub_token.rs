//! A model's hub token (`spec.model.tokenSecretRef` in a cluster, or the agent's own): a bearer
//! token the downloader sends to the hub, kept out of logs and `Debug`.

/// A bearer token, kept out of logs and `Debug` (stored as its plain text where stored).
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Token(String);

impl Token {
    pub fn new(token: &str) -> Option<Token> {
        let t = token.trim();
        (!t.is_empty()).then(|| Token(t.to_owned()))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}
