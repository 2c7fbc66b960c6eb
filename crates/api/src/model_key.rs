//! A MetalModel's identity across the system: `namespace/name`. Maps in the agent and the
//! controller, metric labels and log fields all use this one spelling, made here only.

use std::cmp::Ordering;
use std::fmt;

use kube::ResourceExt;

use crate::MetalModel;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
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

    /// A key from parts that came from outside (a file, the wire): both non-empty and without a
    /// `/`, so that the spelling reads back as the same key.
    pub fn from_parts(namespace: &str, name: &str) -> Option<Self> {
        let part = |s: &str| !s.is_empty() && !s.contains('/');
        (part(namespace) && part(name)).then(|| Self::new(namespace, name))
    }

    /// The inverse of `Display`: `namespace/name`, both parts non-empty.
    pub fn parse(key: &str) -> Option<Self> {
        let (namespace, name) = key.split_once('/')?;
        Self::from_parts(namespace, name)
    }

    /// The bytes of the spelling, without building the string.
    fn spelling(&self) -> impl Iterator<Item = u8> + '_ {
        self.namespace.bytes().chain(std::iter::once(b'/')).chain(self.name.bytes())
    }
}

impl fmt::Display for ModelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Ordered as spelled (`a-b/x` before `a/x`), so a map keyed by `ModelKey` iterates, and
/// placement takes models, in the order of a map keyed by the spelling. The namespace breaks
/// the tie of keys that spell alike only because a part holds a `/` (`new` does not refuse one).
impl Ord for ModelKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.spelling().cmp(other.spelling()).then_with(|| self.namespace.cmp(&other.namespace))
    }
}

impl PartialOrd for ModelKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_key_reads_back_and_refuses_what_is_not_one() {
        let key = ModelKey::new("default", "tiny");
        assert_eq!(key.to_string(), "default/tiny");
        assert_eq!(ModelKey::parse("default/tiny"), Some(key.clone()));
        assert_eq!(ModelKey::from_parts("default", "tiny"), Some(key));
        for bad in ["tiny", "/tiny", "default/", "a/b/c"] {
            assert_eq!(ModelKey::parse(bad), None, "{bad}");
        }
        for (namespace, name) in [("", "tiny"), ("default", ""), ("a/b", "c"), ("a", "b/c")] {
            assert_eq!(ModelKey::from_parts(namespace, name), None, "{namespace:?} {name:?}");
        }
    }

    proptest! {
        /// Keys sort as their spellings do, and only equal keys compare equal.
        #[test]
        fn keys_sort_as_they_are_spelled(
            a in ("[a-z0-9./-]{0,4}", "[a-z0-9./-]{0,4}"),
            b in ("[a-z0-9./-]{0,4}", "[a-z0-9./-]{0,4}"),
        ) {
            let (a, b) = (ModelKey::new(a.0, a.1), ModelKey::new(b.0, b.1));
            if a.to_string() != b.to_string() {
                prop_assert_eq!(a.cmp(&b), a.to_string().cmp(&b.to_string()));
            }
            prop_assert_eq!(a.cmp(&b) == Ordering::Equal, a == b);
            prop_assert_eq!(a.cmp(&b), b.cmp(&a).reverse());
        }
    }
}
