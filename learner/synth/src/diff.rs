//! Structural diff between two versions of a workload's policy: which peers gained or
//! lost access, on which ports, which HTTP requests (L7), and whether a direction became
//! (un)covered. Rules are compared by peer, not by position, so reordering is not a
//! change.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use bulkhead_model::{Direction, HttpRule, LabelSelector, Peer, Policy, PortRange, Rule};
use serde::{Deserialize, Serialize};

/// How one peer's access changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleChange {
    pub peer: Peer,
    pub ports_added: Vec<PortRange>,
    pub ports_removed: Vec<PortRange>,
    /// Ports allowed before and after whose HTTP rules changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpChange>,
}

/// How the requests allowed on one port changed. `None`: any request (L4 only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpChange {
    /// `None`: the rule without ports (every port).
    pub port: Option<PortRange>,
    pub before: Option<Vec<HttpRule>>,
    pub after: Option<Vec<HttpRule>>,
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
    /// Peers allowed in both, with different ports or requests.
    pub changed: Vec<RuleChange>,
    /// Peers with identical access in both.
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

    /// A line-per-change rendering (`+` allowed after, `-` only before, `~` changed).
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
                let _ =
                    writeln!(out, "+ {} {word} {} on {}{}", dir.as_str(), r.peer, ports(&r.ports), requests(&r.http));
            }
            for r in &d.removed {
                let _ =
                    writeln!(out, "- {} {word} {} on {}{}", dir.as_str(), r.peer, ports(&r.ports), requests(&r.http));
            }
            for c in &d.changed {
                let mut parts = Vec::new();
                if !c.ports_added.is_empty() {
                    parts.push(format!("+{}", ports(&c.ports_added)));
                }
                if !c.ports_removed.is_empty() {
                    parts.push(format!("-{}", ports(&c.ports_removed)));
                }
                if !parts.is_empty() {
                    let _ = writeln!(out, "~ {} {word} {} {}", dir.as_str(), c.peer, parts.join(" "));
                }
                for h in &c.http {
                    let port = h.port.map_or("any port".to_owned(), |p| p.to_string());
                    let _ = writeln!(out, "~ {} {word} {} on {port}: {}", dir.as_str(), c.peer, http_change(h));
                }
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

/// ` only HTTP GET /a, POST /b` for an L7 rule, nothing for an L4 one.
fn requests(http: &[HttpRule]) -> String {
    if http.is_empty() { String::new() } else { format!(" only HTTP {}", list(http)) }
}

fn list(http: &[HttpRule]) -> String {
    http.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

fn http_change(h: &HttpChange) -> String {
    match (&h.before, &h.after) {
        (None, Some(after)) => format!("any request -> only HTTP {}", list(after)),
        (Some(before), None) => format!("only HTTP {} -> any request", list(before)),
        (Some(before), Some(after)) => {
            let mut parts: Vec<String> =
                after.iter().filter(|r| !before.contains(r)).map(|r| format!("+HTTP {r}")).collect();
            parts.extend(before.iter().filter(|r| !after.contains(r)).map(|r| format!("-HTTP {r}")));
            parts.join(" ")
        }
        (None, None) => String::new(),
    }
}

/// What a direction's rules allow one peer: port (`None` = every port) → the requests
/// allowed there (`None` = any request). Rules for the same peer are a union.
type Access = BTreeMap<Option<PortRange>, Option<BTreeSet<HttpRule>>>;

fn by_peer(rules: Option<&[Rule]>) -> BTreeMap<&Peer, Access> {
    let mut m: BTreeMap<&Peer, Access> = BTreeMap::new();
    for r in rules.into_iter().flatten() {
        let slot = m.entry(&r.peer).or_default();
        let l7: Option<BTreeSet<HttpRule>> = (!r.http.is_empty()).then(|| r.http.iter().cloned().collect());
        let keys: Vec<Option<PortRange>> =
            if r.ports.is_empty() { vec![None] } else { r.ports.iter().copied().map(Some).collect() };
        for k in keys {
            match slot.get_mut(&k) {
                None => {
                    slot.insert(k, l7.clone());
                }
                Some(existing) => match (existing.as_mut(), &l7) {
                    (Some(set), Some(more)) => set.extend(more.iter().cloned()),
                    (Some(_), None) => *existing = None,
                    (None, _) => {}
                },
            }
        }
    }
    m
}

/// The port-level view of an access: `None` = every port.
fn port_set(a: &Access) -> Option<BTreeSet<PortRange>> {
    if a.contains_key(&None) { None } else { Some(a.keys().flatten().copied().collect()) }
}

/// The rules that grant `a` to `peer`: one per distinct set of allowed requests.
fn rules_of(peer: &Peer, a: &Access) -> Vec<Rule> {
    let mut by_l7: BTreeMap<&Option<BTreeSet<HttpRule>>, Vec<PortRange>> = BTreeMap::new();
    let mut every: Option<&Option<BTreeSet<HttpRule>>> = None;
    for (port, l7) in a {
        match port {
            Some(p) => by_l7.entry(l7).or_default().push(*p),
            None => every = Some(l7),
        }
    }
    let http = |l7: &Option<BTreeSet<HttpRule>>| l7.iter().flatten().cloned().collect::<Vec<_>>();
    let mut out: Vec<Rule> =
        by_l7.into_iter().map(|(l7, ports)| Rule { peer: peer.clone(), ports, http: http(l7) }).collect();
    if let Some(l7) = every {
        // Every port: the port list of the others is moot.
        out = vec![Rule { peer: peer.clone(), ports: Vec::new(), http: http(l7) }];
    }
    out
}

fn direction(before: Option<&[Rule]>, after: Option<&[Rule]>) -> DirectionDiff {
    let (b, a) = (by_peer(before), by_peer(after));
    let mut d =
        DirectionDiff { covered_before: before.is_some(), covered_after: after.is_some(), ..Default::default() };
    let to_vec = |p: &Option<BTreeSet<PortRange>>| p.as_ref().map_or(Vec::new(), |s| s.iter().copied().collect());
    let as_vec = |l7: &Option<BTreeSet<HttpRule>>| l7.as_ref().map(|s| s.iter().cloned().collect::<Vec<_>>());
    for (peer, access) in &a {
        match b.get(peer) {
            None => d.added.extend(rules_of(peer, access)),
            Some(old) if old == access => d.unchanged += 1,
            Some(old) => {
                let (old_ports, new_ports) = (port_set(old), port_set(access));
                let (old_v, new_v) = (to_vec(&old_ports), to_vec(&new_ports));
                // "Every port" on either side: report the whole sets.
                let (added, removed) = if old_ports == new_ports {
                    (Vec::new(), Vec::new())
                } else if old_ports.is_none() || new_ports.is_none() {
                    (new_v, old_v)
                } else {
                    (
                        new_v.iter().filter(|p| !old_v.contains(p)).copied().collect(),
                        old_v.iter().filter(|p| !new_v.contains(p)).copied().collect(),
                    )
                };
                let http = access
                    .iter()
                    .filter_map(|(port, l7)| {
                        let before = old.get(port)?;
                        (before != l7).then(|| HttpChange { port: *port, before: as_vec(before), after: as_vec(l7) })
                    })
                    .collect();
                d.changed.push(RuleChange { peer: (*peer).clone(), ports_added: added, ports_removed: removed, http });
            }
        }
    }
    for (peer, access) in &b {
        if !a.contains_key(peer) {
            d.removed.extend(rules_of(peer, access));
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
            http: vec![],
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
        let after = policy(Some(vec![Rule::l4(Peer::Entity { entity: ReservedIdentity::Host }, vec![])]), None);
        let d = diff(None, &after);
        assert_eq!(d.ingress.added.len(), 1);
        assert!(d.to_text().contains("+ ingress from entity host on any port"));
        assert!(d.selector_after.is_some());
    }

    #[test]
    fn diff_shows_http_changes_per_port() {
        use bulkhead_model::HttpRule;
        let l7 = |app: &str, port: u16, http: &[HttpRule]| Rule { http: http.to_vec(), ..rule(app, &[port]) };
        let landing = HttpRule::exact("POST", "/v1/request-landing");
        let exhaust = HttpRule::exact("PUT", "/v1/exhaust-port");
        let l4 = policy(Some(vec![rule("tie", &[80])]), None);
        let narrow = policy(Some(vec![l7("tie", 80, std::slice::from_ref(&landing))]), None);
        let other = policy(Some(vec![l7("tie", 80, std::slice::from_ref(&exhaust))]), None);

        let d = diff(Some(&l4), &narrow);
        assert_eq!(d.ingress.changed.len(), 1);
        assert!(d.ingress.changed[0].ports_added.is_empty() && d.ingress.changed[0].ports_removed.is_empty());
        let text = d.to_text();
        assert!(
            text.contains(
                "~ ingress from workloads {app=tie} on 80/tcp: any request -> only HTTP POST /v1/request-landing"
            ),
            "{text}"
        );
        let text = diff(Some(&narrow), &l4).to_text();
        assert!(text.contains("only HTTP POST /v1/request-landing -> any request"), "{text}");
        let text = diff(Some(&narrow), &other).to_text();
        assert!(text.contains("on 80/tcp: +HTTP PUT /v1/exhaust-port -HTTP POST /v1/request-landing"), "{text}");
        let text = diff(None, &narrow).to_text();
        assert!(
            text.contains("+ ingress from workloads {app=tie} on 80/tcp only HTTP POST /v1/request-landing"),
            "{text}"
        );
        assert!(diff(Some(&narrow), &narrow).is_empty());
        // An L4 rule for the same peer and port absorbs the HTTP rules: no change.
        let both = policy(Some(vec![l7("tie", 80, &[landing]), rule("tie", &[80])]), None);
        assert!(diff(Some(&l4), &both).is_empty(), "{}", diff(Some(&l4), &both).to_text());
    }
}
