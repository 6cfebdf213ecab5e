-- Bulkhead learner: HTTP (L7) facts per service-graph edge (PostgreSQL). Kept in lockstep
-- with migrations/sqlite/0009_edge_http.sql.
--
-- What the server side of an edge received as plaintext HTTP/1.x request lines, per
-- (method, path): the evidence L7 rules are synthesized from. The edge key is the
-- `edges` key (no foreign key: both are written in the batch's transaction, and edges
-- are never deleted). Method and path were validated at ingest
-- (bulkhead_model::policy::validate_method / validate_path: an upper-case token, and at
-- most 128 bytes of visible ASCII that start with '/') and are stored verbatim,
-- always as bound parameters.
--
-- Bounded per edge: at most bulkhead_model::MAX_HTTP_PATHS_PER_EDGE (method, path) rows.
-- Requests of further pairs only count as overflow in `edge_http_stats`, which tells
-- synthesis the path list is incomplete (and so the edge stays L4). Concurrent ingests
-- of one edge serialize on its `edge_http_stats` row, upserted first, so the bound holds.
CREATE TABLE edge_http (
    src_identity       BIGINT  NOT NULL,
    dst_identity       BIGINT  NOT NULL,
    dst_port           INTEGER NOT NULL CHECK (dst_port BETWEEN 0 AND 65535),
    protocol           INTEGER NOT NULL CHECK (protocol BETWEEN 0 AND 255),
    method             TEXT    NOT NULL CHECK (length(method) BETWEEN 1 AND 16),
    path               TEXT    NOT NULL CHECK (length(path) BETWEEN 1 AND 128),
    requests           BIGINT  NOT NULL CHECK (requests >= 0),
    first_seen_unix_ms BIGINT  NOT NULL,
    last_seen_unix_ms  BIGINT  NOT NULL,
    PRIMARY KEY (src_identity, dst_identity, dst_port, protocol, method, path)
);

-- Per edge with any L7 observation: what says its request list is not the whole story.
-- opaque: accepted connections that carried payload but never an HTTP request line
-- (TLS, other protocols); overflow: requests whose (method, path) was not kept (the
-- collector's per-flow bound or the per-edge bound above). The *_last_seen columns let
-- synthesis ignore what happened before its window (NULL: never).
CREATE TABLE edge_http_stats (
    src_identity               BIGINT  NOT NULL,
    dst_identity               BIGINT  NOT NULL,
    dst_port                   INTEGER NOT NULL CHECK (dst_port BETWEEN 0 AND 65535),
    protocol                   INTEGER NOT NULL CHECK (protocol BETWEEN 0 AND 255),
    opaque_connections         BIGINT  NOT NULL DEFAULT 0 CHECK (opaque_connections >= 0),
    opaque_last_seen_unix_ms   BIGINT,
    overflow_requests          BIGINT  NOT NULL DEFAULT 0 CHECK (overflow_requests >= 0),
    overflow_last_seen_unix_ms BIGINT,
    PRIMARY KEY (src_identity, dst_identity, dst_port, protocol)
);
