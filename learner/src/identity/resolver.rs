//! Who is on each end of a flow. Pure: endpoint facts from the nodes plus the
//! inventory in, a [`Subject`] out — a reserved entity or a label set — so every
//! resolution rule is unit-tested without a database. Numbers for label sets are
//! allocated afterwards by [`super::IdentityCache`].
//!
//! Rules, most specific first:
//! * local side (the workload that reported the flow): the node's own namespace is
//!   `host`; otherwise the inventory by cgroup path, then network namespace name,
//!   then process name, then the workload's addresses; else `unmanaged`;
//! * peer: loopback is the local workload itself; an address of a known endpoint
//!   (on the reporting node first, then any node) is that endpoint; then the
//!   inventory's addresses and CIDRs; else `world`.

use std::collections::HashMap;
use std::net::IpAddr;

use bulkhead_model::{EndpointFact, Flow, Labels, ReservedIdentity};

use super::inventory::Inventory;

/// What an address or workload resolved to, before it has a number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    Reserved(ReservedIdentity),
    Workload { name: String, labels: Labels },
}

impl Subject {
    pub fn workload_name(&self) -> Option<&str> {
        match self {
            Subject::Workload { name, .. } => Some(name),
            Subject::Reserved(_) => None,
        }
    }
}

#[derive(Debug, Default, Clone)]
struct NodeEndpoints {
    by_netns: HashMap<u64, EndpointFact>,
    /// Address → (netns, whether that netns is a managed workload).
    by_addr: HashMap<IpAddr, (u64, bool)>,
}

/// Endpoint knowledge of all nodes plus the inventory.
#[derive(Debug, Default, Clone)]
pub struct Resolver {
    inventory: Inventory,
    nodes: HashMap<String, NodeEndpoints>,
    /// Address → (node, netns) over all nodes, for peers on other nodes.
    ipcache: HashMap<IpAddr, (String, u64)>,
}

impl Resolver {
    pub fn new(inventory: Inventory) -> Self {
        Self { inventory, ..Default::default() }
    }

    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    /// Replaces everything known about one node's endpoints.
    ///
    /// Isolated namespaces on one node may reuse an address. Then the address is
    /// ambiguous; the namespace the inventory knows wins over an unmanaged one (a
    /// managed workload is what policy is about), and among equals the lowest inode, so
    /// the answer never depends on the order of the report.
    pub fn update_node(&mut self, node: &str, facts: Vec<EndpointFact>) {
        let mut ne = NodeEndpoints::default();
        let mut facts = facts;
        facts.sort_by_key(|f| f.netns_ino);
        for f in &facts {
            let managed = matches!(self.endpoint_subject(f), Subject::Workload { .. });
            for a in f.addresses.iter().filter(|a| routable(a.addr)) {
                match ne.by_addr.get(&a.addr) {
                    Some(&(_, true)) => {}
                    Some(&(_, false)) if !managed => {}
                    _ => {
                        ne.by_addr.insert(a.addr, (f.netns_ino, managed));
                    }
                }
            }
        }
        ne.by_netns = facts.into_iter().map(|f| (f.netns_ino, f)).collect();
        self.nodes.insert(node.to_owned(), ne);
        self.rebuild_ipcache();
    }

    fn rebuild_ipcache(&mut self) {
        self.ipcache.clear();
        let mut nodes: Vec<_> = self.nodes.iter().collect();
        // Deterministic winner when two nodes claim one address.
        nodes.sort_by(|a, b| a.0.cmp(b.0));
        for (node, ne) in nodes {
            for (addr, (ino, _)) in &ne.by_addr {
                self.ipcache.entry(*addr).or_insert_with(|| (node.clone(), *ino));
            }
        }
    }

    pub fn endpoint(&self, node: &str, netns_ino: u64) -> Option<&EndpointFact> {
        self.nodes.get(node)?.by_netns.get(&netns_ino)
    }

    /// The subject of one endpoint as a whole (no process detail).
    pub fn endpoint_subject(&self, fact: &EndpointFact) -> Subject {
        if fact.host {
            return Subject::Reserved(ReservedIdentity::Host);
        }
        self.endpoint_workload(fact, None, None).unwrap_or(Subject::Reserved(ReservedIdentity::Unmanaged))
    }

