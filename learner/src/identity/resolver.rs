//! Who is on each end of a flow. Pure: endpoint facts from the nodes, the inventory and
//! the Kubernetes view in, a [`Subject`] out — a reserved entity or a label set — so
//! every resolution rule is unit-tested without a database or a cluster. Numbers for
//! label sets are allocated afterwards by [`super::IdentityCache`].
//!
//! Rules, most specific first:
//! * local side (the workload that reported the flow): the node's own namespace is
//!   `host` unless the inventory names the process or the flow's cgroup is a
//!   (host-network) pod's; otherwise the inventory by cgroup path, then network
//!   namespace name, then process name, then the workload's addresses — and Kubernetes
//!   by the pod UID in a cgroup path, then the workload's addresses as pod IPs; else
//!   `unmanaged`;
//! * peer: loopback is the local workload itself; an address of a known endpoint (on
//!   the reporting node first, then any node) is that endpoint; then the inventory's
//!   addresses and CIDRs and the pods' IPs; else `world`.
//!
//! Both sources may name the same thing. Then the **inventory wins**: it is explicit
//! operator configuration, while pod labels are written by whoever may create pods.
//! The disagreement is not merged silently: when the two label sets differ it is
//! recorded as a [`Conflict`] ([`Resolver::conflicts`]) and logged once. The one
//! exception is an inventory *external* CIDR group (`external:` entries, which describe
//! networks outside the managed estate): a pod known by its exact address is more
//! specific than a range and wins without a conflict.
//!
//! Conflicts are computed from state (pod addresses, nodes' endpoint facts), whenever
//! either side changes; a clash that only shows in one flow (an inventory process name
//! inside a pod) wins the same way but is not listed.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

use bulkhead_model::{EndpointFact, Flow, Labels, ReservedIdentity};
use serde::Serialize;

use super::inventory::{CIDR_GROUP_KEY, Inventory, Workload};
use super::kube::{KubePod, KubeSnapshot};

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

    /// The label set of a workload; `None` for reserved entities.
    pub fn labels(&self) -> Option<&Labels> {
        match self {
            Subject::Workload { labels, .. } => Some(labels),
            Subject::Reserved(_) => None,
        }
    }
}

/// What the inventory and Kubernetes both claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConflictKind {
    /// A pod IP that the inventory also lists (`ips:` or `cidrs:` of a workload).
    Address,
    /// A node's network namespace the inventory names (netns, cgroup, address) and
    /// that Kubernetes knows as a pod (cgroup pod UID or pod IP).
    Endpoint,
    /// A cgroup in the node's own namespace (a host-network pod) the inventory names.
    Cgroup,
}

impl fmt::Display for ConflictKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConflictKind::Address => "address",
            ConflictKind::Endpoint => "endpoint",
            ConflictKind::Cgroup => "cgroup",
        })
    }
}

/// The inventory and Kubernetes give one address or endpoint different label sets.
/// The inventory's answer is used.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Conflict {
    pub what: ConflictKind,
    /// The address, `node netns <inode> (<name>)` or the cgroup path.
    pub value: String,
    /// The inventory workload's name (the winner).
    pub inventory_workload: String,
    pub inventory_labels: Labels,
    /// The pod, `namespace/name`.
    pub kube_pod: String,
    pub kube_labels: Labels,
}

#[derive(Debug, Default, Clone)]
struct NodeEndpoints {
    by_netns: HashMap<u64, EndpointFact>,
    /// Address → (netns, whether that netns is a managed workload).
    by_addr: HashMap<IpAddr, (u64, bool)>,
}

/// Endpoint knowledge of all nodes plus the inventory and the Kubernetes view.
#[derive(Debug, Default, Clone)]
pub struct Resolver {
    inventory: Inventory,
    kube: KubeSnapshot,
    nodes: HashMap<String, NodeEndpoints>,
    /// Address → (node, netns) over all nodes, for peers on other nodes.
    ipcache: HashMap<IpAddr, (String, u64)>,
    conflicts: BTreeSet<Conflict>,
}

impl Resolver {
    pub fn new(inventory: Inventory) -> Self {
        Self { inventory, ..Default::default() }
    }

    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    /// The Kubernetes view (empty and not ready when no cluster is watched).
    pub fn kube(&self) -> &KubeSnapshot {
        &self.kube
    }

