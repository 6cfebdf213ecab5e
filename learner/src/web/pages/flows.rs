//! `/flows`: recorded flows, filterable (namespace, workload, port, protocol, verdict,
//! time range), paged by id ("older" continues below the last id shown — never
//! OFFSET, see [`Store::flow_page`](crate::store::Store::flow_page)), and
//! `/flows/tail`: the same filter as a live feed of server-sent events, which
//! `static/flows.js` appends to the table while "Live" is on.
//!
//! The tail polls the store once per [`TAIL_POLL`] for at most [`TAIL_BATCH`] flows
//! above its cursor, so one open tail costs a bounded query rate whatever the traffic;
//! at most [`MAX_TAILS`] tails run at once, and each ends after [`TAIL_LIFETIME`] (the
//! browser reconnects with `Last-Event-ID` and continues where it was, re-checking the
//! session and role on the way).

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::time::Duration;

use askama::Template;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bulkhead_model::{Identity, Protocol, Verdict};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, SemaphorePermit};

use super::overview::show::{self, Choice, Directory, Peer};
use super::{Chrome, render, render_status};
use crate::grpc::ingest::unix_ms;
use crate::store::{FlowFilter, FlowRow, MAX_FILTER_IDENTITIES, Store};
use crate::web::AppState;
use crate::web::auth::Viewer;

/// Rows per page unless the request asks for another size.
const PAGE: u32 = 100;
/// Largest page a request may ask for.
const MAX_PAGE: u32 = 500;
/// How often a live tail asks the store for new flows.
pub const TAIL_POLL: Duration = Duration::from_secs(1);
/// Most flows one tail event carries.
pub const TAIL_BATCH: u32 = 200;
/// Live tails open at once, over all users.
pub const MAX_TAILS: usize = 64;
/// How long one tail stream lasts before the browser reconnects.
pub const TAIL_LIFETIME: Duration = Duration::from_secs(600);
/// How long the browser waits before reconnecting a closed tail.
const TAIL_RETRY: Duration = Duration::from_secs(3);
/// Workload names offered as suggestions in the filter form.
const MAX_SUGGESTIONS: usize = 2_000;

static TAILS: Semaphore = Semaphore::const_new(MAX_TAILS);

/// The filter form's fields, as typed (checked by [`Filters::parse`]).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct FlowParams {
    ns: Option<String>,
    workload: Option<String>,
    port: Option<String>,
    proto: Option<String>,
    verdict: Option<String>,
    /// A preset of [`show::FLOW_RANGES`]; `since` / `until` win over it.
    range: Option<String>,
    since: Option<String>,
    until: Option<String>,
    before: Option<String>,
    limit: Option<String>,
    /// Tail only: start after this flow id.
    after: Option<String>,
}

impl FlowParams {
    /// The filter part as query-string pairs (for the tail URL and paging links).
    fn filter_pairs(&self) -> Vec<(&'static str, Option<String>)> {
        let keep = |v: &Option<String>| show::field(v).map(str::to_owned);
        vec![
            ("ns", keep(&self.ns)),
            ("workload", keep(&self.workload)),
            ("port", keep(&self.port)),
            ("proto", keep(&self.proto)),
            ("verdict", keep(&self.verdict)),
            ("range", keep(&self.range)),
            ("since", keep(&self.since)),
            ("until", keep(&self.until)),
        ]
    }
}

/// Checked filters: the store filter plus what the page needs to show them again.
struct Filters {
    filter: FlowFilter,
    limit: u32,
    before: Option<i64>,
    /// Why nothing can match (a namespace or workload that does not exist).
    nothing: Option<String>,
}

/// The verdict filter's values (UI word → verdict).
const VERDICTS: &[(&str, &str)] = &[("", "any"), ("allowed", "allowed"), ("audit", "audit"), ("denied", "denied")];
const PROTOCOLS: &[(&str, &str)] = &[("", "any"), ("tcp", "TCP"), ("udp", "UDP")];

