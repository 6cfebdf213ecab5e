//! Structural diff between two versions of a workload's policy: which peers gained or
//! lost access, on which ports, and whether a direction became (un)covered. Rules are
//! compared by peer, not by position, so reordering is not a change.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use bulkhead_model::{Direction, LabelSelector, Peer, Policy, PortRange, Rule};
use serde::{Deserialize, Serialize};

/// How one peer's ports changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleChange {
    pub peer: Peer,
    pub ports_added: Vec<PortRange>,
    pub ports_removed: Vec<PortRange>,
}

/// Changes in one direction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionDiff {
    pub covered_before: bool,
    pub covered_after: bool,
    /// Peers allowed only after.
    pub added: Vec<Rule>,
    /// Peers allowed only before.
    pub removed: Vec<Rule>,
    /// Peers allowed in both, with different ports.
    pub changed: Vec<RuleChange>,
    /// Peers with identical ports in both.
    pub unchanged: usize,
}

impl DirectionDiff {
    pub fn is_empty(&self) -> bool {
        self.covered_before == self.covered_after
            && self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
    }
}

/// The difference between `before` (e.g. the deployed policy; `None` = nothing) and
/// `after` (e.g. a proposal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDiff {
    /// Set when the selected workloads changed.
    pub selector_before: Option<LabelSelector>,
    pub selector_after: Option<LabelSelector>,
    pub ingress: DirectionDiff,
    pub egress: DirectionDiff,
}

impl PolicyDiff {
    pub fn is_empty(&self) -> bool {
        self.selector_before == self.selector_after && self.ingress.is_empty() && self.egress.is_empty()
    }

    /// A line-per-change rendering (`+` allowed after, `-` only before, `~` ports).
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        if self.selector_before != self.selector_after {
            let show = |s: &Option<LabelSelector>| s.as_ref().map_or("(none)".to_owned(), ToString::to_string);
            let _ = writeln!(out, "~ selector {} -> {}", show(&self.selector_before), show(&self.selector_after));
        }
        for (dir, d) in [(Direction::Ingress, &self.ingress), (Direction::Egress, &self.egress)] {
            let word = if dir == Direction::Ingress { "from" } else { "to" };
            if d.covered_before != d.covered_after {
                let state = |c: bool| if c { "covered (default deny)" } else { "not covered" };
                let _ = writeln!(out, "~ {} {} -> {}", dir.as_str(), state(d.covered_before), state(d.covered_after));
            }
            for r in &d.added {
                let _ = writeln!(out, "+ {} {word} {} on {}", dir.as_str(), r.peer, ports(&r.ports));
            }
            for r in &d.removed {
                let _ = writeln!(out, "- {} {word} {} on {}", dir.as_str(), r.peer, ports(&r.ports));
            }
            for c in &d.changed {
                let mut parts = Vec::new();
                if !c.ports_added.is_empty() {
                    parts.push(format!("+{}", ports(&c.ports_added)));
                }
                if !c.ports_removed.is_empty() {
                    parts.push(format!("-{}", ports(&c.ports_removed)));
                }
                let _ = writeln!(out, "~ {} {word} {} {}", dir.as_str(), c.peer, parts.join(" "));
            }
        }
        out
    }
}

