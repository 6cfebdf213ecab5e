//! The learner's side of `PolicyStream`: one `tokio::sync::watch` per node holding the
//! node's current snapshot, fed by [`Distributor::publish`] (after every recompile);
//! each enforcer connection watches its node's channel, so a new snapshot goes out as
//! soon as the node's compiled policy changes — and only then (content is compared,
//! not versions). Acks and report summaries are kept in memory ([`NodeStatus`]);
//! storing them is the store's job (not wired here yet).
//!
//! Deltas: after the first snapshot of a stream, a change travels as a
//! [`NodePolicyDelta`] from the last version sent when the enforcer acked that one
//! as applied (and the delta is smaller than the snapshot); otherwise as a snapshot.
//! An enforcer that cannot apply a delta reconnects, and every stream starts with a
//! snapshot, so a delta never needs to be right about more than one stream.
//!
//! Versions: every change of a node's content gets a version above the node's previous
//! one and at least the caller's (a Unix-ms clock, so versions keep growing across
//! learner restarts). An enforcer whose Hello names a higher applied version (the
//! learner's clock went back) gets the snapshot re-stamped above it: an enforcer never
//! has to accept an older version. On Hello the current snapshot is always sent; one
//! with the version the enforcer already applied is acked without re-applying.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use bulkhead_model::{
    EnforcerHello, EnforcerMessage, Identity, NodePolicy, NodePolicyDelta, PolicyAck, PolicyAckStatus, PolicyUpdate,
    RolloutMode, RuleRef, VerdictReport,
};
use bulkhead_proto::v1::{self, policy_stream_server::PolicyStream};
use bulkhead_synth::{IdentityInfo, IdentityKind};
use futures::StreamExt as _;
use ipnet::IpNet;
use serde::Serialize;
use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status, Streaming};

use super::compile::{CompileError, CompileInput, SourcePolicy, compile};
use crate::grpc::clock::{SkewEstimator, corrected};
use crate::identity::Resolver;
use crate::identity::inventory::{CIDR_GROUP_KEY, Inventory};
use crate::metrics::{Metrics, StoreUser};
use crate::store::{EndpointRow, Store, StoreError};

/// How long after its TTL a DNS answer still names an FQDN peer's address (as
/// synthesis' default `dns_grace_ms`).
pub const DNS_GRACE_MS: i64 = 5 * 60 * 1000;

/// Why a recompile failed; the previous snapshots stay published.
#[derive(Debug, thiserror::Error)]
pub enum DistributeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("compile task failed: {reason}")]
    Task { reason: String },
}

/// What the learner knows about one node's enforcer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    /// Version of the node's current snapshot.
    pub published_version: u64,
    /// An enforcer stream is open.
    pub connected: bool,
    pub boot_id: Option<String>,
    pub agent_version: Option<String>,
    /// The version the enforcer last said it enforces (Hello or an applied ack).
    pub applied_version: Option<u64>,
    /// Its last ack.
    pub last_ack: Option<PolicyAck>,
    /// Verdict reports and events received since the learner started.
    pub reports: u64,
    pub events: u64,
}

/// How many published versions per node stay resolvable ([`Distributor::rule_ref`]):
/// reports name rule ids of the version the enforcer ran, which may lag a few behind.
pub const VERSION_HISTORY: usize = 16;

#[derive(Debug)]
struct NodeChannel {
    tx: watch::Sender<Arc<NodePolicy>>,
    status: NodeStatus,
    /// Recently published snapshots by version (the current one included).
    history: BTreeMap<u64, Arc<NodePolicy>>,
}

impl NodeChannel {
    fn new(policy: NodePolicy) -> Self {
        let policy = Arc::new(policy);
        let status = NodeStatus { published_version: policy.version, ..NodeStatus::default() };
        let history = BTreeMap::from([(policy.version, policy.clone())]);
        Self { tx: watch::channel(policy).0, status, history }
    }

    /// Makes `policy` current: remembered, sent to every connection of the node.
    fn send(&mut self, policy: NodePolicy) {
        let policy = Arc::new(policy);
        self.status.published_version = policy.version;
        self.history.insert(policy.version, policy.clone());
        while self.history.len() > VERSION_HISTORY {
            self.history.pop_first();
        }
        self.tx.send_replace(policy);
    }
}

#[derive(Debug, Default)]
struct State {
    nodes: BTreeMap<String, NodeChannel>,
    /// A compilation has been published since this process started. Before it, the
    /// learner does not know what any node should enforce, and an enforcer that
    /// connects (typically right after a learner restart) is sent nothing: it keeps
    /// the policy it holds. An empty policy here would unmanage every workload of
    /// the node until the compilation arrived.
    compiled: bool,
}