    /// The workload that reported `flow` on `node`.
    pub fn local_subject(&self, node: &str, flow: &Flow) -> Subject {
        let Some(fact) = self.endpoint(node, flow.netns_ino) else {
            // The namespace is not (yet) in the node's endpoint facts; the flow's own
            // address may still be in the inventory.
            return self.by_addr(flow.local_addr()).unwrap_or(Subject::Reserved(ReservedIdentity::Unmanaged));
        };
        if fact.host {
            // Host processes can still be named by cgroup or process name.
            return self
                .endpoint_workload(fact, Some(flow.cgroup_id), Some(&flow.comm))
                .filter(|_| self.has_process_match(fact, flow))
                .unwrap_or(Subject::Reserved(ReservedIdentity::Host));
        }
        self.endpoint_workload(fact, Some(flow.cgroup_id), Some(&flow.comm))
            .unwrap_or(Subject::Reserved(ReservedIdentity::Unmanaged))
    }

    /// The other side of `flow` as seen from `node`.
    pub fn peer_subject(&self, node: &str, flow: &Flow) -> Subject {
        let peer = flow.peer_addr();
        if peer.is_loopback() {
            return self.local_subject(node, flow);
        }
        let local_node = self.nodes.get(node);
        let hit = local_node
            .and_then(|ne| ne.by_addr.get(&peer).map(|(ino, _)| (node, *ino)))
            .or_else(|| self.ipcache.get(&peer).map(|(n, ino)| (n.as_str(), *ino)));
        if let Some((peer_node, fact)) = hit.and_then(|(n, ino)| Some((n, self.endpoint(n, ino)?))) {
            if fact.host {
                let r = if peer_node == node { ReservedIdentity::Host } else { ReservedIdentity::RemoteNode };
                return Subject::Reserved(r);
            }
            return self.endpoint_subject(fact);
        }
        self.by_addr(peer).unwrap_or(Subject::Reserved(ReservedIdentity::World))
    }

    fn has_process_match(&self, fact: &EndpointFact, flow: &Flow) -> bool {
        let inv = &self.inventory;
        fact.cgroups.iter().any(|c| c.cgroup_id == flow.cgroup_id && inv.by_cgroup(&c.path).is_some())
            || inv.by_process(&flow.comm).is_some()
    }

    fn endpoint_workload(&self, fact: &EndpointFact, cgroup_id: Option<u64>, comm: Option<&str>) -> Option<Subject> {
        let inv = &self.inventory;
        let by_cgroup = cgroup_id
            .and_then(|id| fact.cgroups.iter().find(|c| c.cgroup_id == id && id != 0))
            .and_then(|c| inv.by_cgroup(&c.path));
        let by_netns = || fact.netns_name.as_deref().and_then(|n| inv.by_netns(n));
        // Without a specific process (accept side, whole endpoint): any cgroup of the
        // namespace that the inventory names.
        let any_cgroup = || {
            if cgroup_id.is_some() {
                return None;
            }
            fact.cgroups.iter().find_map(|c| inv.by_cgroup(&c.path))
        };
        let by_process = || comm.filter(|c| !c.is_empty()).and_then(|c| inv.by_process(c));
        let by_addr = || fact.addresses.iter().filter(|a| routable(a.addr)).find_map(|a| inv.by_addr(a.addr));
        by_cgroup
            .or_else(by_netns)
            .or_else(any_cgroup)
            .or_else(by_process)
            .or_else(by_addr)
            .map(|w| Subject::Workload { name: w.name.clone(), labels: w.labels.clone() })
    }

    fn by_addr(&self, ip: IpAddr) -> Option<Subject> {
        self.inventory.by_addr(ip).map(|w| Subject::Workload { name: w.name.clone(), labels: w.labels.clone() })
    }
}

/// Loopback and link-local addresses exist in every namespace; they identify nobody.
fn routable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local() && !v6.is_unspecified(),
    }
}

#[cfg(test)]
mod tests;
