-- Bulkhead learner: indexes for the analysts' observe pages (SQLite). Kept in lockstep
-- with migrations/postgres/0006_observe_indexes.sql.
--
-- The flows table stays without per-flow secondary indexes on the ingest path (see
-- 0001): every flows-page filter is served by bounded id-window scans newest first,
-- which is fast whenever matches are common. The one filter an analyst uses to find the
-- rare rows is the verdict ("show me what was audited / denied"); a partial index holds
-- only those flows, so it costs ingest nothing for the forwarded bulk and turns that
-- filter into an index walk. Queries name `verdict <> 1` literally to use it.
CREATE INDEX flows_not_forwarded ON flows (id) WHERE verdict <> 1;
