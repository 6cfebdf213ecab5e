//! The policy side's statements — proposals and their decisions, the audit chain,
//! rollout modes, imported cluster policies, and what enforcers report back (status,
//! verdict events, rule hits) — bound, run and decoded once for both backends.
//!
//! What differs for a reason stays with the backend (`sqlite_policy`,
//! `postgres_policy`): how a write transaction begins and what it locks (SQLite's
//! `BEGIN IMMEDIATE` on its single writer; PostgreSQL's advisory locks), the snapshot an
//! audit-chain check reads, the audit-head read ([`PolicyDb::SELECT_AUDIT_HEAD`]), the
//! external-peer query and the enforcers' batch inserts (multi-row VALUES on SQLite,
//! UNNEST on PostgreSQL). A write here takes the transaction its backend opened and
//! locked, runs its statements in it and commits it; a read takes the backend's read
//! pool.
//!
//! Written as generic functions over sqlx, not as a macro stamping out one copy per
//! backend: this way the code reads, formats and type-checks like any other, and every
//! bind and decode is checked against both drivers. The price is the list of bounds on
//! [`Sql`]'s impl block. It is stated once, there: Rust has no trait aliases, and a
//! trait's where-clauses about other types (`i64: Encode<DB>`) are not implied where the
//! trait is used, so the list cannot hide behind [`PolicyDb`]. A backend names its
//! instance once (`type Sql = policy_sql::Sql<Sqlite>;`) and calls `Sql::proposals(…)`.

use std::marker::PhantomData;

use bulkhead_model::{Identity, ProposalStatus};
use sqlx::query::Query;
use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Pool, Transaction, Type};

use super::audit::{self, AuditQuery, AuditRow, ChainCheck, PreparedAudit, RawAuditHead, RawAuditRow, actions};
use super::cluster_policies::{
    self as cluster, ClusterPolicyImport, ClusterPolicyRow, RawClusterPolicy, RawStoredVersion,
};
use super::enforcement::{
    self as enf, EnforcerRow, RawEnforcer, RawRuleHit, RawVerdictCount, RawVerdictEvent, RuleHitRow, VerdictCount,
    VerdictEventRecord, VerdictQuery,
};
use super::proposals::{
    self as p, ActivePolicy, NewProposal, PreparedDecision, ProposalQuery, ProposalRecord, ProposalSummary, PutPlan,
    RawActivePolicy, RawNewest, RawProposal, RawProposalSummary,
};
use super::rollout::{self, PreparedRollout, RawRollout, RolloutRow};
use super::{LEARNER_ACTOR, StoreError};

/// What a backend adds to the shared statements.
pub(crate) trait PolicyDb: Database {
    /// Reads the audit chain's head inside a write transaction, before appending after it.
    const SELECT_AUDIT_HEAD: &'static str;

    /// Rows an UPDATE changed (each driver has the method, sqlx has no trait for it).
    fn rows_affected(result: &Self::QueryResult) -> u64;
}

/// The shared statements, for backend `DB` (see the module docs).
pub(crate) struct Sql<DB>(PhantomData<DB>);

