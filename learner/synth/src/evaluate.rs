//! Evaluating a policy set against connections — the "what would this block?" replay,
//! and the oracle the property tests check synthesis against.
//!
//! Kubernetes NetworkPolicy semantics: a connection passes a direction when no policy
//! selecting that side covers the direction, or when any rule of any policy selecting it
//! allows the peer and port (allow-list union). A connection is allowed when both its
//! egress side (the initiator) and its ingress side (the responder) pass.
//!
//! L7: a rule with HTTP rules ([`Rule::http`]) allows the connection (its port and
//! peer), and then only the requests its HTTP rules match. [`Evaluator::decide`] is
//! the connection's verdict; [`Evaluator::decide_request`] one request's, where a side
//! passes only through a rule that is L4 or matches the request.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use bulkhead_model::{Direction, Identity, Peer, Policy, Protocol, ReservedIdentity, Rule};
use serde::Serialize;

use crate::input::{IdentityInfo, IdentityKind};

/// One connection to evaluate: `src` initiated to `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Connection {
    pub src: Identity,
    pub dst: Identity,
    pub src_addr: Option<IpAddr>,
    pub dst_addr: Option<IpAddr>,
    pub dst_port: u16,
    pub protocol: Protocol,
}

/// How one direction decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum SideVerdict {
    /// No policy selecting this side covers the direction.
    NotCovered,
    /// Allowed by this rule (indexes into the policy set and its rule list).
    Allowed { policy: usize, rule: usize },
    /// Covered by these policies, and none of their rules allows it.
    DefaultDeny { policies: Vec<usize> },
}

impl SideVerdict {
    pub fn allows(&self) -> bool {
        !matches!(self, SideVerdict::DefaultDeny { .. })
    }
}

/// The verdict on a connection with the reason on each side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The initiator's egress.
    pub egress: SideVerdict,
    /// The responder's ingress.
    pub ingress: SideVerdict,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.egress.allows() && self.ingress.allows()
    }
}

/// A policy set ready to answer many connections. Which policies select an identity is
/// computed once per identity (through an index on the selectors' label pairs), so
/// replaying millions of flows costs one hash lookup per side plus the rule checks.
#[derive(Debug)]
pub struct Evaluator<'a> {
    policies: &'a [Policy],
    identities: HashMap<Identity, &'a IdentityInfo>,
    /// DNS name → addresses it resolved to (for FQDN peers).
    fqdn: HashMap<&'a str, HashSet<IpAddr>>,
    /// (key, value) → policies whose selector requires it; `unindexed`: the others.
    by_pair: HashMap<(&'a str, &'a str), Vec<usize>>,
    unindexed: Vec<usize>,
    /// Identity → selecting policies, filled on first use (shareable across threads).
    selecting: Mutex<HashMap<Identity, Arc<[usize]>>>,
}

impl<'a> Evaluator<'a> {
    /// `fqdn` maps DNS names to the addresses seen for them; FQDN peers also match the
    /// addresses stored in the rule itself.
    pub fn new(
        policies: &'a [Policy],
        identities: &'a [IdentityInfo],
        fqdn: &'a BTreeMap<String, Vec<IpAddr>>,
    ) -> Self {
        let mut by_pair: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
        let mut unindexed = Vec::new();
        for (n, p) in policies.iter().enumerate() {
            match p.selector.match_labels.iter().next() {
                Some((k, v)) => by_pair.entry((k.as_str(), v.as_str())).or_default().push(n),
                None => unindexed.push(n),
            }
        }
        Self {
            policies,
            identities: identities.iter().map(|i| (i.id, i)).collect(),
            fqdn: fqdn.iter().map(|(k, v)| (k.as_str(), v.iter().copied().collect())).collect(),
            by_pair,
            unindexed,
            selecting: Default::default(),
        }
    }

