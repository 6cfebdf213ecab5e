//! Service-graph aggregation for the analysts' graph (`/api/v1/graph`, issue 5): the
//! edges of a time range folded in SQL into buckets between *groups* of identities
//! (namespaces, workloads, whatever the caller chose), the verdict events of the range
//! per edge, the flows of one workload per address pair (the endpoint view), and how
//! widely each port is used (proposal risk).
//!
//! The caller hands the grouping over as data: one [`GroupMember`] per identity, bound
//! as a single JSON parameter and joined in the database, so a namespace view of 100k
//! edges returns a few hundred rows. Members flagged [`GroupMember::detail_src`] /
//! [`GroupMember::detail_dst`] (identities an active policy covers) keep their edges
//! apart, one row per edge: whether a policy allows an edge is decided by the caller
//! (policies are label selectors, which SQL cannot evaluate), and only those edges need
//! it. Edges with an identity the grouping does not list (allocated after the caller
//! read the identities) are left out until the next read.
//!
//! Counters are summed as high and low 32-bit halves (a stored counter may be saturated
//! at i64::MAX, and a plain SUM of two overflows on both backends) and recombined here,
//! saturating. Every value is a bound parameter; the SQL text is built from constants.

use std::net::IpAddr;

use bulkhead_model::{Direction, Edge, EdgeKey, Identity, Protocol};
use serde::Serialize;
use sqlx::AssertSqlSafe;

use super::decode::{self, counter, port};
use super::prepare::{addr_from_db, protocol_from_db};
use super::{Inner, Store, StoreError};

/// Most rows any graph statement returns (a safety bound: callers check sizes first).
pub const MAX_GRAPH_ROWS: u32 = 200_000;

const T: &str = "edges";

// === inputs and rows ===

/// One identity's place in a grouping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GroupMember {
    pub identity: Identity,
    /// The caller's group number (an index into its own node list).
    pub group: u32,
    /// Keep edges *from* this identity apart (its egress is covered by a policy).
    pub detail_src: bool,
    /// Keep edges *to* this identity apart (its ingress is covered by a policy).
    pub detail_dst: bool,
    /// With [`GraphQuery::scoped`]: only edges touching a scope member are read.
    pub in_scope: bool,
}

impl GroupMember {
    fn flags(&self) -> u8 {
        u8::from(self.detail_src) | (u8::from(self.detail_dst) << 1) | (u8::from(self.in_scope) << 2)
    }
}

/// Which edges to aggregate and how.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GraphQuery {
    /// Every identity the caller knows, with its group.
    pub members: Vec<GroupMember>,
    /// Edges seen in `[since, until]` (`last_seen >= since`, `first_seen <= until`).
    pub since_unix_ms: Option<i64>,
    pub until_unix_ms: Option<i64>,
    /// Only edges with a scope member on either end.
    pub scoped: bool,
}

impl GraphQuery {
    fn members_json(&self) -> String {
        let mut s = String::with_capacity(self.members.len() * 16 + 2);
        s.push('[');
        for (i, m) in self.members.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&format!("[{},{},{}]", m.identity.0, m.group, m.flags()));
        }
        s.push(']');
        s
    }

    fn range(&self) -> (i64, i64) {
        (self.since_unix_ms.unwrap_or(i64::MIN), self.until_unix_ms.unwrap_or(i64::MAX))
    }
}

/// Edges between two groups on one port and protocol, summed; or, where a detail flag
/// applies, exactly one edge (`pair` names its identities).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GraphBucketRow {
    pub src_group: u32,
    pub dst_group: u32,
    /// `Some((src, dst))` for a detail row (one edge).
    pub pair: Option<(Identity, Identity)>,
    pub dst_port: u16,
    pub protocol: Protocol,
    /// Edges in the bucket.
    pub edges: u64,
    /// Sum over the edges of max(egress side, ingress side) (see `Store`'s docs).
    pub connections: u64,
    pub bytes: u64,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
}