impl<DB> Sql<DB>
where
    DB: PolicyDb,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    // What the statements bind (one lifetime for borrowed values: sqlx encodes an
    // `Option<T>` only for `T: 'q`)…
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> bool: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    // …and the rows they read.
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'r> (i64, String): FromRow<'r, DB::Row>,
    for<'r> RawNewest: FromRow<'r, DB::Row>,
    for<'r> RawProposalSummary: FromRow<'r, DB::Row>,
    for<'r> RawProposal: FromRow<'r, DB::Row>,
    for<'r> RawActivePolicy: FromRow<'r, DB::Row>,
    for<'r> RawAuditHead: FromRow<'r, DB::Row>,
    for<'r> RawAuditRow: FromRow<'r, DB::Row>,
    for<'r> RawRollout: FromRow<'r, DB::Row>,
    for<'r> RawStoredVersion: FromRow<'r, DB::Row>,
    for<'r> RawClusterPolicy: FromRow<'r, DB::Row>,
    for<'r> RawEnforcer: FromRow<'r, DB::Row>,
    for<'r> RawVerdictEvent: FromRow<'r, DB::Row>,
    for<'r> RawVerdictCount: FromRow<'r, DB::Row>,
    for<'r> RawRuleHit: FromRow<'r, DB::Row>,
{
    // === proposals ===

    /// [`Store::put_proposal`](super::Store::put_proposal), in `tx` (which holds
    /// whatever lock the backend needs for the target).
    pub async fn put_proposal(
        mut tx: Transaction<'_, DB>,
        new: &NewProposal,
        now_ms: i64,
    ) -> Result<ProposalRecord, StoreError> {
        const OP: &str = "put_proposal";
        let newest: Option<RawNewest> = sqlx::query_as(p::SELECT_NEWEST_VERSION)
            .bind(new.target_id())
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::db(OP))?;
        let id = match PutPlan::new(newest.as_ref(), &new.digest)? {
            PutPlan::Keep { id } => id,
            PutPlan::Refresh { id } => {
                sqlx::query(p::REFRESH_PROPOSAL)
                    .bind(id)
                    .bind(&new.workload)
                    .bind(now_ms)
                    .bind(&new.json)
                    .bind(new.widening_total)
                    .bind(new.converged)
                    .bind(new.lints)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::db(OP))?;
                id
            }
            PutPlan::Insert { version } => {
                let id: i64 = sqlx::query_scalar(p::INSERT_PROPOSAL)
                    .bind(new.target_id())
                    .bind(version)
                    .bind(&new.workload)
                    .bind(now_ms)
                    .bind(new.digest.as_slice())
                    .bind(&new.json)
                    .bind(new.ingress_rules)
                    .bind(new.egress_rules)
                    .bind(new.flagged_rules)
                    .bind(new.widening_total)
                    .bind(new.converged)
                    .bind(new.lints)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(StoreError::db_target(OP, new.target.0))?;
                let superseded = Self::supersede(&mut tx, new.target_id(), id, ProposalStatus::Proposed).await?;
                let detail = p::proposed_detail(new, version, &superseded);
                let entry =
                    PreparedAudit::of(now_ms, LEARNER_ACTOR, actions::PROPOSAL_PROPOSED, p::subject(id), detail)?;
                Self::append(&mut tx, entry).await?;
                id
            }
        };
        let record = Self::record(&mut *tx, id).await?.ok_or(StoreError::ProposalNotFound { id })?;
        commit(tx, OP, record).await
    }

    /// [`Store::decide_proposal`](super::Store::decide_proposal) of version `id` of
    /// `target`, in `tx`.
    pub async fn decide_proposal(
        tx: Transaction<'_, DB>,
        id: i64,
        target: i64,
        d: &PreparedDecision,
        now_ms: i64,
    ) -> Result<ProposalRecord, StoreError> {
        let decide = sqlx::query(p::DECIDE)
            .bind(id)
            .bind(d.to.as_str())
            .bind(&d.reviewer)
            .bind(now_ms)
            .bind(d.comment.as_deref())
            .bind(d.policy_json());
        Self::transition(tx, "decide_proposal", id, target, d.to, decide, |record, superseded| {
            PreparedAudit::of(now_ms, &d.reviewer, d.action(), p::subject(id), d.detail(record, superseded))
        })
        .await
    }

    /// [`Store::mark_deployed`](super::Store::mark_deployed) of version `id` of `target`,
    /// in `tx`.
    pub async fn mark_deployed(
        tx: Transaction<'_, DB>,
        id: i64,
        target: i64,
        actor: &str,
        now_ms: i64,
    ) -> Result<ProposalRecord, StoreError> {
        let deploy = sqlx::query(p::DEPLOY).bind(id).bind(now_ms);
        Self::transition(tx, "mark_deployed", id, target, ProposalStatus::Deployed, deploy, |record, superseded| {
            let detail = p::deployed_detail(record, superseded);
            PreparedAudit::of(now_ms, actor, actions::PROPOSAL_DEPLOY, p::subject(id), detail)
        })
        .await
    }

    pub async fn proposals(pool: &Pool<DB>, q: &ProposalQuery) -> Result<Vec<ProposalSummary>, StoreError> {
        let mut b = p::list::<DB>(q);
        decode_all("proposals", b.build_query_as::<RawProposalSummary>().fetch_all(pool).await)
    }

    pub async fn proposal(pool: &Pool<DB>, id: i64) -> Result<Option<ProposalRecord>, StoreError> {
        Self::record(pool, id).await
    }

    pub async fn proposal_versions(pool: &Pool<DB>, target: Identity) -> Result<Vec<ProposalSummary>, StoreError> {
        let query = sqlx::query_as::<_, RawProposalSummary>(p::SELECT_VERSIONS).bind(i64::from(target.0));
        decode_all("proposal_versions", query.fetch_all(pool).await)
    }

    pub async fn active_policies(pool: &Pool<DB>) -> Result<Vec<ActivePolicy>, StoreError> {
        let query = sqlx::query_as::<_, RawActivePolicy>(p::SELECT_ACTIVE);
        decode_all("active_policies", query.fetch_all(pool).await)
    }

    /// The version's target and current status, for the caller to lock the target
    /// before deciding; [`StoreError::ProposalNotFound`] if there is no such version.
    pub async fn target_and_status(conn: &mut DB::Connection, id: i64) -> Result<(i64, ProposalStatus), StoreError> {
        let row: Option<(i64, String)> = sqlx::query_as(p::SELECT_TARGET_AND_STATUS)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(StoreError::db("proposal_status"))?;
        let (target, status) = row.ok_or(StoreError::ProposalNotFound { id })?;
        Ok((target, p::status_from_db(&status)?))
    }

    /// Runs a lifecycle step of version `id` of `target` to `to`, audited, and commits.
    ///
    /// `update` is conditional on the status the step starts from (`… WHERE id = $1 AND
    /// status = 'proposed'`), so when it changes no row the version is elsewhere in its
    /// lifecycle (or lost a concurrent decision): [`StoreError::InvalidTransition`] from
    /// its current status. A version becoming approved or deployed supersedes the
    /// target's other one in that status. The audit entry is `audit` of the record as it
    /// is now and the superseded ids, appended in the same transaction.
    async fn transition(
        mut tx: Transaction<'_, DB>,
        op: &'static str,
        id: i64,
        target: i64,
        to: ProposalStatus,
        update: Query<'_, DB, DB::Arguments>,
        audit: impl FnOnce(&ProposalRecord, &[i64]) -> Result<PreparedAudit, StoreError>,
    ) -> Result<ProposalRecord, StoreError> {
        let result = update.execute(&mut *tx).await.map_err(StoreError::db(op))?;
        if DB::rows_affected(&result) == 0 {
            let (_, from) = Self::target_and_status(&mut tx, id).await?;
            return Err(StoreError::InvalidTransition { id, from, to });
        }
        let superseded = match to {
            ProposalStatus::Approved | ProposalStatus::Deployed => Self::supersede(&mut tx, target, id, to).await?,
            _ => Vec::new(),
        };
        let record = Self::record(&mut *tx, id).await?.ok_or(StoreError::ProposalNotFound { id })?;
        Self::append(&mut tx, audit(&record, &superseded)?).await?;
        commit(tx, op, record).await
    }

    /// Marks the target's other versions in `status` superseded by `by`; returns their ids.
    async fn supersede(
        conn: &mut DB::Connection,
        target: i64,
        by: i64,
        status: ProposalStatus,
    ) -> Result<Vec<i64>, StoreError> {
        sqlx::query_scalar(p::SUPERSEDE)
            .bind(target)
            .bind(by)
            .bind(status.as_str())
            .fetch_all(&mut *conn)
            .await
            .map_err(StoreError::db("supersede"))
    }

    async fn record<'e, E>(exec: E, id: i64) -> Result<Option<ProposalRecord>, StoreError>
    where
        E: Executor<'e, Database = DB>,
    {
        sqlx::query_as::<_, RawProposal>(p::SELECT_PROPOSAL)
            .bind(id)
            .fetch_optional(exec)
            .await
            .map_err(StoreError::db("proposal"))?
            .map(ProposalRecord::try_from)
            .transpose()
    }

    // === audit ===

    /// [`Store::append_audit`](super::Store::append_audit), in `tx`.
    pub async fn append_audit(mut tx: Transaction<'_, DB>, entry: PreparedAudit) -> Result<AuditRow, StoreError> {
        let row = Self::append(&mut tx, entry).await?;
        commit(tx, "append_audit", row).await
    }

    pub async fn audit(pool: &Pool<DB>, q: &AuditQuery) -> Result<Vec<AuditRow>, StoreError> {
        let mut b = audit::list::<DB>(q);
        decode_all("audit", b.build_query_as::<RawAuditRow>().fetch_all(pool).await)
    }

    /// [`Store::verify_audit_chain`](super::Store::verify_audit_chain) on the snapshot
    /// `tx` reads; rolls `tx` back.
    pub async fn verify_audit_chain(mut tx: Transaction<'_, DB>) -> Result<u64, StoreError> {
        const OP: &str = "verify_audit_chain";
        let mut check = ChainCheck::new();
        loop {
            let page: Vec<RawAuditRow> = sqlx::query_as(audit::SELECT_CHAIN_PAGE)
                .bind(check.cursor())
                .bind(audit::VERIFY_PAGE)
                .fetch_all(&mut *tx)
                .await
                .map_err(StoreError::db(OP))?;
            for row in &page {
                check.check(row)?;
            }
            if (page.len() as i64) < audit::VERIFY_PAGE {
                break;
            }
        }
        let head: RawAuditHead =
            sqlx::query_as(audit::SELECT_HEAD).fetch_one(&mut *tx).await.map_err(StoreError::db(OP))?;
        tx.rollback().await.map_err(StoreError::db(OP))?;
        check.finish(head)
    }

    /// Appends one audit entry after the chain's current head and advances the head.
    async fn append(conn: &mut DB::Connection, e: PreparedAudit) -> Result<AuditRow, StoreError> {
        audit::append_in::<DB>(conn, DB::SELECT_AUDIT_HEAD, e).await
    }

    // === rollout ===

    /// [`Store::set_rollout_mode`](super::Store::set_rollout_mode), in `tx` (which holds
    /// whatever lock the backend needs for the target).
    pub async fn set_rollout_mode(
        mut tx: Transaction<'_, DB>,
        change: &PreparedRollout,
        now_ms: i64,
    ) -> Result<RolloutRow, StoreError> {
        const OP: &str = "set_rollout_mode";
        let PreparedRollout { target, mode, actor, reason } = change;
        let id = i64::from(target.0);
        let current: Option<RawRollout> =
            sqlx::query_as(rollout::SELECT_ONE).bind(id).fetch_optional(&mut *tx).await.map_err(StoreError::db(OP))?;
        let (from, since) = rollout::transition(current.as_ref(), *mode, now_ms)?;
        let row: RawRollout = sqlx::query_as(rollout::UPSERT)
            .bind(id)
            .bind(mode.as_str())
            .bind(since)
            .bind(now_ms)
            .bind(actor)
            .bind(reason)
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::db_target(OP, target.0))?;
        let detail = rollout::detail(from, *mode, reason);
        let entry = PreparedAudit::of(now_ms, actor, actions::ROLLOUT_MODE, rollout::subject(*target), detail)?;
        Self::append(&mut tx, entry).await?;
        commit(tx, OP, row).await?.try_into()
    }

    pub async fn rollout_modes(pool: &Pool<DB>) -> Result<Vec<RolloutRow>, StoreError> {
        let query = sqlx::query_as::<_, RawRollout>(rollout::SELECT_ALL);
        decode_all("rollout_modes", query.fetch_all(pool).await)
    }

    // === cluster policies ===

    /// [`Store::replace_cluster_policies`](super::Store::replace_cluster_policies), in
    /// `tx` (which holds whatever lock the backend needs for an import).
    pub async fn replace_cluster_policies(
        mut tx: Transaction<'_, DB>,
        source: &str,
        rows: &[RawClusterPolicy],
        now_ms: i64,
    ) -> Result<ClusterPolicyImport, StoreError> {
        const OP: &str = "replace_cluster_policies";
        let stored: Vec<RawStoredVersion> = sqlx::query_as(cluster::SELECT_VERSIONS)
            .bind(source)
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::db(OP))?;
        let counts = cluster::compare(&stored, rows);
        sqlx::query(cluster::DELETE_SOURCE).bind(source).execute(&mut *tx).await.map_err(StoreError::db(OP))?;
        for r in rows {
            let v = &r.version;
            sqlx::query(cluster::INSERT)
                .bind(source)
                .bind(&v.namespace)
                .bind(&v.name)
                .bind(&v.uid)
                .bind(&v.resource_version)
                .bind(&r.policy)
                .bind(&r.raw)
                .bind(now_ms)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db(OP))?;
        }
        if counts.changed() {
            let detail = cluster::detail(&counts);
            let entry = PreparedAudit::of(
                now_ms,
                LEARNER_ACTOR,
                actions::CLUSTER_POLICIES_IMPORT,
                cluster::subject(source),
                detail,
            )?;
            Self::append(&mut tx, entry).await?;
        }
        commit(tx, OP, counts).await
    }

    pub async fn cluster_policies(pool: &Pool<DB>) -> Result<Vec<ClusterPolicyRow>, StoreError> {
        let query = sqlx::query_as::<_, RawClusterPolicy>(cluster::SELECT_ALL);
        decode_all("cluster_policies", query.fetch_all(pool).await)
    }

    // === enforcers ===
    //
    // Status writes are one upsert each (no transaction needed); `writer` is the
    // backend's write pool.

    /// [`Store::enforcer_hello`](super::Store::enforcer_hello), values already stored form.
    pub async fn enforcer_hello(
        writer: &Pool<DB>,
        node_id: String,
        boot_id: String,
        agent_version: String,
        applied_version: Option<i64>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(enf::HELLO)
            .bind(node_id)
            .bind(boot_id)
            .bind(agent_version)
            .bind(applied_version)
            .bind(applied_version.map(|_| now_ms))
            .bind(now_ms)
            .execute(writer)
            .await
            .map_err(StoreError::db("enforcer_hello"))?;
        Ok(())
    }

    /// [`Store::enforcer_ack`](super::Store::enforcer_ack): `error` is `None` for an
    /// applied version, the (bounded) reason for a rejected one.
    pub async fn enforcer_ack(
        writer: &Pool<DB>,
        node_id: String,
        version: i64,
        error: Option<String>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let query = match error {
            None => sqlx::query(enf::ACK_APPLIED).bind(node_id).bind(version).bind(now_ms),
            Some(error) => sqlx::query(enf::ACK_REJECTED).bind(node_id).bind(version).bind(error).bind(now_ms),
        };
        query.execute(writer).await.map_err(StoreError::db("enforcer_ack"))?;
        Ok(())
    }

    pub async fn enforcer_loss(
        writer: &Pool<DB>,
        node_id: String,
        loss: [i64; 3],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(enf::REPORT_LOSS)
            .bind(node_id)
            .bind(loss[0])
            .bind(loss[1])
            .bind(loss[2])
            .bind(now_ms)
            .execute(writer)
            .await
            .map_err(StoreError::db("enforcer_loss"))?;
        Ok(())
    }

    pub async fn set_desired_version(
        writer: &Pool<DB>,
        node_id: String,
        version: i64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(enf::SET_DESIRED)
            .bind(node_id)
            .bind(version)
            .bind(now_ms)
            .execute(writer)
            .await
            .map_err(StoreError::db("set_desired_version"))?;
        Ok(())
    }

    pub async fn enforcers(pool: &Pool<DB>) -> Result<Vec<EnforcerRow>, StoreError> {
        let query = sqlx::query_as::<_, RawEnforcer>(enf::SELECT_ENFORCERS);
        decode_all("enforcers", query.fetch_all(pool).await)
    }

    // === verdict events ===

    pub async fn verdict_events(pool: &Pool<DB>, q: &VerdictQuery) -> Result<Vec<VerdictEventRecord>, StoreError> {
        let mut b = enf::list::<DB>(q);
        decode_all("verdict_events", b.build_query_as::<RawVerdictEvent>().fetch_all(pool).await)
    }

    pub async fn verdict_counts(pool: &Pool<DB>, since_unix_ms: i64) -> Result<Vec<VerdictCount>, StoreError> {
        let query = sqlx::query_as::<_, RawVerdictCount>(enf::SELECT_COUNTS).bind(since_unix_ms);
        decode_all("verdict_counts", query.fetch_all(pool).await)
    }

    /// Deletes in chunks of [`enf::PRUNE_CHUNK`] rows, each its own statement, so a large
    /// backlog never holds the writer (SQLite) or many row locks (PostgreSQL) for long.
    pub async fn prune_verdict_events(writer: &Pool<DB>, older_than_unix_ms: i64) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let result = sqlx::query(enf::PRUNE_EVENTS_CHUNK)
                .bind(older_than_unix_ms)
                .bind(enf::PRUNE_CHUNK)
                .execute(writer)
                .await
                .map_err(StoreError::db("prune_verdict_events"))?;
            let n = DB::rows_affected(&result);
            total += n;
            if n < enf::PRUNE_CHUNK as u64 {
                return Ok(total);
            }
        }
    }

    // === rule hits ===

    pub async fn rule_hits(pool: &Pool<DB>, proposal_id: i64) -> Result<Vec<RuleHitRow>, StoreError> {
        let query = sqlx::query_as::<_, RawRuleHit>(enf::SELECT_RULE_HITS).bind(proposal_id);
        decode_all("rule_hits", query.fetch_all(pool).await)
    }
}

/// Commits `tx`, then hands back what it wrote.
async fn commit<DB: Database, T>(tx: Transaction<'_, DB>, op: &'static str, written: T) -> Result<T, StoreError> {
    tx.commit().await.map_err(StoreError::db(op))?;
    Ok(written)
}

/// Converts fetched rows to what the API returns, naming `op` if the fetch failed.
pub(crate) fn decode_all<R, T>(op: &'static str, fetched: Result<Vec<R>, sqlx::Error>) -> Result<Vec<T>, StoreError>
where
    T: TryFrom<R, Error = StoreError>,
{
    fetched.map_err(StoreError::db(op))?.into_iter().map(T::try_from).collect()
}
