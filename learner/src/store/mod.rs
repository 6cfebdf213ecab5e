//! The service-graph store (sqlx: SQLite or PostgreSQL). All SQL lives here.
//!
//! One [`Store`] wraps the pool(s) of one backend. SQLite is the embedded default (a
//! single file, WAL, one writer; see `sqlite`); PostgreSQL serves larger or replicated
//! deployments (see `postgres`). Both run the same numbered migrations from
//! `migrations/sqlite` and `migrations/postgres`, and the same test suite
//! (`tests/store.rs`, `tests/store_policy.rs`, `tests/store_enforcement.rs`) runs against each.
//!
//! What the store guarantees:
//! - **At-least-once delivery becomes exactly-once storage.** A batch is stored in one
//!   transaction together with its `(node_id, boot_id, seq)` record; a resent batch is
//!   reported as [`IngestOutcome::Duplicate`] and changes nothing.
//! - **Edges never double count.** One connection may be reported by both of its ends
//!   (the client's collector as egress, the server's as ingress, possibly the same
//!   collector when both live on one node). Edge counters are kept per observation side
//!   and an edge's `connections`/`bytes` are the larger side, not the sum. Taking the
//!   max gives the right number when one side or both observe the connection, and a
//!   lower bound (never an overcount) when the two sides' observation windows differ.
//! - **Identities are stable.** A label set gets one number forever, also across
//!   restarts and concurrent allocators; numbers are never reused.
//! - **Attacker-controlled strings are data.** Label values, comms, DNS names and node
//!   ids are always bound parameters; SQL text is built only from constants.
//! - **Review decisions are single and recorded.** A proposal version is decided once
//!   (a conditional UPDATE: of two concurrent approvals exactly one wins), and every
//!   decision, deployment and rollout change writes its audit entry in the same
//!   transaction. The audit log is append-only in the database (triggers) and
//!   hash-chained (see `audit`).
//! - **No login secret at rest.** Passwords are stored as argon2id hashes, session and
//!   API tokens as their SHA-256; users, roles, passwords, logins and tokens are audited
//!   in the same transaction as the change. See `users` and [`crate::auth`].
//! - **Enforcer status is what the nodes said.** A node's applied version changes only
//!   through its own Hello or Applied ack; a rejected ack records the refusal and leaves
//!   the applied version alone (the node keeps enforcing it). See `enforcement`.

mod audit;
mod clock;
mod cluster_policies;
mod dashboard;
mod decode;
mod edge_http;
mod enforcement;
mod error;
mod external_peers;
mod graph;
mod policy_sql;
mod postgres;
mod postgres_policy;
mod postgres_users;
mod prepare;
mod proposals;
mod queries;
mod rollout;
mod sqlite;
mod sqlite_ingest;
mod sqlite_policy;
mod sqlite_users;
mod types;
mod users;

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bulkhead_model::{DnsAnswer, Identity, Labels, Proposal, RolloutMode};
use serde::Serialize;
use sha2::{Digest, Sha256};

pub use audit::{AuditEntry, AuditQuery, AuditRow, ChainBreak, MAX_AUDIT_PAGE, actions};
pub use clock::ClockOf;
pub use cluster_policies::{ClusterPolicyImport, ClusterPolicyRow};
pub use dashboard::{
    DashboardTotals, FLOW_SCAN_BUDGET, FLOW_SCAN_WINDOW, FlowFilter, FlowPage, FlowTail, KeepAdmin,
    MAX_FILTER_IDENTITIES, MAX_FLOW_VIEW_PAGE, MAX_RATE_BUCKETS, MAX_TAIL_BACKLOG, RateBucket, TalkerOrder,
    WorkloadEntry,
};
pub use enforcement::{
    AckOutcome, EnforcerRow, MAX_ERROR_CHARS, MAX_VERDICT_PAGE, RuleHitRow, RuleHits, RuleRef, VerdictCount,
    VerdictEventRecord, VerdictEventRow, VerdictQuery,
};
pub use error::StoreError;
pub use external_peers::ExternalPeerRow;
pub use graph::{
    EdgeMirror, EdgeSet, EdgeVerdictRow, EndpointFlowRow, GraphEdgeQuery, GraphEdges, MAX_GRAPH_ROWS, PortUsageRow,
};
pub use proposals::{
    ActivePolicy, Decision, LEARNER_ACTOR, MAX_PROPOSAL_PAGE, ProposalQuery, ProposalRecord, ProposalSummary,
};
pub use rollout::RolloutRow;
pub use types::{
    AgentRow, EdgeQuery, EdgeRow, EndpointRow, FlowQuery, FlowRow, IdentityRow, IngestBatch, IngestOutcome,
    MAX_FLOW_PAGE, ResolvedEndpoint, ResolvedFlow,
};
pub use users::{
    ApiTokenRow, MAX_TOKEN_NAME_CHARS, NewSession, SessionUser, TOUCH_EVERY_MS, TokenUser, UserRow, user_actions,
};

