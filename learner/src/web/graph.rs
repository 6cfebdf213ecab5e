//! `/api/v1/graph`: the service graph aggregated on the server, at one of three levels
//! (see [`GraphLevel`]), for all time or a past range, with every edge's verdict class
//! (see [`crate::policy::graph_view`]).
//!
//! * `level=namespace` (default): namespaces as nodes, plus reserved identities (world,
//!   host, …) and CIDR groups on their own;
//! * `level=workload`: workloads as nodes inside their namespace (compound nodes); with
//!   `namespace=X`, X's workloads and everything outside X folded per namespace;
//! * `level=endpoint&workload=ID`: one workload's endpoints and its peers, outside
//!   addresses by address, from the flows recorded in the range (retention window).
//!
//! `since_ms` / `until_ms` pick the range: an edge is shown when it was active in it;
//! its counters are the edge's totals (the endpoint level counts the range's flows).
//! Past [`Limits`] (2,000 nodes or 10,000 edges; a request may ask for less with
//! `max_nodes` / `max_edges`) the answer is `"truncated": true` with the
//! [`TRUNCATED_EDGES`] busiest edges, one per identity pair and port, and the page
//! shows a table instead.
//!
//! The store reads the range's edges (`store::graph`: on SQLite from the state's
//! [`EdgeMirror`](crate::store::EdgeMirror), which only reads what changed since the
//! last request); they are folded here into buckets between groups, and the policy set
//! is asked about the edges an active policy covers, through the state's
//! [`CoverageCache`](crate::policy::graph_view::CoverageCache) (decisions are kept while
//! the policies, identities and modes they came from are unchanged). Both are exact: an
//! answer reflects every batch, approval and mode change committed before the request.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use axum::extract::{Query, State};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use bulkhead_model::{Direction, Edge, EdgeKey, Identity, Labels, Policy, Protocol, RolloutMode};
use bulkhead_synth::{Connection, Evaluator, IdentityInfo, IdentityKind};
use serde::Deserialize;

use super::AppState;
use super::api::ApiError;
use super::auth::Viewer;
use crate::identity::inventory::CIDR_GROUP_KEY;
use crate::policy::graph_view::{
    CoverageLookup, Drill, GraphBuilder, GraphEdge, GraphLevel, GraphNode, GraphView, Limits, Member, Members, NodeKey,
    NodeKind, Observed, PolicyRef, TRUNCATED_EDGES, Totals, Traffic, coverage, fold_edges, grouped_size, identity_name,
    namespace_key, top_edges, truncate,
};
use crate::policy::inputs::SERVICE_ACCOUNT_KEY;
use crate::store::{
    EdgeVerdictRow, EndpointRow, GraphEdgeQuery, GraphEdges, IdentityRow, MAX_PROPOSAL_PAGE, ProposalQuery, StoreError,
};

/// Verdict-event tuples read per answer (most denies first).
const MAX_EVENT_ROWS: u32 = 100_000;
/// Flow aggregates read for the endpoint level.
const MAX_ENDPOINT_ROWS: u32 = 20_000;
/// Outside addresses drawn one by one at the endpoint level; the rest fold into `world`.
const MAX_ADDRESS_NODES: usize = 50;
/// Proposal pages read for node details (newest first).
const MAX_PROPOSAL_PAGES: usize = 20;

pub fn routes() -> Router<AppState> {
    Router::new().route("/graph", get(graph))
}

/// Query parameters of `/api/v1/graph` (see the module docs).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GraphParams {
    pub level: Option<String>,
    pub namespace: Option<String>,
    pub workload: Option<u32>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub max_nodes: Option<usize>,
    pub max_edges: Option<usize>,
}

async fn graph(
    _: Viewer,
    State(s): State<AppState>,
    Query(p): Query<GraphParams>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(build(&s, &p).await?))
}

/// Everything the levels share: who is who, what policy is in force, what mode.
struct Context {
    identities: Vec<IdentityRow>,
    endpoints: Vec<EndpointRow>,
    names: HashMap<Identity, String>,
    modes: HashMap<Identity, RolloutMode>,
    /// Per target: its policy in force (newest approved or deployed).
    active: BTreeMap<Identity, (PolicyRef, Policy)>,
    latest: HashMap<Identity, PolicyRef>,
    infos: Vec<IdentityInfo>,
    external: HashSet<Identity>,
    with_endpoints: HashSet<Identity>,
}

