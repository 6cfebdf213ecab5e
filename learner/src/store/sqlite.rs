//! SQLite backend: one file, WAL, one writer.
//!
//! SQLite allows one writer at a time. Letting several pooled connections race for the
//! write lock ends in `SQLITE_BUSY` (a deferred transaction that read first cannot wait
//! for the lock at all), so all writes go through a pool of exactly one connection and
//! queue in-process, each transaction opened with `BEGIN IMMEDIATE`. Reads use a
//! separate pool: under WAL they see the last committed state and never block the
//! writer. `busy_timeout` covers other processes (a CLI, a backup) holding the lock.
//! WAL checkpoints run on a third connection in the background (`checkpoint_loop`).
//!
//! Ingest is shaped for this single writer (see `sqlite_ingest`): a batch is a few
//! fixed multi-statement scripts, and its flows are one contiguous id range described by
//! one `flow_blocks` row, which reads and pruning go through (see the migration).

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite};

use super::decode::{LabelCache, RawAgent, RawBlockFlow, RawDnsAnswer, RawEdge, RawEndpoint, RawIdentity};
use super::prepare::PreparedBatch;
use super::queries::{self as q};
use super::sqlite_ingest::{self, FLOW_COLUMNS};
use super::{
    AgentRow, Backend, EdgeQuery, EdgeRow, EndpointRow, FlowQuery, FlowRow, IdentityRow, IngestOutcome, MAX_FLOW_PAGE,
    StoreError,
};
use bulkhead_model::{DnsAnswer, Identity};

pub(crate) static MIGRATOR: Migrator = sqlx::migrate!("../migrations/sqlite");

/// SQLite's default limit on bound parameters per statement (SQLITE_MAX_VARIABLE_NUMBER
/// since 3.32); endpoint snapshots are chunked to stay below it.
const MAX_BINDS: usize = 32_766;
/// Concurrent readers. Reads are short; the UI and API rarely need more.
const READERS: u32 = 4;

/// `flow_blocks` rows fetched per step of a flow query.
const BLOCKS_PER_STEP: i64 = 64;

const ENDPOINT_COLS: usize = 9;

const TOUCH_AGENT: &str = "INSERT INTO agents \
     (node_id, boot_id, agent_version, first_seen_unix_ms, last_seen_unix_ms) VALUES ($1, $2, $3, $4, $4) \
     ON CONFLICT (node_id) DO UPDATE SET \
     boot_id = excluded.boot_id, agent_version = excluded.agent_version, \
     first_seen_unix_ms = COALESCE(agents.first_seen_unix_ms, excluded.first_seen_unix_ms), \
     last_seen_unix_ms = max(COALESCE(agents.last_seen_unix_ms, excluded.last_seen_unix_ms), excluded.last_seen_unix_ms)";

const TOUCH_BOOT: &str = "INSERT INTO agent_boots (node_id, boot_id, first_seen_unix_ms, last_seen_unix_ms) \
     VALUES ($1, $2, $3, $3) ON CONFLICT (node_id, boot_id) DO UPDATE SET \
     last_seen_unix_ms = max(agent_boots.last_seen_unix_ms, excluded.last_seen_unix_ms)";

const MARK_PRUNED_BATCHES: &str = "UPDATE agent_boots \
     SET pruned_through_seq = max(COALESCE(agent_boots.pruned_through_seq, -1), p.seq) \
     FROM (SELECT node_id, boot_id, max(seq) AS seq FROM ingested_batches WHERE received_unix_ms < $1 \
           GROUP BY node_id, boot_id) AS p \
     WHERE agent_boots.node_id = p.node_id AND agent_boots.boot_id = p.boot_id";

/// Blocks holding flows last seen before `$1`, in the order of the index on
/// `min_last_seen_unix_ms` (so the LIMIT stops the scan); a partly pruned block's
/// minimum is kept current.
const SELECT_EXPIRING_BLOCKS: &str = "SELECT first_flow_id, last_flow_id, max_last_seen_unix_ms FROM flow_blocks \
     WHERE min_last_seen_unix_ms < $1 ORDER BY min_last_seen_unix_ms LIMIT $2";

