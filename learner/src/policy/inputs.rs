//! Store rows → synthesis input. Owned (synthesis runs on a blocking thread).

use std::collections::{BTreeMap, HashMap};

use bulkhead_model::{Identity, Labels, Window};
use bulkhead_synth::{ActivePolicy, DnsObservation, ExternalObservation, IdentityInfo, IdentityKind, Input};

use crate::identity::inventory::{CIDR_GROUP_KEY, Inventory};
use crate::store::{EdgeQuery, Store, StoreError};

/// Label marking a Kubernetes pod's identity (its service account, Cilium's key).
pub const SERVICE_ACCOUNT_KEY: &str = "io.cilium.k8s.policy.serviceaccount";

/// Everything synthesis reads, owned.
#[derive(Debug, Default)]
pub struct Inputs {
    pub identities: Vec<IdentityInfo>,
    pub edges: Vec<bulkhead_model::Edge>,
    pub external: Vec<ExternalObservation>,
    pub dns: Vec<DnsObservation>,
    pub active: Vec<ActivePolicy>,
    pub http: Vec<bulkhead_model::EdgeHttp>,
}

impl Inputs {
    pub fn as_input(&self) -> Input<'_> {
        Input {
            identities: &self.identities,
            edges: &self.edges,
            external: &self.external,
            dns: &self.dns,
            active: &self.active,
            http: &self.http,
        }
    }
}

/// Reads the service graph and the policy set. Edges are read whole (they are the
/// long-term memory convergence and drift look at); flows-derived inputs only for the
/// window.
pub async fn gather(
    store: &Store,
    inventory: &Inventory,
    service_backends: &std::collections::HashSet<Labels>,
    window: Window,
) -> Result<Inputs, StoreError> {
    let endpoints = store.endpoints().await?;
    let identities = identity_infos(store, inventory, service_backends, &endpoints).await?;
    let edges = store.edges(&EdgeQuery::default()).await?.into_iter().map(|r| r.edge).collect();
    let external = store
        .external_peers(window.from_unix_ms, window.to_unix_ms)
        .await?
        .into_iter()
        .map(|r| ExternalObservation {
            local: r.local,
            direction: r.direction,
            addr: r.addr,
            port: r.dst_port,
            protocol: r.protocol,
            connections: r.connections,
            bytes: r.bytes,
            first_seen_unix_ms: r.first_seen_unix_ms,
            last_seen_unix_ms: r.last_seen_unix_ms,
        })
        .collect();
    // DNS answers are captured per network namespace; the namespace's endpoint says
    // which identity asked. An inode two nodes disagree on names nobody.
    let mut by_netns: HashMap<u64, Option<Identity>> = HashMap::new();
    for e in &endpoints {
        by_netns
            .entry(e.fact.netns_ino)
            .and_modify(|id| {
                if *id != Some(e.identity) {
                    *id = None;
                }
            })
            .or_insert(Some(e.identity));
    }
    let dns = store
        .dns_answers(window.from_unix_ms)
        .await?
        .into_iter()
        .map(|a| DnsObservation {
            client: by_netns.get(&a.netns_ino).copied().flatten(),
            name: a.name,
            addr: a.addr,
            ttl_seconds: a.ttl_seconds,
            first_seen_unix_ms: a.seen_unix_ms,
            last_seen_unix_ms: a.seen_unix_ms,
        })
        .collect();
    // Per target the newest intent: an approved version over the deployed one.
    let mut active: BTreeMap<Identity, (u32, bulkhead_model::Policy)> = BTreeMap::new();
    for a in store.active_policies().await? {
        let slot = active.entry(a.target).or_insert((a.version, a.policy.clone()));
        if a.version > slot.0 {
            *slot = (a.version, a.policy);
        }
    }
    let active = active.into_iter().map(|(target, (_, policy))| ActivePolicy { target, policy }).collect();
    // L7: the (method, path) pairs seen in the window, and each edge's opaque / overflow
    // counts with when they were last seen (synthesis applies the window to those).
    let http = store.edge_http(window.from_unix_ms).await?;
    Ok(Inputs { identities, edges, external, dns, active, http })
}

/// Allocated identities with a human name and what kind of thing they are.
async fn identity_infos(
    store: &Store,
    inventory: &Inventory,
    service_backends: &std::collections::HashSet<Labels>,
    endpoints: &[crate::store::EndpointRow],
) -> Result<Vec<IdentityInfo>, StoreError> {
    let mut names: HashMap<Identity, &str> = HashMap::new();
    for e in endpoints {
        if let Some(w) = &e.workload {
            names.entry(e.identity).or_insert(w.as_str());
        }
    }
    let by_labels: HashMap<&Labels, &str> =
        inventory.workloads().iter().map(|w| (&w.labels, w.name.as_str())).collect();
    let mut out = Vec::new();
    for row in store.identities().await? {
        if row.id.is_reserved() {
            continue;
        }
        let name = names
            .get(&row.id)
            .copied()
            .or_else(|| by_labels.get(&row.labels).copied())
            .map(str::to_owned)
            .unwrap_or_else(|| fallback_name(row.id, &row.labels));
        let kind = match row.labels.get(CIDR_GROUP_KEY) {
            Some(group) => IdentityKind::CidrGroup { cidrs: inventory.cidrs_of(group) },
            None => IdentityKind::Workload,
        };
        let kubernetes = row.labels.get(SERVICE_ACCOUNT_KEY).is_some();
        let service_backend = service_backends.contains(&row.labels);
        out.push(IdentityInfo { id: row.id, name, labels: row.labels, kind, kubernetes, service_backend });
    }
    Ok(out)
}

/// A name from the labels people usually name things by, else the number.
fn fallback_name(id: Identity, labels: &Labels) -> String {
    labels.workload_name().unwrap_or_else(|| format!("identity-{}", id.0))
}
