//! Who is calling, and may they: the HTTP side of [`crate::auth`].
//!
//! Every route except `/healthz`, `/login` and `/static/*` goes through
//! [`authenticate`]. It accepts either an API token (`Authorization: Bearer bht_…`,
//! for the CLI and scripts) or the session cookie set by `/login` (browsers), and puts
//! the [`Caller`] in the request's extensions. Handlers then name the least role they
//! need with an extractor ([`Viewer`], [`Analyst`], [`Approver`], [`Admin`]), so the
//! requirement sits next to the code it guards and a route test can walk all of them.
//!
//! Browsers send cookies on their own, so a state-changing request that rides on a
//! session must also prove it came from one of our pages: a CSRF token from the page
//! (form field `csrf` or header `X-CSRF-Token`), checked here for every non-safe method
//! before any handler runs. Bearer tokens are never sent implicitly, so they need none.
//! A refused request is 401 (not logged in) or 403 (role, CSRF) — never a 500.

use std::marker::PhantomData;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, OriginalUri, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, COOKIE, HOST, LOCATION, ORIGIN};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::auth::{CsrfSecret, Role};
use crate::grpc::ingest::unix_ms;

/// The session cookie. `__Host-` would pin it to this origin, but browsers only accept
/// that prefix with `Secure`, which plain-HTTP demos cannot always use (see
/// [`AuthConfig::secure_cookies`]); `Path=/` and `SameSite=Strict` are set either way.
pub const SESSION_COOKIE: &str = "bulkhead_session";
/// Header carrying a CSRF token for `fetch` calls from our own scripts.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Form field carrying a CSRF token.
pub const CSRF_FIELD: &str = "csrf";
/// Largest form body the CSRF check buffers; forms are small.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// How sessions and cookies behave.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Mark cookies `Secure`. On by default; browsers keep secure cookies on
    /// `http://localhost` / `127.0.0.1` too, so only a plain-HTTP learner reached by
    /// another name needs this off.
    pub secure_cookies: bool,
    /// How long a login lasts.
    pub session_ttl_ms: i64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { secure_cookies: true, session_ttl_ms: 12 * 3600 * 1000 }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user_id: i64,
    pub username: String,
    pub role: Role,
    pub via: Via,
}

/// How the caller proved who they are.
#[derive(Debug, Clone)]
pub enum Via {
    /// A browser session: forms need its CSRF tokens.
    Session { csrf: CsrfSecret, must_change_password: bool },
    /// An API token (CLI, scripts).
    Token { token_id: i64 },
}

impl Caller {
    /// A fresh CSRF token for a form on the page being rendered (masked anew each
    /// time); empty for token callers, who never see pages.
    pub fn csrf_token(&self) -> String {
        match &self.via {
            Via::Session { csrf, .. } => csrf.token().unwrap_or_default(),
            Via::Token { .. } => String::new(),
        }
    }

    /// Whether the caller may do what needs `role`.
    pub fn may(&self, role: Role) -> bool {
        self.role.allows(role)
    }

    /// Refuses with 403 unless the caller has `role`.
    pub fn require(&self, role: Role) -> Result<(), Refusal> {
        if self.may(role) { Ok(()) } else { Err(Refusal::Role { needed: role, api: false }) }
    }

    /// The name the audit log records for this caller's decisions.
    pub fn actor(&self) -> &str {
        &self.username
    }
}

/// Why a request was refused. Rendered as JSON under `/api/`, as a page (or a redirect
/// to the login page) elsewhere.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// No (valid) credentials. `next`: where to return after logging in.
    Unauthenticated { api: bool, next: String },
    /// Logged in, but the role is too weak.
    Role { needed: Role, api: bool },
    /// A state-changing request without a valid CSRF token or from another origin.
    Csrf { api: bool },
    /// A one-time password must be replaced before anything else.
    PasswordChange { api: bool },
    /// The form body could not be read.
    BadForm { api: bool, why: String },
    /// The store failed while checking credentials.
    Unavailable { api: bool },
}

