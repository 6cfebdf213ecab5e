//! What the analysts' observe pages read (issue 5, DESIGN.md §6): the overview's flow
//! rate, top talkers and totals; the flows table's filtered keyset pages and its live
//! tail; workload names and endpoints; and the two user changes that must leave an
//! enabled admin behind.
//!
//! **Flow pages stay fast with millions of rows.** The flows table carries no per-flow
//! index on SQLite's ingest path (see migration 0001), so a filter cannot be an index
//! lookup. Instead a page walks id windows newest first ([`FLOW_SCAN_WINDOW`] ids per
//! statement, each a primary-key range scan with the filters applied and a LIMIT), and
//! stops when the page is full or after [`FLOW_SCAN_BUDGET`] ids. A page that ran out
//! of budget says so ([`FlowPage::partial`]) and hands back where it stopped, so the
//! next page continues exactly there: every request does bounded work whatever the
//! filter's selectivity, and no page ever uses OFFSET. The one filter that looks for rare
//! rows — verdict audit / denied — walks the partial index `flows_not_forwarded`
//! (migration 0006) instead, which holds only those flows.
//!
//! **The live tail reads forward** from a cursor in windows of the same size, at most a
//! batch per call, and skips ahead when it falls more than [`MAX_TAIL_BACKLOG`] ids
//! behind (saying how many it skipped): a live view shows what happens now. On SQLite
//! ids are committed in order (one writer), so the tail sees every row. On PostgreSQL
//! two ingest transactions may commit out of id order; a row of the slower one can
//! then land below a cursor that already moved past it and is not shown live (the table
//! view still has it).

use std::collections::HashMap;

use bulkhead_model::{Identity, Labels, Protocol, Verdict};
use serde::Serialize;
use sqlx::{Database, Encode, Postgres, QueryBuilder, Sqlite, Type};

use super::decode::{self, LabelCache, RawEdge, RawEndpoint, RawFlow};
use super::prepare::verdict_code;
use super::users::{self, UserSql};
use super::{EdgeRow, EndpointRow, FlowRow, Inner, Store, StoreError, UserRow, username_of};
use crate::auth::Role;

/// Flow ids one statement of a flows page or tail scans.
pub const FLOW_SCAN_WINDOW: i64 = 50_000;
/// Flow ids one flows page scans at most before it returns what it found.
pub const FLOW_SCAN_BUDGET: i64 = 250_000;
/// A live tail further behind than this many ids jumps ahead.
pub const MAX_TAIL_BACKLOG: i64 = 20_000;
/// Largest page of [`Store::flow_page`] and batch of [`Store::flows_after`].
pub const MAX_FLOW_VIEW_PAGE: u32 = 1_000;
/// Most identities a [`FlowFilter`] may name (each is two bound parameters).
pub const MAX_FILTER_IDENTITIES: usize = 4_000;
/// Most buckets [`Store::flow_rate`] returns.
pub const MAX_RATE_BUCKETS: i64 = 2_000;

// === flows ===

/// What the flows page filters on; `Default` = every flow.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlowFilter {
    /// Only flows with one of these identities on either end; `None` = any. An empty
    /// list matches nothing (a namespace with no workloads). At most
    /// [`MAX_FILTER_IDENTITIES`].
    pub identities: Option<Vec<Identity>>,
    pub dst_port: Option<u16>,
    pub protocol: Option<Protocol>,
    pub verdict: Option<Verdict>,
    /// Only flows seen at or after this time (`last_seen >= since`).
    pub since_unix_ms: Option<i64>,
    /// Only flows that began at or before this time (`first_seen <= until`).
    pub until_unix_ms: Option<i64>,
}

impl FlowFilter {
    fn matches_nothing(&self) -> bool {
        self.identities.as_ref().is_some_and(Vec::is_empty)
            || matches!((self.since_unix_ms, self.until_unix_ms), (Some(s), Some(u)) if s > u)
    }

    fn check(&self) -> Result<(), StoreError> {
        match &self.identities {
            Some(ids) if ids.len() > MAX_FILTER_IDENTITIES => {
                Err(StoreError::OutOfRange { field: "identities", value: ids.len() as u64 })
            }
            _ => Ok(()),
        }
    }

    /// Verdicts whose flows the partial index `flows_not_forwarded` holds.
    fn rare_verdict(&self) -> bool {
        matches!(self.verdict, Some(Verdict::Audit | Verdict::Denied))
    }
}

/// One page of flows, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowPage {
    pub rows: Vec<FlowRow>,
    /// Pass as the next request's `before_id` to continue with older flows; `None` when
    /// nothing older can match.
    pub older_than: Option<i64>,
    /// The scan budget ran out before the page filled: flows from `older_than` up were
    /// all examined, older ones were not yet.
    pub partial: bool,
}

