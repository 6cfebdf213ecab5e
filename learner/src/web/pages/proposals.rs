//! `/proposals`: the review queue, ranked by risk ([`crate::policy::risk`]), and
//! `/proposals/{id}`: one version with each rule's evidence and example flows, lint
//! warnings, the "what would this block" replay over a chosen range, the exported
//! NetworkPolicy and CiliumNetworkPolicy YAML, the diff against what is deployed, and the
//! approve (approver) / reject (analyst, with a comment) forms.
//!
//! The forms post to `/proposals/{id}/approve` and `/proposals/{id}/reject` and come back
//! with a 303 to the detail page naming the outcome; a refused decision (a comment
//! missing, a flagged rule undecided, already decided) shows the detail page again with
//! the reason and a 4xx status. Buttons a role cannot use are not shown, and the handlers
//! refuse them anyway (403, by their role extractors). Everything the page shows from
//! workloads — names, labels, YAML, comments — goes through askama's escaping.

use std::collections::{BTreeSet, HashMap};

use askama::Template;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use bulkhead_model::{Direction, HttpPath, Identity, Labels, Peer, ProposalStatus, Protocol, Severity};
use serde::Deserialize;

use super::graph::{Choice, TimeRange, fmt_bytes, fmt_opt_time, fmt_time};
use super::{Chrome, render, render_status};
use crate::auth::Role;
use crate::grpc::ingest::unix_ms;
use crate::policy::graph_view::identity_name;
use crate::policy::replay::ReplayRequest;
use crate::policy::review::{Against, Approval, ProposalView};
use crate::policy::risk::{self, Risk, RiskConfig, RiskInputs};
use crate::policy::{ExportRequest, PolicyError};
use crate::store::{FlowQuery, FlowRow, MAX_PROPOSAL_PAGE, ProposalQuery, ProposalSummary, StoreError};
use crate::web::AppState;
use crate::web::auth::{Analyst, Approver, Caller, Viewer, redirect_see_other};

/// Most proposals the queue scores and shows.
const QUEUE_MAX: usize = 500;
/// Recent flows of the target searched for each rule's examples.
const EXAMPLE_FLOW_SCAN: u32 = 2_000;
/// Example flows shown per rule.
const EXAMPLES_PER_RULE: usize = 3;
/// Would-deny connections listed by a replay.
const REPLAY_LIST: usize = 50;
/// Evidence peers / addresses named per rule before "+N more".
const NAMED_PEERS: usize = 8;
/// Longest comment accepted, in characters.
const MAX_COMMENT_CHARS: usize = 4_000;

fn store_unavailable(err: &StoreError) -> Response {
    tracing::error!(error = %err, "Reading proposals failed.");
    super::error::page(StatusCode::SERVICE_UNAVAILABLE, "the store is unavailable; try again")
}

/// Everything risk scoring needs, read once per page.
struct RiskWorld {
    config: RiskConfig,
    labels: HashMap<Identity, Labels>,
    /// Workload names from the endpoint snapshots.
    names: HashMap<Identity, String>,
    sensitive: BTreeSet<String>,
    ports: HashMap<(Protocol, u16), u64>,
    active: HashMap<Identity, bulkhead_model::Policy>,
}

impl RiskWorld {
    async fn load(state: &AppState) -> Result<Self, StoreError> {
        let labels: HashMap<Identity, Labels> =
            state.store.identities().await?.into_iter().map(|r| (r.id, r.labels)).collect();
        let mut names = HashMap::new();
        for e in state.store.endpoints().await? {
            if let Some(w) = e.workload {
                names.entry(e.identity).or_insert(w);
            }
        }
        let config = state.policy.config.risk.clone();
        let sensitive = risk::sensitive_namespaces(&config, labels.values());
        let ports =
            state.store.port_usage().await?.into_iter().map(|p| ((p.protocol, p.dst_port), p.destinations)).collect();
        let mut newest: HashMap<Identity, (u32, bulkhead_model::Policy)> = HashMap::new();
        for a in state.store.active_policies().await? {
            match newest.get(&a.target) {
                Some((v, _)) if *v >= a.version => {}
                _ => {
                    newest.insert(a.target, (a.version, a.policy));
                }
            }
        }
        let active = newest.into_iter().map(|(t, (_, p))| (t, p)).collect();
        Ok(Self { config, labels, names, sensitive, ports, active })
    }

