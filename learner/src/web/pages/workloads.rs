//! `/workloads` and `/workloads/{id}`: every workload identity with its labels,
//! namespace, endpoints, rollout mode, deployed / approved policy and pending proposal
//! (linked to `/proposals/{id}`), and on the detail page its recent audit and deny
//! events and its edges.

use std::collections::{BTreeMap, HashMap};

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use bulkhead_model::{Identity, ProposalStatus, RolloutMode, Verdict};
use serde::Deserialize;

use super::overview::show::{self, Directory, Peer};
use super::{Chrome, render};
use crate::grpc::ingest::unix_ms;
use crate::policy::rollout::{GATE_WINDOW_MS, RolloutState};
use crate::store::{EdgeQuery, MAX_PROPOSAL_PAGE, ProposalQuery, ProposalSummary, StoreError, VerdictQuery};
use crate::web::AppState;
use crate::web::auth::Viewer;

/// Workloads per page of the list.
const PAGE: usize = 200;
/// Label chips shown per workload in the list (the detail page shows all).
const LIST_CHIPS: usize = 8;
/// Verdict events of each kind shown on a workload's page.
const RECENT_EVENTS: u32 = 25;
/// Edges shown on a workload's page.
const EDGES_SHOWN: u32 = 50;

/// A link to a proposal version.
struct ProposalLink {
    label: String,
    href: String,
    status: &'static str,
}

fn proposal_link(id: i64, version: u32, status: ProposalStatus) -> ProposalLink {
    ProposalLink { label: format!("v{version}"), href: format!("/proposals/{id}"), status: status.as_str() }
}

fn mode_class(mode: RolloutMode) -> &'static str {
    match mode {
        RolloutMode::Learn => "mode-learn",
        RolloutMode::Monitor => "mode-monitor",
        RolloutMode::Enforce => "mode-enforce",
    }
}

fn error_page(status: StatusCode, message: &str) -> Response {
    super::error::page(status, message)
}

fn policy_failed(err: crate::policy::PolicyError) -> Response {
    match err {
        crate::policy::PolicyError::Store(e) => show::store_failed("workloads", e),
        other => show::store_failed("workloads", other),
    }
}

// === list ===

#[derive(Debug, Deserialize)]
pub struct ListParams {
    ns: Option<String>,
    /// Matches names, label keys and values (case-insensitive).
    q: Option<String>,
    /// Keyset: workloads with identities above this.
    after: Option<String>,
}

struct WorkloadLine {
    id: u32,
    name: String,
    namespace: String,
    chips: Vec<String>,
    more_labels: usize,
    endpoints: usize,
    mode: &'static str,
    mode_class: &'static str,
    policies: Vec<ProposalLink>,
    pending: Option<ProposalLink>,
    audit: u64,
    denied: u64,
}

#[derive(Template)]
#[template(path = "workloads.html")]
struct WorkloadsPage {
    chrome: Chrome,
    ns: String,
    q: String,
    namespaces: Vec<String>,
    rows: Vec<WorkloadLine>,
    matched: usize,
    next: Option<String>,
    first: Option<String>,
    window_hours: i64,
}

/// Per target: the deployed and approved versions, newest first.
type Policies = BTreeMap<Identity, Vec<ProposalLink>>;

