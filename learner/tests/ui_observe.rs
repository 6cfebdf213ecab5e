//! The observe pages (overview, flows and its live tail, workloads, audit log, users)
//! through the real router (`oneshot`), over a seeded store, logged in with session
//! cookies like a browser: roles, CSRF, filters, keyset pagination, the SSE tail, the
//! user-management rules, and that attacker-controlled strings (label values, workload
//! names, node ids, usernames) only ever reach a page escaped.
//!
//! Every case runs on SQLite (`sqlite::…`) and on PostgreSQL (`postgres::…`, which
//! needs a server: `BULKHEAD_TEST_POSTGRES_URL`, as `cargo xtask test` sets it; without
//! it they fail, never skip, like every store test).

use std::sync::LazyLock;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use bulkhead_learner::auth::{self, PasswordHash, Role};
use bulkhead_learner::grpc::ingest::unix_ms;
use bulkhead_learner::policy::SynthesisRequest;
use bulkhead_learner::store::{
    AuditQuery, IngestBatch, ResolvedEndpoint, ResolvedFlow, Store, UserRow, VerdictEventRow, user_actions,
};
use bulkhead_learner::web::{AppState, router};
use bulkhead_model::{
    Direction, EndpointFact, Flow, Identity, InterfaceAddress, Labels, Protocol, RolloutMode, Verdict,
};
use bulkhead_testkit::postgres::{PgTestDb, fresh_database};
use http_body_util::BodyExt;
use tower::ServiceExt;

const XSS: &str = "<script>alert(1)</script>";
/// How askama writes [`XSS`] into HTML (it escapes `<` and `>` numerically).
const XSS_ESCAPED: &str = "&#60;script&#62;alert(1)&#60;/script&#62;";
const PASSWORD: &str = "correct horse battery staple";
const NODE: &str = "node-1";
/// A node id chosen by an attacker who controls an agent's configuration.
const EVIL_NODE: &str = "n<script>alert(1)</script>";
/// Flows on this port, for the pagination test.
const PAGED_PORT: u16 = 8080;
const PAGED_FLOWS: usize = 25;

/// One hash for the whole binary: argon2 is slow unoptimised.
fn hash() -> &'static PasswordHash {
    static H: LazyLock<PasswordHash> = LazyLock::new(|| auth::hash_password(PASSWORD).expect("hash"));
    &H
}

/// A logged-in browser: its cookie and a CSRF token for its forms.
struct Who {
    user: UserRow,
    cookie: String,
    csrf: String,
}

struct Ui {
    store: Store,
    admin: Who,
    approver: Who,
    viewer: Who,
    web: Identity,
    db: Identity,
    mon: Identity,
    /// The hostile user (username is [`XSS`]).
    evil_user: UserRow,
    // Dropped after `store`: removes the temp dir / drops the database.
    _db: Db,
}

enum Db {
    Sqlite(#[expect(dead_code, reason = "held for its Drop")] tempfile::TempDir),
    Postgres(#[expect(dead_code, reason = "held for its Drop")] PgTestDb),
}

#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// One `#[tokio::test]` per case and backend, each on a freshly seeded store.
macro_rules! ui_cases {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(&super::seeded(super::Backend::Sqlite).await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(&super::seeded(super::Backend::Postgres).await).await;
                }
            )*
        }
    };
}

ui_cases!(
    every_page_renders_for_a_viewer_and_hostile_strings_stay_inert,
    pages_need_a_session_and_users_need_an_admin,
    posts_without_a_valid_csrf_token_are_403,
    overview_shows_rate_talkers_verdicts_agents_and_totals,
    flows_filter_by_namespace_workload_port_protocol_verdict_and_time,
    flow_pages_continue_by_id_where_the_last_one_ended,
    the_live_tail_streams_flows_stored_after_it_opened,
    the_live_tail_resumes_after_last_event_id,
    workloads_list_and_detail,
    audit_log_filters_pages_by_id_and_shows_the_chain,
    admins_create_users_with_a_one_time_password_shown_once,
    role_changes_disable_and_password_resets,
    the_last_enabled_admin_cannot_be_demoted_or_disabled,
    two_admins_demoting_each_other_at_once_leave_one,
    admins_list_and_revoke_api_tokens,
);

async fn login(store: &Store, name: &str, role: Role) -> Who {
    let user = store.create_user(name, role, hash(), false, "root", unix_ms()).await.expect("create user");
    session_of(store, &user).await
}

/// A new session of an existing user.
async fn session_of(store: &Store, user: &UserRow) -> Who {
    let session = store.create_session(user.id, 12 * 3_600_000, unix_ms()).await.expect("session");
    let csrf = session.user.csrf.token().expect("csrf token");
    Who { user: user.clone(), cookie: format!("bulkhead_session={}", session.token.expose()), csrf }
}

fn flow(src: &str, dst: &str, port: u16, verdict: Verdict, comm: &str, at: i64) -> Flow {
    Flow {
        src_addr: src.parse().expect("ip"),
        src_port: 0,
        dst_addr: dst.parse().expect("ip"),
        dst_port: port,
        protocol: Protocol::Tcp,
        direction: Direction::Egress,
        netns_ino: 1,
        cgroup_id: 0,
        pid: 42,
        comm: comm.into(),
        connections: 3,
        bytes_sent: 100,
        bytes_received: 2_000,
        packets: 9,
        verdict,
        first_seen_unix_ms: at - 1_000,
        last_seen_unix_ms: at,
        http: Default::default(),
    }
}

