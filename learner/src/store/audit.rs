//! The audit log: who did what to which subject, when — append-only and hash-chained.
//!
//! Append-only is enforced by the database (triggers abort UPDATE and DELETE on
//! `audit_log`, see the migrations), not by the absence of a delete method here. The
//! chain makes what the triggers cannot stop (someone with the schema owner's rights,
//! a file edited offline) evident: every entry's hash covers the previous entry's hash,
//! so changing or removing any entry breaks every later link, and the one-row
//! `audit_head` names the last entry, so cutting the tail is visible too
//! ([`Store::verify_audit_chain`](super::Store::verify_audit_chain)).
//!
//! Appends are serialised — SQLite has one writer; PostgreSQL locks the head row
//! (`SELECT … FOR UPDATE`) — so concurrent appends still form one chain. An audited
//! change (a decision, a rollout mode) writes its entry in its own transaction: the
//! change and its record commit together or not at all.

use serde::Serialize;
use sha2::{Digest, Sha256};

use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Type};

use super::prepare::text;
use super::{StoreError, hex};

/// Actions the store itself records. Dotted, so a prefix selects a family
/// (`proposal.` = every proposal event).
pub mod actions {
    /// Synthesis added a proposal version (actor: the learner).
    pub const PROPOSAL_PROPOSED: &str = "proposal.proposed";
    pub const PROPOSAL_APPROVE: &str = "proposal.approve";
    pub const PROPOSAL_REJECT: &str = "proposal.reject";
    pub const PROPOSAL_DEPLOY: &str = "proposal.deploy";
    pub const ROLLOUT_MODE: &str = "rollout.mode";
    /// An import changed the stored cluster NetworkPolicies of a source.
    pub const CLUSTER_POLICIES_IMPORT: &str = "cluster_policies.import";
}

/// Largest page [`Store::audit`](super::Store::audit) returns.
pub const MAX_AUDIT_PAGE: u32 = 1_000;

/// One entry to append.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    pub at_unix_ms: i64,
    /// Who: a user name, or [`LEARNER_ACTOR`](super::LEARNER_ACTOR).
    pub actor: String,
    /// What, dotted (see [`actions`]).
    pub action: String,
    /// To what: `proposal:<id>`, `identity:<n>`, `cluster-policies:<source>`, ….
    pub subject: String,
    /// Whatever else the action needs to be understood later.
    pub detail: serde_json::Value,
}

/// A stored entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRow {
    /// Chain order; never reused.
    pub id: i64,
    pub at_unix_ms: i64,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub detail: serde_json::Value,
    /// Hex SHA-256 of the previous entry (zeros for the first).
    pub prev_hash: String,
    /// Hex SHA-256 over a version tag, `prev_hash`, the time and the text fields, each
    /// length-prefixed: what [`Store::verify_audit_chain`](super::Store::verify_audit_chain)
    /// recomputes.
    pub hash: String,
}

/// Audit filter, newest first, paged by id. `Default` = the newest 100 entries.
#[derive(Debug, Clone, Serialize)]
pub struct AuditQuery {
    /// Only entries at or after this time.
    pub since_unix_ms: Option<i64>,
    /// Only entries at or before this time.
    pub until_unix_ms: Option<i64>,
    pub actor: Option<String>,
    /// Only actions starting with this (`proposal.` for every proposal event).
    pub action_prefix: Option<String>,
    pub subject: Option<String>,
    /// Page size; capped at [`MAX_AUDIT_PAGE`].
    pub limit: u32,
    /// Keyset pagination: only entries with `id < before_id`.
    pub before_id: Option<i64>,
}

impl Default for AuditQuery {
    fn default() -> Self {
        Self {
            since_unix_ms: None,
            until_unix_ms: None,
            actor: None,
            action_prefix: None,
            subject: None,
            limit: 100,
            before_id: None,
        }
    }
}

/// Where a chain check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChainBreak {
    /// The entry does not name the previous entry's hash: an entry before it was
    /// removed, inserted or changed.
    PrevHash,
    /// The entry's fields no longer hash to its stored hash: it was changed.
    Hash,
    /// The head names another last entry than the log ends with: the tail was cut (or
    /// the head edited).
    Head,
}

impl std::fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChainBreak::PrevHash => "it does not link to the previous entry",
            ChainBreak::Hash => "its contents do not match its hash",
            ChainBreak::Head => "the chain head does not name the last entry",
        })
    }
}

// === hashing ===

/// The hash of the empty chain (what the first entry links to).
pub(crate) const GENESIS: [u8; 32] = [0; 32];

/// SHA-256 over a version tag, the previous hash, the time and each text field with its
/// length in front (so no two different entries encode to the same bytes).
pub(crate) fn chain_hash(
    prev: &[u8],
    at_unix_ms: i64,
    actor: &str,
    action: &str,
    subject: &str,
    detail: &str,
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"bulkhead.audit.v1\n");
    h.update(prev);
    h.update(at_unix_ms.to_be_bytes());
    for field in [actor, action, subject, detail] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    h.finalize().into()
}