impl Context {
    async fn load(state: &AppState) -> Result<Context, ApiError> {
        let store = &state.store;
        // Newest first: the first version seen per target is its latest.
        let proposals = async {
            let mut latest = HashMap::new();
            let mut proposal_names: HashMap<Identity, String> = HashMap::new();
            let mut before_id = None;
            for _ in 0..MAX_PROPOSAL_PAGES {
                let q = ProposalQuery { limit: MAX_PROPOSAL_PAGE, before_id, ..Default::default() };
                let page = store.proposals(&q).await?;
                for s in &page {
                    latest.entry(s.target).or_insert(PolicyRef {
                        proposal_id: s.id,
                        version: s.version,
                        status: s.status,
                    });
                    proposal_names.entry(s.target).or_insert_with(|| s.workload.clone());
                }
                if page.len() < MAX_PROPOSAL_PAGE as usize {
                    break;
                }
                before_id = page.last().map(|s| s.id);
            }
            Ok::<_, StoreError>((latest, proposal_names))
        };
        // Independent reads, at once (the store's readers are a pool).
        let (identities, endpoints, modes, active_rows, (latest, proposal_names)) = tokio::try_join!(
            store.identities(),
            store.endpoints(),
            store.rollout_modes(),
            store.active_policies(),
            proposals
        )?;
        let modes = modes.into_iter().map(|r| (r.target, r.mode)).collect();
        let mut active: BTreeMap<Identity, (PolicyRef, Policy)> = BTreeMap::new();
        for a in active_rows {
            let r = PolicyRef { proposal_id: a.proposal_id, version: a.version, status: a.status };
            match active.get(&a.target) {
                Some((old, _)) if old.version >= a.version => {}
                _ => {
                    active.insert(a.target, (r, a.policy));
                }
            }
        }
        let mut given: HashMap<Identity, &str> = HashMap::new();
        for e in &endpoints {
            if let Some(w) = &e.workload {
                given.entry(e.identity).or_insert(w.as_str());
            }
        }
        let mut names = HashMap::with_capacity(identities.len());
        let mut infos = Vec::with_capacity(identities.len());
        let mut external = HashSet::new();
        for row in &identities {
            let given = given.get(&row.id).copied().or_else(|| proposal_names.get(&row.id).map(String::as_str));
            let name = identity_name(row.id, &row.labels, given);
            if row.id.is_reserved() {
                names.insert(row.id, name);
                continue;
            }
            let kind = match row.labels.get(CIDR_GROUP_KEY) {
                Some(group) => {
                    external.insert(row.id);
                    IdentityKind::CidrGroup { cidrs: state.policy.inventory.cidrs_of(group) }
                }
                None => IdentityKind::Workload,
            };
            infos.push(IdentityInfo {
                id: row.id,
                name: name.clone(),
                labels: row.labels.clone(),
                kind,
                kubernetes: row.labels.get(SERVICE_ACCOUNT_KEY).is_some(),
                service_backend: false,
            });
            names.insert(row.id, name);
        }
        let with_endpoints = endpoints.iter().map(|e| e.identity).collect();
        Ok(Context { identities, endpoints, names, modes, active, latest, infos, external, with_endpoints })
    }

    fn name(&self, id: Identity) -> String {
        self.names.get(&id).cloned().unwrap_or_else(|| identity_name(id, &Labels::default(), None))
    }

    fn is_external(&self, id: Identity) -> bool {
        id == Identity::WORLD || self.external.contains(&id)
    }

    fn enforcing(&self, id: Identity) -> bool {
        self.modes.get(&id) == Some(&RolloutMode::Enforce)
    }

    /// The node an identity stands for on its own.
    fn identity_node(&self, id: Identity, labels: Option<&Labels>) -> GraphNode {
        let key = NodeKey::Identity(id);
        let name = self.name(id);
        if id.is_reserved() {
            return GraphNode::new(&key, name, NodeKind::Reserved);
        }
        if self.external.contains(&id) {
            return GraphNode::new(&key, name, NodeKind::External);
        }
        let mut n = GraphNode::new(&key, name, NodeKind::Workload);
        n.identity = Some(id.0);
        if let Some(l) = labels {
            n.namespace = l.namespace().map(str::to_owned);
            n.labels = l.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
        }
        n.mode = Some(self.modes.get(&id).copied().unwrap_or(RolloutMode::Learn));
        n.policy = self.active.get(&id).map(|a| a.0);
        n.proposal = self.latest.get(&id).copied();
        n.drill = Some(Drill { level: GraphLevel::Endpoint, namespace: None, workload: Some(id.0) });
        n.flows_href = Some(format!("/flows?workload={}", id.0));
        n
    }