/// Blocks examined per prune step (each step is one transaction).
const PRUNE_BLOCKS_PER_STEP: i64 = 256;

const DELETE_FLOW_RANGE: &str = "DELETE FROM flows WHERE id BETWEEN $1 AND $2";

const DELETE_BLOCK_RANGE: &str = "DELETE FROM flow_blocks WHERE first_flow_id BETWEEN $1 AND $2";

const DELETE_OLD_FLOWS_IN_RANGE: &str = "DELETE FROM flows WHERE id BETWEEN $1 AND $2 AND last_seen_unix_ms < $3";

/// After a partial prune the block still holds its newest flow (else it would have been
/// wholly expired); should it hold none, the block is left for the next wholly-expired pass.
const UPDATE_BLOCK_MIN_LAST_SEEN: &str = "UPDATE flow_blocks SET min_last_seen_unix_ms = \
     COALESCE((SELECT min(last_seen_unix_ms) FROM flows WHERE id BETWEEN $1 AND $2), max_last_seen_unix_ms) \
     WHERE first_flow_id = $1";

/// A `flow_blocks` row as the flow reader needs it.
#[derive(Debug, sqlx::FromRow)]
struct RawBlock {
    first_flow_id: i64,
    last_flow_id: i64,
    node_id: String,
    received_unix_ms: i64,
}

/// The newest [`BLOCKS_PER_STEP`] blocks below `cursor` that can hold flows matching
/// `q` (same node, mentions the identity, something seen since `since`).
fn block_query<'a>(q: &'a FlowQuery, identity_pattern: Option<&'a str>, cursor: i64) -> QueryBuilder<Sqlite> {
    let mut b = QueryBuilder::new(
        "SELECT first_flow_id, last_flow_id, node_id, received_unix_ms FROM flow_blocks WHERE first_flow_id < ",
    );
    b.push_bind(cursor);
    if let Some(node) = &q.node_id {
        b.push(" AND node_id = ").push_bind(node.clone());
    }
    if let Some(pattern) = identity_pattern {
        b.push(" AND instr(identities, ").push_bind(pattern.to_owned()).push(") > 0");
    }
    if let Some(since) = q.since_unix_ms {
        b.push(" AND max_last_seen_unix_ms >= ").push_bind(since);
    }
    b.push(" ORDER BY first_flow_id DESC LIMIT ").push_bind(BLOCKS_PER_STEP);
    b
}

/// Flows with ids in `lo..=hi` (blocks that all match the block-level filters of `q`)
/// that match its per-flow filters, newest first, at most `limit`.
fn flows_in_range(q: &FlowQuery, lo: i64, hi: i64, limit: i64) -> QueryBuilder<Sqlite> {
    let mut b = QueryBuilder::new(format!("SELECT id, {FLOW_COLUMNS} FROM flows WHERE id BETWEEN "));
    b.push_bind(lo).push(" AND ").push_bind(hi);
    if let Some(id) = q.identity {
        let id = i64::from(id.0);
        b.push(" AND (src_identity = ").push_bind(id).push(" OR dst_identity = ").push_bind(id).push(")");
    }
    if let Some(since) = q.since_unix_ms {
        b.push(" AND last_seen_unix_ms >= ").push_bind(since);
    }
    // Blocks keep no first_seen bounds (ingest would pay for them), so `until` is a
    // per-flow filter only.
    if let Some(until) = q.until_unix_ms {
        b.push(" AND first_seen_unix_ms <= ").push_bind(until);
    }
    if let Some(port) = q.dst_port {
        b.push(" AND dst_port = ").push_bind(i32::from(port));
    }
    b.push(" ORDER BY id DESC LIMIT ").push_bind(limit);
    b
}