impl Refusal {
    fn status_and_message(&self) -> (StatusCode, String) {
        match self {
            Refusal::Unauthenticated { .. } => (StatusCode::UNAUTHORIZED, "log in first (session or API token)".into()),
            Refusal::Role { needed, .. } => {
                (StatusCode::FORBIDDEN, format!("this needs the {} role or higher", needed.as_str()))
            }
            Refusal::Csrf { .. } => {
                (StatusCode::FORBIDDEN, "missing or invalid CSRF token (reload the page and try again)".into())
            }
            Refusal::PasswordChange { .. } => {
                (StatusCode::FORBIDDEN, "choose a new password first (at /account/password)".into())
            }
            Refusal::BadForm { why, .. } => (StatusCode::BAD_REQUEST, why.clone()),
            Refusal::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "the store is unavailable".into()),
        }
    }

    fn api(&self) -> bool {
        match self {
            Refusal::Unauthenticated { api, .. }
            | Refusal::Role { api, .. }
            | Refusal::Csrf { api }
            | Refusal::PasswordChange { api }
            | Refusal::BadForm { api, .. }
            | Refusal::Unavailable { api } => *api,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, message) = self.status_and_message();
        if self.api() {
            let mut resp = (status, Json(serde_json::json!({ "error": message }))).into_response();
            if status == StatusCode::UNAUTHORIZED {
                resp.headers_mut().insert("www-authenticate", HeaderValue::from_static("Bearer realm=\"bulkhead\""));
            }
            return resp;
        }
        match self {
            Refusal::Unauthenticated { next, .. } => redirect_see_other(&login_location(&next)),
            Refusal::PasswordChange { .. } => redirect_see_other("/account/password"),
            _ => super::pages::error::page(status, &message),
        }
    }
}

/// A 303 to `location` (after a POST the browser follows with a GET).
pub fn redirect_see_other(location: &str) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(LOCATION, v);
    }
    resp
}

/// `/login?next=…` for a path the caller wanted.
fn login_location(next: &str) -> String {
    if next.is_empty() || next == "/" {
        return "/login".to_owned();
    }
    let encoded: String = form_urlencoded_component(next);
    format!("/login?next={encoded}")
}

fn form_urlencoded_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A local path to return to after login: must start with one `/` (no `//host`, no
/// scheme), so the login form cannot be used to send people elsewhere.
pub fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.starts_with("/\\")
                && !n.chars().any(|c| c.is_control())
                && n.len() <= 2048 =>
        {
            n.to_owned()
        }
        _ => "/".to_owned(),
    }
}

/// Whether the request is for the JSON API (refusals as JSON) rather than a page.
fn is_api(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/")
}

/// The session cookie's value, if the request carries one.
pub fn session_cookie(headers: &HeaderMap) -> Option<String> {
    cookie(headers, SESSION_COOKIE)
}

/// A cookie's value from the request's `Cookie` headers.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value.trim().to_owned())
}

/// `Set-Cookie` for a new session.
pub fn session_set_cookie(token: &str, cfg: &AuthConfig) -> HeaderValue {
    let max_age = cfg.session_ttl_ms / 1000;
    let secure = if cfg.secure_cookies { "; Secure" } else { "" };
    let cookie = format!("{SESSION_COOKIE}={token}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}");
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `Set-Cookie` that removes the session cookie.
pub fn session_clear_cookie(cfg: &AuthConfig) -> HeaderValue {
    let secure = if cfg.secure_cookies { "; Secure" } else { "" };
    let cookie = format!("{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict{secure}");
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Paths a session with a one-time password may still reach.
fn allowed_before_password_change(path: &str) -> bool {
    matches!(path, "/account/password" | "/logout")
}

/// The authentication middleware (see the module docs).
pub async fn authenticate(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let api = is_api(&path);
    let next_path = request.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
    let now = unix_ms();

    let caller = match identify(&state, request.headers(), now, api).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            let next = if request.method() == Method::GET { next_path } else { String::new() };
            return Refusal::Unauthenticated { api, next }.into_response();
        }
        Err(r) => return r.into_response(),
    };

    let mut request = request;
    if let Via::Session { csrf, must_change_password } = &caller.via {
        if *must_change_password && !allowed_before_password_change(&path) {
            return Refusal::PasswordChange { api }.into_response();
        }
        if !is_safe(request.method()) {
            request = match check_csrf(request, csrf, api).await {
                Ok(r) => r,
                Err(refusal) => {
                    tracing::warn!(user = %caller.username, path = %path, "Refused a request without a valid CSRF token.");
                    return refusal.into_response();
                }
            };
        }
    }
    request.extensions_mut().insert(caller);
    let mut resp = next.run(request).await;
    // Pages and API answers are per user: never cached by the browser or a proxy.
    resp.headers_mut().entry("cache-control").or_insert(HeaderValue::from_static("no-store"));
    resp
}