    fn namespace_node(&self, key: &NodeKey, workloads: u64) -> GraphNode {
        match key {
            NodeKey::Namespace(ns) => {
                let mut n = GraphNode::new(key, ns.clone(), NodeKind::Namespace);
                n.namespace = Some(ns.clone());
                n.workloads = Some(workloads);
                n.drill = Some(Drill { level: GraphLevel::Workload, namespace: Some(ns.clone()), workload: None });
                n.flows_href = Some(format!("/flows?{}", encode(&[("ns", ns)])));
                n
            }
            NodeKey::NoNamespace => {
                let mut n = GraphNode::new(key, "(no namespace)", NodeKind::Namespace);
                n.workloads = Some(workloads);
                n
            }
            NodeKey::Identity(id) => self.identity_node(*id, None),
            other => GraphNode::new(other, other.id(), NodeKind::External),
        }
    }
}

fn encode(pairs: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(pairs).unwrap_or_default()
}

/// Which directions of an identity an active policy covers.
fn covered(ev: &Evaluator<'_>, id: Identity) -> (bool, bool) {
    let policies = ev.policies();
    let mut out = (false, false);
    for &n in ev.selecting(id).iter() {
        if let Some(p) = policies.get(n) {
            out.0 |= p.egress.is_some();
            out.1 |= p.ingress.is_some();
        }
    }
    out
}

/// The answer of `/api/v1/graph` for `p`.
pub async fn build(state: &AppState, p: &GraphParams) -> Result<GraphView, ApiError> {
    let level = match p.level.as_deref().filter(|l| !l.is_empty()) {
        Some(l) => l.parse::<GraphLevel>().map_err(ApiError::BadRequest)?,
        None => GraphLevel::Namespace,
    };
    if let (Some(s), Some(u)) = (p.since_ms, p.until_ms)
        && s > u
    {
        return Err(ApiError::BadRequest("the range ends before it starts (since_ms > until_ms)".into()));
    }
    let defaults = Limits::default();
    let limits = Limits {
        max_nodes: p.max_nodes.unwrap_or(defaults.max_nodes).clamp(1, defaults.max_nodes),
        max_edges: p.max_edges.unwrap_or(defaults.max_edges).clamp(1, defaults.max_edges),
    };
    let namespace = p.namespace.clone().filter(|n| !n.is_empty());
    if level == GraphLevel::Endpoint && p.workload.is_none() {
        return Err(ApiError::BadRequest("level=endpoint needs workload=<identity>".into()));
    }
    let started = std::time::Instant::now();
    // Without a namespace scope the edges read needs nothing from the context: both at
    // once. (An identity allocated in between only leaves its edges out until the next
    // read, as if the edges had been read a moment earlier.)
    let unscoped = level == GraphLevel::Namespace || (level == GraphLevel::Workload && namespace.is_none());
    let (ctx, read) = if unscoped {
        let (ctx, read) = tokio::try_join!(Context::load(state), async {
            Ok::<_, ApiError>(Some(read_edges(state, p, None).await?))
        })?;
        (ctx, read)
    } else {
        (Context::load(state).await?, None)
    };
    let policies: Vec<Policy> = ctx.active.values().map(|(_, p)| p.clone()).collect();
    let mut view = GraphView {
        level,
        namespace: namespace.clone(),
        workload: p.workload,
        since_ms: p.since_ms,
        until_ms: p.until_ms,
        source: "edges",
        truncated: false,
        limits,
        totals: Totals::default(),
        nodes: Vec::new(),
        edges: Vec::new(),
    };
    match level {
        GraphLevel::Endpoint => {
            let workload = Identity(p.workload.unwrap_or_default());
            let fqdn = dns_map(state, p.since_ms).await?;
            let ev = Evaluator::new(&policies, &ctx.infos, &fqdn);
            view.source = "flows";
            endpoint_level(state, &ctx, &ev, workload, p, &mut view).await?;
        }
        _ => {
            let fqdn = BTreeMap::new();
            let ev = Evaluator::new(&policies, &ctx.infos, &fqdn);
            grouped_level(state, &ctx, &ev, p, read, &mut view).await?;
        }
    }
    tracing::debug!(
        level = level.as_str(),
        nodes = view.nodes.len(),
        edges = view.edges.len(),
        truncated = view.truncated,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "Built the service graph."
    );
    Ok(view)
}

