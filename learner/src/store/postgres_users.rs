//! PostgreSQL half of users, sessions and API tokens: the shared statements (`users`) on
//! PostgreSQL's pool. Audited changes run in READ COMMITTED transactions that lock the
//! user row first (`SELECT … FOR UPDATE`, so the audit entry's `from` is what was
//! replaced) and the audit head last, the lock order of `postgres_policy`; the
//! housekeeping writes (touch, logout, prune) are one statement each.

use sqlx::{Postgres, Transaction};

use super::StoreError;
use super::postgres::PgStore;
use super::users::{self, ApiTokenRow, NewSession, SessionUser, TokenUser, UserRow, UsersDb};
use crate::auth::{CsrfSecret, PasswordHash, Role, Token, Username};

type Sql = users::UserSql<Postgres>;

impl UsersDb for Postgres {
    const SELECT_USER_FOR_CHANGE: &'static str = users::SELECT_USER_BY_KEY_FOR_UPDATE;
}

impl PgStore {
    async fn begin_users_write(&self, op: &'static str) -> Result<Transaction<'_, Postgres>, StoreError> {
        self.pool.begin().await.map_err(StoreError::db(op))
    }

    pub async fn create_user(
        &self,
        name: &Username,
        role: Role,
        password: &PasswordHash,
        must_change_password: bool,
        actor: &str,
        now_ms: i64,
    ) -> Result<UserRow, StoreError> {
        let tx = self.begin_users_write("create_user").await?;
        Sql::create_user(tx, name, role, password, must_change_password, actor, now_ms).await
    }

    pub async fn user_by_name(&self, name: &Username) -> Result<Option<UserRow>, StoreError> {
        Sql::user_by_name(&self.pool, name).await
    }

    pub async fn users(&self) -> Result<Vec<UserRow>, StoreError> {
        Sql::users(&self.pool).await
    }

    pub async fn set_role(&self, name: &Username, role: Role, actor: &str, now_ms: i64) -> Result<UserRow, StoreError> {
        Sql::set_role(self.begin_users_write("set_role").await?, name, role, actor, now_ms).await
    }

    pub async fn set_password(
        &self,
        name: &Username,
        password: &PasswordHash,
        must_change_password: bool,
        actor: &str,
        now_ms: i64,
    ) -> Result<UserRow, StoreError> {
        let tx = self.begin_users_write("set_password").await?;
        Sql::set_password(tx, name, password, must_change_password, actor, now_ms).await
    }

    pub async fn set_disabled(
        &self,
        name: &Username,
        disabled: bool,
        actor: &str,
        now_ms: i64,
    ) -> Result<UserRow, StoreError> {
        Sql::set_disabled(self.begin_users_write("set_disabled").await?, name, disabled, actor, now_ms).await
    }

    pub async fn credentials(&self, name: &Username) -> Result<Option<(i64, PasswordHash, bool)>, StoreError> {
        Sql::credentials(&self.pool, name).await
    }

    pub async fn create_session(
        &self,
        user_id: i64,
        token: Token,
        csrf: CsrfSecret,
        expires_unix_ms: i64,
        now_ms: i64,
    ) -> Result<NewSession, StoreError> {
        let tx = self.begin_users_write("create_session").await?;
        Sql::create_session(tx, user_id, token, csrf, expires_unix_ms, now_ms).await
    }

    pub async fn session(&self, digest: &[u8; 32], now_ms: i64) -> Result<Option<(SessionUser, i64)>, StoreError> {
        Sql::session(&self.pool, digest, now_ms).await
    }

    pub async fn touch_session(&self, digest: &[u8; 32], now_ms: i64) -> Result<(), StoreError> {
        Sql::touch_session(&self.pool, digest, now_ms).await
    }

    pub async fn delete_session(&self, digest: &[u8; 32]) -> Result<bool, StoreError> {
        Sql::delete_session(&self.pool, digest).await
    }

    pub async fn delete_sessions_of(&self, user_id: i64) -> Result<u64, StoreError> {
        Sql::delete_sessions_of(&self.pool, user_id).await
    }

    pub async fn prune_expired_sessions(&self, now_ms: i64) -> Result<u64, StoreError> {
        Sql::prune_expired_sessions(&self.pool, now_ms).await
    }

    pub async fn create_api_token(
        &self,
        owner: &Username,
        token: &Token,
        name: &str,
        expires_unix_ms: Option<i64>,
        actor: &str,
        now_ms: i64,
    ) -> Result<ApiTokenRow, StoreError> {
        let tx = self.begin_users_write("create_api_token").await?;
        Sql::create_api_token(tx, owner, token, name, expires_unix_ms, actor, now_ms).await
    }

    pub async fn api_token(
        &self,
        digest: &[u8; 32],
        now_ms: i64,
    ) -> Result<Option<(TokenUser, Option<i64>)>, StoreError> {
        Sql::api_token(&self.pool, digest, now_ms).await
    }

    pub async fn touch_api_token(&self, id: i64, now_ms: i64) -> Result<(), StoreError> {
        Sql::touch_api_token(&self.pool, id, now_ms).await
    }

    pub async fn revoke_api_token(&self, id: i64, actor: &str, now_ms: i64) -> Result<ApiTokenRow, StoreError> {
        Sql::revoke_api_token(self.begin_users_write("revoke_api_token").await?, id, actor, now_ms).await
    }

    pub async fn api_tokens(&self, owner: &Username) -> Result<Vec<ApiTokenRow>, StoreError> {
        Sql::api_tokens(&self.pool, owner).await
    }
}
