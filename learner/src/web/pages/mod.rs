//! The analysts' web UI: one handler file per page, each with its own askama template
//! struct (templates in `ui/templates/`, extending `_layout.html`). Pages read the
//! store through the same methods as `/api/v1`; no SQL here. Askama escapes every
//! value, which matters: label values and names come from workloads and agents.

pub mod account;
pub mod audit;
pub mod error;
pub mod flows;
pub mod graph;
pub mod login;
pub mod overview;
pub mod proposals;
pub mod rollout;
pub mod users;
pub mod workloads;

use askama::Template;
use axum::Router;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};

use super::AppState;
use super::auth::Caller;
use crate::auth::Role;

/// Routes reachable without logging in.
pub fn public_routes() -> Router<AppState> {
    Router::new().route("/login", get(login::form).post(login::submit))
}

/// Routes behind [`super::auth::authenticate`].
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/logout", post(login::logout))
        .route("/account/password", get(account::form).post(account::submit))
        // Each page file owns its sub-routes (forms, data for its scripts).
        .route("/", get(overview::page))
        .route("/flows", get(flows::page))
        .route("/flows/tail", get(flows::tail))
        .route("/workloads", get(workloads::page))
        .route("/workloads/{id}", get(workloads::detail))
        .route("/audit", get(audit::page))
        .route("/users", get(users::page).post(users::create))
        .route("/users/{id}/role", post(users::set_role))
        .route("/users/{id}/password", post(users::reset_password))
        .route("/users/{id}/disabled", post(users::set_disabled))
        .route("/users/{id}/tokens", get(users::tokens))
        .route("/users/{id}/tokens/{token}/revoke", post(users::revoke_token))
        .route("/graph", get(graph::page))
        .route("/proposals", get(proposals::page))
        .route("/proposals/{id}", get(proposals::detail))
        .route("/proposals/{id}/approve", post(proposals::approve))
        .route("/proposals/{id}/reject", post(proposals::reject))
        .route("/rollout", get(rollout::page).post(rollout::submit))
}

/// One entry of the navigation bar.
#[derive(Debug, Clone)]
pub struct NavItem {
    pub href: &'static str,
    pub label: &'static str,
    pub active: bool,
}

/// What every logged-in page shows around its content: navigation, who is logged in,
/// and the logout form (which needs a CSRF token like any other form).
#[derive(Debug, Clone)]
pub struct Chrome {
    pub username: String,
    pub role: &'static str,
    pub csrf: String,
    pub nav: Vec<NavItem>,
}

/// The pages in the navigation bar, and the least role that sees each.
const NAV: &[(&str, &str, Role)] = &[
    ("/", "Overview", Role::Viewer),
    ("/flows", "Flows", Role::Viewer),
    ("/graph", "Service graph", Role::Viewer),
    ("/workloads", "Workloads", Role::Viewer),
    ("/proposals", "Proposals", Role::Viewer),
    ("/rollout", "Rollout", Role::Viewer),
    ("/audit", "Audit log", Role::Viewer),
    ("/users", "Users", Role::Admin),
];

impl Chrome {
    /// The chrome for `caller` on the page at `active` (one of the navigation paths).
    pub fn new(caller: &Caller, active: &str) -> Self {
        let nav = NAV
            .iter()
            .filter(|(_, _, role)| caller.may(*role))
            .map(|(href, label, _)| NavItem { href, label, active: *href == active })
            .collect();
        Self { username: caller.username.clone(), role: caller.role.as_str(), csrf: caller.csrf_token(), nav }
    }
}

/// Renders a template as a 200 page; a template error is logged and shown as a 500
/// page without details.
pub fn render<T: Template>(template: &T) -> Response {
    render_status(StatusCode::OK, template)
}

/// [`render`] with another status (e.g. 401 for a failed login).
pub fn render_status<T: Template>(status: StatusCode, template: &T) -> Response {
    match template.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(err) => {
            tracing::error!(error = %err, "Rendering a page failed.");
            error::page(StatusCode::INTERNAL_SERVER_ERROR, "the page could not be rendered")
        }
    }
}
