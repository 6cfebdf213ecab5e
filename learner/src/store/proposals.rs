//! Proposal versions and their review lifecycle, as stored: the rows the API lists, the
//! pure rules both backends apply (content digest, what a re-proposal does, what an
//! approval changed) and the statements they share.
//!
//! Synthesis re-runs periodically and re-proposes every workload. Most runs find
//! nothing new: the policy is the same, only evidence counters moved. Such a run
//! refreshes the pending version in place instead of adding a version nobody asked
//! for, so an analyst's queue holds questions, not heartbeats. Whether two proposals
//! ask the same question is decided by a digest over what they would allow (policy,
//! rules and their hygiene flags), never over their evidence.

use bulkhead_model::{Direction, HygieneFlag, Identity, Peer, Policy, Proposal, ProposalStatus, Rule};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::audit::actions;
use super::decode::{self, counter};
use super::prepare::text;
use super::{StoreError, hex};

/// The actor recorded for what the learner does on its own (proposing).
pub const LEARNER_ACTOR: &str = "learner";

/// Largest page [`Store::proposals`](super::Store::proposals) returns.
pub const MAX_PROPOSAL_PAGE: u32 = 1_000;

// === API types ===

/// Proposal filter, newest first, paged by id. `Default` = the newest 100 of any status.
#[derive(Debug, Clone, Serialize)]
pub struct ProposalQuery {
    pub status: Option<ProposalStatus>,
    pub target: Option<Identity>,
    /// Page size; capped at [`MAX_PROPOSAL_PAGE`].
    pub limit: u32,
    /// Keyset pagination: only proposals with `id < before_id`.
    pub before_id: Option<i64>,
}

impl Default for ProposalQuery {
    fn default() -> Self {
        Self { status: None, target: None, limit: 100, before_id: None }
    }
}

/// One proposal version without its (large) JSON: what review lists show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProposalSummary {
    /// Store-wide id, never reused; the API and the audit log name versions by it.
    pub id: i64,
    pub target: Identity,
    pub workload: String,
    /// 1, 2, … per target, in the order synthesis proposed them.
    pub version: u32,
    pub status: ProposalStatus,
    pub created_unix_ms: i64,
    /// Last time synthesis re-proposed the same content with fresh evidence.
    pub refreshed_unix_ms: i64,
    /// Hex SHA-256 of the content (see the module docs); equal = same question.
    pub digest: String,
    pub ingress_rules: u64,
    pub egress_rules: u64,
    /// Rules held back for confirmation (hygiene flags).
    pub flagged_rules: u64,
    pub widening_total: u64,
    pub converged: bool,
    pub lints: u64,
    pub reviewer: Option<String>,
    pub decided_unix_ms: Option<i64>,
    pub comment: Option<String>,
    pub deployed_unix_ms: Option<i64>,
    /// The version that replaced this one.
    pub superseded_by: Option<i64>,
}

/// One proposal version in full.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProposalRecord {
    #[serde(flatten)]
    pub summary: ProposalSummary,
    pub proposal: Proposal,
    /// What was approved (approved and deployed versions, and superseded ones that had
    /// been approved). May differ from `proposal.policy`: flagged rules confirmed,
    /// rules dropped.
    pub approved_policy: Option<Policy>,
}

/// An analyst's decision on a `proposed` version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "decision")]
pub enum Decision {
    /// Approve `policy`: the proposal's policy, possibly with flagged rules confirmed or
    /// rules dropped.
    Approve { policy: Policy },
    /// Reject; a comment saying why is required.
    Reject,
}

impl Decision {
    pub fn status(&self) -> ProposalStatus {
        match self {
            Decision::Approve { .. } => ProposalStatus::Approved,
            Decision::Reject => ProposalStatus::Rejected,
        }
    }
}

/// A policy in force or about to be: per target the deployed version and/or the newest
/// approved one. Replay and diffs read "the policy set" from here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActivePolicy {
    pub target: Identity,
    pub proposal_id: i64,
    pub version: u32,
    /// `Approved` or `Deployed`.
    pub status: ProposalStatus,
    pub policy: Policy,
}