use audit::PreparedAudit;
use decode::RawIdentity;
use postgres::PgStore;
use prepare::{PreparedBatch, text};
use proposals::{NewProposal, PreparedDecision};
use rollout::PreparedRollout;
use sqlite::SqliteStore;

use crate::auth::{self, CsrfSecret, PasswordHash, Role, Token, Username};

/// Which database a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Handle to the learner's store; cheap to clone (the pools are reference counted).
#[derive(Debug, Clone)]
pub struct Store {
    inner: Inner,
}

#[derive(Debug, Clone)]
enum Inner {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

/// Runs the same call on whichever backend the store wraps.
macro_rules! dispatch {
    ($self:ident, $s:ident => $call:expr) => {
        match &$self.inner {
            Inner::Sqlite($s) => $call,
            Inner::Postgres($s) => $call,
        }
    };
}

impl Store {
    /// Opens (creating if needed) and migrates the store named by `url`:
    /// `sqlite:///abs/path.db`, `sqlite://relative.db`, `sqlite::memory:` (tests) or
    /// `postgres://user:password@host/db`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        let inner = if url.starts_with("sqlite:") {
            Inner::Sqlite(SqliteStore::open(url).await?)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Inner::Postgres(PgStore::open(url).await?)
        } else {
            // Only the scheme: the rest of the URL may carry a password.
            let scheme = url.split_once(':').map_or("", |(s, _)| s).chars().take(32).collect();
            return Err(StoreError::UnsupportedUrl { scheme });
        };
        let store = Store { inner };
        tracing::info!(backend = ?store.backend(), "Opened the store.");
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        match self.inner {
            Inner::Sqlite(_) => Backend::Sqlite,
            Inner::Postgres(_) => Backend::Postgres,
        }
    }

    /// Closes the pools, waiting for in-flight statements (and SQLite's final
    /// `PRAGMA optimize`). Clones of this store fail afterwards.
    pub async fn close(&self) {
        dispatch!(self, s => s.close().await)
    }

    // === identities ===

    /// The identity of a label set, allocated on first use.
    ///
    /// Stable across restarts; concurrent callers with the same labels get the same id;
    /// allocated ids start at [`Identity::FIRST_ALLOCATED`]. Reserved identities are
    /// seeded by the first migration with labels `{"reserved:<name>": ""}`, so asking
    /// for those labels returns the reserved number.
    pub async fn ensure_identity(&self, labels: &Labels) -> Result<Identity, StoreError> {
        let canonical = labels.canonical();
        let digest: [u8; 32] = Sha256::digest(canonical.as_bytes()).into();
        let now = unix_ms_now();
        dispatch!(self, s => s.ensure_identity(&digest, &canonical, now).await)
    }

    /// Every identity, reserved ones included, by number.
    pub async fn identities(&self) -> Result<Vec<IdentityRow>, StoreError> {
        dispatch!(self, s => s.identities().await)
    }

    // === agents ===

    /// Administrator pre-registration of a node. Idempotent; keeps the first time.
    pub async fn register_agent(&self, node_id: &str, now_ms: i64) -> Result<(), StoreError> {
        dispatch!(self, s => s.register_agent(node_id, now_ms).await)
    }

    /// Whether the node was pre-registered or has been seen (Hello or batch).
    pub async fn agent_known(&self, node_id: &str) -> Result<bool, StoreError> {
        dispatch!(self, s => s.agent_known(node_id).await)
    }

    /// Records an agent's Hello: its current boot and version, seen now. Creates the
    /// agent if needed; callers that require pre-registration check
    /// [`Store::agent_known`] first.
    pub async fn touch_agent(
        &self,
        node_id: &str,
        boot_id: &str,
        agent_version: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.touch_agent(node_id, boot_id, agent_version, now_ms).await)
    }

    /// Every known agent with its current boot's loss counters.
    pub async fn agents(&self) -> Result<Vec<AgentRow>, StoreError> {
        dispatch!(self, s => s.agents().await)
    }

    /// Highest seq stored for `(node, boot)`; 0 if none. Agents use it after a
    /// reconnect to drop spooled batches the learner already has.
    pub async fn stored_through_seq(&self, node_id: &str, boot_id: &str) -> Result<u64, StoreError> {
        let seq = dispatch!(self, s => s.stored_through_seq(node_id, boot_id).await)?;
        let seq = seq.unwrap_or(0);
        u64::try_from(seq).map_err(|_| StoreError::InvalidStoredValue {
            table: "agent_boots",
            column: "stored_through_seq",
            value: seq.to_string(),
        })
    }

    // === ingest ===

    /// Stores one batch in one transaction: dedupe on `(node_id, boot_id, seq)`
    /// ([`IngestOutcome::Duplicate`], nothing written), else insert its flows, upsert
    /// the edges they imply (aggregated in memory first: a 1000-flow batch typically
    /// touches a few edges), replace the node's endpoints if the batch has a snapshot,
    /// record DNS answers and the boot's loss counters.
    pub async fn ingest(&self, batch: &IngestBatch) -> Result<IngestOutcome, StoreError> {
        let started = Instant::now();
        let prepared = PreparedBatch::new(batch)?;
        let outcome = dispatch!(self, s => s.ingest(&prepared).await)?;
        tracing::debug!(
            node = %batch.node_id,
            boot = %batch.boot_id,
            seq = batch.seq,
            ?outcome,
            elapsed_us = started.elapsed().as_micros() as u64,
            "Ingested batch."
        );
        Ok(outcome)
    }

    // === reads ===

    /// Service-graph edges with their endpoints' labels, most recently seen first.
    pub async fn edges(&self, q: &EdgeQuery) -> Result<Vec<EdgeRow>, StoreError> {
        dispatch!(self, s => s.edges(q).await)
    }

    /// Recorded flows, newest first; page with [`FlowQuery::before_id`].
    pub async fn flows(&self, q: &FlowQuery) -> Result<Vec<FlowRow>, StoreError> {
        dispatch!(self, s => s.flows(q).await)
    }

    /// What each edge carried at L7 (HTTP): its (method, path) requests last seen at or
    /// after `since_unix_ms`, and its opaque / overflow counts (whenever seen; their
    /// last sighting says whether they fall in a window). Sorted by edge key.
    pub async fn edge_http(&self, since_unix_ms: i64) -> Result<Vec<bulkhead_model::EdgeHttp>, StoreError> {
        dispatch!(self, s => s.edge_http(since_unix_ms).await)
    }

    /// The latest endpoint snapshot of every node.
    pub async fn endpoints(&self) -> Result<Vec<EndpointRow>, StoreError> {
        dispatch!(self, s => s.endpoints().await)
    }

    /// Distinct DNS answers seen at or after `since_unix_ms` (latest sighting and TTL).
    pub async fn dns_answers(&self, since_unix_ms: i64) -> Result<Vec<DnsAnswer>, StoreError> {
        dispatch!(self, s => s.dns_answers(since_unix_ms).await)
    }

    // === retention ===

    /// Deletes recorded flows last seen before `older_than_unix_ms`; returns how many.
    /// Edges are the long-term memory and are kept. Deletes in chunks so concurrent
    /// ingest is never stalled for long.
    pub async fn prune_flows(&self, older_than_unix_ms: i64) -> Result<u64, StoreError> {
        let n = dispatch!(self, s => s.prune_flows(older_than_unix_ms).await)?;
        tracing::info!(deleted = n, older_than_unix_ms, "Pruned flows.");
        Ok(n)
    }

    /// Deletes DNS answers last seen before `older_than_unix_ms`; returns how many.
    pub async fn prune_dns_answers(&self, older_than_unix_ms: i64) -> Result<u64, StoreError> {
        dispatch!(self, s => s.prune_dns_answers(older_than_unix_ms).await)
    }

    /// Deletes dedupe records of batches received before `older_than_unix_ms`; returns
    /// how many. Each boot remembers the highest pruned seq, and any batch at or below
    /// it is still reported as a duplicate, so pruning never lets a late resend in.
    pub async fn prune_batch_records(&self, older_than_unix_ms: i64) -> Result<u64, StoreError> {
        dispatch!(self, s => s.prune_batch_records(older_than_unix_ms).await)
    }

    // === proposals ===

    /// Stores a synthesized proposal as a version of its target, in one transaction:
    /// * same content as the target's pending (`proposed`) version: that version gets
    ///   the fresh evidence in place; no new version, no audit entry;
    /// * same content as the target's newest version and that one is already decided
    ///   (approved, deployed, rejected): nothing changes, that version is returned —
    ///   the analyst answered this question;
    /// * otherwise: a new version (newest + 1), older pending versions superseded by
    ///   it, audited as `proposal.proposed` by [`LEARNER_ACTOR`].
    ///
    /// "Content" is what the proposal would allow, not its evidence (see
    /// `proposals::content_digest`). Fails with [`StoreError::UnknownIdentity`] if the
    /// target was never allocated.
    pub async fn put_proposal(&self, proposal: &Proposal, now_ms: i64) -> Result<ProposalRecord, StoreError> {
        let new = NewProposal::new(proposal)?;
        let record = dispatch!(self, s => s.put_proposal(&new, now_ms).await)?;
        let r = &record.summary;
        tracing::debug!(
            id = r.id,
            target = r.target.0,
            version = r.version,
            status = r.status.as_str(),
            "Stored proposal."
        );
        Ok(record)
    }

    /// Proposal versions without their JSON, newest first; page with
    /// [`ProposalQuery::before_id`].
    pub async fn proposals(&self, q: &ProposalQuery) -> Result<Vec<ProposalSummary>, StoreError> {
        dispatch!(self, s => s.proposals(q).await)
    }

    /// One proposal version in full.
    pub async fn proposal(&self, id: i64) -> Result<Option<ProposalRecord>, StoreError> {
        dispatch!(self, s => s.proposal(id).await)
    }

    /// Every version of a target, newest first.
    pub async fn proposal_versions(&self, target: Identity) -> Result<Vec<ProposalSummary>, StoreError> {
        dispatch!(self, s => s.proposal_versions(target).await)
    }

    /// Decides a `proposed` version. Approving stores `policy` as what was approved and
    /// supersedes the target's other approved (not yet deployed) version; rejecting
    /// needs a non-blank comment ([`StoreError::CommentRequired`]). Any other current
    /// status is [`StoreError::InvalidTransition`] — also for the loser of two
    /// concurrent decisions. Audited (`proposal.approve` / `proposal.reject`, detail:
    /// version, comment, what the approval confirmed, dropped or added) in the same
    /// transaction.
    pub async fn decide_proposal(
        &self,
        id: i64,
        decision: Decision,
        actor: &str,
        comment: Option<&str>,
        now_ms: i64,
    ) -> Result<ProposalRecord, StoreError> {
        let d = PreparedDecision::new(id, decision, actor, comment)?;
        let record = dispatch!(self, s => s.decide_proposal(id, &d, now_ms).await)?;
        tracing::info!(
            id,
            target = record.summary.target.0,
            version = record.summary.version,
            status = d.to.as_str(),
            actor = %d.reviewer,
            "Decided proposal."
        );
        Ok(record)
    }

    /// Records that an approved version is now deployed; the target's previously
    /// deployed version becomes superseded. Only `approved` versions can be deployed
    /// ([`StoreError::InvalidTransition`]). Audited as `proposal.deploy`.
    pub async fn mark_deployed(&self, id: i64, actor: &str, now_ms: i64) -> Result<ProposalRecord, StoreError> {
        audit::require("actor", actor)?;
        let actor = text(actor);
        let record = dispatch!(self, s => s.mark_deployed(id, &actor, now_ms).await)?;
        tracing::info!(id, target = record.summary.target.0, version = record.summary.version, actor = %actor, "Deployed proposal.");
        Ok(record)
    }

    /// The policy set: per target its deployed version and/or its approved one (at
    /// most one of each), with the approved policy; by target, then version.
    pub async fn active_policies(&self) -> Result<Vec<ActivePolicy>, StoreError> {
        dispatch!(self, s => s.active_policies().await)
    }

    // === audit ===

    /// Appends an entry to the audit log (actor, action and subject must not be blank).
    pub async fn append_audit(&self, entry: &AuditEntry) -> Result<AuditRow, StoreError> {
        let e = PreparedAudit::new(entry)?;
        dispatch!(self, s => s.append_audit(e).await)
    }

    /// Audit entries, newest first; page with [`AuditQuery::before_id`].
    pub async fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditRow>, StoreError> {
        dispatch!(self, s => s.audit(q).await)
    }

    /// Re-computes the whole hash chain and checks the head; returns the number of
    /// entries, or [`StoreError::AuditChainBroken`] naming the first bad entry.
    pub async fn verify_audit_chain(&self) -> Result<u64, StoreError> {
        let started = Instant::now();
        let n = dispatch!(self, s => s.verify_audit_chain().await)
            .inspect_err(|e| tracing::error!(error = %e, "Audit log failed verification."))?;
        tracing::info!(entries = n, elapsed_ms = started.elapsed().as_millis() as u64, "Verified audit log.");
        Ok(n)
    }

    // === rollout ===

    /// Sets a target's rollout mode, audited as `rollout.mode` (detail: from, to,
    /// reason). Re-setting the current mode is recorded too but keeps the time the
    /// target entered it. No approved policy is required here: gates are the caller's.
    pub async fn set_rollout_mode(
        &self,
        target: Identity,
        mode: RolloutMode,
        actor: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<RolloutRow, StoreError> {
        let change = PreparedRollout::new(target, mode, actor, reason)?;
        let row = dispatch!(self, s => s.set_rollout_mode(&change, now_ms).await)?;
        tracing::info!(target = target.0, mode = mode.as_str(), actor = %change.actor, "Set rollout mode.");
        Ok(row)
    }

    /// Targets with an explicit rollout mode, by target. Absent targets are in
    /// [`RolloutMode::Learn`].
    pub async fn rollout_modes(&self) -> Result<Vec<RolloutRow>, StoreError> {
        dispatch!(self, s => s.rollout_modes().await)
    }

    // === cluster policies ===

    /// Replaces the NetworkPolicies imported from `source` with `rows`, atomically;
    /// returns what changed (audited as `cluster_policies.import` when anything did).
    /// An import naming one (namespace, name) twice is refused.
    pub async fn replace_cluster_policies(
        &self,
        source: &str,
        rows: impl AsRef<[ClusterPolicyRow]>,
        now_ms: i64,
    ) -> Result<ClusterPolicyImport, StoreError> {
        audit::require("source", source)?;
        let source = text(source);
        let prepared = cluster_policies::prepare(rows.as_ref())?;
        let counts = dispatch!(self, s => s.replace_cluster_policies(&source, &prepared, now_ms).await)?;
        tracing::info!(
            source = %source,
            added = counts.added,
            updated = counts.updated,
            removed = counts.removed,
            unchanged = counts.unchanged,
            "Imported cluster policies."
        );
        Ok(counts)
    }

    /// Every imported NetworkPolicy, by namespace and name.
    pub async fn cluster_policies(&self) -> Result<Vec<ClusterPolicyRow>, StoreError> {
        dispatch!(self, s => s.cluster_policies().await)
    }

    // === enforcers ===

    /// Records an enforcer's Hello: its boot, agent version and the policy version it
    /// enforces right now (`None`: none, e.g. it started without pinned maps). That
    /// version replaces the stored applied version — the node's word is the truth about
    /// the node; its time changes only when the version does. Creates the node's row.
    pub async fn enforcer_hello(
        &self,
        node_id: &str,
        boot_id: &str,
        agent_version: &str,
        applied_version: Option<u64>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let node = enforcement::node(node_id)?;
        let applied = applied_version.map(|v| enforcement::version("applied_version", v)).transpose()?;
        let (boot, agent) = (text(boot_id), text(agent_version));
        dispatch!(self, s => s.enforcer_hello(node, boot, agent, applied, now_ms).await)
    }

    /// Records an enforcer's answer to `version`. [`AckOutcome::Applied`]: the node now
    /// enforces it (a pending refusal of an older or the same version is cleared).
    /// [`AckOutcome::Rejected`]: the applied version stays what it was and the refusal
    /// (version, error text bounded to [`MAX_ERROR_CHARS`]) is recorded.
    pub async fn enforcer_ack(
        &self,
        node_id: &str,
        version: u64,
        status: AckOutcome,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let node = enforcement::node(node_id)?;
        let stored = enforcement::version("version", version)?;
        let error = match &status {
            AckOutcome::Applied => None,
            AckOutcome::Rejected { error } => Some(enforcement::error_text(error)),
        };
        let rejected = error.is_some();
        dispatch!(self, s => s.enforcer_ack(node.clone(), stored, error, now_ms).await)?;
        if rejected {
            tracing::warn!(node = %node, version, "Enforcer rejected a policy version.");
        } else {
            tracing::debug!(node = %node, version, "Enforcer applied a policy version.");
        }
        Ok(())
    }

    /// The version distribution is streaming to `node_id` (what it should enforce).
    /// Creates the node's row if the node was never seen.
    pub async fn set_desired_version(&self, node_id: &str, version: u64, now_ms: i64) -> Result<(), StoreError> {
        let node = enforcement::node(node_id)?;
        let stored = enforcement::version("version", version)?;
        dispatch!(self, s => s.set_desired_version(node, stored, now_ms).await)
    }

    /// Records the loss counters of a node's verdict report (cumulative on the node:
    /// the newest values replace the old).
    pub async fn enforcer_loss(
        &self,
        node_id: &str,
        loss: &bulkhead_model::EnforcerLoss,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let node = enforcement::node(node_id)?;
        let counters =
            [prepare::sat(loss.ringbuf_dropped), prepare::sat(loss.queue_dropped), prepare::sat(loss.conntrack_full)];
        dispatch!(self, s => s.enforcer_loss(node.clone(), counters, now_ms).await)
    }

    /// Every enforcer node, by node id.
    pub async fn enforcers(&self) -> Result<Vec<EnforcerRow>, StoreError> {
        dispatch!(self, s => s.enforcers().await)
    }

    // === verdict events ===

    /// Stores a node's verdict events in one transaction (all or none); returns how many.
    /// Refused whole ([`StoreError::OutOfRange`]) if a policy version does not fit.
    pub async fn insert_verdict_events(
        &self,
        node_id: &str,
        events: &[VerdictEventRow],
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let node = enforcement::node(node_id)?;
        let columns = enforcement::EventColumns::new(events)?;
        if events.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        let n = dispatch!(self, s => s.insert_verdict_events(&node, &columns, now_ms).await)?;
        tracing::debug!(
            node = %node,
            events = n,
            elapsed_us = started.elapsed().as_micros() as u64,
            "Stored verdict events."
        );
        Ok(n)
    }

    /// Verdict events, newest first; page with [`VerdictQuery::before_id`].
    pub async fn verdict_events(&self, q: &VerdictQuery) -> Result<Vec<VerdictEventRecord>, StoreError> {
        dispatch!(self, s => s.verdict_events(q).await)
    }

    /// Audit and deny events at or after `since_unix_ms`, per local identity (those with
    /// none are absent), by identity: the rollout gate's "audit events in the last N
    /// hours".
    pub async fn verdict_counts(&self, since_unix_ms: i64) -> Result<Vec<VerdictCount>, StoreError> {
        dispatch!(self, s => s.verdict_counts(since_unix_ms).await)
    }

    /// Deletes verdict events that happened before `older_than_unix_ms`; returns how many.
    pub async fn prune_verdict_events(&self, older_than_unix_ms: i64) -> Result<u64, StoreError> {
        let n = dispatch!(self, s => s.prune_verdict_events(older_than_unix_ms).await)?;
        tracing::info!(deleted = n, older_than_unix_ms, "Pruned verdict events.");
        Ok(n)
    }

    // === rule hits ===

    /// Adds a node's rule-hit deltas to the totals, in one transaction: hits add
    /// (saturating), the last hit is the later one. Repeats of a rule in one call count
    /// together.
    pub async fn add_rule_hits(&self, node_id: &str, hits: &[RuleHits]) -> Result<(), StoreError> {
        let node = enforcement::node(node_id)?;
        if hits.is_empty() {
            return Ok(());
        }
        let columns = enforcement::HitColumns::new(hits);
        dispatch!(self, s => s.add_rule_hits(&node, &columns).await)
    }

    /// Accumulated hits of the rules of proposal version `proposal_id`, per rule
    /// (direction, index) and node. A rule that is absent was never reported as used.
    pub async fn rule_hits(&self, proposal_id: i64) -> Result<Vec<RuleHitRow>, StoreError> {
        dispatch!(self, s => s.rule_hits(proposal_id).await)
    }

    // === replay feeds ===

    /// Recorded traffic between managed workloads and outside addresses (the reserved
    /// `world` identity) overlapping `[since, until]` (`last_seen >= since`,
    /// `first_seen <= until`), per (local identity, direction, address, port,
    /// protocol), sorted by those. Limited to the flow retention window.
    pub async fn external_peers(
        &self,
        since_unix_ms: i64,
        until_unix_ms: i64,
    ) -> Result<Vec<ExternalPeerRow>, StoreError> {
        let mut rows = dispatch!(self, s => s.external_peers(since_unix_ms, until_unix_ms).await)?;
        rows.sort_unstable();
        Ok(rows)
    }

    // === users ===

    /// Creates a user with an already hashed password, audited as `user.create` by
    /// `actor`. A name taken case-insensitively is [`StoreError::UserExists`].
    pub async fn create_user(
        &self,
        username: &str,
        role: Role,
        password: &PasswordHash,
        must_change_password: bool,
        actor: &str,
        now_ms: i64,
    ) -> Result<UserRow, StoreError> {
        let name = username_of(username)?;
        let actor = users::actor(actor)?;
        let row =
            dispatch!(self, s => s.create_user(&name, role, password, must_change_password, &actor, now_ms).await)?;
        tracing::info!(user = %row.username, role = %role, actor = %actor, "Created user.");
        Ok(row)
    }

    /// The user with this name (case-insensitive), if any.
    pub async fn user_by_name(&self, username: &str) -> Result<Option<UserRow>, StoreError> {
        let Ok(name) = Username::parse(username) else { return Ok(None) };
        dispatch!(self, s => s.user_by_name(&name).await)
    }

    /// Every user, by case-folded name.
    pub async fn users(&self) -> Result<Vec<UserRow>, StoreError> {
        dispatch!(self, s => s.users().await)
    }

    /// Changes a user's role, audited as `user.role` (detail: from, to). Takes effect
    /// on the user's next request: sessions read the role live.
    pub async fn set_role(&self, username: &str, role: Role, actor: &str, now_ms: i64) -> Result<UserRow, StoreError> {
        let name = username_of(username)?;
        let actor = users::actor(actor)?;
        let row = dispatch!(self, s => s.set_role(&name, role, &actor, now_ms).await)?;
        tracing::info!(user = %row.username, role = %role, actor = %actor, "Changed user role.");
        Ok(row)
    }

    /// Replaces a user's password hash and ends all their sessions, audited as
    /// `user.password`. `must_change_password`: true for a one-time password (reset),
    /// false when the user chose it.
    pub async fn set_password(
        &self,
        username: &str,
        password: &PasswordHash,
        must_change_password: bool,
        actor: &str,
        now_ms: i64,
    ) -> Result<UserRow, StoreError> {
        let name = username_of(username)?;
        let actor = users::actor(actor)?;
        let row = dispatch!(self, s => s.set_password(&name, password, must_change_password, &actor, now_ms).await)?;
        tracing::info!(user = %row.username, actor = %actor, must_change_password, "Set user password.");
        Ok(row)
    }

    /// Disables (ending all sessions; tokens stop working) or re-enables a user, audited
    /// as `user.disable` / `user.enable`.
    pub async fn set_disabled(
        &self,
        username: &str,
        disabled: bool,
        actor: &str,
        now_ms: i64,
    ) -> Result<UserRow, StoreError> {
        let name = username_of(username)?;
        let actor = users::actor(actor)?;
        let row = dispatch!(self, s => s.set_disabled(&name, disabled, &actor, now_ms).await)?;
        tracing::info!(user = %row.username, disabled, actor = %actor, "Set user disabled flag.");
        Ok(row)
    }

    // === sessions ===

    /// Checks a password and opens a session of `ttl_ms` for the user. Unknown user,
    /// wrong password and disabled user are all [`StoreError::InvalidCredentials`], and
    /// take about as long (an unknown name still runs a hash). The hash runs off the
    /// async runtime. Audited as `session.login` (by [`Store::create_session`]).
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        ttl_ms: i64,
        now_ms: i64,
    ) -> Result<NewSession, StoreError> {
        let user_id = self.check_password(username, password).await?;
        self.create_session(user_id, ttl_ms, now_ms).await
    }

    /// The id of the (enabled) user whose password this is, else
    /// [`StoreError::InvalidCredentials`] after about as long as a real check. Used by
    /// login and by a password change (which must prove the current one).
    pub async fn check_password(&self, username: &str, password: &str) -> Result<i64, StoreError> {
        let credentials = match Username::parse(username) {
            Ok(name) => dispatch!(self, s => s.credentials(&name).await)?,
            Err(_) => None,
        };
        let password = password.to_owned();
        let verified = tokio::task::spawn_blocking(move || match credentials {
            Some((id, hash, disabled)) => (auth::verify_password(&password, &hash) && !disabled).then_some(id),
            None => {
                auth::verify_dummy(&password);
                None
            }
        })
        .await
        .map_err(|source| StoreError::Blocking { source })?;
        let Some(user_id) = verified else {
            // Debug-quoted: the name is whatever the client sent.
            tracing::warn!(user = ?username.chars().take(64).collect::<String>(), "Password check failed.");
            return Err(StoreError::InvalidCredentials);
        };
        Ok(user_id)
    }

    /// Opens a session for user `user_id` (who must exist and not be disabled, else
    /// [`StoreError::InvalidCredentials`]), valid for `ttl_ms`, with a fresh token and
    /// CSRF secret; audited as `session.login` by the user. The token is returned here
    /// only; the store keeps its SHA-256.
    pub async fn create_session(&self, user_id: i64, ttl_ms: i64, now_ms: i64) -> Result<NewSession, StoreError> {
        let token = Token::session().map_err(|source| StoreError::Credential { source })?;
        let csrf = CsrfSecret::generate().map_err(|source| StoreError::Credential { source })?;
        let expires = now_ms.saturating_add(ttl_ms.max(0));
        let session = dispatch!(self, s => s.create_session(user_id, token, csrf, expires, now_ms).await)?;
        tracing::info!(user = %session.user.username, "Logged in.");
        Ok(session)
    }

    /// The user of a live session (not expired, user not disabled), as of now; refreshes
    /// the session's `last_seen` (at most every [`TOUCH_EVERY_MS`]).
    pub async fn session(&self, token: &str, now_ms: i64) -> Result<Option<SessionUser>, StoreError> {
        let Some(digest) = auth::token_digest(token) else { return Ok(None) };
        let Some((user, last_seen)) = dispatch!(self, s => s.session(&digest, now_ms).await)? else {
            return Ok(None);
        };
        if now_ms.saturating_sub(last_seen) >= TOUCH_EVERY_MS {
            dispatch!(self, s => s.touch_session(&digest, now_ms).await)?;
        }
        Ok(Some(user))
    }

    /// Ends one session (logout); whether it existed.
    pub async fn delete_session(&self, token: &str) -> Result<bool, StoreError> {
        let Some(digest) = auth::token_digest(token) else { return Ok(false) };
        dispatch!(self, s => s.delete_session(&digest).await)
    }

    /// Ends every session of a user; how many.
    pub async fn delete_sessions_of(&self, user_id: i64) -> Result<u64, StoreError> {
        dispatch!(self, s => s.delete_sessions_of(user_id).await)
    }

    /// Deletes sessions expired at `now_ms`; how many.
    pub async fn prune_expired_sessions(&self, now_ms: i64) -> Result<u64, StoreError> {
        dispatch!(self, s => s.prune_expired_sessions(now_ms).await)
    }

    // === API tokens ===

    /// Creates an API token for `owner` named `name` (unique among the owner's live
    /// tokens), optionally expiring; audited as `token.create`. The token is returned
    /// here only; the store keeps its SHA-256.
    pub async fn create_api_token(
        &self,
        owner: &str,
        name: &str,
        expires_unix_ms: Option<i64>,
        actor: &str,
        now_ms: i64,
    ) -> Result<(Token, ApiTokenRow), StoreError> {
        let owner = username_of(owner)?;
        let name = users::token_name(name)?;
        let actor = users::actor(actor)?;
        let token = Token::api().map_err(|source| StoreError::Credential { source })?;
        let row =
            dispatch!(self, s => s.create_api_token(&owner, &token, &name, expires_unix_ms, &actor, now_ms).await)?;
        tracing::info!(user = %row.username, token_id = row.id, actor = %actor, "Created API token.");
        Ok((token, row))
    }

    /// Who a live API token (not revoked, not expired, user not disabled) acts as;
    /// refreshes its `last_used` (at most every [`TOUCH_EVERY_MS`]).
    pub async fn api_token(&self, token: &str, now_ms: i64) -> Result<Option<TokenUser>, StoreError> {
        let Some(digest) = auth::token_digest(token) else { return Ok(None) };
        let Some((user, last_used)) = dispatch!(self, s => s.api_token(&digest, now_ms).await)? else {
            return Ok(None);
        };
        if last_used.is_none_or(|t| now_ms.saturating_sub(t) >= TOUCH_EVERY_MS) {
            dispatch!(self, s => s.touch_api_token(user.token_id, now_ms).await)?;
        }
        Ok(Some(user))
    }

    /// Revokes a live token, audited as `token.revoke`; [`StoreError::ApiTokenNotFound`]
    /// if there is none with this id.
    pub async fn revoke_api_token(&self, id: i64, actor: &str, now_ms: i64) -> Result<ApiTokenRow, StoreError> {
        let actor = users::actor(actor)?;
        let row = dispatch!(self, s => s.revoke_api_token(id, &actor, now_ms).await)?;
        tracing::info!(user = %row.username, token_id = id, actor = %actor, "Revoked API token.");
        Ok(row)
    }

    /// A user who only ever uses API tokens (automation, the demo's CLI, tests): created
    /// with a random one-time password nobody is shown, plus one token named
    /// `token_name`. Both steps are audited as usual.
    pub async fn create_token_user(
        &self,
        username: &str,
        role: Role,
        token_name: &str,
        actor: &str,
        now_ms: i64,
    ) -> Result<(Token, ApiTokenRow), StoreError> {
        let hash = tokio::task::spawn_blocking(|| auth::one_time_password().and_then(|p| auth::hash_password(&p)))
            .await
            .map_err(|source| StoreError::Blocking { source })?
            .map_err(|source| StoreError::Credential { source })?;
        self.create_user(username, role, &hash, true, actor, now_ms).await?;
        self.create_api_token(username, token_name, None, actor, now_ms).await
    }

    /// Every API token of `owner`, revoked ones included, oldest first.
    pub async fn api_tokens(&self, owner: &str) -> Result<Vec<ApiTokenRow>, StoreError> {
        let Ok(name) = Username::parse(owner) else { return Ok(Vec::new()) };
        dispatch!(self, s => s.api_tokens(&name).await)
    }
}

/// A checked username, or [`StoreError::InvalidUsername`].
fn username_of(raw: &str) -> Result<Username, StoreError> {
    Username::parse(raw).map_err(|e| match e {
        auth::AuthError::InvalidUsername { problem } => StoreError::InvalidUsername { problem },
        source => StoreError::Credential { source },
    })
}

/// Lowercase hex, for digests and hashes shown to people.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// An identity row found by digest, after checking it really holds these labels.
fn checked_identity(row: RawIdentity, canonical: &str) -> Result<Identity, StoreError> {
    if row.labels != canonical {
        return Err(StoreError::DigestCollision { identity: row.id });
    }
    decode::identity("identities", "id", row.id)
}

fn unix_ms_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}
