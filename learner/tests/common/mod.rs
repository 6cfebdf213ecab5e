//! The two-backend store fixture shared by `tests/store.rs`, `tests/store_policy.rs` and
//! `tests/store_enforcement.rs`: each case is written once as an async fn over a
//! [`Fixture`], and [`store_cases!`] generates one `#[tokio::test]` per backend. The
//! PostgreSQL tests need `BULKHEAD_TEST_POSTGRES_URL` (set by `cargo xtask test`) and
//! fail, not skip, without it. Also the deathstar fixtures of the PolicyStream tests
//! (`tests/distribute.rs`, `tests/verdict_http.rs`): an endpoint, a one-rule proposal
//! and the in-process PolicyStream server. And a collector's `Hello` and a one-flow
//! batch as the FlowIngest wire carries them (`tests/mtls.rs`, `tests/metrics.rs`).

// Not `expect`: each test binary compiles its own copy and uses a different part, so an
// expectation would go unfulfilled in whichever binary does use an item.
#![allow(dead_code, unused_macros, unused_imports, reason = "each test binary uses a different part")]

use bulkhead_learner::store::{Backend, FlowQuery, FlowRow, IngestBatch, ResolvedFlow, Store};
use bulkhead_model::{Flow, Identity, Labels, LossCounters};
use bulkhead_testkit::postgres::{PgTestDb, fresh_database};
use sqlx::{Connection, Database, Executor, PgConnection, SqliteConnection};

// === fixture ===

/// A freshly migrated, empty store plus what is needed to reach its database again:
/// to reopen it (a learner restart) or to bypass it with raw SQL.
pub struct Fixture {
    pub store: Store,
    pub url: String,
    // Dropped after `store`: removes the temp dir / drops the database.
    _db: Db,
}

enum Db {
    Sqlite(#[expect(dead_code, reason = "held for its Drop")] tempfile::TempDir),
    Postgres(#[expect(dead_code, reason = "held for its Drop")] PgTestDb),
}

impl Fixture {
    pub async fn sqlite() -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("learner.db").display());
        let store = Store::open(&url).await.expect("open sqlite store");
        assert_eq!(store.backend(), Backend::Sqlite);
        Fixture { store, url, _db: Db::Sqlite(dir) }
    }

    pub async fn postgres() -> Fixture {
        let db = fresh_database().await;
        let url = db.url().to_owned();
        let store = Store::open(&url).await.expect("open postgres store");
        assert_eq!(store.backend(), Backend::Postgres);
        Fixture { store, url, _db: Db::Postgres(db) }
    }

    /// A second, independent handle on the same database (a learner restart).
    pub async fn reopen(&self) -> Store {
        Store::open(&self.url).await.expect("reopen store")
    }

    /// Runs raw SQL on a separate connection, bypassing the store: what an operator
    /// with a SQL shell (or an attacker with the database file) could do.
    pub async fn raw_sql(&self, sql: &'static str) -> Result<u64, sqlx::Error> {
        match self.store.backend() {
            Backend::Sqlite => raw_sql::<SqliteConnection>(&self.url, sql).await.map(|r| r.rows_affected()),
            Backend::Postgres => raw_sql::<PgConnection>(&self.url, sql).await.map(|r| r.rows_affected()),
        }
    }
}

async fn raw_sql<C>(url: &str, sql: &'static str) -> Result<<C::Database as Database>::QueryResult, sqlx::Error>
where
    C: Connection,
    for<'c> &'c mut C: Executor<'c, Database = C::Database>,
{
    let backend = <C::Database as Database>::NAME;
    let mut c = C::connect(url).await.unwrap_or_else(|e| panic!("raw {backend} connection: {e}"));
    let r = sqlx::raw_sql(sql).execute(&mut c).await;
    c.close().await.expect("close raw connection");
    r
}

/// One `#[tokio::test]` per case and backend: `sqlite::case` and `postgres::case`, each
/// on a fresh [`Fixture`], closing the store afterwards.
macro_rules! store_cases {
    ($($case:ident),* $(,)?) => {
        $crate::common::store_cases!(@backend sqlite: $($case),*);
        $crate::common::store_cases!(@backend postgres: $($case),*);
    };
    (@backend $backend:ident: $($case:ident),*) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let f = $crate::common::Fixture::$backend().await;
                    super::$case(&f).await;
                    f.store.close().await;
                }
            )*
        }
    };
}
pub(crate) use store_cases;

// === builders ===

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    Labels::new(pairs.iter().copied()).expect("valid labels")
}

pub fn resolved(flow: Flow, src: Identity, dst: Identity) -> ResolvedFlow {
    ResolvedFlow { flow, src_identity: src, dst_identity: dst }
}

/// A batch of `flows` from boot `boot-1` of `node`, received at 1 000 000 ms.
pub fn batch(node: &str, seq: u64, flows: Vec<ResolvedFlow>) -> IngestBatch {
    IngestBatch {
        node_id: node.into(),
        boot_id: "boot-1".into(),
        seq,
        received_unix_ms: 1_000_000,
        flows,
        endpoints: None,
        dns_answers: vec![],
        loss: LossCounters::default(),
    }
}

// === reads ===