// === pure rules ===

/// SHA-256 over what a proposal would allow: its policy and its rules' direction, rule
/// and flags, each normalised and sorted so equal content digests equally. Evidence,
/// lints, convergence and widening are left out: they change on every run.
pub(crate) fn content_digest(p: &Proposal) -> Result<[u8; 32], StoreError> {
    #[derive(Serialize)]
    struct Content<'a> {
        policy: &'a Policy,
        rules: Vec<(Direction, Rule, Vec<HygieneFlag>)>,
    }
    let mut policy = p.policy.clone();
    policy.normalize();
    let mut rules: Vec<_> = p
        .rules
        .iter()
        .map(|r| {
            let mut flags = r.flags.clone();
            flags.sort();
            flags.dedup();
            (r.direction, normalized(&r.rule), flags)
        })
        .collect();
    rules.sort();
    let json = serde_json::to_vec(&Content { policy: &policy, rules })
        .map_err(|source| StoreError::Encode { what: "proposal content", source })?;
    let mut h = Sha256::new();
    h.update(b"bulkhead.proposal-content.v1\n");
    h.update(&json);
    Ok(h.finalize().into())
}

fn normalized(rule: &Rule) -> Rule {
    let mut r = rule.clone();
    if let Peer::Workloads { selector } = &mut r.peer {
        selector.normalize();
    }
    r.ports.sort();
    r.ports.dedup();
    r.http.sort();
    r.http.dedup();
    r
}

/// A proposal converted to what the `proposals` table stores.
#[derive(Debug)]
pub(crate) struct NewProposal {
    pub target: Identity,
    pub workload: String,
    pub digest: [u8; 32],
    pub json: String,
    pub ingress_rules: i64,
    pub egress_rules: i64,
    pub flagged_rules: i64,
    pub widening_total: i64,
    pub converged: bool,
    pub lints: i64,
}

impl NewProposal {
    /// The target as the `target_identity` column stores it.
    pub fn target_id(&self) -> i64 {
        i64::from(self.target.0)
    }

    pub fn new(p: &Proposal) -> Result<Self, StoreError> {
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let in_dir = |d: Direction| count(p.rules.iter().filter(|r| r.direction == d).count());
        Ok(Self {
            target: p.target,
            workload: text(&p.workload),
            digest: content_digest(p)?,
            json: serde_json::to_string(p).map_err(|source| StoreError::Encode { what: "proposal", source })?,
            ingress_rules: in_dir(Direction::Ingress),
            egress_rules: in_dir(Direction::Egress),
            flagged_rules: count(p.rules.iter().filter(|r| !r.flags.is_empty()).count()),
            widening_total: super::prepare::sat(p.widening_total),
            converged: p.convergence.converged,
            lints: count(p.lints.len()),
        })
    }
}

/// The newest version of a target, as `put_proposal` needs it.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawNewest {
    pub id: i64,
    pub version: i64,
    pub status: String,
    pub content_digest: Vec<u8>,
}

/// What [`Store::put_proposal`](super::Store::put_proposal) does with a proposal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PutPlan {
    /// New content (or a first proposal): add this version, supersede pending ones.
    Insert { version: i64 },
    /// Same content as the pending version: store the fresh evidence in place.
    Refresh { id: i64 },
    /// Same content as the newest version, which is already decided (approved,
    /// deployed or rejected): re-asking the analyst the question they just answered
    /// would be noise. The caller gets that version back and sees its status.
    Keep { id: i64 },
}

impl PutPlan {
    pub fn new(newest: Option<&RawNewest>, digest: &[u8; 32]) -> Result<Self, StoreError> {
        let Some(n) = newest else { return Ok(PutPlan::Insert { version: 1 }) };
        let same = n.content_digest.as_slice() == digest.as_slice();
        Ok(match status_from_db(&n.status)? {
            ProposalStatus::Proposed if same => PutPlan::Refresh { id: n.id },
            ProposalStatus::Approved | ProposalStatus::Deployed | ProposalStatus::Rejected if same => {
                PutPlan::Keep { id: n.id }
            }
            _ => PutPlan::Insert { version: n.version.saturating_add(1) },
        })
    }
}