/// How big an aggregation would be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GraphSize {
    /// Distinct (source group, destination group) pairs with an edge.
    pub pairs: u64,
    /// Distinct groups on either end of those.
    pub groups: u64,
}

/// Audit and deny events of a range for one connection tuple (addresses only when asked
/// for them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EdgeVerdictRow {
    pub src: Identity,
    pub dst: Identity,
    pub src_addr: Option<IpAddr>,
    pub dst_addr: Option<IpAddr>,
    pub dst_port: u16,
    pub protocol: Protocol,
    pub audit: u64,
    pub denied: u64,
    pub last_unix_ms: i64,
}

/// One workload's recorded flows per address pair, port and reporting side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointFlowRow {
    pub src: Identity,
    pub dst: Identity,
    pub src_addr: IpAddr,
    pub dst_addr: IpAddr,
    pub dst_port: u16,
    pub protocol: Protocol,
    /// Which side's collector reported them (egress: the client's, ingress: the server's).
    pub direction: Direction,
    pub flows: u64,
    pub connections: u64,
    /// Both directions of the payload.
    pub bytes: u64,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
}

/// How widely a port is used across the whole graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PortUsageRow {
    pub dst_port: u16,
    pub protocol: Protocol,
    /// Distinct destination identities serving it.
    pub destinations: u64,
    pub edges: u64,
}

// === raw rows ===

#[derive(Debug, sqlx::FromRow)]
struct RawBucket {
    src_group: i64,
    dst_group: i64,
    src_identity: i64,
    dst_identity: i64,
    dst_port: i64,
    protocol: i64,
    edges: i64,
    connections_hi: i64,
    connections_lo: i64,
    bytes_hi: i64,
    bytes_lo: i64,
    first_seen_unix_ms: i64,
    last_seen_unix_ms: i64,
}

#[derive(Debug, sqlx::FromRow)]
struct RawSize {
    pairs: i64,
    groups: i64,
}

#[derive(Debug, sqlx::FromRow)]
struct RawTopEdge {
    src_identity: i64,
    dst_identity: i64,
    dst_port: i64,
    protocol: i64,
    connections: i64,
    bytes: i64,
    first_seen_unix_ms: i64,
    last_seen_unix_ms: i64,
}

#[derive(Debug, sqlx::FromRow)]
struct RawEdgeVerdict {
    src_identity: i64,
    dst_identity: i64,
    src_addr: String,
    dst_addr: String,
    dst_port: i64,
    protocol: i64,
    audit: i64,
    denied: i64,
    last_unix_ms: i64,
}

#[derive(Debug, sqlx::FromRow)]
struct RawEndpointFlow {
    src_identity: i64,
    dst_identity: i64,
    src_addr: Vec<u8>,
    dst_addr: Vec<u8>,
    dst_port: i64,
    protocol: i64,
    direction: i64,
    flows: i64,
    connections_hi: i64,
    connections_lo: i64,
    sent_hi: i64,
    sent_lo: i64,
    received_hi: i64,
    received_lo: i64,
    first_seen_unix_ms: i64,
    last_seen_unix_ms: i64,
}

#[derive(Debug, sqlx::FromRow)]
struct RawPortUsage {
    dst_port: i64,
    protocol: i64,
    destinations: i64,
    edges: i64,
}

/// `hi * 2^32 + lo`, saturated at i64::MAX like every stored counter.
fn recombine(table: &'static str, column: &'static str, hi: i64, lo: i64) -> Result<u64, StoreError> {
    let (hi, lo) = (counter(table, column, hi)?, counter(table, column, lo)?);
    let v = (u128::from(hi) << 32) + u128::from(lo);
    Ok(u64::try_from(v.min(i64::MAX as u128)).unwrap_or(i64::MAX as u64))
}

fn group(column: &'static str, v: i64) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::InvalidStoredValue { table: T, column, value: v.to_string() })
}

