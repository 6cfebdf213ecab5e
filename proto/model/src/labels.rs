//! Label sets. Values come from inventories, Kubernetes objects and (indirectly) from
//! attackers who can name pods, so nothing here trusts their content: any UTF-8 is
//! accepted and stored verbatim; only emptiness and size are bounded.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest label key accepted (Kubernetes allows 253 + '/' + 63).
pub const MAX_KEY_LEN: usize = 317;
/// Longest label value accepted. Generous: Kubernetes caps at 63, inventories may not.
pub const MAX_VALUE_LEN: usize = 1024;

/// Key under which a workload's namespace (Kubernetes or inventory) is recorded.
pub const NAMESPACE_KEY: &str = "io.kubernetes.pod.namespace";

/// Why a label set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("label key is empty")]
    EmptyKey,
    #[error("label key {key:?} is {len} bytes long, at most {max} allowed")]
    KeyTooLong { key: String, len: usize, max: usize },
    #[error("value of label {key:?} is {len} bytes long, at most {max} allowed")]
    ValueTooLong { key: String, len: usize, max: usize },
    #[error("label key {key:?} contains a control character")]
    ControlCharInKey { key: String },
    #[error("stored label set is not canonical JSON: {reason}")]
    NotCanonical { reason: String },
}

/// A sorted key → value set. Sorting makes the canonical form (and so the identity
/// allocated for it) independent of the order labels were written in.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Labels(BTreeMap<String, String>);

/// Label keys that name a workload, most specific first (`class` is what the
/// Star Wars demo of Cilium and Bulkhead's reference scenario use).
pub const NAME_KEYS: [&str; 5] = ["app.kubernetes.io/name", "app", "k8s-app", "name", "class"];

impl Labels {
    /// Builds a label set, validating every pair.
    pub fn new<K, V>(pairs: impl IntoIterator<Item = (K, V)>) -> Result<Self, LabelError>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let mut map = BTreeMap::new();
        for (k, v) in pairs {
            let (k, v) = (k.into(), v.into());
            validate(&k, &v)?;
            map.insert(k, v);
        }
        Ok(Self(map))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The namespace label, if any.
    pub fn namespace(&self) -> Option<&str> {
        self.get(NAMESPACE_KEY)
    }

    /// A name people recognise, from the labels workloads are usually named by:
    /// `namespace/app` or `app` (the first of [`NAME_KEYS`] present). `None` when no
    /// such label exists; callers fall back to a reported workload name or the number.
    pub fn workload_name(&self) -> Option<String> {
        let app = NAME_KEYS.iter().find_map(|k| self.get(k))?;
        Some(match self.namespace() {
            Some(ns) => format!("{ns}/{app}"),
            None => app.to_owned(),
        })
    }

    /// Adds or replaces one label.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) -> Result<(), LabelError> {
        let (k, v) = (key.into(), value.into());
        validate(&k, &v)?;
        self.0.insert(k, v);
        Ok(())
    }

    /// A canonical, injective text form used as the identity key in the store:
    /// JSON of the sorted map, so keys or values containing `=` or `,` cannot collide.
    pub fn canonical(&self) -> String {
        // A map of strings always serialises.
        serde_json::to_string(&self.0).unwrap_or_default()
    }

    /// Parses the canonical form back, validating it like any other input.
    pub fn from_canonical(s: &str) -> Result<Self, LabelError> {
        let map: BTreeMap<String, String> =
            serde_json::from_str(s).map_err(|e| LabelError::NotCanonical { reason: e.to_string() })?;
        Labels::new(map)
    }
}

impl fmt::Display for Labels {
    /// `k=v,k2=v2` for logs and tables; not injective (use [`Labels::canonical`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

fn validate(k: &str, v: &str) -> Result<(), LabelError> {
    if k.is_empty() {
        return Err(LabelError::EmptyKey);
    }
    if k.len() > MAX_KEY_LEN {
        return Err(LabelError::KeyTooLong { key: truncated(k), len: k.len(), max: MAX_KEY_LEN });
    }
    if k.chars().any(char::is_control) {
        return Err(LabelError::ControlCharInKey { key: truncated(k) });
    }
    if v.len() > MAX_VALUE_LEN {
        return Err(LabelError::ValueTooLong { key: truncated(k), len: v.len(), max: MAX_VALUE_LEN });
    }
    Ok(())
}

fn truncated(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn order_does_not_change_canonical_form() {
        let a = Labels::new([("org", "empire"), ("class", "deathstar")]).expect("valid");
        let b = Labels::new([("class", "deathstar"), ("org", "empire")]).expect("valid");
        assert_eq!(a.canonical(), b.canonical());
        assert_eq!(a.canonical(), r#"{"class":"deathstar","org":"empire"}"#);
    }

    #[test]
    fn hostile_values_round_trip() {
        let l = Labels::new([("app", "x'); DROP TABLE edges;--"), ("q", "\"<script>\\\n")]).expect("valid");
        assert_eq!(Labels::from_canonical(&l.canonical()).expect("parses"), l);
    }

    #[test]
    fn rejects_empty_and_oversized() {
        assert_eq!(Labels::new([("", "v")]), Err(LabelError::EmptyKey));
        assert!(matches!(Labels::new([("k", "v".repeat(2000))]), Err(LabelError::ValueTooLong { .. })));
        assert!(matches!(Labels::new([("a\nb", "v")]), Err(LabelError::ControlCharInKey { .. })));
    }

    proptest! {
        #[test]
        fn canonical_is_injective_and_round_trips(
            m in proptest::collection::btree_map("[^\\p{Cc}]{1,8}", ".{0,8}", 0..5)
        ) {
            let l = Labels::new(m).expect("generated labels are valid");
            prop_assert_eq!(Labels::from_canonical(&l.canonical()).expect("parses"), l);
        }
    }
}