/// DNS names and the addresses they resolved to since `since` (FQDN rules at the
/// endpoint level, where outside addresses are known).
async fn dns_map(state: &AppState, since: Option<i64>) -> Result<BTreeMap<String, Vec<IpAddr>>, ApiError> {
    let mut m: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for a in state.store.dns_answers(since.unwrap_or(0)).await? {
        let v = m.entry(a.name).or_default();
        if !v.contains(&a.addr) {
            v.push(a.addr);
        }
    }
    Ok(m)
}

/// The range's edges and verdict events (`scope`: only those touching these identities).
async fn read_edges(
    state: &AppState,
    p: &GraphParams,
    scope: Option<Vec<Identity>>,
) -> Result<(GraphEdges, Vec<EdgeVerdictRow>), ApiError> {
    let events = state.store.graph_verdicts(p.since_ms, p.until_ms, scope.as_deref(), false, MAX_EVENT_ROWS);
    let q = GraphEdgeQuery { since_unix_ms: p.since_ms, until_unix_ms: p.until_ms, scope: scope.clone() };
    Ok(tokio::try_join!(state.store.graph_edges(&q, &state.graph_edges), events)?)
}

/// The namespace and workload levels (`view.level`, scoped to `view.namespace`): a
/// grouping of the range's edges (`read`: already read, unscoped).
async fn grouped_level(
    state: &AppState,
    ctx: &Context,
    ev: &Evaluator<'_>,
    p: &GraphParams,
    read: Option<(GraphEdges, Vec<EdgeVerdictRow>)>,
    view: &mut GraphView,
) -> Result<(), ApiError> {
    let (level, namespace) = (view.level, view.namespace.clone());
    let namespace = namespace.as_deref();
    let mut builder = GraphBuilder::new();
    // Group number → builder node index (and the identity, for a group of one);
    // identity → its place.
    let mut group_nodes: Vec<usize> = Vec::new();
    let mut group_identity: Vec<Option<Identity>> = Vec::new();
    let mut group_of_key: HashMap<NodeKey, u32> = HashMap::new();
    let mut members = Members::default();
    let mut ns_workloads: HashMap<NodeKey, u64> = HashMap::new();
    for row in &ctx.identities {
        if !row.id.is_reserved() && !ctx.is_external(row.id) {
            *ns_workloads.entry(namespace_key(row.id, &row.labels, false)).or_default() += 1;
        }
    }
    let scoped = level == GraphLevel::Workload && namespace.is_some();
    for row in &ctx.identities {
        let id = row.id;
        let ns_key = namespace_key(id, &row.labels, ctx.is_external(id));
        let own = matches!(ns_key, NodeKey::Namespace(_) | NodeKey::NoNamespace);
        let in_scope = scoped && row.labels.namespace() == namespace;
        let workloads = ns_workloads.get(&ns_key).copied().unwrap_or(0);
        let (key, keep) = if level == GraphLevel::Workload && own && (!scoped || in_scope) {
            // A workload of its own, inside its namespace.
            if builder.find(&ns_key.id()).is_none() {
                builder.node(ctx.namespace_node(&ns_key, workloads), false);
            }
            (NodeKey::Identity(id), in_scope && ctx.with_endpoints.contains(&id))
        } else {
            (ns_key.clone(), level == GraphLevel::Namespace && own && workloads > 0)
        };
        let group = match group_of_key.get(&key) {
            Some(g) => {
                if keep {
                    builder.keep(group_nodes[*g as usize]);
                }
                *g
            }
            None => {
                let node = match &key {
                    NodeKey::Identity(_) if own => {
                        let mut n = ctx.identity_node(id, Some(&row.labels));
                        n.parent = Some(ns_key.id());
                        n
                    }
                    _ => ctx.namespace_node(&key, workloads),
                };
                let g = group_nodes.len() as u32;
                group_nodes.push(builder.node(node, keep));
                group_identity.push(match key {
                    NodeKey::Identity(id) => Some(id),
                    _ => None,
                });
                group_of_key.insert(key, g);
                g
            }
        };
        let (decide_src, decide_dst) = covered(ev, id);
        members.insert(id, Member { group, decide_src, decide_dst, in_scope });
    }
    let (edges, events) = match read {
        Some(read) if !scoped => read,
        _ => {
            let scope = scoped.then(|| members.iter().filter(|(_, m)| m.in_scope).map(|(id, _)| id).collect());
            read_edges(state, p, scope).await?
        }
    };
    let labels: HashMap<Identity, &Labels> = ctx.identities.iter().map(|r| (r.id, &r.labels)).collect();
    // Decisions of earlier requests hold while what they were made from is unchanged.
    let enforcing = ctx.modes.iter().filter(|(_, m)| **m == RolloutMode::Enforce).map(|(id, _)| *id);
    let known = state.graph_coverage.generation(ev.policies(), &ctx.infos, enforcing);
    let decide = |k: &EdgeKey| {
        let conn = connection(k.src, k.dst, k.dst_port, k.protocol);
        coverage(ev, &conn, ctx.is_external(k.src) || ctx.is_external(k.dst), |id| ctx.enforcing(id))
    };
    known.with(edges.list_name(), decide, |coverage_of| {
        // Only a grouping that could exceed the limits is measured first.
        let (groups, limits) = (group_nodes.len(), view.limits);
        if groups > limits.max_nodes || groups.saturating_mul(groups) > limits.max_edges {
            let size = grouped_size(&edges, &members, scoped);
            if size.groups as usize > limits.max_nodes || size.pairs as usize > limits.max_edges {
                view.totals = Totals { nodes: size.groups, edges: size.pairs };
                let top = top_edges(&edges, &members, scoped, TRUNCATED_EDGES.min(limits.max_edges));
                truncated(ctx, &labels, &top, &events, coverage_of, view);
                return;
            }
        }
        let buckets = fold_edges(&edges, &members, scoped, coverage_of);
        let rows = buckets.len();
        for (k, (t, c)) in buckets {
            let (Some(&s), Some(&d)) = (group_nodes.get(k.src_group as usize), group_nodes.get(k.dst_group as usize))
            else {
                continue;
            };
            builder.traffic(s, d, k.protocol, k.dst_port, t, Some(c));
            if let Some(Some(src)) = group_identity.get(k.src_group as usize) {
                link(&mut builder, s, d, *src);
            }
        }
        for e in &events {
            let node = |builder: &mut GraphBuilder, id: Identity| match members.get(id) {
                Some(m) => group_nodes[m.group as usize],
                None => builder.node(ctx.identity_node(id, labels.get(&id).copied()), false),
            };
            let (s, d) = (node(&mut builder, e.src), node(&mut builder, e.dst));
            let c = coverage_of(None, &EdgeKey { src: e.src, dst: e.dst, dst_port: e.dst_port, protocol: e.protocol });
            builder.events(s, d, e.protocol, e.dst_port, Observed { audit: e.audit, denied: e.denied }, Some(c));
        }
        let (nodes, drawn) = builder.finish();
        tracing::debug!(
            edges = edges.len(),
            rows,
            events = events.len(),
            nodes = nodes.len(),
            drawn = drawn.len(),
            "Folded the service graph."
        );
        finish(view, nodes, drawn);
    });
    Ok(())
}