/// The caller named by a bearer token or the session cookie. A bearer header that does
/// not verify is a refusal (no fallback to the cookie), so a script with a revoked
/// token fails loudly instead of acting as whoever is logged in.
async fn identify(state: &AppState, headers: &HeaderMap, now: i64, api: bool) -> Result<Option<Caller>, Refusal> {
    if let Some(auth) = headers.get(AUTHORIZATION) {
        let token = auth.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).map(str::trim).unwrap_or("");
        return match state.store.api_token(token, now).await {
            Ok(Some(t)) => Ok(Some(Caller {
                user_id: t.user_id,
                username: t.username,
                role: t.role,
                via: Via::Token { token_id: t.token_id },
            })),
            Ok(None) => Ok(None),
            Err(err) => {
                tracing::error!(error = %err, "Checking an API token failed.");
                Err(Refusal::Unavailable { api })
            }
        };
    }
    let Some(cookie) = session_cookie(headers) else { return Ok(None) };
    match state.store.session(&cookie, now).await {
        Ok(Some(s)) => Ok(Some(Caller {
            user_id: s.user_id,
            username: s.username,
            role: s.role,
            via: Via::Session { csrf: s.csrf, must_change_password: s.must_change_password },
        })),
        Ok(None) => Ok(None),
        Err(err) => {
            tracing::error!(error = %err, "Checking a session failed.");
            Err(Refusal::Unavailable { api })
        }
    }
}

fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Checks a state-changing session request: same origin (when the browser says), and a
/// CSRF token in the header or — for urlencoded forms — the `csrf` field. The body is
/// buffered for that (bounded) and handed on unchanged.
async fn check_csrf(request: Request, csrf: &CsrfSecret, api: bool) -> Result<Request, Refusal> {
    if !same_origin(request.headers()) {
        return Err(Refusal::Csrf { api });
    }
    if let Some(token) = request.headers().get(CSRF_HEADER).and_then(|v| v.to_str().ok()) {
        return if csrf.verify(token) { Ok(request) } else { Err(Refusal::Csrf { api }) };
    }
    let is_form = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return Err(Refusal::Csrf { api });
    }
    let (parts, body) = request.into_parts();
    let bytes: Bytes = axum::body::to_bytes(body, MAX_FORM_BYTES)
        .await
        .map_err(|_| Refusal::BadForm { api, why: format!("form bodies are limited to {MAX_FORM_BYTES} bytes") })?;
    let valid = form_field(&bytes, CSRF_FIELD).is_some_and(|t| csrf.verify(&t));
    if !valid {
        return Err(Refusal::Csrf { api });
    }
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// The first value of `name` in an urlencoded body.
fn form_field(body: &[u8], name: &str) -> Option<String> {
    serde_urlencoded_pairs(body).into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

fn serde_urlencoded_pairs(body: &[u8]) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body).unwrap_or_default()
}

/// `Origin`, when present, must name the host the request was sent to. Browsers send
/// it on every cross-site POST, so a forged form from elsewhere fails here even before
/// the token check.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(ORIGIN).and_then(|v| v.to_str().ok()) else { return true };
    let Some(host) = headers.get(HOST).and_then(|v| v.to_str().ok()) else { return false };
    let authority = origin.split_once("://").map(|(_, rest)| rest).unwrap_or("");
    authority.eq_ignore_ascii_case(host)
}

// === extractors ===