/// Rejections must say why (the next analyst reads it); approvals may. Blank = missing.
pub(crate) fn check_decision(id: i64, decision: &Decision, comment: Option<&str>) -> Result<(), StoreError> {
    let has_comment = comment.is_some_and(|c| !c.trim().is_empty());
    match decision {
        Decision::Reject if !has_comment => Err(StoreError::CommentRequired { id }),
        _ => Ok(()),
    }
}

/// What an approval did to the proposal's rules, for the audit detail: flagged rules
/// the analyst confirmed, included rules they dropped, and rules the approved policy
/// has that the proposal never proposed (allowed, but made visible).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub(crate) struct ApprovalChanges {
    pub confirmed_flagged: u64,
    pub dropped: u64,
    pub added: u64,
}

impl ApprovalChanges {
    pub fn new(proposal: &Proposal, approved: &Policy) -> Self {
        let approved_has = |d: Direction, rule: &Rule| {
            let rule = normalized(rule);
            approved.rules(d).is_some_and(|rs| rs.iter().any(|r| normalized(r) == rule))
        };
        let mut c = ApprovalChanges::default();
        for r in &proposal.rules {
            let kept = approved_has(r.direction, &r.rule);
            if !r.flags.is_empty() && kept {
                c.confirmed_flagged += 1;
            }
            if r.included && !kept {
                c.dropped += 1;
            }
        }
        for d in [Direction::Ingress, Direction::Egress] {
            for a in approved.rules(d).unwrap_or_default() {
                let a = normalized(a);
                if !proposal.rules.iter().any(|r| r.direction == d && normalized(&r.rule) == a) {
                    c.added += 1;
                }
            }
        }
        c
    }
}

// === decoding ===

pub(crate) fn status_from_db(s: &str) -> Result<ProposalStatus, StoreError> {
    s.parse().map_err(|_| StoreError::InvalidStoredValue { table: "proposals", column: "status", value: s.into() })
}

fn version(v: i64) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::InvalidStoredValue {
        table: "proposals",
        column: "version",
        value: v.to_string(),
    })
}

