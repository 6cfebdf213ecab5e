//! The difference between two versions of one node's [`NodePolicy`], so a change of
//! one rule in a 100k-rule policy travels as one rule, not as the whole snapshot.
//!
//! Deltas are keyed by what [`NodePolicy::validate`] makes unique: ipcache entries by
//! prefix, rules by [`RuleKey`], rule references by `rule_id`. Endpoints travel
//! whole when any of them changed (they are few — at most one per local workload
//! instance — and have no unique key: replicas share an identity).
//!
//! A delta applies only to the exact version it was made from; an enforcer that
//! holds anything else reconnects, and a new stream always starts with a snapshot.

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::node_policy::{IpcacheEntry, NodePolicy, NodeRule, PolicyEndpoint, RuleKey, RuleRef};
use crate::{Identity, NodePolicyError};

/// One message of a policy stream: a whole policy, or what changed since the
/// previous one the enforcer applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum PolicyUpdate {
    Snapshot(NodePolicy),
    Delta(NodePolicyDelta),
}

impl PolicyUpdate {
    /// The version it brings the enforcer to.
    pub fn version(&self) -> u64 {
        match self {
            PolicyUpdate::Snapshot(p) => p.version,
            PolicyUpdate::Delta(d) => d.version,
        }
    }
}

/// What changed from version `base_version` to `version`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePolicyDelta {
    pub base_version: u64,
    pub version: u64,
    /// New or re-mapped prefixes.
    pub ipcache_upsert: Vec<IpcacheEntry>,
    /// Prefixes that are gone.
    pub ipcache_remove: Vec<IpNet>,
    /// The complete new endpoint list, when it changed.
    pub endpoints: Option<Vec<PolicyEndpoint>>,
    /// New rules, and rules whose rule id or HTTP rules changed.
    pub rules_upsert: Vec<NodeRule>,
    /// Rules that are gone.
    pub rules_remove: Vec<RuleKey>,
    pub rule_refs_upsert: Vec<RuleRef>,
    pub rule_refs_remove: Vec<u32>,
}

/// Why a delta does not apply to a policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("delta from version {base} does not apply to version {applied}")]
    BaseMismatch { base: u64, applied: u64 },
    #[error("delta version {version} is not after its base {base}")]
    NotNewer { base: u64, version: u64 },
    #[error("the result is not a valid policy: {0}")]
    Invalid(#[from] NodePolicyError),
}

impl NodePolicyDelta {
    /// The delta that turns `old` into `new` (both valid, so their keys are unique).
    pub fn between(old: &NodePolicy, new: &NodePolicy) -> NodePolicyDelta {
        let old_ip: BTreeMap<IpNet, Identity> = old.ipcache.iter().map(|e| (e.prefix, e.identity)).collect();
        let new_ip: BTreeMap<IpNet, Identity> = new.ipcache.iter().map(|e| (e.prefix, e.identity)).collect();
        let old_rules: BTreeMap<RuleKey, &NodeRule> = old.rules.iter().map(|r| (r.key, r)).collect();
        let new_rules: BTreeMap<RuleKey, &NodeRule> = new.rules.iter().map(|r| (r.key, r)).collect();
        let old_refs: BTreeMap<u32, &RuleRef> = old.rule_refs.iter().map(|r| (r.rule_id, r)).collect();
        let new_refs: BTreeMap<u32, &RuleRef> = new.rule_refs.iter().map(|r| (r.rule_id, r)).collect();
        NodePolicyDelta {
            base_version: old.version,
            version: new.version,
            ipcache_upsert: new_ip
                .iter()
                .filter(|(p, id)| old_ip.get(*p) != Some(*id))
                .map(|(p, id)| IpcacheEntry { prefix: *p, identity: *id })
                .collect(),
            ipcache_remove: old_ip.keys().filter(|p| !new_ip.contains_key(*p)).copied().collect(),
            endpoints: (old.endpoints != new.endpoints).then(|| new.endpoints.clone()),
            rules_upsert: new_rules
                .iter()
                .filter(|(k, r)| old_rules.get(*k) != Some(*r))
                .map(|(_, r)| (*r).clone())
                .collect(),
            rules_remove: old_rules.keys().filter(|k| !new_rules.contains_key(*k)).copied().collect(),
            rule_refs_upsert: new_refs
                .iter()
                .filter(|(id, r)| old_refs.get(*id) != Some(*r))
                .map(|(_, r)| (*r).clone())
                .collect(),
            rule_refs_remove: old_refs.keys().filter(|id| !new_refs.contains_key(*id)).copied().collect(),
        }
    }