/// The caller, for any authenticated route.
impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let api = request_is_api(parts);
        parts.extensions.get::<Caller>().cloned().ok_or(Refusal::Unauthenticated { api, next: String::new() })
    }
}

fn request_is_api(parts: &Parts) -> bool {
    let path = parts.extensions.get::<OriginalUri>().map(|u| u.0.path().to_owned());
    is_api(path.as_deref().unwrap_or_else(|| parts.uri.path()))
}

/// A least role, as a type.
pub trait RoleBound {
    const ROLE: Role;
}

/// A caller with at least `R`'s role; 403 otherwise.
#[derive(Debug, Clone)]
pub struct AtLeast<R: RoleBound>(pub Caller, PhantomData<R>);

impl<R: RoleBound> std::ops::Deref for AtLeast<R> {
    type Target = Caller;
    fn deref(&self) -> &Caller {
        &self.0
    }
}

impl<S: Send + Sync, R: RoleBound + Send + Sync> FromRequestParts<S> for AtLeast<R> {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let api = request_is_api(parts);
        let caller = Caller::from_request_parts(parts, state).await?;
        if !caller.may(R::ROLE) {
            return Err(Refusal::Role { needed: R::ROLE, api });
        }
        Ok(AtLeast(caller, PhantomData))
    }
}

macro_rules! role_bound {
    ($marker:ident, $alias:ident, $role:expr, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Copy)]
        pub struct $marker;
        impl RoleBound for $marker {
            const ROLE: Role = $role;
        }
        #[doc = $doc]
        pub type $alias = AtLeast<$marker>;
    };
}

role_bound!(ViewerRole, Viewer, Role::Viewer, "Reads: any logged-in user.");
role_bound!(AnalystRole, Analyst, Role::Analyst, "Synthesizes, simulates, rejects, moves learn ↔ monitor.");
role_bound!(ApproverRole, Approver, Role::Approver, "Approves proposals; moves workloads into or out of enforce.");
role_bound!(AdminRole, Admin, Role::Admin, "Manages users and tokens.");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_must_stay_on_this_site() {
        assert_eq!(safe_next(Some("/proposals?status=pending")), "/proposals?status=pending");
        assert_eq!(safe_next(Some("//evil.example/")), "/");
        assert_eq!(safe_next(Some("/\\evil.example")), "/");
        assert_eq!(safe_next(Some("https://evil.example/")), "/");
        assert_eq!(safe_next(Some("/a\nb")), "/");
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn login_redirect_keeps_the_wanted_path() {
        assert_eq!(login_location("/"), "/login");
        assert_eq!(login_location("/flows?ns=a b"), "/login?next=/flows%3Fns%3Da%20b");
    }

    #[test]
    fn session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_static("theme=dark; bulkhead_session=bhs_abc ; x=1"));
        assert_eq!(session_cookie(&h).as_deref(), Some("bhs_abc"));
        h.insert(COOKIE, HeaderValue::from_static("bulkhead_sessionx=1"));
        assert_eq!(session_cookie(&h), None);
    }

    #[test]
    fn origin_must_match_host_when_sent() {
        let mut h = HeaderMap::new();
        assert!(same_origin(&h), "no Origin: same-origin GET forms and non-browser clients");
        h.insert(HOST, HeaderValue::from_static("127.0.0.1:7480"));
        h.insert(ORIGIN, HeaderValue::from_static("http://127.0.0.1:7480"));
        assert!(same_origin(&h));
        h.insert(ORIGIN, HeaderValue::from_static("http://evil.example"));
        assert!(!same_origin(&h));
        h.insert(ORIGIN, HeaderValue::from_static("null"));
        assert!(!same_origin(&h));
    }

    #[test]
    fn cookies_carry_the_flags() {
        let cfg = AuthConfig::default();
        let v = session_set_cookie("bhs_x", &cfg);
        let s = v.to_str().unwrap_or_default();
        for flag in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
            assert!(s.contains(flag), "{s} lacks {flag}");
        }
        let insecure = AuthConfig { secure_cookies: false, ..cfg };
        assert!(!session_set_cookie("bhs_x", &insecure).to_str().unwrap_or_default().contains("Secure"));
    }
}