/// The version of a node's placeholder snapshot: "nothing known yet", never sent.
const UNKNOWN_VERSION: u64 = 0;

/// Per-node snapshots and enforcer state. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Distributor {
    state: Arc<Mutex<State>>,
    /// Compilations, enforcer streams and what recording them does (the process's
    /// metrics; a fresh set unless given by [`Distributor::with_metrics`]).
    metrics: Arc<Metrics>,
}

/// How many connected enforcers run the policy they should ([`Distributor::sync_summary`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncSummary {
    /// Nodes with an enforcer stream open.
    pub connected: usize,
    /// Of those, the ones whose applied version is not their current snapshot's.
    pub out_of_sync: usize,
}

impl Distributor {
    pub fn new() -> Self {
        Self::default()
    }

    /// A distributor that counts into `metrics`.
    pub fn with_metrics(metrics: Arc<Metrics>) -> Self {
        Self { metrics, ..Self::default() }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Writers replace whole values; a poisoned lock still holds a consistent view.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes a compilation: nodes whose content changed get a new version; nodes
    /// that had a policy and are no longer compiled get an empty one (detach). Returns
    /// the nodes that changed.
    pub fn publish(&self, compiled: BTreeMap<String, NodePolicy>) -> Vec<String> {
        let mut state = self.lock();
        let floor = compiled.values().map(|p| p.version).max().unwrap_or(1).max(1);
        let mut compiled = compiled;
        for node in state.nodes.keys() {
            compiled.entry(node.clone()).or_insert_with(|| NodePolicy { version: floor, ..NodePolicy::default() });
        }
        state.compiled = true;
        let mut changed = Vec::new();
        for (node, mut policy) in compiled {
            match state.nodes.get_mut(&node) {
                Some(ch) => {
                    let current = ch.tx.borrow().clone();
                    // A placeholder is always replaced: its node is waiting for this.
                    if current.version != UNKNOWN_VERSION && current.content_eq(&policy) {
                        continue;
                    }
                    // Above what the node enforces too: its versions may come from before a
                    // restart whose clock went back (a placeholder has none of its own).
                    let applied = ch.status.applied_version.unwrap_or(0);
                    policy.version = policy.version.max(current.version.max(applied).saturating_add(1));
                    ch.send(policy);
                }
                None => {
                    policy.version = policy.version.max(1);
                    state.nodes.insert(node.clone(), NodeChannel::new(policy));
                }
            }
            tracing::debug!(node = %node, "Published a node policy.");
            changed.push(node);
        }
        changed
    }

    /// The node's current snapshot.
    pub fn current(&self, node: &str) -> Option<Arc<NodePolicy>> {
        self.lock().nodes.get(node).map(|ch| ch.tx.borrow().clone())
    }

    /// What rule `rule_id` of the node's snapshot `version` stands for (verdict events
    /// and hit counters name rule ids); `None` when unknown or too old.
    pub fn rule_ref(&self, node: &str, version: u64, rule_id: u32) -> Option<RuleRef> {
        let state = self.lock();
        let policy = state.nodes.get(node)?.history.get(&version)?;
        let i = policy.rule_refs.binary_search_by_key(&rule_id, |r| r.rule_id).ok()?;
        policy.rule_refs.get(i).cloned()
    }

    /// The node's snapshot `version`, while it is among the recent ones.
    pub fn snapshot(&self, node: &str, version: u64) -> Option<Arc<NodePolicy>> {
        self.lock().nodes.get(node)?.history.get(&version).cloned()
    }

    /// Connected enforcers and how many of them are behind (or refused) their node's
    /// snapshot; nodes nothing is known for yet (before the first compilation) count
    /// as in sync. Cheap: no status is cloned.
    pub fn sync_summary(&self) -> SyncSummary {
        let state = self.lock();
        let mut summary = SyncSummary::default();
        for ch in state.nodes.values().filter(|ch| ch.status.connected) {
            summary.connected += 1;
            let desired = ch.status.published_version;
            if desired != UNKNOWN_VERSION && ch.status.applied_version != Some(desired) {
                summary.out_of_sync += 1;
            }
        }
        summary
    }

    /// Every node's enforcer state, by node.
    pub fn status(&self) -> BTreeMap<String, NodeStatus> {
        self.lock().nodes.iter().map(|(n, ch)| (n.clone(), ch.status.clone())).collect()
    }

    /// Registers an enforcer connection and returns its node's channel. A node nothing
    /// was compiled for gets an empty policy — once a compilation has run; before that,
    /// a placeholder the stream does not send (see `State::compiled`).
    fn connect(&self, hello: &EnforcerHello) -> watch::Receiver<Arc<NodePolicy>> {
        let mut state = self.lock();
        let first = if state.compiled { 1 } else { UNKNOWN_VERSION };
        let ch = state
            .nodes
            .entry(hello.node_id.clone())
            .or_insert_with(|| NodeChannel::new(NodePolicy { version: first, ..NodePolicy::default() }));
        let current = ch.tx.borrow().clone();
        if current.version != UNKNOWN_VERSION && hello.applied_version > current.version {
            // Our versions are behind the enforcer's (clock went back, or the node was
            // served by another learner): re-stamp so the snapshot is not refused.
            ch.send(NodePolicy { version: hello.applied_version.saturating_add(1), ..(*current).clone() });
        }
        ch.status.connected = true;
        ch.status.boot_id = Some(hello.boot_id.clone());
        ch.status.agent_version = Some(hello.agent_version.clone());
        ch.status.applied_version = (hello.applied_version != 0).then_some(hello.applied_version);
        ch.tx.subscribe()
    }

    fn update(&self, node: &str, f: impl FnOnce(&mut NodeStatus)) {
        if let Some(ch) = self.lock().nodes.get_mut(node) {
            f(&mut ch.status);
        }
    }

    /// Gathers the compile inputs from the store, compiles off the async runtime and
    /// publishes. `now_ms` stamps versions and decides which DNS answers still count.
    pub async fn recompile(
        &self,
        store: &Store,
        inventory: &Inventory,
        resolver: Option<&RwLock<Resolver>>,
        now_ms: i64,
    ) -> Result<Vec<String>, DistributeError> {
        let started = std::time::Instant::now();
        let result = self.recompile_inner(store, inventory, resolver, now_ms).await;
        if matches!(result, Err(DistributeError::Store(_))) {
            self.metrics.store_error(StoreUser::PolicyCompile);
        }
        self.metrics.compiled(result.is_ok(), started.elapsed());
        result
    }

    async fn recompile_inner(
        &self,
        store: &Store,
        inventory: &Inventory,
        resolver: Option<&RwLock<Resolver>>,
        now_ms: i64,
    ) -> Result<Vec<String>, DistributeError> {
        let inputs = gather(store, inventory, resolver, now_ms).await?;
        let compiled = tokio::task::spawn_blocking(move || compile(&inputs.as_input()))
            .await
            .map_err(|e| DistributeError::Task { reason: e.to_string() })??;
        let changed = self.publish(compiled);
        tracing::info!(changed = changed.len(), "Recompiled node policies.");
        Ok(changed)
    }
}

/// Compile inputs, owned (compilation runs on a blocking thread).
#[derive(Debug, Default)]
pub struct Inputs {
    pub version: u64,
    pub policies: Vec<SourcePolicy>,
    pub identities: Vec<IdentityInfo>,
    pub modes: BTreeMap<Identity, RolloutMode>,
    pub endpoints: Vec<EndpointRow>,
    pub prefixes: Vec<(IpNet, Identity)>,
    pub fqdn: BTreeMap<String, Vec<IpAddr>>,
}

impl Inputs {
    pub fn as_input(&self) -> CompileInput<'_> {
        CompileInput {
            version: self.version,
            policies: &self.policies,
            identities: &self.identities,
            modes: &self.modes,
            endpoints: &self.endpoints,
            prefixes: &self.prefixes,
            fqdn: &self.fqdn,
        }
    }
}

