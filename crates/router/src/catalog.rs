//! Which MetalModel a request means, pure: the OpenAI body's `model` names it as
//! `namespace/name`, as a bare name (unique among the namespaces the router serves), or by one of
//! its aliases. A name that fits none, or more than one, gets an answer that says which models
//! there are, so a client can correct itself.

use metalkube_api::ModelKey;

/// How many known models an error lists before it says "and N more".
const LISTED: usize = 10;

/// One model the router serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: ModelKey,
    /// Other names clients may use for it.
    pub aliases: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotFound {
    #[error("model {requested:?} is not served here; models: {known}")]
    Unknown { requested: String, known: String },
    #[error("model {requested:?} names more than one model: {matches}; say namespace/name")]
    Ambiguous { requested: String, matches: String },
}

/// The model `requested` means among `entries`.
pub fn resolve<'a>(requested: &str, entries: &'a [Entry]) -> Result<&'a Entry, NotFound> {
    if let Some(key) = ModelKey::parse(requested)
        && let Some(entry) = entries.iter().find(|e| e.key == key)
    {
        return Ok(entry);
    }
    let matches: Vec<&Entry> =
        entries.iter().filter(|e| e.key.name == requested || e.aliases.iter().any(|a| a == requested)).collect();
    match matches.as_slice() {
        [one] => Ok(one),
        [] => Err(NotFound::Unknown { requested: requested.to_owned(), known: listed(entries.iter()) }),
        many => Err(NotFound::Ambiguous { requested: requested.to_owned(), matches: listed(many.iter().copied()) }),
    }
}

/// The model whose Service a request was sent to, read from its Host header: a model's Service is
/// named after it, so `name`, `name.namespace`, `name.namespace.svc` and
/// `name.namespace.svc.cluster.local` (with or without a port) name it. A client that used the
/// model's Service before routing keeps working unchanged, whatever its body's `model` says
/// (llama-server ignores that field). None when the host names no model, or a bare name more than
/// one; the body's `model` decides then.
pub fn by_host<'a>(host: &str, entries: &'a [Entry]) -> Option<&'a Entry> {
    let host = host.trim().trim_end_matches('.');
    let host = match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let labels: Vec<&str> = host.split('.').collect();
    let (name, namespace) = match labels.as_slice() {
        [name] => (*name, None),
        [name, namespace] | [name, namespace, "svc"] => (*name, Some(*namespace)),
        [name, namespace, "svc", rest @ ..] if !rest.is_empty() => (*name, Some(*namespace)),
        _ => return None,
    };
    let mut matches = entries.iter().filter(|e| e.key.name == name && namespace.is_none_or(|ns| e.key.namespace == ns));
    let first = matches.next()?;
    matches.next().is_none().then_some(first)
}

fn listed<'a>(entries: impl Iterator<Item = &'a Entry>) -> String {
    let keys: Vec<String> = entries.map(|e| e.key.to_string()).collect();
    if keys.is_empty() {
        return "none".to_owned();
    }
    let mut text = keys.iter().take(LISTED).cloned().collect::<Vec<_>>().join(", ");
    if keys.len() > LISTED {
        text.push_str(&format!(" and {} more", keys.len() - LISTED));
    }
    text
}

#[cfg(test)]
mod host_tests {
    use super::*;

    #[test]
    fn a_models_service_name_in_the_host_names_the_model() {
        let entries = vec![
            Entry { key: ModelKey::new("ml", "tiny"), aliases: vec![] },
            Entry { key: ModelKey::new("team", "tiny"), aliases: vec![] },
            Entry { key: ModelKey::new("ml", "big"), aliases: vec![] },
        ];
        let key = |h: &str| by_host(h, &entries).map(|e| e.key.to_string());
        assert_eq!(key("big"), Some("ml/big".into()));
        assert_eq!(key("big:8080"), Some("ml/big".into()));
        assert_eq!(key("tiny.team"), Some("team/tiny".into()));
        assert_eq!(key("tiny.ml.svc"), Some("ml/tiny".into()));
        assert_eq!(key("tiny.ml.svc.cluster.local:8080"), Some("ml/tiny".into()));
        assert_eq!(key("tiny"), None, "two namespaces have one: the body decides");
        assert_eq!(key("metalkube-router.metalkube.svc"), None);
        assert_eq!(key("10.0.0.7:8080"), None);
        assert_eq!(key("[::1]:8080"), None);
        assert_eq!(key("tiny.ml.example.com"), None, "not a cluster Service name");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ns: &str, name: &str, aliases: &[&str]) -> Entry {
        Entry { key: ModelKey::new(ns, name), aliases: aliases.iter().map(|a| (*a).to_owned()).collect() }
    }

    #[test]
    fn a_model_is_found_by_key_by_unique_name_or_by_alias() {
        let entries = [entry("team-a", "qwen", &["qwen2.5-7b"]), entry("team-b", "llama", &[])];
        assert_eq!(resolve("team-a/qwen", &entries).map(|e| &e.key), Ok(&entries[0].key));
        assert_eq!(resolve("llama", &entries).map(|e| &e.key), Ok(&entries[1].key));
        assert_eq!(resolve("qwen2.5-7b", &entries).map(|e| &e.key), Ok(&entries[0].key));
    }

    #[test]
    fn an_unknown_or_ambiguous_name_says_which_models_there_are() {
        let entries = [entry("a", "tiny", &[]), entry("b", "tiny", &[])];
        assert_eq!(
            resolve("tiny", &entries).map(|e| &e.key).unwrap_err().to_string(),
            "model \"tiny\" names more than one model: a/tiny, b/tiny; say namespace/name"
        );
        assert_eq!(
            resolve("gpt-4", &entries).map(|e| &e.key).unwrap_err().to_string(),
            "model \"gpt-4\" is not served here; models: a/tiny, b/tiny"
        );
        assert_eq!(
            resolve("x", &[]).map(|e| &e.key).unwrap_err().to_string(),
            "model \"x\" is not served here; models: none"
        );
    }

    #[test]
    fn a_long_catalog_is_cut_in_the_message() {
        let entries: Vec<Entry> = (0..25).map(|i| entry("ns", &format!("m{i:02}"), &[])).collect();
        let message = resolve("nope", &entries).map(|e| &e.key).unwrap_err().to_string();
        assert!(message.ends_with("ns/m09 and 15 more"), "{message}");
    }
}