    fn score(&self, p: &bulkhead_model::Proposal) -> Risk {
        let inputs = RiskInputs {
            config: &self.config,
            labels: &self.labels,
            sensitive: &self.sensitive,
            port_destinations: &self.ports,
            active: self.active.get(&p.target),
        };
        risk::score(p, &inputs)
    }

    fn name(&self, id: Identity) -> String {
        let empty = Labels::default();
        identity_name(id, self.labels.get(&id).unwrap_or(&empty), self.names.get(&id).map(String::as_str))
    }

    fn namespace(&self, id: Identity) -> String {
        self.labels.get(&id).and_then(|l| l.namespace()).unwrap_or("").to_owned()
    }
}

/// One risk reason as shown.
#[derive(Debug, Clone)]
struct Reason {
    kind: &'static str,
    points: u32,
    rule: String,
    detail: String,
}

fn reasons(r: &Risk) -> Vec<Reason> {
    r.factors
        .iter()
        .map(|f| Reason {
            kind: f.kind.as_str(),
            points: f.points,
            rule: f.rule.clone().unwrap_or_default(),
            detail: f.detail.clone(),
        })
        .collect()
}

// === the queue ===

#[derive(Debug, Clone, Default, Deserialize)]
pub struct QueueParams {
    /// `proposed` (default: the review queue), `approved`, `rejected`, `deployed`,
    /// `superseded` or `all`.
    status: Option<String>,
}

#[derive(Debug, Clone)]
struct QueueRow {
    id: i64,
    workload: String,
    target: u32,
    namespace: String,
    version: u32,
    status: &'static str,
    converged: bool,
    ingress_rules: u64,
    egress_rules: u64,
    flagged: u64,
    lints: u64,
    widening: u64,
    created: String,
    score: u32,
    level: &'static str,
    reasons: Vec<Reason>,
}

#[derive(Template)]
#[template(path = "proposals.html")]
struct QueuePage {
    chrome: Chrome,
    tabs: Vec<Choice>,
    status: &'static str,
    rows: Vec<QueueRow>,
    more: bool,
    sensitive: String,
    error: Option<String>,
}

const STATUSES: &[(&str, &str)] = &[
    ("proposed", "Pending review"),
    ("approved", "Approved"),
    ("deployed", "Deployed"),
    ("rejected", "Rejected"),
    ("superseded", "Superseded"),
    ("all", "All"),
];

/// GET /proposals.
pub async fn page(caller: Viewer, State(state): State<AppState>, Query(q): Query<QueueParams>) -> Response {
    let wanted = q.status.as_deref().filter(|s| !s.is_empty()).unwrap_or("proposed");
    let Some(&(status, _)) = STATUSES.iter().find(|(k, _)| *k == wanted) else {
        return super::error::page(
            StatusCode::BAD_REQUEST,
            "unknown status; use proposed, approved, deployed, rejected, superseded or all",
        );
    };
    let filter = (status != "all").then(|| status.parse::<ProposalStatus>().ok()).flatten();
    let mut summaries: Vec<ProposalSummary> = Vec::new();
    let mut before_id = None;
    let mut more = false;
    loop {
        let q = ProposalQuery { status: filter, target: None, limit: MAX_PROPOSAL_PAGE, before_id };
        let page = match state.store.proposals(&q).await {
            Ok(p) => p,
            Err(e) => return store_unavailable(&e),
        };
        let full = page.len() == MAX_PROPOSAL_PAGE as usize;
        before_id = page.last().map(|s| s.id);
        summaries.extend(page);
        if summaries.len() > QUEUE_MAX {
            summaries.truncate(QUEUE_MAX);
            more = true;
            break;
        }
        if !full {
            break;
        }
    }
    let world = match RiskWorld::load(&state).await {
        Ok(w) => w,
        Err(e) => return store_unavailable(&e),
    };
    let mut scored = Vec::with_capacity(summaries.len());
    for s in summaries {
        let risk = match state.store.proposal(s.id).await {
            Ok(Some(r)) => world.score(&r.proposal),
            Ok(None) => continue,
            Err(e) => return store_unavailable(&e),
        };
        scored.push((s, risk));
    }
    scored.sort_by(|a, b| risk::queue_order((&a.1, a.0.id), (&b.1, b.0.id)));
    let rows = scored
        .into_iter()
        .map(|(s, r)| QueueRow {
            id: s.id,
            namespace: world.namespace(s.target),
            workload: s.workload,
            target: s.target.0,
            version: s.version,
            status: s.status.as_str(),
            converged: s.converged,
            ingress_rules: s.ingress_rules,
            egress_rules: s.egress_rules,
            flagged: s.flagged_rules,
            lints: s.lints,
            widening: s.widening_total,
            created: fmt_time(s.created_unix_ms),
            score: r.score,
            level: r.level(),
            reasons: reasons(&r),
        })
        .collect();
    let tabs = STATUSES.iter().map(|&(value, label)| Choice { value, label, selected: value == status }).collect();
    let sensitive = world.sensitive.iter().cloned().collect::<Vec<_>>().join(", ");
    render(&QueuePage { chrome: Chrome::new(&caller, "/proposals"), tabs, status, rows, more, sensitive, error: None })
}

