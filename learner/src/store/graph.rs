//! Service-graph reads for the analysts' graph (`/api/v1/graph`, issue 5): the edges of
//! a time range (optionally only those touching a set of identities), the verdict events
//! of the range per edge, the flows of one workload per address pair (the endpoint
//! view), and how widely each port is used (proposal risk).
//!
//! The edges come back as **one** JSON array built by the database (`[[src, dst, port,
//! protocol, connections, bytes, first, last], …]`) and are folded in Rust
//! (`policy::graph_view`). Both obvious alternatives are slower on SQLite at 100k edges:
//! a row per edge costs the driver ~3 µs (300 ms), and folding in SQL sorts every edge
//! row through a temporary B-tree for the GROUP BY (~100 ms), while the folding itself
//! is a hash-map pass. One text value costs the database ~40 ms of CPU to build (read in
//! two halves at once) and this module a few to parse (a hand-written parser: the input
//! is a fixed shape of integers).
//!
//! Even so, reading every edge on every request is most of a graph answer's time, so on
//! SQLite the edges are kept in memory ([`EdgeMirror`]) and brought up to date before each
//! read from the flows written since the last one. That is exact, not a guess from
//! timestamps: every edge change is the upsert of a batch that also inserts the batch's
//! flows, in the same transaction, under SQLite's single writer; `flows.id` is
//! AUTOINCREMENT, so its sequence (`sqlite_sequence`) is a commit-ordered mark — every
//! flow at or below it is committed, and later ones get higher ids. The edges changed
//! since mark *m* are those whose key appears among the flows above *m*; if any of those
//! flows is already gone (pruned: a late batch of old flows), or the gap is so large that
//! one pass over the table is cheaper, every edge is read again. PostgreSQL gives no such
//! order (identity columns are not assigned in commit order, and several learners may
//! write), so it reads the range's edges on every request.
//!
//! Nothing else writes `edges` (a test checks the sources): pruning deletes flows only,
//! identities never change, and migrations run before the store opens. A learner restart
//! starts from a full read. Raw SQL that writes `edges` behind the learner's back is
//! not seen until the mirror next reads every edge (a restart at the latest).
//!
//! Counters are each edge's max(egress side, ingress side) (see `Store`'s docs), stored
//! saturated at i64::MAX. Every value is a bound parameter; the SQL text is built from
//! constants.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bulkhead_model::{Direction, Edge, EdgeKey, Identity, Protocol};
use serde::Serialize;
use sqlx::{AssertSqlSafe, SqlitePool};

use super::decode::{self, counter, port};
use super::prepare::{addr_from_db, protocol_from_db};
use super::{Inner, Store, StoreError};

/// Most rows any graph statement returns (a safety bound: callers check sizes first).
pub const MAX_GRAPH_ROWS: u32 = 200_000;

const T: &str = "edges";

// === inputs and rows ===

/// Which edges [`Store::graph_edges`] reads.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GraphEdgeQuery {
    /// Edges seen in `[since, until]` (`last_seen >= since`, `first_seen <= until`).
    pub since_unix_ms: Option<i64>,
    pub until_unix_ms: Option<i64>,
    /// Only edges with one of these identities on either end (`None`: every edge).
    pub scope: Option<Vec<Identity>>,
}

impl GraphEdgeQuery {
    fn range(&self) -> (i64, i64) {
        (self.since_unix_ms.unwrap_or(i64::MIN), self.until_unix_ms.unwrap_or(i64::MAX))
    }

    /// Whether `e` is one of the query's edges (what the SQL's WHERE clause says).
    fn matches(&self, e: &Edge, scope: Option<&HashSet<Identity>>) -> bool {
        let (since, until) = self.range();
        e.last_seen_unix_ms >= since
            && e.first_seen_unix_ms <= until
            && scope.is_none_or(|ids| ids.contains(&e.key.src) || ids.contains(&e.key.dst))
    }
}

/// The edges of a [`Store::graph_edges`] read.
#[derive(Debug, Clone)]
pub enum GraphEdges {
    /// Every edge: the mirror's current set, shared (nothing copied).
    All(Arc<EdgeSet>),
    /// The ones the query selected.
    Selected(Vec<Edge>),
}