    /// Changes the Kubernetes view (applies watch events), then re-derives what depends
    /// on it: which namespace owns a reused address, and the conflicts.
    pub fn update_kube<R>(&mut self, f: impl FnOnce(&mut KubeSnapshot) -> R) -> R {
        let out = f(&mut self.kube);
        let nodes: Vec<String> = self.nodes.keys().cloned().collect();
        for node in nodes {
            self.index_node(&node);
        }
        self.rebuild_ipcache();
        self.refresh_conflicts();
        out
    }

    /// Current disagreements between the inventory and Kubernetes, sorted.
    pub fn conflicts(&self) -> impl ExactSizeIterator<Item = &Conflict> {
        self.conflicts.iter()
    }

    /// Replaces everything known about one node's endpoints.
    ///
    /// Isolated namespaces on one node may reuse an address. Then the address is
    /// ambiguous; the namespace the inventory or Kubernetes knows wins over an
    /// unmanaged one (a managed workload is what policy is about), and among equals the
    /// lowest inode, so the answer never depends on the order of the report.
    pub fn update_node(&mut self, node: &str, facts: Vec<EndpointFact>) {
        let ne =
            NodeEndpoints { by_netns: facts.into_iter().map(|f| (f.netns_ino, f)).collect(), ..Default::default() };
        self.nodes.insert(node.to_owned(), ne);
        self.index_node(node);
        self.rebuild_ipcache();
        self.refresh_conflicts();
    }

    fn index_node(&mut self, node: &str) {
        let Some(ne) = self.nodes.get(node) else { return };
        let mut facts: Vec<&EndpointFact> = ne.by_netns.values().collect();
        facts.sort_by_key(|f| f.netns_ino);
        let mut by_addr: HashMap<IpAddr, (u64, bool)> = HashMap::new();
        for f in facts {
            let managed = matches!(self.endpoint_subject(f), Subject::Workload { .. });
            for a in f.addresses.iter().filter(|a| routable(a.addr)) {
                match by_addr.get(&a.addr) {
                    Some(&(_, true)) => {}
                    Some(&(_, false)) if !managed => {}
                    _ => {
                        by_addr.insert(a.addr, (f.netns_ino, managed));
                    }
                }
            }
        }
        if let Some(ne) = self.nodes.get_mut(node) {
            ne.by_addr = by_addr;
        }
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
        choose(self.inventory_endpoint(fact, None, None), self.kube_endpoint(fact, None))
            .unwrap_or(Subject::Reserved(ReservedIdentity::Unmanaged))
    }

