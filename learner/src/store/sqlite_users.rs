//! SQLite half of users, sessions and API tokens: the shared statements (`users`) on
//! SQLite's pools. Every write that is audited is one `BEGIN IMMEDIATE` transaction on
//! the single writer, which already serialises it with every other write; the
//! housekeeping writes (touch, logout, prune) are one statement each.

use sqlx::{Sqlite, Transaction};

use super::StoreError;
use super::sqlite::SqliteStore;
use super::users::{self, ApiTokenRow, NewSession, SessionUser, TokenUser, UserRow, UsersDb};
use crate::auth::{CsrfSecret, PasswordHash, Role, Token, Username};

type Sql = users::UserSql<Sqlite>;

impl UsersDb for Sqlite {
    /// The single writer serialises changes; there is no row lock to take.
    const SELECT_USER_FOR_CHANGE: &'static str = users::SELECT_USER_BY_KEY;
}

impl SqliteStore {
    async fn begin_users_write(&self, op: &'static str) -> Result<Transaction<'_, Sqlite>, StoreError> {
        self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(StoreError::db(op))
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
        Sql::user_by_name(&self.reader, name).await
    }

    pub async fn users(&self) -> Result<Vec<UserRow>, StoreError> {
        Sql::users(&self.reader).await
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
        Sql::credentials(&self.reader, name).await
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
        Sql::session(&self.reader, digest, now_ms).await
    }

    pub async fn touch_session(&self, digest: &[u8; 32], now_ms: i64) -> Result<(), StoreError> {
        Sql::touch_session(&self.writer, digest, now_ms).await
    }

    pub async fn delete_session(&self, digest: &[u8; 32]) -> Result<bool, StoreError> {
        Sql::delete_session(&self.writer, digest).await
    }

    pub async fn delete_sessions_of(&self, user_id: i64) -> Result<u64, StoreError> {
        Sql::delete_sessions_of(&self.writer, user_id).await
    }

    pub async fn prune_expired_sessions(&self, now_ms: i64) -> Result<u64, StoreError> {
        Sql::prune_expired_sessions(&self.writer, now_ms).await
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
        Sql::api_token(&self.reader, digest, now_ms).await
    }

    pub async fn touch_api_token(&self, id: i64, now_ms: i64) -> Result<(), StoreError> {
        Sql::touch_api_token(&self.writer, id, now_ms).await
    }

    pub async fn revoke_api_token(&self, id: i64, actor: &str, now_ms: i64) -> Result<ApiTokenRow, StoreError> {
        Sql::revoke_api_token(self.begin_users_write("revoke_api_token").await?, id, actor, now_ms).await
    }

    pub async fn api_tokens(&self, owner: &Username) -> Result<Vec<ApiTokenRow>, StoreError> {
        Sql::api_tokens(&self.reader, owner).await
    }
}