impl GraphEdges {
    /// A name for this list under which every position always holds the same edge (see
    /// [`EdgeSet::name`]); `None` for a list of its own.
    pub fn list_name(&self) -> Option<u64> {
        match self {
            GraphEdges::All(set) => Some(set.name),
            GraphEdges::Selected(_) => None,
        }
    }
}

impl Deref for GraphEdges {
    type Target = [Edge];
    fn deref(&self) -> &[Edge] {
        match self {
            GraphEdges::All(set) => &set.edges,
            GraphEdges::Selected(edges) => edges,
        }
    }
}

/// Every edge of the store, with an index by key (so changed edges replace their old
/// values in place).
#[derive(Debug, Clone)]
pub struct EdgeSet {
    edges: Vec<Edge>,
    /// Key → position in `edges`; built by the first update, not by the full read (a
    /// learner's first graph answer need not wait for it).
    index: HashMap<EdgeKey, usize>,
    /// See [`EdgeSet::name`].
    name: u64,
}

/// Names of edge sets read from the table, unique in the process.
static SET_NAMES: AtomicU64 = AtomicU64::new(1);

impl Default for EdgeSet {
    fn default() -> Self {
        EdgeSet::new(Vec::new())
    }
}

impl EdgeSet {
    /// Every edge, as read (each key once).
    fn new(edges: Vec<Edge>) -> Self {
        EdgeSet { edges, index: HashMap::new(), name: SET_NAMES.fetch_add(1, Ordering::Relaxed) }
    }

    /// Names the order of the edges: updates replace values in place and add new edges
    /// at the end, so as long as sets carry this name, a position holds the same edge
    /// key (per-position caches of key-derived facts stay valid; a full read makes a new
    /// name).
    pub fn name(&self) -> u64 {
        self.name
    }