/// Every stored flow, newest first, read page by page.
pub async fn all_flows(store: &Store) -> Vec<FlowRow> {
    let mut out = Vec::new();
    let mut before = None;
    loop {
        let page =
            store.flows(&FlowQuery { limit: 1000, before_id: before, ..FlowQuery::default() }).await.expect("flows");
        let Some(last) = page.last() else { break };
        before = Some(last.id);
        out.extend(page);
    }
    out
}

// === PolicyStream fixtures ===

/// A workload endpoint on a node: network namespace `ino` with `addr`/24 on eth0 and
/// cgroup `/bulkhead/<ino>` (id `ino`).
pub fn endpoint(identity: Identity, ino: u64, addr: &str) -> bulkhead_learner::store::ResolvedEndpoint {
    bulkhead_learner::store::ResolvedEndpoint {
        fact: bulkhead_model::EndpointFact {
            netns_ino: ino,
            netns_name: Some(format!("ns{ino}")),
            addresses: vec![bulkhead_model::InterfaceAddress {
                interface: "eth0".into(),
                addr: addr.parse().expect("ip"),
                prefix_len: 24,
            }],
            cgroups: vec![bulkhead_model::CgroupFact {
                cgroup_id: ino,
                path: format!("/bulkhead/{ino}"),
                comms: vec![],
            }],
            host: false,
        },
        identity,
        workload: None,
    }
}

/// deathstar's proposal with one ingress rule (included, converged), in `namespace`.
pub fn deathstar_proposal(
    target: Identity,
    namespace: Option<&str>,
    rule: bulkhead_model::Rule,
) -> bulkhead_model::Proposal {
    use bulkhead_model::{
        Convergence, Direction, Evidence, LabelSelector, Level, Policy, Proposal, ProposedRule, Window,
    };
    Proposal {
        target,
        workload: "deathstar".into(),
        level: Level::Exact,
        window: Window { from_unix_ms: 0, to_unix_ms: 1_000 },
        policy: Policy {
            name: "bulkhead-deathstar".into(),
            namespace: namespace.map(str::to_owned),
            selector: LabelSelector::with_labels([("class", "deathstar")]),
            ingress: Some(vec![rule.clone()]),
            egress: None,
        },
        rules: vec![ProposedRule {
            id: "ingress-0".into(),
            direction: Direction::Ingress,
            rule,
            evidence: Evidence::default(),
            flags: vec![],
            included: true,
            widens: vec![],
            widens_total: 0,
        }],
        widening_total: 0,
        convergence: Convergence { converged: true, last_new_edge_unix_ms: Some(1), quiet_period_ms: 60_000 },
        lints: vec![],
        removals: vec![],
    }
}

/// The PolicyStream service on 127.0.0.1, recording into a store when given a recorder;
/// its URL.
pub async fn serve_policy_stream(
    distributor: bulkhead_learner::distribute::Distributor,
    recorder: Option<bulkhead_learner::distribute::Recorder>,
) -> String {
    use bulkhead_learner::distribute::PolicyStreamService;
    use bulkhead_proto::v1::policy_stream_server::PolicyStreamServer;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let service = PolicyStreamServer::new(PolicyStreamService { distributor, recorder });
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .expect("server runs");
    });
    format!("http://{addr}")
}

// === FlowIngest on the wire ===

/// A collector's `Hello` as it arrives on the FlowIngest stream.
pub fn wire_hello(node: &str, boot: &str) -> bulkhead_proto::v1::IngestRequest {
    use bulkhead_proto::v1;
    let hello = v1::Hello { node_id: node.into(), boot_id: boot.into(), agent_version: "test".into() };
    v1::IngestRequest { msg: Some(v1::ingest_request::Msg::Hello(hello)) }
}

/// The flow the ingest tests send: 10.9.0.1 → 10.9.0.2:443/TCP egress, from
/// "curl" in netns 100, `connections` connections, 10 bytes sent.
pub fn curl_flow(connections: u64) -> bulkhead_proto::v1::Flow {
    use bulkhead_proto::v1;
    v1::Flow {
        src_addr: vec![10, 9, 0, 1],
        dst_addr: vec![10, 9, 0, 2],
        dst_port: 443,
        protocol: v1::Protocol::Tcp as i32,
        direction: v1::Direction::Egress as i32,
        netns_ino: 100,
        comm: "curl".into(),
        connections,
        bytes_sent: 10,
        verdict: v1::Verdict::Forwarded as i32,
        first_seen_unix_ms: 1_000,
        last_seen_unix_ms: 2_000,
        ..Default::default()
    }
}

/// A batch of one flow ([`curl_flow`] with 3 connections) as it arrives on the
/// FlowIngest stream.
pub fn wire_batch(node: &str, boot: &str, seq: u64) -> bulkhead_proto::v1::IngestRequest {
    use bulkhead_proto::v1;
    let flow = curl_flow(3);
    let batch = v1::FlowBatch {
        node_id: node.into(),
        boot_id: boot.into(),
        seq,
        created_unix_ms: 5_000,
        flows: vec![flow],
        ..Default::default()
    };
    v1::IngestRequest { msg: Some(v1::ingest_request::Msg::Batch(batch)) }
}
