-- Bulkhead learner: indexes for the analysts' observe pages (PostgreSQL). Kept in
-- lockstep with migrations/sqlite/0006_observe_indexes.sql.
--
-- Flows-page filters are served by bounded id-window scans newest first (the primary
-- key), fast whenever matches are common. The filter that looks for rare rows is the
-- verdict ("what was audited / denied"); a partial index holds only those flows, so the
-- forwarded bulk of every ingest never touches it. Queries name `verdict <> 1`
-- literally so the planner can prove the index applies.
CREATE INDEX flows_not_forwarded ON flows (id) WHERE verdict <> 1;
