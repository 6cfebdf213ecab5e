//! Read queries with optional filters, built once for both backends. Every value is a
//! bound parameter; only fixed SQL fragments are pushed as text.

use sqlx::{Database, Encode, QueryBuilder, Type};

use super::{EdgeQuery, FlowQuery, MAX_FLOW_PAGE};

const EDGE_SELECT: &str = "SELECT e.src_identity, e.dst_identity, e.dst_port, e.protocol, \
     e.first_seen_unix_ms, e.last_seen_unix_ms, \
     e.connections_egress, e.bytes_egress, e.connections_ingress, e.bytes_ingress, \
     s.labels AS src_labels, d.labels AS dst_labels \
     FROM edges e \
     JOIN identities s ON s.id = e.src_identity \
     JOIN identities d ON d.id = e.dst_identity \
     WHERE TRUE";

/// Edges, most recently seen first (then by key, so pages are deterministic).
pub(crate) fn edges<DB>(q: &EdgeQuery) -> QueryBuilder<DB>
where
    DB: Database,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
{
    let mut b = QueryBuilder::new(EDGE_SELECT);
    if let Some(since) = q.since_unix_ms {
        b.push(" AND e.last_seen_unix_ms >= ").push_bind(since);
    }
    if let Some(id) = q.identity {
        let id = i64::from(id.0);
        // Two sargable predicates (primary key prefix, dst index) rather than one OR
        // over a computed value: both backends turn this into an index union.
        b.push(" AND (e.src_identity = ").push_bind(id).push(" OR e.dst_identity = ").push_bind(id).push(")");
    }
    b.push(" ORDER BY e.last_seen_unix_ms DESC, e.src_identity, e.dst_identity, e.dst_port, e.protocol");
    if let Some(limit) = q.limit {
        b.push(" LIMIT ").push_bind(i64::from(limit));
    }
    b
}

const FLOW_SELECT: &str = "SELECT id, node_id, received_unix_ms, src_identity, dst_identity, \
     src_addr, src_port, dst_addr, dst_port, protocol, direction, netns_ino, cgroup_id, pid, comm, \
     connections, bytes_sent, bytes_received, packets, verdict, first_seen_unix_ms, last_seen_unix_ms \
     FROM flows WHERE ";

/// Recent flows (PostgreSQL), newest (highest id) first, keyset-paged by id.
///
/// With an identity filter the page is the union of two index-ordered scans, one per
/// side (`(src_identity, id)` and `(dst_identity, id)`), each stopping after `limit`
/// rows. A plain `src = ? OR dst = ?` makes the planner collect *every* matching flow
/// and sort it before applying the limit, which for a busy identity (world, the ingress
/// controller) means millions of rows per page. SQLite keeps per-batch facts in
/// `flow_blocks` and pages through those instead (see `sqlite::SqliteStore::flows`).
pub(crate) fn flows<DB>(q: &FlowQuery) -> QueryBuilder<DB>
where
    DB: Database,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
    for<'a> i32: Encode<'a, DB> + Type<DB>,
    for<'a> String: Encode<'a, DB> + Type<DB>,
{
    let limit = i64::from(q.limit.min(MAX_FLOW_PAGE));
    let mut b = QueryBuilder::new(FLOW_SELECT);
    match q.identity {
        None => {
            b.push("TRUE");
            push_flow_filters(&mut b, q);
        }
        Some(id) => {
            let id = i64::from(id.0);
            b.push("id IN (");
            for (i, side) in ["src_identity", "dst_identity"].into_iter().enumerate() {
                if i > 0 {
                    b.push(" UNION ALL ");
                }
                b.push("SELECT id FROM (SELECT id FROM flows WHERE ").push(side).push(" = ").push_bind(id);
                push_flow_filters(&mut b, q);
                b.push(" ORDER BY id DESC LIMIT ").push_bind(limit).push(") AS ").push(side);
            }
            b.push(")");
        }
    }
    b.push(" ORDER BY id DESC LIMIT ").push_bind(limit);
    b
}