fn batch(
    node: &str,
    seq: u64,
    at: i64,
    flows: Vec<ResolvedFlow>,
    endpoints: Option<Vec<ResolvedEndpoint>>,
) -> IngestBatch {
    IngestBatch {
        node_id: node.into(),
        boot_id: "boot-1".into(),
        seq,
        received_unix_ms: at,
        flows,
        endpoints,
        dns_answers: Vec::new(),
        loss: Default::default(),
    }
}

fn endpoint(identity: Identity, ino: u64, addr: &str, workload: &str) -> ResolvedEndpoint {
    ResolvedEndpoint {
        fact: EndpointFact {
            netns_ino: ino,
            netns_name: Some(format!("ns-{ino}")),
            addresses: vec![InterfaceAddress {
                interface: "eth0".into(),
                addr: addr.parse().expect("ip"),
                prefix_len: 24,
            }],
            cgroups: Vec::new(),
            host: false,
        },
        identity,
        workload: Some(workload.into()),
    }
}

/// Three workloads in two namespaces: `shop/web` (a hostile label value), `shop/db`
/// and `ops/mon`; flows between them (some denied), endpoints (one with a hostile
/// workload name), a collector with a hostile node id, an enforcer, audit events, a
/// rollout mode, synthesized proposals, and users of every role plus a hostile one.
async fn seeded(backend: Backend) -> Ui {
    let (store, guard) = match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("tempdir");
            let url = format!("sqlite://{}", dir.path().join("ui.db").display());
            (Store::open(&url).await.expect("sqlite store"), Db::Sqlite(dir))
        }
        Backend::Postgres => {
            let db = fresh_database().await;
            (Store::open(db.url()).await.expect("postgres store"), Db::Postgres(db))
        }
    };
    let ns = "io.kubernetes.pod.namespace";
    let id = |pairs: Vec<(&'static str, &'static str)>| {
        let store = store.clone();
        async move { store.ensure_identity(&Labels::new(pairs).expect("labels")).await.expect("identity") }
    };
    let web = id(vec![(ns, "shop"), ("app", "web"), ("note", XSS)]).await;
    let db = id(vec![(ns, "shop"), ("app", "db")]).await;
    let mon = id(vec![(ns, "ops"), ("app", "mon")]).await;
    let now = unix_ms();
    let t0 = now - 60_000;

    let rf = |f: Flow, src: Identity, dst: Identity| ResolvedFlow { flow: f, src_identity: src, dst_identity: dst };
    let endpoints = vec![
        endpoint(web, 11, "10.0.0.1", "shop/web"),
        endpoint(db, 12, "10.0.0.2", "shop/db"),
        endpoint(mon, 13, "10.0.1.9", &format!("ops/{XSS}")),
    ];
    let first = vec![
        rf(flow("10.0.0.1", "10.0.0.2", 5432, Verdict::Forwarded, "web", t0), web, db),
        rf(flow("10.0.1.9", "10.0.0.1", 80, Verdict::Forwarded, "prober", t0), mon, web),
        rf(flow("10.0.1.9", "10.0.0.2", 5432, Verdict::Denied, "sneaky", t0), mon, db),
        rf(flow("10.0.1.9", "10.0.0.2", 22, Verdict::Audit, "ssh", t0), mon, db),
    ];
    store.ingest(&batch(NODE, 1, t0, first, Some(endpoints))).await.expect("ingest");
    // The flows the pagination test pages through, over several batches and nodes.
    for (i, chunk) in (0..PAGED_FLOWS).collect::<Vec<_>>().chunks(4).enumerate() {
        let at = t0 + 1_000 * (i as i64 + 1);
        let flows = chunk
            .iter()
            .map(|_| rf(flow("10.0.0.1", "10.0.0.2", PAGED_PORT, Verdict::Forwarded, "paged", at), web, db));
        let node = if i % 2 == 0 { NODE } else { EVIL_NODE };
        store.ingest(&batch(node, 2 + i as u64, at, flows.collect(), None)).await.expect("ingest");
    }
    store.touch_agent(NODE, "boot-1", "0.1.0-test", now).await.expect("hello");

    store.enforcer_hello(NODE, "boot-e", "0.1.0-test", Some(1), now).await.expect("enforcer hello");
    store.set_desired_version(NODE, 2, now).await.expect("desired");
    let event = |verdict, port| VerdictEventRow {
        at_unix_ms: now - 5_000,
        local: web,
        peer: mon,
        direction: Direction::Ingress,
        verdict,
        src_addr: "10.0.1.9".parse().expect("ip"),
        dst_addr: "10.0.0.1".parse().expect("ip"),
        dst_port: port,
        protocol: Protocol::Tcp,
        policy_version: 1,
        rule: None,
        http: None,
    };
    store
        .insert_verdict_events(NODE, &[event(Verdict::Audit, 8443), event(Verdict::Denied, 9000)], now)
        .await
        .expect("verdict events");

    let state = AppState::for_store(store.clone());
    state.policy.synthesize(&SynthesisRequest::default(), now).await.expect("synthesize");
    store.set_rollout_mode(web, RolloutMode::Monitor, "root", XSS, now).await.expect("rollout");

    let admin = login(&store, "admin", Role::Admin).await;
    let approver = login(&store, "approver", Role::Approver).await;
    let viewer = login(&store, "viewer", Role::Viewer).await;
    let evil_user = store.create_user(XSS, Role::Viewer, hash(), false, "root", now).await.expect("hostile user");
    store.create_api_token(XSS, XSS, None, "root", now).await.expect("hostile token");
    Ui { store, admin, approver, viewer, web, db, mon, evil_user, _db: guard }
}