fn port_of(table: &'static str, v: i64) -> Result<u16, StoreError> {
    port(table, "dst_port", i32::try_from(v).unwrap_or(-1))
}

fn protocol_of(table: &'static str, v: i64) -> Result<Protocol, StoreError> {
    protocol_from_db(table, i32::try_from(v).unwrap_or(-1))
}

impl TryFrom<RawBucket> for GraphBucketRow {
    type Error = StoreError;
    fn try_from(r: RawBucket) -> Result<Self, StoreError> {
        let pair = if r.src_identity >= 0 && r.dst_identity >= 0 {
            Some((
                decode::identity(T, "src_identity", r.src_identity)?,
                decode::identity(T, "dst_identity", r.dst_identity)?,
            ))
        } else {
            None
        };
        Ok(GraphBucketRow {
            src_group: group("src group", r.src_group)?,
            dst_group: group("dst group", r.dst_group)?,
            pair,
            dst_port: port_of(T, r.dst_port)?,
            protocol: protocol_of(T, r.protocol)?,
            edges: counter(T, "count", r.edges)?,
            connections: recombine(T, "connections", r.connections_hi, r.connections_lo)?,
            bytes: recombine(T, "bytes", r.bytes_hi, r.bytes_lo)?,
            first_seen_unix_ms: r.first_seen_unix_ms,
            last_seen_unix_ms: r.last_seen_unix_ms,
        })
    }
}

impl TryFrom<RawTopEdge> for Edge {
    type Error = StoreError;
    fn try_from(r: RawTopEdge) -> Result<Self, StoreError> {
        Ok(Edge {
            key: EdgeKey {
                src: decode::identity(T, "src_identity", r.src_identity)?,
                dst: decode::identity(T, "dst_identity", r.dst_identity)?,
                dst_port: port_of(T, r.dst_port)?,
                protocol: protocol_of(T, r.protocol)?,
            },
            first_seen_unix_ms: r.first_seen_unix_ms,
            last_seen_unix_ms: r.last_seen_unix_ms,
            connections: counter(T, "connections", r.connections)?,
            bytes: counter(T, "bytes", r.bytes)?,
        })
    }
}

impl TryFrom<RawEdgeVerdict> for EdgeVerdictRow {
    type Error = StoreError;
    fn try_from(r: RawEdgeVerdict) -> Result<Self, StoreError> {
        const V: &str = "verdict_events";
        let addr = |column, s: &str| -> Result<Option<IpAddr>, StoreError> {
            if s.is_empty() {
                return Ok(None);
            }
            s.parse().map(Some).map_err(|_| StoreError::InvalidStoredValue { table: V, column, value: s.to_owned() })
        };
        Ok(EdgeVerdictRow {
            src: decode::identity(V, "identity", r.src_identity)?,
            dst: decode::identity(V, "identity", r.dst_identity)?,
            src_addr: addr("src_addr", &r.src_addr)?,
            dst_addr: addr("dst_addr", &r.dst_addr)?,
            dst_port: port_of(V, r.dst_port)?,
            protocol: protocol_of(V, r.protocol)?,
            audit: counter(V, "count", r.audit)?,
            denied: counter(V, "count", r.denied)?,
            last_unix_ms: r.last_unix_ms,
        })
    }
}

impl TryFrom<RawEndpointFlow> for EndpointFlowRow {
    type Error = StoreError;
    fn try_from(r: RawEndpointFlow) -> Result<Self, StoreError> {
        const F: &str = "flows";
        let sent = recombine(F, "bytes_sent", r.sent_hi, r.sent_lo)?;
        let received = recombine(F, "bytes_received", r.received_hi, r.received_lo)?;
        Ok(EndpointFlowRow {
            src: decode::identity(F, "src_identity", r.src_identity)?,
            dst: decode::identity(F, "dst_identity", r.dst_identity)?,
            src_addr: addr_from_db(F, "src_addr", &r.src_addr)?,
            dst_addr: addr_from_db(F, "dst_addr", &r.dst_addr)?,
            dst_port: port_of(F, r.dst_port)?,
            protocol: protocol_of(F, r.protocol)?,
            direction: match r.direction {
                1 => Direction::Egress,
                2 => Direction::Ingress,
                other => {
                    return Err(StoreError::InvalidStoredValue {
                        table: F,
                        column: "direction",
                        value: other.to_string(),
                    });
                }
            },
            flows: counter(F, "count", r.flows)?,
            connections: recombine(F, "connections", r.connections_hi, r.connections_lo)?,
            bytes: sent.saturating_add(received).min(i64::MAX as u64),
            first_seen_unix_ms: r.first_seen_unix_ms,
            last_seen_unix_ms: r.last_seen_unix_ms,
        })
    }
}

