//! SQLite half of proposals, the audit log, rollout modes, imported cluster policies and
//! the external-peer feed: the shared statements (`policy_sql`) on SQLite's pools.
//!
//! Every write is one `BEGIN IMMEDIATE` transaction on the single writer connection
//! (see `sqlite`), which already serialises everything: a target's version numbers,
//! conditional decisions and the audit chain need no further locking here. The
//! conditional UPDATEs (`… WHERE status = 'proposed'`) are kept anyway so both
//! backends run the same statements.

use bulkhead_model::Identity;
use sqlx::sqlite::SqliteQueryResult;
use sqlx::{Sqlite, Transaction};

use super::StoreError;
use super::audit::{self, AuditQuery, AuditRow, PreparedAudit};
use super::cluster_policies::{ClusterPolicyImport, ClusterPolicyRow, RawClusterPolicy};
use super::external_peers::{self, ExternalPeerRow, RawExternalPeer};
use super::policy_sql::{self, PolicyDb, decode_all};
use super::proposals::{ActivePolicy, NewProposal, PreparedDecision, ProposalQuery, ProposalRecord, ProposalSummary};
use super::rollout::{PreparedRollout, RolloutRow};
use super::sqlite::SqliteStore;

type Sql = policy_sql::Sql<Sqlite>;

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
