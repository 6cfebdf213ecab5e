//! Users, UI sessions and API tokens — the statements, bound, run and decoded once for
//! both backends (the same generic shape as `policy_sql`; `sqlite_users` and
//! `postgres_users` open the transactions and name the row lock).
//!
//! What this guarantees:
//! - **No secret at rest.** Passwords arrive hashed ([`PasswordHash`]); tokens are looked
//!   up and stored by their SHA-256 and returned in clear exactly once, by the call that
//!   made them.
//! - **Every change is audited with it.** Creating a user, changing a role, a password or
//!   the disabled flag, a login, creating or revoking a token: each writes its audit entry
//!   (see [`user_actions`]) in the same transaction, so the change and its record commit
//!   together or not at all.
//! - **A session is as good as its user, now.** Looking a session or token up re-reads
//!   the user: a disabled user's sessions and tokens stop working at once, a new role
//!   applies to the next request. A new password or disabling also deletes the user's
//!   sessions.

use std::marker::PhantomData;

use serde::Serialize;
use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Pool, Transaction, Type};

use super::audit::{self, PreparedAudit, RawAuditHead};
use super::dashboard::{KeepAdmin, UserChange, refused};
use super::policy_sql::PolicyDb;
use super::prepare::text;
use super::{StoreError, hex};
use crate::auth::{CsrfSecret, PasswordHash, Role, Token, Username};

/// Audit actions of this module. Dotted like [`super::actions`]; the subject is
/// `user:<username>`.
pub mod user_actions {
    pub const USER_CREATE: &str = "user.create";
    pub const USER_ROLE: &str = "user.role";
    pub const USER_PASSWORD: &str = "user.password";
    pub const USER_DISABLE: &str = "user.disable";
    pub const USER_ENABLE: &str = "user.enable";
    pub const SESSION_LOGIN: &str = "session.login";
    pub const TOKEN_CREATE: &str = "token.create";
    pub const TOKEN_REVOKE: &str = "token.revoke";
}
use user_actions as actions;

/// `last_seen` / `last_used` are written at most this often per session or token, so a
/// busy page does not turn every request into a write.
pub const TOUCH_EVERY_MS: i64 = 60_000;
/// Longest API token name, in characters.
pub const MAX_TOKEN_NAME_CHARS: usize = 64;

/// A user as listed (never with the password hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserRow {
    pub id: i64,
    pub username: String,
    pub role: Role,
    pub disabled: bool,
    /// Logged in with a one-time password: must choose a new one first.
    pub must_change_password: bool,
    pub created_unix_ms: i64,
    pub updated_unix_ms: i64,
}

/// Who a valid session belongs to, as of this request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionUser {
    pub user_id: i64,
    pub username: String,
    pub role: Role,
    pub must_change_password: bool,
    /// Verifies the forms' CSRF tokens ([`CsrfSecret::verify`]).
    pub csrf: CsrfSecret,
    pub expires_unix_ms: i64,
}

/// A session just made: the token (for the cookie; shown once, stored hashed) and whom
/// it belongs to.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub token: Token,
    pub user: SessionUser,
}

/// Who a valid API token acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenUser {
    pub token_id: i64,
    pub user_id: i64,
    pub username: String,
    pub role: Role,
}

/// An API token as listed (never the token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiTokenRow {
    pub id: i64,
    pub user_id: i64,
    pub username: String,
    pub name: String,
    pub created_unix_ms: i64,
    pub last_used_unix_ms: Option<i64>,
    pub expires_unix_ms: Option<i64>,
    pub revoked_unix_ms: Option<i64>,
}

/// A token name: 1–[`MAX_TOKEN_NAME_CHARS`] characters, no control characters.
pub(crate) fn token_name(name: &str) -> Result<String, StoreError> {
    let n = name.chars().count();
    if name.trim().is_empty() || n > MAX_TOKEN_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(StoreError::InvalidTokenName);
    }
    Ok(name.to_owned())
}

pub(crate) fn subject(username: &str) -> String {
    format!("user:{username}")
}

/// Part of a session's token hash, to tell sessions apart in the audit log without
/// writing down anything that could be used as one.
fn session_tag(digest: &[u8; 32]) -> String {
    hex(&digest[..6])
}

// === decoding ===