// === requests ===

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Answer {
    fn location(&self) -> &str {
        self.headers.get("location").and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

async fn send(ui: &Ui, req: Request<Body>) -> Answer {
    let resp = router(AppState::for_store(ui.store.clone())).oneshot(req).await.expect("response");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    Answer { status, headers, body: String::from_utf8_lossy(&bytes).into_owned() }
}

async fn get(ui: &Ui, uri: &str, who: &Who) -> Answer {
    let req = Request::get(uri).header("cookie", &who.cookie).body(Body::empty()).expect("request");
    send(ui, req).await
}

/// A form POST; `csrf: false` leaves the token out.
async fn post(ui: &Ui, uri: &str, who: &Who, fields: &[(&str, &str)], csrf: bool) -> Answer {
    let mut pairs: Vec<(&str, &str)> = fields.to_vec();
    if csrf {
        pairs.push(("csrf", who.csrf.as_str()));
    }
    let body = serde_urlencoded::to_string(&pairs).expect("form");
    let req = Request::post(uri)
        .header("cookie", &who.cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(body))
        .expect("request");
    send(ui, req).await
}

/// The ids of the table rows marked `data-id="…"`, in page order.
fn row_ids(html: &str) -> Vec<i64> {
    html.split("<tr data-id=\"")
        .skip(1)
        .map(|rest| rest.split('"').next().and_then(|n| n.parse().ok()).expect("row id"))
        .collect()
}

/// The `href` of the link with this element id (unescaped), if the page has it.
fn link(html: &str, element_id: &str) -> Option<String> {
    let at = html.find(&format!("id=\"{element_id}\""))?;
    let tag_start = html[..at].rfind("<a ")?;
    let href = html[tag_start..at].split("href=\"").nth(1)?.split('"').next()?;
    Some(href.replace("&#38;", "&").replace("&amp;", "&"))
}

/// The flows table's `data-tail` URL (unescaped).
fn data_tail(html: &str) -> String {
    let v = html.split("data-tail=\"").nth(1).and_then(|s| s.split('"').next()).expect("data-tail");
    v.replace("&#38;", "&").replace("&amp;", "&")
}

/// The page shows `XSS` escaped, never raw.
fn assert_inert(page: &str, a: &Answer) {
    assert!(!a.body.contains(XSS), "{page}: a hostile string reached the page unescaped");
    assert!(!a.body.contains("<script>alert"), "{page}: unescaped script tag");
    assert!(a.body.contains(XSS_ESCAPED), "{page}: the hostile string should be shown (escaped)");
}

// === pages and roles ===

async fn every_page_renders_for_a_viewer_and_hostile_strings_stay_inert(ui: &Ui) {
    let web_page = format!("/workloads/{}", ui.web.0);
    let tokens_page = format!("/users/{}/tokens", ui.evil_user.id);
    for (page, who, expect) in [
        ("/", &ui.viewer, "Flows per minute"),
        ("/flows", &ui.viewer, "flows-table"),
        ("/workloads", &ui.viewer, "workloads-table"),
        (web_page.as_str(), &ui.viewer, "Endpoints"),
        ("/audit", &ui.viewer, "audit-table"),
        ("/users", &ui.admin, "users-table"),
        (tokens_page.as_str(), &ui.admin, "tokens-table"),
    ] {
        let a = get(ui, page, who).await;
        assert_eq!(a.status, StatusCode::OK, "{page}: {}", a.body);
        assert!(a.body.contains(expect), "{page} lacks {expect}");
        assert_inert(page, &a);
        let csp = a.headers.get("content-security-policy").and_then(|v| v.to_str().ok()).unwrap_or("");
        assert!(csp.contains("script-src 'self'"), "{page}: CSP {csp}");
        assert!(!a.body.contains("style=\""), "{page}: inline style attribute");
        assert!(!a.body.contains("<script>"), "{page}: inline script");
    }
}

async fn pages_need_a_session_and_users_need_an_admin(ui: &Ui) {
    for page in ["/", "/flows", "/workloads", "/audit", "/users", "/flows/tail"] {
        let a = send(ui, Request::get(page).body(Body::empty()).expect("request")).await;
        assert_eq!(a.status, StatusCode::SEE_OTHER, "{page}");
        assert!(a.location().starts_with("/login"), "{page}: {}", a.location());
    }
    for who in [&ui.approver, &ui.viewer] {
        let a = get(ui, "/users", who).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", who.user.username);
        let a = get(ui, &format!("/users/{}/tokens", ui.admin.user.id), who).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN);
        let a = post(ui, "/users", who, &[("username", "mallory"), ("role", "admin")], true).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "a non-admin cannot create users");
    }
    assert!(ui.store.user_by_name("mallory").await.expect("lookup").is_none());
    // The navigation offers Users to admins only.
    assert!(get(ui, "/", &ui.admin).await.body.contains("href=\"/users\""));
    assert!(!get(ui, "/", &ui.approver).await.body.contains("href=\"/users\""));
}

