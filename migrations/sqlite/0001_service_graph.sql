-- Bulkhead learner: the service graph (SQLite). Kept in lockstep with
-- migrations/postgres/0001_service_graph.sql: same tables, columns and meanings, except
-- where the hot flow-insert path is shaped for SQLite (flows / flow_blocks, below).
--
-- Conventions (both backends):
--   * times are Unix milliseconds in 64-bit integers (`*_unix_ms`), never local time;
--   * u64 counters are stored saturated at i64::MAX; u64 kernel ids (netns inode,
--     cgroup id) are stored bit-for-bit as i64 so they round-trip exactly;
--   * label sets are stored in their canonical JSON form (`Labels::canonical`) and are
--     looked up through the SHA-256 of that form: label values are attacker-controlled
--     and unbounded in number, and a digest keeps the unique index small on every
--     backend (PostgreSQL b-tree entries are capped at ~2.7 kB);
--   * flow addresses are their octets in network order, 4 bytes (IPv4) or 16 (IPv6), and
--     a flow's direction and verdict are small integers (the bulkhead.v1 wire numbers):
--     flows are the bulk of every write, and text there costs formatting, copies and
--     pages; other addresses (DNS answers) are text (`IpAddr` Display).

-- One row per security-relevant label set. AUTOINCREMENT (not plain rowid) because an
-- identity number, once handed out, must never be handed out again: enforcers and
-- exported policies refer to it.
CREATE TABLE identities (
    id              INTEGER PRIMARY KEY AUTOINCREMENT CHECK (id BETWEEN 1 AND 4294967295),
    labels_digest   BLOB    NOT NULL UNIQUE CHECK (length(labels_digest) = 32),
    labels          TEXT    NOT NULL,
    created_unix_ms INTEGER NOT NULL
);

