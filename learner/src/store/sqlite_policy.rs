//! SQLite half of proposals, the audit log, rollout modes, imported cluster policies,
//! the external-peer feed and what enforcers report: the shared statements
//! (`policy_sql`) on SQLite's pools, plus the enforcers' batch inserts as multi-row
//! VALUES in chunks below SQLite's bind-parameter limit.
//!
//! Every write is one `BEGIN IMMEDIATE` transaction on the single writer connection
//! (see `sqlite`), which already serialises everything: a target's version numbers,
//! conditional decisions and the audit chain need no further locking here. The
//! conditional UPDATEs (`… WHERE status = 'proposed'`) are kept anyway so both
//! backends run the same statements.

use bulkhead_model::Identity;
use sqlx::sqlite::SqliteQueryResult;
use sqlx::{QueryBuilder, Sqlite, Transaction};

use super::StoreError;
use super::audit::{self, AuditQuery, AuditRow, PreparedAudit};
use super::cluster_policies::{ClusterPolicyImport, ClusterPolicyRow, RawClusterPolicy};
use super::enforcement::{self as enf, EVENT_COLUMNS, EventColumns, HitColumns};
use super::external_peers::{self, ExternalPeerRow, RawExternalPeer};
use super::policy_sql::{self, PolicyDb, decode_all};
use super::proposals::{ActivePolicy, NewProposal, PreparedDecision, ProposalQuery, ProposalRecord, ProposalSummary};
use super::rollout::{PreparedRollout, RolloutRow};
use super::sqlite::SqliteStore;

type Sql = policy_sql::Sql<Sqlite>;

/// SQLite's limit on bound parameters per statement (SQLITE_MAX_VARIABLE_NUMBER).
const MAX_BINDS: usize = 32_766;
/// Verdict events per INSERT (18 binds each).
const EVENT_ROWS_PER_INSERT: usize = 1_800;
/// Rule-hit rows per upsert (6 binds each).
const HIT_ROWS_PER_UPSERT: usize = 5_000;
const _: () = assert!(EVENT_ROWS_PER_INSERT * 18 <= MAX_BINDS && HIT_ROWS_PER_UPSERT * 6 <= MAX_BINDS);

/// The row ranges of `n` rows in chunks of at most `max`.
fn chunks(n: usize, max: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..n).step_by(max).map(move |lo| lo..n.min(lo + max))
}

impl PolicyDb for Sqlite {
    /// A plain read: the single writer already serialises appends.
    const SELECT_AUDIT_HEAD: &'static str = audit::SELECT_HEAD;

    fn rows_affected(result: &SqliteQueryResult) -> u64 {
        result.rows_affected()
    }
}

