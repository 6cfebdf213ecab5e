//! SQLite backend: one file, WAL, one writer.
//!
//! SQLite allows one writer at a time. Letting several pooled connections race for the
//! write lock ends in `SQLITE_BUSY` (a deferred transaction that read first cannot wait
//! for the lock at all), so all writes go through a pool of exactly one connection and
//! queue in-process, each transaction opened with `BEGIN IMMEDIATE`. Reads use a
//! separate pool: under WAL they see the last committed state and never block the
//! writer. `busy_timeout` covers other processes (a CLI, a backup) holding the lock.
//! WAL checkpoints run on a third connection in the background (`checkpoint_loop`).

use std::collections::BTreeSet;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite};

use super::decode::{LabelCache, RawAgent, RawDnsAnswer, RawEdge, RawEndpoint, RawFlow, RawIdentity};
use super::prepare::{FlowColumns, PreparedBatch, chunk_sizes};
use super::queries::{self as q};
use super::{
    AgentRow, Backend, EdgeQuery, EdgeRow, EndpointRow, FlowQuery, FlowRow, IdentityRow, IngestOutcome, MAX_FLOW_PAGE,
    StoreError,
};
use bulkhead_model::{DnsAnswer, Identity};

pub(crate) static MIGRATOR: Migrator = sqlx::migrate!("../migrations/sqlite");

/// SQLite's default limit on bound parameters per statement (SQLITE_MAX_VARIABLE_NUMBER
/// since 3.32); multi-row INSERTs are chunked to stay below it.
const MAX_BINDS: usize = 32_766;
/// Rows per multi-row INSERT. Fewer, larger statements amortise the driver's per-statement
/// hop to its worker thread; sizes repeat (see `chunk_sizes`) so statements stay prepared.
const MAX_ROWS: usize = 1024;
/// Concurrent readers. Reads are short; the UI and API rarely need more.
const READERS: u32 = 4;

/// `flow_blocks` rows fetched per step of an identity query.
const BLOCKS_PER_STEP: i64 = 64;

const FLOW_COLS: usize = 21;
const EDGE_COLS: usize = 10;
const ENDPOINT_COLS: usize = 9;
const DNS_COLS: usize = 7;

fn rows_per_chunk(cols: usize) -> usize {
    (MAX_BINDS / cols).min(MAX_ROWS)
}

const UPSERT_EDGES: &str = " ON CONFLICT (src_identity, dst_identity, dst_port, protocol) DO UPDATE SET \
     first_seen_unix_ms = min(edges.first_seen_unix_ms, excluded.first_seen_unix_ms), \
     last_seen_unix_ms = max(edges.last_seen_unix_ms, excluded.last_seen_unix_ms), \
     connections_egress = min(edges.connections_egress, 9223372036854775807 - excluded.connections_egress) \
        + excluded.connections_egress, \
     bytes_egress = min(edges.bytes_egress, 9223372036854775807 - excluded.bytes_egress) + excluded.bytes_egress, \
     connections_ingress = min(edges.connections_ingress, 9223372036854775807 - excluded.connections_ingress) \
        + excluded.connections_ingress, \
     bytes_ingress = min(edges.bytes_ingress, 9223372036854775807 - excluded.bytes_ingress) + excluded.bytes_ingress";

const UPSERT_DNS: &str = " ON CONFLICT (node_id, netns_ino, name, addr) DO UPDATE SET \
     ttl_seconds = CASE WHEN excluded.last_seen_unix_ms >= dns_answers.last_seen_unix_ms \
        THEN excluded.ttl_seconds ELSE dns_answers.ttl_seconds END, \
     first_seen_unix_ms = min(dns_answers.first_seen_unix_ms, excluded.first_seen_unix_ms), \
     last_seen_unix_ms = max(dns_answers.last_seen_unix_ms, excluded.last_seen_unix_ms)";

