//! `/users` (admins only): list users with their role and state; create a user (the
//! one-time password is shown once, on the answer to the form, and stored only as an
//! argon2 hash); change a role; reset a password (a new one-time password, every session
//! of the user ends); disable / enable; list a user's API tokens and revoke them.
//!
//! Every change is audited by the store with the admin's username as the actor. A
//! change that would leave no enabled admin — demoting or disabling the last one,
//! oneself included — is refused with 409 (checked in the same transaction as the
//! change, so two admins demoting each other at once cannot both succeed).

use askama::Template;
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;

use super::overview::show::{self, Choice};
use super::{Chrome, render, render_status};
use crate::auth::{self, Role};
use crate::grpc::ingest::unix_ms;
use crate::store::{ApiTokenRow, KeepAdmin, StoreError, UserRow};
use crate::web::AppState;
use crate::web::auth::{Admin, Caller, redirect_see_other};

/// Shown when a change would leave no enabled admin.
const LAST_ADMIN: &str = "Refused: this would leave no enabled admin. Make another user an admin first.";

struct UserLine {
    id: i64,
    username: String,
    roles: Vec<Choice>,
    disabled: bool,
    must_change_password: bool,
    created: String,
    updated: String,
    is_self: bool,
}

#[derive(Template)]
#[template(path = "users.html")]
struct UsersPage {
    chrome: Chrome,
    notice: Option<String>,
    error: Option<String>,
    users: Vec<UserLine>,
    roles: Vec<Choice>,
    new_username: String,
    min_chars: usize,
}

#[derive(Template)]
#[template(path = "users_password.html")]
struct PasswordPage {
    chrome: Chrome,
    username: String,
    created: bool,
    password: String,
}

struct TokenLine {
    id: i64,
    name: String,
    created: String,
    last_used: String,
    expires: String,
    state: &'static str,
    state_class: &'static str,
    live: bool,
}

#[derive(Template)]
#[template(path = "users_tokens.html")]
struct TokensPage {
    chrome: Chrome,
    user_id: i64,
    username: String,
    notice: Option<String>,
    tokens: Vec<TokenLine>,
}

fn role_choices(current: Role) -> Vec<Choice> {
    Role::ALL
        .into_iter()
        .map(|r| Choice { value: r.as_str().to_owned(), label: r.as_str().to_owned(), selected: r == current })
        .collect()
}

fn line(u: UserRow, caller: &Caller) -> UserLine {
    UserLine {
        id: u.id,
        roles: role_choices(u.role),
        disabled: u.disabled,
        must_change_password: u.must_change_password,
        created: show::time(u.created_unix_ms),
        updated: show::time(u.updated_unix_ms),
        is_self: u.id == caller.user_id,
        username: u.username,
    }
}

/// The user list, with a notice or an error, as a `status` page.
async fn list(
    state: &AppState,
    caller: &Caller,
    status: StatusCode,
    notice: Option<String>,
    error: Option<String>,
    new_username: &str,
) -> Response {
    let users = match state.store.users().await {
        Ok(u) => u,
        Err(err) => return show::store_failed("users", err),
    };
    let page = UsersPage {
        chrome: Chrome::new(caller, "/users"),
        notice,
        error,
        users: users.into_iter().map(|u| line(u, caller)).collect(),
        roles: role_choices(Role::Viewer),
        new_username: new_username.to_owned(),
        min_chars: auth::MIN_PASSWORD_CHARS,
    };
    render_status(status, &page)
}

/// The user with this id, or the answer to send instead.
async fn user_by_id(state: &AppState, caller: &Caller, id: i64) -> Result<UserRow, Response> {
    match state.store.users().await {
        Ok(users) => match users.into_iter().find(|u| u.id == id) {
            Some(u) => Ok(u),
            None => Err(list(state, caller, StatusCode::NOT_FOUND, None, Some("No such user.".into()), "").await),
        },
        Err(err) => Err(show::store_failed("users", err)),
    }
}

/// A store refusal as the page's error and status; other failures as a 503.
async fn refused(state: &AppState, caller: &Caller, err: StoreError, username: &str) -> Response {
    let (status, message) = match &err {
        StoreError::UserExists { .. } => (StatusCode::CONFLICT, err.to_string()),
        StoreError::UserNotFound { .. } => (StatusCode::NOT_FOUND, err.to_string()),
        StoreError::InvalidUsername { .. } => (StatusCode::BAD_REQUEST, err.to_string()),
        _ => return show::store_failed("users", err),
    };
    list(state, caller, status, None, Some(capitalised(&message)), username).await
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_uppercase().chain(c).collect::<String>() + ".",
        None => String::new(),
    }
}

