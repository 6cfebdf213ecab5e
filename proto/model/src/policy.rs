//! Policies: what a workload may talk to. Semantics follow Kubernetes NetworkPolicy so
//! that what an analyst approves here means the same thing once exported:
//! * a [`Policy`] selects workloads by [`LabelSelector`] and *covers* the directions
//!   whose rule list is `Some` — default deny applies only there;
//! * everything that selects a workload is an allow-list union;
//! * connection-based: a reply of an allowed connection is not a new connection.
//!
//! Peers are label selectors, reserved entities, CIDRs, inventory CIDR groups or DNS
//! names ([`Peer`]) — never a pod's IP: pods churn, labels don't.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{Direction, Labels, Protocol, ReservedIdentity};

// === selectors ===

/// How a [`SelectorRequirement`] compares a label (Kubernetes' `LabelSelectorOperator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    /// Sorted; empty for `Exists` / `DoesNotExist`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

impl SelectorRequirement {
    pub fn does_not_exist(key: impl Into<String>) -> Self {
        Self { key: key.into(), operator: SelectorOperator::DoesNotExist, values: Vec::new() }
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            SelectorOperator::In => value.is_some_and(|v| self.values.iter().any(|x| x == v)),
            SelectorOperator::NotIn => value.is_none_or(|v| self.values.iter().all(|x| x != v)),
            SelectorOperator::Exists => value.is_some(),
            SelectorOperator::DoesNotExist => value.is_none(),
        }
    }
}

/// A Kubernetes-style label selector over workload labels (the namespace is the label
/// [`crate::labels::NAMESPACE_KEY`]). The empty selector selects every workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Sorted and deduplicated, so equal selectors compare equal.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<SelectorRequirement>,
}

impl LabelSelector {
    /// Selects workloads carrying all of `labels` (and possibly more).
    pub fn with_labels<'a>(labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self {
            match_labels: labels.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
            match_expressions: Vec::new(),
        }
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v.as_str()))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// Sorts and deduplicates the expressions (the canonical form).
    pub fn normalize(&mut self) {
        for r in &mut self.match_expressions {
            r.values.sort();
            r.values.dedup();
        }
        self.match_expressions.sort();
        self.match_expressions.dedup();
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("{all}");
        }
        let mut parts: Vec<String> = self.match_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for r in &self.match_expressions {
            parts.push(match r.operator {
                SelectorOperator::In => format!("{} in ({})", r.key, r.values.join(",")),
                SelectorOperator::NotIn => format!("{} notin ({})", r.key, r.values.join(",")),
                SelectorOperator::Exists => r.key.clone(),
                SelectorOperator::DoesNotExist => format!("!{}", r.key),
            });
        }
        write!(f, "{{{}}}", parts.join(", "))
    }
}

// === ports ===

/// A protocol and an inclusive port range. Synthesis only ever emits single ports
/// (`first == last`): ephemeral ranges are never opened, replies pass by connection
/// tracking. Ranges exist for imported policies (`endPort`, port omitted = all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub protocol: Protocol,
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn single(protocol: Protocol, port: u16) -> Self {
        Self { protocol, first: port, last: port }
    }

    pub fn all(protocol: Protocol) -> Self {
        Self { protocol, first: 0, last: u16::MAX }
    }

    pub fn contains(&self, protocol: Protocol, port: u16) -> bool {
        self.protocol == protocol && (self.first..=self.last).contains(&port)
    }

    pub fn is_single(&self) -> bool {
        self.first == self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.protocol.as_str();
        match (self.first, self.last) {
            (a, b) if a == b => write!(f, "{a}/{p}"),
            (0, u16::MAX) => write!(f, "any/{p}"),
            (a, b) => write!(f, "{a}-{b}/{p}"),
        }
    }
}

// === peers and rules ===

/// The other side of a rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Peer {
    /// Managed workloads whose labels match.
    Workloads { selector: LabelSelector },
    /// A reserved entity: host, world, remote-node, kube-apiserver, unmanaged.
    Entity { entity: ReservedIdentity },
    /// External addresses in `cidr` but not in `except`.
    Cidr {
        cidr: IpNet,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        except: Vec<IpNet>,
    },
    /// A named external CIDR group from the inventory (an identity of its own).
    CidrGroup { name: String, cidrs: Vec<IpNet> },
    /// External addresses a DNS name resolved to. `addresses` are the ones still valid
    /// (TTL) when the policy was made: what a plain NetworkPolicy falls back to.
    Fqdn { name: String, addresses: Vec<IpAddr> },
}