// === one proposal ===

#[derive(Debug, Clone, Default, Deserialize)]
pub struct DetailParams {
    /// What a decision did: `approved` or `rejected`.
    outcome: Option<String>,
    /// Replay range preset (`1h`, `24h`, …, `all`, `custom`); present = run the replay.
    replay: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

#[derive(Debug, Clone)]
struct ExampleFlow {
    at: String,
    src: String,
    dst: String,
    port: String,
    connections: u64,
    comm: String,
    node: String,
}

#[derive(Debug, Clone)]
struct RuleView {
    id: String,
    direction: &'static str,
    peer: String,
    ports: String,
    included: bool,
    flags: Vec<&'static str>,
    connections: u64,
    bytes: String,
    first_seen: String,
    last_seen: String,
    peers: Vec<String>,
    more_peers: usize,
    widens_total: u64,
    examples: Vec<ExampleFlow>,
    hits: Option<u64>,
    /// HTTP rules (L7): empty for a rule that allows any request on its ports.
    http: Vec<HttpView>,
}

/// One HTTP rule of a rule, with the requests behind it.
#[derive(Debug, Clone)]
struct HttpView {
    method: String,
    path: String,
    /// Empty when the proposal carries no evidence for it (an imported rule).
    requests: String,
    first_seen: String,
    last_seen: String,
    note: String,
}

#[derive(Debug, Clone)]
struct LintView {
    severity: &'static str,
    code: String,
    message: String,
}

#[derive(Debug, Clone)]
struct VersionLink {
    id: i64,
    version: u32,
    status: &'static str,
}

#[derive(Debug, Clone)]
struct YamlView {
    title: &'static str,
    yaml: String,
    warnings: Vec<String>,
    errors: Vec<String>,
}

#[derive(Debug, Clone)]
struct DenyLine {
    src: String,
    dst: String,
    addrs: String,
    port: String,
    connections: u64,
    flows: u64,
    last_seen: String,
    reasons: String,
}

#[derive(Debug, Clone)]
struct ReplayView {
    range: String,
    flows: u64,
    connections: u64,
    would_deny: u64,
    truncated: bool,
    lines: Vec<DenyLine>,
}

#[derive(Template)]
#[template(path = "proposal.html")]
struct DetailPage {
    chrome: Chrome,
    id: i64,
    workload: String,
    target: u32,
    namespace: String,
    version: u32,
    status: &'static str,
    level: &'static str,
    window: String,
    converged: bool,
    last_new_edge: String,
    created: String,
    refreshed: String,
    reviewer: Option<String>,
    decided: String,
    comment: Option<String>,
    widening: u64,
    score: u32,
    risk_level: &'static str,
    reasons: Vec<Reason>,
    rules: Vec<RuleView>,
    lints: Vec<LintView>,
    removals: Vec<String>,
    active: Vec<VersionLink>,
    cluster_policies: Vec<String>,
    diff_against: String,
    diff_text: String,
    yaml: Vec<YamlView>,
    notice: Option<String>,
    alert: Option<String>,
    can_approve: bool,
    can_reject: bool,
    can_replay: bool,
    flagged: Vec<(String, String)>,
    comment_value: String,
    replay_ranges: Vec<Choice>,
    replay_from: String,
    replay_to: String,
    replay: Option<ReplayView>,
    replay_error: Option<String>,
}

/// GET /proposals/{id}.
pub async fn detail(
    caller: Viewer,
    State(state): State<AppState>,
    Path(id): Path<i64>,
    Query(q): Query<DetailParams>,
) -> Response {
    let notice = match q.outcome.as_deref() {
        Some("approved") => {
            Some("Approved. The policy goes to the enforcers of workloads in monitor or enforce mode.".to_owned())
        }
        Some("rejected") => Some("Rejected; the comment is in the audit log.".to_owned()),
        _ => None,
    };
    detail_page(&state, &caller, id, &q, notice, None, String::new(), StatusCode::OK).await
}

#[expect(clippy::too_many_arguments, reason = "one render path for the page and the refused forms")]
async fn detail_page(
    state: &AppState,
    caller: &Caller,
    id: i64,
    q: &DetailParams,
    notice: Option<String>,
    alert: Option<String>,
    comment_value: String,
    status: StatusCode,
) -> Response {
    let view = match state.policy.view(id).await {
        Ok(v) => v,
        Err(PolicyError::NoSuchProposal { .. }) => {
            return super::error::page(StatusCode::NOT_FOUND, "no such proposal");
        }
        Err(e) => {
            tracing::error!(error = %e, id, "Reading a proposal failed.");
            return super::error::page(StatusCode::SERVICE_UNAVAILABLE, "the store is unavailable; try again");
        }
    };
    let world = match RiskWorld::load(state).await {
        Ok(w) => w,
        Err(e) => return store_unavailable(&e),
    };
    let s = &view.record.summary;
    let p = &view.record.proposal;
    let risk = world.score(p);
    let examples = match state
        .store
        .flows(&FlowQuery { identity: Some(s.target), limit: EXAMPLE_FLOW_SCAN, ..FlowQuery::default() })
        .await
    {
        Ok(f) => f,
        Err(e) => return store_unavailable(&e),
    };
    let rules = rule_views(&view, &world, &examples);
    let lints = p
        .lints
        .iter()
        .map(|l| LintView {
            severity: match l.severity {
                Severity::Warning => "warning",
                Severity::Info => "info",
            },
            code: serde_json::to_value(l.code).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
            message: l.message.clone(),
        })
        .collect();
    let removals = p
        .removals
        .iter()
        .map(|r| {
            format!(
                "{} {} {} — last used {}",
                r.direction.as_str(),
                r.rule.peer,
                ports_text(&r.rule.ports),
                r.last_used_unix_ms.map_or_else(|| "never".to_owned(), fmt_time)
            )
        })
        .collect();
    // A version in force is compared with the one before it; any other with what is in
    // force (deployed, else approved).
    let in_force = matches!(s.status, ProposalStatus::Approved | ProposalStatus::Deployed);
    let against = if in_force { Against::Previous } else { Against::Active };
    let (diff_against, diff_text) = match state.policy.diff(id, against).await {
        Ok(d) => (
            match (d.against, in_force) {
                (Some((pid, v)), false) => format!("Against version {v} (proposal {pid}), the policy in force."),
                (Some((pid, v)), true) => {
                    format!("This version is in force; against the previous version {v} (proposal {pid}).")
                }
                (None, false) => "Against nothing: no policy is in force for this workload.".to_owned(),
                (None, true) => "This version is in force and is the first one: everything is new.".to_owned(),
            },
            d.text,
        ),
        Err(e) => ("Unavailable.".to_owned(), e.to_string()),
    };
    let mut yaml = Vec::new();
    for (title, format) in [("NetworkPolicy", "networkpolicy"), ("CiliumNetworkPolicy", "cilium")] {
        let req = ExportRequest { format: Some(format.into()), proposal: Some(id), ..Default::default() };
        yaml.push(match state.policy.export(&req).await {
            Ok(x) => YamlView { title, yaml: x.yaml, warnings: x.warnings, errors: x.errors },
            Err(e) => YamlView { title, yaml: String::new(), warnings: vec![], errors: vec![e.to_string()] },
        });
    }
    let now = unix_ms();
    let can_replay = caller.may(Role::Analyst);
    let range = TimeRange::parse(q.replay.as_deref(), q.from.as_deref(), q.to.as_deref(), "24h", now);
    let (replay, replay_error, range_for_form) = match (&q.replay, range) {
        (_, Err(e)) => (None, Some(e), TimeRange::parse(None, None, None, "24h", now).ok()),
        (None, Ok(r)) => (None, None, Some(r)),
        (Some(_), Ok(r)) if !can_replay => {
            (None, Some("Replaying needs the analyst role or higher.".to_owned()), Some(r))
        }
        (Some(_), Ok(r)) => {
            let req = ReplayRequest {
                proposal_id: Some(id),
                include_proposed: false,
                from_unix_ms: r.since.unwrap_or(0),
                to_unix_ms: r.until.unwrap_or(now),
                limit: Some(REPLAY_LIST),
            };
            match state.policy.replay(&req).await {
                Ok(rep) => {
                    let lines = rep
                        .would_deny
                        .iter()
                        .map(|w| DenyLine {
                            src: w.src_name.clone(),
                            dst: w.dst_name.clone(),
                            addrs: format!("{} → {}", w.src_addr, w.dst_addr),
                            port: format!("{}/{}", w.dst_port, w.protocol.as_str()),
                            connections: w.connections,
                            flows: w.flows,
                            last_seen: fmt_time(w.last_seen_unix_ms),
                            reasons: w.reasons.join("; "),
                        })
                        .collect();
                    let v = ReplayView {
                        range: r.describe(),
                        flows: rep.flows_evaluated,
                        connections: rep.connections_total,
                        would_deny: rep.would_deny_total,
                        truncated: rep.truncated,
                        lines,
                    };
                    (Some(v), None, Some(r))
                }
                Err(e) => (None, Some(e.to_string()), Some(r)),
            }
        }
    };
    let range_for_form = range_for_form.unwrap_or_else(TimeRange::all);
    let proposed = s.status == ProposalStatus::Proposed;
    let flagged = p
        .rules
        .iter()
        .filter(|r| !r.flags.is_empty())
        .map(|r| (r.id.clone(), format!("{} {}", r.direction.as_str(), r.rule.peer)))
        .collect();
    let page = DetailPage {
        chrome: Chrome::new(caller, "/proposals"),
        id,
        workload: s.workload.clone(),
        target: s.target.0,
        namespace: world.namespace(s.target),
        version: s.version,
        status: s.status.as_str(),
        level: p.level.as_str(),
        window: format!("{} – {} UTC", fmt_time(p.window.from_unix_ms), fmt_time(p.window.to_unix_ms)),
        converged: p.convergence.converged,
        last_new_edge: fmt_opt_time(p.convergence.last_new_edge_unix_ms),
        created: fmt_time(s.created_unix_ms),
        refreshed: fmt_time(s.refreshed_unix_ms),
        reviewer: s.reviewer.clone(),
        decided: fmt_opt_time(s.decided_unix_ms),
        comment: s.comment.clone(),
        widening: p.widening_total,
        score: risk.score,
        risk_level: risk.level(),
        reasons: reasons(&risk),
        rules,
        lints,
        removals,
        active: view
            .active
            .iter()
            .map(|a| VersionLink { id: a.proposal_id, version: a.version, status: a.status.as_str() })
            .collect(),
        cluster_policies: view.cluster_policies.iter().map(|c| format!("{}/{}", c.namespace, c.name)).collect(),
        diff_against,
        diff_text,
        yaml,
        notice,
        alert,
        can_approve: proposed && caller.may(Role::Approver),
        can_reject: proposed && caller.may(Role::Analyst),
        can_replay,
        flagged,
        comment_value,
        replay_ranges: range_for_form.choices(),
        replay_from: range_for_form.from.clone(),
        replay_to: range_for_form.to.clone(),
        replay,
        replay_error,
    };
    render_status(status, &page)
}

fn ports_text(ports: &[bulkhead_model::PortRange]) -> String {
    if ports.is_empty() {
        return "any port".to_owned();
    }
    ports.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// Each rule with its evidence, example flows and (for approved versions) use.
fn rule_views(view: &ProposalView, world: &RiskWorld, flows: &[FlowRow]) -> Vec<RuleView> {
    let record = &view.record;
    let target = record.summary.target;
    let approved = record.approved_policy.as_ref();
    record
        .proposal
        .rules
        .iter()
        .map(|r| {
            let peers: BTreeSet<Identity> = r.evidence.peers.iter().copied().collect();
            let addrs: BTreeSet<std::net::IpAddr> = r.evidence.addresses.iter().copied().collect();
            let examples = flows
                .iter()
                .filter(|f| {
                    let (local, peer, peer_addr) = match r.direction {
                        Direction::Ingress => (f.dst_identity, f.src_identity, f.flow.src_addr),
                        Direction::Egress => (f.src_identity, f.dst_identity, f.flow.dst_addr),
                    };
                    local == target
                        && (peers.contains(&peer) || addrs.contains(&peer_addr))
                        && r.rule.allows_port(f.flow.protocol, f.flow.dst_port)
                })
                .take(EXAMPLES_PER_RULE)
                .map(|f| ExampleFlow {
                    at: fmt_time(f.flow.last_seen_unix_ms),
                    src: format!("{} ({})", world.name(f.src_identity), f.flow.src_addr),
                    dst: format!("{} ({})", world.name(f.dst_identity), f.flow.dst_addr),
                    port: format!("{}/{}", f.flow.dst_port, f.flow.protocol.as_str()),
                    connections: f.flow.connections,
                    comm: f.flow.comm.clone(),
                    node: f.node_id.clone(),
                })
                .collect();
            let mut named: Vec<String> = r.evidence.peers.iter().map(|p| world.name(*p)).collect();
            named.extend(r.evidence.addresses.iter().map(ToString::to_string));
            let more_peers = named.len().saturating_sub(NAMED_PEERS);
            named.truncate(NAMED_PEERS);
            // Use reported by enforcers: the hits of the approved rule equal to this one.
            let hits = approved
                .and_then(|a| a.rules(r.direction))
                .and_then(|rules| rules.iter().position(|x| *x == r.rule))
                .map(|index| {
                    view.rule_hits
                        .iter()
                        .filter(|h| {
                            h.rule.proposal_id == record.summary.id
                                && h.rule.direction == r.direction
                                && h.rule.rule_index as usize == index
                        })
                        .map(|h| h.hits)
                        .sum()
                });
            RuleView {
                id: r.id.clone(),
                direction: r.direction.as_str(),
                peer: match &r.rule.peer {
                    Peer::Workloads { selector } => format!("workloads {selector}"),
                    other => other.to_string(),
                },
                ports: ports_text(&r.rule.ports),
                included: r.included,
                flags: r.flags.iter().map(|f| f.describe()).collect(),
                connections: r.evidence.connections,
                bytes: fmt_bytes(r.evidence.bytes),
                first_seen: fmt_time(r.evidence.first_seen_unix_ms),
                last_seen: fmt_time(r.evidence.last_seen_unix_ms),
                peers: named,
                more_peers,
                widens_total: r.widens_total,
                examples,
                hits,
                http: http_views(r),
            }
        })
        .collect()
}

/// The HTTP rules of a proposed rule with their evidence (matched by rule, so a
/// missing or reordered evidence list never shows the wrong numbers).
fn http_views(r: &bulkhead_model::ProposedRule) -> Vec<HttpView> {
    r.rule
        .http
        .iter()
        .map(|h| {
            let ev = r.evidence.http.iter().find(|e| &e.rule == h);
            let (path, kind) = match &h.path {
                HttpPath::Any => ("any path".to_owned(), "any"),
                HttpPath::Exact(p) => (p.clone(), "exact"),
                HttpPath::Prefix(p) => (format!("{p}*"), "prefix"),
            };
            let note = match ev {
                Some(e) if e.generalized && kind == "prefix" => {
                    format!("prefix generalized from {} observed paths; also allows paths never seen", e.paths)
                }
                Some(e) if e.paths > 1 => format!("{} observed paths", e.paths),
                Some(_) => String::new(),
                None => "no requests observed in the window".to_owned(),
            };
            HttpView {
                method: h.method.clone().unwrap_or_else(|| "any method".to_owned()),
                path,
                requests: ev.map(|e| e.requests.to_string()).unwrap_or_default(),
                first_seen: ev.map(|e| fmt_time(e.first_seen_unix_ms)).unwrap_or_default(),
                last_seen: ev.map(|e| fmt_time(e.last_seen_unix_ms)).unwrap_or_default(),
                note,
            }
        })
        .collect()
}

// === decisions ===

/// The form body's pairs (repeated keys kept).
fn form_pairs(body: &Bytes) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body).unwrap_or_default()
}

