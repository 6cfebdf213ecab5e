-- Bulkhead learner: policy review and rollout (SQLite). Kept in lockstep with
-- migrations/postgres/0002_policy.sql: same tables, columns and meanings.
--
-- Conventions as in 0001 (times in Unix ms, BIGINT-sized integers), plus:
--   * domain objects (Proposal, Policy, an imported NetworkPolicy) are stored as their
--     serde JSON text, exactly as serialised: the store never edits them, and the few
--     facts lists and filters need are copied into plain columns at write time;
--   * enumerations are their lowercase names (`ProposalStatus::as_str`,
--     `RolloutMode::as_str`) with a CHECK, so a row never holds a value the code
--     cannot decode;
--   * digests and hashes are raw SHA-256 bytes (32); the API shows them as hex.

-- One row per proposal *version*: synthesis proposes, analysts decide, rollout deploys.
-- Versions of a target are numbered 1, 2, … in the order they were proposed and never
-- renumbered or deleted, so "v3 was approved by X" stays true forever.
-- Lifecycle (DESIGN.md §2): proposed → approved | rejected; approved → deployed;
-- proposed / approved / deployed → superseded when a newer version takes their place.
CREATE TABLE proposals (
    -- AUTOINCREMENT: ids are shown to analysts and written into the audit log, so one
    -- must never name two proposals.
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    target_identity  INTEGER NOT NULL REFERENCES identities (id),
    version          INTEGER NOT NULL CHECK (version >= 1),
    status           TEXT    NOT NULL
                     CHECK (status IN ('proposed', 'approved', 'rejected', 'deployed', 'superseded')),
    workload         TEXT    NOT NULL,
    created_unix_ms  INTEGER NOT NULL,
    -- Last time synthesis re-proposed the same content with fresh evidence.
    refreshed_unix_ms INTEGER NOT NULL,
    -- SHA-256 of what the proposal allows (policy and its rules' direction, rule and
    -- flags), not of its evidence: equal digests = the same question for the analyst.
    content_digest   BLOB    NOT NULL CHECK (length(content_digest) = 32),
    -- bulkhead_model::Proposal as JSON.
    proposal         TEXT    NOT NULL,
    -- Copied from `proposal` for listings (which never parse the JSON).
    ingress_rules    INTEGER NOT NULL,
    egress_rules     INTEGER NOT NULL,
    flagged_rules    INTEGER NOT NULL,
    widening_total   INTEGER NOT NULL,
    converged        BOOLEAN NOT NULL,
    lints            INTEGER NOT NULL,
    -- The decision: who, when, why. Set once, when leaving `proposed` for approved or
    -- rejected.
    reviewer         TEXT,
    decided_unix_ms  INTEGER,
    comment          TEXT,
    -- bulkhead_model::Policy as JSON: what was approved. It can differ from the
    -- proposal's policy (confirmed or dropped flagged rules); deployments use this one.
    approved_policy  TEXT,
    deployed_unix_ms INTEGER,
    -- The version that replaced this one.
    superseded_by    INTEGER REFERENCES proposals (id),
    UNIQUE (target_identity, version),
    -- Approved and deployed versions carry what was approved; undecided and rejected
    -- ones do not (a superseded version may have been either).
    CHECK (status = 'superseded' OR (status IN ('approved', 'deployed')) = (approved_policy IS NOT NULL))
);
-- "Proposals awaiting review, newest first" and the active set (approved, deployed).
CREATE INDEX proposals_status ON proposals (status, id);

-- Append-only audit log with a hash chain: every row's `hash` is SHA-256 over the
-- previous row's hash and this row's fields (see store::audit), so an edit or a
-- removed row anywhere breaks every later link. The triggers below make UPDATE and
-- DELETE fail in the database itself, whoever issues them.
CREATE TABLE audit_log (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at_unix_ms INTEGER NOT NULL,
    actor      TEXT    NOT NULL,
    action     TEXT    NOT NULL,
    subject    TEXT    NOT NULL,
    -- JSON text, hashed byte for byte as stored.
    detail     TEXT    NOT NULL,
    prev_hash  BLOB    NOT NULL CHECK (length(prev_hash) = 32),
    hash       BLOB    NOT NULL CHECK (length(hash) = 32)
);
CREATE INDEX audit_log_at ON audit_log (at_unix_ms);
CREATE INDEX audit_log_actor ON audit_log (actor, id);
CREATE INDEX audit_log_subject ON audit_log (subject, id);

CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;

-- The chain's head: exactly one row, the last entry's id and hash (zeros and 0 before
-- the first). Appends read and advance it in their own transaction; on PostgreSQL the
-- row lock (SELECT … FOR UPDATE) is what orders concurrent appends into one chain.
-- It also makes a truncated tail evident (the head names an entry that is missing).
CREATE TABLE audit_head (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    last_id   INTEGER NOT NULL,
    last_hash BLOB    NOT NULL CHECK (length(last_hash) = 32)
);
INSERT INTO audit_head (singleton, last_id, last_hash) VALUES (1, 0, zeroblob(32));
CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_head
BEGIN
    SELECT RAISE(ABORT, 'audit_head cannot be deleted');
END;

-- Rollout mode per target identity; no row = learn.
CREATE TABLE rollout_modes (
    target_identity INTEGER PRIMARY KEY REFERENCES identities (id),
    mode            TEXT    NOT NULL CHECK (mode IN ('learn', 'monitor', 'enforce')),
    -- When the target entered `mode` (promotion gates measure time in a mode).
    mode_since_unix_ms INTEGER NOT NULL,
    -- The last explicit set (possibly re-confirming the same mode): who, when, why.
    changed_unix_ms INTEGER NOT NULL,
    changed_by      TEXT    NOT NULL,
    reason          TEXT    NOT NULL
);

-- NetworkPolicies imported from a cluster's API server (`source` names the cluster or
-- importer), converted to bulkhead_model::Policy. Replaced as a whole per source, so a
-- deleted NetworkPolicy disappears here too.
CREATE TABLE cluster_policies (
    source           TEXT    NOT NULL,
    namespace        TEXT    NOT NULL,
    name             TEXT    NOT NULL,
    uid              TEXT    NOT NULL,
    resource_version TEXT    NOT NULL,
    -- bulkhead_model::Policy as JSON.
    policy           TEXT    NOT NULL,
    -- The object as the API server returned it (JSON).
    raw              TEXT    NOT NULL,
    imported_unix_ms INTEGER NOT NULL,
    PRIMARY KEY (source, namespace, name)
);