/// Reads what compilation needs: the active policy set (per target the newest intent,
/// approved over deployed, as synthesis and export read it), identities, modes,
/// endpoints, the inventory's CIDRs and pod IPs, and DNS answers still valid.
pub async fn gather(
    store: &Store,
    inventory: &Inventory,
    resolver: Option<&RwLock<Resolver>>,
    now_ms: i64,
) -> Result<Inputs, StoreError> {
    let mut newest: BTreeMap<Identity, (u32, SourcePolicy)> = BTreeMap::new();
    for a in store.active_policies().await? {
        let source = SourcePolicy { proposal_id: a.proposal_id, policy: a.policy };
        match newest.get(&a.target) {
            Some((v, _)) if *v >= a.version => {}
            _ => {
                newest.insert(a.target, (a.version, source));
            }
        }
    }
    let policies = newest.into_values().map(|(_, s)| s).collect();

    let rows = store.identities().await?;
    let by_labels: HashMap<&bulkhead_model::Labels, Identity> = rows.iter().map(|r| (&r.labels, r.id)).collect();
    let mut prefixes = Vec::new();
    for w in inventory.workloads() {
        if w.labels.get(CIDR_GROUP_KEY).is_some() {
            continue;
        }
        if let Some(id) = by_labels.get(&w.labels) {
            prefixes.extend(inventory.cidrs_of(&w.name).into_iter().map(|net| (net, *id)));
        }
    }
    if let Some(r) = resolver {
        let r = r.read().unwrap_or_else(PoisonError::into_inner);
        for (addr, pod) in r.kube().pod_addresses() {
            if let Some(id) = pod.subject().and_then(|s| s.labels()).and_then(|l| by_labels.get(l)) {
                prefixes.push((IpNet::from(addr), *id));
            }
        }
    }
    let identities = rows
        .iter()
        .filter(|r| !r.id.is_reserved())
        .map(|r| {
            let (name, kind) = match r.labels.get(CIDR_GROUP_KEY) {
                Some(group) => (group.to_owned(), IdentityKind::CidrGroup { cidrs: inventory.cidrs_of(group) }),
                None => (format!("identity-{}", r.id.0), IdentityKind::Workload),
            };
            IdentityInfo { id: r.id, name, labels: r.labels.clone(), kind, kubernetes: false, service_backend: false }
        })
        .collect();

    let modes = store.rollout_modes().await?.into_iter().map(|r| (r.target, r.mode)).collect();
    let endpoints = store.endpoints().await?;
    let mut fqdn: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for a in store.dns_answers(now_ms.saturating_sub(24 * 3600 * 1000)).await? {
        let valid_until = a.seen_unix_ms.saturating_add(i64::from(a.ttl_seconds) * 1000).saturating_add(DNS_GRACE_MS);
        if valid_until >= now_ms {
            fqdn.entry(a.name).or_default().push(a.addr);
        }
    }
    for addrs in fqdn.values_mut() {
        addrs.sort();
        addrs.dedup();
    }
    Ok(Inputs {
        version: u64::try_from(now_ms).unwrap_or(1).max(1),
        policies,
        identities,
        modes,
        endpoints,
        prefixes,
        fqdn,
    })
}