impl TryFrom<RawPortUsage> for PortUsageRow {
    type Error = StoreError;
    fn try_from(r: RawPortUsage) -> Result<Self, StoreError> {
        Ok(PortUsageRow {
            dst_port: port_of(T, r.dst_port)?,
            protocol: protocol_of(T, r.protocol)?,
            destinations: counter(T, "count", r.destinations)?,
            edges: counter(T, "count", r.edges)?,
        })
    }
}

// === statements ===

/// What differs between the backends' SQL here: how a JSON parameter becomes rows, and
/// how a workload's flows are found (SQLite has no per-flow identity index; it walks
/// `flow_blocks`, see migration 0001).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Postgres,
}

/// `max(egress side, ingress side)` of an edge counter.
macro_rules! side_max {
    ($c:literal) => {
        concat!("CASE WHEN e.", $c, "_egress > e.", $c, "_ingress THEN e.", $c, "_egress ELSE e.", $c, "_ingress END")
    };
}

impl Dialect {
    /// The grouping `g(id, grp, flags)` from the JSON parameter `$1`.
    fn groups_cte(self) -> &'static str {
        match self {
            Dialect::Sqlite => {
                "g(id, grp, flags) AS MATERIALIZED (SELECT CAST(json_extract(value, '$[0]') AS INTEGER), \
                 CAST(json_extract(value, '$[1]') AS INTEGER), CAST(json_extract(value, '$[2]') AS INTEGER) \
                 FROM json_each($1))"
            }
            Dialect::Postgres => {
                "g(id, grp, flags) AS MATERIALIZED (SELECT (x->>0)::bigint, (x->>1)::bigint, (x->>2)::bigint \
                 FROM json_array_elements($1::json) AS x)"
            }
        }
    }

    /// Identities from a JSON array parameter `$n`, as a subquery.
    fn id_list(self, n: u8) -> String {
        match self {
            Dialect::Sqlite => format!("(SELECT CAST(value AS INTEGER) FROM json_each(${n}))"),
            Dialect::Postgres => format!("(SELECT (x #>> '{{}}')::bigint FROM json_array_elements(${n}::json) AS x)"),
        }
    }
}

/// Columns every joined edge row carries (`j` below).
const JOINED_COLUMNS: &str = concat!(
    "s.grp AS sg, s.flags AS sf, d.grp AS dg, d.flags AS df, e.src_identity AS src_identity, \
     e.dst_identity AS dst_identity, CAST(e.dst_port AS BIGINT) AS dst_port, CAST(e.protocol AS BIGINT) AS protocol, ",
    side_max!("connections"),
    " AS connections, ",
    side_max!("bytes"),
    " AS bytes, e.first_seen_unix_ms AS first_seen_unix_ms, e.last_seen_unix_ms AS last_seen_unix_ms"
);

