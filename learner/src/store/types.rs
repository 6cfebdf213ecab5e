//! What goes into the store and what comes out: ingest batches with resolved
//! identities, query parameters, and the rows the JSON API serialises.

use bulkhead_model::{DnsAnswer, Edge, EndpointFact, Flow, Identity, Labels, LossCounters};
use serde::Serialize;

// === input ===

/// One agent batch after identity resolution; `(node_id, boot_id, seq)` is its
/// at-least-once dedupe key.
#[derive(Debug, Clone, Serialize)]
pub struct IngestBatch {
    pub node_id: String,
    pub boot_id: String,
    pub seq: u64,
    /// When the learner received it; the agent's `last_seen` and the batch record use it.
    pub received_unix_ms: i64,
    pub flows: Vec<ResolvedFlow>,
    /// `Some` = full endpoint snapshot of the node, replacing the previous one.
    pub endpoints: Option<Vec<ResolvedEndpoint>>,
    pub dns_answers: Vec<DnsAnswer>,
    /// The boot's cumulative loss counters as of this batch.
    pub loss: LossCounters,
}

/// A flow with identities on both ends (`src` initiated, `dst` accepted).
#[derive(Debug, Clone, Serialize)]
pub struct ResolvedFlow {
    pub flow: Flow,
    pub src_identity: Identity,
    pub dst_identity: Identity,
}

/// An endpoint fact with the identity and workload name it resolved to.
#[derive(Debug, Clone, Serialize)]
pub struct ResolvedEndpoint {
    pub fact: EndpointFact,
    pub identity: Identity,
    pub workload: Option<String>,
}

/// What [`Store::ingest`](super::Store::ingest) did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IngestOutcome {
    /// Stored: `flows` flow rows written, `edges` distinct edges upserted.
    Stored { flows: u64, edges: u64 },
    /// The batch was stored before (agent retry); nothing was written.
    Duplicate,
}

// === queries ===

/// Edge filter; `Default` = every edge.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EdgeQuery {
    /// Only edges seen at or after this time (`last_seen >= since`).
    pub since_unix_ms: Option<i64>,
    /// Only edges from or to this identity.
    pub identity: Option<Identity>,
    /// At most this many, most recently seen first.
    pub limit: Option<u32>,
}

/// Recent-flow filter, newest first, paged by id.
#[derive(Debug, Clone, Serialize)]
pub struct FlowQuery {
    /// Only flows seen at or after this time (`last_seen >= since`).
    pub since_unix_ms: Option<i64>,
    /// Only flows that began at or before this time (`first_seen <= until`); with
    /// `since`, the flows overlapping a window (replay).
    pub until_unix_ms: Option<i64>,
    /// Only flows reported by this node.
    pub node_id: Option<String>,
    /// Only flows from or to this identity.
    pub identity: Option<Identity>,
    pub dst_port: Option<u16>,
    /// Page size; capped at [`MAX_FLOW_PAGE`].
    pub limit: u32,
    /// Keyset pagination: only flows with `id < before_id` (pass the last id of the
    /// previous page). Stable while new flows arrive, unlike OFFSET.
    pub before_id: Option<i64>,
}

/// Largest page [`Store::flows`](super::Store::flows) returns, whatever was asked: a
/// page is held in memory and serialised whole.
pub const MAX_FLOW_PAGE: u32 = 10_000;

impl Default for FlowQuery {
    fn default() -> Self {
        Self {
            since_unix_ms: None,
            until_unix_ms: None,
            node_id: None,
            identity: None,
            dst_port: None,
            limit: 100,
            before_id: None,
        }
    }
}

// === rows ===

/// An allocated (or reserved) identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IdentityRow {
    pub id: Identity,
    pub labels: Labels,
    pub created_unix_ms: i64,
}

/// An agent (node) as the learner knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentRow {
    pub node_id: String,
    /// Boot of the last Hello (or first batch); `None` if only pre-registered.
    pub boot_id: Option<String>,
    pub agent_version: Option<String>,
    /// Set when an administrator pre-registered the node.
    pub registered_unix_ms: Option<i64>,
    pub first_seen_unix_ms: Option<i64>,
    pub last_seen_unix_ms: Option<i64>,
    /// Cumulative loss counters of the current boot (zero if it sent no batch yet).
    pub loss: LossCounters,
    /// Batches stored from this node over all boots.
    pub batches_stored: u64,
    /// The node's clock skew as last measured (`learner − node`, ms); `None` = not yet.
    pub clock_skew_ms: Option<i64>,
}

/// A service-graph edge with its endpoints' labels and per-side counters.
///
/// `edge.connections` / `edge.bytes` are `max(egress side, ingress side)`: a connection
/// reported by both its client's collector (egress) and its server's (ingress) counts
/// once. The per-side numbers are kept so the UI can show which ends are observed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EdgeRow {
    #[serde(flatten)]
    pub edge: Edge,
    pub src_labels: Labels,
    pub dst_labels: Labels,
    /// Connections reported by the client side's collector.
    pub connections_egress: u64,
    pub bytes_egress: u64,
    /// Connections reported by the server side's collector.
    pub connections_ingress: u64,
    pub bytes_ingress: u64,
}

/// One recorded flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowRow {
    /// Monotonic, never reused; the keyset pagination key.
    pub id: i64,
    pub node_id: String,
    pub flow: Flow,
    pub src_identity: Identity,
    pub dst_identity: Identity,
    pub received_unix_ms: i64,
}

/// One endpoint from a node's latest snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointRow {
    pub node_id: String,
    pub fact: EndpointFact,
    pub identity: Identity,
    pub workload: Option<String>,
    pub updated_unix_ms: i64,
}