/// An entry converted to what `audit_log` stores: text NUL-free (PostgreSQL cannot
/// store NUL, and both backends must hash the same bytes), detail as JSON text.
#[derive(Debug, Clone)]
pub(crate) struct PreparedAudit {
    pub at_unix_ms: i64,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub detail: String,
}

impl PreparedAudit {
    pub fn new(e: &AuditEntry) -> Result<Self, StoreError> {
        require("actor", &e.actor)?;
        require("action", &e.action)?;
        require("subject", &e.subject)?;
        Ok(Self {
            at_unix_ms: e.at_unix_ms,
            actor: text(&e.actor),
            action: text(&e.action),
            subject: text(&e.subject),
            detail: serde_json::to_string(&e.detail)
                .map_err(|source| StoreError::Encode { what: "audit detail", source })?,
        })
    }

    /// For entries the store writes itself.
    pub fn of(
        at_unix_ms: i64,
        actor: &str,
        action: &str,
        subject: String,
        detail: serde_json::Value,
    ) -> Result<Self, StoreError> {
        Self::new(&AuditEntry { at_unix_ms, actor: actor.to_owned(), action: action.to_owned(), subject, detail })
    }

    pub fn hash(&self, prev: &[u8]) -> [u8; 32] {
        chain_hash(prev, self.at_unix_ms, &self.actor, &self.action, &self.subject, &self.detail)
    }

    /// The stored row, once `audit_log` assigned its id.
    pub fn into_row(self, id: i64, prev: &[u8], hash: &[u8]) -> Result<AuditRow, StoreError> {
        let raw = RawAuditRow {
            id,
            at_unix_ms: self.at_unix_ms,
            actor: self.actor,
            action: self.action,
            subject: self.subject,
            detail: self.detail,
            prev_hash: prev.to_vec(),
            hash: hash.to_vec(),
        };
        raw.try_into()
    }
}

/// Non-blank, or [`StoreError::MissingField`].
pub(crate) fn require(field: &'static str, value: &str) -> Result<(), StoreError> {
    if value.trim().is_empty() { Err(StoreError::MissingField { field }) } else { Ok(()) }
}

// === verification ===

/// Walks the log in id order and checks every link.
#[derive(Debug)]
pub(crate) struct ChainCheck {
    prev: [u8; 32],
    last_id: i64,
    entries: u64,
}

impl ChainCheck {
    pub fn new() -> Self {
        Self { prev: GENESIS, last_id: 0, entries: 0 }
    }

    /// The id to continue after (pages are `id > cursor`).
    pub fn cursor(&self) -> i64 {
        self.last_id
    }

    pub fn check(&mut self, r: &RawAuditRow) -> Result<(), StoreError> {
        let broken = |kind| StoreError::AuditChainBroken { id: r.id, kind };
        if r.prev_hash.as_slice() != self.prev.as_slice() {
            return Err(broken(ChainBreak::PrevHash));
        }
        let hash = chain_hash(&r.prev_hash, r.at_unix_ms, &r.actor, &r.action, &r.subject, &r.detail);
        if r.hash.as_slice() != hash.as_slice() {
            return Err(broken(ChainBreak::Hash));
        }
        self.prev = hash;
        self.last_id = r.id;
        self.entries += 1;
        Ok(())
    }

    /// Checks the head against the last entry seen; returns the number of entries.
    pub fn finish(self, head: RawAuditHead) -> Result<u64, StoreError> {
        if head.last_id != self.last_id || head.last_hash.as_slice() != self.prev.as_slice() {
            return Err(StoreError::AuditChainBroken { id: head.last_id.max(self.last_id), kind: ChainBreak::Head });
        }
        Ok(self.entries)
    }
}

/// Entries read per step of a chain check.
pub(crate) const VERIFY_PAGE: i64 = 1_000;

