//! Placeholder: the proposals page is being built (issue 5).

use axum::http::StatusCode;
use axum::response::Response;

use crate::web::auth::Viewer;

/// GET placeholder.
pub async fn page(_: Viewer) -> Response {
    super::error::page(StatusCode::NOT_IMPLEMENTED, "this page is not built yet")
}
