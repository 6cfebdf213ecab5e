-- Bulkhead learner: what enforcers report back (SQLite). Kept in lockstep with
-- migrations/postgres/0003_enforcement.sql: same tables, columns and meanings.
--
-- Conventions as in 0001/0002 (times in Unix ms, u64 counters saturated at i64::MAX,
-- direction and verdict as the bulkhead.v1 wire numbers), plus:
--   * policy versions and proposal ids are stored exactly; the store refuses a version
--     above i64::MAX rather than saturate it (a wrong version is worse than none);
--   * verdict-event addresses are text (`IpAddr` Display): events are rate-limited by
--     the enforcers, so the compact flow encoding buys nothing here;
--   * no foreign keys to agents, identities or proposals: a report is stored as the
--     node sent it (refusing it would make the node resend it forever), and enforcer
--     nodes need not run a collector (`agents` is the collectors' table).

-- One row per node with an enforcer: what the learner wants there, what the node says
-- it enforces, and its last refusal. Created by whichever comes first: the learner
-- setting a desired version or the node's Hello / ack.
CREATE TABLE enforcers (
    node_id           TEXT    PRIMARY KEY NOT NULL,
    -- From the last Hello.
    boot_id           TEXT,
    agent_version     TEXT,
    -- Set by distribution: the version being streamed to the node, and since when.
    desired_version   INTEGER CHECK (desired_version >= 0),
    desired_unix_ms   INTEGER,
    -- Only ever what the node said it applied (Hello, Applied ack); NULL = enforces
    -- nothing. The time changes only with the version.
    applied_version   INTEGER CHECK (applied_version >= 0),
    applied_unix_ms   INTEGER,
    -- The newest refused version and the node's reason (bounded), until a version at
    -- least as new is applied. A refusal leaves applied_version alone: the node keeps
    -- enforcing its previous policy.
    rejected_version  INTEGER CHECK (rejected_version >= 0),
    last_error        TEXT,
    -- Last Hello or ack; NULL while only the learner wrote the row.
    last_seen_unix_ms INTEGER,
    CHECK ((rejected_version IS NULL) = (last_error IS NULL))
) WITHOUT ROWID;

-- Verdict events (audit / denied, optionally forwarded) as the enforcers reported
-- them, within the retention window (Store::prune_verdict_events). AUTOINCREMENT keeps
-- ids monotonic and never reused, which keyset pagination (`id < before_id`) relies on.
CREATE TABLE verdict_events (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id          TEXT    NOT NULL,
    -- When the learner stored the batch; at_unix_ms is the node's clock.
    received_unix_ms INTEGER NOT NULL,
    at_unix_ms       INTEGER NOT NULL,
    -- The workload on the reporting node, and the other end.
    local_identity   INTEGER NOT NULL CHECK (local_identity BETWEEN 0 AND 4294967295),
    peer_identity    INTEGER NOT NULL CHECK (peer_identity BETWEEN 0 AND 4294967295),
    -- 1 egress, 2 ingress (from the local workload's side).
    direction        INTEGER NOT NULL CHECK (direction IN (1, 2)),
    -- 1 forwarded, 2 audit, 3 denied.
    verdict          INTEGER NOT NULL CHECK (verdict IN (1, 2, 3)),
    src_addr         TEXT    NOT NULL,
    dst_addr         TEXT    NOT NULL,
    dst_port         INTEGER NOT NULL CHECK (dst_port BETWEEN 0 AND 65535),
    protocol         INTEGER NOT NULL CHECK (protocol BETWEEN 0 AND 255),
    -- The version the node enforced when it decided.
    policy_version   INTEGER NOT NULL CHECK (policy_version >= 0),
    -- The deciding rule (proposal version, direction, index in that direction's rules);
    -- all NULL = default deny of a covered direction.
    rule_proposal_id INTEGER,
    rule_direction   INTEGER CHECK (rule_direction IN (1, 2)),
    rule_index       INTEGER CHECK (rule_index BETWEEN 0 AND 4294967295),
    CHECK ((rule_proposal_id IS NULL) = (rule_direction IS NULL)
       AND (rule_proposal_id IS NULL) = (rule_index IS NULL))
);
-- "Events of workload X, newest first" (the listing pages by id; its time bounds are
-- filters along the way).
CREATE INDEX verdict_events_local ON verdict_events (local_identity, id);
-- Per-identity counts since a time (the rollout gate), time-only listings and pruning.
-- Covering: the gate's count reads only the index.
CREATE INDEX verdict_events_at ON verdict_events (at_unix_ms, verdict, local_identity);

-- Accumulated use of each rule per node: hits add up across reports, the last hit is
-- the latest reported. A rule with no row here was never reported as used.
CREATE TABLE rule_hits (
    proposal_id      INTEGER NOT NULL,
    -- 1 egress, 2 ingress: which of the policy's rule lists.
    direction        INTEGER NOT NULL CHECK (direction IN (1, 2)),
    rule_index       INTEGER NOT NULL CHECK (rule_index BETWEEN 0 AND 4294967295),
    node_id          TEXT    NOT NULL,
    hits             INTEGER NOT NULL CHECK (hits >= 0),
    last_hit_unix_ms INTEGER NOT NULL,
    -- Also serves "every rule of proposal version P".
    PRIMARY KEY (proposal_id, direction, rule_index, node_id)
) WITHOUT ROWID;
