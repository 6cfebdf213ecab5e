//! The policy side of the analysts' UI through the real router (`oneshot`): the service
//! graph (`/api/v1/graph` at every level, time ranges, the table fallback, the `/graph`
//! page), the proposal review pages (risk-ranked queue, detail with replay, YAML, diff,
//! approve / reject forms and their roles), the rollout page and its forms, escaping of
//! attacker-controlled labels on every page, and the vendored graph library.
//!
//! The seeded scenario (DESIGN.md §9 plus a few neighbours), all at fixed times from
//! [`T0`], so nothing depends on the wall clock:
//! * namespace `default`: deathstar, tiefighter, xwing, and a workload whose `app` label
//!   is `<script>alert(1)</script>` ("spy");
//! * namespace `kube-system`: coredns;
//! * edges: tiefighter → deathstar :80 (an approved policy allows it), xwing →
//!   deathstar :80 (the policy does not; the enforcer reported audit events), spy →
//!   deathstar :8080 (denied events), tiefighter → coredns :53/udp (no policy), and,
//!   much later, xwing → world :443 (no policy).
//!
//! The graph store queries run on SQLite and PostgreSQL (`BULKHEAD_TEST_POSTGRES_URL`,
//! set by `cargo xtask test`; the PostgreSQL cases fail, not skip, without it).

use std::collections::HashMap;
use std::net::IpAddr;

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use bulkhead_learner::auth::{self, Role};
use bulkhead_learner::store::{AuditQuery, Decision, IngestBatch, ResolvedEndpoint, ResolvedFlow, Store};
use bulkhead_learner::web::{AppState, router};
use bulkhead_model::labels::NAMESPACE_KEY;
use bulkhead_model::{
    Convergence, Direction, EndpointFact, Evidence, Flow, HygieneFlag, Identity, InterfaceAddress, LabelSelector,
    Labels, Level, Peer, Policy, PortRange, Proposal, ProposalStatus, ProposedRule, Protocol, ReservedIdentity,
    RolloutMode, Rule, Verdict, Window,
};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// Base of every seeded time (Unix ms): 2023-11-14.
const T0: i64 = 1_700_000_000_000;
const PASSWORD: &str = "correct horse battery staple";
const SCRIPT: &str = "<script>alert(1)</script>";

struct Scenario {
    store: Store,
    deathstar: Identity,
    tiefighter: Identity,
    xwing: Identity,
    spy: Identity,
    coredns: Identity,
    /// The approved proposal for deathstar.
    approved: i64,
    seq: u64,
    /// A viewer's API token.
    token: String,
    _dir: Option<tempfile::TempDir>,
    _pg: Option<bulkhead_testkit::postgres::PgTestDb>,
}

/// A logged-in browser: its cookie and a CSRF token for its forms.
struct Browser {
    cookie: String,
    csrf: String,
}

fn labels(ns: &str, pairs: &[(&str, &str)]) -> Labels {
    Labels::new(pairs.iter().copied().chain([(NAMESPACE_KEY, ns)])).expect("labels")
}

fn flow(src: &str, dst: &str, port: u16, protocol: Protocol, at: i64, connections: u64) -> Flow {
    Flow {
        src_addr: src.parse::<IpAddr>().expect("ip"),
        src_port: 0,
        dst_addr: dst.parse::<IpAddr>().expect("ip"),
        dst_port: port,
        protocol,
        direction: Direction::Egress,
        netns_ino: 1,
        cgroup_id: 0,
        pid: 7,
        comm: "curl".into(),
        connections,
        bytes_sent: 10 * connections,
        bytes_received: 20 * connections,
        packets: 3,
        verdict: Verdict::Forwarded,
        first_seen_unix_ms: at,
        last_seen_unix_ms: at + 1_000,
        http: Default::default(),
    }
}

fn endpoint(netns_ino: u64, name: &str, addr: &str, identity: Identity) -> ResolvedEndpoint {
    ResolvedEndpoint {
        fact: EndpointFact {
            netns_ino,
            netns_name: Some(name.to_owned()),
            addresses: vec![InterfaceAddress {
                interface: "eth0".into(),
                addr: addr.parse().expect("ip"),
                prefix_len: 24,
            }],
            cgroups: vec![],
            host: false,
        },
        identity,
        workload: Some(name.to_owned()),
    }
}

fn rule(id: &str, direction: Direction, peer: Peer, port: u16, protocol: Protocol, peers: &[Identity]) -> ProposedRule {
    ProposedRule {
        id: id.into(),
        direction,
        rule: Rule::l4(peer, vec![PortRange::single(protocol, port)]),
        evidence: Evidence {
            peers: peers.to_vec(),
            connections: 6,
            bytes: 60,
            first_seen_unix_ms: T0,
            last_seen_unix_ms: T0 + 1_000,
            ..Evidence::default()
        },
        flags: vec![],
        included: true,
        widens: vec![],
        widens_total: 0,
    }
}

/// A proposal for `target` in namespace `ns` made of `rules` (flagged ones left out of
/// its policy).
fn proposal(target: Identity, ns: &str, workload: &str, selector: (&str, &str), rules: Vec<ProposedRule>) -> Proposal {
    let mut ingress = None;
    let mut egress = None;
    for r in rules.iter().filter(|r| r.included) {
        let list: &mut Option<Vec<Rule>> = if r.direction == Direction::Ingress { &mut ingress } else { &mut egress };
        list.get_or_insert_with(Vec::new).push(r.rule.clone());
    }
    Proposal {
        target,
        workload: workload.into(),
        level: Level::Exact,
        window: Window { from_unix_ms: T0 - 3_600_000, to_unix_ms: T0 + 3_600_000 },
        policy: Policy {
            name: workload.replace(|c: char| !c.is_ascii_alphanumeric(), "-").to_lowercase(),
            namespace: Some(ns.into()),
            selector: LabelSelector::with_labels([selector, (NAMESPACE_KEY, ns)]),
            ingress,
            egress,
        },
        rules,
        widening_total: 0,
        convergence: Convergence { converged: true, last_new_edge_unix_ms: Some(T0), quiet_period_ms: 60_000 },
        lints: vec![],
        removals: vec![],
    }
}