/// What the live tail found after its cursor, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowTail {
    pub rows: Vec<FlowRow>,
    /// Every flow up to this id was examined: the next call's `after_id`.
    pub cursor: i64,
    /// Flow ids jumped over because the tail was more than [`MAX_TAIL_BACKLOG`] behind.
    pub skipped: u64,
}

/// Which way a flow scan walks.
#[derive(Debug, Clone, Copy)]
enum Walk {
    /// `lo <= id < hi`, newest first.
    Down { lo: i64, hi: i64 },
    /// `lo < id <= hi`, oldest first.
    Up { lo: i64, hi: i64 },
    /// `id < hi` through the partial verdict index, newest first.
    RareDown { hi: i64 },
}

/// The flow columns with each flow's node and receive time. SQLite keeps those once
/// per batch in `flow_blocks` (the block holding an id is the one with the greatest
/// first id at or below it: a primary-key seek, run only for the rows returned).
const SQLITE_FLOW_SELECT: &str = "SELECT f.id, \
     COALESCE((SELECT b.node_id FROM flow_blocks b WHERE b.first_flow_id <= f.id \
               ORDER BY b.first_flow_id DESC LIMIT 1), '') AS node_id, \
     COALESCE((SELECT b.received_unix_ms FROM flow_blocks b WHERE b.first_flow_id <= f.id \
               ORDER BY b.first_flow_id DESC LIMIT 1), 0) AS received_unix_ms, \
     f.src_identity, f.dst_identity, f.src_addr, f.src_port, f.dst_addr, f.dst_port, f.protocol, f.direction, \
     f.netns_ino, f.cgroup_id, f.pid, f.comm, f.connections, f.bytes_sent, f.bytes_received, f.packets, \
     f.verdict, f.first_seen_unix_ms, f.last_seen_unix_ms ";

/// PostgreSQL keeps node and receive time on every flow.
const POSTGRES_FLOW_SELECT: &str = "SELECT f.id, f.node_id, f.received_unix_ms, \
     f.src_identity, f.dst_identity, f.src_addr, f.src_port, f.dst_addr, f.dst_port, f.protocol, f.direction, \
     f.netns_ino, f.cgroup_id, f.pid, f.comm, f.connections, f.bytes_sent, f.bytes_received, f.packets, \
     f.verdict, f.first_seen_unix_ms, f.last_seen_unix_ms ";

/// Both subqueries are separate so each is a one-row index probe (SQLite computes a
/// lone `min` or `max` from the primary key, but not the two together).
const SELECT_FLOW_ID_BOUNDS: &str = "SELECT (SELECT min(id) FROM flows) AS lo, (SELECT max(id) FROM flows) AS hi";

/// One scan statement: the select, the walk's id range, the filters, order and limit.
/// `sqlite`: SQLite names the partial index explicitly (`INDEXED BY`), so a rare-verdict
/// walk can never silently become a table scan.
fn flow_scan<DB>(sqlite: bool, f: &FlowFilter, walk: Walk, limit: i64) -> QueryBuilder<DB>
where
    DB: Database,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
    for<'a> i32: Encode<'a, DB> + Type<DB>,
    for<'a> i16: Encode<'a, DB> + Type<DB>,
{
    let mut b = QueryBuilder::new(if sqlite { SQLITE_FLOW_SELECT } else { POSTGRES_FLOW_SELECT });
    match walk {
        Walk::Down { lo, hi } => {
            b.push("FROM flows f WHERE f.id >= ").push_bind(lo).push(" AND f.id < ").push_bind(hi);
        }
        Walk::Up { lo, hi } => {
            b.push("FROM flows f WHERE f.id > ").push_bind(lo).push(" AND f.id <= ").push_bind(hi);
        }
        Walk::RareDown { hi } => {
            b.push(if sqlite { "FROM flows f INDEXED BY flows_not_forwarded " } else { "FROM flows f " });
            // Literal, not bound: it must match the index's predicate for either planner.
            b.push("WHERE f.verdict <> 1 AND f.id < ").push_bind(hi);
        }
    }
    if let Some(ids) = &f.identities {
        for (i, side) in ["f.src_identity", "f.dst_identity"].into_iter().enumerate() {
            b.push(if i == 0 { " AND (" } else { " OR " }).push(side).push(" IN (");
            let mut list = b.separated(", ");
            for id in ids {
                list.push_bind(i64::from(id.0));
            }
            b.push(")");
        }
        b.push(")");
    }
    if let Some(port) = f.dst_port {
        b.push(" AND f.dst_port = ").push_bind(i32::from(port));
    }
    if let Some(protocol) = f.protocol {
        b.push(" AND f.protocol = ").push_bind(i32::from(protocol.number()));
    }
    if let Some(verdict) = f.verdict {
        b.push(" AND f.verdict = ").push_bind(verdict_code(verdict));
    }
    if let Some(since) = f.since_unix_ms {
        b.push(" AND f.last_seen_unix_ms >= ").push_bind(since);
    }
    if let Some(until) = f.until_unix_ms {
        b.push(" AND f.first_seen_unix_ms <= ").push_bind(until);
    }
    b.push(match walk {
        Walk::Up { .. } => " ORDER BY f.id ASC LIMIT ",
        Walk::Down { .. } | Walk::RareDown { .. } => " ORDER BY f.id DESC LIMIT ",
    });
    b.push_bind(limit);
    b
}

