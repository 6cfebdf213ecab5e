-- Bulkhead learner: enforcers' loss counters (SQLite). Kept in lockstep with
-- migrations/postgres/0004_enforcer_loss.sql.
--
-- Each verdict report carries the node's cumulative loss counters; the newest values
-- are kept per node so "lost events" is visible next to the applied version, never
-- silent. Counters saturate at i64::MAX like every stored u64.
ALTER TABLE enforcers ADD COLUMN ringbuf_dropped INTEGER NOT NULL DEFAULT 0 CHECK (ringbuf_dropped >= 0);
ALTER TABLE enforcers ADD COLUMN queue_dropped INTEGER NOT NULL DEFAULT 0 CHECK (queue_dropped >= 0);
ALTER TABLE enforcers ADD COLUMN conntrack_full INTEGER NOT NULL DEFAULT 0 CHECK (conntrack_full >= 0);
-- Last verdict report; NULL before the first.
ALTER TABLE enforcers ADD COLUMN last_report_unix_ms INTEGER;