fn role_from_db(table: &'static str, s: &str) -> Result<Role, StoreError> {
    s.parse().map_err(|_| StoreError::InvalidStoredValue { table, column: "role", value: s.chars().take(32).collect() })
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawUser {
    pub id: i64,
    pub username: String,
    pub role: String,
    pub disabled: bool,
    pub must_change_password: bool,
    pub created_unix_ms: i64,
    pub updated_unix_ms: i64,
}

impl TryFrom<RawUser> for UserRow {
    type Error = StoreError;
    fn try_from(r: RawUser) -> Result<Self, StoreError> {
        Ok(UserRow {
            id: r.id,
            role: role_from_db("users", &r.role)?,
            username: r.username,
            disabled: r.disabled,
            must_change_password: r.must_change_password,
            created_unix_ms: r.created_unix_ms,
            updated_unix_ms: r.updated_unix_ms,
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawCredentials {
    pub id: i64,
    pub password_hash: String,
    pub disabled: bool,
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawSession {
    pub user_id: i64,
    pub username: String,
    pub role: String,
    pub must_change_password: bool,
    pub csrf_secret: Vec<u8>,
    pub expires_unix_ms: i64,
    pub last_seen_unix_ms: i64,
}

impl TryFrom<RawSession> for SessionUser {
    type Error = StoreError;
    fn try_from(r: RawSession) -> Result<Self, StoreError> {
        let csrf = CsrfSecret::from_stored(&r.csrf_secret).ok_or_else(|| StoreError::InvalidStoredValue {
            table: "sessions",
            column: "csrf_secret",
            value: format!("{} bytes", r.csrf_secret.len()),
        })?;
        Ok(SessionUser {
            user_id: r.user_id,
            role: role_from_db("users", &r.role)?,
            username: r.username,
            must_change_password: r.must_change_password,
            csrf,
            expires_unix_ms: r.expires_unix_ms,
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawTokenUser {
    pub token_id: i64,
    pub user_id: i64,
    pub username: String,
    pub role: String,
    pub last_used_unix_ms: Option<i64>,
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawApiToken {
    pub id: i64,
    pub user_id: i64,
    pub username: String,
    pub name: String,
    pub created_unix_ms: i64,
    pub last_used_unix_ms: Option<i64>,
    pub expires_unix_ms: Option<i64>,
    pub revoked_unix_ms: Option<i64>,
}

impl TryFrom<RawApiToken> for ApiTokenRow {
    type Error = StoreError;
    fn try_from(r: RawApiToken) -> Result<Self, StoreError> {
        Ok(ApiTokenRow {
            id: r.id,
            user_id: r.user_id,
            username: r.username,
            name: r.name,
            created_unix_ms: r.created_unix_ms,
            last_used_unix_ms: r.last_used_unix_ms,
            expires_unix_ms: r.expires_unix_ms,
            revoked_unix_ms: r.revoked_unix_ms,
        })
    }
}

// === statements (both backends; `UsersDb::SELECT_USER_FOR_CHANGE` is the backend's) ===

const INSERT_USER: &str = "INSERT INTO users (username, username_key, password_hash, role, disabled, \
     must_change_password, created_unix_ms, updated_unix_ms) VALUES ($1, $2, $3, $4, FALSE, $5, $6, $6) \
     RETURNING id, username, role, disabled, must_change_password, created_unix_ms, updated_unix_ms";

pub(crate) const SELECT_USER_BY_KEY: &str = "SELECT id, username, role, disabled, must_change_password, \
     created_unix_ms, updated_unix_ms FROM users WHERE username_key = $1";

/// [`SELECT_USER_BY_KEY`] locking the row (PostgreSQL).
pub(crate) const SELECT_USER_BY_KEY_FOR_UPDATE: &str = "SELECT id, username, role, disabled, \
     must_change_password, created_unix_ms, updated_unix_ms FROM users WHERE username_key = $1 FOR UPDATE";

const SELECT_USERS: &str = "SELECT id, username, role, disabled, must_change_password, created_unix_ms, \
     updated_unix_ms FROM users ORDER BY username_key";

const SELECT_CREDENTIALS: &str = "SELECT id, password_hash, disabled FROM users WHERE username_key = $1";

const SET_ROLE: &str = "UPDATE users SET role = $2, updated_unix_ms = $3 WHERE id = $1";
const SET_PASSWORD: &str =
    "UPDATE users SET password_hash = $2, must_change_password = $3, updated_unix_ms = $4 WHERE id = $1";
const SET_DISABLED: &str = "UPDATE users SET disabled = $2, updated_unix_ms = $3 WHERE id = $1";

/// Only for a user who exists and is not disabled (checked in the same statement).
const INSERT_SESSION: &str = "INSERT INTO sessions (token_hash, user_id, created_unix_ms, last_seen_unix_ms, \
     expires_unix_ms, csrf_secret) SELECT $1, id, $3, $3, $4, $5 FROM users WHERE id = $2 AND NOT disabled";

const SELECT_SESSION: &str = "SELECT s.user_id, u.username, u.role, u.must_change_password, s.csrf_secret, \
     s.expires_unix_ms, s.last_seen_unix_ms FROM sessions s JOIN users u ON u.id = s.user_id \
     WHERE s.token_hash = $1 AND s.expires_unix_ms > $2 AND NOT u.disabled";

const TOUCH_SESSION: &str =
    "UPDATE sessions SET last_seen_unix_ms = $2 WHERE token_hash = $1 AND last_seen_unix_ms <= $3";

const DELETE_SESSION: &str = "DELETE FROM sessions WHERE token_hash = $1";
const DELETE_SESSIONS_OF: &str = "DELETE FROM sessions WHERE user_id = $1";
const PRUNE_SESSIONS: &str = "DELETE FROM sessions WHERE expires_unix_ms <= $1";

const INSERT_TOKEN: &str = "INSERT INTO api_tokens (token_hash, user_id, name, created_unix_ms, expires_unix_ms) \
     VALUES ($1, $2, $3, $4, $5) RETURNING id";

const SELECT_TOKEN: &str = "SELECT t.id, t.user_id, u.username, t.name, t.created_unix_ms, t.last_used_unix_ms, \
     t.expires_unix_ms, t.revoked_unix_ms FROM api_tokens t JOIN users u ON u.id = t.user_id WHERE t.id = $1";

const SELECT_TOKENS_OF: &str = "SELECT t.id, t.user_id, u.username, t.name, t.created_unix_ms, \
     t.last_used_unix_ms, t.expires_unix_ms, t.revoked_unix_ms FROM api_tokens t JOIN users u ON u.id = t.user_id \
     WHERE u.username_key = $1 ORDER BY t.id";

const SELECT_TOKEN_USER: &str = "SELECT t.id AS token_id, t.user_id, u.username, u.role, t.last_used_unix_ms \
     FROM api_tokens t JOIN users u ON u.id = t.user_id WHERE t.token_hash = $1 AND t.revoked_unix_ms IS NULL \
     AND (t.expires_unix_ms IS NULL OR t.expires_unix_ms > $2) AND NOT u.disabled";

const TOUCH_TOKEN: &str = "UPDATE api_tokens SET last_used_unix_ms = $2 WHERE id = $1 \
     AND (last_used_unix_ms IS NULL OR last_used_unix_ms <= $3)";

const REVOKE_TOKEN: &str = "UPDATE api_tokens SET revoked_unix_ms = $2 WHERE id = $1 AND revoked_unix_ms IS NULL";

/// What a backend adds to the shared statements.
pub(crate) trait UsersDb: PolicyDb {
    /// The user-row read that precedes a change: PostgreSQL locks the row so the audit
    /// entry's `from` is the value actually replaced; SQLite's single writer needs no lock.
    const SELECT_USER_FOR_CHANGE: &'static str;
}

/// The shared statements, for backend `DB`.
pub(crate) struct UserSql<DB>(PhantomData<DB>);

impl<DB> UserSql<DB>
where
    DB: UsersDb,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> bool: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'r> RawAuditHead: FromRow<'r, DB::Row>,
    for<'r> RawUser: FromRow<'r, DB::Row>,
    for<'r> RawCredentials: FromRow<'r, DB::Row>,
    for<'r> RawSession: FromRow<'r, DB::Row>,
    for<'r> RawTokenUser: FromRow<'r, DB::Row>,
    for<'r> RawApiToken: FromRow<'r, DB::Row>,
{
    // === users ===

    /// [`Store::create_user`](super::Store::create_user), in `tx`.
    pub async fn create_user(
        mut tx: Transaction<'_, DB>,
        name: &Username,
        role: Role,
        password: &PasswordHash,
        must_change_password: bool,
        actor: &str,
        now_ms: i64,
    ) -> Result<UserRow, StoreError> {
        const OP: &str = "create_user";
        let row: RawUser = sqlx::query_as(INSERT_USER)
            .bind(name.as_str())
            .bind(name.key())
            .bind(password.as_str())
            .bind(role.as_str())
            .bind(must_change_password)
            .bind(now_ms)
            .fetch_one(&mut *tx)
            .await
            .map_err(|source| match &source {
                sqlx::Error::Database(e) if e.is_unique_violation() => {
                    StoreError::UserExists { username: name.as_str().to_owned() }
                }
                _ => StoreError::Database { operation: OP, source },
            })?;
        let detail = serde_json::json!({ "role": role, "must_change_password": must_change_password });
        let entry = PreparedAudit::of(now_ms, actor, actions::USER_CREATE, subject(name.as_str()), detail)?;
        append(&mut tx, entry).await?;
        commit(tx, OP, row).await?.try_into()
    }

    pub async fn user_by_name(pool: &Pool<DB>, name: &Username) -> Result<Option<UserRow>, StoreError> {
        sqlx::query_as::<_, RawUser>(SELECT_USER_BY_KEY)
            .bind(name.key())
            .fetch_optional(pool)
            .await
            .map_err(StoreError::db("user_by_name"))?
            .map(UserRow::try_from)
            .transpose()
    }

    pub async fn users(pool: &Pool<DB>) -> Result<Vec<UserRow>, StoreError> {
        let rows: Vec<RawUser> = sqlx::query_as(SELECT_USERS).fetch_all(pool).await.map_err(StoreError::db("users"))?;
        rows.into_iter().map(UserRow::try_from).collect()
    }

    /// The user `name` as it is now in `tx`, locked for the change that follows.
    async fn locked_user(conn: &mut DB::Connection, op: &'static str, name: &Username) -> Result<UserRow, StoreError> {
        let row: Option<RawUser> = sqlx::query_as(DB::SELECT_USER_FOR_CHANGE)
            .bind(name.key())
            .fetch_optional(&mut *conn)
            .await
            .map_err(StoreError::db(op))?;
        row.ok_or_else(|| StoreError::UserNotFound { username: name.as_str().to_owned() })?.try_into()
    }

    /// A role change or (dis/en)abling in `tx`, refused with [`KeepAdmin::LastAdmin`]
    /// when it would leave no enabled admin. `admins` lists the enabled admins first
    /// (locking them where the backend needs it, so two concurrent demotions count in
    /// turn).
    pub async fn change_keeping_admin(
        mut tx: Transaction<'_, DB>,
        admins: &'static str,
        name: &Username,
        change: UserChange,
        actor: &str,
        now_ms: i64,
    ) -> Result<KeepAdmin<UserRow>, StoreError> {
        const OP: &str = "guarded_user_change";
        let ids: Vec<i64> = sqlx::query_scalar(admins).fetch_all(&mut *tx).await.map_err(StoreError::db(OP))?;
        let user = Self::locked_user(&mut tx, OP, name).await?;
        if refused(&user, change, &ids) {
            tx.rollback().await.map_err(StoreError::db(OP))?;
            return Ok(KeepAdmin::LastAdmin);
        }
        let row = match change {
            UserChange::Role(role) => Self::set_role(tx, name, role, actor, now_ms).await?,
            UserChange::Disabled(d) => Self::set_disabled(tx, name, d, actor, now_ms).await?,
        };
        Ok(KeepAdmin::Done(row))
    }

    /// [`Store::set_role`](super::Store::set_role), in `tx`.
    pub async fn set_role(
        mut tx: Transaction<'_, DB>,
        name: &Username,
        role: Role,
        actor: &str,
        now_ms: i64,
    ) -> Result<UserRow, StoreError> {
        const OP: &str = "set_role";
        let mut user = Self::locked_user(&mut tx, OP, name).await?;
        sqlx::query(SET_ROLE)
            .bind(user.id)
            .bind(role.as_str())
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(OP))?;
        let detail = serde_json::json!({ "from": user.role, "to": role });
        let entry = PreparedAudit::of(now_ms, actor, actions::USER_ROLE, subject(&user.username), detail)?;
        append(&mut tx, entry).await?;
        user.role = role;
        user.updated_unix_ms = now_ms;
        commit(tx, OP, user).await
    }

    /// [`Store::set_password`](super::Store::set_password), in `tx`: also ends the
    /// user's sessions.
    pub async fn set_password(
        mut tx: Transaction<'_, DB>,
        name: &Username,
        password: &PasswordHash,
        must_change_password: bool,
        actor: &str,
        now_ms: i64,
    ) -> Result<UserRow, StoreError> {
        const OP: &str = "set_password";
        let mut user = Self::locked_user(&mut tx, OP, name).await?;
        sqlx::query(SET_PASSWORD)
            .bind(user.id)
            .bind(password.as_str())
            .bind(must_change_password)
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(OP))?;
        let ended = delete_sessions_of(&mut tx, OP, user.id).await?;
        let detail = serde_json::json!({ "must_change_password": must_change_password, "sessions_ended": ended });
        let entry = PreparedAudit::of(now_ms, actor, actions::USER_PASSWORD, subject(&user.username), detail)?;
        append(&mut tx, entry).await?;
        user.must_change_password = must_change_password;
        user.updated_unix_ms = now_ms;
        commit(tx, OP, user).await
    }

    /// [`Store::set_disabled`](super::Store::set_disabled), in `tx`: disabling also
    /// ends the user's sessions.
    pub async fn set_disabled(
        mut tx: Transaction<'_, DB>,
        name: &Username,
        disabled: bool,
        actor: &str,
        now_ms: i64,
    ) -> Result<UserRow, StoreError> {
        const OP: &str = "set_disabled";
        let mut user = Self::locked_user(&mut tx, OP, name).await?;
        sqlx::query(SET_DISABLED)
            .bind(user.id)
            .bind(disabled)
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(OP))?;
        let ended = if disabled { delete_sessions_of(&mut tx, OP, user.id).await? } else { 0 };
        let action = if disabled { actions::USER_DISABLE } else { actions::USER_ENABLE };
        let detail = serde_json::json!({ "was_disabled": user.disabled, "sessions_ended": ended });
        let entry = PreparedAudit::of(now_ms, actor, action, subject(&user.username), detail)?;
        append(&mut tx, entry).await?;
        user.disabled = disabled;
        user.updated_unix_ms = now_ms;
        commit(tx, OP, user).await
    }

    /// The id, stored hash and disabled flag of `name`, for a login to verify.
    pub async fn credentials(
        pool: &Pool<DB>,
        name: &Username,
    ) -> Result<Option<(i64, PasswordHash, bool)>, StoreError> {
        let row: Option<RawCredentials> = sqlx::query_as(SELECT_CREDENTIALS)
            .bind(name.key())
            .fetch_optional(pool)
            .await
            .map_err(StoreError::db("credentials"))?;
        Ok(row.map(|r| (r.id, PasswordHash::from_stored(r.password_hash), r.disabled)))
    }

    // === sessions ===

    /// [`Store::create_session`](super::Store::create_session), in `tx`: audited as
    /// `session.login` by the user.
    pub async fn create_session(
        mut tx: Transaction<'_, DB>,
        user_id: i64,
        token: Token,
        csrf: CsrfSecret,
        expires_unix_ms: i64,
        now_ms: i64,
    ) -> Result<NewSession, StoreError> {
        const OP: &str = "create_session";
        let digest = token.digest();
        let inserted = sqlx::query(INSERT_SESSION)
            .bind(&digest[..])
            .bind(user_id)
            .bind(now_ms)
            .bind(expires_unix_ms)
            .bind(&csrf.as_bytes()[..])
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(OP))?;
        if DB::rows_affected(&inserted) == 0 {
            return Err(StoreError::InvalidCredentials);
        }
        let raw: RawSession = sqlx::query_as(SELECT_SESSION)
            .bind(&digest[..])
            .bind(i64::MIN)
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::db(OP))?;
        let user = SessionUser::try_from(raw)?;
        let detail = serde_json::json!({ "session": session_tag(&digest), "expires_unix_ms": expires_unix_ms });
        let entry = PreparedAudit::of(now_ms, &user.username, actions::SESSION_LOGIN, subject(&user.username), detail)?;
        append(&mut tx, entry).await?;
        commit(tx, OP, NewSession { token, user }).await
    }

    /// The live session with this token hash, and when it was last touched.
    pub async fn session(
        pool: &Pool<DB>,
        digest: &[u8; 32],
        now_ms: i64,
    ) -> Result<Option<(SessionUser, i64)>, StoreError> {
        let row: Option<RawSession> = sqlx::query_as(SELECT_SESSION)
            .bind(&digest[..])
            .bind(now_ms)
            .fetch_optional(pool)
            .await
            .map_err(StoreError::db("session"))?;
        row.map(|r| {
            let last_seen = r.last_seen_unix_ms;
            SessionUser::try_from(r).map(|u| (u, last_seen))
        })
        .transpose()
    }

    /// Moves `last_seen` to now unless it moved within [`TOUCH_EVERY_MS`].
    pub async fn touch_session(writer: &Pool<DB>, digest: &[u8; 32], now_ms: i64) -> Result<(), StoreError> {
        sqlx::query(TOUCH_SESSION)
            .bind(&digest[..])
            .bind(now_ms)
            .bind(now_ms.saturating_sub(TOUCH_EVERY_MS))
            .execute(writer)
            .await
            .map_err(StoreError::db("touch_session"))?;
        Ok(())
    }

    pub async fn delete_session(writer: &Pool<DB>, digest: &[u8; 32]) -> Result<bool, StoreError> {
        let r = sqlx::query(DELETE_SESSION)
            .bind(&digest[..])
            .execute(writer)
            .await
            .map_err(StoreError::db("delete_session"))?;
        Ok(DB::rows_affected(&r) > 0)
    }

    pub async fn delete_sessions_of(writer: &Pool<DB>, user_id: i64) -> Result<u64, StoreError> {
        let r = sqlx::query(DELETE_SESSIONS_OF)
            .bind(user_id)
            .execute(writer)
            .await
            .map_err(StoreError::db("delete_sessions_of"))?;
        Ok(DB::rows_affected(&r))
    }

    pub async fn prune_expired_sessions(writer: &Pool<DB>, now_ms: i64) -> Result<u64, StoreError> {
        let r = sqlx::query(PRUNE_SESSIONS)
            .bind(now_ms)
            .execute(writer)
            .await
            .map_err(StoreError::db("prune_expired_sessions"))?;
        Ok(DB::rows_affected(&r))
    }

    // === API tokens ===

    /// [`Store::create_api_token`](super::Store::create_api_token), in `tx`.
    pub async fn create_api_token(
        mut tx: Transaction<'_, DB>,
        owner: &Username,
        token: &Token,
        name: &str,
        expires_unix_ms: Option<i64>,
        actor: &str,
        now_ms: i64,
    ) -> Result<ApiTokenRow, StoreError> {
        const OP: &str = "create_api_token";
        let user = Self::locked_user(&mut tx, OP, owner).await?;
        let digest = token.digest();
        let id: i64 = sqlx::query_scalar(INSERT_TOKEN)
            .bind(&digest[..])
            .bind(user.id)
            .bind(name)
            .bind(now_ms)
            .bind(expires_unix_ms)
            .fetch_one(&mut *tx)
            .await
            .map_err(|source| match &source {
                sqlx::Error::Database(e) if e.is_unique_violation() => {
                    StoreError::TokenNameTaken { username: user.username.clone(), name: name.to_owned() }
                }
                _ => StoreError::Database { operation: OP, source },
            })?;
        let row = Self::token_row(&mut tx, OP, id).await?;
        let detail = serde_json::json!({ "token_id": id, "name": name, "expires_unix_ms": expires_unix_ms });
        let entry = PreparedAudit::of(now_ms, actor, actions::TOKEN_CREATE, subject(&user.username), detail)?;
        append(&mut tx, entry).await?;
        commit(tx, OP, row).await
    }

    async fn token_row(conn: &mut DB::Connection, op: &'static str, id: i64) -> Result<ApiTokenRow, StoreError> {
        let row: Option<RawApiToken> =
            sqlx::query_as(SELECT_TOKEN).bind(id).fetch_optional(&mut *conn).await.map_err(StoreError::db(op))?;
        row.ok_or(StoreError::ApiTokenNotFound { id })?.try_into()
    }

    /// Who the live token with this hash acts as, and when it was last used.
    pub async fn api_token(
        pool: &Pool<DB>,
        digest: &[u8; 32],
        now_ms: i64,
    ) -> Result<Option<(TokenUser, Option<i64>)>, StoreError> {
        let row: Option<RawTokenUser> = sqlx::query_as(SELECT_TOKEN_USER)
            .bind(&digest[..])
            .bind(now_ms)
            .fetch_optional(pool)
            .await
            .map_err(StoreError::db("api_token"))?;
        row.map(|r| {
            let role = role_from_db("users", &r.role)?;
            let user = TokenUser { token_id: r.token_id, user_id: r.user_id, username: r.username, role };
            Ok((user, r.last_used_unix_ms))
        })
        .transpose()
    }

    pub async fn touch_api_token(writer: &Pool<DB>, id: i64, now_ms: i64) -> Result<(), StoreError> {
        sqlx::query(TOUCH_TOKEN)
            .bind(id)
            .bind(now_ms)
            .bind(now_ms.saturating_sub(TOUCH_EVERY_MS))
            .execute(writer)
            .await
            .map_err(StoreError::db("touch_api_token"))?;
        Ok(())
    }

    /// [`Store::revoke_api_token`](super::Store::revoke_api_token), in `tx`.
    pub async fn revoke_api_token(
        mut tx: Transaction<'_, DB>,
        id: i64,
        actor: &str,
        now_ms: i64,
    ) -> Result<ApiTokenRow, StoreError> {
        const OP: &str = "revoke_api_token";
        let r = sqlx::query(REVOKE_TOKEN).bind(id).bind(now_ms).execute(&mut *tx).await.map_err(StoreError::db(OP))?;
        if DB::rows_affected(&r) == 0 {
            return Err(StoreError::ApiTokenNotFound { id });
        }
        let row = Self::token_row(&mut tx, OP, id).await?;
        let detail = serde_json::json!({ "token_id": id, "name": row.name });
        let entry = PreparedAudit::of(now_ms, actor, actions::TOKEN_REVOKE, subject(&row.username), detail)?;
        append(&mut tx, entry).await?;
        commit(tx, OP, row).await
    }

    /// Every token of `owner`, revoked ones included, oldest first.
    pub async fn api_tokens(pool: &Pool<DB>, owner: &Username) -> Result<Vec<ApiTokenRow>, StoreError> {
        let rows: Vec<RawApiToken> = sqlx::query_as(SELECT_TOKENS_OF)
            .bind(owner.key())
            .fetch_all(pool)
            .await
            .map_err(StoreError::db("api_tokens"))?;
        rows.into_iter().map(ApiTokenRow::try_from).collect()
    }
}

/// Deletes every session of `user_id` in `conn`; returns how many.
async fn delete_sessions_of<DB>(conn: &mut DB::Connection, op: &'static str, user_id: i64) -> Result<u64, StoreError>
where
    DB: UsersDb,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
{
    let r = sqlx::query(DELETE_SESSIONS_OF).bind(user_id).execute(&mut *conn).await.map_err(StoreError::db(op))?;
    Ok(DB::rows_affected(&r))
}

/// Appends one audit entry after the chain's head, in the caller's transaction.
async fn append<DB>(conn: &mut DB::Connection, e: PreparedAudit) -> Result<(), StoreError>
where
    DB: UsersDb,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'r> RawAuditHead: FromRow<'r, DB::Row>,
{
    audit::append_in::<DB>(conn, DB::SELECT_AUDIT_HEAD, e).await.map(|_| ())
}

async fn commit<DB: Database, T>(tx: Transaction<'_, DB>, op: &'static str, written: T) -> Result<T, StoreError> {
    tx.commit().await.map_err(StoreError::db(op))?;
    Ok(written)
}

/// Actor text as stored (NUL-free), refusing a blank one.
pub(crate) fn actor(actor: &str) -> Result<String, StoreError> {
    audit::require("actor", actor)?;
    Ok(text(actor))
}