// === overview ===

/// Flows received in one bucket of [`Store::flow_rate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RateBucket {
    pub start_unix_ms: i64,
    /// Flow records stored from batches received in the bucket.
    pub flows: u64,
    pub batches: u64,
}

/// How [`Store::top_edges`] ranks edges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TalkerOrder {
    Connections,
    Bytes,
}

/// Counts the overview shows in its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct DashboardTotals {
    /// Allocated identities (reserved ones not counted).
    pub workloads: u64,
    pub endpoints: u64,
    pub edges: u64,
    /// Proposal versions waiting for a review.
    pub pending_proposals: u64,
}

/// Batches received in `[$1, $2)`, per bucket of `$3` ms from `$1`, through the
/// `ingested_batches_received` index. Batch records are kept 7 days (the server's
/// retention), longer than flows.
const SELECT_FLOW_RATE: &str = "SELECT CAST((received_unix_ms - $1) / $3 AS BIGINT) AS bucket, \
     CAST(sum(flows) AS BIGINT) AS flows, CAST(count(*) AS BIGINT) AS batches \
     FROM ingested_batches WHERE received_unix_ms >= $1 AND received_unix_ms < $2 \
     GROUP BY 1 ORDER BY 1";

/// The top `$2` edges seen since `$1` by `max(egress, ingress)` connections (never
/// double counting, see `EdgeRow`), ranked before the label join so only they are
/// joined.
const SELECT_TOP_EDGES_BY_CONNECTIONS: &str = "SELECT e.src_identity, e.dst_identity, e.dst_port, e.protocol, \
     e.first_seen_unix_ms, e.last_seen_unix_ms, e.connections_egress, e.bytes_egress, e.connections_ingress, \
     e.bytes_ingress, s.labels AS src_labels, d.labels AS dst_labels \
     FROM (SELECT * FROM edges WHERE last_seen_unix_ms >= $1 \
           ORDER BY CASE WHEN connections_egress > connections_ingress THEN connections_egress \
                    ELSE connections_ingress END DESC, src_identity, dst_identity, dst_port, protocol \
           LIMIT $2) e \
     JOIN identities s ON s.id = e.src_identity JOIN identities d ON d.id = e.dst_identity \
     ORDER BY CASE WHEN e.connections_egress > e.connections_ingress THEN e.connections_egress \
              ELSE e.connections_ingress END DESC, e.src_identity, e.dst_identity, e.dst_port, e.protocol";

/// [`SELECT_TOP_EDGES_BY_CONNECTIONS`] by bytes.
const SELECT_TOP_EDGES_BY_BYTES: &str = "SELECT e.src_identity, e.dst_identity, e.dst_port, e.protocol, \
     e.first_seen_unix_ms, e.last_seen_unix_ms, e.connections_egress, e.bytes_egress, e.connections_ingress, \
     e.bytes_ingress, s.labels AS src_labels, d.labels AS dst_labels \
     FROM (SELECT * FROM edges WHERE last_seen_unix_ms >= $1 \
           ORDER BY CASE WHEN bytes_egress > bytes_ingress THEN bytes_egress ELSE bytes_ingress END DESC, \
                    src_identity, dst_identity, dst_port, protocol \
           LIMIT $2) e \
     JOIN identities s ON s.id = e.src_identity JOIN identities d ON d.id = e.dst_identity \
     ORDER BY CASE WHEN e.bytes_egress > e.bytes_ingress THEN e.bytes_egress ELSE e.bytes_ingress END DESC, \
              e.src_identity, e.dst_identity, e.dst_port, e.protocol";

