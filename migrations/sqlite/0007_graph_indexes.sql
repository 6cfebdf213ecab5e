-- Bulkhead learner: indexes for the service graph page (SQLite). Kept in lockstep with
-- migrations/postgres/0007_graph_indexes.sql.
--
-- The graph colours each edge by what enforcers reported for it in the chosen range
-- (audit = would deny in monitor, denied = dropped in enforce). That read groups the
-- range's verdict events by connection tuple; this index holds every column it needs
-- in time order, so it is one index range scan without touching the table. Events are
-- rate-limited by the enforcers, so the extra index costs little on insert.
--
-- The edge reads need nothing new: the graph joins its identity grouping to `edges`
-- through the primary key (outgoing) and `edges_dst_identity` (incoming), see
-- `store::graph`.
CREATE INDEX verdict_events_graph ON verdict_events
    (at_unix_ms, verdict, local_identity, peer_identity, direction, dst_port, protocol);