async fn posts_without_a_valid_csrf_token_are_403(ui: &Ui) {
    let target = ui.viewer.user.id;
    let forms: [(String, Vec<(&str, &str)>); 4] = [
        ("/users".into(), vec![("username", "carol"), ("role", "analyst")]),
        (format!("/users/{target}/role"), vec![("role", "admin")]),
        (format!("/users/{target}/disabled"), vec![("disabled", "true")]),
        (format!("/users/{target}/password"), vec![]),
    ];
    for (uri, fields) in &forms {
        let a = post(ui, uri, &ui.admin, fields, false).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{uri} without a token");
        let mut forged = fields.clone();
        forged.push(("csrf", "not-a-token"));
        let a = post(ui, uri, &ui.admin, &forged, false).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{uri} with a forged token");
        // Another user's token is no good either.
        forged.pop();
        forged.push(("csrf", ui.viewer.csrf.as_str()));
        let a = post(ui, uri, &ui.admin, &forged, false).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{uri} with someone else's token");
    }
    assert!(ui.store.user_by_name("carol").await.expect("lookup").is_none());
    let viewer = ui.store.user_by_name("viewer").await.expect("lookup").expect("viewer");
    assert_eq!((viewer.role, viewer.disabled), (Role::Viewer, false), "nothing changed");
}

// === overview ===

async fn overview_shows_rate_talkers_verdicts_agents_and_totals(ui: &Ui) {
    let a = get(ui, "/", &ui.viewer).await;
    assert_eq!(a.status, StatusCode::OK);
    let b = &a.body;
    assert!(b.contains("<svg class=\"chart\""), "an SVG chart");
    assert!(b.contains("<rect class=\"bar\""), "with bars");
    assert!(b.contains(&format!("{} flows in total", PAGED_FLOWS + 4)), "chart summary counts every flow");
    assert!(b.contains("last 6 hours"), "default range");
    // Top talkers: web → db carries most connections and is named, linked.
    assert!(b.contains(&format!("<a href=\"/workloads/{}\">shop/web</a>", ui.web.0)));
    assert!(b.contains("5432/tcp") || b.contains("8080/tcp"));
    // Audit / deny per workload: web had one of each.
    let verdicts = b.split("id=\"verdict-counts\"").nth(1).expect("verdict section");
    assert!(verdicts.contains("shop/web"), "web's events are counted");
    // Agents: the collector and the enforcer, desired v2 vs applied v1 ("behind").
    assert!(b.contains(NODE));
    let enforcers = b.split("id=\"enforcers\"").nth(1).expect("enforcer section");
    assert!(enforcers.contains("v2") && enforcers.contains("v1") && enforcers.contains("behind"));
    assert!(b.contains("0.1.0-test"));
    for range in ["1h", "24h", "7d"] {
        let a = get(ui, &format!("/?range={range}&by=bytes"), &ui.viewer).await;
        assert_eq!(a.status, StatusCode::OK, "{range}");
    }
    let a = get(ui, "/?range=forever", &ui.viewer).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.body.contains("Unknown range"));
    // A past window without traffic says so.
    let a = get(ui, "/?range=1h&end=2001-01-01T00:00", &ui.viewer).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.body.contains("No flows were received in this range."));
}

// === flows ===

async fn flows_filter_by_namespace_workload_port_protocol_verdict_and_time(ui: &Ui) {
    let count = |a: &Answer| row_ids(&a.body).len();
    let all = get(ui, "/flows?limit=500", &ui.viewer).await;
    assert_eq!(count(&all), PAGED_FLOWS + 4);

    let ops = get(ui, "/flows?ns=ops", &ui.viewer).await;
    assert_eq!(count(&ops), 3, "mon's three flows");
    let shop = get(ui, "/flows?ns=shop&limit=500", &ui.viewer).await;
    assert_eq!(count(&shop), PAGED_FLOWS + 4, "every flow touches web or db");

    let by_name = get(ui, "/flows?workload=shop%2Fdb&port=5432", &ui.viewer).await;
    assert_eq!(count(&by_name), 2);
    let by_id = get(ui, &format!("/flows?workload={}&port=5432", ui.db.0), &ui.viewer).await;
    assert_eq!(row_ids(&by_id.body), row_ids(&by_name.body));
    let both = get(ui, &format!("/flows?ns=shop&workload={}", ui.mon.0), &ui.viewer).await;
    assert_eq!(count(&both), 0, "namespace and workload must both match");

    let denied = get(ui, "/flows?verdict=denied", &ui.viewer).await;
    assert_eq!(count(&denied), 1);
    assert!(denied.body.contains("sneaky") && denied.body.contains("verdict-denied"));
    let audit = get(ui, "/flows?verdict=audit", &ui.viewer).await;
    assert_eq!(count(&audit), 1);
    assert!(audit.body.contains("ssh"));
    let allowed = get(ui, "/flows?verdict=allowed&limit=500", &ui.viewer).await;
    assert_eq!(count(&allowed), PAGED_FLOWS + 2);

    assert_eq!(count(&get(ui, "/flows?proto=udp", &ui.viewer).await), 0);
    assert_eq!(count(&get(ui, "/flows?proto=tcp&port=22", &ui.viewer).await), 1);

    // Time: everything was seen within the last hour; nothing began before 2001.
    assert_eq!(count(&get(ui, "/flows?range=1h&limit=500", &ui.viewer).await), PAGED_FLOWS + 4);
    assert_eq!(count(&get(ui, "/flows?until=2001-01-01T00:00", &ui.viewer).await), 0);
    assert_eq!(count(&get(ui, "/flows?since=2001-01-01T00:00&port=22", &ui.viewer).await), 1);

    let unknown = get(ui, "/flows?ns=nowhere", &ui.viewer).await;
    assert_eq!((unknown.status, count(&unknown)), (StatusCode::OK, 0));
    assert!(unknown.body.contains("No workload is in namespace"));
    for bad in
        ["/flows?port=http", "/flows?proto=icmp", "/flows?verdict=maybe", "/flows?since=yesterday", "/flows?limit=0"]
    {
        let a = get(ui, bad, &ui.viewer).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(a.body.contains("class=\"alert\""), "{bad} explains itself");
    }
}

