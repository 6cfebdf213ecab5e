//! Rows as the database returns them (`Raw*`, decoded by `sqlx::FromRow` on either
//! backend) and their checked conversion into domain rows. A stored value that does not
//! fit its domain type is an error, never a silent default.

use std::collections::HashMap;
use std::net::IpAddr;

use bulkhead_model::{
    CgroupFact, DnsAnswer, Edge, EdgeKey, EndpointFact, Flow, Identity, InterfaceAddress, Labels, LossCounters,
};

use super::prepare::{addr_from_db, direction_from_db, protocol_from_db, unbits, verdict_from_db};
use super::{AgentRow, EdgeRow, EndpointRow, FlowRow, IdentityRow, StoreError};

fn invalid(table: &'static str, column: &'static str, value: impl ToString) -> StoreError {
    StoreError::InvalidStoredValue { table, column, value: value.to_string() }
}

pub(crate) fn identity(table: &'static str, column: &'static str, v: i64) -> Result<Identity, StoreError> {
    u32::try_from(v).map(Identity).map_err(|_| invalid(table, column, v))
}

pub(crate) fn counter(table: &'static str, column: &'static str, v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| invalid(table, column, v))
}

pub(crate) fn port(table: &'static str, column: &'static str, v: i32) -> Result<u16, StoreError> {
    u16::try_from(v).map_err(|_| invalid(table, column, v))
}

fn addr(table: &'static str, column: &'static str, v: &str) -> Result<IpAddr, StoreError> {
    v.parse().map_err(|_| invalid(table, column, v))
}

pub(crate) fn labels(id: i64, canonical: &str) -> Result<Labels, StoreError> {
    Labels::from_canonical(canonical).map_err(|source| StoreError::CorruptLabels { identity: id, source })
}

// === identities ===

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawIdentity {
    pub id: i64,
    pub labels: String,
    pub created_unix_ms: i64,
}

impl TryFrom<RawIdentity> for IdentityRow {
    type Error = StoreError;
    fn try_from(r: RawIdentity) -> Result<Self, StoreError> {
        Ok(IdentityRow {
            id: identity("identities", "id", r.id)?,
            labels: labels(r.id, &r.labels)?,
            created_unix_ms: r.created_unix_ms,
        })
    }
}

// === agents ===

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawAgent {
    pub node_id: String,
    pub boot_id: Option<String>,
    pub agent_version: Option<String>,
    pub registered_unix_ms: Option<i64>,
    pub first_seen_unix_ms: Option<i64>,
    pub last_seen_unix_ms: Option<i64>,
    pub batches_stored: i64,
    pub loss_ringbuf_dropped: Option<i64>,
    pub loss_queue_dropped: Option<i64>,
    pub loss_spool_evicted_batches: Option<i64>,
    pub loss_spool_evicted_flows: Option<i64>,
    pub loss_rejected_batches: Option<i64>,
    pub clock_skew_ms: Option<i64>,
}

impl TryFrom<RawAgent> for AgentRow {
    type Error = StoreError;
    fn try_from(r: RawAgent) -> Result<Self, StoreError> {
        let c = |column, v: Option<i64>| counter("agent_boots", column, v.unwrap_or(0));
        Ok(AgentRow {
            loss: LossCounters {
                ringbuf_dropped: c("loss_ringbuf_dropped", r.loss_ringbuf_dropped)?,
                queue_dropped: c("loss_queue_dropped", r.loss_queue_dropped)?,
                spool_evicted_batches: c("loss_spool_evicted_batches", r.loss_spool_evicted_batches)?,
                spool_evicted_flows: c("loss_spool_evicted_flows", r.loss_spool_evicted_flows)?,
                rejected_batches: c("loss_rejected_batches", r.loss_rejected_batches)?,
            },
            batches_stored: counter("agents", "batches_stored", r.batches_stored)?,
            node_id: r.node_id,
            boot_id: r.boot_id,
            agent_version: r.agent_version,
            registered_unix_ms: r.registered_unix_ms,
            first_seen_unix_ms: r.first_seen_unix_ms,
            last_seen_unix_ms: r.last_seen_unix_ms,
            clock_skew_ms: r.clock_skew_ms,
        })
    }
}

// === edges ===

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawEdge {
    pub src_identity: i64,
    pub dst_identity: i64,
    pub dst_port: i32,
    pub protocol: i32,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
    pub connections_egress: i64,
    pub bytes_egress: i64,
    pub connections_ingress: i64,
    pub bytes_ingress: i64,
    pub src_labels: String,
    pub dst_labels: String,
}

/// Parses each identity's labels once per result set: 100k edges share a few hundred
/// label sets.
#[derive(Debug, Default)]
pub(crate) struct LabelCache(HashMap<i64, Labels>);

impl LabelCache {
    fn get(&mut self, id: i64, canonical: &str) -> Result<Labels, StoreError> {
        if let Some(l) = self.0.get(&id) {
            return Ok(l.clone());
        }
        let l = labels(id, canonical)?;
        self.0.insert(id, l.clone());
        Ok(l)
    }
}

impl RawEdge {
    pub fn into_row(self, cache: &mut LabelCache) -> Result<EdgeRow, StoreError> {
        const T: &str = "edges";
        let connections_egress = counter(T, "connections_egress", self.connections_egress)?;
        let bytes_egress = counter(T, "bytes_egress", self.bytes_egress)?;
        let connections_ingress = counter(T, "connections_ingress", self.connections_ingress)?;
        let bytes_ingress = counter(T, "bytes_ingress", self.bytes_ingress)?;
        Ok(EdgeRow {
            edge: Edge {
                key: EdgeKey {
                    src: identity(T, "src_identity", self.src_identity)?,
                    dst: identity(T, "dst_identity", self.dst_identity)?,
                    dst_port: port(T, "dst_port", self.dst_port)?,
                    protocol: protocol_from_db(T, self.protocol)?,
                },
                first_seen_unix_ms: self.first_seen_unix_ms,
                last_seen_unix_ms: self.last_seen_unix_ms,
                // Never double count a connection seen from both ends: see EdgeRow.
                connections: connections_egress.max(connections_ingress),
                bytes: bytes_egress.max(bytes_ingress),
            },
            src_labels: cache.get(self.src_identity, &self.src_labels)?,
            dst_labels: cache.get(self.dst_identity, &self.dst_labels)?,
            connections_egress,
            bytes_egress,
            connections_ingress,
            bytes_ingress,
        })
    }
}