const SELECT_TOTALS: &str = "SELECT \
     (SELECT count(*) FROM identities WHERE id >= 256) AS workloads, \
     (SELECT count(*) FROM endpoints) AS endpoints, \
     (SELECT count(*) FROM edges) AS edges, \
     (SELECT count(*) FROM proposals WHERE status = 'proposed') AS pending_proposals";

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawTotals {
    pub workloads: i64,
    pub endpoints: i64,
    pub edges: i64,
    pub pending_proposals: i64,
}

// === workloads ===

/// An identity with the name people know it by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkloadEntry {
    pub identity: Identity,
    /// The workload name an endpoint or a proposal reported (`namespace/name` in
    /// Kubernetes), else one made from the usual name labels, else `identity-<n>`;
    /// `reserved:<entity>` for reserved identities.
    pub name: String,
    pub namespace: Option<String>,
    pub labels: Labels,
    pub created_unix_ms: i64,
}

/// One name per identity from the endpoint snapshots (the smallest, so it is stable).
const SELECT_ENDPOINT_NAMES: &str = "SELECT identity AS id, min(workload) AS name FROM endpoints \
     WHERE workload IS NOT NULL GROUP BY identity";

/// The workload name of each target's newest proposal version.
const SELECT_PROPOSAL_NAMES: &str = "SELECT target_identity AS id, workload AS name FROM proposals \
     WHERE id IN (SELECT max(id) FROM proposals GROUP BY target_identity)";

/// One identity's endpoints, through the `endpoints_identity` index.
const SELECT_ENDPOINTS_OF: &str = "SELECT node_id, netns_ino, netns_name, host, identity, workload, \
     addresses, cgroups, updated_unix_ms FROM endpoints WHERE identity = $1 ORDER BY node_id, netns_ino";

/// A name from the labels people usually name things by, else the number (the same
/// rule synthesis uses for workloads without a reported name).
fn fallback_name(id: Identity, labels: &Labels) -> String {
    if let Some(r) = id.reserved() {
        return format!("reserved:{}", r.name());
    }
    labels.workload_name().unwrap_or_else(|| format!("identity-{}", id.0))
}

// === users ===

/// The outcome of a user change that must leave an enabled admin behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeepAdmin<T> {
    /// The change was made (and audited).
    Done(T),
    /// Refused: the user is the last enabled admin and would stop being one.
    LastAdmin,
}

/// Enabled admins, locked on PostgreSQL (in id order, so two such changes never
/// deadlock) so a concurrent demotion of another admin waits and then counts again.
const SELECT_ENABLED_ADMINS: &str = "SELECT id FROM users WHERE role = 'admin' AND NOT disabled ORDER BY id";
const SELECT_ENABLED_ADMINS_FOR_UPDATE: &str =
    "SELECT id FROM users WHERE role = 'admin' AND NOT disabled ORDER BY id FOR UPDATE";

/// Whether taking `user` to (`role`, `disabled`) leaves no enabled admin, given the
/// ids of all enabled admins.
fn removes_last_admin(user: &UserRow, role: Role, disabled: bool, admins: &[i64]) -> bool {
    let is_admin_now = user.role == Role::Admin && !user.disabled;
    let stays_admin = role == Role::Admin && !disabled;
    is_admin_now && !stays_admin && admins.iter().all(|id| *id == user.id)
}

/// What a guarded change does once the guard passed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum UserChange {
    Role(Role),
    Disabled(bool),
}

/// Runs a statement or a decode on whichever backend the store wraps, binding the
/// backend's read pool to `$pool` and whether it is SQLite to `$sqlite`.
macro_rules! on_reader {
    ($store:expr, $pool:ident, $sqlite:ident => $body:expr) => {
        match &$store.inner {
            Inner::Sqlite(s) => {
                let $pool = &s.reader;
                let $sqlite = true;
                $body
            }
            Inner::Postgres(p) => {
                let $pool = &p.pool;
                let $sqlite = false;
                $body
            }
        }
    };
}

impl Store {
    // === flows ===

    /// The lowest and highest stored flow id; `None` when there are no flows.
    pub async fn flow_id_bounds(&self) -> Result<Option<(i64, i64)>, StoreError> {
        let (lo, hi): (Option<i64>, Option<i64>) = on_reader!(self, pool, _sqlite => {
            sqlx::query_as(SELECT_FLOW_ID_BOUNDS).fetch_one(pool).await.map_err(StoreError::db("flow_id_bounds"))?
        });
        Ok(lo.zip(hi))
    }

    /// Flows matching `filter` with ids below `before_id` (all when `None`), newest
    /// first, at most `limit` (capped at [`MAX_FLOW_VIEW_PAGE`]). Bounded work per call
    /// (see the module docs); [`FlowPage::older_than`] continues the walk.
    pub async fn flow_page(
        &self,
        filter: &FlowFilter,
        before_id: Option<i64>,
        limit: u32,
    ) -> Result<FlowPage, StoreError> {
        self.flow_page_scanning(filter, before_id, limit, FLOW_SCAN_WINDOW, FLOW_SCAN_BUDGET).await
    }