/// The SQLite half of [`Store`](super::Store).
#[derive(Debug, Clone)]
pub(crate) struct SqliteStore {
    /// Exactly one connection: the only writer.
    pub(super) writer: SqlitePool,
    /// Read-only connections (`query_only`); the writer itself for in-memory databases.
    pub(super) reader: SqlitePool,
    /// One connection that moves WAL frames into the database file in the background.
    checkpointer: SqlitePool,
}

/// How often the WAL is checkpointed.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Checkpoints the WAL off the ingest path until the pool is closed.
///
/// SQLite's automatic checkpoint runs inside the committing writer's transaction: every
/// ~1000 pages one ingest call copies the WAL into the database and fsyncs it, which
/// shows as ingest latency spikes and takes the writer's time. A PASSIVE checkpoint
/// from another connection never blocks the writer (or readers), so it runs here on a
/// timer instead and the writer's connection has `wal_autocheckpoint = 0`.
async fn checkpoint_loop(pool: SqlitePool) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if pool.is_closed() {
            return;
        }
        if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool).await {
            if pool.is_closed() {
                return;
            }
            tracing::warn!(%error, "WAL checkpoint failed; retrying.");
        }
    }
}

impl SqliteStore {
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let base = SqliteConnectOptions::from_str(url)
            .map_err(|source| StoreError::InvalidUrl { backend: Backend::Sqlite, source })?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL + NORMAL: a commit is durable against process crashes; a power cut
            // may lose the last transactions, which agents resend (at-least-once).
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            .pragma("temp_store", "memory")
            // 64 MiB page cache per connection (negative = KiB): the edge and flow
            // indexes of a busy learner stay in memory.
            .pragma("cache_size", "-65536")
            .optimize_on_close(true, None);
        // An in-memory database lives as long as its connections and is private to
        // them, so it gets a single pinned connection for reads and writes alike.
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let connect = |source| StoreError::Connect { backend: Backend::Sqlite, source };
        let writer_pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            // Writers queue here behind one another; a queue longer than this means the
            // disk cannot keep up and the caller should shed load (agents retry).
            .acquire_timeout(Duration::from_secs(60));
        let writer_pool = if in_memory { writer_pool.idle_timeout(None).max_lifetime(None) } else { writer_pool };
        // The writer never checkpoints (see `checkpoint_loop`).
        let writer_options = base.clone().pragma("wal_autocheckpoint", if in_memory { "1000" } else { "0" });
        let writer = writer_pool.connect_with(writer_options).await.map_err(connect)?;
        MIGRATOR.run(&writer).await.map_err(|source| StoreError::Migrate { backend: Backend::Sqlite, source })?;
        if in_memory {
            return Ok(Self { writer: writer.clone(), reader: writer.clone(), checkpointer: writer });
        }
        let reader = SqlitePoolOptions::new()
            .max_connections(READERS)
            .connect_with(base.clone().create_if_missing(false).pragma("query_only", "ON"))
            .await
            .map_err(connect)?;
        let checkpointer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(base.create_if_missing(false))
            .await
            .map_err(connect)?;
        tokio::spawn(checkpoint_loop(checkpointer.clone()));
        Ok(Self { writer, reader, checkpointer })
    }

    pub async fn close(&self) {
        // Fold the WAL back into the database file while we are the only user.
        if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&self.writer).await {
            tracing::debug!(%error, "Final WAL checkpoint failed; SQLite retries on next open.");
        }
        self.checkpointer.close().await;
        self.reader.close().await;
        self.writer.close().await;
    }

    // === identities ===

    pub async fn ensure_identity(
        &self,
        digest: &[u8; 32],
        canonical: &str,
        now_ms: i64,
    ) -> Result<Identity, StoreError> {
        const OP: &str = "ensure_identity";
        let existing = sqlx::query_as::<_, RawIdentity>(q::SELECT_IDENTITY_BY_DIGEST)
            .bind(digest.to_vec())
            .fetch_optional(&self.reader)
            .await
            .map_err(StoreError::db(OP))?;
        if let Some(row) = existing {
            return super::checked_identity(row, canonical);
        }
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(StoreError::db(OP))?;
        sqlx::query(q::INSERT_IDENTITY)
            .bind(digest.to_vec())
            .bind(canonical)
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(OP))?;
        let row = sqlx::query_as::<_, RawIdentity>(q::SELECT_IDENTITY_BY_DIGEST)
            .bind(digest.to_vec())
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::db(OP))?;
        tx.commit().await.map_err(StoreError::db(OP))?;
        super::checked_identity(row, canonical)
    }

    pub async fn identities(&self) -> Result<Vec<IdentityRow>, StoreError> {
        sqlx::query_as::<_, RawIdentity>(q::SELECT_IDENTITIES)
            .fetch_all(&self.reader)
            .await
            .map_err(StoreError::db("identities"))?
            .into_iter()
            .map(IdentityRow::try_from)
            .collect()
    }

    // === agents ===

    pub async fn register_agent(&self, node_id: &str, now_ms: i64) -> Result<(), StoreError> {
        sqlx::query(q::REGISTER_AGENT)
            .bind(node_id)
            .bind(now_ms)
            .execute(&self.writer)
            .await
            .map_err(StoreError::db("register_agent"))?;
        Ok(())
    }

    pub async fn agent_known(&self, node_id: &str) -> Result<bool, StoreError> {
        let found: Option<String> = sqlx::query_scalar(q::AGENT_KNOWN)
            .bind(node_id)
            .fetch_optional(&self.reader)
            .await
            .map_err(StoreError::db("agent_known"))?;
        Ok(found.is_some())
    }

    pub async fn touch_agent(
        &self,
        node_id: &str,
        boot_id: &str,
        agent_version: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        const OP: &str = "touch_agent";
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(StoreError::db(OP))?;
        sqlx::query(TOUCH_AGENT)
            .bind(node_id)
            .bind(boot_id)
            .bind(agent_version)
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(OP))?;
        sqlx::query(TOUCH_BOOT)
            .bind(node_id)
            .bind(boot_id)
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(OP))?;
        tx.commit().await.map_err(StoreError::db(OP))
    }

    pub async fn agents(&self) -> Result<Vec<AgentRow>, StoreError> {
        sqlx::query_as::<_, RawAgent>(q::SELECT_AGENTS)
            .fetch_all(&self.reader)
            .await
            .map_err(StoreError::db("agents"))?
            .into_iter()
            .map(AgentRow::try_from)
            .collect()
    }

    pub async fn stored_through_seq(&self, node_id: &str, boot_id: &str) -> Result<Option<i64>, StoreError> {
        sqlx::query_scalar(q::STORED_THROUGH_SEQ)
            .bind(node_id)
            .bind(boot_id)
            .fetch_optional(&self.reader)
            .await
            .map_err(StoreError::db("stored_through_seq"))
    }

    // === ingest ===

    pub async fn ingest(&self, p: &PreparedBatch<'_>) -> Result<IngestOutcome, StoreError> {
        const OP: &str = "ingest";
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(StoreError::db(OP))?;
        let recorded = sqlx::query(sqlite_ingest::RECORD_BATCH)
            .bind(p.node_id)
            .bind(p.boot_id)
            .bind(p.seq)
            .bind(p.received_unix_ms)
            .bind(i64::try_from(p.flows.len()).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(OP))?
            .rows_affected();
        if recorded == 0 {
            tx.rollback().await.map_err(StoreError::db(OP))?;
            return Ok(IngestOutcome::Duplicate);
        }
        sqlite_ingest::write_batch(&mut tx, p).await.map_err(StoreError::db(OP))?;
        if let Some(eps) = &p.endpoints {
            sqlx::query(q::DELETE_NODE_ENDPOINTS)
                .bind(p.node_id)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db(OP))?;
            for chunk in eps.chunks(MAX_BINDS / ENDPOINT_COLS) {
                let mut b = QueryBuilder::<Sqlite>::new(format!("INSERT INTO endpoints ({}) ", q::ENDPOINT_COLUMNS));
                b.push_values(chunk, |mut row, e| {
                    row.push_bind(p.node_id)
                        .push_bind(e.netns_ino)
                        .push_bind(e.netns_name.as_deref())
                        .push_bind(e.host)
                        .push_bind(e.identity)
                        .push_bind(e.workload.as_deref())
                        .push_bind(e.addresses.as_str())
                        .push_bind(e.cgroups.as_str())
                        .push_bind(p.received_unix_ms);
                });
                b.build().execute(&mut *tx).await.map_err(StoreError::db(OP))?;
            }
        }
        tx.commit().await.map_err(StoreError::db(OP))?;
        Ok(sqlite_ingest::stored(p))
    }

    // === reads ===

    pub async fn edges(&self, query: &EdgeQuery) -> Result<Vec<EdgeRow>, StoreError> {
        let mut b = q::edges::<Sqlite>(query);
        let raw = b.build_query_as::<RawEdge>().fetch_all(&self.reader).await.map_err(StoreError::db("edges"))?;
        let mut cache = LabelCache::default();
        raw.into_iter().map(|r| r.into_row(&mut cache)).collect()
    }

    /// Flows newest first. Every stored batch's flows are one id range with one
    /// `flow_blocks` row holding what the flows of the batch share (node, receive time)
    /// and what lets a query skip it (identities, newest `last_seen`). This walks the
    /// blocks that can match, newest first, and reads each run of adjacent blocks with
    /// one rowid range scan until the page is full.
    pub async fn flows(&self, query: &FlowQuery) -> Result<Vec<FlowRow>, StoreError> {
        const OP: &str = "flows";
        let limit = query.limit.min(MAX_FLOW_PAGE) as usize;
        let pattern = query.identity.map(|id| format!(",{},", id.0));
        let mut cursor = query.before_id.unwrap_or(i64::MAX);
        let mut out = Vec::new();
        let mut conn = self.reader.acquire().await.map_err(StoreError::db(OP))?;
        while out.len() < limit {
            let mut b = block_query(query, pattern.as_deref(), cursor);
            let blocks: Vec<RawBlock> = b.build_query_as().fetch_all(&mut *conn).await.map_err(StoreError::db(OP))?;
            let Some(oldest) = blocks.last() else { break };
            let more = blocks.len() as i64 == BLOCKS_PER_STEP;
            let oldest = oldest.first_flow_id;
            let mut rest = blocks.as_slice();
            while !rest.is_empty() && out.len() < limit {
                // Blocks are newest first; a run is blocks whose ranges touch.
                let run_len = 1 + rest.windows(2).take_while(|w| w[1].last_flow_id + 1 == w[0].first_flow_id).count();
                let (run, tail) = rest.split_at(run_len);
                rest = tail;
                let (lo, hi) = (run[run_len - 1].first_flow_id, run[0].last_flow_id.min(cursor.saturating_sub(1)));
                let mut b = flows_in_range(query, lo, hi, (limit - out.len()) as i64);
                let rows: Vec<RawBlockFlow> =
                    b.build_query_as().fetch_all(&mut *conn).await.map_err(StoreError::db(OP))?;
                for r in rows {
                    // The block holding this id: the first (newest) one starting at or below it.
                    let block = &run[run.partition_point(|b| b.first_flow_id > r.id).min(run_len - 1)];
                    out.push(r.flow.into_row(r.id, block.node_id.clone(), block.received_unix_ms)?);
                }
                cursor = lo;
            }
            if !more {
                break;
            }
            cursor = cursor.min(oldest);
        }
        Ok(out)
    }

    pub async fn endpoints(&self) -> Result<Vec<EndpointRow>, StoreError> {
        sqlx::query_as::<_, RawEndpoint>(q::SELECT_ENDPOINTS)
            .fetch_all(&self.reader)
            .await
            .map_err(StoreError::db("endpoints"))?
            .into_iter()
            .map(EndpointRow::try_from)
            .collect()
    }

    pub async fn dns_answers(&self, since_unix_ms: i64) -> Result<Vec<DnsAnswer>, StoreError> {
        sqlx::query_as::<_, RawDnsAnswer>(q::SELECT_DNS_ANSWERS)
            .bind(since_unix_ms)
            .fetch_all(&self.reader)
            .await
            .map_err(StoreError::db("dns_answers"))?
            .into_iter()
            .map(DnsAnswer::try_from)
            .collect()
    }

    // === retention ===

    pub async fn prune_flows(&self, older_than_unix_ms: i64) -> Result<u64, StoreError> {
        const OP: &str = "prune_flows";
        let mut total = 0;
        loop {
            // One transaction per step of at most ~PRUNE_CHUNK flows, so ingest waits
            // for one step at most.
            let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(StoreError::db(OP))?;
            let mut blocks: Vec<(i64, i64, i64)> = sqlx::query_as(SELECT_EXPIRING_BLOCKS)
                .bind(older_than_unix_ms)
                .bind(PRUNE_BLOCKS_PER_STEP)
                .fetch_all(&mut *tx)
                .await
                .map_err(StoreError::db(OP))?;
            if blocks.is_empty() {
                tx.commit().await.map_err(StoreError::db(OP))?;
                return Ok(total);
            }
            blocks.sort_unstable();
            let mut budget = q::PRUNE_CHUNK;
            let mut i = 0;
            while i < blocks.len() && budget > 0 {
                let (first, last, newest) = blocks[i];
                if newest < older_than_unix_ms {
                    // A run of wholly expired blocks with nothing in between: one range
                    // delete of the flows (rowid range) and of the blocks.
                    let mut end = last;
                    i += 1;
                    while i < blocks.len() && blocks[i].2 < older_than_unix_ms && blocks[i].0 == end + 1 {
                        end = blocks[i].1;
                        i += 1;
                    }
                    let n = sqlx::query(DELETE_FLOW_RANGE)
                        .bind(first)
                        .bind(end)
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::db(OP))?
                        .rows_affected();
                    sqlx::query(DELETE_BLOCK_RANGE)
                        .bind(first)
                        .bind(end)
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::db(OP))?;
                    total += n;
                    budget -= (end - first + 1).min(budget);
                } else {
                    // Straddles the cutoff: delete its old flows, then record the block's
                    // new oldest flow (the block keeps its id range).
                    let n = sqlx::query(DELETE_OLD_FLOWS_IN_RANGE)
                        .bind(first)
                        .bind(last)
                        .bind(older_than_unix_ms)
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::db(OP))?
                        .rows_affected();
                    sqlx::query(UPDATE_BLOCK_MIN_LAST_SEEN)
                        .bind(first)
                        .bind(last)
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::db(OP))?;
                    total += n;
                    budget -= (last - first + 1).min(budget);
                    i += 1;
                }
            }
            tx.commit().await.map_err(StoreError::db(OP))?;
        }
    }

    pub async fn prune_dns_answers(&self, older_than_unix_ms: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query(q::PRUNE_DNS_ANSWERS)
            .bind(older_than_unix_ms)
            .execute(&self.writer)
            .await
            .map_err(StoreError::db("prune_dns_answers"))?
            .rows_affected())
    }

    pub async fn prune_batch_records(&self, older_than_unix_ms: i64) -> Result<u64, StoreError> {
        const OP: &str = "prune_batch_records";
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(StoreError::db(OP))?;
        sqlx::query(MARK_PRUNED_BATCHES)
            .bind(older_than_unix_ms)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(OP))?;
        let n = sqlx::query(q::PRUNE_BATCH_RECORDS)
            .bind(older_than_unix_ms)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(OP))?
            .rows_affected();
        tx.commit().await.map_err(StoreError::db(OP))?;
        Ok(n)
    }
}