const UPSERT_AGENT_FROM_BATCH: &str = "INSERT INTO agents \
     (node_id, boot_id, first_seen_unix_ms, last_seen_unix_ms, batches_stored) VALUES ($1, $2, $3, $3, 1) \
     ON CONFLICT (node_id) DO UPDATE SET \
     boot_id = COALESCE(agents.boot_id, excluded.boot_id), \
     first_seen_unix_ms = COALESCE(agents.first_seen_unix_ms, excluded.first_seen_unix_ms), \
     last_seen_unix_ms = max(COALESCE(agents.last_seen_unix_ms, excluded.last_seen_unix_ms), excluded.last_seen_unix_ms), \
     batches_stored = agents.batches_stored + 1";

const UPSERT_BOOT_FROM_BATCH: &str = "INSERT INTO agent_boots (node_id, boot_id, first_seen_unix_ms, \
     last_seen_unix_ms, stored_through_seq, batches_stored, loss_ringbuf_dropped, loss_queue_dropped, \
     loss_spool_evicted_batches, loss_spool_evicted_flows, loss_rejected_batches) \
     VALUES ($1, $2, $3, $3, $4, 1, $5, $6, $7, $8, $9) \
     ON CONFLICT (node_id, boot_id) DO UPDATE SET \
     last_seen_unix_ms = max(agent_boots.last_seen_unix_ms, excluded.last_seen_unix_ms), \
     stored_through_seq = max(agent_boots.stored_through_seq, excluded.stored_through_seq), \
     batches_stored = agent_boots.batches_stored + 1, \
     loss_ringbuf_dropped = max(agent_boots.loss_ringbuf_dropped, excluded.loss_ringbuf_dropped), \
     loss_queue_dropped = max(agent_boots.loss_queue_dropped, excluded.loss_queue_dropped), \
     loss_spool_evicted_batches = max(agent_boots.loss_spool_evicted_batches, excluded.loss_spool_evicted_batches), \
     loss_spool_evicted_flows = max(agent_boots.loss_spool_evicted_flows, excluded.loss_spool_evicted_flows), \
     loss_rejected_batches = max(agent_boots.loss_rejected_batches, excluded.loss_rejected_batches)";

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

/// `flow_blocks.identities` of a batch: every identity on either end, as ',a,b,'.
fn identity_list(f: &FlowColumns) -> String {
    let ids: BTreeSet<i64> = f.src_identity.iter().chain(&f.dst_identity).copied().collect();
    let mut s = String::with_capacity(ids.len() * 7 + 1);
    s.push(',');
    for id in ids {
        s.push_str(&id.to_string());
        s.push(',');
    }
    s
}

/// The SQLite half of [`Store`](super::Store).
#[derive(Debug, Clone)]
pub(crate) struct SqliteStore {
    /// Exactly one connection: the only writer.
    writer: SqlitePool,
    /// Read-only connections (`query_only`); the writer itself for in-memory databases.
    reader: SqlitePool,
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
        let db = StoreError::db(OP);
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(db)?;

        let pruned: Option<Option<i64>> = sqlx::query_scalar(q::PRUNED_THROUGH_SEQ)
            .bind(p.node_id)
            .bind(p.boot_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::db(OP))?;
        let pruned = pruned.flatten();
        let recorded = if pruned.is_some_and(|through| p.seq <= through) {
            0
        } else {
            sqlx::query(q::INSERT_BATCH_RECORD)
                .bind(p.node_id)
                .bind(p.boot_id)
                .bind(p.seq)
                .bind(p.received_unix_ms)
                .bind(i64::try_from(p.flows.len()).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db(OP))?
                .rows_affected()
        };
        if recorded == 0 {
            tx.rollback().await.map_err(StoreError::db(OP))?;
            return Ok(IngestOutcome::Duplicate);
        }