fn field<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn comment_of(pairs: &[(String, String)]) -> String {
    field(pairs, "comment").unwrap_or_default().trim().chars().take(MAX_COMMENT_CHARS).collect()
}

/// POST /proposals/{id}/approve (approvers). Fields: `comment`, and `rule:<id>` =
/// `confirm` | `drop` for each flagged rule.
pub async fn approve(caller: Approver, State(state): State<AppState>, Path(id): Path<i64>, body: Bytes) -> Response {
    let pairs = form_pairs(&body);
    let comment = comment_of(&pairs);
    let mut a = Approval { comment: (!comment.is_empty()).then(|| comment.clone()), ..Approval::default() };
    for (k, v) in &pairs {
        if let Some(rule) = k.strip_prefix("rule:") {
            match v.as_str() {
                "confirm" => a.confirm.push(rule.to_owned()),
                "drop" => a.drop.push(rule.to_owned()),
                _ => {}
            }
        }
    }
    match state.policy.approve(id, &a, caller.actor(), unix_ms()).await {
        Ok(_) => redirect_see_other(&format!("/proposals/{id}?outcome=approved")),
        Err(e) => refused(&state, &caller, id, e, comment).await,
    }
}

/// POST /proposals/{id}/reject (analysts and up). Field: `comment` (required).
pub async fn reject(caller: Analyst, State(state): State<AppState>, Path(id): Path<i64>, body: Bytes) -> Response {
    let pairs = form_pairs(&body);
    let comment = comment_of(&pairs);
    if comment.is_empty() {
        let alert = Some("Rejecting needs a comment saying why.".to_owned());
        return detail_page(
            &state,
            &caller,
            id,
            &DetailParams::default(),
            None,
            alert,
            comment,
            StatusCode::BAD_REQUEST,
        )
        .await;
    }
    match state.policy.reject(id, &comment, caller.actor(), unix_ms()).await {
        Ok(_) => redirect_see_other(&format!("/proposals/{id}?outcome=rejected")),
        Err(e) => refused(&state, &caller, id, e, comment).await,
    }
}