/// A fresh one-time password and its hash, made off the async runtime (argon2 is slow
/// on purpose).
async fn one_time_password() -> Result<(String, auth::PasswordHash), String> {
    let made = tokio::task::spawn_blocking(|| {
        let password = auth::one_time_password()?;
        let hash = auth::hash_password(&password)?;
        Ok::<_, auth::AuthError>((password, hash))
    })
    .await;
    match made {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(err)) => Err(err.to_string()),
        Err(err) => Err(err.to_string()),
    }
}

// === handlers ===

#[derive(Debug, Deserialize)]
pub struct UsersParams {
    /// What the last change did (after its redirect): `role`, `disabled`, `enabled`.
    done: Option<String>,
    user: Option<String>,
}

/// GET /users.
pub async fn page(caller: Admin, State(state): State<AppState>, Query(p): Query<UsersParams>) -> Response {
    let mut notice = None;
    if let (Some(done), Some(id)) = (show::field(&p.done), show::field(&p.user).and_then(|s| s.parse::<i64>().ok()))
        && let Ok(Some(u)) = state.store.users().await.map(|us| us.into_iter().find(|u| u.id == id))
    {
        notice = match done {
            "role" => Some(format!("{} is now {}.", u.username, u.role)),
            "disabled" => {
                Some(format!("Disabled {}: their sessions ended and their API tokens stopped working.", u.username))
            }
            "enabled" => Some(format!("Enabled {}.", u.username)),
            _ => None,
        };
    }
    list(&state, &caller, StatusCode::OK, notice, None, "").await
}

#[derive(Debug, Deserialize)]
pub struct CreateForm {
    #[serde(default)]
    username: String,
    #[serde(default)]
    role: String,
}

/// POST /users: creates a user with a one-time password and shows it, once.
pub async fn create(caller: Admin, State(state): State<AppState>, Form(f): Form<CreateForm>) -> Response {
    let username = f.username.trim();
    let Ok(role) = f.role.parse::<Role>() else {
        let msg = "Choose a role: viewer, analyst, approver or admin.".to_owned();
        return list(&state, &caller, StatusCode::BAD_REQUEST, None, Some(msg), username).await;
    };
    let (password, hash) = match one_time_password().await {
        Ok(v) => v,
        Err(err) => {
            tracing::error!(error = %err, "Making a one-time password failed.");
            return super::error::page(StatusCode::SERVICE_UNAVAILABLE, "could not make a password; try again");
        }
    };
    match state.store.create_user(username, role, &hash, true, caller.actor(), unix_ms()).await {
        Ok(user) => {
            let page = PasswordPage {
                chrome: Chrome::new(&caller, "/users"),
                username: user.username,
                created: true,
                password,
            };
            render_status(StatusCode::CREATED, &page)
        }
        Err(err) => refused(&state, &caller, err, username).await,
    }
}

#[derive(Debug, Deserialize)]
pub struct RoleForm {
    #[serde(default)]
    role: String,
}

/// POST /users/{id}/role.
pub async fn set_role(
    caller: Admin,
    State(state): State<AppState>,
    Path(id): Path<i64>,
    Form(f): Form<RoleForm>,
) -> Response {
    let user = match user_by_id(&state, &caller, id).await {
        Ok(u) => u,
        Err(resp) => return resp,
    };
    let Ok(role) = f.role.parse::<Role>() else {
        let msg = "Choose a role: viewer, analyst, approver or admin.".to_owned();
        return list(&state, &caller, StatusCode::BAD_REQUEST, None, Some(msg), "").await;
    };
    match state.store.set_role_keeping_admin(&user.username, role, caller.actor(), unix_ms()).await {
        Ok(KeepAdmin::Done(u)) => redirect_see_other(&format!("/users?done=role&user={}", u.id)),
        Ok(KeepAdmin::LastAdmin) => {
            list(&state, &caller, StatusCode::CONFLICT, None, Some(LAST_ADMIN.into()), "").await
        }
        Err(err) => refused(&state, &caller, err, "").await,
    }
}

#[derive(Debug, Deserialize)]
pub struct DisabledForm {
    #[serde(default)]
    disabled: String,
}

