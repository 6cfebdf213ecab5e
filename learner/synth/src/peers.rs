//! Turning observed workload peers into rules at a [`Level`]: the least-privilege core.
//!
//! * `exact`: one rule per observed peer identity with exactly its ports. Peers with
//!   the same ports share one rule when the labels they have in common select exactly
//!   them among all known workloads (e.g. two versions of one app) — still zero
//!   widening, but one readable selector instead of a list.
//! * `labels`: each peer is generalized to the labels it shares with other workloads
//!   (its namespace kept), dropping labels only it carries — `org=empire` rather than
//!   `class=tiefighter`. Peers that share nothing fall back to `exact`.
//! * `namespace`: each peer is generalized to its namespace.
//!
//! What a generalized rule allows beyond the evidence is computed afterwards for every
//! rule the same way (see [`crate::synthesize`]), so no level can widen silently.

use std::collections::{BTreeMap, BTreeSet};

use bulkhead_model::labels::NAMESPACE_KEY;
use bulkhead_model::{Identity, LabelSelector, Level, Peer, PortRange, Rule};

use crate::evidence::Agg;
use crate::index::LabelIndex;

/// Observations of one peer identity: port → evidence.
pub type PeerPorts = BTreeMap<PortRange, Agg>;

/// A rule with the evidence of the observations it was made from.
#[derive(Debug)]
pub struct GroupedRule {
    pub rule: Rule,
    pub agg: Agg,
}

/// Rules for the observed workload peers of one target in one direction.
pub fn workload_rules(
    index: &LabelIndex<'_>,
    level: Level,
    observed: &BTreeMap<Identity, &PeerPorts>,
) -> Vec<GroupedRule> {
    // Selector → (ports → evidence). BTreeMap keys make the output deterministic.
    let mut by_selector: BTreeMap<LabelSelector, BTreeMap<PortRange, Agg>> = BTreeMap::new();
    match level {
        Level::Exact => {
            let mut by_ports: BTreeMap<BTreeSet<PortRange>, Vec<Identity>> = BTreeMap::new();
            for (peer, ports) in observed {
                by_ports.entry(ports.keys().copied().collect()).or_default().push(*peer);
            }
            for peers in by_ports.values() {
                let shared = (peers.len() > 1).then(|| shared_selector(index, peers)).flatten();
                for peer in peers {
                    let Some(sel) = shared.clone().or_else(|| index.exact_selector_of(*peer).cloned()) else {
                        continue;
                    };
                    absorb(by_selector.entry(sel).or_default(), observed[peer]);
                }
            }
        }
        Level::Labels | Level::Namespace => {
            for (peer, ports) in observed {
                let Some(info) = index.get(*peer) else { continue };
                let mut sel = LabelSelector::default();
                for (k, v) in info.labels.iter() {
                    let keep =
                        if k == NAMESPACE_KEY { true } else { level == Level::Labels && index.pair_count(k, v) >= 2 };
                    if keep {
                        sel.match_labels.insert(k.to_owned(), v.to_owned());
                    }
                }
                // Nothing to generalize to (only its namespace, or no namespace at all at
                // the namespace level): keep the peer exact rather than open everything.
                let generalized = match level {
                    Level::Namespace => sel.match_labels.contains_key(NAMESPACE_KEY),
                    _ => sel.match_labels.keys().any(|k| k != NAMESPACE_KEY),
                };
                if !generalized {
                    let Some(exact) = index.exact_selector_of(*peer) else { continue };
                    sel = exact.clone();
                }
                absorb(by_selector.entry(sel).or_default(), ports);
            }
        }
    }
    by_selector
        .into_iter()
        .map(|(selector, ports)| {
            let mut agg = Agg::default();
            for a in ports.values() {
                agg.merge(a);
            }
            GroupedRule { rule: Rule::l4(Peer::Workloads { selector }, ports.into_keys().collect()), agg }
        })
        .collect()
}

fn absorb(into: &mut BTreeMap<PortRange, Agg>, ports: &PeerPorts) {
    for (p, a) in ports {
        into.entry(*p).or_default().merge(a);
    }
}

/// The labels all `peers` have in common, if that selects exactly them. Checked on
/// borrowed pairs first: most groups fail, and building a selector for each was the
/// biggest allocation cost of exact-level synthesis (measured).
fn shared_selector(index: &LabelIndex<'_>, peers: &[Identity]) -> Option<LabelSelector> {
    let mut infos = peers.iter().map(|p| index.get(*p));
    let first = infos.next()??;
    let mut common: Vec<(&str, &str)> = first.labels.iter().collect();
    for info in infos {
        let info = info?;
        common.retain(|(k, v)| info.labels.get(k) == Some(*v));
    }
    if common.iter().all(|(k, _)| *k == NAMESPACE_KEY) {
        return None;
    }
    let mut want = peers.to_vec();
    want.sort();
    index.pairs_select_exactly(&common, &want).then(|| LabelSelector::with_labels(common))
}