fn class(v: &str) -> Peer {
    Peer::Workloads { selector: LabelSelector::with_labels([("class", v)]) }
}

impl Scenario {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&format!("sqlite://{}", dir.path().join("ui.db").display())).await.expect("store");
        let mut s = Self::seed(store).await;
        s._dir = Some(dir);
        s
    }

    async fn postgres() -> Self {
        let db = bulkhead_testkit::postgres::fresh_database().await;
        let store = Store::open(db.url()).await.expect("store");
        let mut s = Self::seed(store).await;
        s._pg = Some(db);
        s
    }

    async fn seed(store: Store) -> Self {
        let id = |l: Labels| {
            let store = store.clone();
            async move { store.ensure_identity(&l).await.expect("identity") }
        };
        let deathstar = id(labels("default", &[("org", "empire"), ("class", "deathstar")])).await;
        let tiefighter = id(labels("default", &[("org", "empire"), ("class", "tiefighter")])).await;
        let xwing = id(labels("default", &[("org", "alliance"), ("class", "xwing")])).await;
        let spy = id(labels("default", &[("app", SCRIPT), ("team", SCRIPT)])).await;
        let coredns = id(labels("kube-system", &[("k8s-app", "kube-dns")])).await;
        store.register_agent("node-1", 1).await.expect("agent");
        let (token, _) = store.create_token_user("viewer-bot", Role::Viewer, "t", "test", 1).await.expect("token");
        let mut s = Scenario {
            store,
            deathstar,
            tiefighter,
            xwing,
            spy,
            coredns,
            approved: 0,
            seq: 0,
            token: token.expose().to_owned(),
            _dir: None,
            _pg: None,
        };
        let endpoints = vec![
            endpoint(11, "deathstar", "10.202.0.10", deathstar),
            endpoint(12, "tiefighter", "10.202.0.11", tiefighter),
            endpoint(13, "xwing", "10.202.0.12", xwing),
            endpoint(14, &format!("spy{SCRIPT}"), "10.202.0.13", spy),
            endpoint(15, "coredns", "10.202.1.53", coredns),
        ];
        s.record(
            vec![
                (tiefighter, deathstar, flow("10.202.0.11", "10.202.0.10", 80, Protocol::Tcp, T0 + 1_000, 5)),
                (xwing, deathstar, flow("10.202.0.12", "10.202.0.10", 80, Protocol::Tcp, T0 + 2_000, 2)),
                (spy, deathstar, flow("10.202.0.13", "10.202.0.10", 8080, Protocol::Tcp, T0 + 2_500, 1)),
                (tiefighter, coredns, flow("10.202.0.11", "10.202.1.53", 53, Protocol::Udp, T0 + 3_000, 9)),
            ],
            Some(endpoints),
        )
        .await;
        s.record(
            vec![(xwing, Identity::WORLD, flow("10.202.0.12", "203.0.113.7", 443, Protocol::Tcp, T0 + 500_000, 4))],
            None,
        )
        .await;
        // deathstar's approved policy: tiefighter on 80/tcp only.
        let p = proposal(
            deathstar,
            "default",
            "deathstar",
            ("class", "deathstar"),
            vec![rule("ingress-0", Direction::Ingress, class("tiefighter"), 80, Protocol::Tcp, &[tiefighter])],
        );
        let rec = s.store.put_proposal(&p, T0).await.expect("proposal");
        let policy = rec.proposal.policy.clone();
        s.store
            .decide_proposal(rec.summary.id, Decision::Approve { policy }, "alice", Some("ok"), T0)
            .await
            .expect("approve");
        s.approved = rec.summary.id;
        // What the enforcer on node-1 reported: xwing audited, spy denied.
        let event = |peer: Identity, port: u16, verdict: Verdict, at: i64| bulkhead_learner::store::VerdictEventRow {
            at_unix_ms: at,
            local: deathstar,
            peer,
            direction: Direction::Ingress,
            verdict,
            src_addr: "10.202.0.12".parse().expect("ip"),
            dst_addr: "10.202.0.10".parse().expect("ip"),
            dst_port: port,
            protocol: Protocol::Tcp,
            policy_version: 1,
            rule: None,
            http: None,
        };
        let events = [
            event(xwing, 80, Verdict::Audit, T0 + 2_100),
            event(xwing, 80, Verdict::Audit, T0 + 2_200),
            event(spy, 8080, Verdict::Denied, T0 + 2_600),
        ];
        s.store.insert_verdict_events("node-1", &events, T0 + 3_000).await.expect("events");
        s
    }

    async fn record(&mut self, flows: Vec<(Identity, Identity, Flow)>, endpoints: Option<Vec<ResolvedEndpoint>>) {
        self.seq += 1;
        let received = flows.iter().map(|f| f.2.last_seen_unix_ms).max().unwrap_or(T0);
        let batch = IngestBatch {
            node_id: "node-1".into(),
            boot_id: "boot".into(),
            seq: self.seq,
            received_unix_ms: received,
            flows: flows
                .into_iter()
                .map(|(src, dst, flow)| ResolvedFlow { flow, src_identity: src, dst_identity: dst })
                .collect(),
            endpoints,
            dns_answers: vec![],
            loss: Default::default(),
        };
        self.store.ingest(&batch).await.expect("ingest");
    }

    fn state(&self) -> AppState {
        AppState::for_store(self.store.clone())
    }

    async fn send(&self, req: Request<Body>) -> Response<Body> {
        router(self.state()).oneshot(req).await.expect("response")
    }

    /// GET a JSON API path as the viewer bot.
    async fn api(&self, uri: &str) -> (StatusCode, Value) {
        let req = Request::get(uri).header("authorization", format!("Bearer {}", self.token));
        let resp = self.send(req.body(Body::empty()).expect("request")).await;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// A user with `role` and an open session.
    async fn login(&self, name: &str, role: Role) -> Browser {
        let hash = auth::hash_password(PASSWORD).expect("hash");
        let user = self.store.create_user(name, role, &hash, false, "test", 1).await.expect("user");
        let s = self.store.create_session(user.id, 3_600_000, bulkhead_learner::grpc::ingest::unix_ms()).await;
        let s = s.expect("session");
        Browser { cookie: format!("bulkhead_session={}", s.token.expose()), csrf: s.user.csrf.token().expect("csrf") }
    }

    async fn page(&self, b: &Browser, uri: &str) -> (StatusCode, String) {
        let req = Request::get(uri).header("cookie", &b.cookie).body(Body::empty()).expect("request");
        let resp = self.send(req).await;
        let status = resp.status();
        (status, body_text(resp).await)
    }

    /// POSTs an urlencoded form (the CSRF field added) and returns the response.
    async fn post(&self, b: &Browser, uri: &str, fields: &[(&str, &str)]) -> Response<Body> {
        let mut all: Vec<(&str, &str)> = fields.to_vec();
        all.push(("csrf", &b.csrf));
        let body = serde_urlencoded::to_string(&all).expect("form");
        let req = Request::post(uri)
            .header("cookie", &b.cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::from(body))
            .expect("request");
        self.send(req).await
    }

    async fn status(&self, id: i64) -> ProposalStatus {
        self.store.proposal(id).await.expect("read").expect("proposal").summary.status
    }
}