impl Peer {
    /// Whether this peer names something outside the cluster / inventory.
    pub fn is_external(&self) -> bool {
        match self {
            Peer::Workloads { .. } => false,
            Peer::Entity { entity } => *entity == ReservedIdentity::World,
            Peer::Cidr { .. } | Peer::CidrGroup { .. } | Peer::Fqdn { .. } => true,
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Workloads { selector } => write!(f, "workloads {selector}"),
            Peer::Entity { entity } => write!(f, "entity {}", entity.name()),
            Peer::Cidr { cidr, except } if except.is_empty() => write!(f, "cidr {cidr}"),
            Peer::Cidr { cidr, except } => {
                let ex: Vec<String> = except.iter().map(ToString::to_string).collect();
                write!(f, "cidr {cidr} except {}", ex.join(","))
            }
            Peer::CidrGroup { name, .. } => write!(f, "cidr-group {name}"),
            Peer::Fqdn { name, .. } => write!(f, "fqdn {name}"),
        }
    }
}

/// One allow rule: a peer and the ports it may use (empty = every port).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Rule {
    pub peer: Peer,
    /// Sorted and deduplicated.
    pub ports: Vec<PortRange>,
}

impl Rule {
    pub fn allows_port(&self, protocol: Protocol, port: u16) -> bool {
        self.ports.is_empty() || self.ports.iter().any(|p| p.contains(protocol, port))
    }
}

/// The policy for the workloads `selector` selects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Kubernetes object name (DNS-1123).
    pub name: String,
    /// Namespace of the selected workloads, when they have one.
    pub namespace: Option<String>,
    /// Selects the workloads the policy applies to (includes the namespace label).
    pub selector: LabelSelector,
    /// `None`: ingress not covered (everything allowed); `Some(empty)`: deny all.
    pub ingress: Option<Vec<Rule>>,
    /// `None`: egress not covered; `Some(empty)`: deny all.
    pub egress: Option<Vec<Rule>>,
}

impl Policy {
    pub fn rules(&self, direction: Direction) -> Option<&[Rule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// Sorts rules and ports so equal policies serialize identically.
    pub fn normalize(&mut self) {
        self.selector.normalize();
        for rules in [self.ingress.as_mut(), self.egress.as_mut()].into_iter().flatten() {
            for r in rules.iter_mut() {
                if let Peer::Workloads { selector } = &mut r.peer {
                    selector.normalize();
                }
                r.ports.sort();
                r.ports.dedup();
            }
            rules.sort();
            rules.dedup();
        }
    }
}

/// Per-workload rollout stage (DESIGN.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutMode {
    /// No policy; observe.
    Learn,
    /// Policy installed in audit: would-deny traffic reported, nothing dropped.
    Monitor,
    /// Would-deny traffic dropped and reported.
    Enforce,
}

impl RolloutMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutMode::Learn => "learn",
            RolloutMode::Monitor => "monitor",
            RolloutMode::Enforce => "enforce",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        Labels::new(pairs.iter().copied()).expect("valid labels")
    }

    #[test]
    fn selector_semantics_follow_kubernetes() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        assert!(LabelSelector::default().matches(&l));
        assert!(LabelSelector::with_labels([("app", "web")]).matches(&l));
        assert!(!LabelSelector::with_labels([("app", "db")]).matches(&l));
        let mut s = LabelSelector::with_labels([("app", "web")]);
        s.match_expressions.push(SelectorRequirement::does_not_exist("tier"));
        assert!(!s.matches(&l));
        assert!(s.matches(&labels(&[("app", "web")])));
        let not_in =
            SelectorRequirement { key: "tier".into(), operator: SelectorOperator::NotIn, values: vec!["back".into()] };
        assert!(not_in.matches(&l));
        assert!(not_in.matches(&labels(&[])));
        let in_ = SelectorRequirement { key: "tier".into(), operator: SelectorOperator::In, values: vec![] };
        assert!(!in_.matches(&l));
    }

    #[test]
    fn ports_display_and_contain() {
        assert_eq!(PortRange::single(Protocol::Tcp, 80).to_string(), "80/tcp");
        assert_eq!(PortRange::all(Protocol::Udp).to_string(), "any/udp");
        let r = PortRange { protocol: Protocol::Tcp, first: 8000, last: 8080 };
        assert!(r.contains(Protocol::Tcp, 8080) && !r.contains(Protocol::Udp, 8000) && !r.contains(Protocol::Tcp, 80));
        let rule = Rule { peer: Peer::Entity { entity: ReservedIdentity::Host }, ports: vec![] };
        assert!(rule.allows_port(Protocol::Udp, 53));
    }

    #[test]
    fn policy_round_trips_through_json() {
        let mut p = Policy {
            name: "bulkhead-deathstar".into(),
            namespace: Some("empire".into()),
            selector: LabelSelector::with_labels([("class", "deathstar")]),
            ingress: Some(vec![Rule {
                peer: Peer::Workloads { selector: LabelSelector::with_labels([("org", "empire")]) },
                ports: vec![PortRange::single(Protocol::Tcp, 80)],
            }]),
            egress: None,
        };
        p.normalize();
        let json = serde_json::to_string(&p).expect("serializes");
        let back: Policy = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, p);
    }
}
