-- Bulkhead learner: the request line of HTTP verdict events (PostgreSQL). Kept in
-- lockstep with migrations/sqlite/0011_verdict_http.sql.
--
-- An enforcer that judges an L7 rule's connection reports a request none of the rule's
-- HTTP rules matched with what its kernel program read of the request line
-- (bulkhead_model::HttpRequestLine), so an analyst sees what was refused. All three
-- columns are NULL for an L4 verdict and all three set for an HTTP one. Attacker-chosen
-- text, validated at ingest (HttpRequestLine::validate: the method at most 16 upper-case
-- letters, empty when the segment did not start with a request line; the path at most
-- 520 bytes of visible ASCII, other bytes escaped as \xNN) and always bound, never
-- spliced into SQL. http_truncated: the path went on past what the kernel reads.
--
-- Nullable columns without a default: adding them rewrites nothing.
ALTER TABLE verdict_events
    ADD COLUMN http_method    TEXT CHECK (length(http_method) <= 16),
    ADD COLUMN http_path      TEXT CHECK (length(http_path) <= 520),
    ADD COLUMN http_truncated BOOLEAN,
    ADD CONSTRAINT verdict_events_http_whole CHECK (
        (http_truncated IS NULL AND http_method IS NULL AND http_path IS NULL)
        OR (http_truncated IS NOT NULL AND http_method IS NOT NULL AND http_path IS NOT NULL)
    );