async fn body_text(resp: Response<Body>) -> String {
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn location(resp: &Response<Body>) -> String {
    resp.headers().get("location").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
}

/// Edge id → verdict class of a graph answer.
fn verdicts(graph: &Value) -> HashMap<String, String> {
    graph["edges"]
        .as_array()
        .unwrap_or_else(|| panic!("edges: {graph}"))
        .iter()
        .map(|e| {
            (e["id"].as_str().unwrap_or_default().to_owned(), e["verdict"].as_str().unwrap_or_default().to_owned())
        })
        .collect()
}

fn node_ids(graph: &Value) -> Vec<String> {
    let mut ids: Vec<String> = graph["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("nodes: {graph}"))
        .iter()
        .map(|n| n["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    ids.sort();
    ids
}

fn edge<'a>(graph: &'a Value, id: &str) -> &'a Value {
    graph["edges"]
        .as_array()
        .and_then(|es| es.iter().find(|e| e["id"] == id))
        .unwrap_or_else(|| panic!("no edge {id} in {graph}"))
}

// === graph data ===

async fn graph_levels_and_verdict_classes(s: Scenario) {
    let (ds, tf, xw, spy, dns) = (s.deathstar.0, s.tiefighter.0, s.xwing.0, s.spy.0, s.coredns.0);

    // Namespaces: default, kube-system and world; default→default folds four edges.
    let (status, g) = s.api("/api/v1/graph").await;
    assert_eq!(status, StatusCode::OK, "{g}");
    assert_eq!(g["level"], "namespace");
    assert_eq!(g["truncated"], false);
    assert_eq!(node_ids(&g), ["id:2", "ns:default", "ns:kube-system"]);
    let v = verdicts(&g);
    assert_eq!(v.len(), 3, "{g}");
    assert_eq!(v["ns:default->ns:default"], "denied", "the worst of its ports");
    assert_eq!(v["ns:default->ns:kube-system"], "nopolicy");
    assert_eq!(v["ns:default->id:2"], "nopolicy");
    let inside = edge(&g, "ns:default->ns:default");
    assert_eq!(inside["edges"], 3);
    assert_eq!(inside["connections"], 8);
    assert_eq!(inside["classes"]["denied"], 1, "{inside}");
    assert_eq!(inside["classes"]["audit"], 1, "{inside}");
    assert_eq!(inside["denied_events"], 1);
    assert_eq!(inside["audit_events"], 2);
    assert_eq!(inside["label"], "80/tcp, 8080/tcp");
    let dns_edge = edge(&g, "ns:default->ns:kube-system");
    assert_eq!(dns_edge["label"], "53/udp");
    assert_eq!(dns_edge["connections"], 9);
    let default = g["nodes"].as_array().and_then(|n| n.iter().find(|n| n["id"] == "ns:default")).expect("default");
    assert_eq!(default["workloads"], 4);
    assert_eq!(default["drill"], serde_json::json!({"level": "workload", "namespace": "default"}));

    // Workloads of default, the outside folded per namespace.
    let (status, g) = s.api("/api/v1/graph?level=workload&namespace=default").await;
    assert_eq!(status, StatusCode::OK, "{g}");
    let want: Vec<String> = {
        let mut w = vec![
            "id:2".to_owned(),
            format!("id:{ds}"),
            format!("id:{tf}"),
            format!("id:{xw}"),
            format!("id:{spy}"),
            "ns:default".to_owned(),
            "ns:kube-system".to_owned(),
        ];
        w.sort();
        w
    };
    assert_eq!(node_ids(&g), want);
    let v = verdicts(&g);
    assert_eq!(v.len(), 5, "{g}");
    assert_eq!(v[&format!("id:{tf}->id:{ds}")], "allowed");
    assert_eq!(v[&format!("id:{xw}->id:{ds}")], "audit");
    assert_eq!(v[&format!("id:{spy}->id:{ds}")], "denied");
    assert_eq!(v[&format!("id:{tf}->ns:kube-system")], "nopolicy");
    assert_eq!(v[&format!("id:{xw}->id:2")], "nopolicy");
    assert_eq!(edge(&g, &format!("id:{xw}->id:{ds}"))["basis"], "events");
    assert_eq!(edge(&g, &format!("id:{tf}->id:{ds}"))["flows_href"], format!("/flows?workload={tf}&port=80&proto=tcp"));
    let nodes = g["nodes"].as_array().expect("nodes");
    let deathstar = nodes.iter().find(|n| n["id"] == format!("id:{ds}")).expect("deathstar node");
    assert_eq!(deathstar["parent"], "ns:default");
    assert_eq!(deathstar["mode"], "learn");
    assert_eq!(deathstar["policy"]["proposal_id"], s.approved);
    assert_eq!(deathstar["policy"]["status"], "approved");
    assert_eq!(deathstar["flows_href"], format!("/flows?workload={ds}"));
    let spy_node = nodes.iter().find(|n| n["id"] == format!("id:{spy}")).expect("spy node");
    assert_eq!(spy_node["labels"]["app"], SCRIPT, "JSON carries the label as data");

    // All workloads, grouped by namespace (compound parents).
    let (status, g) = s.api("/api/v1/graph?level=workload").await;
    assert_eq!(status, StatusCode::OK, "{g}");
    let v = verdicts(&g);
    assert_eq!(v[&format!("id:{tf}->id:{dns}")], "nopolicy");
    assert_eq!(v[&format!("id:{tf}->id:{ds}")], "allowed");
    let coredns = g["nodes"].as_array().and_then(|n| n.iter().find(|n| n["id"] == format!("id:{dns}"))).expect("dns");
    assert_eq!(coredns["parent"], "ns:kube-system");
    assert!(node_ids(&g).contains(&"ns:kube-system".to_owned()), "the compound parent is sent");

    // One workload's endpoints (from its flows), peers by identity.
    let (status, g) = s.api(&format!("/api/v1/graph?level=endpoint&workload={ds}")).await;
    assert_eq!(status, StatusCode::OK, "{g}");
    assert_eq!(g["source"], "flows");
    let v = verdicts(&g);
    assert_eq!(v[&format!("id:{tf}->ep:node-1/11")], "allowed", "{g}");
    assert_eq!(v[&format!("id:{xw}->ep:node-1/11")], "audit");
    assert_eq!(v[&format!("id:{spy}->ep:node-1/11")], "denied");
    let ep = g["nodes"].as_array().and_then(|n| n.iter().find(|n| n["id"] == "ep:node-1/11")).expect("endpoint");
    assert_eq!(ep["parent"], format!("id:{ds}"));
    assert_eq!(ep["addresses"][0], "10.202.0.10");
    let (status, g) = s.api(&format!("/api/v1/graph?level=endpoint&workload={xw}")).await;
    assert_eq!(status, StatusCode::OK, "{g}");
    assert_eq!(verdicts(&g)["ep:node-1/13->addr:203.0.113.7"], "nopolicy", "outside addresses one by one");

    // Bad requests are 400, an unknown workload 404.
    assert_eq!(s.api("/api/v1/graph?level=pods").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(s.api("/api/v1/graph?level=endpoint").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(s.api("/api/v1/graph?since_ms=5&until_ms=1").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(s.api("/api/v1/graph?level=endpoint&workload=999999").await.0, StatusCode::NOT_FOUND);
    s.store.close().await;
}

async fn graph_time_ranges(s: Scenario) {
    let xw = s.xwing.0;
    // Only the late world edge was active after T0 + 400 s.
    let (status, g) = s.api(&format!("/api/v1/graph?level=workload&namespace=default&since_ms={}", T0 + 400_000)).await;
    assert_eq!(status, StatusCode::OK, "{g}");
    let v = verdicts(&g);
    assert_eq!(v.keys().cloned().collect::<Vec<_>>(), [format!("id:{xw}->id:2")], "{g}");
    // Up to T0 + 2.5 s: the first three edges, not the DNS one nor the world one; events
    // after the range do not count (spy's deny came at T0 + 2.6 s).
    let (_, g) = s.api(&format!("/api/v1/graph?level=workload&namespace=default&until_ms={}", T0 + 2_500)).await;
    let v = verdicts(&g);
    assert_eq!(v.len(), 3, "{g}");
    assert_eq!(v[&format!("id:{}->id:{}", s.spy.0, s.deathstar.0)], "audit", "predicted from the policy: {g}");
    assert_eq!(edge(&g, &format!("id:{}->id:{}", s.spy.0, s.deathstar.0))["basis"], "policy");
    assert!(!v.keys().any(|k| k.ends_with("->id:2") || k.ends_with("->ns:kube-system")), "{g}");
    // A range with nothing in it.
    let (_, g) = s.api(&format!("/api/v1/graph?since_ms={}&until_ms={}", T0 - 10_000, T0 - 5_000)).await;
    assert!(g["edges"].as_array().is_some_and(Vec::is_empty), "{g}");
    // Endpoint level over a range.
    let (_, g) =
        s.api(&format!("/api/v1/graph?level=endpoint&workload={}&until_ms={}", s.deathstar.0, T0 + 1_500)).await;
    assert_eq!(verdicts(&g).len(), 1, "only tiefighter's flow: {g}");
    s.store.close().await;
}

async fn graph_truncates_to_the_busiest_edges(s: Scenario) {
    // Three namespace-level edges against a limit of one.
    let (status, g) = s.api("/api/v1/graph?max_edges=1").await;
    assert_eq!(status, StatusCode::OK, "{g}");
    assert_eq!(g["truncated"], true, "{g}");
    assert_eq!(g["totals"]["edges"], 3);
    let edges = g["edges"].as_array().expect("edges");
    assert_eq!(edges.len(), 1, "{g}");
    assert_eq!(edges[0]["id"], format!("id:{}->id:{}", s.tiefighter.0, s.coredns.0), "the busiest (9 connections)");
    assert_eq!(edges[0]["verdict"], "nopolicy");
    // Every node an edge names is sent, so a table can name both ends.
    let ids = node_ids(&g);
    assert_eq!(ids, [format!("id:{}", s.tiefighter.0), format!("id:{}", s.coredns.0)]);
    // Workloads against a node limit.
    let (_, g) = s.api("/api/v1/graph?level=workload&max_nodes=3").await;
    assert_eq!(g["truncated"], true, "{g}");
    let v = verdicts(&g);
    assert_eq!(v[&format!("id:{}->id:{}", s.tiefighter.0, s.deathstar.0)], "allowed", "{g}");
    assert_eq!(v[&format!("id:{}->id:{}", s.spy.0, s.deathstar.0)], "denied", "{g}");
    // Within limits: not truncated.
    let (_, g) = s.api("/api/v1/graph?level=workload&max_nodes=2000&max_edges=10000").await;
    assert_eq!(g["truncated"], false);
    s.store.close().await;
}

#[tokio::test]
async fn graph_levels_sqlite() {
    graph_levels_and_verdict_classes(Scenario::sqlite().await).await;
}

#[tokio::test]
async fn graph_levels_postgres() {
    graph_levels_and_verdict_classes(Scenario::postgres().await).await;
}

#[tokio::test]
async fn graph_time_ranges_sqlite() {
    graph_time_ranges(Scenario::sqlite().await).await;
}

#[tokio::test]
async fn graph_time_ranges_postgres() {
    graph_time_ranges(Scenario::postgres().await).await;
}

#[tokio::test]
async fn graph_truncation_sqlite() {
    graph_truncates_to_the_busiest_edges(Scenario::sqlite().await).await;
}

#[tokio::test]
async fn graph_truncation_postgres() {
    graph_truncates_to_the_busiest_edges(Scenario::postgres().await).await;
}

/// One router (one state: the graph keeps policy decisions between requests) sees an
/// approval and a rollout change on the very next request.
async fn graph_verdicts_follow_approvals_and_rollouts(s: Scenario) {
    let (tf, dns) = (s.tiefighter.0, s.coredns.0);
    let app = router(s.state());
    let get = |uri: String| {
        let app = app.clone();
        let token = s.token.clone();
        async move {
            let req = Request::get(uri).header("authorization", format!("Bearer {token}"));
            let resp = app.oneshot(req.body(Body::empty()).expect("request")).await.expect("response");
            assert_eq!(resp.status(), StatusCode::OK);
            let bytes = resp.into_body().collect().await.expect("body").to_bytes();
            let g: Value = serde_json::from_slice(&bytes).expect("json");
            (verdicts(&g), g)
        }
    };
    let dns_edge = format!("id:{tf}->id:{dns}");
    let outward = "ns:default->ns:kube-system";
    let (v, _) = get("/api/v1/graph?level=workload".into()).await;
    assert_eq!(v[&dns_edge], "nopolicy");
    assert_eq!(get("/api/v1/graph".into()).await.0[outward], "nopolicy");

    // coredns gets a policy that admits xwing only: tiefighter's lookups would be denied.
    let p = proposal(
        s.coredns,
        "kube-system",
        "coredns",
        ("k8s-app", "kube-dns"),
        vec![rule("ingress-0", Direction::Ingress, class("xwing"), 53, Protocol::Udp, &[s.xwing])],
    );
    let rec = s.store.put_proposal(&p, T0).await.expect("proposal");
    let policy = rec.proposal.policy.clone();
    s.store.decide_proposal(rec.summary.id, Decision::Approve { policy }, "alice", None, T0).await.expect("approve");
    let (v, g) = get("/api/v1/graph?level=workload".into()).await;
    assert_eq!(v[&dns_edge], "audit", "{g}");
    assert_eq!(edge(&g, &dns_edge)["basis"], "policy");
    assert_eq!(get("/api/v1/graph".into()).await.0[outward], "audit");

    // Enforcing it: the same lookups are dropped.
    s.store.set_rollout_mode(s.coredns, RolloutMode::Enforce, "alice", "test", T0).await.expect("enforce");
    let (v, _) = get("/api/v1/graph?level=workload".into()).await;
    assert_eq!(v[&dns_edge], "denied");
    let (v, _) = get("/api/v1/graph?level=workload&namespace=kube-system".into()).await;
    assert_eq!(v[&format!("ns:default->id:{dns}")], "denied");
    assert_eq!(get("/api/v1/graph".into()).await.0[outward], "denied");
    s.store.close().await;
}

#[tokio::test]
async fn graph_follows_changes_sqlite() {
    graph_verdicts_follow_approvals_and_rollouts(Scenario::sqlite().await).await;
}

#[tokio::test]
async fn graph_follows_changes_postgres() {
    graph_verdicts_follow_approvals_and_rollouts(Scenario::postgres().await).await;
}

// === pages ===

/// Pending proposals for the ranking: what each should score.
struct Queue {
    flagged: i64,
    external: i64,
    lateral: i64,
    rare: i64,
    plain: i64,
}

/// Seeds five pending proposals of different risk (see [`Queue`]).
async fn seed_queue(s: &Scenario) -> Queue {
    let put = |p: Proposal| {
        let store = s.store.clone();
        async move { store.put_proposal(&p, T0 + 10_000).await.expect("proposal").summary.id }
    };
    // Internal egress on a well-known port: nothing stands out.
    let plain = put(proposal(
        s.tiefighter,
        "default",
        "tiefighter",
        ("class", "tiefighter"),
        vec![rule("egress-0", Direction::Egress, class("deathstar"), 80, Protocol::Tcp, &[s.deathstar])],
    ))
    .await;
    // New egress to the outside.
    let world = Peer::Entity { entity: ReservedIdentity::World };
    let external = put(proposal(
        s.xwing,
        "default",
        "xwing",
        ("class", "xwing"),
        vec![rule("egress-0", Direction::Egress, world, 443, Protocol::Tcp, &[Identity::WORLD])],
    ))
    .await;
    // From default into kube-system.
    let lateral = put(proposal(
        s.coredns,
        "kube-system",
        "coredns",
        ("k8s-app", "kube-dns"),
        vec![rule("ingress-0", Direction::Ingress, class("tiefighter"), 53, Protocol::Udp, &[s.tiefighter])],
    ))
    .await;
    // A port nothing else serves; the workload's name is attacker-controlled.
    let rare = put(proposal(
        s.spy,
        "default",
        &format!("spy{SCRIPT}"),
        ("app", SCRIPT),
        vec![rule("ingress-0", Direction::Ingress, class("xwing"), 31337, Protocol::Tcp, &[s.xwing])],
    ))
    .await;
    // deathstar v2: a flagged rule (cloud metadata, held back) next to the approved one.
    let mut metadata = rule(
        "egress-1",
        Direction::Egress,
        Peer::Cidr { cidr: "169.254.169.254/32".parse().expect("net"), except: vec![] },
        80,
        Protocol::Tcp,
        &[Identity::WORLD],
    );
    metadata.flags = vec![HygieneFlag::CloudMetadata];
    metadata.included = false;
    let landing = rule("ingress-0", Direction::Ingress, class("tiefighter"), 80, Protocol::Tcp, &[s.tiefighter]);
    let flagged =
        put(proposal(s.deathstar, "default", "deathstar", ("class", "deathstar"), vec![landing, metadata])).await;
    Queue { flagged, external, lateral, rare, plain }
}

/// Positions of the proposal rows in the queue page, in order.
fn queue_order(page: &str) -> Vec<i64> {
    page.split("data-proposal-id=\"").skip(1).filter_map(|rest| rest.split('"').next()?.parse().ok()).collect()
}

#[tokio::test]
async fn proposals_queue_is_ranked_by_risk() {
    let s = Scenario::sqlite().await;
    let q = seed_queue(&s).await;
    let viewer = s.login("vera", Role::Viewer).await;
    let (status, page) = s.page(&viewer, "/proposals").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(queue_order(&page), [q.flagged, q.external, q.lateral, q.rare, q.plain], "{page}");
    assert!(page.contains("new external egress") && page.contains("lateral movement into a sensitive namespace"));
    assert!(page.contains("rare port") && page.contains("flagged learning flow"));
    // Other statuses: the approved deathstar v1.
    let (_, page) = s.page(&viewer, "/proposals?status=approved").await;
    assert_eq!(queue_order(&page), [s.approved]);
    let (_, page) = s.page(&viewer, "/proposals?status=all").await;
    assert_eq!(queue_order(&page).len(), 6);
    let (status, _) = s.page(&viewer, "/proposals?status=bogus").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    s.store.close().await;
}

#[tokio::test]
async fn proposal_detail_shows_evidence_yaml_diff_and_replay() {
    let s = Scenario::sqlite().await;
    let q = seed_queue(&s).await;
    let analyst = s.login("ann", Role::Analyst).await;
    let viewer = s.login("vera", Role::Viewer).await;
    let (status, page) = s.page(&analyst, &format!("/proposals/{}", s.approved)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("id=\"rule-ingress-0\""), "{page}");
    assert!(page.contains("6 connections"), "rule evidence");
    assert!(page.contains("10.202.0.11"), "an example flow of tiefighter landing");
    assert!(page.contains("kind: NetworkPolicy") && page.contains("kind: CiliumNetworkPolicy"), "both exports: {page}");
    assert!(page.contains("id=\"diff\""));
    assert!(page.contains("by alice"), "the decision");
    // Replay over a chosen range: xwing's and spy's connections would be denied.
    let (status, page) = s
        .page(&analyst, &format!("/proposals/{}?replay=custom&from=2023-11-14T22:13&to=2023-11-14T22:23", s.approved))
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("<strong>2</strong> would be denied"), "{page}");
    assert!(page.contains("8080/tcp") && page.contains("80/tcp"));
    let (_, page) = s.page(&viewer, &format!("/proposals/{}?replay=24h", s.approved)).await;
    assert!(page.contains("Replaying needs the analyst role"), "viewers do not replay");
    // The flagged version lists its flagged rule with the approve form's decision.
    let approver = s.login("paula", Role::Approver).await;
    let (_, page) = s.page(&approver, &format!("/proposals/{}", q.flagged)).await;
    assert!(page.contains("name=\"rule:egress-1\"") && page.contains("cloud instance-metadata"), "{page}");
    assert!(page.contains("diff"), "{page}");
    let (status, _) = s.page(&viewer, "/proposals/999999").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    s.store.close().await;
}

#[tokio::test]
async fn approve_and_reject_need_their_roles() {
    let s = Scenario::sqlite().await;
    let q = seed_queue(&s).await;
    let viewer = s.login("vera", Role::Viewer).await;
    let analyst = s.login("ann", Role::Analyst).await;
    let approver = s.login("paula", Role::Approver).await;

    // Who sees which button.
    let uri = format!("/proposals/{}", q.plain);
    let (_, page) = s.page(&viewer, &uri).await;
    assert!(!page.contains("id=\"approve-form\"") && !page.contains("id=\"reject-form\""), "viewer: no forms");
    let (_, page) = s.page(&analyst, &uri).await;
    assert!(!page.contains("id=\"approve-form\"") && page.contains("id=\"reject-form\""), "analyst: reject only");
    let (_, page) = s.page(&approver, &uri).await;
    assert!(page.contains("id=\"approve-form\"") && page.contains("id=\"reject-form\""), "approver: both");

    // An analyst's approval is refused and changes nothing.
    let resp = s.post(&analyst, &format!("/proposals/{}/approve", q.plain), &[("comment", "lgtm")]).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(s.status(q.plain).await, ProposalStatus::Proposed);
    // So is a viewer's rejection.
    let resp = s.post(&viewer, &format!("/proposals/{}/reject", q.plain), &[("comment", "no")]).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // And a form without its CSRF token.
    let req = Request::post(format!("/proposals/{}/approve", q.plain))
        .header("cookie", &approver.cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from("comment=x"))
        .expect("request");
    assert_eq!(s.send(req).await.status(), StatusCode::FORBIDDEN);
    assert_eq!(s.status(q.plain).await, ProposalStatus::Proposed);

    // An approver approves: 303 back to the page, approved, audited.
    let resp = s.post(&approver, &format!("/proposals/{}/approve", q.plain), &[("comment", "landing only")]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), format!("/proposals/{}?outcome=approved", q.plain));
    assert_eq!(s.status(q.plain).await, ProposalStatus::Approved);
    let audit = s
        .store
        .audit(&AuditQuery { action_prefix: Some("proposal.approve".into()), ..AuditQuery::default() })
        .await
        .expect("audit");
    let entry = audit.iter().find(|a| a.actor == "paula").unwrap_or_else(|| panic!("audit entry: {audit:?}"));
    assert_eq!(entry.subject, format!("proposal:{}", q.plain), "{entry:?}");
    let (_, page) = s.page(&approver, &location(&resp)).await;
    assert!(page.contains("id=\"outcome\"") && page.contains("Approved."), "the outcome is shown");
    assert!(!page.contains("id=\"approve-form\""), "decided: no more buttons");
    // Deciding again conflicts.
    let resp = s.post(&approver, &format!("/proposals/{}/approve", q.plain), &[]).await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);

    // A flagged rule must be confirmed or dropped.
    let resp = s.post(&approver, &format!("/proposals/{}/approve", q.flagged), &[]).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(body_text(resp).await.contains("egress-1"), "the refusal names the rule");
    assert_eq!(s.status(q.flagged).await, ProposalStatus::Proposed);
    let resp = s.post(&approver, &format!("/proposals/{}/approve", q.flagged), &[("rule:egress-1", "drop")]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let rec = s.store.proposal(q.flagged).await.expect("read").expect("proposal");
    assert_eq!(rec.summary.status, ProposalStatus::Approved);
    assert!(rec.approved_policy.expect("approved").egress.is_none(), "the metadata rule was dropped");

    // Rejecting needs a comment; the analyst's comment is shown escaped.
    let resp = s.post(&analyst, &format!("/proposals/{}/reject", q.rare), &[("comment", "  ")]).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(body_text(resp).await.contains("needs a comment"));
    assert_eq!(s.status(q.rare).await, ProposalStatus::Proposed);
    let why = format!("port scan {SCRIPT}");
    let resp = s.post(&analyst, &format!("/proposals/{}/reject", q.rare), &[("comment", &why)]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(s.status(q.rare).await, ProposalStatus::Rejected);
    let (_, page) = s.page(&viewer, &format!("/proposals/{}", q.rare)).await;
    assert!(page.contains("port scan &#60;script&#62;alert(1)&#60;/script&#62;"), "{page}");
    assert!(!page.contains(SCRIPT));
    s.store.close().await;
}

#[tokio::test]
async fn rollout_promotion_follows_roles_and_gates() {
    let s = Scenario::sqlite().await;
    let q = seed_queue(&s).await;
    let viewer = s.login("vera", Role::Viewer).await;
    let analyst = s.login("ann", Role::Analyst).await;
    let approver = s.login("paula", Role::Approver).await;
    let ds = s.deathstar.0.to_string();
    let mode = |id: Identity| {
        let store = s.store.clone();
        async move { store.rollout_modes().await.expect("modes").into_iter().find(|r| r.target == id).map(|r| r.mode) }
    };

    let (status, page) = s.page(&analyst, "/rollout").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains(&format!("id=\"identity-{ds}\"")), "{page}");
    assert!(page.contains("Namespace default") && page.contains("Namespace kube-system"));
    assert!(page.contains("node-1"), "which enforcer nodes run it");
    assert!(
        page.contains("<option value=\"monitor\"") && !page.contains("<option value=\"enforce\""),
        "analysts see no enforce"
    );
    let (_, page) = s.page(&viewer, "/rollout").await;
    assert!(!page.contains("action=\"/rollout\""), "viewers get no forms");
    let (_, page) = s.page(&approver, "/rollout").await;
    assert!(page.contains("<option value=\"enforce\""));

    // A viewer cannot change anything.
    let resp = s.post(&viewer, "/rollout", &[("target", &ds), ("mode", "monitor")]).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // An analyst puts deathstar (approved policy) into monitor.
    let resp = s.post(&analyst, "/rollout", &[("target", &ds), ("mode", "monitor"), ("reason", "try it")]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), "/rollout?changed=1&mode=monitor");
    assert_eq!(mode(s.deathstar).await, Some(RolloutMode::Monitor));
    let (_, page) = s.page(&analyst, &location(&resp)).await;
    assert!(page.contains("Set 1 workload(s) to monitor."));
    // Enforce is an approver's call: 403 with the reason, nothing changes.
    let resp = s.post(&analyst, "/rollout", &[("target", &ds), ("mode", "enforce")]).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(body_text(resp).await.contains("needs the approver role"));
    assert_eq!(mode(s.deathstar).await, Some(RolloutMode::Monitor));
    // A closed gate: tiefighter has no approved policy.
    let resp = s.post(&analyst, "/rollout", &[("target", &s.tiefighter.0.to_string()), ("mode", "monitor")]).await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    assert!(body_text(resp).await.contains("no approved policy"));
    // Bad forms are 400, never 500.
    for fields in [vec![("target", ds.as_str())], vec![("target", "x"), ("mode", "monitor")], vec![("mode", "monitor")]]
    {
        let resp = s.post(&analyst, "/rollout", &fields).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{fields:?}");
    }
    // The approver enforces, then the namespace goes back to learn.
    let resp = s.post(&approver, "/rollout", &[("target", &ds), ("mode", "enforce"), ("reason", "gate met")]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(mode(s.deathstar).await, Some(RolloutMode::Enforce));
    let resp = s.post(&analyst, "/rollout", &[("namespace", "default"), ("mode", "learn")]).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "leaving enforce needs an approver");
    let resp = s.post(&approver, "/rollout", &[("namespace", "default"), ("mode", "learn")]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(mode(s.deathstar).await, Some(RolloutMode::Learn));
    let audit = s
        .store
        .audit(&AuditQuery { action_prefix: Some("rollout.".into()), ..AuditQuery::default() })
        .await
        .expect("audit");
    assert!(audit.iter().any(|a| a.actor == "ann" && a.detail["to"] == "monitor"), "{audit:?}");
    let _ = q;
    s.store.close().await;
}

#[tokio::test]
async fn graph_page_renders_a_shell_and_a_table() {
    let s = Scenario::sqlite().await;
    let viewer = s.login("vera", Role::Viewer).await;
    let (status, page) = s.page(&viewer, "/graph").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("id=\"graph\""), "{page}");
    assert!(page.contains("data-src=\"/api/v1/graph?level=namespace\""), "{page}");
    assert!(
        page.contains("src=\"/static/vendor/cytoscape/cytoscape.min.js\"") && page.contains("src=\"/static/graph.js\"")
    );
    assert!(!page.contains("<script>") && !page.contains(" style=\"") && !page.contains(" onclick="), "CSP-clean");
    // The range selector turns into the API's bounds.
    let (_, page) =
        s.page(&viewer, "/graph?level=workload&namespace=default&from=2023-11-14T22:13&to=2023-11-14T22:14").await;
    assert!(
        page.contains("data-src=\"/api/v1/graph?level=workload&#38;namespace=default&#38;since_ms=1699999980000&#38;until_ms=1700000040000\""),
        "{page}"
    );
    assert!(page.contains("Namespace default"), "the drill-down path");
    // The table view, without JavaScript.
    let (status, page) = s.page(&viewer, "/graph?level=workload&namespace=default&view=table").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("id=\"graph-table\"") && page.contains("verdict-denied") && page.contains("verdict-allowed"));
    assert!(page.contains("deathstar") && page.contains("80/tcp"));
    // Endpoint crumbs name the workload.
    let (_, page) = s.page(&viewer, &format!("/graph?level=endpoint&workload={}&view=table", s.deathstar.0)).await;
    assert!(page.contains("deathstar @ node-1"), "{page}");
    // Bad input is a 400 page, not a 500.
    for uri in ["/graph?level=pods", "/graph?level=endpoint", "/graph?workload=abc&level=endpoint", "/graph?from=soon"]
    {
        assert_eq!(s.page(&viewer, uri).await.0, StatusCode::BAD_REQUEST, "{uri}");
    }
    let (status, _) = s.page(&viewer, "/graph?level=endpoint&workload=999999&view=table").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    s.store.close().await;
}

#[tokio::test]
async fn labels_are_escaped_on_every_page() {
    let s = Scenario::sqlite().await;
    let q = seed_queue(&s).await;
    let viewer = s.login("vera", Role::Viewer).await;
    let escaped = "&#60;script&#62;alert(1)&#60;/script&#62;";
    let spy = s.spy.0;
    let pages = [
        ("/graph".to_owned(), false),
        ("/graph?level=workload&namespace=default&view=table".to_owned(), true),
        ("/graph?level=workload&view=table".to_owned(), true),
        (format!("/graph?level=endpoint&workload={spy}&view=table"), true),
        (format!("/graph?level=endpoint&workload={spy}"), false),
        ("/proposals".to_owned(), true),
        ("/proposals?status=all".to_owned(), true),
        (format!("/proposals/{}", q.rare), true),
        ("/rollout".to_owned(), true),
    ];
    for (uri, shows_name) in pages {
        let (status, page) = s.page(&viewer, &uri).await;
        assert_eq!(status, StatusCode::OK, "{uri}: {page}");
        assert!(!page.contains(SCRIPT), "{uri} has the raw label: {page}");
        assert!(!page.contains("<script>alert"), "{uri}");
        if shows_name {
            assert!(page.contains(escaped), "{uri} should show the escaped name: {page}");
        }
    }
    s.store.close().await;
}

#[tokio::test]
async fn the_vendored_graph_library_is_served() {
    let s = Scenario::sqlite().await;
    for path in ["/static/vendor/cytoscape/cytoscape.min.js", "/static/graph.js"] {
        let resp = s.send(Request::get(path).body(Body::empty()).expect("request")).await;
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        assert!(ct.contains("javascript"), "{path}: {ct}");
        let body = body_text(resp).await;
        assert!(body.len() > 1_000, "{path}");
    }
    let resp = s.send(Request::get("/static/vendor/cytoscape/LICENSE").body(Body::empty()).expect("request")).await;
    assert!(body_text(resp).await.contains("Cytoscape Consortium"), "the licence ships with it");
    // Every asset the policy pages reference exists.
    let names: Vec<String> = bulkhead_learner::web::assets::names().collect();
    let q = seed_queue(&s).await;
    let viewer = s.login("vera", Role::Viewer).await;
    for uri in ["/graph".to_owned(), "/proposals".to_owned(), format!("/proposals/{}", q.plain), "/rollout".to_owned()]
    {
        let (_, page) = s.page(&viewer, &uri).await;
        for part in page.split("\"/static/").skip(1) {
            let name = part.split('"').next().unwrap_or_default();
            assert!(names.iter().any(|n| n == name), "{uri} references a missing asset {name}");
        }
    }
    s.store.close().await;
}