/// GET /workloads.
pub async fn page(caller: Viewer, State(state): State<AppState>, Query(p): Query<ListParams>) -> Response {
    let now = unix_ms();
    let store = &state.store;
    let loaded = async {
        let directory = Directory::load(store).await?;
        let endpoints = store.endpoints().await?;
        let active = store.active_policies().await?;
        let pending = store
            .proposals(&ProposalQuery {
                status: Some(ProposalStatus::Proposed),
                limit: MAX_PROPOSAL_PAGE,
                ..Default::default()
            })
            .await?;
        let counts = store.verdict_counts(now - GATE_WINDOW_MS).await?;
        Ok::<_, StoreError>((directory, endpoints, active, pending, counts))
    }
    .await;
    let (directory, endpoints, active, pending, counts) = match loaded {
        Ok(v) => v,
        Err(err) => return show::store_failed("workloads", err),
    };
    let states: HashMap<Identity, RolloutState> = match state.policy.rollout_states().await {
        Ok(s) => s.into_iter().map(|s| (s.target, s)).collect(),
        Err(err) => return policy_failed(err),
    };
    let mut endpoint_count: HashMap<Identity, usize> = HashMap::new();
    for e in &endpoints {
        *endpoint_count.entry(e.identity).or_default() += 1;
    }
    let mut policies: Policies = BTreeMap::new();
    for a in active.iter().rev() {
        policies.entry(a.target).or_default().push(proposal_link(a.proposal_id, a.version, a.status));
    }
    // Newest first: the first pending version per target is the one to review.
    let mut pending_of: HashMap<Identity, &ProposalSummary> = HashMap::new();
    for s in &pending {
        pending_of.entry(s.target).or_insert(s);
    }
    let counts: HashMap<Identity, (u64, u64)> = counts.into_iter().map(|c| (c.identity, (c.audit, c.denied))).collect();

    let ns = show::field(&p.ns).map(str::to_owned);
    let q = show::field(&p.q).map(str::to_lowercase);
    let after = show::field(&p.after).and_then(|s| s.parse::<u32>().ok());
    let matching: Vec<_> = directory
        .entries()
        .into_iter()
        .filter(|e| !e.identity.is_reserved())
        .filter(|e| ns.as_deref().is_none_or(|ns| e.namespace.as_deref() == Some(ns)))
        .filter(|e| {
            q.as_deref().is_none_or(|q| {
                e.name.to_lowercase().contains(q)
                    || e.identity.0.to_string() == q
                    || e.labels.iter().any(|(k, v)| k.to_lowercase().contains(q) || v.to_lowercase().contains(q))
            })
        })
        .collect();
    let matched = matching.len();
    let page_rows: Vec<_> =
        matching.into_iter().filter(|e| after.is_none_or(|a| e.identity.0 > a)).take(PAGE + 1).collect();
    let has_more = page_rows.len() > PAGE;
    let rows: Vec<WorkloadLine> = page_rows
        .into_iter()
        .take(PAGE)
        .map(|e| {
            let chips = show::chips(&e.labels);
            let mode = states.get(&e.identity).map_or(RolloutMode::Learn, |s| s.mode);
            let (audit, denied) = counts.get(&e.identity).copied().unwrap_or_default();
            WorkloadLine {
                id: e.identity.0,
                name: e.name.clone(),
                namespace: e.namespace.clone().unwrap_or_default(),
                more_labels: chips.len().saturating_sub(LIST_CHIPS),
                chips: chips.into_iter().take(LIST_CHIPS).collect(),
                endpoints: endpoint_count.get(&e.identity).copied().unwrap_or(0),
                mode: mode.as_str(),
                mode_class: mode_class(mode),
                policies: policies.remove(&e.identity).unwrap_or_default(),
                pending: pending_of.get(&e.identity).map(|s| proposal_link(s.id, s.version, s.status)),
                audit,
                denied,
            }
        })
        .collect();
    let pairs = |after: Option<String>| {
        show::query_string(&[
            ("ns", show::field(&p.ns).map(str::to_owned)),
            ("q", show::field(&p.q).map(str::to_owned)),
            ("after", after),
        ])
    };
    let next = has_more.then(|| rows.last().map(|r| format!("/workloads{}", pairs(Some(r.id.to_string()))))).flatten();
    let first = after.map(|_| format!("/workloads{}", pairs(None)));
    let page = WorkloadsPage {
        chrome: Chrome::new(&caller, "/workloads"),
        ns: ns.unwrap_or_default(),
        q: show::field(&p.q).unwrap_or("").to_owned(),
        namespaces: directory.namespaces(),
        rows,
        matched,
        next,
        first,
        window_hours: GATE_WINDOW_MS / 3_600_000,
    };
    render(&page)
}