// === impl PolicyStream ===

/// The tonic service over a [`Distributor`].
#[derive(Debug, Clone)]
pub struct PolicyStreamService {
    pub distributor: Distributor,
    /// Where Hello/Ack/reports are kept (`None`: in memory only, e.g. tests).
    pub recorder: Option<super::record::Recorder>,
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<v1::PolicyUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl PolicyStream for PolicyStreamService {
    type SubscribeStream = UpdateStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<v1::EnforcerMessage>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let peer = crate::grpc::tls::Peer::of(&request);
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(first) => match EnforcerMessage::try_from(first) {
                Ok(EnforcerMessage::Hello(h)) => h,
                Ok(_) => return Err(Status::invalid_argument("the first message of a stream must be a Hello")),
                Err(e) => return Err(Status::invalid_argument(e.to_string())),
            },
            None => return Err(Status::invalid_argument("stream closed before Hello")),
        };
        if hello.node_id.is_empty() || hello.node_id.len() > 253 {
            return Err(Status::invalid_argument("Hello needs a node_id of 1 to 253 bytes"));
        }
        // Acks and verdict reports that follow are recorded under this node.
        peer.authorize(&hello.node_id, "policy stream")?;
        if let Some(rec) = &self.recorder {
            rec.admit(&hello).await?;
        }
        let node = hello.node_id.clone();
        tracing::info!(node = %node, boot_id = %hello.boot_id, applied = hello.applied_version, "Enforcer connected.");
        let rx = self.distributor.connect(&hello);
        let open = self.distributor.metrics.enforcer_stream();
        if let Some(rec) = &self.recorder {
            rec.hello(&hello).await;
        }