async fn flow_pages_continue_by_id_where_the_last_one_ended(ui: &Ui) {
    let first = get(ui, &format!("/flows?port={PAGED_PORT}&limit=10"), &ui.viewer).await;
    let ids1 = row_ids(&first.body);
    assert_eq!(ids1.len(), 10);
    assert!(ids1.windows(2).all(|w| w[0] > w[1]), "newest first: {ids1:?}");
    assert!(link(&first.body, "newest-link").is_none(), "the first page is the newest");
    let older = link(&first.body, "older-link").expect("an older link");
    assert!(older.contains(&format!("before={}", ids1[9])), "keyset, not offset: {older}");
    assert!(older.contains(&format!("port={PAGED_PORT}")) && older.contains("limit=10"), "filters kept: {older}");
    assert!(!older.contains("offset"));

    // New flows arriving between pages do not shift the next page.
    let at = unix_ms();
    let extra = (0..3)
        .map(|_| ResolvedFlow {
            flow: flow("10.0.0.1", "10.0.0.2", PAGED_PORT, Verdict::Forwarded, "late", at),
            src_identity: ui.web,
            dst_identity: ui.db,
        })
        .collect();
    ui.store.ingest(&batch(NODE, 100, at, extra, None)).await.expect("ingest");

    let second = get(ui, &older, &ui.viewer).await;
    let ids2 = row_ids(&second.body);
    assert_eq!(ids2.len(), 10);
    assert!(ids2[0] < ids1[9], "continues below the last id shown: {ids1:?} then {ids2:?}");
    assert_eq!(ids2[0], ids1[9] - 1, "and skips nothing (all these flows match)");
    assert!(link(&second.body, "newest-link").is_some());
    assert!(data_tail(&first.body).starts_with("/flows/tail?"), "live tail on the newest page");
    assert_eq!(data_tail(&second.body), "", "no live tail on an older page");
    let third = get(ui, &link(&second.body, "older-link").expect("older"), &ui.viewer).await;
    let ids3 = row_ids(&third.body);
    assert_eq!(ids3.len(), PAGED_FLOWS - 20);
    assert!(ids3[0] < ids2[9]);
    assert!(link(&third.body, "older-link").is_none(), "the last page has no older link");

    // The rare-verdict path (partial index) pages the same way.
    let denied = get(ui, "/flows?verdict=denied&limit=1", &ui.viewer).await;
    assert_eq!(row_ids(&denied.body).len(), 1);
    let next = get(ui, &link(&denied.body, "older-link").expect("older"), &ui.viewer).await;
    assert_eq!(row_ids(&next.body).len(), 0);
}