// === detail ===

struct EndpointLine {
    node: String,
    netns: String,
    host: bool,
    addresses: Vec<String>,
    cgroups: Vec<String>,
    updated: String,
    updated_ago: String,
}

struct VersionLine {
    link: ProposalLink,
    created: String,
    decided: String,
    reviewer: String,
    rules: String,
    converged: bool,
}

struct EventLine {
    at: String,
    node: String,
    peer: Peer,
    direction: &'static str,
    port: String,
    verdict: &'static str,
    verdict_class: &'static str,
    policy_version: u64,
    rule: String,
    /// The request line of an HTTP verdict (attacker-chosen: the template escapes it).
    request: Option<String>,
}

struct EdgeLine {
    outgoing: bool,
    peer: Peer,
    port: String,
    connections: String,
    bytes: String,
    last_seen: String,
    last_seen_ago: String,
}

#[derive(Template)]
#[template(path = "workload.html")]
struct WorkloadPage {
    chrome: Chrome,
    id: u32,
    name: String,
    namespace: String,
    chips: Vec<String>,
    created: String,
    mode: &'static str,
    mode_class: &'static str,
    mode_since: String,
    changed_by: String,
    deployed: Option<ProposalLink>,
    approved: Option<ProposalLink>,
    pending: Option<ProposalLink>,
    converged: Option<bool>,
    versions: Vec<VersionLine>,
    endpoints: Vec<EndpointLine>,
    events: Vec<EventLine>,
    edges: Vec<EdgeLine>,
    flows_href: String,
    window_hours: i64,
    audit_24h: u64,
    denied_24h: u64,
}

