//! PostgreSQL backend: the same schema and semantics as SQLite, for deployments with
//! several learners or more data than one file should hold (DESIGN.md §10: the same
//! driver also speaks to Postgres-compatible distributed engines).
//!
//! Bulk writes bind one array per column and `INSERT … SELECT FROM UNNEST(…)`: one
//! statement per table per batch whatever its size, no bind-parameter limit, and a
//! statement text that never changes, so it is prepared once per connection.
//! Concurrent ingests upsert edges in key order (see `PreparedBatch::edges`), and a
//! deadlock or serialization failure is retried.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{PgConnection, Postgres};

use super::decode::{LabelCache, RawAgent, RawDnsAnswer, RawEdge, RawEndpoint, RawFlow, RawIdentity};
use super::prepare::{AddrBytes, PreparedBatch};
use super::queries::{self as q};
use super::{
    AgentRow, Backend, EdgeQuery, EdgeRow, EndpointRow, FlowQuery, FlowRow, IdentityRow, IngestOutcome, StoreError,
};
use bulkhead_model::{DnsAnswer, Identity};

pub(crate) static MIGRATOR: Migrator = sqlx::migrate!("../migrations/postgres");

/// Pool size: ingest streams, API handlers and background jobs share it.
const MAX_CONNECTIONS: u32 = 16;
/// Attempts for one ingest when PostgreSQL reports a deadlock or serialization failure.
const INGEST_ATTEMPTS: u32 = 3;

const INSERT_FLOWS: &str = "INSERT INTO flows (node_id, received_unix_ms, src_identity, dst_identity, src_addr, \
     src_port, dst_addr, dst_port, protocol, direction, netns_ino, cgroup_id, pid, comm, connections, bytes_sent, \
     bytes_received, packets, verdict, first_seen_unix_ms, last_seen_unix_ms) \
     SELECT $1::text, $2::bigint, u.* FROM UNNEST($3::bigint[], $4::bigint[], $5::bytea[], $6::int[], $7::bytea[], \
     $8::int[], $9::int[], $10::smallint[], $11::bigint[], $12::bigint[], $13::bigint[], $14::text[], $15::bigint[], \
     $16::bigint[], $17::bigint[], $18::bigint[], $19::smallint[], $20::bigint[], $21::bigint[]) AS u";

const UPSERT_EDGES: &str = "INSERT INTO edges (src_identity, dst_identity, dst_port, protocol, first_seen_unix_ms, \
     last_seen_unix_ms, connections_egress, bytes_egress, connections_ingress, bytes_ingress) \
     SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::int[], $4::int[], $5::bigint[], $6::bigint[], \
     $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[]) \
     ON CONFLICT (src_identity, dst_identity, dst_port, protocol) DO UPDATE SET \
     first_seen_unix_ms = LEAST(edges.first_seen_unix_ms, EXCLUDED.first_seen_unix_ms), \
     last_seen_unix_ms = GREATEST(edges.last_seen_unix_ms, EXCLUDED.last_seen_unix_ms), \
     connections_egress = LEAST(edges.connections_egress, 9223372036854775807 - EXCLUDED.connections_egress) \
        + EXCLUDED.connections_egress, \
     bytes_egress = LEAST(edges.bytes_egress, 9223372036854775807 - EXCLUDED.bytes_egress) + EXCLUDED.bytes_egress, \
     connections_ingress = LEAST(edges.connections_ingress, 9223372036854775807 - EXCLUDED.connections_ingress) \
        + EXCLUDED.connections_ingress, \
     bytes_ingress = LEAST(edges.bytes_ingress, 9223372036854775807 - EXCLUDED.bytes_ingress) + EXCLUDED.bytes_ingress";

const INSERT_ENDPOINTS: &str = "INSERT INTO endpoints (node_id, netns_ino, netns_name, host, identity, workload, \
     addresses, cgroups, updated_unix_ms) \
     SELECT $1::text, u.*, $9::bigint FROM UNNEST($2::bigint[], $3::text[], $4::boolean[], $5::bigint[], \
     $6::text[], $7::text[], $8::text[]) AS u";