fn ports(p: &[PortRange]) -> String {
    if p.is_empty() {
        return "any port".to_owned();
    }
    p.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// Peer → allowed ports (`None` = every port) over a direction's rules.
fn by_peer(rules: Option<&[Rule]>) -> BTreeMap<&Peer, Option<BTreeSet<PortRange>>> {
    let mut m: BTreeMap<&Peer, Option<BTreeSet<PortRange>>> = BTreeMap::new();
    for r in rules.into_iter().flatten() {
        let slot = m.entry(&r.peer).or_insert_with(|| Some(BTreeSet::new()));
        match (r.ports.is_empty(), slot.as_mut()) {
            (true, _) => *slot = None,
            (false, Some(set)) => set.extend(r.ports.iter().copied()),
            (false, None) => {}
        }
    }
    m
}

fn direction(before: Option<&[Rule]>, after: Option<&[Rule]>) -> DirectionDiff {
    let (b, a) = (by_peer(before), by_peer(after));
    let mut d =
        DirectionDiff { covered_before: before.is_some(), covered_after: after.is_some(), ..Default::default() };
    let to_vec = |p: &Option<BTreeSet<PortRange>>| p.as_ref().map_or(Vec::new(), |s| s.iter().copied().collect());
    for (peer, ports) in &a {
        match b.get(peer) {
            None => d.added.push(Rule { peer: (*peer).clone(), ports: to_vec(ports) }),
            Some(old) if old == ports => d.unchanged += 1,
            Some(old) => {
                let (old_v, new_v) = (to_vec(old), to_vec(ports));
                // "Every port" on either side: report the whole sets.
                let (added, removed) = if old.is_none() || ports.is_none() {
                    (new_v, old_v)
                } else {
                    (
                        new_v.iter().filter(|p| !old_v.contains(p)).copied().collect(),
                        old_v.iter().filter(|p| !new_v.contains(p)).copied().collect(),
                    )
                };
                d.changed.push(RuleChange { peer: (*peer).clone(), ports_added: added, ports_removed: removed });
            }
        }
    }
    for (peer, ports) in &b {
        if !a.contains_key(peer) {
            d.removed.push(Rule { peer: (*peer).clone(), ports: to_vec(ports) });
        }
    }
    d
}

/// Diffs two versions of a policy.
pub fn diff(before: Option<&Policy>, after: &Policy) -> PolicyDiff {
    let sel_before = before.map(|p| p.selector.clone());
    let changed = sel_before.as_ref() != Some(&after.selector);
    PolicyDiff {
        selector_before: if changed { sel_before } else { None },
        selector_after: if changed { Some(after.selector.clone()) } else { None },
        ingress: direction(before.and_then(|p| p.ingress.as_deref()), after.ingress.as_deref()),
        egress: direction(before.and_then(|p| p.egress.as_deref()), after.egress.as_deref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_model::{Protocol, ReservedIdentity};

    fn rule(app: &str, ports: &[u16]) -> Rule {
        Rule {
            peer: Peer::Workloads { selector: LabelSelector::with_labels([("app", app)]) },
            ports: ports.iter().map(|p| PortRange::single(Protocol::Tcp, *p)).collect(),
        }
    }

    fn policy(ingress: Option<Vec<Rule>>, egress: Option<Vec<Rule>>) -> Policy {
        Policy {
            name: "p".into(),
            namespace: None,
            selector: LabelSelector::with_labels([("app", "x")]),
            ingress,
            egress,
        }
    }

    #[test]
    fn diff_by_peer_not_position() {
        let before = policy(Some(vec![rule("a", &[80]), rule("b", &[80, 443])]), None);
        let after = policy(Some(vec![rule("b", &[443]), rule("a", &[80]), rule("c", &[5432])]), Some(vec![]));
        let d = diff(Some(&before), &after);
        assert_eq!(d.ingress.unchanged, 1);
        assert_eq!(d.ingress.added, vec![rule("c", &[5432])]);
        assert_eq!(d.ingress.changed.len(), 1);
        assert_eq!(d.ingress.changed[0].ports_removed, vec![PortRange::single(Protocol::Tcp, 80)]);
        assert!(d.egress.covered_after && !d.egress.covered_before);
        assert!(d.selector_before.is_none());
        let text = d.to_text();
        assert!(text.contains("+ ingress from workloads {app=c} on 5432/tcp"), "{text}");
        assert!(text.contains("~ egress not covered -> covered (default deny)"), "{text}");
        assert!(diff(Some(&after), &after).is_empty());
    }

    #[test]
    fn diff_against_nothing_adds_everything() {
        let after =
            policy(Some(vec![Rule { peer: Peer::Entity { entity: ReservedIdentity::Host }, ports: vec![] }]), None);
        let d = diff(None, &after);
        assert_eq!(d.ingress.added.len(), 1);
        assert!(d.to_text().contains("+ ingress from entity host on any port"));
        assert!(d.selector_after.is_some());
    }
}
