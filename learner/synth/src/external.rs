//! Peers outside every known endpoint: DNS names where the workload resolved them,
//! CIDRs where several addresses share a prefix, single addresses otherwise.
//!
//! Why names first: external services move between addresses (CDNs, cloud load
//! balancers); a /32 learned last week is stale next week, while the name the
//! workload asked for is what it actually depends on.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use bulkhead_model::{Identity, Peer, Rule};
use ipnet::IpNet;

use crate::evidence::Agg;
use crate::input::{CidrOptions, DnsObservation};
use crate::peers::{GroupedRule, PeerPorts};

/// DNS answers indexed for naming addresses.
#[derive(Debug, Default)]
pub struct DnsIndex<'a> {
    by_addr: BTreeMap<IpAddr, Vec<&'a DnsObservation>>,
    by_name: BTreeMap<&'a str, Vec<&'a DnsObservation>>,
    grace_ms: i64,
}

impl<'a> DnsIndex<'a> {
    pub fn new(dns: &'a [DnsObservation], grace_ms: i64) -> Self {
        let mut idx = DnsIndex { grace_ms, ..Default::default() };
        for d in dns {
            idx.by_addr.entry(d.addr).or_default().push(d);
            idx.by_name.entry(d.name.as_str()).or_default().push(d);
        }
        idx
    }

    /// The name `client` had resolved `addr` from while it talked to it (answer seen
    /// before the traffic ended and still valid, TTL plus grace, when it started).
    /// Several candidates: the most recently seen, then the smallest name.
    pub fn name_for(&self, client: Identity, addr: IpAddr, first: i64, last: i64) -> Option<&'a str> {
        self.by_addr
            .get(&addr)?
            .iter()
            .filter(|d| d.client.is_none_or(|c| c == client))
            .filter(|d| d.first_seen_unix_ms <= last && first <= d.valid_until(self.grace_ms))
            .max_by(|a, b| a.last_seen_unix_ms.cmp(&b.last_seen_unix_ms).then_with(|| b.name.cmp(&a.name)))
            .map(|d| d.name.as_str())
    }

    /// Addresses `name` resolves to for `client`: those of answers still valid (TTL plus
    /// grace) when the newest answer for the name arrived, up to `now`. Addresses a
    /// newer answer replaced are aged out; a name that is merely quiet keeps its last
    /// answer rather than becoming empty.
    pub fn current_addresses(&self, client: Identity, name: &str, now: i64) -> Vec<IpAddr> {
        let answers: Vec<&DnsObservation> = self
            .by_name
            .get(name)
            .into_iter()
            .flatten()
            .copied()
            .filter(|d| d.client.is_none_or(|c| c == client) && d.first_seen_unix_ms <= now)
            .collect();
        let Some(newest) = answers.iter().map(|d| d.last_seen_unix_ms.min(now)).max() else { return Vec::new() };
        let set: BTreeSet<IpAddr> =
            answers.iter().filter(|d| d.valid_until(self.grace_ms) >= newest).map(|d| d.addr).collect();
        set.into_iter().collect()
    }
}

/// Rules for one target's external addresses in one direction. `names` maps the
/// addresses that came from DNS to their name.
pub fn external_rules(
    addrs: &BTreeMap<IpAddr, PeerPorts>,
    names: &BTreeMap<IpAddr, &str>,
    current: impl Fn(&str) -> Vec<IpAddr>,
    cidr: &CidrOptions,
) -> Vec<GroupedRule> {
    let mut out = Vec::new();
    let mut by_name: BTreeMap<&str, Vec<IpAddr>> = BTreeMap::new();
    let mut by_prefix: BTreeMap<IpNet, Vec<IpAddr>> = BTreeMap::new();
    for addr in addrs.keys() {
        match names.get(addr) {
            Some(name) => by_name.entry(name).or_default().push(*addr),
            None => by_prefix.entry(prefix(*addr, cidr)).or_default().push(*addr),
        }
    }
    for (name, members) in by_name {
        out.push(group(Peer::Fqdn { name: name.to_owned(), addresses: current(name) }, &members, addrs));
    }
    let min = cidr.min_addresses.max(2);
    for (net, members) in by_prefix {
        if members.len() >= min {
            out.push(group(Peer::Cidr { cidr: net, except: Vec::new() }, &members, addrs));
        } else {
            for a in members {
                out.push(group(Peer::Cidr { cidr: IpNet::from(a), except: Vec::new() }, &[a], addrs));
            }
        }
    }
    out
}

fn group(peer: Peer, members: &[IpAddr], addrs: &BTreeMap<IpAddr, PeerPorts>) -> GroupedRule {
    let mut agg = Agg::default();
    let mut ports = BTreeSet::new();
    for a in members {
        for (p, e) in &addrs[a] {
            ports.insert(*p);
            agg.merge(e);
        }
        agg.addresses.push(*a);
    }
    GroupedRule { rule: Rule::l4(peer, ports.into_iter().collect()), agg }
}

fn prefix(addr: IpAddr, cidr: &CidrOptions) -> IpNet {
    let len = match addr {
        IpAddr::V4(_) => cidr.prefix_v4.min(32),
        IpAddr::V6(_) => cidr.prefix_v6.min(128),
    };
    // In range by construction (clamped above), so this cannot fail; fall back to the
    // host route rather than panic if it ever did.
    IpNet::new(addr, len).map(|n| n.trunc()).unwrap_or_else(|_| IpNet::from(addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_model::{PortRange, Protocol};

    fn ports(port: u16) -> PeerPorts {
        let mut agg = Agg::default();
        agg.add(1, 10, 100, 200);
        BTreeMap::from([(PortRange::single(Protocol::Tcp, port), agg)])
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn aggregates_only_shared_prefixes() {
        let mut addrs = BTreeMap::new();
        for a in ["198.51.100.1", "198.51.100.2", "198.51.100.3", "203.0.113.9", "2001:db8::1"] {
            addrs.insert(ip(a), ports(443));
        }
        let rules = external_rules(&addrs, &BTreeMap::new(), |_| vec![], &CidrOptions::default());
        let peers: Vec<String> = rules.iter().map(|r| r.rule.peer.to_string()).collect();
        assert_eq!(peers, ["cidr 198.51.100.0/24", "cidr 203.0.113.9/32", "cidr 2001:db8::1/128"]);
        assert_eq!(rules[0].agg.addresses.len(), 3);
    }

    #[test]
    fn dns_names_are_ttl_aware() {
        let obs = |name: &str, addr: &str, seen: i64| DnsObservation {
            client: Some(Identity(256)),
            name: name.into(),
            addr: ip(addr),
            ttl_seconds: 60,
            first_seen_unix_ms: seen,
            last_seen_unix_ms: seen,
        };
        let dns = vec![obs("api.example.com", "192.0.2.1", 0), obs("api.example.com", "192.0.2.2", 1_000_000)];
        let idx = DnsIndex::new(&dns, 0);
        assert_eq!(idx.name_for(Identity(256), ip("192.0.2.1"), 10_000, 20_000), Some("api.example.com"));
        // Traffic long after the answer expired is not attributed to the name.
        assert_eq!(idx.name_for(Identity(256), ip("192.0.2.1"), 500_000, 600_000), None);
        // Another client's answers do not name our traffic.
        assert_eq!(idx.name_for(Identity(300), ip("192.0.2.1"), 10_000, 20_000), None);
        // The stale address is aged out of the current set.
        assert_eq!(idx.current_addresses(Identity(256), "api.example.com", 1_030_000), vec![ip("192.0.2.2")]);
    }
}