const UPSERT_DNS: &str = "INSERT INTO dns_answers (node_id, netns_ino, name, addr, ttl_seconds, \
     first_seen_unix_ms, last_seen_unix_ms) \
     SELECT $1::text, u.* FROM UNNEST($2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], \
     $7::bigint[]) AS u \
     ON CONFLICT (node_id, netns_ino, name, addr) DO UPDATE SET \
     ttl_seconds = CASE WHEN EXCLUDED.last_seen_unix_ms >= dns_answers.last_seen_unix_ms \
        THEN EXCLUDED.ttl_seconds ELSE dns_answers.ttl_seconds END, \
     first_seen_unix_ms = LEAST(dns_answers.first_seen_unix_ms, EXCLUDED.first_seen_unix_ms), \
     last_seen_unix_ms = GREATEST(dns_answers.last_seen_unix_ms, EXCLUDED.last_seen_unix_ms)";

// GREATEST/LEAST ignore NULLs, which is what a first sighting (or first prune) needs.
const UPSERT_AGENT_FROM_BATCH: &str = "INSERT INTO agents \
     (node_id, boot_id, first_seen_unix_ms, last_seen_unix_ms, batches_stored) VALUES ($1, $2, $3, $3, 1) \
     ON CONFLICT (node_id) DO UPDATE SET \
     boot_id = COALESCE(agents.boot_id, EXCLUDED.boot_id), \
     first_seen_unix_ms = COALESCE(agents.first_seen_unix_ms, EXCLUDED.first_seen_unix_ms), \
     last_seen_unix_ms = GREATEST(agents.last_seen_unix_ms, EXCLUDED.last_seen_unix_ms), \
     batches_stored = agents.batches_stored + 1";

const UPSERT_BOOT_FROM_BATCH: &str = "INSERT INTO agent_boots (node_id, boot_id, first_seen_unix_ms, \
     last_seen_unix_ms, stored_through_seq, batches_stored, loss_ringbuf_dropped, loss_queue_dropped, \
     loss_spool_evicted_batches, loss_spool_evicted_flows, loss_rejected_batches) \
     VALUES ($1, $2, $3, $3, $4, 1, $5, $6, $7, $8, $9) \
     ON CONFLICT (node_id, boot_id) DO UPDATE SET \
     last_seen_unix_ms = GREATEST(agent_boots.last_seen_unix_ms, EXCLUDED.last_seen_unix_ms), \
     stored_through_seq = GREATEST(agent_boots.stored_through_seq, EXCLUDED.stored_through_seq), \
     batches_stored = agent_boots.batches_stored + 1, \
     loss_ringbuf_dropped = GREATEST(agent_boots.loss_ringbuf_dropped, EXCLUDED.loss_ringbuf_dropped), \
     loss_queue_dropped = GREATEST(agent_boots.loss_queue_dropped, EXCLUDED.loss_queue_dropped), \
     loss_spool_evicted_batches = GREATEST(agent_boots.loss_spool_evicted_batches, EXCLUDED.loss_spool_evicted_batches), \
     loss_spool_evicted_flows = GREATEST(agent_boots.loss_spool_evicted_flows, EXCLUDED.loss_spool_evicted_flows), \
     loss_rejected_batches = GREATEST(agent_boots.loss_rejected_batches, EXCLUDED.loss_rejected_batches)";

const TOUCH_AGENT: &str = "INSERT INTO agents \
     (node_id, boot_id, agent_version, first_seen_unix_ms, last_seen_unix_ms) VALUES ($1, $2, $3, $4, $4) \
     ON CONFLICT (node_id) DO UPDATE SET \
     boot_id = EXCLUDED.boot_id, agent_version = EXCLUDED.agent_version, \
     first_seen_unix_ms = COALESCE(agents.first_seen_unix_ms, EXCLUDED.first_seen_unix_ms), \
     last_seen_unix_ms = GREATEST(agents.last_seen_unix_ms, EXCLUDED.last_seen_unix_ms)";

const TOUCH_BOOT: &str = "INSERT INTO agent_boots (node_id, boot_id, first_seen_unix_ms, last_seen_unix_ms) \
     VALUES ($1, $2, $3, $3) ON CONFLICT (node_id, boot_id) DO UPDATE SET \
     last_seen_unix_ms = GREATEST(agent_boots.last_seen_unix_ms, EXCLUDED.last_seen_unix_ms)";

