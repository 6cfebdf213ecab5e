//! `/login` and `/logout`.
//!
//! Login CSRF: the form carries a random value that must equal a short-lived
//! `SameSite=Strict` cookie set with the form, so another site cannot log a victim into
//! the attacker's account. Failed and successful attempts alike count against a
//! per-user and a per-address budget ([`LoginThrottle`]); past it the answer is 429
//! whatever the password, so guessing is slow even across many addresses.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;

use askama::Template;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::header::SET_COOKIE;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::{Extension, Form};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Deserialize;

use super::{render, render_status};
use crate::auth::{self, Token};
use crate::grpc::ingest::unix_ms;
use crate::store::StoreError;
use crate::web::AppState;
use crate::web::auth::session_set_cookie;
use crate::web::auth::{Caller, cookie, redirect_see_other, safe_next, session_clear_cookie, session_cookie};

/// The login form's anti-CSRF cookie.
const LOGIN_COOKIE: &str = "bulkhead_login";
/// How long a login form stays usable.
const LOGIN_FORM_SECONDS: u32 = 600;
/// Longest username or password read from the form.
const MAX_FIELD_CHARS: usize = 1024;

/// Login attempt budgets. `governor`'s keyed limiters grow with the number of keys, so
/// [`LoginThrottle::forget_idle`] drops keys whose budget is full again (run with the
/// session pruning).
#[derive(Debug)]
pub struct LoginThrottle {
    per_user: DefaultKeyedRateLimiter<String>,
    per_address: DefaultKeyedRateLimiter<IpAddr>,
}

impl Default for LoginThrottle {
    fn default() -> Self {
        Self::new(5, 20)
    }
}

impl LoginThrottle {
    /// Bursts of `user_burst` attempts per username and `address_burst` per client
    /// address, refilled at one attempt every 20 s and 3 s respectively.
    pub fn new(user_burst: u32, address_burst: u32) -> Self {
        let user = Quota::with_period(std::time::Duration::from_secs(20))
            .unwrap_or_else(|| Quota::per_minute(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(user_burst).unwrap_or(NonZeroU32::MIN));
        let address = Quota::with_period(std::time::Duration::from_secs(3))
            .unwrap_or_else(|| Quota::per_minute(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(address_burst).unwrap_or(NonZeroU32::MIN));
        Self { per_user: RateLimiter::keyed(user), per_address: RateLimiter::keyed(address) }
    }

    /// Takes one attempt from both budgets; false when either is spent.
    fn allow(&self, username_key: &str, address: Option<IpAddr>) -> bool {
        let user_ok = self.per_user.check_key(&username_key.to_owned()).is_ok();
        let address_ok = address.is_none_or(|a| self.per_address.check_key(&a).is_ok());
        user_ok && address_ok
    }

    /// Forgets keys whose budgets are full again.
    pub fn forget_idle(&self) {
        self.per_user.retain_recent();
        self.per_address.retain_recent();
    }
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage<'a> {
    next: &'a str,
    form_token: &'a str,
    username: &'a str,
    error: Option<&'a str>,
}

#[derive(Debug, Deserialize)]
pub struct NextParam {
    next: Option<String>,
}

/// GET /login.
pub async fn form(State(state): State<AppState>, Query(q): Query<NextParam>) -> Response {
    let next = safe_next(q.next.as_deref());
    login_form(&state, &next, "", None, StatusCode::OK)
}

fn login_form(state: &AppState, next: &str, username: &str, error: Option<&str>, status: StatusCode) -> Response {
    let Ok(form_token) = Token::session().map(|t| t.expose().to_owned()) else {
        return super::error::page(StatusCode::SERVICE_UNAVAILABLE, "no randomness available");
    };
    let page = LoginPage { next, form_token: &form_token, username, error };
    let mut resp = if status == StatusCode::OK { render(&page) } else { render_status(status, &page) };
    let secure = if state.auth.secure_cookies { "; Secure" } else { "" };
    let cookie = format!(
        "{LOGIN_COOKIE}={form_token}; Path=/login; Max-Age={LOGIN_FORM_SECONDS}; HttpOnly; SameSite=Strict{secure}"
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().append(SET_COOKIE, v);
    }
    resp
}

#[derive(Debug, Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    next: Option<String>,
    #[serde(default)]
    form_token: String,
}

/// POST /login.
pub async fn submit(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let next = safe_next(f.next.as_deref());
    let username: String = f.username.chars().take(MAX_FIELD_CHARS).collect();
    let expected = cookie(&headers, LOGIN_COOKIE);
    if f.form_token.is_empty() || expected.as_deref() != Some(f.form_token.as_str()) {
        return login_form(
            &state,
            &next,
            &username,
            Some("The form expired; please log in again."),
            StatusCode::FORBIDDEN,
        );
    }
    let address = peer.map(|Extension(ConnectInfo(a))| a.ip());
    if !state.login_throttle.allow(&auth::username_key(&username), address) {
        tracing::warn!(user = ?username.chars().take(64).collect::<String>(), ?address, "Login throttled.");
        return login_form(
            &state,
            &next,
            &username,
            Some("Too many login attempts; wait a minute and try again."),
            StatusCode::TOO_MANY_REQUESTS,
        );
    }
    if f.password.chars().count() > MAX_FIELD_CHARS {
        return login_form(&state, &next, &username, Some("Invalid username or password."), StatusCode::UNAUTHORIZED);
    }
    match state.store.login(&username, &f.password, state.auth.session_ttl_ms, unix_ms()).await {
        Ok(session) => {
            let target = if session.user.must_change_password { "/account/password".to_owned() } else { next };
            let mut resp = redirect_see_other(&target);
            resp.headers_mut().append(SET_COOKIE, session_set_cookie(session.token.expose(), &state.auth));
            resp
        }
        Err(StoreError::InvalidCredentials) => {
            login_form(&state, &next, &username, Some("Invalid username or password."), StatusCode::UNAUTHORIZED)
        }
        Err(err) => {
            tracing::error!(error = %err, "Login failed in the store.");
            login_form(
                &state,
                &next,
                &username,
                Some("The store is unavailable; try again."),
                StatusCode::SERVICE_UNAVAILABLE,
            )
        }
    }
}

/// POST /logout (CSRF-checked like every form): ends the session.
pub async fn logout(State(state): State<AppState>, caller: Caller, headers: HeaderMap) -> Response {
    if let Some(token) = session_cookie(&headers) {
        if let Err(err) = state.store.delete_session(&token).await {
            tracing::error!(error = %err, "Ending a session failed.");
            return super::error::page(StatusCode::SERVICE_UNAVAILABLE, "the store is unavailable");
        }
        tracing::info!(user = %caller.username, "Logged out.");
    }
    let mut resp = redirect_see_other("/login");
    resp.headers_mut().append(SET_COOKIE, session_clear_cookie(&state.auth));
    resp
}