-- Reserved identities (Cilium's numbering, see bulkhead_model::ReservedIdentity) with
-- labels {"reserved:<name>": ""}; digests are SHA-256 of the canonical JSON and are
-- checked against the Rust computation by the store tests.
INSERT INTO identities (id, labels_digest, labels, created_unix_ms) VALUES
    (1, X'82271383126f8a6443e7c05dc668a865572fd3b30b88a5df06d4cf786207a89c', '{"reserved:host":""}', 0),
    (2, X'731abd7f52f6f563d492bf90e34a32f146c35a595de58fe6c959f19da305364d', '{"reserved:world":""}', 0),
    (3, X'0df0a66494ca6669a263205e7a67f736a2d3999d1377c82b8a4bd29e5babfbf7', '{"reserved:unmanaged":""}', 0),
    (6, X'3de5f34d1388d310e93e5b8e89cb6676ee688ec1fe8387c4262dc95af5796273', '{"reserved:remote-node":""}', 0),
    (7, X'e214d5d4d4a25e71b10a20365c81a96b94b7ca3bb64028305e98586296d24eb0', '{"reserved:kube-apiserver":""}', 0);

-- Allocated identities start at Identity::FIRST_ALLOCATED (256).
UPDATE sqlite_sequence SET seq = 255 WHERE name = 'identities';

-- Agents (nodes): admin pre-registration and/or what their last Hello said.
CREATE TABLE agents (
    node_id            TEXT    PRIMARY KEY NOT NULL,
    -- Boot the agent last announced (Hello) or, failing that, its first stored batch.
    boot_id            TEXT,
    agent_version      TEXT,
    -- Set by an administrator's pre-registration; NULL for agents that announced themselves.
    registered_unix_ms INTEGER,
    first_seen_unix_ms INTEGER,
    last_seen_unix_ms  INTEGER,
    batches_stored     INTEGER NOT NULL DEFAULT 0
);

-- Per (node, boot): delivery progress and the boot's cumulative loss counters.
CREATE TABLE agent_boots (
    node_id                    TEXT    NOT NULL REFERENCES agents (node_id) ON DELETE CASCADE,
    boot_id                    TEXT    NOT NULL,
    first_seen_unix_ms         INTEGER NOT NULL,
    last_seen_unix_ms          INTEGER NOT NULL,
    -- Highest batch seq stored for this boot.
    stored_through_seq         INTEGER NOT NULL DEFAULT 0,
    -- Batch records up to this seq were pruned: such a seq is a duplicate by definition.
    -- NULL while nothing was pruned (seq 0 is a valid first batch).
    pruned_through_seq         INTEGER,
    batches_stored             INTEGER NOT NULL DEFAULT 0,
    loss_ringbuf_dropped       INTEGER NOT NULL DEFAULT 0,
    loss_queue_dropped         INTEGER NOT NULL DEFAULT 0,
    loss_spool_evicted_batches INTEGER NOT NULL DEFAULT 0,
    loss_spool_evicted_flows   INTEGER NOT NULL DEFAULT 0,
    loss_rejected_batches      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (node_id, boot_id)
) WITHOUT ROWID;

-- At-least-once delivery dedupe: one row per stored batch, written in the batch's own
-- transaction, so a batch is either fully stored and recorded or neither.
CREATE TABLE ingested_batches (
    node_id          TEXT    NOT NULL,
    boot_id          TEXT    NOT NULL,
    seq              INTEGER NOT NULL CHECK (seq >= 0),
    received_unix_ms INTEGER NOT NULL,
    flows            INTEGER NOT NULL,
    PRIMARY KEY (node_id, boot_id, seq)
) WITHOUT ROWID;
CREATE INDEX ingested_batches_received ON ingested_batches (received_unix_ms);

-- The service graph. Counters are kept per observation side because one connection can
-- be reported by both of its ends (client collector: egress, server collector: ingress);
-- readers take max(egress, ingress) so it is never counted twice.
CREATE TABLE edges (
    src_identity        INTEGER NOT NULL REFERENCES identities (id),
    dst_identity        INTEGER NOT NULL REFERENCES identities (id),
    dst_port            INTEGER NOT NULL CHECK (dst_port BETWEEN 0 AND 65535),
    protocol            INTEGER NOT NULL CHECK (protocol BETWEEN 0 AND 255),
    first_seen_unix_ms  INTEGER NOT NULL,
    last_seen_unix_ms   INTEGER NOT NULL,
    connections_egress  INTEGER NOT NULL DEFAULT 0,
    bytes_egress        INTEGER NOT NULL DEFAULT 0,
    connections_ingress INTEGER NOT NULL DEFAULT 0,
    bytes_ingress       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (src_identity, dst_identity, dst_port, protocol)
) WITHOUT ROWID;
-- The primary key serves "edges from X"; these serve "edges to X" and "recent edges".
CREATE INDEX edges_dst_identity ON edges (dst_identity);
-- "Recent edges" in exactly the order Store::edges returns them, so a LIMIT stops early.
CREATE INDEX edges_last_seen ON edges
    (last_seen_unix_ms DESC, src_identity, dst_identity, dst_port, protocol);

-- Recent flows (retention window, see Store::prune_flows). AUTOINCREMENT keeps ids
-- monotonic and never reused, which keyset pagination (`id < before_id`) relies on.
-- What every flow of a batch shares (node, receive time) lives once in its
-- `flow_blocks` row, not on each flow. No foreign keys to identities: the batch's edge
-- upsert in the same transaction already checks every identity it references. No
-- secondary index at all: each one is a second b-tree insert per flow, and everything
-- a flow is looked up by is first narrowed down through flow_blocks.
CREATE TABLE flows (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    src_identity       INTEGER NOT NULL,
    dst_identity       INTEGER NOT NULL,
    -- Addresses in network order: 4 bytes (IPv4) or 16 (IPv6).
    src_addr           BLOB    NOT NULL CHECK (length(src_addr) IN (4, 16)),
    src_port           INTEGER NOT NULL,
    dst_addr           BLOB    NOT NULL CHECK (length(dst_addr) IN (4, 16)),
    dst_port           INTEGER NOT NULL,
    protocol           INTEGER NOT NULL,
    -- Codes as on the wire (bulkhead.v1): 1 egress, 2 ingress.
    direction          INTEGER NOT NULL CHECK (direction IN (1, 2)),
    netns_ino          INTEGER NOT NULL,
    cgroup_id          INTEGER NOT NULL,
    pid                INTEGER NOT NULL,
    comm               TEXT    NOT NULL,
    connections        INTEGER NOT NULL,
    bytes_sent         INTEGER NOT NULL,
    bytes_received     INTEGER NOT NULL,
    packets            INTEGER NOT NULL,
    -- 1 forwarded, 2 audit, 3 denied.
    verdict            INTEGER NOT NULL CHECK (verdict IN (1, 2, 3)),
    first_seen_unix_ms INTEGER NOT NULL,
    last_seen_unix_ms  INTEGER NOT NULL
);

-- One row per stored batch with flows. There is one writer, so a batch's flows are the
-- contiguous id range first_flow_id..=last_flow_id, written in the batch's transaction
-- together with this row. The row holds what the batch's flows share (node_id,
-- received_unix_ms) and what lets readers and pruning skip whole batches:
--   * identities: every identity on either end, as ',256,300,'. Per-flow
--     (src_identity, id) / (dst_identity, id) indexes, as PostgreSQL has, make every
--     batch dirty one index page per identity it mentions and cut SQLite's ingest rate
--     by more than half (measured); an identity query instead walks the blocks newest
--     first and scans only the id ranges of those that mention it;
--   * the oldest and newest last_seen of its flows: pruning finds expiring batches
--     through the index on the oldest and deletes wholly expired ones as id ranges
--     (a per-flow last_seen index was one more b-tree insert per flow, for pruning
--     only); `since` queries skip blocks whose newest flow is older.
-- Keyed by the first id: blocks are disjoint, so "blocks below a page cursor, newest
-- first" is a backwards rowid range scan. Pruning keeps a partly pruned block's range
-- and raises its oldest last_seen; a block goes when its last flow does.
CREATE TABLE flow_blocks (
    first_flow_id         INTEGER PRIMARY KEY,
    last_flow_id          INTEGER NOT NULL,
    node_id               TEXT    NOT NULL,
    received_unix_ms      INTEGER NOT NULL,
    identities            TEXT    NOT NULL,
    min_last_seen_unix_ms INTEGER NOT NULL,
    max_last_seen_unix_ms INTEGER NOT NULL
);
CREATE INDEX flow_blocks_min_last_seen ON flow_blocks (min_last_seen_unix_ms);
-- "Flows of node X, newest first".
CREATE INDEX flow_blocks_node ON flow_blocks (node_id, first_flow_id);