const MARK_PRUNED_BATCHES: &str = "UPDATE agent_boots b SET pruned_through_seq = GREATEST(b.pruned_through_seq, p.seq) \
     FROM (SELECT node_id, boot_id, max(seq) AS seq FROM ingested_batches WHERE received_unix_ms < $1 \
           GROUP BY node_id, boot_id) p \
     WHERE b.node_id = p.node_id AND b.boot_id = p.boot_id";

const INSERT_IDENTITY_RETURNING: &str = "INSERT INTO identities (labels_digest, labels, created_unix_ms) \
     VALUES ($1, $2, $3) ON CONFLICT (labels_digest) DO NOTHING RETURNING id, labels, created_unix_ms";

/// The PostgreSQL half of [`Store`](super::Store).
#[derive(Debug, Clone)]
pub(crate) struct PgStore {
    pub(super) pool: PgPool,
}

impl PgStore {
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|source| StoreError::InvalidUrl { backend: Backend::Postgres, source })?
            .application_name("bulkhead-learner");
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Connect { backend: Backend::Postgres, source })?;
        // sqlx serialises concurrent migrators with an advisory lock, so several
        // learners may start at once.
        MIGRATOR.run(&pool).await.map_err(|source| StoreError::Migrate { backend: Backend::Postgres, source })?;
        Ok(Self { pool })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    // === identities ===

    pub async fn ensure_identity(
        &self,
        digest: &[u8; 32],
        canonical: &str,
        now_ms: i64,
    ) -> Result<Identity, StoreError> {
        const OP: &str = "ensure_identity";
        // Look up first: an INSERT that conflicts still consumes a sequence number, and
        // this is called for every label set a batch mentions.
        let existing = sqlx::query_as::<_, RawIdentity>(q::SELECT_IDENTITY_BY_DIGEST)
            .bind(digest.as_slice())
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::db(OP))?;
        if let Some(row) = existing {
            return super::checked_identity(row, canonical);
        }
        let inserted = sqlx::query_as::<_, RawIdentity>(INSERT_IDENTITY_RETURNING)
            .bind(digest.as_slice())
            .bind(canonical)
            .bind(now_ms)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::db(OP))?;
        let row = match inserted {
            Some(row) => row,
            // Lost the race to a concurrent allocator, whose row is committed by now
            // (the unique index made us wait for it).
            None => sqlx::query_as::<_, RawIdentity>(q::SELECT_IDENTITY_BY_DIGEST)
                .bind(digest.as_slice())
                .fetch_one(&self.pool)
                .await
                .map_err(StoreError::db(OP))?,
        };
        super::checked_identity(row, canonical)
    }

    pub async fn identities(&self) -> Result<Vec<IdentityRow>, StoreError> {
        sqlx::query_as::<_, RawIdentity>(q::SELECT_IDENTITIES)
            .fetch_all(&self.pool)
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
            .execute(&self.pool)
            .await
            .map_err(StoreError::db("register_agent"))?;
        Ok(())
    }

    pub async fn agent_known(&self, node_id: &str) -> Result<bool, StoreError> {
        let found: Option<String> = sqlx::query_scalar(q::AGENT_KNOWN)
            .bind(node_id)
            .fetch_optional(&self.pool)
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
        let mut tx = self.pool.begin().await.map_err(StoreError::db(OP))?;
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
            .fetch_all(&self.pool)
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
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::db("stored_through_seq"))
    }

    // === ingest ===

    pub async fn ingest(&self, p: &PreparedBatch<'_>) -> Result<IngestOutcome, StoreError> {
        let mut attempt = 1;
        loop {
            match self.ingest_once(p).await {
                Err(e) if e.is_transient() && attempt < INGEST_ATTEMPTS => {
                    tracing::debug!(node = p.node_id, seq = p.seq, attempt, error = %e, "Retrying ingest.");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn ingest_once(&self, p: &PreparedBatch<'_>) -> Result<IngestOutcome, StoreError> {
        const OP: &str = "ingest";
        let mut tx = self.pool.begin().await.map_err(StoreError::db(OP))?;
        if !record_batch(&mut tx, p).await.map_err(StoreError::db(OP))? {
            tx.rollback().await.map_err(StoreError::db(OP))?;
            return Ok(IngestOutcome::Duplicate);
        }
        write_batch(&mut tx, p).await.map_err(StoreError::db(OP))?;
        tx.commit().await.map_err(StoreError::db(OP))?;
        Ok(IngestOutcome::Stored { flows: p.flows.len() as u64, edges: p.edges.len() as u64 })
    }

    // === reads ===

    pub async fn edges(&self, query: &EdgeQuery) -> Result<Vec<EdgeRow>, StoreError> {
        let mut b = q::edges::<Postgres>(query);
        let raw = b.build_query_as::<RawEdge>().fetch_all(&self.pool).await.map_err(StoreError::db("edges"))?;
        let mut cache = LabelCache::default();
        raw.into_iter().map(|r| r.into_row(&mut cache)).collect()
    }

    pub async fn flows(&self, query: &FlowQuery) -> Result<Vec<FlowRow>, StoreError> {
        let mut b = q::flows::<Postgres>(query);
        b.build_query_as::<RawFlow>()
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::db("flows"))?
            .into_iter()
            .map(FlowRow::try_from)
            .collect()
    }

    pub async fn endpoints(&self) -> Result<Vec<EndpointRow>, StoreError> {
        sqlx::query_as::<_, RawEndpoint>(q::SELECT_ENDPOINTS)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::db("endpoints"))?
            .into_iter()
            .map(EndpointRow::try_from)
            .collect()
    }

    pub async fn dns_answers(&self, since_unix_ms: i64) -> Result<Vec<DnsAnswer>, StoreError> {
        sqlx::query_as::<_, RawDnsAnswer>(q::SELECT_DNS_ANSWERS)
            .bind(since_unix_ms)
            .fetch_all(&self.pool)
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
                .execute(&self.pool)
                .await
                .map_err(StoreError::db("prune_flows"))?
                .rows_affected();
            total += n;
            if n < q::PRUNE_CHUNK as u64 {
                return Ok(total);
            }
        }
    }

    pub async fn prune_dns_answers(&self, older_than_unix_ms: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query(q::PRUNE_DNS_ANSWERS)
            .bind(older_than_unix_ms)
            .execute(&self.pool)
            .await
            .map_err(StoreError::db("prune_dns_answers"))?
            .rows_affected())
    }

    pub async fn prune_batch_records(&self, older_than_unix_ms: i64) -> Result<u64, StoreError> {
        const OP: &str = "prune_batch_records";
        let mut tx = self.pool.begin().await.map_err(StoreError::db(OP))?;
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

/// Records the batch in the dedupe table; false if it was stored (or pruned) before.
async fn record_batch(conn: &mut PgConnection, p: &PreparedBatch<'_>) -> Result<bool, sqlx::Error> {
    let pruned: Option<Option<i64>> =
        sqlx::query_scalar(q::PRUNED_THROUGH_SEQ).bind(p.node_id).bind(p.boot_id).fetch_optional(&mut *conn).await?;
    let pruned = pruned.flatten();
    if pruned.is_some_and(|through| p.seq <= through) {
        return Ok(false);
    }
    let n = sqlx::query(q::INSERT_BATCH_RECORD)
        .bind(p.node_id)
        .bind(p.boot_id)
        .bind(p.seq)
        .bind(p.received_unix_ms)
        .bind(i64::try_from(p.flows.len()).unwrap_or(i64::MAX))
        .execute(&mut *conn)
        .await?
        .rows_affected();
    Ok(n == 1)
}

/// Everything but the dedupe record, in a fixed statement order (agents, boots, flows,
/// edges, edge HTTP facts, endpoints, DNS) so concurrent transactions take row locks in
/// the same order.
async fn write_batch(conn: &mut PgConnection, p: &PreparedBatch<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(UPSERT_AGENT_FROM_BATCH)
        .bind(p.node_id)
        .bind(p.boot_id)
        .bind(p.received_unix_ms)
        .execute(&mut *conn)
        .await?;
    let mut boot =
        sqlx::query(UPSERT_BOOT_FROM_BATCH).bind(p.node_id).bind(p.boot_id).bind(p.received_unix_ms).bind(p.seq);
    for v in p.loss {
        boot = boot.bind(v);
    }
    boot.execute(&mut *conn).await?;

    let f = &p.flows;
    if f.len() > 0 {
        sqlx::query(INSERT_FLOWS)
            .bind(p.node_id)
            .bind(p.received_unix_ms)
            .bind(&f.src_identity)
            .bind(&f.dst_identity)
            .bind(f.src_addr.iter().map(AddrBytes::as_slice).collect::<Vec<_>>())
            .bind(&f.src_port)
            .bind(f.dst_addr.iter().map(AddrBytes::as_slice).collect::<Vec<_>>())
            .bind(&f.dst_port)
            .bind(&f.protocol)
            .bind(&f.direction)
            .bind(&f.netns_ino)
            .bind(&f.cgroup_id)
            .bind(&f.pid)
            .bind(f.comm.iter().map(|c| &**c).collect::<Vec<&str>>())
            .bind(&f.connections)
            .bind(&f.bytes_sent)
            .bind(&f.bytes_received)
            .bind(&f.packets)
            .bind(&f.verdict)
            .bind(&f.first_seen_unix_ms)
            .bind(&f.last_seen_unix_ms)
            .execute(&mut *conn)
            .await?;
    }

    if !p.edges.is_empty() {
        let n = p.edges.len();
        let mut cols: [Vec<i64>; 8] = std::array::from_fn(|_| Vec::with_capacity(n));
        let (mut port, mut proto) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for (k, a) in &p.edges {
            let [ce, be, ci, bi] = a.counters();
            for (col, v) in cols.iter_mut().zip([
                i64::from(k.src.0),
                i64::from(k.dst.0),
                a.first_seen_unix_ms,
                a.last_seen_unix_ms,
                ce,
                be,
                ci,
                bi,
            ]) {
                col.push(v);
            }
            port.push(i32::from(k.dst_port));
            proto.push(i32::from(k.protocol.number()));
        }
        let [src, dst, first, last, ce, be, ci, bi] = cols;
        sqlx::query(UPSERT_EDGES)
            .bind(src)
            .bind(dst)
            .bind(port)
            .bind(proto)
            .bind(first)
            .bind(last)
            .bind(ce)
            .bind(be)
            .bind(ci)
            .bind(bi)
            .execute(&mut *conn)
            .await?;
    }
    super::edge_http::write_postgres(&mut *conn, &p.http).await?;

    if let Some(eps) = &p.endpoints {
        sqlx::query(q::DELETE_NODE_ENDPOINTS).bind(p.node_id).execute(&mut *conn).await?;
        if !eps.is_empty() {
            sqlx::query(INSERT_ENDPOINTS)
                .bind(p.node_id)
                .bind(eps.iter().map(|e| e.netns_ino).collect::<Vec<_>>())
                .bind(eps.iter().map(|e| e.netns_name.clone()).collect::<Vec<_>>())
                .bind(eps.iter().map(|e| e.host).collect::<Vec<_>>())
                .bind(eps.iter().map(|e| e.identity).collect::<Vec<_>>())
                .bind(eps.iter().map(|e| e.workload.clone()).collect::<Vec<_>>())
                .bind(eps.iter().map(|e| e.addresses.clone()).collect::<Vec<_>>())
                .bind(eps.iter().map(|e| e.cgroups.clone()).collect::<Vec<_>>())
                .bind(p.received_unix_ms)
                .execute(&mut *conn)
                .await?;
        }
    }

    if !p.dns.is_empty() {
        let d = &p.dns;
        sqlx::query(UPSERT_DNS)
            .bind(p.node_id)
            .bind(d.iter().map(|a| a.netns_ino).collect::<Vec<_>>())
            .bind(d.iter().map(|a| a.name.clone()).collect::<Vec<_>>())
            .bind(d.iter().map(|a| a.addr.clone()).collect::<Vec<_>>())
            .bind(d.iter().map(|a| a.ttl_seconds).collect::<Vec<_>>())
            .bind(d.iter().map(|a| a.first_seen_unix_ms).collect::<Vec<_>>())
            .bind(d.iter().map(|a| a.last_seen_unix_ms).collect::<Vec<_>>())
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}