        sqlx::query(UPSERT_AGENT_FROM_BATCH)
            .bind(p.node_id)
            .bind(p.boot_id)
            .bind(p.received_unix_ms)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(OP))?;
        let mut boot =
            sqlx::query(UPSERT_BOOT_FROM_BATCH).bind(p.node_id).bind(p.boot_id).bind(p.received_unix_ms).bind(p.seq);
        for v in p.loss {
            boot = boot.bind(v);
        }
        boot.execute(&mut *tx).await.map_err(StoreError::db(OP))?;

        // Flows, as multi-row INSERTs. OR ROLLBACK: a constraint failure aborts the whole
        // batch anyway, and saying so lets SQLite skip the statement journal it keeps to
        // undo a half-applied multi-row statement (here: ~136k -> ~162k flows/s, noisy box).
        let f = &p.flows;
        let mut start = 0;
        for size in chunk_sizes(f.len(), rows_per_chunk(FLOW_COLS)) {
            let mut b = QueryBuilder::<Sqlite>::new(format!("INSERT OR ROLLBACK INTO flows ({}) ", q::FLOW_COLUMNS));
            b.push_values(start..start + size, |mut row, i| {
                row.push_bind(p.node_id)
                    .push_bind(p.received_unix_ms)
                    .push_bind(f.src_identity[i])
                    .push_bind(f.dst_identity[i])
                    .push_bind(f.src_addr[i].as_str())
                    .push_bind(f.src_port[i])
                    .push_bind(f.dst_addr[i].as_str())
                    .push_bind(f.dst_port[i])
                    .push_bind(f.protocol[i])
                    .push_bind(f.direction[i])
                    .push_bind(f.netns_ino[i])
                    .push_bind(f.cgroup_id[i])
                    .push_bind(f.pid[i])
                    .push_bind(f.comm[i].as_str())
                    .push_bind(f.connections[i])
                    .push_bind(f.bytes_sent[i])
                    .push_bind(f.bytes_received[i])
                    .push_bind(f.packets[i])
                    .push_bind(f.verdict[i])
                    .push_bind(f.first_seen_unix_ms[i])
                    .push_bind(f.last_seen_unix_ms[i]);
            });
            b.build().execute(&mut *tx).await.map_err(StoreError::db(OP))?;
            start += size;
        }
        if f.len() > 0 {
            // One writer, one transaction, AUTOINCREMENT: the batch's ids are the
            // contiguous range ending at the last inserted rowid.
            let last: i64 = sqlx::query_scalar("SELECT last_insert_rowid()")
                .fetch_one(&mut *tx)
                .await
                .map_err(StoreError::db(OP))?;
            let first = last - (f.len() as i64 - 1);
            sqlx::query(q::INSERT_FLOW_BLOCK)
                .bind(first)
                .bind(last)
                .bind(identity_list(f))
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db(OP))?;
        }

        // Edges, pre-aggregated and sorted, upserted in chunks.
        let mut start = 0;
        for size in chunk_sizes(p.edges.len(), rows_per_chunk(EDGE_COLS)) {
            let mut b = QueryBuilder::<Sqlite>::new(format!("INSERT INTO edges ({}) ", q::EDGE_COLUMNS));
            b.push_values(&p.edges[start..start + size], |mut row, (k, a)| {
                let [ce, be, ci, bi] = a.counters();
                row.push_bind(i64::from(k.src.0))
                    .push_bind(i64::from(k.dst.0))
                    .push_bind(i32::from(k.dst_port))
                    .push_bind(i32::from(k.protocol.number()))
                    .push_bind(a.first_seen_unix_ms)
                    .push_bind(a.last_seen_unix_ms)
                    .push_bind(ce)
                    .push_bind(be)
                    .push_bind(ci)
                    .push_bind(bi);
            });
            b.push(UPSERT_EDGES);
            b.build().execute(&mut *tx).await.map_err(StoreError::db(OP))?;
            start += size;
        }

        if let Some(eps) = &p.endpoints {
            sqlx::query(q::DELETE_NODE_ENDPOINTS)
                .bind(p.node_id)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db(OP))?;
            for chunk in eps.chunks(rows_per_chunk(ENDPOINT_COLS)) {
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

        for chunk in p.dns.chunks(rows_per_chunk(DNS_COLS)) {
            let mut b = QueryBuilder::<Sqlite>::new(format!("INSERT INTO dns_answers ({}) ", q::DNS_COLUMNS));
            b.push_values(chunk, |mut row, d| {
                row.push_bind(p.node_id)
                    .push_bind(d.netns_ino)
                    .push_bind(d.name.as_str())
                    .push_bind(d.addr.as_str())
                    .push_bind(d.ttl_seconds)
                    .push_bind(d.first_seen_unix_ms)
                    .push_bind(d.last_seen_unix_ms);
            });
            b.push(UPSERT_DNS);
            b.build().execute(&mut *tx).await.map_err(StoreError::db(OP))?;
        }

        tx.commit().await.map_err(StoreError::db(OP))?;
        Ok(IngestOutcome::Stored { flows: f.len() as u64, edges: p.edges.len() as u64 })
    }

    // === reads ===

    pub async fn edges(&self, query: &EdgeQuery) -> Result<Vec<EdgeRow>, StoreError> {
        let mut b = q::edges::<Sqlite>(query);
        let raw = b.build_query_as::<RawEdge>().fetch_all(&self.reader).await.map_err(StoreError::db("edges"))?;
        let mut cache = LabelCache::default();
        raw.into_iter().map(|r| r.into_row(&mut cache)).collect()
    }

    pub async fn flows(&self, query: &FlowQuery) -> Result<Vec<FlowRow>, StoreError> {
        const OP: &str = "flows";
        let Some(identity) = query.identity else {
            let mut b = q::flows::<Sqlite>(query);
            let raw = b.build_query_as::<RawFlow>().fetch_all(&self.reader).await.map_err(StoreError::db(OP))?;
            return raw.into_iter().map(FlowRow::try_from).collect();
        };
        // Walk the blocks that mention the identity, newest first, scanning each one's
        // id range until the page is full (see flow_blocks in the migration).
        let limit = i64::from(query.limit.min(MAX_FLOW_PAGE));
        let id = i64::from(identity.0);
        let pattern = format!(",{id},");
        let mut cursor = query.before_id.unwrap_or(i64::MAX);
        let mut out: Vec<RawFlow> = Vec::new();
        let mut conn = self.reader.acquire().await.map_err(StoreError::db(OP))?;
        while (out.len() as i64) < limit {
            let blocks: Vec<(i64, i64)> = sqlx::query_as(q::SELECT_FLOW_BLOCKS)
                .bind(pattern.as_str())
                .bind(cursor)
                .bind(BLOCKS_PER_STEP)
                .fetch_all(&mut *conn)
                .await
                .map_err(StoreError::db(OP))?;
            if blocks.is_empty() {
                break;
            }
            for (first, last) in blocks {
                let want = limit - out.len() as i64;
                let upper = last.min(cursor.saturating_sub(1));
                let mut b = q::flows_in_block::<Sqlite>(query, id, first, upper, want);
                out.extend(b.build_query_as::<RawFlow>().fetch_all(&mut *conn).await.map_err(StoreError::db(OP))?);
                cursor = first;
                if out.len() as i64 >= limit {
                    break;
                }
            }
        }
        out.into_iter().map(FlowRow::try_from).collect()
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
        let mut total = 0;
        loop {
            let n = sqlx::query(q::PRUNE_FLOWS_CHUNK)
                .bind(older_than_unix_ms)
                .bind(q::PRUNE_CHUNK)
                .execute(&self.writer)
                .await
                .map_err(StoreError::db("prune_flows"))?
                .rows_affected();
            total += n;
            if n < q::PRUNE_CHUNK as u64 {
                break;
            }
        }
        sqlx::query(q::PRUNE_FLOW_BLOCKS).execute(&self.writer).await.map_err(StoreError::db("prune_flows"))?;
        Ok(total)
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