-- Endpoints: the latest snapshot each node reported, one row per network namespace.
CREATE TABLE endpoints (
    node_id         TEXT    NOT NULL,
    netns_ino       INTEGER NOT NULL,
    netns_name      TEXT,
    host            BOOLEAN NOT NULL,
    identity        INTEGER NOT NULL REFERENCES identities (id),
    workload        TEXT,
    -- JSON arrays of bulkhead_model::InterfaceAddress / CgroupFact.
    addresses       TEXT    NOT NULL,
    cgroups         TEXT    NOT NULL,
    updated_unix_ms INTEGER NOT NULL,
    PRIMARY KEY (node_id, netns_ino)
) WITHOUT ROWID;
CREATE INDEX endpoints_identity ON endpoints (identity);

-- DNS answers workloads received (for FQDN groups), one row per distinct answer.
CREATE TABLE dns_answers (
    node_id            TEXT    NOT NULL,
    netns_ino          INTEGER NOT NULL,
    name               TEXT    NOT NULL,
    addr               TEXT    NOT NULL,
    ttl_seconds        INTEGER NOT NULL,
    first_seen_unix_ms INTEGER NOT NULL,
    last_seen_unix_ms  INTEGER NOT NULL,
    PRIMARY KEY (node_id, netns_ino, name, addr)
) WITHOUT ROWID;
CREATE INDEX dns_answers_last_seen ON dns_answers (last_seen_unix_ms);