    /// [`Store::flow_page`] with the window and budget as parameters (tests use small ones).
    async fn flow_page_scanning(
        &self,
        filter: &FlowFilter,
        before_id: Option<i64>,
        limit: u32,
        window: i64,
        budget: i64,
    ) -> Result<FlowPage, StoreError> {
        filter.check()?;
        let limit = usize::try_from(limit.clamp(1, MAX_FLOW_VIEW_PAGE)).unwrap_or(1);
        let empty = FlowPage { rows: Vec::new(), older_than: None, partial: false };
        if filter.matches_nothing() {
            return Ok(empty);
        }
        let Some((min_id, max_id)) = self.flow_id_bounds().await? else { return Ok(empty) };
        let mut cursor = before_id.unwrap_or(i64::MAX).min(max_id.saturating_add(1));
        if cursor <= min_id {
            return Ok(empty);
        }
        if filter.rare_verdict() {
            let rows = self.scan_flows(filter, Walk::RareDown { hi: cursor }, limit).await?;
            let older_than = if rows.len() == limit { rows.last().map(|r| r.id) } else { None };
            return Ok(FlowPage { rows, older_than, partial: false });
        }
        let mut rows: Vec<FlowRow> = Vec::with_capacity(limit.min(256));
        let mut scanned = 0;
        while rows.len() < limit && cursor > min_id && scanned < budget {
            let lo = cursor.saturating_sub(window.max(1)).max(min_id);
            let found = self.scan_flows(filter, Walk::Down { lo, hi: cursor }, limit - rows.len()).await?;
            rows.extend(found);
            scanned += cursor - lo;
            cursor = lo;
        }
        if rows.len() == limit {
            let older_than = rows.last().map(|r| r.id);
            return Ok(FlowPage { rows, older_than, partial: false });
        }
        let more = cursor > min_id;
        Ok(FlowPage { rows, older_than: more.then_some(cursor), partial: more })
    }

    /// Flows matching `filter` with ids above `after_id`, oldest first, at most `limit`
    /// (capped at [`MAX_FLOW_VIEW_PAGE`]), examining at most [`FLOW_SCAN_WINDOW`] ids:
    /// one step of a live tail (see the module docs).
    pub async fn flows_after(&self, filter: &FlowFilter, after_id: i64, limit: u32) -> Result<FlowTail, StoreError> {
        filter.check()?;
        let limit = usize::try_from(limit.clamp(1, MAX_FLOW_VIEW_PAGE)).unwrap_or(1);
        let Some((_, max_id)) = self.flow_id_bounds().await? else {
            return Ok(FlowTail { rows: Vec::new(), cursor: after_id, skipped: 0 });
        };
        let mut lo = after_id;
        let mut skipped = 0;
        if max_id.saturating_sub(lo) > MAX_TAIL_BACKLOG {
            let to = max_id - MAX_TAIL_BACKLOG;
            skipped = u64::try_from(to - lo).unwrap_or(0);
            lo = to;
        }
        let hi = lo.saturating_add(FLOW_SCAN_WINDOW).min(max_id);
        if hi <= lo || filter.matches_nothing() {
            return Ok(FlowTail { rows: Vec::new(), cursor: hi.max(lo), skipped });
        }
        let rows = self.scan_flows(filter, Walk::Up { lo, hi }, limit).await?;
        let cursor = if rows.len() == limit { rows.last().map_or(hi, |r| r.id) } else { hi };
        Ok(FlowTail { rows, cursor, skipped })
    }

    async fn scan_flows(&self, filter: &FlowFilter, walk: Walk, limit: usize) -> Result<Vec<FlowRow>, StoreError> {
        const OP: &str = "flow_page";
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let raw: Vec<RawFlow> = match &self.inner {
            Inner::Sqlite(s) => {
                let mut b = flow_scan::<Sqlite>(true, filter, walk, limit);
                b.build_query_as().fetch_all(&s.reader).await.map_err(StoreError::db(OP))?
            }
            Inner::Postgres(p) => {
                let mut b = flow_scan::<Postgres>(false, filter, walk, limit);
                b.build_query_as().fetch_all(&p.pool).await.map_err(StoreError::db(OP))?
            }
        };
        raw.into_iter().map(FlowRow::try_from).collect()
    }

    // === overview ===

