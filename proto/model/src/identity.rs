//! Numeric security identities. Rules are written between identities, never raw IPs:
//! pods churn, identities don't. The learner allocates and persists them; the numbers
//! below [`Identity::FIRST_ALLOCATED`] are reserved with fixed meanings (Cilium's
//! numbering, so operators who know one know the other).

use std::fmt;

use serde::{Deserialize, Serialize};

/// A numeric identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Identity(pub u32);

/// Identities with a fixed meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReservedIdentity {
    /// The node itself (its own network namespace).
    Host = 1,
    /// Anything outside every known endpoint and prefix.
    World = 2,
    /// A local workload no inventory entry or Kubernetes object describes.
    Unmanaged = 3,
    /// Another Bulkhead node.
    RemoteNode = 6,
    /// The Kubernetes API server.
    KubeApiserver = 7,
}

impl ReservedIdentity {
    pub const ALL: [ReservedIdentity; 5] = [
        ReservedIdentity::Host,
        ReservedIdentity::World,
        ReservedIdentity::Unmanaged,
        ReservedIdentity::RemoteNode,
        ReservedIdentity::KubeApiserver,
    ];

    /// The label value used for this entity (`reserved:host`, …).
    pub fn name(self) -> &'static str {
        match self {
            ReservedIdentity::Host => "host",
            ReservedIdentity::World => "world",
            ReservedIdentity::Unmanaged => "unmanaged",
            ReservedIdentity::RemoteNode => "remote-node",
            ReservedIdentity::KubeApiserver => "kube-apiserver",
        }
    }
}

impl From<ReservedIdentity> for Identity {
    fn from(r: ReservedIdentity) -> Self {
        Identity(r as u32)
    }
}

impl Identity {
    /// First number handed out for label sets; everything below is reserved.
    pub const FIRST_ALLOCATED: u32 = 256;

    pub const HOST: Identity = Identity(ReservedIdentity::Host as u32);
    pub const WORLD: Identity = Identity(ReservedIdentity::World as u32);
    pub const UNMANAGED: Identity = Identity(ReservedIdentity::Unmanaged as u32);

    pub fn reserved(self) -> Option<ReservedIdentity> {
        ReservedIdentity::ALL.into_iter().find(|r| *r as u32 == self.0)
    }

    pub fn is_reserved(self) -> bool {
        self.0 < Self::FIRST_ALLOCATED
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reserved() {
            Some(r) => write!(f, "{}(reserved:{})", self.0, r.name()),
            None => write!(f, "{}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_numbers_are_fixed() {
        assert_eq!(Identity::from(ReservedIdentity::Host), Identity(1));
        assert_eq!(Identity(2).reserved(), Some(ReservedIdentity::World));
        assert_eq!(Identity(300).reserved(), None);
        assert!(Identity(255).is_reserved());
        assert!(!Identity(256).is_reserved());
        assert_eq!(Identity::WORLD.to_string(), "2(reserved:world)");
    }
}