async fn the_live_tail_streams_flows_stored_after_it_opened(ui: &Ui) {
    // The page hands flows.js the tail of its own filter, starting after the newest flow.
    let page = get(ui, "/flows?port=9999", &ui.viewer).await;
    let tail = data_tail(&page.body);
    let (_, newest) = ui.store.flow_id_bounds().await.expect("bounds").expect("flows");
    assert_eq!(tail, format!("/flows/tail?port=9999&after={newest}"));
    let req = Request::get(tail.as_str()).header("cookie", &ui.viewer.cookie).body(Body::empty()).expect("request");
    let resp = router(AppState::for_store(ui.store.clone())).oneshot(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let mut body = resp.into_body();

    // Stored after the stream opened: one matching flow, one that the filter drops.
    let at = unix_ms();
    let flows = vec![
        ResolvedFlow {
            flow: flow("10.0.0.1", "10.0.0.2", 9999, Verdict::Forwarded, "tailed", at),
            src_identity: ui.web,
            dst_identity: ui.db,
        },
        ResolvedFlow {
            flow: flow("10.0.0.1", "10.0.0.2", 9998, Verdict::Forwarded, "filtered-out", at),
            src_identity: ui.web,
            dst_identity: ui.db,
        },
    ];
    ui.store.ingest(&batch(NODE, 200, at, flows, None)).await.expect("ingest");

    let mut seen = String::new();
    let read = async {
        while !seen.contains("event: flows") || !seen.contains("tailed") {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        seen.push_str(&String::from_utf8_lossy(data));
                    }
                }
                Some(Err(e)) => panic!("stream failed: {e}"),
                None => panic!("stream ended before the flow arrived: {seen}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read).await.expect("the new flow within 30 s");
    assert!(seen.contains("event: ready"), "{seen}");
    assert!(!seen.contains("filtered-out"), "the tail applies the filter: {seen}");
    assert!(seen.contains("\"href\":\"/workloads/"), "rows carry workload links: {seen}");
}

async fn the_live_tail_resumes_after_last_event_id(ui: &Ui) {
    // Resuming from before the paged flows replays them (bounded per event).
    let req = Request::get(format!("/flows/tail?port={PAGED_PORT}"))
        .header("cookie", &ui.viewer.cookie)
        .header("last-event-id", "0")
        .body(Body::empty())
        .expect("request");
    let resp = router(AppState::for_store(ui.store.clone())).oneshot(req).await.expect("response");
    let mut body = resp.into_body();
    let mut seen = String::new();
    let read = async {
        while seen.matches("\"process\":\"paged (42)\"").count() < PAGED_FLOWS {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        seen.push_str(&String::from_utf8_lossy(data));
                    }
                }
                other => panic!("stream ended: {:?}", other.map(|r| r.is_ok())),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read).await.expect("the stored flows within 30 s");
}

// === workloads ===

async fn workloads_list_and_detail(ui: &Ui) {
    let a = get(ui, "/workloads", &ui.viewer).await;
    assert_eq!(a.status, StatusCode::OK);
    for name in ["shop/web", "shop/db"] {
        assert!(a.body.contains(name), "{name}");
    }
    assert!(a.body.contains("<span class=\"label-chip\">app=web</span>"));
    assert!(a.body.contains("<span class=\"badge mode-monitor\">monitor</span>"), "web is in monitor");
    assert!(a.body.contains("/proposals/"), "pending proposals are linked");
    assert!(!a.body.contains("reserved:world"), "reserved identities are not workloads");

    let ops = get(ui, "/workloads?ns=ops", &ui.viewer).await;
    assert!(ops.body.contains(&format!("/workloads/{}", ui.mon.0)));
    assert!(!ops.body.contains("shop/web"));
    let q = get(ui, "/workloads?q=DB", &ui.viewer).await;
    assert!(q.body.contains("shop/db") && !q.body.contains(">shop/web<"));

    let d = get(ui, &format!("/workloads/{}", ui.web.0), &ui.viewer).await;
    assert_eq!(d.status, StatusCode::OK);
    let b = &d.body;
    assert!(b.contains(&format!("identity {}", ui.web.0)));
    assert!(b.contains("<span class=\"label-chip\">io.kubernetes.pod.namespace=shop</span>"));
    assert!(b.contains("10.0.0.1/24 (eth0)"), "endpoint addresses");
    assert!(b.contains("badge mode-monitor"));
    assert!(b.contains("href=\"/proposals/"), "proposal versions link to their review page");
    let events = b.split("id=\"events\"").nth(1).expect("events section");
    assert!(events.contains("verdict-audit") && events.contains("verdict-denied"));
    assert!(events.contains("8443/tcp") && events.contains("9000/tcp"));
    assert!(b.contains(&format!("href=\"/flows?workload={}\"", ui.web.0)));

    assert_eq!(get(ui, "/workloads/999999", &ui.viewer).await.status, StatusCode::NOT_FOUND);
    assert_eq!(get(ui, "/workloads/web", &ui.viewer).await.status, StatusCode::NOT_FOUND);
    assert_eq!(get(ui, "/workloads/2", &ui.viewer).await.status, StatusCode::NOT_FOUND, "world is no workload");
}

// === audit ===

async fn audit_log_filters_pages_by_id_and_shows_the_chain(ui: &Ui) {
    for i in 0..105 {
        let mode = if i % 2 == 0 { RolloutMode::Learn } else { RolloutMode::Monitor };
        ui.store.set_rollout_mode(ui.db, mode, "ops-bot", "flip", unix_ms()).await.expect("rollout");
    }
    let a = get(ui, "/audit", &ui.viewer).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.body.contains("href=\"/audit?verify=1\""), "the chain is verified on request only");
    let v = get(ui, "/audit?verify=1", &ui.viewer).await;
    assert!(v.body.contains("Hash chain verified"), "chain status shown");

    let first = get(ui, "/audit?actor=ops-bot&action=rollout.", &ui.viewer).await;
    let ids1 = row_ids(&first.body);
    assert_eq!(ids1.len(), 100);
    assert!(first.body.contains(&format!("href=\"/workloads/{}\"", ui.db.0)), "identity subjects link");
    let older = link(&first.body, "older-link").expect("older link");
    assert!(older.contains(&format!("before={}", ids1[99])) && older.contains("actor=ops-bot"), "{older}");
    let second = get(ui, &older, &ui.viewer).await;
    let ids2 = row_ids(&second.body);
    assert_eq!(ids2.len(), 5, "105 entries by ops-bot");
    assert!(ids2[0] < ids1[99]);
    assert!(link(&second.body, "older-link").is_none());

    let logins = get(ui, "/audit?action=session.", &ui.viewer).await;
    let rows = row_ids(&logins.body);
    assert_eq!(rows.len(), 3, "three logins");
    let table = logins.body.split("id=\"audit-table\"").nth(1).expect("table");
    assert!(table.contains("session.login") && !table.contains("rollout.mode"));
    let subject = get(ui, "/audit?subject=user%3Aviewer", &ui.viewer).await;
    assert!(subject.body.contains("user.create") && subject.body.contains("session.login"));
    let none = get(ui, "/audit?until=2001-01-01T00:00", &ui.viewer).await;
    assert!(row_ids(&none.body).is_empty());
    assert_eq!(get(ui, "/audit?since=soon", &ui.viewer).await.status, StatusCode::BAD_REQUEST);
}

