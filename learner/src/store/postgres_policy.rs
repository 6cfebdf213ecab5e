//! PostgreSQL half of proposals, the audit log, rollout modes, imported cluster policies,
//! the external-peer feed and what enforcers report: the statements shared with SQLite
//! (`policy_sql`), plus the locks that SQLite's single writer makes unnecessary and the
//! enforcers' batch inserts as one `UNNEST` statement each.
//!
//! Several learners (or API calls) may write at once, in READ COMMITTED transactions:
//! * one target's versions are written under a transaction-scoped advisory lock on the
//!   target ([`lock`]), so two synthesis runs cannot both number a version 3, and
//!   "supersede the other approved version" sees every committed approval;
//! * decisions are conditional UPDATEs (`… WHERE status = 'proposed'`): of two
//!   concurrent approvals exactly one changes the row, the other finds it decided and
//!   gets [`StoreError::InvalidTransition`];
//! * audit appends lock the one-row `audit_head` (`SELECT … FOR UPDATE`); a waiting
//!   append then reads the head its predecessor committed, so the entries form one
//!   chain in id order.
//!
//! Lock order is always: advisory lock, rows, audit head (last, just before commit),
//! so these transactions cannot deadlock one another.

use bulkhead_model::Identity;
use sqlx::postgres::PgQueryResult;
use sqlx::{PgConnection, Postgres, Transaction};

use super::StoreError;
use super::audit::{AuditQuery, AuditRow, PreparedAudit};
use super::cluster_policies::{ClusterPolicyImport, ClusterPolicyRow, RawClusterPolicy};
use super::enforcement::{self as enf, EventColumns, HitColumns, accumulate_hits};
use super::external_peers::{self, ExternalPeerRow, RawExternalPeer};
use super::policy_sql::{self, PolicyDb, decode_all};
use super::postgres::PgStore;
use super::proposals::{ActivePolicy, NewProposal, PreparedDecision, ProposalQuery, ProposalRecord, ProposalSummary};
use super::rollout::{PreparedRollout, RolloutRow};

type Sql = policy_sql::Sql<Postgres>;

/// One statement per batch whatever its size (see `postgres`): one array per column.
const INSERT_VERDICT_EVENTS: &str = "INSERT INTO verdict_events (node_id, received_unix_ms, at_unix_ms, \
     local_identity, peer_identity, direction, verdict, src_addr, dst_addr, dst_port, protocol, policy_version, \
     rule_proposal_id, rule_direction, rule_index, http_method, http_path, http_truncated) \
     SELECT $1::text, $2::bigint, u.* FROM UNNEST($3::bigint[], $4::bigint[], $5::bigint[], $6::smallint[], \
     $7::smallint[], $8::text[], $9::text[], $10::int[], $11::int[], $12::bigint[], $13::bigint[], \
     $14::smallint[], $15::bigint[], $16::text[], $17::text[], $18::boolean[]) AS u";

/// Rows arrive folded per rule and sorted (`HitColumns`): no row is touched twice, and
/// concurrent reports lock rows in the same order.
const UPSERT_RULE_HITS: &str = concat!(
    "INSERT INTO rule_hits (proposal_id, direction, rule_index, node_id, hits, \
     last_hit_unix_ms) SELECT u.proposal_id, u.direction, u.rule_index, $4::text, u.hits, u.last_hit_unix_ms \
     FROM UNNEST($1::bigint[], $2::smallint[], $3::bigint[], $5::bigint[], $6::bigint[]) \
     AS u (proposal_id, direction, rule_index, hits, last_hit_unix_ms)",
    accumulate_hits!()
);

impl PolicyDb for Postgres {
    /// Locks the head row until commit: a concurrent append waits here, then reads the
    /// head this one committed.
    const SELECT_AUDIT_HEAD: &'static str = "SELECT last_id, last_hash FROM audit_head WHERE singleton = 1 FOR UPDATE";

    fn rows_affected(result: &PgQueryResult) -> u64 {
        result.rows_affected()
    }
}