/// The edges of the range (`$2`, `$3`) joined to their groups. The grouping drives the
/// join (CROSS JOIN pins SQLite's loop order; PostgreSQL plans it freely): one primary-key
/// range per identity instead of a lookup per edge. Scoped: the scope members' edges
/// through the primary key (outgoing) and the destination index (incoming).
fn joined(scoped: bool) -> String {
    const RANGE: &str = "e.last_seen_unix_ms >= $2 AND e.first_seen_unix_ms <= $3";
    if scoped {
        format!(
            "SELECT {JOINED_COLUMNS} FROM g s CROSS JOIN edges e JOIN g d ON d.id = e.dst_identity \
             WHERE (s.flags & 4) <> 0 AND e.src_identity = s.id AND {RANGE} \
             UNION ALL \
             SELECT {JOINED_COLUMNS} FROM g d CROSS JOIN edges e JOIN g s ON s.id = e.src_identity \
             WHERE (d.flags & 4) <> 0 AND e.dst_identity = d.id AND (s.flags & 4) = 0 AND {RANGE}"
        )
    } else {
        format!(
            "SELECT {JOINED_COLUMNS} FROM g s CROSS JOIN edges e JOIN g d ON d.id = e.dst_identity \
             WHERE e.src_identity = s.id AND {RANGE}"
        )
    }
}

/// A row is kept apart when its source's egress or its destination's ingress is covered.
const DETAIL: &str = "((sf & 1) <> 0 OR (df & 2) <> 0)";

fn buckets_sql(d: Dialect, scoped: bool) -> String {
    format!(
        "WITH {g}, j AS NOT MATERIALIZED ({j}) \
         SELECT sg AS src_group, dg AS dst_group, CAST(-1 AS BIGINT) AS src_identity, \
         CAST(-1 AS BIGINT) AS dst_identity, dst_port, protocol, CAST(count(*) AS BIGINT) AS edges, \
         CAST(sum(connections >> 32) AS BIGINT) AS connections_hi, \
         CAST(sum(connections & 4294967295) AS BIGINT) AS connections_lo, \
         CAST(sum(bytes >> 32) AS BIGINT) AS bytes_hi, CAST(sum(bytes & 4294967295) AS BIGINT) AS bytes_lo, \
         min(first_seen_unix_ms) AS first_seen_unix_ms, max(last_seen_unix_ms) AS last_seen_unix_ms \
         FROM j WHERE NOT {DETAIL} GROUP BY sg, dg, dst_port, protocol \
         UNION ALL \
         SELECT sg, dg, src_identity, dst_identity, dst_port, protocol, CAST(1 AS BIGINT), \
         connections >> 32, connections & 4294967295, bytes >> 32, bytes & 4294967295, \
         first_seen_unix_ms, last_seen_unix_ms FROM j WHERE {DETAIL}",
        g = d.groups_cte(),
        j = joined(scoped),
    )
}

fn size_sql(d: Dialect, scoped: bool) -> String {
    format!(
        "WITH {g}, j AS NOT MATERIALIZED ({j}), p AS MATERIALIZED (SELECT sg, dg FROM j GROUP BY sg, dg) \
         SELECT CAST((SELECT count(*) FROM p) AS BIGINT) AS pairs, \
         CAST((SELECT count(*) FROM (SELECT sg FROM p UNION SELECT dg FROM p) AS u) AS BIGINT) AS groups",
        g = d.groups_cte(),
        j = joined(scoped),
    )
}

fn top_sql(d: Dialect, scoped: bool) -> String {
    format!(
        "WITH {g}, j AS NOT MATERIALIZED ({j}) \
         SELECT src_identity, dst_identity, dst_port, protocol, connections, bytes, first_seen_unix_ms, \
         last_seen_unix_ms FROM j ORDER BY connections DESC, last_seen_unix_ms DESC, src_identity, dst_identity, \
         dst_port, protocol LIMIT $4",
        g = d.groups_cte(),
        j = joined(scoped),
    )
}