impl Filters {
    /// Checks the form; an error names the field in words an analyst can act on.
    fn parse(p: &FlowParams, directory: &Directory, now: i64) -> Result<Self, String> {
        let dst_port = show::field(&p.port)
            .map(|s| s.parse::<u16>().map_err(|_| format!("Port {s:?} is not a port number (0–65535).")))
            .transpose()?;
        let protocol = match show::field(&p.proto) {
            None => None,
            Some("tcp") => Some(Protocol::Tcp),
            Some("udp") => Some(Protocol::Udp),
            Some(other) => return Err(format!("Unknown protocol {other:?}: choose TCP or UDP.")),
        };
        let verdict = match show::field(&p.verdict) {
            None => None,
            Some("allowed" | "forwarded") => Some(Verdict::Forwarded),
            Some("audit") => Some(Verdict::Audit),
            Some("denied") => Some(Verdict::Denied),
            Some(other) => return Err(format!("Unknown verdict {other:?}: choose allowed, audit or denied.")),
        };
        let time = |v: &Option<String>, what: &str| {
            show::field(v)
                .map(|s| show::parse_datetime(s).ok_or(format!("{what} {s:?} is not a date and time (UTC).")))
                .transpose()
        };
        let mut since = time(&p.since, "Seen since")?;
        let until = time(&p.until, "Began until")?;
        if since.is_none()
            && let Some(r) = show::field(&p.range)
        {
            let (_, _, len) = show::preset(show::FLOW_RANGES, r).ok_or(format!("Unknown time range {r:?}."))?;
            since = Some(now - len);
        }
        let limit = match show::field(&p.limit) {
            None => PAGE,
            Some(s) => s
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=MAX_PAGE).contains(n))
                .ok_or(format!("Page size {s:?} must be 1 to {MAX_PAGE}."))?,
        };
        let before = show::field(&p.before)
            .map(|s| s.parse::<i64>().map_err(|_| format!("{s:?} is not a flow id.")))
            .transpose()?;

        let mut nothing = None;
        let mut identities: Option<BTreeSet<Identity>> = None;
        if let Some(ns) = show::field(&p.ns) {
            let set: BTreeSet<Identity> = directory
                .entries()
                .into_iter()
                .filter(|e| e.namespace.as_deref() == Some(ns))
                .map(|e| e.identity)
                .collect();
            if set.is_empty() {
                nothing = Some(format!("No workload is in namespace {ns:?}."));
            }
            identities = Some(set);
        }
        if let Some(w) = show::field(&p.workload) {
            let set: BTreeSet<Identity> = match w.parse::<u32>() {
                Ok(n) => directory.get(Identity(n)).map(|e| e.identity).into_iter().collect(),
                Err(_) => directory.entries().into_iter().filter(|e| e.name == w).map(|e| e.identity).collect(),
            };
            if set.is_empty() {
                nothing = Some(format!("No workload is named {w:?} (or has that identity number)."));
            }
            identities = Some(match identities {
                Some(ns) => ns.intersection(&set).copied().collect(),
                None => set,
            });
        }
        if identities.as_ref().is_some_and(|s| s.len() > MAX_FILTER_IDENTITIES) {
            return Err(format!(
                "The filter selects more than {MAX_FILTER_IDENTITIES} workloads; narrow it with a workload."
            ));
        }
        let filter = FlowFilter {
            identities: identities.map(|s| s.into_iter().collect()),
            dst_port,
            protocol,
            verdict,
            since_unix_ms: since,
            until_unix_ms: until,
        };
        Ok(Filters { filter, limit, before, nothing })
    }
}

/// One flow as the table (and the tail's JSON) shows it.
#[derive(Debug, Clone, Serialize)]
pub struct FlowView {
    pub id: i64,
    pub last_seen: String,
    pub first_seen: String,
    pub node: String,
    pub src: Peer,
    pub src_addr: String,
    pub dst: Peer,
    pub dst_addr: String,
    pub port: u16,
    pub protocol: &'static str,
    pub direction: &'static str,
    pub verdict: &'static str,
    pub verdict_class: &'static str,
    pub connections: String,
    pub bytes: String,
    pub process: String,
}