/// The filters other than identity, each as ` AND …`.
fn push_flow_filters<DB>(b: &mut QueryBuilder<DB>, q: &FlowQuery)
where
    DB: Database,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
    for<'a> i32: Encode<'a, DB> + Type<DB>,
    for<'a> String: Encode<'a, DB> + Type<DB>,
{
    if let Some(before) = q.before_id {
        b.push(" AND id < ").push_bind(before);
    }
    if let Some(since) = q.since_unix_ms {
        b.push(" AND last_seen_unix_ms >= ").push_bind(since);
    }
    if let Some(until) = q.until_unix_ms {
        b.push(" AND first_seen_unix_ms <= ").push_bind(until);
    }
    if let Some(node) = &q.node_id {
        b.push(" AND node_id = ").push_bind(node.clone());
    }
    if let Some(port) = q.dst_port {
        b.push(" AND dst_port = ").push_bind(i32::from(port));
    }
}

// === statements identical on both backends ===

pub(crate) const SELECT_IDENTITY_BY_DIGEST: &str =
    "SELECT id, labels, created_unix_ms FROM identities WHERE labels_digest = $1";

pub(crate) const SELECT_IDENTITIES: &str = "SELECT id, labels, created_unix_ms FROM identities ORDER BY id";

pub(crate) const INSERT_IDENTITY: &str = "INSERT INTO identities (labels_digest, labels, created_unix_ms) \
     VALUES ($1, $2, $3) ON CONFLICT (labels_digest) DO NOTHING";

pub(crate) const REGISTER_AGENT: &str = "INSERT INTO agents (node_id, registered_unix_ms) VALUES ($1, $2) \
     ON CONFLICT (node_id) DO UPDATE \
     SET registered_unix_ms = COALESCE(agents.registered_unix_ms, excluded.registered_unix_ms)";

pub(crate) const AGENT_KNOWN: &str = "SELECT node_id FROM agents WHERE node_id = $1";

pub(crate) const SELECT_AGENTS: &str = "SELECT a.node_id, a.boot_id, a.agent_version, a.registered_unix_ms, \
     a.first_seen_unix_ms, a.last_seen_unix_ms, a.batches_stored, \
     b.loss_ringbuf_dropped, b.loss_queue_dropped, b.loss_spool_evicted_batches, \
     b.loss_spool_evicted_flows, b.loss_rejected_batches, a.clock_skew_ms \
     FROM agents a LEFT JOIN agent_boots b ON b.node_id = a.node_id AND b.boot_id = a.boot_id \
     ORDER BY a.node_id";

pub(crate) const STORED_THROUGH_SEQ: &str =
    "SELECT stored_through_seq FROM agent_boots WHERE node_id = $1 AND boot_id = $2";

pub(crate) const PRUNED_THROUGH_SEQ: &str =
    "SELECT pruned_through_seq FROM agent_boots WHERE node_id = $1 AND boot_id = $2";

pub(crate) const INSERT_BATCH_RECORD: &str = "INSERT INTO ingested_batches (node_id, boot_id, seq, received_unix_ms, flows) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (node_id, boot_id, seq) DO NOTHING";

pub(crate) const DELETE_NODE_ENDPOINTS: &str = "DELETE FROM endpoints WHERE node_id = $1";

pub(crate) const SELECT_ENDPOINTS: &str = "SELECT node_id, netns_ino, netns_name, host, identity, workload, \
     addresses, cgroups, updated_unix_ms FROM endpoints ORDER BY node_id, netns_ino";

pub(crate) const SELECT_DNS_ANSWERS: &str = "SELECT netns_ino, name, addr, ttl_seconds, last_seen_unix_ms \
     FROM dns_answers WHERE last_seen_unix_ms >= $1 ORDER BY name, addr, netns_ino";

/// Deletes at most `$2` old flows per statement (PostgreSQL; SQLite prunes through
/// `flow_blocks`) so a big prune never holds locks for long; the caller loops.
pub(crate) const PRUNE_FLOWS_CHUNK: &str = "DELETE FROM flows WHERE id IN \
     (SELECT id FROM flows WHERE last_seen_unix_ms < $1 LIMIT $2)";

pub(crate) const PRUNE_DNS_ANSWERS: &str = "DELETE FROM dns_answers WHERE last_seen_unix_ms < $1";

pub(crate) const PRUNE_BATCH_RECORDS: &str = "DELETE FROM ingested_batches WHERE received_unix_ms < $1";

/// Rows deleted per prune statement.
pub(crate) const PRUNE_CHUNK: i64 = 10_000;

pub(crate) const ENDPOINT_COLUMNS: &str =
    "node_id, netns_ino, netns_name, host, identity, workload, addresses, cgroups, updated_unix_ms";