    /// `base` with the delta applied, validated. Lists come out sorted by key
    /// (ipcache by prefix, rules by key, references by rule id).
    pub fn apply(&self, base: &NodePolicy) -> Result<NodePolicy, DeltaError> {
        if base.version != self.base_version {
            return Err(DeltaError::BaseMismatch { base: self.base_version, applied: base.version });
        }
        if self.version <= self.base_version {
            return Err(DeltaError::NotNewer { base: self.base_version, version: self.version });
        }
        let mut ip: BTreeMap<IpNet, Identity> = base.ipcache.iter().map(|e| (e.prefix, e.identity)).collect();
        for p in &self.ipcache_remove {
            ip.remove(p);
        }
        ip.extend(self.ipcache_upsert.iter().map(|e| (e.prefix, e.identity)));
        let mut rules: BTreeMap<RuleKey, NodeRule> = base.rules.iter().map(|r| (r.key, r.clone())).collect();
        for k in &self.rules_remove {
            rules.remove(k);
        }
        rules.extend(self.rules_upsert.iter().map(|r| (r.key, r.clone())));
        let mut refs: BTreeMap<u32, RuleRef> = base.rule_refs.iter().map(|r| (r.rule_id, r.clone())).collect();
        for id in &self.rule_refs_remove {
            refs.remove(id);
        }
        refs.extend(self.rule_refs_upsert.iter().map(|r| (r.rule_id, r.clone())));
        let policy = NodePolicy {
            version: self.version,
            ipcache: ip.into_iter().map(|(prefix, identity)| IpcacheEntry { prefix, identity }).collect(),
            endpoints: self.endpoints.clone().unwrap_or_else(|| base.endpoints.clone()),
            rules: rules.into_values().collect(),
            rule_refs: refs.into_values().collect(),
        };
        policy.validate()?;
        Ok(policy)
    }