impl FlowView {
    fn new(r: &FlowRow, directory: &Directory) -> Self {
        let f = &r.flow;
        let addr = |a: std::net::IpAddr, port: u16| match (a, port) {
            (std::net::IpAddr::V6(v6), p) if p != 0 => format!("[{v6}]:{p}"),
            (a, 0) => a.to_string(),
            (a, p) => format!("{a}:{p}"),
        };
        FlowView {
            id: r.id,
            last_seen: show::time(f.last_seen_unix_ms),
            first_seen: show::time(f.first_seen_unix_ms),
            node: r.node_id.clone(),
            src: directory.peer(r.src_identity),
            src_addr: addr(f.src_addr, f.src_port),
            dst: directory.peer(r.dst_identity),
            dst_addr: addr(f.dst_addr, f.dst_port),
            port: f.dst_port,
            protocol: f.protocol.as_str(),
            direction: f.direction.as_str(),
            verdict: show::verdict_word(f.verdict),
            verdict_class: show::verdict_class(f.verdict),
            connections: show::count(f.connections),
            bytes: format!("{} / {}", show::bytes(f.bytes_sent), show::bytes(f.bytes_received)),
            process: if f.comm.is_empty() { format!("pid {}", f.pid) } else { format!("{} ({})", f.comm, f.pid) },
        }
    }
}

#[derive(Template)]
#[template(path = "flows.html")]
struct FlowsPage {
    chrome: Chrome,
    error: Option<String>,
    nothing: Option<String>,
    ns: String,
    workload: String,
    port: String,
    proto: Vec<Choice>,
    verdict: Vec<Choice>,
    ranges: Vec<Choice>,
    since: String,
    until: String,
    namespaces: Vec<String>,
    workload_names: Vec<String>,
    rows: Vec<FlowView>,
    /// Link to the next (older) page, if anything older can match.
    older: Option<String>,
    /// Link back to the newest page when this is an older one.
    newest: Option<String>,
    /// The scan budget ran out before the page filled.
    partial: bool,
    /// The live tail of this filter, starting after the newest flow id when the page
    /// was rendered; empty on older pages (live rows belong above the newest one).
    tail_url: String,
}

fn text(v: &Option<String>) -> String {
    show::field(v).unwrap_or("").to_owned()
}

/// GET /flows.
pub async fn page(caller: Viewer, State(state): State<AppState>, Query(p): Query<FlowParams>) -> Response {
    let now = unix_ms();
    let directory = match Directory::load(&state.store).await {
        Ok(d) => d,
        Err(err) => return show::store_failed("flows", err),
    };
    let latest = match state.store.flow_id_bounds().await {
        Ok(b) => b.map_or(0, |(_, hi)| hi),
        Err(err) => return show::store_failed("flows", err),
    };
    let mut page = FlowsPage {
        chrome: Chrome::new(&caller, "/flows"),
        error: None,
        nothing: None,
        ns: text(&p.ns),
        workload: text(&p.workload),
        port: text(&p.port),
        proto: show::options(PROTOCOLS, show::field(&p.proto).unwrap_or("")),
        verdict: show::options(VERDICTS, show::field(&p.verdict).unwrap_or("")),
        ranges: show::choices(show::FLOW_RANGES, show::field(&p.range).unwrap_or(""), Some("any time")),
        since: text(&p.since),
        until: text(&p.until),
        namespaces: directory.namespaces(),
        workload_names: suggestions(&directory),
        rows: Vec::new(),
        older: None,
        newest: None,
        partial: false,
        tail_url: String::new(),
    };
    let filters = match Filters::parse(&p, &directory, now) {
        Ok(f) => f,
        Err(msg) => {
            page.error = Some(msg);
            return render_status(StatusCode::BAD_REQUEST, &page);
        }
    };
    let mut pairs = p.filter_pairs();
    if filters.limit != PAGE {
        pairs.push(("limit", Some(filters.limit.to_string())));
    }
    // Live rows go on top of the newest page; an older page has a gap above it.
    if filters.before.is_none() {
        let mut tail_pairs = pairs.clone();
        tail_pairs.push(("after", Some(latest.to_string())));
        page.tail_url = format!("/flows/tail{}", show::query_string(&tail_pairs));
    }
    page.nothing = filters.nothing.clone();
    if filters.before.is_some() {
        page.newest = Some(format!("/flows{}", show::query_string(&pairs)));
    }
    let result = match state.store.flow_page(&filters.filter, filters.before, filters.limit).await {
        Ok(r) => r,
        Err(err) => return show::store_failed("flows", err),
    };
    page.rows = result.rows.iter().map(|r| FlowView::new(r, &directory)).collect();
    page.partial = result.partial;
    page.older = result.older_than.map(|id| {
        let mut older = pairs.clone();
        older.push(("before", Some(id.to_string())));
        format!("/flows{}", show::query_string(&older))
    });
    render(&page)
}