/// A flows-page link for an edge from one identity's node: the initiator's flows (the
/// flows page matches either end), on the edge's port when it has only one.
fn link(builder: &mut GraphBuilder, s: usize, d: usize, src: Identity) {
    builder.link(s, d, format!("/flows?workload={}", src.0));
}

fn connection(src: Identity, dst: Identity, port: u16, protocol: Protocol) -> Connection {
    Connection { src, dst, src_addr: None, dst_addr: None, dst_port: port, protocol }
}

/// Sets nodes and edges, truncating past the limits.
fn finish(view: &mut GraphView, nodes: Vec<GraphNode>, edges: Vec<GraphEdge>) {
    if view.totals == Totals::default() {
        view.totals = Totals { nodes: nodes.len() as u64, edges: edges.len() as u64 };
    }
    if nodes.len() > view.limits.max_nodes || edges.len() > view.limits.max_edges {
        let (nodes, edges) = truncate(nodes, edges, TRUNCATED_EDGES.min(view.limits.max_edges));
        view.truncated = true;
        view.nodes = nodes;
        view.edges = edges;
    } else {
        view.nodes = nodes;
        view.edges = edges;
    }
}

/// Too large to draw: the busiest edges (`top`, busiest first), one per identity pair
/// and port.
fn truncated(
    ctx: &Context,
    labels: &HashMap<Identity, &Labels>,
    top: &[Edge],
    events: &[EdgeVerdictRow],
    coverage_of: &mut CoverageLookup<'_>,
    view: &mut GraphView,
) {
    let observed: HashMap<(Identity, Identity, u16, Protocol), Observed> = events
        .iter()
        .map(|e| ((e.src, e.dst, e.dst_port, e.protocol), Observed { audit: e.audit, denied: e.denied }))
        .collect();
    let mut builder = GraphBuilder::new();
    for e in top {
        let k = e.key;
        let s = builder.node(ctx.identity_node(k.src, labels.get(&k.src).copied()), false);
        let d = builder.node(ctx.identity_node(k.dst, labels.get(&k.dst).copied()), false);
        let t = Traffic {
            edges: 1,
            connections: e.connections,
            bytes: e.bytes,
            first_seen_unix_ms: e.first_seen_unix_ms,
            last_seen_unix_ms: e.last_seen_unix_ms,
        };
        builder.traffic(s, d, k.protocol, k.dst_port, t, Some(coverage_of(None, &k)));
        if let Some(o) = observed.get(&(k.src, k.dst, k.dst_port, k.protocol)) {
            builder.events(s, d, k.protocol, k.dst_port, *o, None);
        }
        link(&mut builder, s, d, k.src);
    }
    let (nodes, mut edges) = builder.finish();
    // Identity pairs folded over ports: the busiest first, as `top` was ordered.
    edges.truncate(top.len());
    view.truncated = true;
    view.nodes = nodes;
    view.edges = edges;
}