/// GET /workloads/{id}.
pub async fn detail(caller: Viewer, State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let Some(target) = id.parse::<u32>().ok().map(Identity) else {
        return error_page(StatusCode::NOT_FOUND, "no such workload (identities are numbers)");
    };
    let now = unix_ms();
    let store = &state.store;
    let loaded = async {
        let directory = Directory::load(store).await?;
        let endpoints = store.endpoints_of(target).await?;
        let versions = store.proposal_versions(target).await?;
        let event_query = |verdict| VerdictQuery {
            identity: Some(target),
            verdict: Some(verdict),
            limit: RECENT_EVENTS,
            ..Default::default()
        };
        let mut events = store.verdict_events(&event_query(Verdict::Audit)).await?;
        events.extend(store.verdict_events(&event_query(Verdict::Denied)).await?);
        let edges =
            store.edges(&EdgeQuery { identity: Some(target), limit: Some(EDGES_SHOWN), ..Default::default() }).await?;
        let counts = store.verdict_counts(now - GATE_WINDOW_MS).await?;
        let counts = counts.into_iter().find(|c| c.identity == target).map_or((0, 0), |c| (c.audit, c.denied));
        Ok::<_, StoreError>((directory, endpoints, versions, events, edges, counts))
    }
    .await;
    let (directory, endpoints, versions, mut events, edges, (audit_24h, denied_24h)) = match loaded {
        Ok(v) => v,
        Err(err) => return show::store_failed("workload", err),
    };
    let Some(entry) = directory.get(target).filter(|e| !e.identity.is_reserved()) else {
        return error_page(StatusCode::NOT_FOUND, "no such workload");
    };
    let rollout = match state.policy.rollout_states().await {
        Ok(s) => s.into_iter().find(|s| s.target == target),
        Err(err) => return policy_failed(err),
    };
    let newest_with = |status: ProposalStatus| {
        versions.iter().find(|v| v.status == status).map(|v| proposal_link(v.id, v.version, v.status))
    };
    let mode = rollout.as_ref().map_or(RolloutMode::Learn, |r| r.mode);
    events.sort_by_key(|e| std::cmp::Reverse(e.id));
    events.truncate(RECENT_EVENTS as usize);
    let page = WorkloadPage {
        chrome: Chrome::new(&caller, "/workloads"),
        id: target.0,
        name: entry.name.clone(),
        namespace: entry.namespace.clone().unwrap_or_default(),
        chips: show::chips(&entry.labels),
        created: show::time(entry.created_unix_ms),
        mode: mode.as_str(),
        mode_class: mode_class(mode),
        mode_since: show::time_opt(rollout.as_ref().and_then(|r| r.mode_since_unix_ms)),
        changed_by: rollout.as_ref().and_then(|r| r.changed_by.clone()).unwrap_or_default(),
        deployed: newest_with(ProposalStatus::Deployed),
        approved: newest_with(ProposalStatus::Approved),
        pending: newest_with(ProposalStatus::Proposed),
        converged: versions.first().map(|v| v.converged),
        versions: versions
            .iter()
            .map(|v| VersionLine {
                link: proposal_link(v.id, v.version, v.status),
                created: show::time(v.created_unix_ms),
                decided: show::time_opt(v.decided_unix_ms),
                reviewer: v.reviewer.clone().unwrap_or_default(),
                rules: format!("{} in / {} out", v.ingress_rules, v.egress_rules),
                converged: v.converged,
            })
            .collect(),
        endpoints: endpoints
            .into_iter()
            .map(|e| EndpointLine {
                netns: e.fact.netns_name.clone().unwrap_or_else(|| format!("netns {}", e.fact.netns_ino)),
                host: e.fact.host,
                addresses: e
                    .fact
                    .addresses
                    .iter()
                    .map(|a| format!("{}/{} ({})", a.addr, a.prefix_len, a.interface))
                    .collect(),
                cgroups: e
                    .fact
                    .cgroups
                    .iter()
                    .map(|c| {
                        if c.comms.is_empty() { c.path.clone() } else { format!("{} [{}]", c.path, c.comms.join(", ")) }
                    })
                    .collect(),
                updated: show::time(e.updated_unix_ms),
                updated_ago: show::ago(now, e.updated_unix_ms),
                node: e.node_id,
            })
            .collect(),
        events: events
            .iter()
            .map(|r| {
                let e = &r.event;
                EventLine {
                    at: show::time(e.at_unix_ms),
                    node: r.node_id.clone(),
                    peer: directory.peer(e.peer),
                    direction: e.direction.as_str(),
                    port: format!("{}/{}", e.dst_port, e.protocol.as_str()),
                    verdict: show::verdict_word(e.verdict),
                    verdict_class: show::verdict_class(e.verdict),
                    policy_version: e.policy_version,
                    rule: e.rule.map_or_else(
                        || "default deny".to_owned(),
                        |rule| {
                            format!(
                                "HTTP request not allowed by proposal {} {} rule {}",
                                rule.proposal_id,
                                rule.direction.as_str(),
                                rule.rule_index
                            )
                        },
                    ),
                    request: e.http.as_ref().map(ToString::to_string),
                }
            })
            .collect(),
        edges: edges
            .iter()
            .map(|e| {
                let outgoing = e.edge.key.src == target;
                let peer = if outgoing { e.edge.key.dst } else { e.edge.key.src };
                EdgeLine {
                    outgoing,
                    peer: directory.peer(peer),
                    port: format!("{}/{}", e.edge.key.dst_port, e.edge.key.protocol.as_str()),
                    connections: show::count(e.edge.connections),
                    bytes: show::bytes(e.edge.bytes),
                    last_seen: show::time(e.edge.last_seen_unix_ms),
                    last_seen_ago: show::ago(now, e.edge.last_seen_unix_ms),
                }
            })
            .collect(),
        flows_href: format!("/flows?workload={}", target.0),
        window_hours: GATE_WINDOW_MS / 3_600_000,
        audit_24h,
        denied_24h,
    };
    render(&page)
}