/// Workload names for the filter's suggestions (reserved ones excluded), sorted.
fn suggestions(directory: &Directory) -> Vec<String> {
    let mut names: Vec<String> =
        directory.entries().into_iter().filter(|e| !e.identity.is_reserved()).map(|e| e.name.clone()).collect();
    names.sort();
    names.dedup();
    names.truncate(MAX_SUGGESTIONS);
    names
}

// === live tail ===

/// One tail event's data.
#[derive(Debug, Serialize)]
struct TailBatch {
    rows: Vec<FlowView>,
    /// Flows jumped over because the tail fell behind.
    skipped: u64,
}

/// What a tail stream carries from one poll to the next.
struct Tail {
    store: Store,
    filter: FlowFilter,
    directory: Directory,
    cursor: i64,
    ticker: tokio::time::Interval,
    deadline: tokio::time::Instant,
    /// Held for the stream's life: counts against [`MAX_TAILS`].
    _permit: SemaphorePermit<'static>,
}

/// GET /flows/tail: server-sent events named `flows`, each a [`TailBatch`] (JSON) with
/// the flow id it reached as the event id. Starts after `Last-Event-ID` (a reconnect),
/// else after `after`, else after the newest flow now.
pub async fn tail(
    _caller: Viewer,
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(p): Query<FlowParams>,
) -> Response {
    let now = unix_ms();
    let directory = match Directory::load(&state.store).await {
        Ok(d) => d,
        Err(err) => return show::store_failed("flows tail", err),
    };
    let filters = match Filters::parse(&p, &directory, now) {
        Ok(f) => f,
        Err(msg) => return (StatusCode::BAD_REQUEST, msg).into_response(),
    };
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or(show::field(&p.after))
        .and_then(|s| s.trim().parse::<i64>().ok());
    let cursor = match resume {
        Some(id) => id,
        None => match state.store.flow_id_bounds().await {
            Ok(b) => b.map_or(0, |(_, hi)| hi),
            Err(err) => return show::store_failed("flows tail", err),
        },
    };
    let Ok(permit) = TAILS.try_acquire() else {
        return super::error::page(StatusCode::SERVICE_UNAVAILABLE, "too many live tails are open; try again later");
    };
    let mut ticker = tokio::time::interval(TAIL_POLL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let tail = Tail {
        store: state.store.clone(),
        filter: filters.filter,
        directory,
        cursor,
        ticker,
        deadline: tokio::time::Instant::now() + TAIL_LIFETIME,
        _permit: permit,
    };
    let hello = Event::default().event("ready").id(cursor.to_string()).retry(TAIL_RETRY).data("{}");
    let stream = futures::stream::once(async move { Ok::<_, Infallible>(hello) })
        .chain(futures::stream::unfold(tail, next_batch));
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// Waits for the next poll that finds flows and returns them as an event; `None` (the
/// stream ends) at the deadline or when the store fails.
async fn next_batch(mut t: Tail) -> Option<(Result<Event, Infallible>, Tail)> {
    loop {
        tokio::select! {
            _ = t.ticker.tick() => {}
            _ = tokio::time::sleep_until(t.deadline) => return None,
        }
        let found = match t.store.flows_after(&t.filter, t.cursor, TAIL_BATCH).await {
            Ok(found) => found,
            Err(err) => {
                tracing::warn!(error = %err, "A live flow tail failed; the browser will reconnect.");
                return None;
            }
        };
        t.cursor = found.cursor;
        if found.rows.is_empty() && found.skipped == 0 {
            continue;
        }
        let batch = TailBatch {
            rows: found.rows.iter().map(|r| FlowView::new(r, &t.directory)).collect(),
            skipped: found.skipped,
        };
        let event = match Event::default().event("flows").id(t.cursor.to_string()).json_data(&batch) {
            Ok(e) => e,
            Err(err) => {
                tracing::error!(error = %err, "Encoding a live flow batch failed.");
                return None;
            }
        };
        return Some((Ok(event), t));
    }
}