    pub fn policies(&self) -> &'a [Policy] {
        self.policies
    }

    /// Policies selecting `id` (only workloads can be selected), ascending.
    pub fn selecting(&self, id: Identity) -> Arc<[usize]> {
        if let Some(s) = self.cache().get(&id) {
            return s.clone();
        }
        let mut out: Vec<usize> = Vec::new();
        if let Some(info) = self.identities.get(&id).filter(|i| i.kind == IdentityKind::Workload && !id.is_reserved()) {
            let candidates =
                info.labels.iter().filter_map(|pair| self.by_pair.get(&pair)).flatten().chain(self.unindexed.iter());
            out.extend(candidates.copied().filter(|&n| self.policies[n].selector.matches(&info.labels)));
            out.sort_unstable();
            out.dedup();
        }
        let out: Arc<[usize]> = out.into();
        self.cache().insert(id, out.clone());
        out
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Arc<[usize]>>> {
        // The map is only ever extended with complete entries: a panic elsewhere
        // cannot leave it inconsistent, so a poisoned lock is still usable.
        self.selecting.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn decide(&self, c: &Connection) -> Decision {
        Decision {
            egress: self.side(c.src, Direction::Egress, c.dst, c.dst_addr, c, None),
            ingress: self.side(c.dst, Direction::Ingress, c.src, c.src_addr, c, None),
        }
    }

    /// The verdict on one HTTP request (`path` without the query string) carried by
    /// `c`. A side that allows the connection only through HTTP rules none of which
    /// match is `DefaultDeny` here.
    pub fn decide_request(&self, c: &Connection, method: &str, path: &str) -> Decision {
        let request = Some((method, path));
        Decision {
            egress: self.side(c.src, Direction::Egress, c.dst, c.dst_addr, c, request),
            ingress: self.side(c.dst, Direction::Ingress, c.src, c.src_addr, c, request),
        }
    }

    fn side(
        &self,
        local: Identity,
        dir: Direction,
        peer: Identity,
        addr: Option<IpAddr>,
        c: &Connection,
        request: Option<(&str, &str)>,
    ) -> SideVerdict {
        let selecting = self.selecting(local);
        let mut covering = Vec::new();
        for &n in selecting.iter() {
            let Some(rules) = self.policies[n].rules(dir) else { continue };
            for (r, rule) in rules.iter().enumerate() {
                if rule.allows_port(c.protocol, c.dst_port)
                    && self.peer_matches(&rule.peer, peer, addr)
                    && request.is_none_or(|(m, p)| rule.allows_request(m, p))
                {
                    return SideVerdict::Allowed { policy: n, rule: r };
                }
            }
            covering.push(n);
        }
        if covering.is_empty() { SideVerdict::NotCovered } else { SideVerdict::DefaultDeny { policies: covering } }
    }

    /// Whether `rule` of a policy allows `peer` at `addr` on the port.
    pub fn rule_allows(
        &self,
        rule: &Rule,
        peer: Identity,
        addr: Option<IpAddr>,
        protocol: Protocol,
        port: u16,
    ) -> bool {
        rule.allows_port(protocol, port) && self.peer_matches(&rule.peer, peer, addr)
    }

    /// Whether `peer` (an identity seen at `addr`) is one of the rule's peers.
    pub fn peer_matches(&self, rule_peer: &Peer, peer: Identity, addr: Option<IpAddr>) -> bool {
        let info = self.identities.get(&peer);
        let external =
            peer == Identity::WORLD || info.is_some_and(|i| matches!(i.kind, IdentityKind::CidrGroup { .. }));
        match rule_peer {
            Peer::Workloads { selector } => info
                .filter(|i| i.kind == IdentityKind::Workload && !peer.is_reserved())
                .is_some_and(|i| selector.matches(&i.labels)),
            // `world` is everything outside the cluster, CIDR groups included (as Cilium).
            Peer::Entity { entity: ReservedIdentity::World } => external,
            Peer::Entity { entity } => peer == Identity::from(*entity),
            Peer::Cidr { cidr, except } => {
                external && addr.is_some_and(|a| cidr.contains(&a) && !except.iter().any(|e| e.contains(&a)))
            }
            Peer::CidrGroup { name, cidrs } => {
                info.is_some_and(|i| matches!(i.kind, IdentityKind::CidrGroup { .. }) && &i.name == name)
                    || (external && addr.is_some_and(|a| cidrs.iter().any(|c| c.contains(&a))))
            }
            Peer::Fqdn { name, addresses } => {
                external
                    && addr.is_some_and(|a| {
                        addresses.contains(&a) || self.fqdn.get(name.as_str()).is_some_and(|s| s.contains(&a))
                    })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_model::{LabelSelector, Labels, PortRange};

    fn info(id: u32, pairs: &[(&str, &str)]) -> IdentityInfo {
        IdentityInfo::workload(Identity(id), format!("w{id}"), Labels::new(pairs.iter().copied()).expect("labels"))
    }

    fn conn(src: u32, dst: u32, port: u16) -> Connection {
        Connection {
            src: Identity(src),
            dst: Identity(dst),
            src_addr: None,
            dst_addr: None,
            dst_port: port,
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn union_of_policies_and_uncovered_directions() {
        let ids = vec![info(256, &[("app", "a")]), info(257, &[("app", "b")]), info(258, &[("app", "c")])];
        let policies = vec![Policy {
            name: "b".into(),
            namespace: None,
            selector: LabelSelector::with_labels([("app", "b")]),
            ingress: Some(vec![Rule {
                peer: Peer::Workloads { selector: LabelSelector::with_labels([("app", "a")]) },
                ports: vec![PortRange::single(Protocol::Tcp, 80)],
                http: vec![],
            }]),
            egress: None,
        }];
        let fqdn = BTreeMap::new();
        let ev = Evaluator::new(&policies, &ids, &fqdn);
        assert!(ev.decide(&conn(256, 257, 80)).allowed());
        assert!(!ev.decide(&conn(256, 257, 81)).allowed(), "port not allowed");
        let d = ev.decide(&conn(258, 257, 80));
        assert_eq!(d.ingress, SideVerdict::DefaultDeny { policies: vec![0] });
        assert_eq!(d.egress, SideVerdict::NotCovered);
        assert!(ev.decide(&conn(257, 258, 5432)).allowed(), "b's egress and c's ingress are not covered");
    }

    #[test]
    fn requests_pass_only_through_a_matching_http_rule_or_an_l4_rule() {
        use bulkhead_model::HttpRule;
        let ids = vec![
            info(256, &[("app", "deathstar")]),
            info(257, &[("app", "tiefighter")]),
            info(258, &[("app", "probe")]),
        ];
        let peer = |app: &str| Peer::Workloads { selector: LabelSelector::with_labels([("app", app)]) };
        let port = vec![PortRange::single(Protocol::Tcp, 80)];
        let policies = vec![Policy {
            name: "deathstar".into(),
            namespace: None,
            selector: LabelSelector::with_labels([("app", "deathstar")]),
            ingress: Some(vec![
                Rule {
                    http: vec![HttpRule::exact("POST", "/v1/request-landing")],
                    ..Rule::l4(peer("tiefighter"), port.clone())
                },
                Rule::l4(peer("probe"), port),
            ]),
            egress: None,
        }];
        let fqdn = BTreeMap::new();
        let ev = Evaluator::new(&policies, &ids, &fqdn);
        let tie = conn(257, 256, 80);
        let table = [
            (tie, "POST", "/v1/request-landing", true),
            (tie, "PUT", "/v1/exhaust-port", false),
            (tie, "POST", "/v1/request-landing/x", false),
            (conn(258, 256, 80), "PUT", "/v1/exhaust-port", true),
            (conn(257, 256, 81), "POST", "/v1/request-landing", false),
        ];
        for (c, m, p, want) in table {
            assert_eq!(ev.decide_request(&c, m, p).allowed(), want, "{c:?} {m} {p}");
        }
        assert!(ev.decide(&tie).allowed(), "the connection itself passes the L7 rule");
        let d = ev.decide_request(&tie, "PUT", "/v1/exhaust-port");
        assert_eq!(d.ingress, SideVerdict::DefaultDeny { policies: vec![0] });
    }

    #[test]
    fn external_peers_match_by_address() {
        let ids = vec![info(256, &[("app", "a")])];
        let mut fqdn = BTreeMap::new();
        fqdn.insert("api.example.com".to_owned(), vec!["203.0.113.7".parse().expect("ip")]);
        let ev = Evaluator::new(&[], &ids, &fqdn);
        let addr = Some("203.0.113.7".parse().expect("ip"));
        let fq = Peer::Fqdn { name: "api.example.com".into(), addresses: vec![] };
        assert!(ev.peer_matches(&fq, Identity::WORLD, addr));
        assert!(!ev.peer_matches(&fq, Identity(256), addr), "FQDN peers never match managed workloads");
        let cidr = Peer::Cidr {
            cidr: "203.0.113.0/24".parse().expect("net"),
            except: vec!["203.0.113.7/32".parse().expect("net")],
        };
        assert!(!ev.peer_matches(&cidr, Identity::WORLD, addr));
        assert!(ev.peer_matches(&Peer::Entity { entity: ReservedIdentity::World }, Identity::WORLD, addr));
        assert!(!ev.peer_matches(&Peer::Entity { entity: ReservedIdentity::Host }, Identity::WORLD, addr));
    }
}
