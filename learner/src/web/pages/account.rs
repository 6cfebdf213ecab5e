//! `/account/password`: a user replaces their password — required before anything else
//! after logging in with a one-time password (the only kind an admin hands out).

use askama::Template;
use axum::Form;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::SET_COOKIE;
use axum::response::Response;
use serde::Deserialize;

use super::{Chrome, render, render_status};
use crate::auth;
use crate::grpc::ingest::unix_ms;
use crate::store::StoreError;
use crate::web::AppState;
use crate::web::auth::{Caller, Via, redirect_see_other, session_set_cookie};

#[derive(Template)]
#[template(path = "account_password.html")]
struct PasswordPage<'a> {
    chrome: Chrome,
    forced: bool,
    error: Option<&'a str>,
    min_chars: usize,
}

fn forced(caller: &Caller) -> bool {
    matches!(caller.via, Via::Session { must_change_password: true, .. })
}

/// GET /account/password.
pub async fn form(caller: Caller) -> Response {
    let page = PasswordPage {
        chrome: Chrome::new(&caller, ""),
        forced: forced(&caller),
        error: None,
        min_chars: auth::MIN_PASSWORD_CHARS,
    };
    render(&page)
}

#[derive(Debug, Deserialize)]
pub struct PasswordForm {
    #[serde(default)]
    current: String,
    #[serde(default)]
    new: String,
    #[serde(default)]
    confirm: String,
}

/// POST /account/password: checks the current password, sets the new one (which ends
/// every session of the user), and opens a fresh session for this browser.
pub async fn submit(State(state): State<AppState>, caller: Caller, Form(f): Form<PasswordForm>) -> Response {
    let refuse = |status: StatusCode, msg: &str| {
        let page = PasswordPage {
            chrome: Chrome::new(&caller, ""),
            forced: forced(&caller),
            error: Some(msg),
            min_chars: auth::MIN_PASSWORD_CHARS,
        };
        render_status(status, &page)
    };
    if f.new != f.confirm {
        return refuse(StatusCode::BAD_REQUEST, "The new passwords do not match.");
    }
    if f.new == f.current {
        return refuse(StatusCode::BAD_REQUEST, "Choose a password different from the current one.");
    }
    if let Err(err) = auth::check_password_policy(&f.new) {
        return refuse(StatusCode::BAD_REQUEST, &err.to_string());
    }
    match state.store.check_password(&caller.username, &f.current).await {
        Ok(_) => {}
        Err(StoreError::InvalidCredentials) => {
            return refuse(StatusCode::FORBIDDEN, "The current password is not right.");
        }
        Err(err) => {
            tracing::error!(error = %err, "Password check failed in the store.");
            return refuse(StatusCode::SERVICE_UNAVAILABLE, "The store is unavailable; try again.");
        }
    }
    let new = f.new;
    let hash = match tokio::task::spawn_blocking(move || auth::hash_password(&new)).await {
        Ok(Ok(h)) => h,
        Ok(Err(err)) => return refuse(StatusCode::BAD_REQUEST, &err.to_string()),
        Err(_) => return refuse(StatusCode::SERVICE_UNAVAILABLE, "Hashing failed; try again."),
    };
    let now = unix_ms();
    if let Err(err) = state.store.set_password(&caller.username, &hash, false, &caller.username, now).await {
        tracing::error!(error = %err, "Setting a password failed.");
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "The store is unavailable; try again.");
    }
    match state.store.create_session(caller.user_id, state.auth.session_ttl_ms, now).await {
        Ok(session) => {
            let mut resp = redirect_see_other("/");
            resp.headers_mut().append(SET_COOKIE, session_set_cookie(session.token.expose(), &state.auth));
            resp
        }
        Err(err) => {
            tracing::error!(error = %err, "Opening a session after a password change failed.");
            redirect_see_other("/login")
        }
    }
}