/// The detail page again, with why a decision was refused.
async fn refused(state: &AppState, caller: &Caller, id: i64, e: PolicyError, comment: String) -> Response {
    let (status, msg) = match &e {
        PolicyError::NoSuchProposal { .. } => return super::error::page(StatusCode::NOT_FOUND, "no such proposal"),
        PolicyError::Approve(err) => (StatusCode::BAD_REQUEST, err.to_string()),
        PolicyError::Store(StoreError::InvalidTransition { from, .. }) => {
            (StatusCode::CONFLICT, format!("This version is already {}; nothing was changed.", from.as_str()))
        }
        PolicyError::Store(StoreError::CommentRequired { .. }) => {
            (StatusCode::BAD_REQUEST, "Rejecting needs a comment saying why.".to_owned())
        }
        PolicyError::InvalidRequest { reason } => (StatusCode::BAD_REQUEST, reason.clone()),
        PolicyError::Forbidden { needed } => {
            (StatusCode::FORBIDDEN, format!("This needs the {} role or higher.", needed.as_str()))
        }
        other => {
            tracing::error!(error = %other, id, "Deciding a proposal failed.");
            return super::error::page(StatusCode::SERVICE_UNAVAILABLE, "the store is unavailable; try again");
        }
    };
    detail_page(state, caller, id, &DetailParams::default(), None, Some(msg), comment, status).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_pairs_keep_repeats_and_trim_comments() {
        let body = Bytes::from_static(b"comment=+ok%21+&rule%3Aegress-1=confirm&rule%3Aegress-2=drop&csrf=x");
        let pairs = form_pairs(&body);
        assert_eq!(comment_of(&pairs), "ok!");
        assert_eq!(field(&pairs, "rule:egress-2"), Some("drop"));
        assert_eq!(comment_of(&form_pairs(&Bytes::from_static(b"comment=%20%20"))), "");
    }
}
