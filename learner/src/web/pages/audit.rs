//! `/audit`: the append-only audit log — every approval, rejection, deployment, mode
//! change, login and user change — filterable by actor, action prefix, subject and
//! time, paged by id (keyset), with the result of re-checking its hash chain.

use askama::Template;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;

use super::overview::show;
use super::{Chrome, render, render_status};
use crate::store::{AuditQuery, AuditRow, StoreError};
use crate::web::AppState;
use crate::web::auth::Viewer;

/// Entries per page.
const PAGE: u32 = 100;

#[derive(Debug, Deserialize)]
pub struct AuditParams {
    actor: Option<String>,
    /// Action prefix: `proposal.` for every proposal event.
    action: Option<String>,
    subject: Option<String>,
    since: Option<String>,
    until: Option<String>,
    before: Option<String>,
    /// `1`: verify the whole hash chain (reads every entry, so only on request).
    verify: Option<String>,
}

/// Common action families for the filter's suggestions.
const ACTION_SUGGESTIONS: &[&str] = &[
    "proposal.",
    "proposal.approve",
    "proposal.reject",
    "proposal.deploy",
    "rollout.mode",
    "session.login",
    "user.",
    "token.",
    "cluster_policies.import",
];

/// What the chain check found.
enum Chain {
    Verified {
        entries: u64,
    },
    Broken {
        id: i64,
        why: String,
    },
    Unknown,
    /// Not checked on this load: verifying reads the whole log.
    NotChecked {
        href: String,
    },
}

struct Entry {
    id: i64,
    at: String,
    actor: String,
    action: String,
    subject: String,
    /// A page for the subject (`proposal:7` → `/proposals/7`, `identity:300` →
    /// `/workloads/300`), when there is one.
    subject_href: Option<String>,
    detail: String,
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    chrome: Chrome,
    error: Option<String>,
    actor: String,
    action: String,
    subject: String,
    since: String,
    until: String,
    actions: &'static [&'static str],
    chain: Chain,
    entries: Vec<Entry>,
    older: Option<String>,
    newest: Option<String>,
}

/// A link for subjects naming something with a page.
fn subject_href(subject: &str) -> Option<String> {
    let (kind, id) = subject.split_once(':')?;
    let digits = !id.is_empty() && id.len() <= 19 && id.bytes().all(|b| b.is_ascii_digit());
    match kind {
        "proposal" if digits => Some(format!("/proposals/{id}")),
        "identity" if digits => Some(format!("/workloads/{id}")),
        _ => None,
    }
}

fn entry(r: AuditRow) -> Entry {
    Entry {
        subject_href: subject_href(&r.subject),
        id: r.id,
        at: show::time(r.at_unix_ms),
        detail: if r.detail.is_null() { String::new() } else { r.detail.to_string() },
        actor: r.actor,
        action: r.action,
        subject: r.subject,
    }
}

/// GET /audit.
pub async fn page(caller: Viewer, State(state): State<AppState>, Query(p): Query<AuditParams>) -> Response {
    let text = |v: &Option<String>| show::field(v).unwrap_or("").to_owned();
    let mut page = AuditPage {
        chrome: Chrome::new(&caller, "/audit"),
        error: None,
        actor: text(&p.actor),
        action: text(&p.action),
        subject: text(&p.subject),
        since: text(&p.since),
        until: text(&p.until),
        actions: ACTION_SUGGESTIONS,
        chain: Chain::Unknown,
        entries: Vec::new(),
        older: None,
        newest: None,
    };
    let time = |v: &Option<String>, what: &str| {
        show::field(v)
            .map(|s| show::parse_datetime(s).ok_or(format!("{what} {s:?} is not a date and time (UTC).")))
            .transpose()
    };
    let parsed = (|| {
        let since = time(&p.since, "From")?;
        let until = time(&p.until, "Until")?;
        let before = show::field(&p.before)
            .map(|s| s.parse::<i64>().map_err(|_| format!("{s:?} is not an entry id.")))
            .transpose()?;
        Ok::<_, String>((since, until, before))
    })();
    let (since, until, before) = match parsed {
        Ok(v) => v,
        Err(msg) => {
            page.error = Some(msg);
            return render_status(StatusCode::BAD_REQUEST, &page);
        }
    };
    let q = AuditQuery {
        since_unix_ms: since,
        until_unix_ms: until,
        actor: show::field(&p.actor).map(str::to_owned),
        action_prefix: show::field(&p.action).map(str::to_owned),
        subject: show::field(&p.subject).map(str::to_owned),
        limit: PAGE,
        before_id: before,
    };
    let rows = match state.store.audit(&q).await {
        Ok(rows) => rows,
        Err(err) => return show::store_failed("audit", err),
    };
    page.chain = if p.verify.as_deref() == Some("1") {
        match state.store.verify_audit_chain().await {
            Ok(entries) => Chain::Verified { entries },
            Err(StoreError::AuditChainBroken { id, kind }) => Chain::Broken { id, why: kind.to_string() },
            Err(err) => {
                tracing::error!(error = %err, "Verifying the audit chain for the audit page failed.");
                Chain::Unknown
            }
        }
    } else {
        Chain::NotChecked { href: "/audit?verify=1".to_owned() }
    };
    let pairs = |before: Option<String>| {
        show::query_string(&[
            ("actor", show::field(&p.actor).map(str::to_owned)),
            ("action", show::field(&p.action).map(str::to_owned)),
            ("subject", show::field(&p.subject).map(str::to_owned)),
            ("since", show::field(&p.since).map(str::to_owned)),
            ("until", show::field(&p.until).map(str::to_owned)),
            ("before", before),
        ])
    };
    if rows.len() == PAGE as usize {
        page.older = rows.last().map(|r| format!("/audit{}", pairs(Some(r.id.to_string()))));
    }
    if before.is_some() {
        page.newest = Some(format!("/audit{}", pairs(None)));
    }
    page.entries = rows.into_iter().map(entry).collect();
    render(&page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_link_only_to_numbered_pages() {
        assert_eq!(subject_href("proposal:7").as_deref(), Some("/proposals/7"));
        assert_eq!(subject_href("identity:300").as_deref(), Some("/workloads/300"));
        assert_eq!(subject_href("user:alice"), None);
        assert_eq!(subject_href("proposal:7/../x"), None);
        assert_eq!(subject_href("proposal:"), None);
    }
}