/// POST /users/{id}/disabled (`disabled=true` or `false`).
pub async fn set_disabled(
    caller: Admin,
    State(state): State<AppState>,
    Path(id): Path<i64>,
    Form(f): Form<DisabledForm>,
) -> Response {
    let user = match user_by_id(&state, &caller, id).await {
        Ok(u) => u,
        Err(resp) => return resp,
    };
    let disabled = match f.disabled.as_str() {
        "true" => true,
        "false" => false,
        _ => {
            let msg = "Say whether to disable (true) or enable (false).".to_owned();
            return list(&state, &caller, StatusCode::BAD_REQUEST, None, Some(msg), "").await;
        }
    };
    match state.store.set_disabled_keeping_admin(&user.username, disabled, caller.actor(), unix_ms()).await {
        Ok(KeepAdmin::Done(u)) => {
            let done = if disabled { "disabled" } else { "enabled" };
            redirect_see_other(&format!("/users?done={done}&user={}", u.id))
        }
        Ok(KeepAdmin::LastAdmin) => {
            list(&state, &caller, StatusCode::CONFLICT, None, Some(LAST_ADMIN.into()), "").await
        }
        Err(err) => refused(&state, &caller, err, "").await,
    }
}

/// POST /users/{id}/password: a new one-time password, shown once; the user's sessions
/// end and they must choose their own password at their next login.
pub async fn reset_password(caller: Admin, State(state): State<AppState>, Path(id): Path<i64>) -> Response {
    let user = match user_by_id(&state, &caller, id).await {
        Ok(u) => u,
        Err(resp) => return resp,
    };
    let (password, hash) = match one_time_password().await {
        Ok(v) => v,
        Err(err) => {
            tracing::error!(error = %err, "Making a one-time password failed.");
            return super::error::page(StatusCode::SERVICE_UNAVAILABLE, "could not make a password; try again");
        }
    };
    match state.store.set_password(&user.username, &hash, true, caller.actor(), unix_ms()).await {
        Ok(u) => render(&PasswordPage {
            chrome: Chrome::new(&caller, "/users"),
            username: u.username,
            created: false,
            password,
        }),
        Err(err) => refused(&state, &caller, err, "").await,
    }
}

fn token_line(t: ApiTokenRow, now: i64) -> TokenLine {
    let expired = t.expires_unix_ms.is_some_and(|e| e <= now);
    let (state, state_class) = match (t.revoked_unix_ms, expired) {
        (Some(_), _) => ("revoked", "verdict-nopolicy"),
        (None, true) => ("expired", "verdict-audit"),
        (None, false) => ("live", "verdict-allowed"),
    };
    TokenLine {
        id: t.id,
        created: show::time(t.created_unix_ms),
        last_used: show::time_opt(t.last_used_unix_ms),
        expires: t.expires_unix_ms.map_or_else(|| "never".to_owned(), show::time),
        live: state == "live",
        state,
        state_class,
        name: t.name,
    }
}

#[derive(Debug, Deserialize)]
pub struct TokensParams {
    revoked: Option<String>,
}

/// GET /users/{id}/tokens.
pub async fn tokens(
    caller: Admin,
    State(state): State<AppState>,
    Path(id): Path<i64>,
    Query(p): Query<TokensParams>,
) -> Response {
    let user = match user_by_id(&state, &caller, id).await {
        Ok(u) => u,
        Err(resp) => return resp,
    };
    let rows = match state.store.api_tokens(&user.username).await {
        Ok(t) => t,
        Err(err) => return show::store_failed("users", err),
    };
    let now = unix_ms();
    let notice = show::field(&p.revoked).and_then(|r| {
        let id = r.parse::<i64>().ok()?;
        rows.iter().find(|t| t.id == id).map(|t| format!("Revoked token {:?}.", t.name))
    });
    let page = TokensPage {
        chrome: Chrome::new(&caller, "/users"),
        user_id: user.id,
        username: user.username,
        notice,
        tokens: rows.into_iter().map(|t| token_line(t, now)).collect(),
    };
    render(&page)
}

/// POST /users/{id}/tokens/{token}/revoke.
pub async fn revoke_token(
    caller: Admin,
    State(state): State<AppState>,
    Path((id, token)): Path<(i64, i64)>,
) -> Response {
    let user = match user_by_id(&state, &caller, id).await {
        Ok(u) => u,
        Err(resp) => return resp,
    };
    let owned = match state.store.api_tokens(&user.username).await {
        Ok(t) => t.iter().any(|t| t.id == token),
        Err(err) => return show::store_failed("users", err),
    };
    if !owned {
        return super::error::page(StatusCode::NOT_FOUND, "this user has no such token");
    }
    match state.store.revoke_api_token(token, caller.actor(), unix_ms()).await {
        Ok(_) => redirect_see_other(&format!("/users/{id}/tokens?revoked={token}")),
        Err(StoreError::ApiTokenNotFound { .. }) => {
            super::error::page(StatusCode::CONFLICT, "this token is already revoked")
        }
        Err(err) => show::store_failed("users", err),
    }
}
