-- Bulkhead learner: agents' clock skew (PostgreSQL). Kept in lockstep with
-- migrations/sqlite/0010_clock_skew.sql.
--
-- Agents stamp flows and verdicts with their own wall clock; the learner corrects the
-- stamps by the skew it measures (its clock minus the agent's, from each message's send
-- time) and keeps the newest estimate per node so an operator sees which node's clock
-- is off. NULL = not measured yet (or an agent that does not send its clock).
ALTER TABLE agents ADD COLUMN clock_skew_ms BIGINT;
ALTER TABLE enforcers ADD COLUMN clock_skew_ms BIGINT;