/// One flow aggregate folded over the two reporting sides (max, not sum: both ends may
/// report the same connections).
#[derive(Debug, Default, Clone, Copy)]
struct Sides {
    connections: [u64; 2],
    bytes: [u64; 2],
    first: i64,
    last: i64,
}

/// The endpoint level: one workload's endpoints and peers, from its flows.
async fn endpoint_level(
    state: &AppState,
    ctx: &Context,
    ev: &Evaluator<'_>,
    workload: Identity,
    p: &GraphParams,
    view: &mut GraphView,
) -> Result<(), ApiError> {
    let labels: HashMap<Identity, &Labels> = ctx.identities.iter().map(|r| (r.id, &r.labels)).collect();
    let Some(w_labels) = labels.get(&workload).copied().filter(|_| !workload.is_reserved()) else {
        return Err(ApiError::NotFound(format!("workload {} does not exist", workload.0)));
    };
    let rows = state.store.graph_endpoint_flows(workload, p.since_ms, p.until_ms, MAX_ENDPOINT_ROWS).await?;
    let events = state.store.graph_verdicts(p.since_ms, p.until_ms, Some(&[workload]), true, MAX_EVENT_ROWS).await?;

    let mut builder = GraphBuilder::new();
    let mut parent = ctx.identity_node(workload, Some(w_labels));
    parent.drill = None;
    let parent_id = parent.id.clone();
    builder.node(parent, true);
    let mut by_addr: HashMap<IpAddr, usize> = HashMap::new();
    for e in ctx.endpoints.iter().filter(|e| e.identity == workload) {
        let key = NodeKey::Endpoint { node: e.node_id.clone(), netns_ino: e.fact.netns_ino };
        let name = e
            .fact
            .netns_name
            .clone()
            .or_else(|| e.workload.clone())
            .unwrap_or_else(|| format!("netns {}", e.fact.netns_ino));
        let mut n = GraphNode::new(&key, format!("{name} @ {}", e.node_id), NodeKind::Endpoint);
        n.parent = Some(parent_id.clone());
        n.host = Some(e.node_id.clone());
        n.identity = Some(workload.0);
        n.addresses = e.fact.addresses.iter().map(|a| a.addr.to_string()).collect();
        n.flows_href = Some(format!("/flows?workload={}", workload.0));
        let idx = builder.node(n, true);
        for a in &e.fact.addresses {
            by_addr.entry(a.addr).or_insert(idx);
        }
    }

    // Fold the two reporting sides of each connection tuple.
    type Key = (Identity, Identity, IpAddr, IpAddr, u16, Protocol);
    let mut folded: BTreeMap<Key, Sides> = BTreeMap::new();
    for r in &rows {
        let s = folded.entry((r.src, r.dst, r.src_addr, r.dst_addr, r.dst_port, r.protocol)).or_insert(Sides {
            first: r.first_seen_unix_ms,
            last: r.last_seen_unix_ms,
            ..Sides::default()
        });
        let side = usize::from(r.direction == Direction::Ingress);
        s.connections[side] = s.connections[side].saturating_add(r.connections);
        s.bytes[side] = s.bytes[side].saturating_add(r.bytes);
        s.first = s.first.min(r.first_seen_unix_ms);
        s.last = s.last.max(r.last_seen_unix_ms);
    }
    // The busiest outside addresses get nodes of their own.
    let mut outside: HashMap<IpAddr, u64> = HashMap::new();
    for ((src, dst, sa, da, ..), s) in &folded {
        let c = s.connections[0].max(s.connections[1]);
        if *src != workload && ctx.is_external(*src) {
            *outside.entry(*sa).or_default() += c;
        }
        if *dst != workload && ctx.is_external(*dst) {
            *outside.entry(*da).or_default() += c;
        }
    }
    let mut outside: Vec<(IpAddr, u64)> = outside.into_iter().collect();
    outside.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let shown: HashSet<IpAddr> = outside.iter().take(MAX_ADDRESS_NODES).map(|(a, _)| *a).collect();

    let node_for = |builder: &mut GraphBuilder, id: Identity, addr: Option<IpAddr>| -> usize {
        if id == workload {
            if let Some(i) = addr.and_then(|a| by_addr.get(&a)) {
                return *i;
            }
            let key = addr.map_or(NodeKey::Identity(id), NodeKey::Address);
            let mut n = GraphNode::new(
                &key,
                addr.map_or_else(|| "unknown endpoint".to_owned(), |a| a.to_string()),
                NodeKind::Endpoint,
            );
            n.parent = Some(parent_id.clone());
            n.identity = Some(id.0);
            return builder.node(n, false);
        }
        if ctx.is_external(id)
            && let Some(a) = addr.filter(|a| shown.contains(a))
        {
            let mut n = GraphNode::new(&NodeKey::Address(a), a.to_string(), NodeKind::External);
            n.identity = Some(id.0);
            return builder.node(n, false);
        }
        let mut n = ctx.identity_node(id, labels.get(&id).copied());
        if n.kind == NodeKind::Workload {
            n.label = match labels.get(&id).and_then(|l| l.namespace()) {
                Some(ns) if !n.label.starts_with(&format!("{ns}/")) => format!("{ns}/{}", n.label),
                _ => n.label,
            };
        }
        builder.node(n, false)
    };
    let enforcing = |id: Identity| ctx.enforcing(id);
    for ((src, dst, sa, da, port, protocol), s) in folded {
        let a = node_for(&mut builder, src, Some(sa));
        let b = node_for(&mut builder, dst, Some(da));
        let conn = Connection { src, dst, src_addr: Some(sa), dst_addr: Some(da), dst_port: port, protocol };
        let c = coverage(ev, &conn, ctx.is_external(src) || ctx.is_external(dst), enforcing);
        let t = Traffic {
            edges: 1,
            connections: s.connections[0].max(s.connections[1]),
            bytes: s.bytes[0].max(s.bytes[1]),
            first_seen_unix_ms: s.first,
            last_seen_unix_ms: s.last,
        };
        builder.traffic(a, b, protocol, port, t, Some(c));
        link(&mut builder, a, b, src);
    }
    for e in &events {
        let a = node_for(&mut builder, e.src, e.src_addr);
        let b = node_for(&mut builder, e.dst, e.dst_addr);
        let conn = Connection {
            src: e.src,
            dst: e.dst,
            src_addr: e.src_addr,
            dst_addr: e.dst_addr,
            dst_port: e.dst_port,
            protocol: e.protocol,
        };
        let c = coverage(ev, &conn, ctx.is_external(e.src) || ctx.is_external(e.dst), enforcing);
        builder.events(a, b, e.protocol, e.dst_port, Observed { audit: e.audit, denied: e.denied }, Some(c));
    }
    let (nodes, edges) = builder.finish();
    finish(view, nodes, edges);
    Ok(())
}