fn policy_json(column: &'static str, json: &str) -> Result<Policy, StoreError> {
    serde_json::from_str(json).map_err(|source| StoreError::CorruptJson { table: "proposals", column, source })
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawProposalSummary {
    pub id: i64,
    pub target_identity: i64,
    pub version: i64,
    pub status: String,
    pub workload: String,
    pub created_unix_ms: i64,
    pub refreshed_unix_ms: i64,
    pub content_digest: Vec<u8>,
    pub ingress_rules: i64,
    pub egress_rules: i64,
    pub flagged_rules: i64,
    pub widening_total: i64,
    pub converged: bool,
    pub lints: i64,
    pub reviewer: Option<String>,
    pub decided_unix_ms: Option<i64>,
    pub comment: Option<String>,
    pub deployed_unix_ms: Option<i64>,
    pub superseded_by: Option<i64>,
}

impl TryFrom<RawProposalSummary> for ProposalSummary {
    type Error = StoreError;
    fn try_from(r: RawProposalSummary) -> Result<Self, StoreError> {
        const T: &str = "proposals";
        Ok(ProposalSummary {
            id: r.id,
            target: decode::identity(T, "target_identity", r.target_identity)?,
            workload: r.workload,
            version: version(r.version)?,
            status: status_from_db(&r.status)?,
            created_unix_ms: r.created_unix_ms,
            refreshed_unix_ms: r.refreshed_unix_ms,
            digest: hex(&r.content_digest),
            ingress_rules: counter(T, "ingress_rules", r.ingress_rules)?,
            egress_rules: counter(T, "egress_rules", r.egress_rules)?,
            flagged_rules: counter(T, "flagged_rules", r.flagged_rules)?,
            widening_total: counter(T, "widening_total", r.widening_total)?,
            converged: r.converged,
            lints: counter(T, "lints", r.lints)?,
            reviewer: r.reviewer,
            decided_unix_ms: r.decided_unix_ms,
            comment: r.comment,
            deployed_unix_ms: r.deployed_unix_ms,
            superseded_by: r.superseded_by,
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawProposal {
    #[sqlx(flatten)]
    pub summary: RawProposalSummary,
    pub proposal: String,
    pub approved_policy: Option<String>,
}

impl TryFrom<RawProposal> for ProposalRecord {
    type Error = StoreError;
    fn try_from(r: RawProposal) -> Result<Self, StoreError> {
        let proposal = serde_json::from_str(&r.proposal).map_err(|source| StoreError::CorruptJson {
            table: "proposals",
            column: "proposal",
            source,
        })?;
        Ok(ProposalRecord {
            summary: r.summary.try_into()?,
            proposal,
            approved_policy: r.approved_policy.as_deref().map(|j| policy_json("approved_policy", j)).transpose()?,
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawActivePolicy {
    pub id: i64,
    pub target_identity: i64,
    pub version: i64,
    pub status: String,
    pub approved_policy: Option<String>,
}

impl TryFrom<RawActivePolicy> for ActivePolicy {
    type Error = StoreError;
    fn try_from(r: RawActivePolicy) -> Result<Self, StoreError> {
        // The table's CHECK guarantees a policy on approved and deployed rows.
        let json = r.approved_policy.as_deref().ok_or_else(|| StoreError::InvalidStoredValue {
            table: "proposals",
            column: "approved_policy",
            value: format!("NULL on active proposal {}", r.id),
        })?;
        Ok(ActivePolicy {
            target: decode::identity("proposals", "target_identity", r.target_identity)?,
            proposal_id: r.id,
            version: version(r.version)?,
            status: status_from_db(&r.status)?,
            policy: policy_json("approved_policy", json)?,
        })
    }
}

// === statements (both backends) ===

macro_rules! summary_columns {
    () => {
        "id, target_identity, version, status, workload, created_unix_ms, refreshed_unix_ms, content_digest, \
         ingress_rules, egress_rules, flagged_rules, widening_total, converged, lints, reviewer, \
         decided_unix_ms, comment, deployed_unix_ms, superseded_by"
    };
}

pub(crate) const SUMMARY_SELECT: &str = concat!("SELECT ", summary_columns!(), " FROM proposals WHERE TRUE");

pub(crate) const SELECT_PROPOSAL: &str =
    concat!("SELECT ", summary_columns!(), ", proposal, approved_policy FROM proposals WHERE id = $1");

pub(crate) const SELECT_VERSIONS: &str =
    concat!("SELECT ", summary_columns!(), " FROM proposals WHERE target_identity = $1 ORDER BY version DESC");

pub(crate) const SELECT_NEWEST_VERSION: &str = "SELECT id, version, status, content_digest FROM proposals \
     WHERE target_identity = $1 ORDER BY version DESC LIMIT 1";

pub(crate) const INSERT_PROPOSAL: &str = "INSERT INTO proposals (target_identity, version, status, workload, \
     created_unix_ms, refreshed_unix_ms, content_digest, proposal, ingress_rules, egress_rules, flagged_rules, \
     widening_total, converged, lints) \
     VALUES ($1, $2, 'proposed', $3, $4, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING id";

/// Fresh evidence for the pending version (same content, so same rule counts).
pub(crate) const REFRESH_PROPOSAL: &str = "UPDATE proposals SET workload = $2, refreshed_unix_ms = $3, \
     proposal = $4, widening_total = $5, converged = $6, lints = $7 WHERE id = $1 AND status = 'proposed'";

/// `$1` target, `$2` the version taking over; `$3` the status being replaced.
pub(crate) const SUPERSEDE: &str = "UPDATE proposals SET status = 'superseded', superseded_by = $2 \
     WHERE target_identity = $1 AND status = $3 AND id <> $2 RETURNING id";

pub(crate) const SELECT_TARGET_AND_STATUS: &str = "SELECT target_identity, status FROM proposals WHERE id = $1";

/// Conditional on `proposed`: of two concurrent decisions exactly one changes a row.
pub(crate) const DECIDE: &str = "UPDATE proposals SET status = $2, reviewer = $3, decided_unix_ms = $4, \
     comment = $5, approved_policy = $6 WHERE id = $1 AND status = 'proposed'";

pub(crate) const DEPLOY: &str =
    "UPDATE proposals SET status = 'deployed', deployed_unix_ms = $2 WHERE id = $1 AND status = 'approved'";

pub(crate) const SELECT_ACTIVE: &str = "SELECT id, target_identity, version, status, approved_policy \
     FROM proposals WHERE status IN ('approved', 'deployed') ORDER BY target_identity, version";

/// A proposal listing, newest first; every value is bound.
pub(crate) fn list<DB>(q: &ProposalQuery) -> sqlx::QueryBuilder<DB>
where
    DB: sqlx::Database,
    for<'a> i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    for<'a> String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut b = sqlx::QueryBuilder::new(SUMMARY_SELECT);
    if let Some(status) = q.status {
        b.push(" AND status = ").push_bind(status.as_str().to_owned());
    }
    if let Some(target) = q.target {
        b.push(" AND target_identity = ").push_bind(i64::from(target.0));
    }
    if let Some(before) = q.before_id {
        b.push(" AND id < ").push_bind(before);
    }
    b.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(q.limit.min(MAX_PROPOSAL_PAGE)));
    b
}

// === decisions ===

/// A decision checked and converted to what the `proposals` row stores.
#[derive(Debug)]
pub(crate) struct PreparedDecision {
    pub to: ProposalStatus,
    pub reviewer: String,
    /// Trimmed; blank = none.
    pub comment: Option<String>,
    /// The approved policy and its JSON (approvals only).
    pub policy: Option<(Policy, String)>,
}

impl PreparedDecision {
    pub fn new(id: i64, decision: Decision, actor: &str, comment: Option<&str>) -> Result<Self, StoreError> {
        super::audit::require("actor", actor)?;
        check_decision(id, &decision, comment)?;
        let to = decision.status();
        let policy = match decision {
            Decision::Approve { policy } => {
                let json = serde_json::to_string(&policy)
                    .map_err(|source| StoreError::Encode { what: "approved policy", source })?;
                Some((policy, json))
            }
            Decision::Reject => None,
        };
        Ok(Self {
            to,
            reviewer: text(actor),
            comment: comment.map(str::trim).filter(|c| !c.is_empty()).map(text),
            policy,
        })
    }

    pub fn policy_json(&self) -> Option<&str> {
        self.policy.as_ref().map(|(_, json)| json.as_str())
    }

    pub fn action(&self) -> &'static str {
        match self.to {
            ProposalStatus::Approved => actions::PROPOSAL_APPROVE,
            _ => actions::PROPOSAL_REJECT,
        }
    }

    /// The audit detail, from the decided record.
    pub fn detail(&self, record: &ProposalRecord, superseded: &[i64]) -> serde_json::Value {
        let mut d = serde_json::json!({
            "target": record.summary.target,
            "version": record.summary.version,
            "digest": record.summary.digest,
            "comment": self.comment,
            "superseded": superseded,
        });
        if let (Some((policy, _)), Some(obj)) = (&self.policy, d.as_object_mut()) {
            let count = |rules: Option<&[Rule]>| rules.map(<[Rule]>::len);
            let changes = ApprovalChanges::new(&record.proposal, policy);
            obj.insert("ingress_rules".into(), count(policy.ingress.as_deref()).into());
            obj.insert("egress_rules".into(), count(policy.egress.as_deref()).into());
            obj.insert("confirmed_flagged".into(), changes.confirmed_flagged.into());
            obj.insert("dropped".into(), changes.dropped.into());
            obj.insert("added".into(), changes.added.into());
        }
        d
    }
}

// === audit details ===

/// Audit subject naming a proposal version.
pub(crate) fn subject(id: i64) -> String {
    format!("proposal:{id}")
}

/// Detail of `proposal.proposed`.
pub(crate) fn proposed_detail(p: &NewProposal, version: i64, superseded: &[i64]) -> serde_json::Value {
    serde_json::json!({
        "target": p.target,
        "workload": p.workload,
        "version": version,
        "digest": hex(&p.digest),
        "ingress_rules": p.ingress_rules,
        "egress_rules": p.egress_rules,
        "flagged_rules": p.flagged_rules,
        "superseded": superseded,
    })
}

/// Detail of `proposal.deploy`.
pub(crate) fn deployed_detail(record: &ProposalRecord, superseded: &[i64]) -> serde_json::Value {
    serde_json::json!({
        "target": record.summary.target,
        "version": record.summary.version,
        "digest": record.summary.digest,
        "superseded": superseded,
    })
}

#[cfg(test)]
mod tests {
    use bulkhead_model::{
        Convergence, Evidence, LabelSelector, Level, PortRange, ProposedRule, Protocol, ReservedIdentity, Window,
    };

    use super::*;

    fn rule(port: u16) -> Rule {
        Rule {
            peer: Peer::Workloads { selector: LabelSelector::with_labels([("app", "web")]) },
            ports: vec![PortRange::single(Protocol::Tcp, port)],
            http: vec![],
        }
    }

    fn proposal(ports: &[u16], connections: u64) -> Proposal {
        let rules: Vec<ProposedRule> = ports
            .iter()
            .enumerate()
            .map(|(i, p)| ProposedRule {
                id: format!("ingress-{i}"),
                direction: Direction::Ingress,
                rule: rule(*p),
                evidence: Evidence { connections, last_seen_unix_ms: connections as i64, ..Evidence::default() },
                flags: vec![],
                included: true,
                widens: vec![],
                widens_total: 0,
            })
            .collect();
        Proposal {
            target: Identity(300),
            workload: "db".into(),
            level: Level::Exact,
            window: Window { from_unix_ms: 0, to_unix_ms: connections as i64 },
            policy: Policy {
                name: "bulkhead-db".into(),
                namespace: None,
                selector: LabelSelector::with_labels([("app", "db")]),
                ingress: Some(rules.iter().map(|r| r.rule.clone()).collect()),
                egress: None,
            },
            rules,
            widening_total: 0,
            convergence: Convergence { converged: false, last_new_edge_unix_ms: None, quiet_period_ms: 1 },
            lints: vec![],
            removals: vec![],
        }
    }

    #[test]
    fn digest_ignores_evidence_and_order_but_not_content() {
        let a = proposal(&[80, 443], 1);
        let fresher = proposal(&[80, 443], 99);
        let mut reordered = proposal(&[443, 80], 1);
        reordered.policy.normalize();
        let other = proposal(&[80], 1);
        let d = |p: &Proposal| content_digest(p).expect("digest");
        assert_eq!(d(&a), d(&fresher));
        assert_eq!(d(&a), d(&reordered));
        assert_ne!(d(&a), d(&other));
        let mut flagged = a.clone();
        flagged.rules[0].flags.push(HygieneFlag::PortScan);
        assert_ne!(d(&a), d(&flagged), "a flag changes the question");
    }

    #[test]
    fn approval_changes_count_confirmed_dropped_and_added() {
        let mut p = proposal(&[80, 443], 1);
        p.rules[1].flags.push(HygieneFlag::PortScan);
        p.rules[1].included = false;
        let mut approved = p.policy.clone();
        // Confirm the flagged 443, drop 80, add world.
        approved.ingress = Some(vec![rule(443), Rule::l4(Peer::Entity { entity: ReservedIdentity::World }, vec![])]);
        let c = ApprovalChanges::new(&p, &approved);
        assert_eq!(c, ApprovalChanges { confirmed_flagged: 1, dropped: 1, added: 1 });
    }

    #[test]
    fn reject_needs_a_comment() {
        assert!(check_decision(1, &Decision::Reject, None).is_err());
        assert!(check_decision(1, &Decision::Reject, Some("  ")).is_err());
        assert!(check_decision(1, &Decision::Reject, Some("too wide")).is_ok());
        let approve = Decision::Approve { policy: proposal(&[80], 1).policy };
        assert!(check_decision(1, &approve, None).is_ok());
    }
}