impl PgStore {
    /// Opens a READ COMMITTED write transaction; the caller takes the locks it needs.
    async fn begin_write(&self, op: &'static str) -> Result<Transaction<'_, Postgres>, StoreError> {
        self.pool.begin().await.map_err(StoreError::db(op))
    }

    // === proposals ===

    pub async fn put_proposal(&self, new: &NewProposal, now_ms: i64) -> Result<ProposalRecord, StoreError> {
        let mut tx = self.begin_write("put_proposal").await?;
        lock(&mut tx, LOCK_PROPOSALS, new.target_id()).await?;
        Sql::put_proposal(tx, new, now_ms).await
    }

    pub async fn decide_proposal(
        &self,
        id: i64,
        d: &PreparedDecision,
        now_ms: i64,
    ) -> Result<ProposalRecord, StoreError> {
        let mut tx = self.begin_write("decide_proposal").await?;
        let target = locked_target(&mut tx, id).await?;
        Sql::decide_proposal(tx, id, target, d, now_ms).await
    }

    pub async fn mark_deployed(&self, id: i64, actor: &str, now_ms: i64) -> Result<ProposalRecord, StoreError> {
        let mut tx = self.begin_write("mark_deployed").await?;
        let target = locked_target(&mut tx, id).await?;
        Sql::mark_deployed(tx, id, target, actor, now_ms).await
    }

    pub async fn proposals(&self, q: &ProposalQuery) -> Result<Vec<ProposalSummary>, StoreError> {
        Sql::proposals(&self.pool, q).await
    }

    pub async fn proposal(&self, id: i64) -> Result<Option<ProposalRecord>, StoreError> {
        Sql::proposal(&self.pool, id).await
    }

    pub async fn proposal_versions(&self, target: Identity) -> Result<Vec<ProposalSummary>, StoreError> {
        Sql::proposal_versions(&self.pool, target).await
    }

    pub async fn active_policies(&self) -> Result<Vec<ActivePolicy>, StoreError> {
        Sql::active_policies(&self.pool).await
    }

    // === audit ===

    /// No advisory lock: [`PolicyDb::SELECT_AUDIT_HEAD`] locks the head row.
    pub async fn append_audit(&self, entry: PreparedAudit) -> Result<AuditRow, StoreError> {
        Sql::append_audit(self.begin_write("append_audit").await?, entry).await
    }

    pub async fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditRow>, StoreError> {
        Sql::audit(&self.pool, q).await
    }

    /// Reads the log and its head in one REPEATABLE READ transaction (one snapshot), so
    /// appends committed meanwhile cannot make a sound chain look cut.
    pub async fn verify_audit_chain(&self) -> Result<u64, StoreError> {
        let tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(StoreError::db("verify_audit_chain"))?;
        Sql::verify_audit_chain(tx).await
    }

    // === rollout ===

    pub async fn set_rollout_mode(&self, change: &PreparedRollout, now_ms: i64) -> Result<RolloutRow, StoreError> {
        let mut tx = self.begin_write("set_rollout_mode").await?;
        lock(&mut tx, LOCK_ROLLOUT, i64::from(change.target.0)).await?;
        Sql::set_rollout_mode(tx, change, now_ms).await
    }

    pub async fn rollout_modes(&self) -> Result<Vec<RolloutRow>, StoreError> {
        Sql::rollout_modes(&self.pool).await
    }

    // === cluster policies ===

    pub async fn replace_cluster_policies(
        &self,
        source: &str,
        rows: &[RawClusterPolicy],
        now_ms: i64,
    ) -> Result<ClusterPolicyImport, StoreError> {
        let mut tx = self.begin_write("replace_cluster_policies").await?;
        // One import at a time: two concurrent replaces of a source would both delete
        // the old rows and then collide inserting the new ones.
        lock(&mut tx, LOCK_CLUSTER_IMPORT, 0).await?;
        Sql::replace_cluster_policies(tx, source, rows, now_ms).await
    }

    pub async fn cluster_policies(&self) -> Result<Vec<ClusterPolicyRow>, StoreError> {
        Sql::cluster_policies(&self.pool).await
    }

    // === enforcers ===

    pub async fn enforcer_hello(
        &self,
        node_id: String,
        boot_id: String,
        agent_version: String,
        applied_version: Option<i64>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        Sql::enforcer_hello(&self.pool, node_id, boot_id, agent_version, applied_version, now_ms).await
    }

    pub async fn enforcer_ack(
        &self,
        node_id: String,
        version: i64,
        error: Option<String>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        Sql::enforcer_ack(&self.pool, node_id, version, error, now_ms).await
    }

    pub async fn enforcer_loss(&self, node_id: String, loss: [i64; 3], now_ms: i64) -> Result<(), StoreError> {
        Sql::enforcer_loss(&self.pool, node_id, loss, now_ms).await
    }

    pub async fn set_desired_version(&self, node_id: String, version: i64, now_ms: i64) -> Result<(), StoreError> {
        Sql::set_desired_version(&self.pool, node_id, version, now_ms).await
    }

    pub async fn enforcers(&self) -> Result<Vec<enf::EnforcerRow>, StoreError> {
        Sql::enforcers(&self.pool).await
    }

    /// One statement, so the batch is stored whole or not at all without an explicit
    /// transaction.
    pub async fn insert_verdict_events(&self, node_id: &str, c: &EventColumns, now_ms: i64) -> Result<u64, StoreError> {
        if c.len() == 0 {
            return Ok(0);
        }
        let n = sqlx::query(INSERT_VERDICT_EVENTS)
            .bind(node_id)
            .bind(now_ms)
            .bind(&c.at_unix_ms)
            .bind(&c.local_identity)
            .bind(&c.peer_identity)
            .bind(&c.direction)
            .bind(&c.verdict)
            .bind(&c.src_addr)
            .bind(&c.dst_addr)
            .bind(&c.dst_port)
            .bind(&c.protocol)
            .bind(&c.policy_version)
            .bind(&c.rule_proposal_id)
            .bind(&c.rule_direction)
            .bind(&c.rule_index)
            .bind(&c.http_method)
            .bind(&c.http_path)
            .bind(&c.http_truncated)
            .execute(&self.pool)
            .await
            .map_err(StoreError::db("insert_verdict_events"))?
            .rows_affected();
        Ok(n)
    }

    pub async fn verdict_events(&self, q: &enf::VerdictQuery) -> Result<Vec<enf::VerdictEventRecord>, StoreError> {
        Sql::verdict_events(&self.pool, q).await
    }

    pub async fn verdict_counts(&self, since_unix_ms: i64) -> Result<Vec<enf::VerdictCount>, StoreError> {
        Sql::verdict_counts(&self.pool, since_unix_ms).await
    }

    pub async fn prune_verdict_events(&self, older_than_unix_ms: i64) -> Result<u64, StoreError> {
        Sql::prune_verdict_events(&self.pool, older_than_unix_ms).await
    }

    /// One statement (see [`UPSERT_RULE_HITS`]).
    pub async fn add_rule_hits(&self, node_id: &str, c: &HitColumns) -> Result<(), StoreError> {
        if c.len() == 0 {
            return Ok(());
        }
        sqlx::query(UPSERT_RULE_HITS)
            .bind(&c.proposal_id)
            .bind(&c.direction)
            .bind(&c.rule_index)
            .bind(node_id)
            .bind(&c.hits)
            .bind(&c.last_hit_unix_ms)
            .execute(&self.pool)
            .await
            .map_err(StoreError::db("add_rule_hits"))?;
        Ok(())
    }

    pub async fn rule_hits(&self, proposal_id: i64) -> Result<Vec<enf::RuleHitRow>, StoreError> {
        Sql::rule_hits(&self.pool, proposal_id).await
    }

    // === replay feeds ===

    pub async fn external_peers(
        &self,
        since_unix_ms: i64,
        until_unix_ms: i64,
    ) -> Result<Vec<ExternalPeerRow>, StoreError> {
        let query = sqlx::query_as::<_, RawExternalPeer>(external_peers::SELECT_POSTGRES)
            .bind(i64::from(Identity::WORLD.0))
            .bind(since_unix_ms)
            .bind(until_unix_ms);
        decode_all("external_peers", query.fetch_all(&self.pool).await)
    }
}

// === locks ===

/// `pg_advisory_xact_lock` takes one bigint: the high 32 bits say what is locked
/// (ASCII tags, so a lock is recognisable in `pg_locks`), the low 32 bits which one.
const LOCK_PROPOSALS: i64 = 0x4248_5052 << 32; // "BHPR" + target identity
const LOCK_ROLLOUT: i64 = 0x4248_524F << 32; // "BHRO" + target identity
const LOCK_CLUSTER_IMPORT: i64 = 0x4248_4349 << 32; // "BHCI"

/// Takes a transaction-scoped advisory lock, released at commit or rollback.
async fn lock(conn: &mut PgConnection, space: i64, id: i64) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(space | (id & 0xFFFF_FFFF))
        .execute(&mut *conn)
        .await
        .map_err(StoreError::db("lock"))?;
    Ok(())
}

/// The target of version `id`, with the target's proposals lock taken: what a decision
/// or deployment holds before its conditional UPDATE.
async fn locked_target(conn: &mut PgConnection, id: i64) -> Result<i64, StoreError> {
    let (target, _) = Sql::target_and_status(conn, id).await?;
    lock(conn, LOCK_PROPOSALS, target).await?;
    Ok(target)
}