fn verdicts_sql(d: Dialect, scoped: bool, by_address: bool) -> String {
    let addrs =
        if by_address { "v.src_addr AS src_addr, v.dst_addr AS dst_addr" } else { "'' AS src_addr, '' AS dst_addr" };
    let scope = if scoped {
        let ids = d.id_list(4);
        format!(" AND (v.local_identity IN {ids} OR v.peer_identity IN {ids})")
    } else {
        String::new()
    };
    format!(
        "SELECT CAST(CASE WHEN v.direction = 1 THEN v.local_identity ELSE v.peer_identity END AS BIGINT) AS src_identity, \
         CAST(CASE WHEN v.direction = 1 THEN v.peer_identity ELSE v.local_identity END AS BIGINT) AS dst_identity, \
         {addrs}, CAST(v.dst_port AS BIGINT) AS dst_port, CAST(v.protocol AS BIGINT) AS protocol, \
         CAST(count(CASE WHEN v.verdict = 2 THEN 1 END) AS BIGINT) AS audit, \
         CAST(count(CASE WHEN v.verdict = 3 THEN 1 END) AS BIGINT) AS denied, max(v.at_unix_ms) AS last_unix_ms \
         FROM verdict_events v WHERE v.at_unix_ms >= $1 AND v.at_unix_ms <= $2 AND v.verdict IN (2, 3){scope} \
         GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY denied DESC, audit DESC, 1, 2, 5, 6 LIMIT $3"
    )
}

/// A workload's flows (`$1`) overlapping `[$2, $3]`, per address pair, port and side,
/// largest first, at most `$4`.
fn endpoint_flows_sql(d: Dialect) -> String {
    const SELECT: &str = "SELECT CAST(f.src_identity AS BIGINT) AS src_identity, \
         CAST(f.dst_identity AS BIGINT) AS dst_identity, f.src_addr AS src_addr, f.dst_addr AS dst_addr, \
         CAST(f.dst_port AS BIGINT) AS dst_port, CAST(f.protocol AS BIGINT) AS protocol, \
         CAST(f.direction AS BIGINT) AS direction, CAST(count(*) AS BIGINT) AS flows, \
         CAST(sum(f.connections >> 32) AS BIGINT) AS connections_hi, \
         CAST(sum(f.connections & 4294967295) AS BIGINT) AS connections_lo, \
         CAST(sum(f.bytes_sent >> 32) AS BIGINT) AS sent_hi, CAST(sum(f.bytes_sent & 4294967295) AS BIGINT) AS sent_lo, \
         CAST(sum(f.bytes_received >> 32) AS BIGINT) AS received_hi, \
         CAST(sum(f.bytes_received & 4294967295) AS BIGINT) AS received_lo, \
         min(f.first_seen_unix_ms) AS first_seen_unix_ms, max(f.last_seen_unix_ms) AS last_seen_unix_ms ";
    const FILTER: &str = "(f.src_identity = $1 OR f.dst_identity = $1) \
         AND f.last_seen_unix_ms >= $2 AND f.first_seen_unix_ms <= $3 \
         GROUP BY 1, 2, 3, 4, 5, 6, 7 ORDER BY connections_hi DESC, connections_lo DESC, flows DESC LIMIT $4";
    match d {
        // The per-identity flow indexes find the workload's flows (a bitmap OR).
        Dialect::Postgres => format!("{SELECT}FROM flows f WHERE {FILTER}"),
        // The batches whose block mentions the identity (`$5` = `,<id>,`) and saw
        // something since `$2`, their flows by rowid range; CROSS JOIN pins the order.
        Dialect::Sqlite => format!(
            "{SELECT}FROM flow_blocks b CROSS JOIN flows f \
             WHERE instr(b.identities, $5) > 0 AND b.max_last_seen_unix_ms >= $2 \
             AND f.id BETWEEN b.first_flow_id AND b.last_flow_id AND {FILTER}"
        ),
    }
}

const PORT_USAGE_SQL: &str = "SELECT CAST(dst_port AS BIGINT) AS dst_port, CAST(protocol AS BIGINT) AS protocol, \
     CAST(count(DISTINCT dst_identity) AS BIGINT) AS destinations, CAST(count(*) AS BIGINT) AS edges \
     FROM edges GROUP BY dst_port, protocol ORDER BY dst_port, protocol";

