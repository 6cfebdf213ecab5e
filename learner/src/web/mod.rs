//! HTTP: the analysts' UI ([`pages`]) and the `/api/v1` JSON API the UI's scripts and
//! the CLI use. Built in one place by [`router`] and tested with `oneshot`.
//!
//! Everything but `/healthz`, `/login` and `/static/*` needs a session or an API token
//! ([`auth::authenticate`]); each handler names the least role it needs. Every answer
//! carries the security headers of [`security_headers`].

pub mod api;
pub mod assets;
pub mod auth;
pub mod explain;
pub mod graph;
pub mod pages;
pub mod policy;

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use tower_http::compression::CompressionLayer;

use crate::policy::PolicyService;
use crate::policy::graph_view::CoverageCache;
use crate::store::{EdgeMirror, Store};

pub use auth::AuthConfig;
pub use pages::login::LoginThrottle;

/// Everything handlers need.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Store,
    pub policy: PolicyService,
    pub auth: AuthConfig,
    pub login_throttle: Arc<LoginThrottle>,
    /// The service graph's policy decisions, kept while their inputs are unchanged.
    pub graph_coverage: Arc<CoverageCache>,
    /// The service graph's edges, kept in memory and brought up to date per read (SQLite).
    pub graph_edges: Arc<EdgeMirror>,
}

impl AppState {
    pub fn new(store: Store, policy: PolicyService, auth: AuthConfig) -> Self {
        Self {
            store,
            policy,
            auth,
            login_throttle: Arc::new(LoginThrottle::default()),
            graph_coverage: Arc::new(CoverageCache::default()),
            graph_edges: Arc::new(EdgeMirror::default()),
        }
    }

    /// State over `store` with default policy and auth settings and no inventory (tests).
    pub fn for_store(store: Store) -> Self {
        let policy = PolicyService::new(store.clone(), Default::default(), Default::default());
        Self::new(store, policy, AuthConfig::default())
    }
}

pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .nest("/api/v1", api::routes().merge(policy::routes()).merge(graph::routes()).merge(explain::routes()))
        .merge(pages::routes())
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::authenticate));
    Router::new()
        .merge(protected)
        .merge(pages::public_routes())
        .route("/static/{*path}", get(assets::serve))
        .route("/healthz", get(|| async { "ok" }))
        .layer(middleware::from_fn(security_headers))
        // Only when the client asks (Accept-Encoding); skips already small bodies and
        // server-sent events are excluded by content type.
        .layer(CompressionLayer::new())
        .with_state(state)
}

/// The Content-Security-Policy of every answer: our own scripts, styles and images
/// only — no inline script or style, no framing, forms post only to us. Label values
/// are attacker-controlled; should one ever slip past escaping, it still cannot run.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; font-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";

/// Adds the security headers to every answer (pages, API, assets, errors).
async fn security_headers(request: Request, next: Next) -> Response {
    let mut resp = next.run(request).await;
    let h = resp.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    h.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    h.insert("cross-origin-resource-policy", HeaderValue::from_static("same-origin"));
    h.insert("permissions-policy", HeaderValue::from_static("camera=(), microphone=(), geolocation=()"));
    resp
}
