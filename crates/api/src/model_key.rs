//! A MetalModel's identity across the system: `namespace/name`. Maps in the agent and the
//! controller, metric labels and log fields all use this one spelling, made here only.

use std::fmt;

use kube::ResourceExt;

use crate::MetalModel;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelKey {
    pub namespace: String,
    pub name: String,
}

impl ModelKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }

    pub fn of(model: &MetalModel) -> Self {
        Self::new(model.namespace().unwrap_or_default(), model.name_any())
    }

    /// The inverse of `Display`: `namespace/name`, both parts non-empty.
    pub fn parse(key: &str) -> Option<Self> {
        let (namespace, name) = key.split_once('/')?;
        (!namespace.is_empty() && !name.is_empty() && !name.contains('/')).then(|| Self::new(namespace, name))
    }
}

impl fmt::Display for ModelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_reads_back_and_refuses_what_is_not_one() {
        let key = ModelKey::new("default", "tiny");
        assert_eq!(key.to_string(), "default/tiny");
        assert_eq!(ModelKey::parse("default/tiny"), Some(key));
        for bad in ["tiny", "/tiny", "default/", "a/b/c"] {
            assert_eq!(ModelKey::parse(bad), None, "{bad}");
        }
    }
}