// === flows ===

/// A flow row with its batch facts (PostgreSQL keeps them on every row).
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawFlow {
    pub id: i64,
    pub node_id: String,
    pub received_unix_ms: i64,
    #[sqlx(flatten)]
    pub flow: RawFlowColumns,
}

impl TryFrom<RawFlow> for FlowRow {
    type Error = StoreError;
    fn try_from(r: RawFlow) -> Result<Self, StoreError> {
        r.flow.into_row(r.id, r.node_id, r.received_unix_ms)
    }
}

/// A flow row without its batch facts (SQLite keeps those once per batch, in
/// `flow_blocks`).
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawBlockFlow {
    pub id: i64,
    #[sqlx(flatten)]
    pub flow: RawFlowColumns,
}

/// The per-flow columns, identical on both backends.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawFlowColumns {
    pub src_identity: i64,
    pub dst_identity: i64,
    pub src_addr: Vec<u8>,
    pub src_port: i32,
    pub dst_addr: Vec<u8>,
    pub dst_port: i32,
    pub protocol: i32,
    pub direction: i16,
    pub netns_ino: i64,
    pub cgroup_id: i64,
    pub pid: i64,
    pub comm: String,
    pub connections: i64,
    pub bytes_sent: i64,
    pub bytes_received: i64,
    pub packets: i64,
    pub verdict: i16,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
}

impl RawFlowColumns {
    pub fn into_row(self, id: i64, node_id: String, received_unix_ms: i64) -> Result<FlowRow, StoreError> {
        const T: &str = "flows";
        let r = self;
        Ok(FlowRow {
            id,
            node_id,
            received_unix_ms,
            src_identity: identity(T, "src_identity", r.src_identity)?,
            dst_identity: identity(T, "dst_identity", r.dst_identity)?,
            flow: Flow {
                src_addr: addr_from_db(T, "src_addr", &r.src_addr)?,
                src_port: port(T, "src_port", r.src_port)?,
                dst_addr: addr_from_db(T, "dst_addr", &r.dst_addr)?,
                dst_port: port(T, "dst_port", r.dst_port)?,
                protocol: protocol_from_db(T, r.protocol)?,
                direction: direction_from_db(r.direction)?,
                netns_ino: unbits(r.netns_ino),
                cgroup_id: unbits(r.cgroup_id),
                pid: u32::try_from(r.pid).map_err(|_| invalid(T, "pid", r.pid))?,
                comm: r.comm,
                connections: counter(T, "connections", r.connections)?,
                bytes_sent: counter(T, "bytes_sent", r.bytes_sent)?,
                bytes_received: counter(T, "bytes_received", r.bytes_received)?,
                packets: counter(T, "packets", r.packets)?,
                verdict: verdict_from_db(r.verdict)?,
                first_seen_unix_ms: r.first_seen_unix_ms,
                last_seen_unix_ms: r.last_seen_unix_ms,
                http: Default::default(),
            },
        })
    }
}

// === endpoints ===

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawEndpoint {
    pub node_id: String,
    pub netns_ino: i64,
    pub netns_name: Option<String>,
    pub host: bool,
    pub identity: i64,
    pub workload: Option<String>,
    pub addresses: String,
    pub cgroups: String,
    pub updated_unix_ms: i64,
}

impl TryFrom<RawEndpoint> for EndpointRow {
    type Error = StoreError;
    fn try_from(r: RawEndpoint) -> Result<Self, StoreError> {
        const T: &str = "endpoints";
        let addresses: Vec<InterfaceAddress> = serde_json::from_str(&r.addresses)
            .map_err(|source| StoreError::CorruptJson { table: T, column: "addresses", source })?;
        let cgroups: Vec<CgroupFact> = serde_json::from_str(&r.cgroups).map_err(|source| StoreError::CorruptJson {
            table: T,
            column: "cgroups",
            source,
        })?;
        Ok(EndpointRow {
            node_id: r.node_id,
            fact: EndpointFact {
                netns_ino: unbits(r.netns_ino),
                netns_name: r.netns_name,
                addresses,
                cgroups,
                host: r.host,
            },
            identity: identity(T, "identity", r.identity)?,
            workload: r.workload,
            updated_unix_ms: r.updated_unix_ms,
        })
    }
}

// === DNS answers ===

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawDnsAnswer {
    pub netns_ino: i64,
    pub name: String,
    pub addr: String,
    pub ttl_seconds: i64,
    pub last_seen_unix_ms: i64,
}

impl TryFrom<RawDnsAnswer> for DnsAnswer {
    type Error = StoreError;
    fn try_from(r: RawDnsAnswer) -> Result<Self, StoreError> {
        const T: &str = "dns_answers";
        Ok(DnsAnswer {
            netns_ino: unbits(r.netns_ino),
            addr: addr(T, "addr", &r.addr)?,
            ttl_seconds: u32::try_from(r.ttl_seconds).map_err(|_| invalid(T, "ttl_seconds", r.ttl_seconds))?,
            seen_unix_ms: r.last_seen_unix_ms,
            name: r.name,
        })
    }
}