    /// Flows received in `[since, until)` per `bucket_ms`, oldest first; buckets without
    /// batches are absent. Fails with [`StoreError::OutOfRange`] for more than
    /// [`MAX_RATE_BUCKETS`] buckets.
    pub async fn flow_rate(
        &self,
        since_unix_ms: i64,
        until_unix_ms: i64,
        bucket_ms: i64,
    ) -> Result<Vec<RateBucket>, StoreError> {
        let bucket_ms = bucket_ms.max(1);
        let span = until_unix_ms.saturating_sub(since_unix_ms).max(0);
        let buckets = span / bucket_ms + i64::from(span % bucket_ms != 0);
        if buckets > MAX_RATE_BUCKETS {
            return Err(StoreError::OutOfRange { field: "buckets", value: buckets as u64 });
        }
        let rows: Vec<(i64, i64, i64)> = on_reader!(self, pool, _sqlite => {
            sqlx::query_as(SELECT_FLOW_RATE)
                .bind(since_unix_ms)
                .bind(until_unix_ms)
                .bind(bucket_ms)
                .fetch_all(pool)
                .await
                .map_err(StoreError::db("flow_rate"))?
        });
        rows.into_iter()
            .map(|(bucket, flows, batches)| {
                Ok(RateBucket {
                    start_unix_ms: since_unix_ms.saturating_add(bucket.saturating_mul(bucket_ms)),
                    flows: decode::counter("ingested_batches", "flows", flows)?,
                    batches: decode::counter("ingested_batches", "batches", batches)?,
                })
            })
            .collect()
    }

    /// The `limit` edges seen since `since_unix_ms` with the most connections or bytes
    /// (their lifetime counters), largest first.
    pub async fn top_edges(
        &self,
        since_unix_ms: i64,
        order: TalkerOrder,
        limit: u32,
    ) -> Result<Vec<EdgeRow>, StoreError> {
        let sql = match order {
            TalkerOrder::Connections => SELECT_TOP_EDGES_BY_CONNECTIONS,
            TalkerOrder::Bytes => SELECT_TOP_EDGES_BY_BYTES,
        };
        let raw: Vec<RawEdge> = on_reader!(self, pool, _sqlite => {
            sqlx::query_as(sql)
                .bind(since_unix_ms)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
                .map_err(StoreError::db("top_edges"))?
        });
        let mut cache = LabelCache::default();
        raw.into_iter().map(|r| r.into_row(&mut cache)).collect()
    }

    /// The overview's header counts.
    pub async fn dashboard_totals(&self) -> Result<DashboardTotals, StoreError> {
        let r: RawTotals = on_reader!(self, pool, _sqlite => {
            sqlx::query_as(SELECT_TOTALS).fetch_one(pool).await.map_err(StoreError::db("dashboard_totals"))?
        });
        let c = |column, v| decode::counter("totals", column, v);
        Ok(DashboardTotals {
            workloads: c("workloads", r.workloads)?,
            endpoints: c("endpoints", r.endpoints)?,
            edges: c("edges", r.edges)?,
            pending_proposals: c("pending_proposals", r.pending_proposals)?,
        })
    }

    // === workloads ===

    /// Every identity (reserved ones included) with its name and namespace, by number.
    pub async fn workload_directory(&self) -> Result<Vec<WorkloadEntry>, StoreError> {
        type Names = Vec<(i64, String)>;
        let (from_endpoints, from_proposals): (Names, Names) = on_reader!(self, pool, _sqlite => {
            let e = sqlx::query_as(SELECT_ENDPOINT_NAMES)
                .fetch_all(pool)
                .await
                .map_err(StoreError::db("workload_directory"))?;
            let p = sqlx::query_as(SELECT_PROPOSAL_NAMES)
                .fetch_all(pool)
                .await
                .map_err(StoreError::db("workload_directory"))?;
            (e, p)
        });
        let mut names: HashMap<i64, String> = from_proposals.into_iter().collect();
        // A name an endpoint reports now wins over what a proposal was called.
        names.extend(from_endpoints);
        Ok(self
            .identities()
            .await?
            .into_iter()
            .map(|row| {
                let reserved = row.id.is_reserved();
                let name = names
                    .remove(&i64::from(row.id.0))
                    .filter(|n| !reserved && !n.trim().is_empty())
                    .unwrap_or_else(|| fallback_name(row.id, &row.labels));
                WorkloadEntry {
                    identity: row.id,
                    name,
                    namespace: row.labels.namespace().map(str::to_owned),
                    labels: row.labels,
                    created_unix_ms: row.created_unix_ms,
                }
            })
            .collect())
    }