impl SqliteStore {
    /// Opens a write transaction on the single writer, taking the write lock up front.
    async fn begin_write(&self, op: &'static str) -> Result<Transaction<'_, Sqlite>, StoreError> {
        self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(StoreError::db(op))
    }

    // === proposals ===

    pub async fn put_proposal(&self, new: &NewProposal, now_ms: i64) -> Result<ProposalRecord, StoreError> {
        Sql::put_proposal(self.begin_write("put_proposal").await?, new, now_ms).await
    }

    pub async fn decide_proposal(
        &self,
        id: i64,
        d: &PreparedDecision,
        now_ms: i64,
    ) -> Result<ProposalRecord, StoreError> {
        let mut tx = self.begin_write("decide_proposal").await?;
        let (target, _) = Sql::target_and_status(&mut tx, id).await?;
        Sql::decide_proposal(tx, id, target, d, now_ms).await
    }

    pub async fn mark_deployed(&self, id: i64, actor: &str, now_ms: i64) -> Result<ProposalRecord, StoreError> {
        let mut tx = self.begin_write("mark_deployed").await?;
        let (target, _) = Sql::target_and_status(&mut tx, id).await?;
        Sql::mark_deployed(tx, id, target, actor, now_ms).await
    }

    pub async fn proposals(&self, q: &ProposalQuery) -> Result<Vec<ProposalSummary>, StoreError> {
        Sql::proposals(&self.reader, q).await
    }

    pub async fn proposal(&self, id: i64) -> Result<Option<ProposalRecord>, StoreError> {
        Sql::proposal(&self.reader, id).await
    }

    pub async fn proposal_versions(&self, target: Identity) -> Result<Vec<ProposalSummary>, StoreError> {
        Sql::proposal_versions(&self.reader, target).await
    }

    pub async fn active_policies(&self) -> Result<Vec<ActivePolicy>, StoreError> {
        Sql::active_policies(&self.reader).await
    }

    // === audit ===

    pub async fn append_audit(&self, entry: PreparedAudit) -> Result<AuditRow, StoreError> {
        Sql::append_audit(self.begin_write("append_audit").await?, entry).await
    }

    pub async fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditRow>, StoreError> {
        Sql::audit(&self.reader, q).await
    }

    /// Reads the log and its head in one read transaction: under WAL that is one
    /// snapshot, so appends committed meanwhile cannot make a sound chain look cut.
    pub async fn verify_audit_chain(&self) -> Result<u64, StoreError> {
        let tx = self.reader.begin().await.map_err(StoreError::db("verify_audit_chain"))?;
        Sql::verify_audit_chain(tx).await
    }

    // === rollout ===

    pub async fn set_rollout_mode(&self, change: &PreparedRollout, now_ms: i64) -> Result<RolloutRow, StoreError> {
        Sql::set_rollout_mode(self.begin_write("set_rollout_mode").await?, change, now_ms).await
    }

    pub async fn rollout_modes(&self) -> Result<Vec<RolloutRow>, StoreError> {
        Sql::rollout_modes(&self.reader).await
    }

    // === cluster policies ===

    pub async fn replace_cluster_policies(
        &self,
        source: &str,
        rows: &[RawClusterPolicy],
        now_ms: i64,
    ) -> Result<ClusterPolicyImport, StoreError> {
        let tx = self.begin_write("replace_cluster_policies").await?;
        Sql::replace_cluster_policies(tx, source, rows, now_ms).await
    }

    pub async fn cluster_policies(&self) -> Result<Vec<ClusterPolicyRow>, StoreError> {
        Sql::cluster_policies(&self.reader).await
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
        Sql::enforcer_hello(&self.writer, node_id, boot_id, agent_version, applied_version, now_ms).await
    }

    pub async fn enforcer_ack(
        &self,
        node_id: String,
        version: i64,
        error: Option<String>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        Sql::enforcer_ack(&self.writer, node_id, version, error, now_ms).await
    }

    pub async fn enforcer_loss(&self, node_id: String, loss: [i64; 3], now_ms: i64) -> Result<(), StoreError> {
        Sql::enforcer_loss(&self.writer, node_id, loss, now_ms).await
    }

    pub async fn set_desired_version(&self, node_id: String, version: i64, now_ms: i64) -> Result<(), StoreError> {
        Sql::set_desired_version(&self.writer, node_id, version, now_ms).await
    }

    pub async fn enforcers(&self) -> Result<Vec<enf::EnforcerRow>, StoreError> {
        Sql::enforcers(&self.reader).await
    }

    /// All chunks in one `BEGIN IMMEDIATE` transaction: the batch is stored whole or not
    /// at all. Full chunks share one statement text (prepared once per connection); the
    /// last, shorter one is not cached.
    pub async fn insert_verdict_events(&self, node_id: &str, c: &EventColumns, now_ms: i64) -> Result<u64, StoreError> {
        const OP: &str = "insert_verdict_events";
        let mut tx = self.begin_write(OP).await?;
        for rows in chunks(c.len(), EVENT_ROWS_PER_INSERT) {
            let full = rows.len() == EVENT_ROWS_PER_INSERT;
            let mut b = QueryBuilder::<Sqlite>::new(format!("INSERT INTO verdict_events ({EVENT_COLUMNS}) "));
            b.push_values(rows, |mut row, i| {
                row.push_bind(node_id)
                    .push_bind(now_ms)
                    .push_bind(c.at_unix_ms[i])
                    .push_bind(c.local_identity[i])
                    .push_bind(c.peer_identity[i])
                    .push_bind(c.direction[i])
                    .push_bind(c.verdict[i])
                    .push_bind(c.src_addr[i].as_str())
                    .push_bind(c.dst_addr[i].as_str())
                    .push_bind(c.dst_port[i])
                    .push_bind(c.protocol[i])
                    .push_bind(c.policy_version[i])
                    .push_bind(c.rule_proposal_id[i])
                    .push_bind(c.rule_direction[i])
                    .push_bind(c.rule_index[i])
                    .push_bind(c.http_method[i].as_deref())
                    .push_bind(c.http_path[i].as_deref())
                    .push_bind(c.http_truncated[i]);
            });
            b.build().persistent(full).execute(&mut *tx).await.map_err(StoreError::db(OP))?;
        }
        tx.commit().await.map_err(StoreError::db(OP))?;
        Ok(c.len() as u64)
    }

    pub async fn verdict_events(&self, q: &enf::VerdictQuery) -> Result<Vec<enf::VerdictEventRecord>, StoreError> {
        Sql::verdict_events(&self.reader, q).await
    }

    pub async fn verdict_counts(&self, since_unix_ms: i64) -> Result<Vec<enf::VerdictCount>, StoreError> {
        Sql::verdict_counts(&self.reader, since_unix_ms).await
    }

    pub async fn prune_verdict_events(&self, older_than_unix_ms: i64) -> Result<u64, StoreError> {
        Sql::prune_verdict_events(&self.writer, older_than_unix_ms).await
    }

    /// One transaction, chunked like [`SqliteStore::insert_verdict_events`].
    pub async fn add_rule_hits(&self, node_id: &str, c: &HitColumns) -> Result<(), StoreError> {
        const OP: &str = "add_rule_hits";
        let mut tx = self.begin_write(OP).await?;
        for rows in chunks(c.len(), HIT_ROWS_PER_UPSERT) {
            let full = rows.len() == HIT_ROWS_PER_UPSERT;
            let mut b = QueryBuilder::<Sqlite>::new(
                "INSERT INTO rule_hits (proposal_id, direction, rule_index, node_id, hits, last_hit_unix_ms) ",
            );
            b.push_values(rows, |mut row, i| {
                row.push_bind(c.proposal_id[i])
                    .push_bind(c.direction[i])
                    .push_bind(c.rule_index[i])
                    .push_bind(node_id)
                    .push_bind(c.hits[i])
                    .push_bind(c.last_hit_unix_ms[i]);
            });
            b.push(enf::ACCUMULATE_HITS);
            b.build().persistent(full).execute(&mut *tx).await.map_err(StoreError::db(OP))?;
        }
        tx.commit().await.map_err(StoreError::db(OP))
    }

    pub async fn rule_hits(&self, proposal_id: i64) -> Result<Vec<enf::RuleHitRow>, StoreError> {
        Sql::rule_hits(&self.reader, proposal_id).await
    }

    // === replay feeds ===

    pub async fn external_peers(
        &self,
        since_unix_ms: i64,
        until_unix_ms: i64,
    ) -> Result<Vec<ExternalPeerRow>, StoreError> {
        let world = Identity::WORLD;
        let query = sqlx::query_as::<_, RawExternalPeer>(external_peers::SELECT_SQLITE)
            .bind(i64::from(world.0))
            .bind(since_unix_ms)
            .bind(until_unix_ms)
            .bind(format!(",{},", world.0));
        decode_all("external_peers", query.fetch_all(&self.reader).await)
    }
}