    /// Replaces each edge's old value (or adds the edge).
    fn apply(&mut self, changed: Vec<Edge>) {
        if self.index.len() < self.edges.len() {
            self.index = self.edges.iter().enumerate().map(|(i, e)| (e.key, i)).collect();
        }
        for e in changed {
            match self.index.get(&e.key) {
                Some(&i) => self.edges[i] = e,
                None => {
                    self.index.insert(e.key, self.edges.len());
                    self.edges.push(e);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.edges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.edges.is_empty()
    }
}

/// The SQLite store's edges kept in memory between graph reads (see the module docs).
/// One per learner (in the web state), shared by requests: a read brings it up to date
/// first, under its lock, so concurrent requests wait for one refresh instead of each
/// reading the table. Holds every edge (~100 bytes each with the index).
#[derive(Debug, Default)]
pub struct EdgeMirror {
    state: tokio::sync::Mutex<Mirrored>,
}

#[derive(Debug, Default)]
struct Mirrored {
    /// The flow mark the set is complete up to (`None`: never read).
    mark: Option<i64>,
    set: Arc<EdgeSet>,
}

/// Flows behind the mirror at most for an update from them rather than a full read: a
/// changed edge costs ~1.5 µs per flow naming it, a full read ~0.4 µs per edge.
fn max_flows_behind(edges: usize) -> i64 {
    i64::try_from(edges / 4).unwrap_or(i64::MAX).max(4_096)
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

fn port_of(table: &'static str, v: i64) -> Result<u16, StoreError> {
    port(table, "dst_port", i32::try_from(v).unwrap_or(-1))
}

fn protocol_of(table: &'static str, v: i64) -> Result<Protocol, StoreError> {
    protocol_from_db(table, i32::try_from(v).unwrap_or(-1))
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

/// What differs between the backends' SQL here: how a JSON array is built and read, and
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

/// One edge as a JSON array, in the order [`parse_edges`] reads.
macro_rules! edge_array {
    ($array:literal) => {
        concat!(
            $array,
            "(e.src_identity, e.dst_identity, e.dst_port, e.protocol, ",
            side_max!("connections"),
            ", ",
            side_max!("bytes"),
            ", e.first_seen_unix_ms, e.last_seen_unix_ms)"
        )
    };
}

impl Dialect {
    /// Identities from a JSON array parameter `$n`, as a subquery.
    fn id_list(self, n: u8) -> String {
        match self {
            Dialect::Sqlite => format!("(SELECT CAST(value AS INTEGER) FROM json_each(${n}))"),
            Dialect::Postgres => format!("(SELECT (x #>> '{{}}')::bigint FROM json_array_elements(${n}::json) AS x)"),
        }
    }
}

/// The edges of the range (`$1`, `$2`) as one JSON text. Scoped: only those with an
/// identity of `$3` on either end (the primary key finds the outgoing ones, the
/// destination index the incoming ones); else those with a source in `[$3, $4)` (a
/// primary-key range: the caller reads the table in parts, at once).
fn edges_sql(d: Dialect, scoped: bool) -> String {
    let filter = if scoped {
        let ids = d.id_list(3);
        format!("(e.src_identity IN {ids} OR e.dst_identity IN {ids})")
    } else {
        "e.src_identity >= $3 AND e.src_identity < $4".to_owned()
    };
    let (open, close) = match d {
        Dialect::Sqlite => (concat!("json_group_array(", edge_array!("json_array"), ")"), ""),
        Dialect::Postgres => (concat!("coalesce(json_agg(", edge_array!("json_build_array"), ")::text, '[]'"), ")"),
    };
    // SQLite has no statistics to tell a narrow range from a wide one and would walk
    // `edges_last_seen` for any range, a table lookup per edge (twice the time of a
    // scan over all of them): the unary `+` keeps it to one scan, whatever the range.
    let last_seen = match d {
        Dialect::Sqlite => "+e.last_seen_unix_ms",
        Dialect::Postgres => "e.last_seen_unix_ms",
    };
    format!(
        "SELECT {open}{close} AS edges FROM edges e \
         WHERE {last_seen} >= $1 AND e.first_seen_unix_ms <= $2 AND {filter}"
    )
}

/// The lowest and highest source identity with an edge (two primary-key probes; one
/// statement with both aggregates would scan the table on SQLite).
const SOURCE_SPAN_SQL: &str =
    "SELECT (SELECT min(src_identity) FROM edges) AS lowest, (SELECT max(src_identity) FROM edges) AS highest";

/// SQLite: the flow mark (see the module docs): the highest flow id ever assigned, 0
/// before the first flow.
const FLOW_MARK_SQL: &str = "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'flows'), 0)";

/// SQLite: how many flows with an id in `($1, $2]` still exist, and the current value of
/// every edge one of them names — one statement, so both come from one snapshot.
const EDGE_CHANGES_SQL: &str = concat!(
    "SELECT (SELECT count(*) FROM flows WHERE id > $1 AND id <= $2) AS present, ",
    "(SELECT json_group_array(",
    edge_array!("json_array"),
    ") FROM edges e WHERE (e.src_identity, e.dst_identity, e.dst_port, e.protocol) IN ",
    "(SELECT f.src_identity, f.dst_identity, f.dst_port, f.protocol FROM flows f WHERE f.id > $1 AND f.id <= $2)",
    ") AS edges"
);

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

/// Identities as a JSON array parameter.
fn id_json(ids: &[Identity]) -> String {
    let mut s = String::with_capacity(ids.len() * 6 + 2);
    s.push('[');
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&id.0.to_string());
    }
    s.push(']');
    s
}

/// Values per edge in the JSON the edge statement builds.
const EDGE_VALUES: usize = 8;

/// Parses `[[i64 × 8], …]` (whitespace allowed between tokens: PostgreSQL adds some).
/// Hand-written because it runs on every graph request over every edge, and the input
/// has one fixed shape; anything else is a corrupt value, not a guess.
fn parse_edges(text: &str) -> Result<Vec<[i64; EDGE_VALUES]>, StoreError> {
    let corrupt = |at: usize| StoreError::InvalidStoredValue {
        table: T,
        column: "edge array",
        value: format!("at byte {at}: {}", text.get(at..).unwrap_or("").chars().take(40).collect::<String>()),
    };
    let b = text.as_bytes();
    let mut i = 0;
    let skip = |i: &mut usize| {
        while b.get(*i).is_some_and(u8::is_ascii_whitespace) {
            *i += 1;
        }
    };
    let expect = |i: &mut usize, c: u8| -> Result<(), StoreError> {
        skip(i);
        if b.get(*i) == Some(&c) {
            *i += 1;
            Ok(())
        } else {
            Err(corrupt(*i))
        }
    };
    let number = |i: &mut usize| -> Result<i64, StoreError> {
        skip(i);
        let start = *i;
        let negative = b.get(*i) == Some(&b'-');
        if negative {
            *i += 1;
        }
        let digits = *i;
        let mut v: i64 = 0;
        while let Some(d) = b.get(*i).filter(|c| c.is_ascii_digit()) {
            // Accumulate negatively: i64::MIN has no positive counterpart.
            v = v.checked_mul(10).and_then(|v| v.checked_sub(i64::from(d - b'0'))).ok_or_else(|| corrupt(start))?;
            *i += 1;
        }
        if *i == digits {
            return Err(corrupt(start));
        }
        if negative { Ok(v) } else { v.checked_neg().ok_or_else(|| corrupt(start)) }
    };
    let mut out = Vec::new();
    expect(&mut i, b'[')?;
    skip(&mut i);
    if b.get(i) == Some(&b']') {
        i += 1;
    } else {
        loop {
            expect(&mut i, b'[')?;
            let mut edge = [0; EDGE_VALUES];
            for (n, v) in edge.iter_mut().enumerate() {
                if n > 0 {
                    expect(&mut i, b',')?;
                }
                *v = number(&mut i)?;
            }
            expect(&mut i, b']')?;
            out.push(edge);
            skip(&mut i);
            match b.get(i) {
                Some(b',') => i += 1,
                Some(b']') => {
                    i += 1;
                    break;
                }
                _ => return Err(corrupt(i)),
            }
        }
    }
    skip(&mut i);
    if i == b.len() { Ok(out) } else { Err(corrupt(i)) }
}

fn edge_from_array(v: [i64; EDGE_VALUES]) -> Result<Edge, StoreError> {
    let [src, dst, dst_port, protocol, connections, bytes, first_seen_unix_ms, last_seen_unix_ms] = v;
    Ok(Edge {
        key: EdgeKey {
            src: decode::identity(T, "src_identity", src)?,
            dst: decode::identity(T, "dst_identity", dst)?,
            dst_port: port_of(T, dst_port)?,
            protocol: protocol_of(T, protocol)?,
        },
        first_seen_unix_ms,
        last_seen_unix_ms,
        connections: counter(T, "connections", connections)?,
        bytes: counter(T, "bytes", bytes)?,
    })
}

// === impl Store ===

impl Store {
    /// The edges of `q`'s range (see [`GraphEdgeQuery`]), in no particular order, as of
    /// this call (every batch committed before it is in). Their counters are max(egress
    /// side, ingress side).
    ///
    /// On SQLite they come from `mirror` (see the module docs), brought up to date
    /// first: every edge shared as is when `q` asks for all of them, else a copy of the
    /// matching ones. On PostgreSQL they are read from the table.
    pub async fn graph_edges(&self, q: &GraphEdgeQuery, mirror: &EdgeMirror) -> Result<GraphEdges, StoreError> {
        match &self.inner {
            Inner::Sqlite(s) => {
                let set = self.mirrored_edges(&s.reader, mirror).await?;
                if q.since_unix_ms.is_none() && q.until_unix_ms.is_none() && q.scope.is_none() {
                    return Ok(GraphEdges::All(set));
                }
                let scope = q.scope.as_ref().map(|ids| ids.iter().copied().collect());
                Ok(GraphEdges::Selected(set.edges.iter().filter(|e| q.matches(e, scope.as_ref())).cloned().collect()))
            }
            Inner::Postgres(_) => Ok(GraphEdges::Selected(self.read_graph_edges(q).await?)),
        }
    }

    /// SQLite: the mirror's set, brought up to date under its lock (see the module docs).
    async fn mirrored_edges(&self, pool: &SqlitePool, mirror: &EdgeMirror) -> Result<Arc<EdgeSet>, StoreError> {
        const OP: &str = "graph_edges";
        let mut m = mirror.state.lock().await;
        let mark: i64 = sqlx::query_scalar(FLOW_MARK_SQL).fetch_one(pool).await.map_err(StoreError::db(OP))?;
        match m.mark {
            Some(seen) if seen == mark => return Ok(m.set.clone()),
            Some(seen) if seen < mark && mark - seen <= max_flows_behind(m.set.len()) => {
                let (present, text): (i64, String) = sqlx::query_as(EDGE_CHANGES_SQL)
                    .bind(seen)
                    .bind(mark)
                    .fetch_one(pool)
                    .await
                    .map_err(StoreError::db(OP))?;
                if present == mark - seen {
                    let changed = parse_edges(&text)?.into_iter().map(edge_from_array).collect::<Result<_, _>>()?;
                    Arc::make_mut(&mut m.set).apply(changed);
                    m.mark = Some(mark);
                    return Ok(m.set.clone());
                }
                tracing::debug!(
                    seen,
                    mark,
                    present,
                    "Flows since the last graph read were pruned: reading every edge."
                );
            }
            _ => {}
        }
        // Read after the mark: whatever commits in between is in the set already and
        // is read again by the next update (an edge's current value replaces it).
        let set = EdgeSet::new(self.read_graph_edges(&GraphEdgeQuery::default()).await?);
        m.set = Arc::new(set);
        m.mark = Some(mark);
        Ok(m.set.clone())
    }

    /// The edges of `q`'s range read from the table.
    ///
    /// Unscoped, the table is read in two halves of the source identities at once, on
    /// two connections: building the JSON is most of the time and runs on the
    /// database's side, so two cores halve it. Each edge is in exactly one half; an
    /// ingest committing in between shows in one half only, as if read a moment apart.
    async fn read_graph_edges(&self, q: &GraphEdgeQuery) -> Result<Vec<Edge>, StoreError> {
        const OP: &str = "graph_edges";
        let (since, until) = q.range();
        // Each part is parsed as soon as it arrives, while the other is still being built.
        let decoded = |text: Result<String, sqlx::Error>| -> Result<Vec<Edge>, StoreError> {
            parse_edges(&text.map_err(StoreError::db(OP))?)?.into_iter().map(edge_from_array).collect()
        };
        on_reader!(self, |pool, d| {
            let sql = edges_sql(d, q.scope.is_some());
            let part = |from: i64, to: i64| {
                let fetch = sqlx::query_scalar::<_, String>(AssertSqlSafe(sql.clone()))
                    .bind(since)
                    .bind(until)
                    .bind(from)
                    .bind(to)
                    .fetch_one(pool);
                async move { decoded(fetch.await) }
            };
            match &q.scope {
                Some(ids) => {
                    let one = sqlx::query_scalar::<_, String>(AssertSqlSafe(sql.clone()))
                        .bind(since)
                        .bind(until)
                        .bind(id_json(ids))
                        .fetch_one(pool);
                    decoded(one.await)
                }
                None => {
                    let (lowest, highest): (Option<i64>, Option<i64>) =
                        sqlx::query_as(SOURCE_SPAN_SQL).fetch_one(pool).await.map_err(StoreError::db(OP))?;
                    match (lowest, highest) {
                        (Some(lo), Some(hi)) if hi > lo => {
                            let mid = lo + (hi - lo) / 2 + 1;
                            let (mut a, b) = tokio::try_join!(part(lo, mid), part(mid, i64::MAX))?;
                            a.extend(b);
                            Ok(a)
                        }
                        _ => part(i64::MIN, i64::MAX).await,
                    }
                }
            }
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
        let ids = scope.map(id_json);
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
    fn edge_arrays_parse_in_both_spellings() {
        let sqlite = "[[256,257,80,6,12,3400,1000,2000],[2,300,443,17,0,9223372036854775807,-5,7]]";
        let pg = "[[256, 257, 80, 6, 12, 3400, 1000, 2000], \n [2, 300, 443, 17, 0, 9223372036854775807, -5, 7]]";
        let want = vec![[256, 257, 80, 6, 12, 3400, 1000, 2000], [2, 300, 443, 17, 0, i64::MAX, -5, 7]];
        assert_eq!(parse_edges(sqlite).expect("sqlite"), want);
        assert_eq!(parse_edges(pg).expect("postgres"), want);
        assert_eq!(parse_edges("[]").expect("empty"), Vec::<[i64; 8]>::new());
        assert_eq!(parse_edges(" [ ] ").expect("spaced"), Vec::<[i64; 8]>::new());
        assert_eq!(parse_edges("[[1,2,3,4,5,6,-9223372036854775808,8]]").expect("min")[0][6], i64::MIN);
        for bad in [
            "",
            "[",
            "[[1,2,3,4,5,6,7]]",
            "[[1,2,3,4,5,6,7,8,9]]",
            "[[1,2,3,4,5,6,7,8]",
            "[[1,2,3,4,5,6,7,8]]x",
            "[[1,2,3,4,5,6,7,1.5]]",
            "[[1,2,3,4,5,6,7,9223372036854775808]]",
            "[[1,2,3,4,5,6,7,-]]",
            "[[1,2,3,4,5,6,7,\"8\"]]",
            "[[1,2,3,4,5,6,7,8],]",
        ] {
            assert!(parse_edges(bad).is_err(), "{bad:?}");
        }
        let e = edge_from_array([256, 257, 80, 6, 12, 3400, 1000, 2000]).expect("edge");
        assert_eq!(e.key, EdgeKey { src: Identity(256), dst: Identity(257), dst_port: 80, protocol: Protocol::Tcp });
        assert_eq!((e.connections, e.bytes, e.first_seen_unix_ms, e.last_seen_unix_ms), (12, 3400, 1000, 2000));
        assert!(edge_from_array([256, 257, 70_000, 6, 0, 0, 0, 0]).is_err(), "port out of range");
        assert!(edge_from_array([256, 257, 80, 6, -1, 0, 0, 0]).is_err(), "negative counter");
        assert!(edge_from_array([-1, 257, 80, 6, 0, 0, 0, 0]).is_err(), "negative identity");
        assert_eq!(id_json(&[Identity(256), Identity(2)]), "[256,2]");
        assert_eq!(id_json(&[]), "[]");
    }

    fn flow(src: Identity, dst: Identity, port: u16, direction: Direction, seen: i64) -> crate::store::ResolvedFlow {
        let f = bulkhead_model::Flow {
            src_addr: "10.0.0.1".parse().expect("ip"),
            src_port: 0,
            dst_addr: "10.0.0.2".parse().expect("ip"),
            dst_port: port,
            protocol: Protocol::Tcp,
            direction,
            netns_ino: 1,
            cgroup_id: 0,
            pid: 1,
            comm: "c".into(),
            connections: 2,
            bytes_sent: 10,
            bytes_received: 5,
            packets: 1,
            verdict: bulkhead_model::Verdict::Forwarded,
            first_seen_unix_ms: seen - 1,
            last_seen_unix_ms: seen,
            http: Default::default(),
        };
        crate::store::ResolvedFlow { flow: f, src_identity: src, dst_identity: dst }
    }

    async fn ingest(store: &Store, seq: u64, flows: Vec<crate::store::ResolvedFlow>) {
        let batch = crate::store::IngestBatch {
            node_id: "n".into(),
            boot_id: "b".into(),
            seq,
            received_unix_ms: 1_000_000,
            flows,
            endpoints: None,
            dns_answers: Vec::new(),
            loss: Default::default(),
        };
        store.ingest(&batch).await.expect("ingest");
    }

    fn sorted(mut edges: Vec<Edge>) -> Vec<Edge> {
        edges.sort_by_key(|e| e.key);
        edges
    }

    /// The mirror answers exactly what reading the table answers, after every kind of
    /// change: new edges, updated ones, nothing new, and flows pruned before it saw them.
    #[tokio::test]
    async fn the_mirror_follows_every_write() {
        let store = Store::open("sqlite::memory:").await.expect("store");
        let id = |app: &'static str| {
            let store = store.clone();
            async move { store.ensure_identity(&bulkhead_model::Labels::new([("app", app)]).expect("labels")).await }
        };
        let (a, b, c) = (id("a").await.expect("a"), id("b").await.expect("b"), id("c").await.expect("c"));
        let mirror = EdgeMirror::default();
        let all = GraphEdgeQuery::default();
        let check = |what: &'static str| {
            let (store, mirror) = (store.clone(), &mirror);
            async move {
                for q in [
                    GraphEdgeQuery::default(),
                    GraphEdgeQuery { since_unix_ms: Some(900_000), ..Default::default() },
                    GraphEdgeQuery { until_unix_ms: Some(500_000), ..Default::default() },
                    GraphEdgeQuery { scope: Some(vec![c]), ..Default::default() },
                ] {
                    let mirrored = store.graph_edges(&q, mirror).await.expect("mirrored").to_vec();
                    let read = store.read_graph_edges(&q).await.expect("read");
                    assert_eq!(sorted(mirrored), sorted(read), "{what}: {q:?}");
                }
            }
        };
        check("empty").await;
        assert!(store.graph_edges(&all, &mirror).await.expect("edges").is_empty());

        ingest(
            &store,
            1,
            vec![flow(a, b, 80, Direction::Egress, 1_000_000), flow(a, c, 443, Direction::Egress, 1_000_000)],
        )
        .await;
        check("first batch").await;
        // The other side reports (max, not sum), one edge is new, one is untouched.
        ingest(
            &store,
            2,
            vec![flow(a, b, 80, Direction::Ingress, 1_000_100), flow(a, b, 80, Direction::Ingress, 1_000_200)],
        )
        .await;
        ingest(&store, 3, vec![flow(c, a, 22, Direction::Egress, 1_000_300)]).await;
        check("updates and a new edge").await;
        let edges = store.graph_edges(&all, &mirror).await.expect("edges");
        let ab = edges.iter().find(|e| e.key.src == a && e.key.dst == b).expect("a → b");
        assert_eq!((ab.connections, ab.bytes, ab.last_seen_unix_ms), (4, 30, 1_000_200));
        assert!(matches!(edges, GraphEdges::All(_)), "every edge is shared, not copied");
        let again = store.graph_edges(&all, &mirror).await.expect("edges");
        let (GraphEdges::All(x), GraphEdges::All(y)) = (&edges, &again) else { unreachable!() };
        assert!(Arc::ptr_eq(x, y), "nothing written: the same set");
        check("nothing new").await;

        // A late batch of old flows, pruned before the mirror saw it: its edge change is
        // only in `edges`, so the mirror must notice the missing flows and read again.
        ingest(
            &store,
            4,
            vec![flow(b, c, 53, Direction::Egress, 100_000), flow(a, c, 443, Direction::Egress, 100_000)],
        )
        .await;
        assert_eq!(store.prune_flows(200_000).await.expect("prune"), 2);
        check("pruned before seen").await;
        let edges = store.graph_edges(&all, &mirror).await.expect("edges");
        assert_eq!(edges.len(), 4);
        let ac = edges.iter().find(|e| e.key.src == a && e.key.dst == c).expect("a → c");
        assert_eq!((ac.connections, ac.first_seen_unix_ms), (4, 99_999));
    }

    /// The mirror is exact only while every write to `edges` is a batch's upsert next to
    /// the batch's flows (see the module docs). A new statement that writes the table
    /// anywhere else (a merge of identities, a cleanup) must invalidate the mirror: this
    /// fails until it is looked at.
    #[test]
    fn edges_are_written_by_ingest_only() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut writers = Vec::new();
        let mut pending = vec![dir.clone()];
        while let Some(d) = pending.pop() {
            for entry in std::fs::read_dir(&d).expect("source dir") {
                let path = entry.expect("dir entry").path();
                if path.is_dir() {
                    pending.push(path);
                    continue;
                }
                if path.extension().is_none_or(|x| x != "rs") || path.ends_with("store/graph.rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).expect("source file");
                // The store's SQL spells keywords in capitals (prose says "into edges" too).
                let words = text.split_whitespace().collect::<Vec<_>>().join(" ");
                let writes = ["INTO edges", "UPDATE edges", "DELETE FROM edges", "TRUNCATE edges"];
                if writes.iter().any(|w| words.contains(w)) {
                    writers.push(path.strip_prefix(&dir).expect("under src").display().to_string());
                }
            }
        }
        writers.sort();
        assert_eq!(writers, ["store/postgres.rs", "store/sqlite_ingest.rs"], "statements writing `edges`");
    }

    #[test]
    fn statements_bind_only_numbered_parameters() {
        for d in [Dialect::Sqlite, Dialect::Postgres] {
            for scoped in [false, true] {
                let sql = edges_sql(d, scoped);
                assert!(!sql.contains('?'), "{sql}");
                assert!(sql.contains("$1") && sql.contains("$2") && sql.contains("$3"), "{sql}");
                assert_eq!(sql.contains("$4"), !scoped, "{sql}");
                assert_eq!(verdicts_sql(d, scoped, true).contains("$4"), scoped);
            }
            assert_eq!(endpoint_flows_sql(d).contains("$5"), d == Dialect::Sqlite);
        }
    }
}