    /// Entries it carries (what decides whether a snapshot is smaller).
    pub fn len(&self) -> usize {
        self.ipcache_upsert.len()
            + self.ipcache_remove.len()
            + self.endpoints.as_ref().map_or(0, Vec::len)
            + self.rules_upsert.len()
            + self.rules_remove.len()
            + self.rule_refs_upsert.len()
            + self.rule_refs_remove.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::node_policy::EndpointCgroup;
    use crate::{Direction, Protocol, RolloutMode};

    const LOCALS: [u32; 3] = [300, 301, 302];

    /// A valid policy over a small universe, chosen by bit masks: which peers
    /// have an address, which local workloads are managed and which rules exist.
    fn policy(version: u64, peers: u8, modes: u8, rules: u32) -> NodePolicy {
        let ipcache: Vec<IpcacheEntry> = (0..8u32)
            .filter(|i| peers & (1 << i) != 0)
            .map(|i| IpcacheEntry {
                prefix: format!("10.9.{i}.0/24").parse().expect("net"),
                identity: Identity(400 + i),
            })
            .collect();
        let endpoints: Vec<PolicyEndpoint> = LOCALS
            .iter()
            .enumerate()
            .map(|(i, id)| PolicyEndpoint {
                identity: Identity(*id),
                netns_ino: None,
                netns_name: None,
                cgroups: vec![EndpointCgroup { cgroup_id: 10 + i as u64, path: format!("/w/{i}") }],
                mode: if modes & (1 << i) != 0 { RolloutMode::Enforce } else { RolloutMode::Monitor },
                ingress_covered: true,
                egress_covered: modes & (8 << i) != 0,
            })
            .collect();
        let mut node_rules = Vec::new();
        for bit in 0..32u32 {
            if rules & (1 << bit) == 0 {
                continue;
            }
            let peer = 400 + bit % 8;
            if peers & (1 << (bit % 8)) == 0 {
                continue;
            }
            node_rules.push(NodeRule {
                key: RuleKey {
                    local: Identity(LOCALS[(bit / 8) as usize % 3]),
                    direction: if bit % 2 == 0 { Direction::Ingress } else { Direction::Egress },
                    peer: Some(Identity(peer)),
                    port: Some(80 + (bit / 3) as u16),
                    protocol: Some(Protocol::Tcp),
                },
                // Ids move with the version: a rule whose id changes is an upsert.
                rule_id: bit + 1 + (version % 2) as u32,
                http: Vec::new(),
            });
        }
        node_rules.sort_by_key(|r| r.key);
        node_rules.dedup_by_key(|r| r.key);
        let mut seen = std::collections::BTreeSet::new();
        node_rules.retain(|r| seen.insert(r.rule_id));
        let rule_refs = node_rules
            .iter()
            .map(|r| RuleRef {
                rule_id: r.rule_id,
                proposal_id: i64::from(r.key.local.0),
                policy_name: format!("p-{}", r.key.local.0),
                direction: r.key.direction,
                rule_index: r.rule_id,
            })
            .collect();
        let p = NodePolicy { version, ipcache, endpoints, rules: node_rules, rule_refs };
        p.validate().expect("generated policies are valid");
        p
    }

    fn sorted(mut p: NodePolicy) -> NodePolicy {
        p.ipcache.sort_by_key(|e| e.prefix);
        p.rules.sort_by_key(|r| r.key);
        p.rule_refs.sort_by_key(|r| r.rule_id);
        p
    }

    proptest! {
        #[test]
        fn a_delta_turns_the_old_version_into_the_new_one(
            a in (any::<u8>(), any::<u8>(), any::<u32>()),
            b in (any::<u8>(), any::<u8>(), any::<u32>()),
        ) {
            let old = policy(10, a.0, a.1, a.2);
            let new = policy(11, b.0, b.1, b.2);
            let delta = NodePolicyDelta::between(&old, &new);
            prop_assert_eq!(sorted(delta.apply(&old).expect("applies")), sorted(new.clone()));
            // Unchanged content travels as nothing.
            let same = NodePolicy { version: 12, ..new.clone() };
            prop_assert!(NodePolicyDelta::between(&new, &same).is_empty());
        }
    }

    #[test]
    fn a_delta_applies_only_to_its_base() {
        let old = policy(10, 0xff, 0, 0xffff);
        let new = policy(11, 0x0f, 1, 0x00ff);
        let delta = NodePolicyDelta::between(&old, &new);
        assert_eq!(
            delta.apply(&NodePolicy { version: 9, ..old.clone() }),
            Err(DeltaError::BaseMismatch { base: 10, applied: 9 })
        );
        let backwards = NodePolicyDelta { version: 10, ..delta.clone() };
        assert_eq!(backwards.apply(&old), Err(DeltaError::NotNewer { base: 10, version: 10 }));
        // A delta whose result is invalid (a rule for a peer nobody knows) is refused.
        let mut bad = delta;
        bad.rules_upsert.push(NodeRule {
            key: RuleKey {
                local: Identity(300),
                direction: Direction::Ingress,
                peer: Some(Identity(9999)),
                port: Some(1),
                protocol: Some(Protocol::Udp),
            },
            rule_id: 999,
            http: Vec::new(),
        });
        assert!(matches!(bad.apply(&old), Err(DeltaError::Invalid(_))));
    }
}