    /// The workload that reported `flow` on `node`.
    pub fn local_subject(&self, node: &str, flow: &Flow) -> Subject {
        let Some(fact) = self.endpoint(node, flow.netns_ino) else {
            // The namespace is not (yet) in the node's endpoint facts; the flow's own
            // address may still be in the inventory or a pod's.
            return self.by_addr(flow.local_addr()).unwrap_or(Subject::Reserved(ReservedIdentity::Unmanaged));
        };
        let inventory = self.inventory_endpoint(fact, Some(flow.cgroup_id), Some(&flow.comm));
        let kube = self.kube_endpoint(fact, Some(flow.cgroup_id));
        if fact.host {
            // Host processes can still be named by cgroup or process name, and
            // host-network pods by their cgroup.
            let inventory = inventory.filter(|_| self.has_process_match(fact, flow));
            return choose(inventory, kube).unwrap_or(Subject::Reserved(ReservedIdentity::Host));
        }
        choose(inventory, kube).unwrap_or(Subject::Reserved(ReservedIdentity::Unmanaged))
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

    /// What the inventory says about an endpoint.
    fn inventory_endpoint(&self, fact: &EndpointFact, cgroup_id: Option<u64>, comm: Option<&str>) -> Option<&Workload> {
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
        by_cgroup.or_else(by_netns).or_else(any_cgroup).or_else(by_process).or_else(by_addr)
    }

    /// What Kubernetes says about an endpoint: the pod UID in the flow's own cgroup
    /// path; for a pod's own namespace (all of whose cgroups are that pod's) any of its
    /// cgroups, then its addresses as pod IPs. In the node's namespace only the flow's
    /// cgroup counts: many pods and host services share it.
    fn kube_endpoint(&self, fact: &EndpointFact, cgroup_id: Option<u64>) -> Option<(&KubePod, &Subject)> {
        let kube = &self.kube;
        let own = cgroup_id
            .filter(|id| *id != 0)
            .and_then(|id| fact.cgroups.iter().find(|c| c.cgroup_id == id))
            .and_then(|c| kube.subject_by_cgroup(&c.path));
        if fact.host {
            return own;
        }
        own.or_else(|| fact.cgroups.iter().find_map(|c| kube.subject_by_cgroup(&c.path)))
            .or_else(|| fact.addresses.iter().filter(|a| routable(a.addr)).find_map(|a| kube.subject_by_ip(a.addr)))
    }

    fn by_addr(&self, ip: IpAddr) -> Option<Subject> {
        choose(self.inventory.by_addr(ip), self.kube.subject_by_ip(ip))
    }

    /// Recomputes [`Self::conflicts`] and logs each new one once.
    fn refresh_conflicts(&mut self) {
        let mut found = BTreeSet::new();
        let mut record = |what, value: String, w: &Workload, (pod, subject): (&KubePod, &Subject)| {
            let Some(kube_labels) = subject.labels() else { return };
            if is_external_group(w) || w.labels == *kube_labels {
                return;
            }
            found.insert(Conflict {
                what,
                value,
                inventory_workload: w.name.clone(),
                inventory_labels: w.labels.clone(),
                kube_pod: pod.key.to_string(),
                kube_labels: kube_labels.clone(),
            });
        };
        if self.kube.is_ready() {
            for (ip, _) in self.kube.pod_addresses() {
                if let (Some(w), Some(k)) = (self.inventory.by_addr(ip), self.kube.subject_by_ip(ip)) {
                    record(ConflictKind::Address, ip.to_string(), w, k);
                }
            }
            for (node, ne) in &self.nodes {
                for fact in ne.by_netns.values() {
                    if fact.host {
                        for c in &fact.cgroups {
                            if let (Some(w), Some(k)) =
                                (self.inventory.by_cgroup(&c.path), self.kube.subject_by_cgroup(&c.path))
                            {
                                record(ConflictKind::Cgroup, format!("{node} {}", c.path), w, k);
                            }
                        }
                        continue;
                    }
                    if let (Some(w), Some(k)) =
                        (self.inventory_endpoint(fact, None, None), self.kube_endpoint(fact, None))
                    {
                        let name = fact.netns_name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
                        record(ConflictKind::Endpoint, format!("{node} netns {}{name}", fact.netns_ino), w, k);
                    }
                }
            }
        }
        for c in found.difference(&self.conflicts) {
            tracing::warn!(
                what = %c.what,
                value = %c.value,
                inventory_workload = %c.inventory_workload,
                inventory_labels = %c.inventory_labels,
                kube_pod = %c.kube_pod,
                kube_labels = %c.kube_labels,
                "The inventory and Kubernetes disagree; using the inventory's labels."
            );
        }
        for c in self.conflicts.difference(&found) {
            tracing::info!(what = %c.what, value = %c.value, "Inventory/Kubernetes conflict resolved.");
        }
        self.conflicts = found;
    }
}

/// An `external:` CIDR group of the inventory (a network outside the managed estate).
fn is_external_group(w: &Workload) -> bool {
    w.labels.get(CIDR_GROUP_KEY).is_some()
}

fn workload_subject(w: &Workload) -> Subject {
    Subject::Workload { name: w.name.clone(), labels: w.labels.clone() }
}

/// Picks the answer when the inventory and Kubernetes may both name something (module
/// docs): the inventory, unless its answer is an external CIDR group and a pod is known.
fn choose(inventory: Option<&Workload>, kube: Option<(&KubePod, &Subject)>) -> Option<Subject> {
    match (inventory, kube) {
        (Some(w), Some((_, pod))) if is_external_group(w) => Some(pod.clone()),
        (Some(w), _) => Some(workload_subject(w)),
        (None, Some((_, pod))) => Some(pod.clone()),
        (None, None) => None,
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