        let dist = self.distributor.clone();
        let recorder = self.recorder.clone();
        let sent = Arc::new(Mutex::new(Sent::default()));
        let acked = sent.clone();
        // The response ends when the enforcer's side does: an enforcer that closes
        // its stream to resynchronize waits for that, so its last acks get out.
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut clock = SkewEstimator::default();
            let mut backlog = super::record::ReportBacklog::default();
            loop {
                match inbound.message().await {
                    Ok(Some(m)) => match EnforcerMessage::try_from(m) {
                        Ok(EnforcerMessage::Ack(ack)) => {
                            if ack.status == PolicyAckStatus::Rejected {
                                tracing::warn!(node = %node, version = ack.version, error = ?ack.error, "Enforcer rejected a policy.");
                            }
                            if let Some(rec) = &recorder {
                                rec.ack(&node, &ack).await;
                            }
                            acked.lock().unwrap_or_else(PoisonError::into_inner).ack(&ack);
                            dist.update(&node, |s| {
                                if ack.status == PolicyAckStatus::Applied {
                                    s.applied_version = Some(ack.version);
                                }
                                s.last_ack = Some(ack);
                            });
                        }
                        Ok(EnforcerMessage::Report(mut r)) => {
                            let before = clock.correction_ms();
                            clock.observe(r.sent_unix_ms, crate::grpc::ingest::unix_ms());
                            let correction = clock.correction_ms();
                            if correction != 0 && before == 0 {
                                tracing::warn!(
                                    node = %node,
                                    skew_ms = correction,
                                    "The node's clock is off; its verdict times are corrected by the measured skew. Fix its time sync (NTP)."
                                );
                            }
                            correct_times(&mut r, correction);
                            if let Some(rec) = &recorder {
                                if let Some(skew) = clock.skew_to_record() {
                                    rec.clock_skew(&node, skew).await;
                                }
                                rec.report(&node, &r, &mut backlog).await;
                            }
                            dist.update(&node, |s| {
                                s.reports += 1;
                                s.events += r.events.len() as u64;
                            })
                        }
                        Ok(EnforcerMessage::Hello(_)) => {
                            tracing::warn!(node = %node, "Ignored a second Hello on one stream.");
                        }
                        Err(e) => tracing::warn!(node = %node, error = %e, "Ignored an invalid enforcer message."),
                    },
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(node = %node, error = %e, "Enforcer stream failed.");
                        break;
                    }
                }
            }
            if let Some(rec) = &recorder {
                rec.flush(&node, &mut backlog).await;
            }
            if backlog.rows() > 0 {
                tracing::error!(
                    node = %node,
                    rows = backlog.rows(),
                    "The stream ended while the store was unavailable: these verdict events and rule hits are lost."
                );
                let lost = backlog.discard();
                dist.metrics.backlog_dropped(lost.events, lost.rule_hits);
            }
            dist.update(&node, |s| s.connected = false);
            drop(open);
            tracing::info!(node = %node, "Enforcer disconnected.");
            let _ = closed_tx.send(());
        });

        let out = WatchStream::new(rx)
            .filter(|p| std::future::ready(p.version != UNKNOWN_VERSION))
            .map(move |p| {
                let update = sent.lock().unwrap_or_else(PoisonError::into_inner).next(p);
                Ok(v1::PolicyUpdate::from(&update))
            })
            .take_until(closed_rx);
        Ok(Response::new(Box::pin(out)))
    }
}

/// What one stream sent and what the enforcer acked of it: decides snapshot or delta.
#[derive(Debug, Default)]
struct Sent {
    last: Option<Arc<NodePolicy>>,
    /// The newest version the enforcer acked as applied on this stream.
    applied: Option<u64>,
}

impl Sent {
    fn ack(&mut self, ack: &PolicyAck) {
        match ack.status {
            PolicyAckStatus::Applied => self.applied = Some(ack.version),
            // It still holds its previous version, not the refused one: the next
            // update must not build on either guess.
            PolicyAckStatus::Rejected => self.applied = None,
        }
    }

    fn next(&mut self, policy: Arc<NodePolicy>) -> PolicyUpdate {
        let update = match &self.last {
            Some(last) if self.applied == Some(last.version) && last.version < policy.version => {
                let delta = NodePolicyDelta::between(last, &policy);
                let whole = policy.ipcache.len() + policy.endpoints.len() + policy.rules.len() + policy.rule_refs.len();
                if delta.len() < whole { PolicyUpdate::Delta(delta) } else { PolicyUpdate::Snapshot((*policy).clone()) }
            }
            _ => PolicyUpdate::Snapshot((*policy).clone()),
        };
        self.last = Some(policy);
        update
    }
}

/// Puts a report's node timestamps on the learner's clock (see [`crate::grpc::clock`]).
fn correct_times(r: &mut VerdictReport, correction_ms: i64) {
    if correction_ms == 0 {
        return;
    }
    for e in &mut r.events {
        e.time_unix_ms = corrected(e.time_unix_ms, correction_ms);
    }
    for c in &mut r.rule_counters {
        c.last_hit_unix_ms = corrected(c.last_hit_unix_ms, correction_ms);
    }
}