/// Runs `$body` against the store's read pool with its dialect (the body is expanded
/// once per backend, so binds and decodes are checked against both drivers).
macro_rules! on_reader {
    ($store:expr, |$pool:ident, $dialect:ident| $body:expr) => {
        match &$store.inner {
            Inner::Sqlite(s) => {
                let $pool = &s.reader;
                let $dialect = Dialect::Sqlite;
                $body
            }
            Inner::Postgres(s) => {
                let $pool = &s.pool;
                let $dialect = Dialect::Postgres;
                $body
            }
        }
    };
}

fn decode_all<R, O>(op: &'static str, fetched: Result<Vec<R>, sqlx::Error>) -> Result<Vec<O>, StoreError>
where
    O: TryFrom<R, Error = StoreError>,
{
    fetched.map_err(StoreError::db(op))?.into_iter().map(O::try_from).collect()
}

// === impl Store ===

impl Store {
    /// The edges of `q`'s range folded into buckets: per (source group, destination
    /// group, port, protocol) for edges between uncovered identities, one row per edge
    /// where a detail flag applies (see the module docs). Unordered.
    pub async fn graph_buckets(&self, q: &GraphQuery) -> Result<Vec<GraphBucketRow>, StoreError> {
        let (since, until) = q.range();
        let members = q.members_json();
        on_reader!(self, |pool, d| {
            let fetched = sqlx::query_as::<_, RawBucket>(AssertSqlSafe(buckets_sql(d, q.scoped)))
                .bind(members)
                .bind(since)
                .bind(until)
                .fetch_all(pool)
                .await;
            decode_all("graph_buckets", fetched)
        })
    }

    /// How many group pairs and groups [`Store::graph_buckets`] would fold `q` into.
    pub async fn graph_size(&self, q: &GraphQuery) -> Result<GraphSize, StoreError> {
        let (since, until) = q.range();
        let members = q.members_json();
        let raw = on_reader!(self, |pool, d| {
            sqlx::query_as::<_, RawSize>(AssertSqlSafe(size_sql(d, q.scoped)))
                .bind(members)
                .bind(since)
                .bind(until)
                .fetch_one(pool)
                .await
                .map_err(StoreError::db("graph_size"))?
        });
        Ok(GraphSize { pairs: counter(T, "count", raw.pairs)?, groups: counter(T, "count", raw.groups)? })
    }

    /// The `limit` busiest edges of `q` (most connections first), one per edge: what a
    /// graph too large to draw falls back to.
    pub async fn graph_top_edges(&self, q: &GraphQuery, limit: u32) -> Result<Vec<Edge>, StoreError> {
        let (since, until) = q.range();
        let members = q.members_json();
        let limit = i64::from(limit.min(MAX_GRAPH_ROWS));
        on_reader!(self, |pool, d| {
            let fetched = sqlx::query_as::<_, RawTopEdge>(AssertSqlSafe(top_sql(d, q.scoped)))
                .bind(members)
                .bind(since)
                .bind(until)
                .bind(limit)
                .fetch_all(pool)
                .await;
            decode_all("graph_top_edges", fetched)
        })
    }

    /// Audit and deny events that happened in `[since, until]`, per connection tuple
    /// (source = the initiator, whichever side reported), most denies first, at most
    /// `limit`. `scope`: only events with one of these identities on either end.
    /// `by_address`: per address pair too.
    pub async fn graph_verdicts(
        &self,
        since_unix_ms: Option<i64>,
        until_unix_ms: Option<i64>,
        scope: Option<&[Identity]>,
        by_address: bool,
        limit: u32,
    ) -> Result<Vec<EdgeVerdictRow>, StoreError> {
        let (since, until) = (since_unix_ms.unwrap_or(i64::MIN), until_unix_ms.unwrap_or(i64::MAX));
        let ids = scope.map(|ids| {
            let list: Vec<String> = ids.iter().map(|i| i.0.to_string()).collect();
            format!("[{}]", list.join(","))
        });
        let limit = i64::from(limit.min(MAX_GRAPH_ROWS));
        on_reader!(self, |pool, d| {
            let sql = verdicts_sql(d, ids.is_some(), by_address);
            let mut query = sqlx::query_as::<_, RawEdgeVerdict>(AssertSqlSafe(sql)).bind(since).bind(until).bind(limit);
            if let Some(ids) = &ids {
                query = query.bind(ids.clone());
            }
            decode_all("graph_verdicts", query.fetch_all(pool).await)
        })
    }

    /// `identity`'s recorded flows overlapping `[since, until]` per (src, dst, address
    /// pair, port, protocol, reporting side), most connections first, at most `limit`.
    /// Limited to the flow retention window.
    pub async fn graph_endpoint_flows(
        &self,
        identity: Identity,
        since_unix_ms: Option<i64>,
        until_unix_ms: Option<i64>,
        limit: u32,
    ) -> Result<Vec<EndpointFlowRow>, StoreError> {
        let (since, until) = (since_unix_ms.unwrap_or(i64::MIN), until_unix_ms.unwrap_or(i64::MAX));
        let id = i64::from(identity.0);
        let limit = i64::from(limit.min(MAX_GRAPH_ROWS));
        on_reader!(self, |pool, d| {
            let mut query = sqlx::query_as::<_, RawEndpointFlow>(AssertSqlSafe(endpoint_flows_sql(d)))
                .bind(id)
                .bind(since)
                .bind(until)
                .bind(limit);
            if d == Dialect::Sqlite {
                query = query.bind(format!(",{},", identity.0));
            }
            decode_all("graph_endpoint_flows", query.fetch_all(pool).await)
        })
    }

    /// Per (port, protocol): how many edges use it and how many distinct destinations
    /// serve it, over the whole graph.
    pub async fn port_usage(&self) -> Result<Vec<PortUsageRow>, StoreError> {
        on_reader!(self, |pool, _d| {
            let fetched = sqlx::query_as::<_, RawPortUsage>(PORT_USAGE_SQL).fetch_all(pool).await;
            decode_all("port_usage", fetched)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recombine_saturates() {
        assert_eq!(recombine(T, "c", 0, 7).expect("small"), 7);
        assert_eq!(recombine(T, "c", 1, 1).expect("carry"), (1 << 32) + 1);
        assert_eq!(recombine(T, "c", i64::MAX, i64::MAX).expect("huge"), i64::MAX as u64);
        assert!(recombine(T, "c", -1, 0).is_err(), "a negative half is corrupt");
    }

    #[test]
    fn members_are_bound_as_compact_json() {
        let m = |id, group, detail_src, detail_dst, in_scope| GroupMember {
            identity: Identity(id),
            group,
            detail_src,
            detail_dst,
            in_scope,
        };
        let q = GraphQuery {
            members: vec![m(256, 0, false, false, false), m(257, 3, true, true, true), m(2, 1, false, true, false)],
            ..Default::default()
        };
        assert_eq!(q.members_json(), "[[256,0,0],[257,3,7],[2,1,2]]");
        assert_eq!(GraphQuery::default().members_json(), "[]");
        assert_eq!(q.range(), (i64::MIN, i64::MAX));
    }

    #[test]
    fn statements_bind_only_numbered_parameters() {
        for d in [Dialect::Sqlite, Dialect::Postgres] {
            for scoped in [false, true] {
                for sql in [buckets_sql(d, scoped), size_sql(d, scoped), top_sql(d, scoped)] {
                    assert!(!sql.contains('?'), "{sql}");
                    assert!(sql.contains("$1") && sql.contains("$2") && sql.contains("$3"), "{sql}");
                }
                assert_eq!(verdicts_sql(d, scoped, true).contains("$4"), scoped);
            }
            assert_eq!(endpoint_flows_sql(d).contains("$5"), d == Dialect::Sqlite);
        }
    }
}