// === users ===

/// The one-time password on an answer page.
fn one_time_password(html: &str) -> String {
    html.split("id=\"one-time-password\">").nth(1).and_then(|s| s.split('<').next()).expect("password shown").to_owned()
}

async fn admins_create_users_with_a_one_time_password_shown_once(ui: &Ui) {
    let a = post(ui, "/users", &ui.admin, &[("username", "carol"), ("role", "analyst")], true).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    let password = one_time_password(&a.body);
    assert_eq!(password.chars().count(), auth::ONE_TIME_PASSWORD_CHARS);
    let carol = ui.store.user_by_name("carol").await.expect("lookup").expect("carol");
    assert_eq!((carol.role, carol.must_change_password), (Role::Analyst, true));
    ui.store.check_password("carol", &password).await.expect("the shown password works");
    // Shown once: neither the list nor the audit log has it.
    assert!(!get(ui, "/users", &ui.admin).await.body.contains(&password));
    let audit = ui.store.audit(&AuditQuery { subject: Some("user:carol".into()), ..Default::default() }).await;
    let audit = audit.expect("audit");
    assert_eq!(audit[0].action, user_actions::USER_CREATE);
    assert_eq!(audit[0].actor, "admin", "the admin is the actor");
    assert!(audit.iter().all(|e| !e.detail.to_string().contains(&password)));

    let again = post(ui, "/users", &ui.admin, &[("username", "Carol"), ("role", "viewer")], true).await;
    assert_eq!(again.status, StatusCode::CONFLICT, "names are unique case-insensitively");
    let bad_role = post(ui, "/users", &ui.admin, &[("username", "dave"), ("role", "root")], true).await;
    assert_eq!(bad_role.status, StatusCode::BAD_REQUEST);
    let bad_name = post(ui, "/users", &ui.admin, &[("username", ""), ("role", "viewer")], true).await;
    assert_eq!(bad_name.status, StatusCode::BAD_REQUEST);
}

async fn role_changes_disable_and_password_resets(ui: &Ui) {
    let viewer = ui.viewer.user.id;
    let a = post(ui, &format!("/users/{viewer}/role"), &ui.admin, &[("role", "approver")], true).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    let notice = get(ui, a.location(), &ui.admin).await;
    assert!(notice.body.contains("viewer is now approver."), "{}", a.location());
    assert_eq!(ui.store.user_by_name("viewer").await.expect("lookup").expect("user").role, Role::Approver);

    let a = post(ui, &format!("/users/{viewer}/disabled"), &ui.admin, &[("disabled", "true")], true).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert!(ui.store.user_by_name("viewer").await.expect("lookup").expect("user").disabled);
    assert_eq!(get(ui, "/", &ui.viewer).await.status, StatusCode::SEE_OTHER, "a disabled user's session ends");
    let a = post(ui, &format!("/users/{viewer}/disabled"), &ui.admin, &[("disabled", "false")], true).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert!(!ui.store.user_by_name("viewer").await.expect("lookup").expect("user").disabled);

    let approver = ui.approver.user.id;
    let a = post(ui, &format!("/users/{approver}/password"), &ui.admin, &[], true).await;
    assert_eq!(a.status, StatusCode::OK);
    let password = one_time_password(&a.body);
    ui.store.check_password("approver", &password).await.expect("new password works");
    assert!(ui.store.check_password("approver", PASSWORD).await.is_err(), "old password is gone");
    assert!(ui.store.user_by_name("approver").await.expect("lookup").expect("user").must_change_password);
    assert_eq!(get(ui, "/", &ui.approver).await.status, StatusCode::SEE_OTHER, "their sessions ended");

    let roles = ui.store.audit(&AuditQuery { action_prefix: Some("user.".into()), ..Default::default() }).await;
    let roles = roles.expect("audit");
    for action in
        [user_actions::USER_ROLE, user_actions::USER_DISABLE, user_actions::USER_ENABLE, user_actions::USER_PASSWORD]
    {
        let e = roles.iter().find(|e| e.action == action).unwrap_or_else(|| panic!("{action} audited"));
        assert_eq!(e.actor, "admin", "{action}");
    }
    assert_eq!(
        post(ui, "/users/999999/role", &ui.admin, &[("role", "viewer")], true).await.status,
        StatusCode::NOT_FOUND
    );
    let bad = post(ui, &format!("/users/{viewer}/disabled"), &ui.admin, &[("disabled", "maybe")], true).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

async fn the_last_enabled_admin_cannot_be_demoted_or_disabled(ui: &Ui) {
    let me = ui.admin.user.id;
    let a = post(ui, &format!("/users/{me}/role"), &ui.admin, &[("role", "viewer")], true).await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    assert!(a.body.contains("would leave no enabled admin"), "{}", a.body);
    let a = post(ui, &format!("/users/{me}/disabled"), &ui.admin, &[("disabled", "true")], true).await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    let admin = ui.store.user_by_name("admin").await.expect("lookup").expect("admin");
    assert_eq!((admin.role, admin.disabled), (Role::Admin, false), "unchanged");

    // A disabled admin does not count; an enabled second admin does.
    let other = ui.approver.user.id;
    post(ui, &format!("/users/{other}/role"), &ui.admin, &[("role", "admin")], true).await;
    post(ui, &format!("/users/{other}/disabled"), &ui.admin, &[("disabled", "true")], true).await;
    let a = post(ui, &format!("/users/{me}/role"), &ui.admin, &[("role", "viewer")], true).await;
    assert_eq!(a.status, StatusCode::CONFLICT, "the other admin is disabled");
    post(ui, &format!("/users/{other}/disabled"), &ui.admin, &[("disabled", "false")], true).await;
    let a = post(ui, &format!("/users/{me}/role"), &ui.admin, &[("role", "analyst")], true).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "another admin remains");
    assert_eq!(ui.store.user_by_name("admin").await.expect("lookup").expect("user").role, Role::Analyst);
    assert_eq!(get(ui, "/users", &ui.admin).await.status, StatusCode::FORBIDDEN, "the role applies at once");
}

