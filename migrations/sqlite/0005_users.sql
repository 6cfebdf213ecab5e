-- Bulkhead learner: users, UI sessions and API tokens (SQLite). Kept in lockstep with
-- migrations/postgres/0005_users.sql: same tables, columns and meanings.
--
-- Conventions as in 0001–0004 (times in Unix ms, enumerations as lowercase names with a
-- CHECK, hashes as raw SHA-256 bytes), plus:
--   * secrets are never stored: passwords only as argon2id PHC strings, session and API
--     tokens only as the SHA-256 of the token (the token is shown once). A copy of this
--     database lets nobody log in;
--   * a username is unique by its case-folded key, computed by the learner
--     (`auth::username_key`), not by the database: SQLite's lower() only folds ASCII and
--     PostgreSQL's depends on the collation, and both backends must agree;
--   * users are never deleted (the audit log names them); they are disabled.
--   Every change here is audited (`user.*`, `session.login`, `token.*`) in the same
--   transaction as the change.

CREATE TABLE users (
    -- AUTOINCREMENT: ids are never reused, so a session or token can never pass to a
    -- later user.
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    -- As entered (shown); 1–64 characters, no C0 controls or DEL (the learner also
    -- refuses C1 controls and invisible formatting characters).
    username             TEXT    NOT NULL CHECK (length(username) BETWEEN 1 AND 64
                             AND username NOT GLOB ('*[' || char(1) || '-' || char(31) || char(127) || ']*')),
    -- Upper- then lower-cased `username`; what uniqueness and look-ups use. Folding can
    -- lengthen a name (at most 3 characters per character).
    username_key         TEXT    NOT NULL UNIQUE CHECK (length(username_key) BETWEEN 1 AND 192),
    password_hash        TEXT    NOT NULL CHECK (substr(password_hash, 1, 10) = '$argon2id$'),
    role                 TEXT    NOT NULL CHECK (role IN ('viewer', 'analyst', 'approver', 'admin')),
    disabled             BOOLEAN NOT NULL DEFAULT FALSE,
    -- Set for one-time passwords (first admin, resets): the UI makes the user choose a
    -- new password before anything else.
    must_change_password BOOLEAN NOT NULL,
    created_unix_ms      INTEGER NOT NULL,
    updated_unix_ms      INTEGER NOT NULL
);

-- A logged-in browser. Looked up by the SHA-256 of the cookie's token; valid until
-- `expires_unix_ms` while the user is not disabled.
CREATE TABLE sessions (
    token_hash        BLOB    PRIMARY KEY NOT NULL CHECK (length(token_hash) = 32),
    user_id           INTEGER NOT NULL REFERENCES users (id),
    created_unix_ms   INTEGER NOT NULL,
    -- Refreshed at most once a minute by use.
    last_seen_unix_ms INTEGER NOT NULL,
    expires_unix_ms   INTEGER NOT NULL,
    -- The session's CSRF secret: forms carry masked tokens derived from it.
    csrf_secret       BLOB    NOT NULL CHECK (length(csrf_secret) = 32)
) WITHOUT ROWID;
-- "Log this user out everywhere".
CREATE INDEX sessions_user ON sessions (user_id);
-- Pruning expired sessions.
CREATE INDEX sessions_expires ON sessions (expires_unix_ms);

-- Bearer tokens for the CLI and scripts, acting as their user (with the user's current
-- role). Revoked tokens are kept (revoked_unix_ms set) so the audit trail can name them.
CREATE TABLE api_tokens (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    token_hash        BLOB    NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    user_id           INTEGER NOT NULL REFERENCES users (id),
    -- The owner's label for it ("cli", "ci"); unique among the user's live tokens.
    name              TEXT    NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
    created_unix_ms   INTEGER NOT NULL,
    -- Refreshed at most once a minute by use; NULL = never used.
    last_used_unix_ms INTEGER,
    -- NULL = does not expire.
    expires_unix_ms   INTEGER,
    -- NULL = valid.
    revoked_unix_ms   INTEGER
);
CREATE UNIQUE INDEX api_tokens_live_name ON api_tokens (user_id, name) WHERE revoked_unix_ms IS NULL;