    /// The endpoints (latest snapshot of every node) that have this identity.
    pub async fn endpoints_of(&self, identity: Identity) -> Result<Vec<EndpointRow>, StoreError> {
        let raw: Vec<RawEndpoint> = on_reader!(self, pool, _sqlite => {
            sqlx::query_as(SELECT_ENDPOINTS_OF)
                .bind(i64::from(identity.0))
                .fetch_all(pool)
                .await
                .map_err(StoreError::db("endpoints_of"))?
        });
        raw.into_iter().map(EndpointRow::try_from).collect()
    }

    // === users ===

    /// [`Store::set_role`], refused with [`KeepAdmin::LastAdmin`] when it would leave no
    /// enabled admin. The check and the change are one transaction.
    pub async fn set_role_keeping_admin(
        &self,
        username: &str,
        role: Role,
        actor: &str,
        now_ms: i64,
    ) -> Result<KeepAdmin<UserRow>, StoreError> {
        self.guarded_user_change(username, UserChange::Role(role), actor, now_ms).await
    }

    /// [`Store::set_disabled`], refused with [`KeepAdmin::LastAdmin`] when disabling
    /// would leave no enabled admin. The check and the change are one transaction.
    pub async fn set_disabled_keeping_admin(
        &self,
        username: &str,
        disabled: bool,
        actor: &str,
        now_ms: i64,
    ) -> Result<KeepAdmin<UserRow>, StoreError> {
        self.guarded_user_change(username, UserChange::Disabled(disabled), actor, now_ms).await
    }

    async fn guarded_user_change(
        &self,
        username: &str,
        change: UserChange,
        actor: &str,
        now_ms: i64,
    ) -> Result<KeepAdmin<UserRow>, StoreError> {
        const OP: &str = "guarded_user_change";
        let name = username_of(username)?;
        let actor = users::actor(actor)?;
        match &self.inner {
            Inner::Sqlite(s) => {
                // The single writer serialises this with every other change.
                let tx = s.writer.begin_with("BEGIN IMMEDIATE").await.map_err(StoreError::db(OP))?;
                UserSql::<Sqlite>::change_keeping_admin(tx, SELECT_ENABLED_ADMINS, &name, change, &actor, now_ms).await
            }
            Inner::Postgres(p) => {
                let tx = p.pool.begin().await.map_err(StoreError::db(OP))?;
                let admins = SELECT_ENABLED_ADMINS_FOR_UPDATE;
                UserSql::<Postgres>::change_keeping_admin(tx, admins, &name, change, &actor, now_ms).await
            }
        }
    }
}