// === decoding ===

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawAuditRow {
    pub id: i64,
    pub at_unix_ms: i64,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub detail: String,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

impl TryFrom<RawAuditRow> for AuditRow {
    type Error = StoreError;
    fn try_from(r: RawAuditRow) -> Result<Self, StoreError> {
        let detail = serde_json::from_str(&r.detail).map_err(|source| StoreError::CorruptJson {
            table: "audit_log",
            column: "detail",
            source,
        })?;
        Ok(AuditRow {
            id: r.id,
            at_unix_ms: r.at_unix_ms,
            actor: r.actor,
            action: r.action,
            subject: r.subject,
            detail,
            prev_hash: hex(&r.prev_hash),
            hash: hex(&r.hash),
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawAuditHead {
    pub last_id: i64,
    pub last_hash: Vec<u8>,
}

// === statements (both backends; PostgreSQL adds FOR UPDATE to the head read) ===

pub(crate) const SELECT_HEAD: &str = "SELECT last_id, last_hash FROM audit_head WHERE singleton = 1";

pub(crate) const INSERT_ENTRY: &str = "INSERT INTO audit_log (at_unix_ms, actor, action, subject, detail, \
     prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id";

pub(crate) const UPDATE_HEAD: &str = "UPDATE audit_head SET last_id = $1, last_hash = $2 WHERE singleton = 1";

const ROW_COLUMNS: &str = "id, at_unix_ms, actor, action, subject, detail, prev_hash, hash";

pub(crate) const SELECT_CHAIN_PAGE: &str = "SELECT id, at_unix_ms, actor, action, subject, detail, prev_hash, \
     hash FROM audit_log WHERE id > $1 ORDER BY id LIMIT $2";

/// An audit listing, newest first; every value is bound.
pub(crate) fn list<DB>(q: &AuditQuery) -> sqlx::QueryBuilder<DB>
where
    DB: sqlx::Database,
    for<'a> i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    for<'a> String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut b = sqlx::QueryBuilder::new(format!("SELECT {ROW_COLUMNS} FROM audit_log WHERE TRUE"));
    if let Some(since) = q.since_unix_ms {
        b.push(" AND at_unix_ms >= ").push_bind(since);
    }
    if let Some(until) = q.until_unix_ms {
        b.push(" AND at_unix_ms <= ").push_bind(until);
    }
    if let Some(actor) = &q.actor {
        b.push(" AND actor = ").push_bind(text(actor));
    }
    if let Some(prefix) = &q.action_prefix {
        // substr/length count characters on both backends; LIKE would need escaping and
        // is case-insensitive on SQLite.
        let prefix = text(prefix);
        b.push(" AND substr(action, 1, length(").push_bind(prefix.clone()).push(")) = ").push_bind(prefix);
    }
    if let Some(subject) = &q.subject {
        b.push(" AND subject = ").push_bind(text(subject));
    }
    if let Some(before) = q.before_id {
        b.push(" AND id < ").push_bind(before);
    }
    b.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(q.limit.min(MAX_AUDIT_PAGE)));
    b
}

/// Appends one audit entry after the chain's head and advances the head, in the
/// caller's transaction (`conn`), so the entry commits or rolls back with the change it
/// records. `select_head` locks the head row where the backend needs it.
pub(crate) async fn append_in<DB>(
    conn: &mut DB::Connection,
    select_head: &'static str,
    e: PreparedAudit,
) -> Result<AuditRow, StoreError>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'r> RawAuditHead: FromRow<'r, DB::Row>,
{
    const OP: &str = "append_audit";
    let head: RawAuditHead = sqlx::query_as(select_head).fetch_one(&mut *conn).await.map_err(StoreError::db(OP))?;
    let hash = e.hash(&head.last_hash);
    let id: i64 = sqlx::query_scalar(INSERT_ENTRY)
        .bind(e.at_unix_ms)
        .bind(&e.actor)
        .bind(&e.action)
        .bind(&e.subject)
        .bind(&e.detail)
        .bind(head.last_hash.as_slice())
        .bind(hash.as_slice())
        .fetch_one(&mut *conn)
        .await
        .map_err(StoreError::db(OP))?;
    sqlx::query(UPDATE_HEAD).bind(id).bind(hash.as_slice()).execute(&mut *conn).await.map_err(StoreError::db(OP))?;
    e.into_row(id, &head.last_hash, &hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_separates_fields() {
        // Moving bytes between fields must change the hash.
        let a = chain_hash(&GENESIS, 1, "ab", "c", "s", "{}");
        let b = chain_hash(&GENESIS, 1, "a", "bc", "s", "{}");
        assert_ne!(a, b);
        assert_ne!(a, chain_hash(&a, 1, "ab", "c", "s", "{}"), "the previous hash is covered");
    }

    #[test]
    fn check_detects_edits_and_cut_tails() {
        let entry = |id, prev: &[u8], actor: &str| {
            let hash = chain_hash(prev, id, actor, "x", "s", "{}");
            RawAuditRow {
                id,
                at_unix_ms: id,
                actor: actor.into(),
                action: "x".into(),
                subject: "s".into(),
                detail: "{}".into(),
                prev_hash: prev.to_vec(),
                hash: hash.to_vec(),
            }
        };
        let one = entry(1, &GENESIS, "alice");
        let two = entry(2, &one.hash, "bob");
        let mut c = ChainCheck::new();
        c.check(&one).expect("first links to genesis");
        c.check(&two).expect("second links to first");
        let head = RawAuditHead { last_id: 2, last_hash: two.hash.clone() };
        assert_eq!(c.finish(head).expect("consistent"), 2);

        let mut edited = entry(1, &GENESIS, "alice");
        edited.actor = "mallory".into();
        let e = ChainCheck::new().check(&edited).expect_err("edited");
        assert!(matches!(e, StoreError::AuditChainBroken { id: 1, kind: ChainBreak::Hash }), "{e:?}");

        let mut c = ChainCheck::new();
        let e = c.check(&two).expect_err("first removed");
        assert!(matches!(e, StoreError::AuditChainBroken { id: 2, kind: ChainBreak::PrevHash }), "{e:?}");

        let mut c = ChainCheck::new();
        c.check(&one).expect("first");
        let e = c.finish(RawAuditHead { last_id: 2, last_hash: two.hash }).expect_err("tail cut");
        assert!(matches!(e, StoreError::AuditChainBroken { kind: ChainBreak::Head, .. }), "{e:?}");
    }
}
