//! The page shown for a refused or failed request (403, 404, 500, …).

use askama::Template;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    status: u16,
    reason: &'a str,
    message: &'a str,
}

/// A minimal page naming the status and a message safe to show. It does not use the
/// chrome (no caller may be known), and it cannot fail to render.
pub fn page(status: StatusCode, message: &str) -> Response {
    let reason = status.canonical_reason().unwrap_or("Error");
    let html = ErrorPage { status: status.as_u16(), reason, message }
        .render()
        .unwrap_or_else(|_| format!("{} {reason}", status.as_u16()));
    (status, Html(html)).into_response()
}