/// Whether `change` to `user` must be refused to keep an enabled admin.
pub(crate) fn refused(user: &UserRow, change: UserChange, admins: &[i64]) -> bool {
    let (role, disabled) = match change {
        UserChange::Role(role) => (role, user.disabled),
        UserChange::Disabled(disabled) => (user.role, disabled),
    };
    removes_last_admin(user, role, disabled, admins)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: i64, role: Role, disabled: bool) -> UserRow {
        UserRow {
            id,
            username: format!("u{id}"),
            role,
            disabled,
            must_change_password: false,
            created_unix_ms: 0,
            updated_unix_ms: 0,
        }
    }

    #[test]
    fn the_last_enabled_admin_stays() {
        let only = user(1, Role::Admin, false);
        assert!(refused(&only, UserChange::Role(Role::Approver), &[1]));
        assert!(refused(&only, UserChange::Disabled(true), &[1]));
        assert!(!refused(&only, UserChange::Role(Role::Admin), &[1]), "re-setting admin is fine");
        assert!(!refused(&only, UserChange::Disabled(false), &[1]), "enabling is fine");
        assert!(!refused(&only, UserChange::Role(Role::Viewer), &[1, 2]), "another admin remains");
        let other = user(3, Role::Analyst, false);
        assert!(!refused(&other, UserChange::Disabled(true), &[1]), "not an admin");
        let disabled_admin = user(4, Role::Admin, true);
        assert!(!refused(&disabled_admin, UserChange::Role(Role::Viewer), &[1]), "not an enabled admin");
    }

    #[test]
    fn fallback_names() {
        let labels = Labels::new([("io.kubernetes.pod.namespace", "ns"), ("app", "web")]).expect("labels");
        assert_eq!(fallback_name(Identity(300), &labels), "ns/web");
        assert_eq!(fallback_name(Identity(301), &Labels::default()), "identity-301");
        assert_eq!(fallback_name(Identity::WORLD, &Labels::default()), "reserved:world");
    }

    /// `n` flows on port 80 from identity 300 to 301, then one on port 22: ids 1..=n+1.
    async fn store_with_flows(n: usize) -> Store {
        use bulkhead_model::{Direction, Flow};

        use crate::store::{IngestBatch, ResolvedFlow};
        let store = Store::open("sqlite::memory:").await.expect("store");
        let a = store.ensure_identity(&Labels::new([("app", "a")]).expect("labels")).await.expect("identity");
        let b = store.ensure_identity(&Labels::new([("app", "b")]).expect("labels")).await.expect("identity");
        let flow = |port| ResolvedFlow {
            flow: Flow {
                src_addr: "10.0.0.1".parse().expect("ip"),
                src_port: 0,
                dst_addr: "10.0.0.2".parse().expect("ip"),
                dst_port: port,
                protocol: Protocol::Tcp,
                direction: Direction::Egress,
                netns_ino: 1,
                cgroup_id: 0,
                pid: 1,
                comm: "c".into(),
                connections: 1,
                bytes_sent: 1,
                bytes_received: 1,
                packets: 1,
                verdict: Verdict::Forwarded,
                first_seen_unix_ms: 1,
                last_seen_unix_ms: 2,
                http: Default::default(),
            },
            src_identity: a,
            dst_identity: b,
        };
        let mut flows: Vec<ResolvedFlow> = vec![flow(22)];
        flows.extend((0..n).map(|_| flow(80)));
        let batch = IngestBatch {
            node_id: "n".into(),
            boot_id: "b".into(),
            seq: 1,
            received_unix_ms: 3,
            flows,
            endpoints: None,
            dns_answers: Vec::new(),
            loss: Default::default(),
        };
        store.ingest(&batch).await.expect("ingest");
        store
    }

    #[tokio::test]
    async fn sparse_matches_page_in_bounded_steps_that_resume_where_they_stopped() {
        let store = store_with_flows(30).await;
        assert_eq!(store.flow_id_bounds().await.expect("bounds"), Some((1, 31)));
        let rare = FlowFilter { dst_port: Some(22), ..Default::default() };
        // Window 5, budget 10: each request examines 10 ids at most.
        let mut before = None;
        let mut requests = 0;
        let found = loop {
            requests += 1;
            let page = store.flow_page_scanning(&rare, before, 10, 5, 10).await.expect("page");
            if !page.rows.is_empty() {
                break page;
            }
            assert!(page.partial, "an empty page that is not the end says it stopped early");
            let next = page.older_than.expect("a cursor to continue from");
            assert!(before.is_none_or(|b| next < b), "every step moves down");
            before = Some(next);
        };
        assert_eq!(requests, 4, "ids 31..22, 21..12, 11..2, then 1");
        assert_eq!(found.rows.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1]);
        assert_eq!((found.older_than, found.partial), (None, false), "nothing is older than id 1");

        // A dense filter fills pages within one window; the cursor is the last row.
        let dense = FlowFilter { dst_port: Some(80), ..Default::default() };
        let page = store.flow_page_scanning(&dense, None, 7, 5, 10).await.expect("page");
        assert_eq!(page.rows.iter().map(|r| r.id).collect::<Vec<_>>(), (25..=31).rev().collect::<Vec<_>>());
        assert_eq!((page.older_than, page.partial), (Some(25), false));
    }

    #[tokio::test]
    async fn the_tail_reads_forward_from_its_cursor() {
        let store = store_with_flows(5).await;
        let all = FlowFilter::default();
        let t = store.flows_after(&all, 0, 4).await.expect("tail");
        assert_eq!(t.rows.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!((t.cursor, t.skipped), (4, 0));
        let t = store.flows_after(&all, t.cursor, 4).await.expect("tail");
        assert_eq!(t.rows.iter().map(|r| r.id).collect::<Vec<_>>(), vec![5, 6]);
        assert_eq!(t.cursor, 6);
        let t = store.flows_after(&all, t.cursor, 4).await.expect("tail");
        assert!(t.rows.is_empty());
        assert_eq!(t.cursor, 6, "the cursor stays at the newest flow");
        let port22 = FlowFilter { dst_port: Some(22), ..Default::default() };
        let t = store.flows_after(&port22, 1, 4).await.expect("tail");
        assert!(t.rows.is_empty());
        assert_eq!(t.cursor, 6, "examined flows move the cursor even when none match");
    }

    #[test]
    fn impossible_filters_match_nothing() {
        assert!(FlowFilter { identities: Some(Vec::new()), ..Default::default() }.matches_nothing());
        assert!(FlowFilter { since_unix_ms: Some(2), until_unix_ms: Some(1), ..Default::default() }.matches_nothing());
        assert!(!FlowFilter::default().matches_nothing());
        let many = FlowFilter { identities: Some(vec![Identity(1); MAX_FILTER_IDENTITIES + 1]), ..Default::default() };
        assert!(many.check().is_err());
    }
}