async fn two_admins_demoting_each_other_at_once_leave_one(ui: &Ui) {
    let (a, b) = (&ui.admin, &ui.approver);
    let promoted = post(ui, &format!("/users/{}/role", b.user.id), a, &[("role", "admin")], true).await;
    assert_eq!(promoted.status, StatusCode::SEE_OTHER);
    for _ in 0..5 {
        // Disabling ends sessions: log both in afresh each round.
        let (a, b) = (session_of(&ui.store, &ui.admin.user).await, session_of(&ui.store, &ui.approver.user).await);
        let (demote_b, disable_a) = (format!("/users/{}/role", b.user.id), format!("/users/{}/disabled", a.user.id));
        let (ra, rb) = tokio::join!(
            post(ui, &demote_b, &a, &[("role", "viewer")], true),
            post(ui, &disable_a, &b, &[("disabled", "true")], true),
        );
        let users = ui.store.users().await.expect("users");
        let admins = users.iter().filter(|u| u.role == Role::Admin && !u.disabled).count();
        assert_eq!(admins, 1, "exactly one admin is left ({:?}, {:?})", ra.status, rb.status);
        // The loser is refused by the guard (409), or — when the winner's change landed
        // before its request was authorised — by its role (403) or its ended session
        // (303 to the login page): never do both changes succeed.
        let won = |r: &Answer| r.status == StatusCode::SEE_OTHER && r.location().starts_with("/users?done=");
        assert_eq!(
            [&ra, &rb].into_iter().filter(|r| won(r)).count(),
            1,
            "{:?} {}, {:?} {}",
            ra.status,
            ra.location(),
            rb.status,
            rb.location()
        );
        // Undo whichever change won (as root, outside the UI) and go again.
        ui.store.set_role("approver", Role::Admin, "root", unix_ms()).await.expect("reset role");
        ui.store.set_disabled("admin", false, "root", unix_ms()).await.expect("reset disabled");
    }
}

async fn admins_list_and_revoke_api_tokens(ui: &Ui) {
    let (token, row) = ui.store.create_api_token("viewer", "ci", None, "root", unix_ms()).await.expect("token");
    let (other, _) = ui.store.create_api_token("approver", "laptop", None, "root", unix_ms()).await.expect("token");
    let page = format!("/users/{}/tokens", ui.viewer.user.id);
    let a = get(ui, &page, &ui.admin).await;
    assert!(a.body.contains(">ci<") && a.body.contains("verdict-allowed"), "listed as live");
    assert!(!a.body.contains(token.expose()), "the token itself is never shown again");

    let revoke = format!("/users/{}/tokens/{}/revoke", ui.viewer.user.id, row.id);
    assert_eq!(post(ui, &revoke, &ui.admin, &[], false).await.status, StatusCode::FORBIDDEN, "CSRF");
    let a = post(ui, &revoke, &ui.admin, &[], true).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert!(ui.store.api_token(token.expose(), unix_ms()).await.expect("lookup").is_none(), "revoked");
    let listed = get(ui, a.location(), &ui.admin).await;
    assert!(listed.body.contains("Revoked token") && listed.body.contains(">revoked<"));
    let e = ui.store.audit(&AuditQuery { action_prefix: Some("token.revoke".into()), ..Default::default() }).await;
    assert_eq!(e.expect("audit")[0].actor, "admin");

    // Another user's token id under this user is not found, and stays live.
    let other_id = ui.store.api_tokens("approver").await.expect("tokens")[0].id;
    let wrong = format!("/users/{}/tokens/{other_id}/revoke", ui.viewer.user.id);
    assert_eq!(post(ui, &wrong, &ui.admin, &[], true).await.status, StatusCode::NOT_FOUND);
    assert!(ui.store.api_token(other.expose(), unix_ms()).await.expect("lookup").is_some());
}
