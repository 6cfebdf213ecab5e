//! The store's behaviour, checked identically on SQLite (a temp file) and PostgreSQL (a
//! throwaway database from `bulkhead_testkit::postgres`), with the fixture in
//! `tests/common`: each case is written once as an async fn over a [`Fixture`];
//! `store_cases!` generates one `#[tokio::test]` per backend. The PostgreSQL tests need
//! `BULKHEAD_TEST_POSTGRES_URL` (set by `cargo xtask test`) and fail, not skip, without
//! it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bulkhead_learner::store::{
    EdgeQuery, EdgeRow, FlowQuery, IngestBatch, IngestOutcome, ResolvedEndpoint, ResolvedFlow, Store,
};
use bulkhead_model::{
    CgroupFact, Direction, DnsAnswer, EndpointFact, Flow, Identity, InterfaceAddress, Labels, LossCounters, Protocol,
    ReservedIdentity, Verdict,
};
use common::{Fixture, all_flows, batch, labels, resolved, store_cases};

store_cases!(
    identities_are_stable_across_reopen,
    reserved_identities_are_seeded,
    edges_count_exactly_and_never_double_count,
    batch_is_preaggregated_into_edges,
    duplicate_batch_changes_nothing,
    pruned_batch_records_still_dedupe,
    endpoint_snapshot_replaces_the_nodes_endpoints,
    flows_page_by_keyset_and_filter,
    prune_deletes_old_flows_only,
    hostile_strings_round_trip_as_data,
    extreme_values_round_trip,
    concurrent_ingest_and_identity_allocation,
    dns_answers_are_stored_once_per_answer,
    agents_registration_hello_and_loss,
    edge_queries_filter_and_limit,
    large_batches_span_statement_chunks,
    prune_by_blocks_is_exact_and_ids_never_reused,
    flow_queries_match_a_model_across_many_batches,
);

// === builders ===

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
}

/// A TCP flow from 10.0.0.1 to 10.0.0.2:`port`, reported from `direction`'s side.
fn flow(direction: Direction, port: u16, connections: u64, sent: u64, received: u64, first: i64, last: i64) -> Flow {
    Flow {
        src_addr: ip(1),
        src_port: 0,
        dst_addr: ip(2),
        dst_port: port,
        protocol: Protocol::Tcp,
        direction,
        netns_ino: 4026531840,
        cgroup_id: 1234,
        pid: 42,
        comm: "curl".into(),
        connections,
        bytes_sent: sent,
        bytes_received: received,
        packets: 10,
        verdict: Verdict::Forwarded,
        first_seen_unix_ms: first,
        last_seen_unix_ms: last,
        http: Default::default(),
    }
}

async fn ingest(store: &Store, b: &IngestBatch) -> IngestOutcome {
    store.ingest(b).await.expect("ingest")
}

async fn workload(store: &Store, app: &str) -> Identity {
    store.ensure_identity(&labels(&[("app", app), ("io.kubernetes.pod.namespace", "default")])).await.expect("identity")
}

async fn all_edges(store: &Store) -> Vec<EdgeRow> {
    store.edges(&EdgeQuery::default()).await.expect("edges")
}

// === cases ===

async fn identities_are_stable_across_reopen(f: &Fixture) {
    let web = labels(&[("app", "web"), ("org", "empire")]);
    // Same set, other insertion order: same canonical form, same identity.
    let web_again = labels(&[("org", "empire"), ("app", "web")]);
    let db = labels(&[("app", "db")]);

    let a = f.store.ensure_identity(&web).await.expect("web");
    let b = f.store.ensure_identity(&db).await.expect("db");
    assert!(a.0 >= Identity::FIRST_ALLOCATED && b.0 >= Identity::FIRST_ALLOCATED, "{a} {b}");
    assert_ne!(a, b);
    assert_eq!(f.store.ensure_identity(&web_again).await.expect("web again"), a);

    f.store.close().await;
    let reopened = f.reopen().await;
    assert_eq!(reopened.ensure_identity(&web).await.expect("web after reopen"), a);
    assert_eq!(reopened.ensure_identity(&db).await.expect("db after reopen"), b);
    let c = reopened.ensure_identity(&labels(&[("app", "cache")])).await.expect("cache");
    assert!(c.0 > a.0.max(b.0), "new identities are never reused numbers: {c}");

    let rows = reopened.identities().await.expect("identities");
    let by_id: BTreeMap<u32, &Labels> = rows.iter().map(|r| (r.id.0, &r.labels)).collect();
    assert_eq!(by_id.get(&a.0), Some(&&web));
    assert_eq!(by_id.get(&b.0), Some(&&db));
    reopened.close().await;
}

async fn reserved_identities_are_seeded(f: &Fixture) {
    let rows = f.store.identities().await.expect("identities");
    for r in ReservedIdentity::ALL {
        let expected = labels(&[(format!("reserved:{}", r.name()).as_str(), "")]);
        let row = rows.iter().find(|row| row.id == Identity::from(r)).unwrap_or_else(|| panic!("{r:?} missing"));
        assert_eq!(row.labels, expected, "{r:?}");
        // Finds the seeded row through its digest: proves the migration's hard-coded
        // SHA-256 values match the Rust computation.
        assert_eq!(f.store.ensure_identity(&expected).await.expect("reserved"), Identity::from(r));
    }
    assert_eq!(rows.len(), ReservedIdentity::ALL.len(), "a fresh store holds only reserved identities");
    let first = f.store.ensure_identity(&labels(&[("app", "first")])).await.expect("first");
    assert_eq!(first, Identity(Identity::FIRST_ALLOCATED));
}

async fn edges_count_exactly_and_never_double_count(f: &Fixture) {
    let (client, server) = (workload(&f.store, "client").await, workload(&f.store, "server").await);

    // The client's node reports 3 connections as egress: 100 bytes out, 200 back.
    let egress = resolved(flow(Direction::Egress, 80, 3, 100, 200, 1_000, 2_000), client, server);
    // The server's node reports the same 3 connections as ingress (its sent = 200).
    let ingress = resolved(flow(Direction::Ingress, 80, 3, 200, 100, 1_100, 2_100), client, server);
    assert_eq!(
        ingest(&f.store, &batch("node-client", 1, vec![egress.clone()])).await,
        IngestOutcome::Stored { flows: 1, edges: 1 }
    );
    assert_eq!(
        ingest(&f.store, &batch("node-server", 1, vec![ingress.clone()])).await,
        IngestOutcome::Stored { flows: 1, edges: 1 }
    );
    let edges = all_edges(&f.store).await;
    assert_eq!(edges.len(), 1);
    let e = &edges[0];
    assert_eq!((e.edge.key.src, e.edge.key.dst, e.edge.key.dst_port), (client, server, 80));
    assert_eq!(e.edge.key.protocol, Protocol::Tcp);
    assert_eq!(e.edge.connections, 3, "seen from both ends, counted once");
    assert_eq!(e.edge.bytes, 300);
    assert_eq!((e.connections_egress, e.bytes_egress, e.connections_ingress, e.bytes_ingress), (3, 300, 3, 300));
    assert_eq!((e.edge.first_seen_unix_ms, e.edge.last_seen_unix_ms), (1_000, 2_100));
    assert_eq!(e.src_labels.get("app"), Some("client"));
    assert_eq!(e.dst_labels.get("app"), Some("server"));

    // Two more connections only the client side saw: max(5, 3) = 5.
    let more = resolved(flow(Direction::Egress, 80, 2, 10, 20, 3_000, 4_000), client, server);
    ingest(&f.store, &batch("node-client", 2, vec![more])).await;
    // Both workloads on one node: one collector reports both ends in one batch.
    let same_node = vec![
        resolved(flow(Direction::Egress, 80, 1, 5, 5, 5_000, 5_000), client, server),
        resolved(flow(Direction::Ingress, 80, 1, 5, 5, 5_000, 5_000), client, server),
    ];
    assert_eq!(ingest(&f.store, &batch("node-both", 1, same_node)).await, IngestOutcome::Stored { flows: 2, edges: 1 });
    let e = &all_edges(&f.store).await[0];
    assert_eq!((e.connections_egress, e.connections_ingress), (6, 4));
    assert_eq!(e.edge.connections, 6);
    assert_eq!(e.edge.bytes, 300 + 30 + 10);
    assert_eq!(e.edge.last_seen_unix_ms, 5_000);

    // Other port and other protocol are other edges.
    let mut udp = flow(Direction::Egress, 53, 1, 1, 1, 10, 10);
    udp.protocol = Protocol::Udp;
    let other = vec![
        resolved(flow(Direction::Egress, 443, 1, 1, 1, 10, 10), client, server),
        resolved(udp, client, server),
        resolved(flow(Direction::Egress, 80, 1, 1, 1, 10, 10), server, client),
    ];
    assert_eq!(ingest(&f.store, &batch("node-client", 3, other)).await, IngestOutcome::Stored { flows: 3, edges: 3 });
    let keys: BTreeSet<_> = all_edges(&f.store).await.iter().map(|e| e.edge.key).collect();
    assert_eq!(keys.len(), 4);
    assert_eq!(all_flows(&f.store).await.len(), 8);
}

async fn batch_is_preaggregated_into_edges(f: &Fixture) {
    let src = workload(&f.store, "src").await;
    let dsts: Vec<Identity> = {
        let mut v = Vec::new();
        for i in 0..10 {
            v.push(workload(&f.store, &format!("dst-{i}")).await);
        }
        v
    };
    let flows: Vec<ResolvedFlow> = (0..1000)
        .map(|i| resolved(flow(Direction::Egress, 8080, 1, 10, 0, i, i + 1), src, dsts[i as usize % 10]))
        .collect();
    assert_eq!(ingest(&f.store, &batch("node-a", 1, flows)).await, IngestOutcome::Stored { flows: 1000, edges: 10 });
    let edges = all_edges(&f.store).await;
    assert_eq!(edges.len(), 10);
    for e in &edges {
        assert_eq!((e.edge.connections, e.edge.bytes), (100, 1000), "{e:?}");
    }
    assert_eq!(all_flows(&f.store).await.len(), 1000);
}

async fn duplicate_batch_changes_nothing(f: &Fixture) {
    let (a, b) = (workload(&f.store, "a").await, workload(&f.store, "b").await);
    let mut first = batch("node-a", 7, vec![resolved(flow(Direction::Egress, 80, 1, 1, 1, 1, 1), a, b)]);
    first.dns_answers = vec![dns("a.example", 9, 60, 1)];
    assert!(matches!(ingest(&f.store, &first).await, IngestOutcome::Stored { .. }));
    let (edges, flows, agents) =
        (all_edges(&f.store).await, all_flows(&f.store).await, f.store.agents().await.expect("agents"));

    // A resend, even with different content, is recognised by its key alone.
    let mut resend = first.clone();
    resend.flows.push(resolved(flow(Direction::Egress, 81, 9, 9, 9, 9, 9), a, b));
    resend.endpoints = Some(vec![]);
    resend.dns_answers.push(dns("b.example", 8, 60, 2));
    resend.loss.queue_dropped = 99;
    assert_eq!(ingest(&f.store, &resend).await, IngestOutcome::Duplicate);
    assert_eq!(all_edges(&f.store).await, edges);
    assert_eq!(all_flows(&f.store).await, flows);
    assert_eq!(f.store.agents().await.expect("agents"), agents);
    assert_eq!(f.store.dns_answers(0).await.expect("dns").len(), 1);
    assert_eq!(f.store.stored_through_seq("node-a", "boot-1").await.expect("seq"), 7);

    // Same seq from another boot or another node is new data.
    let mut next_boot = first.clone();
    next_boot.boot_id = "boot-2".into();
    assert!(matches!(ingest(&f.store, &next_boot).await, IngestOutcome::Stored { .. }));
    let mut other_node = first.clone();
    other_node.node_id = "node-b".into();
    assert!(matches!(ingest(&f.store, &other_node).await, IngestOutcome::Stored { .. }));
    assert_eq!(all_edges(&f.store).await[0].edge.connections, 3);
}

async fn pruned_batch_records_still_dedupe(f: &Fixture) {
    let (a, b) = (workload(&f.store, "a").await, workload(&f.store, "b").await);
    let one = |seq: u64, received: i64| {
        let mut x = batch("node-a", seq, vec![resolved(flow(Direction::Egress, 80, 1, 1, 1, 1, 1), a, b)]);
        x.received_unix_ms = received;
        x
    };
    for seq in 1..=3 {
        ingest(&f.store, &one(seq, 1_000)).await;
    }
    ingest(&f.store, &one(4, 9_000)).await;
    assert_eq!(f.store.prune_batch_records(5_000).await.expect("prune"), 3);
    // Records of 1..=3 are gone, yet a late resend of 2 is still a duplicate.
    assert_eq!(ingest(&f.store, &one(2, 10_000)).await, IngestOutcome::Duplicate);
    assert_eq!(ingest(&f.store, &one(4, 10_000)).await, IngestOutcome::Duplicate);
    assert!(matches!(ingest(&f.store, &one(5, 10_000)).await, IngestOutcome::Stored { .. }));
    assert_eq!(all_edges(&f.store).await[0].edge.connections, 5);
    assert_eq!(f.store.stored_through_seq("node-a", "boot-1").await.expect("seq"), 5);
}

fn endpoint(netns_ino: u64, addr: IpAddr, identity: Identity, workload: &str) -> ResolvedEndpoint {
    ResolvedEndpoint {
        fact: EndpointFact {
            netns_ino,
            netns_name: Some(format!("ns-{netns_ino}")),
            addresses: vec![InterfaceAddress { interface: "eth0".into(), addr, prefix_len: 24 }],
            cgroups: vec![CgroupFact {
                cgroup_id: netns_ino + 1,
                path: format!("/bulkhead/{workload}"),
                comms: vec!["nginx".into()],
            }],
            host: false,
        },
        identity,
        workload: Some(workload.into()),
    }
}

async fn endpoint_snapshot_replaces_the_nodes_endpoints(f: &Fixture) {
    let (web, db) = (workload(&f.store, "web").await, workload(&f.store, "db").await);
    let mut a1 = batch("node-a", 1, vec![]);
    a1.endpoints = Some(vec![endpoint(10, ip(10), web, "web-1"), endpoint(11, ip(11), db, "db-1")]);
    let mut b1 = batch("node-b", 1, vec![]);
    let mut host = endpoint(20, IpAddr::V6(Ipv6Addr::LOCALHOST), Identity::HOST, "host");
    host.fact.host = true;
    host.fact.netns_name = None;
    host.workload = None;
    b1.endpoints = Some(vec![host.clone()]);
    ingest(&f.store, &a1).await;
    ingest(&f.store, &b1).await;
    let eps = f.store.endpoints().await.expect("endpoints");
    assert_eq!(eps.len(), 3);
    assert_eq!(eps[0].fact, a1.endpoints.as_ref().expect("snapshot")[0].fact, "facts round-trip exactly");
    assert_eq!(eps[2].fact, host.fact);
    assert_eq!((eps[2].identity, eps[2].workload.as_deref()), (Identity::HOST, None));

    // A batch without a snapshot leaves endpoints alone.
    ingest(&f.store, &batch("node-a", 2, vec![])).await;
    assert_eq!(f.store.endpoints().await.expect("endpoints").len(), 3);

    // A new snapshot of node-a replaces node-a's endpoints only.
    let mut a3 = batch("node-a", 3, vec![]);
    a3.endpoints = Some(vec![endpoint(12, ip(12), web, "web-2")]);
    ingest(&f.store, &a3).await;
    let eps = f.store.endpoints().await.expect("endpoints");
    let summary: Vec<(&str, u64, Option<&str>)> =
        eps.iter().map(|e| (e.node_id.as_str(), e.fact.netns_ino, e.workload.as_deref())).collect();
    assert_eq!(summary, vec![("node-a", 12, Some("web-2")), ("node-b", 20, None)]);

    // An empty snapshot means the node has no endpoints left.
    let mut a4 = batch("node-a", 4, vec![]);
    a4.endpoints = Some(vec![]);
    ingest(&f.store, &a4).await;
    assert_eq!(f.store.endpoints().await.expect("endpoints").len(), 1);
}

async fn flows_page_by_keyset_and_filter(f: &Fixture) {
    let (a, b, c) = (workload(&f.store, "a").await, workload(&f.store, "b").await, workload(&f.store, "c").await);
    for seq in 0..5u64 {
        let flows = (0..5i64)
            .map(|i| {
                let t = seq as i64 * 100 + i;
                let port = if i % 2 == 0 { 80 } else { 443 };
                let dst = if seq % 2 == 0 { b } else { c };
                resolved(flow(Direction::Egress, port, 1, 1, 1, t, t), a, dst)
            })
            .collect();
        let node = if seq < 3 { "node-1" } else { "node-2" };
        ingest(&f.store, &batch(node, seq, flows)).await;
    }

    let mut seen = Vec::new();
    let mut before = None;
    let mut pages = Vec::new();
    loop {
        let page =
            f.store.flows(&FlowQuery { limit: 10, before_id: before, ..FlowQuery::default() }).await.expect("page");
        if page.is_empty() {
            break;
        }
        pages.push(page.len());
        before = page.last().map(|r| r.id);
        seen.extend(page.iter().map(|r| r.id));
    }
    assert_eq!(pages, vec![10, 10, 5]);
    assert!(seen.windows(2).all(|w| w[0] > w[1]), "newest first, strictly decreasing ids: {seen:?}");
    // Newest first means the last-ingested flow leads.
    let newest = &f.store.flows(&FlowQuery { limit: 1, ..FlowQuery::default() }).await.expect("newest")[0];
    assert_eq!(newest.flow.last_seen_unix_ms, 404);
    assert_eq!((newest.node_id.as_str(), newest.src_identity, newest.dst_identity), ("node-2", a, b));
    assert_eq!(newest.received_unix_ms, 1_000_000);

    let count = |q: FlowQuery| {
        let store = f.store.clone();
        async move { store.flows(&FlowQuery { limit: 1000, ..q }).await.expect("filtered").len() }
    };
    assert_eq!(count(FlowQuery { identity: Some(c), ..FlowQuery::default() }).await, 10);
    assert_eq!(count(FlowQuery { identity: Some(a), ..FlowQuery::default() }).await, 25);
    assert_eq!(count(FlowQuery { dst_port: Some(80), ..FlowQuery::default() }).await, 15);
    assert_eq!(count(FlowQuery { node_id: Some("node-2".into()), ..FlowQuery::default() }).await, 10);
    assert_eq!(count(FlowQuery { since_unix_ms: Some(300), ..FlowQuery::default() }).await, 10);
    assert_eq!(
        count(FlowQuery {
            node_id: Some("node-1".into()),
            identity: Some(b),
            dst_port: Some(443),
            ..FlowQuery::default()
        })
        .await,
        4
    );
    // Paging within a filter.
    let first =
        f.store.flows(&FlowQuery { identity: Some(b), limit: 4, ..FlowQuery::default() }).await.expect("filtered page");
    let rest = f
        .store
        .flows(&FlowQuery {
            identity: Some(b),
            limit: 100,
            before_id: first.last().map(|r| r.id),
            ..FlowQuery::default()
        })
        .await
        .expect("filtered rest");
    assert_eq!((first.len(), rest.len()), (4, 11));
}

async fn prune_deletes_old_flows_only(f: &Fixture) {
    let (a, b) = (workload(&f.store, "a").await, workload(&f.store, "b").await);
    let flows = (0..30i64).map(|i| resolved(flow(Direction::Egress, 80, 1, 1, 1, i * 100, i * 100), a, b)).collect();
    let mut x = batch("node-a", 1, flows);
    x.dns_answers = vec![dns("old.example", 1, 60, 100), dns("new.example", 2, 60, 2_900)];
    ingest(&f.store, &x).await;

    assert_eq!(f.store.prune_flows(1_000).await.expect("prune"), 10);
    let left = all_flows(&f.store).await;
    assert_eq!(left.len(), 20);
    assert!(left.iter().all(|r| r.flow.last_seen_unix_ms >= 1_000));
    assert_eq!(f.store.prune_flows(1_000).await.expect("prune again"), 0);
    let q = FlowQuery { identity: Some(b), limit: 100, ..FlowQuery::default() };
    assert_eq!(f.store.flows(&q).await.expect("by identity after prune").len(), 20);
    // The graph is long-term memory: edges survive flow retention.
    assert_eq!(all_edges(&f.store).await[0].edge.connections, 30);

    assert_eq!(f.store.prune_dns_answers(1_000).await.expect("prune dns"), 1);
    let names: Vec<String> = f.store.dns_answers(0).await.expect("dns").into_iter().map(|d| d.name).collect();
    assert_eq!(names, vec!["new.example".to_owned()]);
}

async fn hostile_strings_round_trip_as_data(f: &Fixture) {
    let nasty = [
        "x'); DROP TABLE edges;--",
        "\" OR 1=1 --",
        "<script>alert('x')</script>",
        "back\\slash \\x00 $1 ? ?1 :name @p",
        "ünïcödé 🚀 \u{202e}rtl",
        "nul\u{0}inside",
        "",
    ];
    let mut ids = Vec::new();
    for (i, v) in nasty.iter().enumerate() {
        // Keys may not hold control characters; values may hold anything.
        let key = format!("k8s:{}", v.replace('\0', "0"));
        let l = labels(&[("app", v), (key.as_str(), "v"), ("idx", &i.to_string())]);
        let id = f.store.ensure_identity(&l).await.expect("hostile labels are just data");
        assert_eq!(f.store.ensure_identity(&l).await.expect("again"), id);
        ids.push((id, l));
    }
    let rows = f.store.identities().await.expect("identities");
    for (id, l) in &ids {
        let row = rows.iter().find(|r| r.id == *id).expect("stored");
        assert_eq!(&row.labels, l);
    }

    // Hostile node ids, comms and DNS names too.
    let node = "node'; DELETE FROM flows; --";
    let mut fl = flow(Direction::Egress, 80, 1, 1, 1, 1, 1);
    fl.comm = "<img src=x onerror=alert(1)>'\"".into();
    let mut nul_comm = fl.clone();
    nul_comm.comm = "a\0b".into();
    let mut x = batch(node, 1, vec![resolved(fl.clone(), ids[0].0, ids[1].0)]);
    x.boot_id = "boot'--".into();
    x.dns_answers = vec![dns("evil'.example; DROP TABLE dns_answers", 1, 5, 1)];
    // NUL, which PostgreSQL text cannot hold, is replaced (identically on both backends)
    // instead of making the batch unstorable.
    let mut y = batch("node-nul", 1, vec![resolved(nul_comm, ids[0].0, ids[1].0)]);
    y.dns_answers = vec![dns("x\0.example", 1, 5, 1)];
    assert!(matches!(ingest(&f.store, &y).await, IngestOutcome::Stored { .. }));
    let q = FlowQuery { node_id: Some("node-nul".into()), ..FlowQuery::default() };
    assert_eq!(f.store.flows(&q).await.expect("nul flow")[0].flow.comm, "a\u{FFFD}b");
    assert_eq!(f.store.dns_answers(0).await.expect("dns")[0].name, "x\u{FFFD}.example");
    assert_eq!(f.store.prune_flows(i64::MAX).await.expect("clear"), 1);
    assert_eq!(f.store.prune_dns_answers(i64::MAX).await.expect("clear"), 1);
    x.endpoints = Some(vec![endpoint(1, ip(1), ids[2].0, "wl'\"<b>")]);
    assert!(matches!(ingest(&f.store, &x).await, IngestOutcome::Stored { .. }));
    assert_eq!(ingest(&f.store, &x).await, IngestOutcome::Duplicate);

    let flows = all_flows(&f.store).await;
    assert_eq!(flows.len(), 1);
    assert_eq!((flows[0].node_id.as_str(), &flows[0].flow), (node, &fl));
    let edges = all_edges(&f.store).await;
    assert_eq!((&edges[0].src_labels, &edges[0].dst_labels), (&ids[0].1, &ids[1].1));
    assert_eq!(f.store.dns_answers(0).await.expect("dns")[0].name, "evil'.example; DROP TABLE dns_answers");
    assert_eq!(f.store.endpoints().await.expect("endpoints")[0].workload.as_deref(), Some("wl'\"<b>"));
    assert_eq!(f.store.stored_through_seq(node, "boot'--").await.expect("seq"), 1);
    assert!(f.store.agent_known(node).await.expect("known"));
    let q = FlowQuery { node_id: Some(node.into()), ..FlowQuery::default() };
    assert_eq!(f.store.flows(&q).await.expect("filter by hostile node").len(), 1);
}

async fn extreme_values_round_trip(f: &Fixture) {
    let (a, b) = (workload(&f.store, "a").await, workload(&f.store, "b").await);
    let mut fl = flow(Direction::Ingress, u16::MAX, u64::MAX, u64::MAX, u64::MAX, i64::MIN, i64::MAX);
    fl.netns_ino = u64::MAX;
    fl.cgroup_id = 1 << 63;
    fl.pid = u32::MAX;
    fl.src_addr = IpAddr::V6("fe80::1:2:3:4".parse().expect("v6"));
    fl.dst_addr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    fl.verdict = Verdict::Audit;
    let mut x = batch("node-a", u64::try_from(i64::MAX).expect("fits"), vec![resolved(fl.clone(), a, b)]);
    x.loss = LossCounters {
        ringbuf_dropped: u64::MAX,
        queue_dropped: 1,
        spool_evicted_batches: 2,
        spool_evicted_flows: 3,
        rejected_batches: 4,
    };
    ingest(&f.store, &x).await;
    // Counters add up saturating, never overflow into an error the agent would retry.
    let mut again = x.clone();
    again.seq -= 1;
    ingest(&f.store, &again).await;

    let row = &all_flows(&f.store).await[0];
    assert_eq!(row.flow.netns_ino, u64::MAX, "kernel ids round-trip bit for bit");
    assert_eq!(row.flow.cgroup_id, 1 << 63);
    assert_eq!((row.flow.pid, row.flow.dst_port, row.flow.src_addr), (u32::MAX, u16::MAX, fl.src_addr));
    assert_eq!(row.flow.bytes_sent, i64::MAX as u64, "counters saturate at i64::MAX");
    assert_eq!(row.flow.verdict, Verdict::Audit);
    let e = &all_edges(&f.store).await[0];
    assert_eq!((e.edge.connections, e.edge.bytes), (i64::MAX as u64, i64::MAX as u64));
    assert_eq!((e.edge.first_seen_unix_ms, e.edge.last_seen_unix_ms), (i64::MIN, i64::MAX));
    assert_eq!(e.connections_egress, 0);
    let agent = &f.store.agents().await.expect("agents")[0];
    assert_eq!(agent.loss.ringbuf_dropped, i64::MAX as u64);
    assert_eq!(agent.loss.rejected_batches, 4);
    assert_eq!(f.store.stored_through_seq("node-a", "boot-1").await.expect("seq"), i64::MAX as u64);

    let mut too_big = x.clone();
    too_big.seq = u64::MAX;
    let err = f.store.ingest(&too_big).await.expect_err("seq beyond i64 is refused, not wrapped");
    assert!(matches!(err, bulkhead_learner::store::StoreError::OutOfRange { field: "seq", .. }), "{err}");
}

async fn concurrent_ingest_and_identity_allocation(f: &Fixture) {
    const TASKS: u64 = 6;
    const BATCHES: u64 = 15;
    const FLOWS: u64 = 200;
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let store = f.store.clone();
        handles.push(tokio::spawn(async move {
            let mut shared = Vec::new();
            for i in 0..12 {
                // Everyone allocates the same label sets at the same time ...
                shared.push(store.ensure_identity(&labels(&[("app", &format!("shared-{i}"))])).await.expect("shared"));
                // ... and some of their own.
                store.ensure_identity(&labels(&[("app", &format!("own-{t}-{i}"))])).await.expect("own");
            }
            for seq in 0..BATCHES {
                let flows = (0..FLOWS)
                    .map(|i| {
                        let src = shared[(i % 12) as usize];
                        let dst = shared[((i + seq) % 12) as usize];
                        let dir = if i % 3 == 0 { Direction::Ingress } else { Direction::Egress };
                        resolved(flow(dir, 80, 1, 1, 0, 1, 1), src, dst)
                    })
                    .collect();
                let out = store.ingest(&batch(&format!("node-{t}"), seq, flows)).await.expect("concurrent ingest");
                assert!(matches!(out, IngestOutcome::Stored { .. }));
                // Interleave reads with the writes.
                store.edges(&EdgeQuery { limit: Some(5), ..EdgeQuery::default() }).await.expect("read while writing");
            }
            shared
        }));
    }
    let mut results = Vec::new();
    for h in handles {
        results.push(h.await.expect("task"));
    }
    assert!(results.windows(2).all(|w| w[0] == w[1]), "all tasks got the same identities: {results:?}");
    let distinct: BTreeSet<_> = results[0].iter().collect();
    assert_eq!(distinct.len(), 12);

    let ids = f.store.identities().await.expect("identities");
    assert_eq!(ids.len(), ReservedIdentity::ALL.len() + 12 + (TASKS as usize) * 12, "no duplicate allocations");
    let flows = all_flows(&f.store).await;
    assert_eq!(flows.len() as u64, TASKS * BATCHES * FLOWS);
    let edges = all_edges(&f.store).await;
    let egress: u64 = edges.iter().map(|e| e.connections_egress).sum();
    let ingress: u64 = edges.iter().map(|e| e.connections_ingress).sum();
    assert_eq!(egress + ingress, TASKS * BATCHES * FLOWS, "every flow counted exactly once per side");
    let agents = f.store.agents().await.expect("agents");
    assert_eq!(agents.len() as u64, TASKS);
    assert!(agents.iter().all(|a| a.batches_stored == BATCHES));
}

fn dns(name: &str, last_octet: u8, ttl: u32, seen: i64) -> DnsAnswer {
    DnsAnswer { netns_ino: 7, name: name.into(), addr: ip(last_octet), ttl_seconds: ttl, seen_unix_ms: seen }
}

async fn dns_answers_are_stored_once_per_answer(f: &Fixture) {
    let mut x = batch("node-a", 1, vec![]);
    x.dns_answers = vec![
        dns("api.example.com", 1, 30, 1_000),
        dns("api.example.com", 1, 60, 2_000), // same answer again, later: one row, newest TTL
        dns("api.example.com", 2, 30, 1_500),
        dns("db.internal", 3, 5, 500),
    ];
    ingest(&f.store, &x).await;
    let mut y = batch("node-a", 2, vec![]);
    y.dns_answers = vec![dns("api.example.com", 2, 10, 1_200)]; // older sighting: keeps TTL 30
    ingest(&f.store, &y).await;

    let all = f.store.dns_answers(0).await.expect("dns");
    let got: Vec<(&str, IpAddr, u32, i64)> =
        all.iter().map(|d| (d.name.as_str(), d.addr, d.ttl_seconds, d.seen_unix_ms)).collect();
    assert_eq!(
        got,
        vec![
            ("api.example.com", ip(1), 60, 2_000),
            ("api.example.com", ip(2), 30, 1_500),
            ("db.internal", ip(3), 5, 500),
        ]
    );
    assert_eq!(all[0].netns_ino, 7);
    assert_eq!(f.store.dns_answers(1_600).await.expect("since").len(), 1);
}

async fn agents_registration_hello_and_loss(f: &Fixture) {
    assert!(!f.store.agent_known("node-a").await.expect("known"));
    f.store.register_agent("node-a", 100).await.expect("register");
    f.store.register_agent("node-a", 200).await.expect("register is idempotent");
    assert!(f.store.agent_known("node-a").await.expect("known"));
    let a = &f.store.agents().await.expect("agents")[0];
    assert_eq!((a.registered_unix_ms, a.boot_id.as_deref(), a.first_seen_unix_ms), (Some(100), None, None));

    f.store.touch_agent("node-a", "boot-1", "0.1.0", 1_000).await.expect("hello");
    let mut x = batch("node-a", 1, vec![]);
    x.received_unix_ms = 1_500;
    x.loss = LossCounters { ringbuf_dropped: 5, queue_dropped: 1, ..LossCounters::default() };
    ingest(&f.store, &x).await;
    // Cumulative counters: a late, older batch of the same boot does not lower them.
    let mut late = batch("node-a", 0, vec![]);
    late.received_unix_ms = 1_600;
    late.loss = LossCounters { ringbuf_dropped: 2, ..LossCounters::default() };
    ingest(&f.store, &late).await;

    let a = &f.store.agents().await.expect("agents")[0];
    assert_eq!(a.boot_id.as_deref(), Some("boot-1"));
    assert_eq!(a.agent_version.as_deref(), Some("0.1.0"));
    assert_eq!((a.first_seen_unix_ms, a.last_seen_unix_ms), (Some(1_000), Some(1_600)));
    assert_eq!((a.loss.ringbuf_dropped, a.loss.queue_dropped), (5, 1));
    assert_eq!(a.batches_stored, 2);
    assert_eq!(f.store.stored_through_seq("node-a", "boot-1").await.expect("seq"), 1);
    assert_eq!(f.store.stored_through_seq("node-a", "boot-0").await.expect("unknown boot"), 0);

    // Reboot: a new boot starts with fresh loss counters.
    f.store.touch_agent("node-a", "boot-2", "0.1.1", 2_000).await.expect("hello");
    let a = &f.store.agents().await.expect("agents")[0];
    assert_eq!((a.boot_id.as_deref(), a.agent_version.as_deref()), (Some("boot-2"), Some("0.1.1")));
    assert_eq!(a.loss, LossCounters::default());
    assert_eq!(a.registered_unix_ms, Some(100));

    // An agent that was never registered becomes known by its Hello.
    f.store.touch_agent("node-b", "boot-9", "0.1.0", 3_000).await.expect("hello");
    assert!(f.store.agent_known("node-b").await.expect("known"));
    let nodes: Vec<String> = f.store.agents().await.expect("agents").into_iter().map(|a| a.node_id).collect();
    assert_eq!(nodes, vec!["node-a".to_owned(), "node-b".to_owned()]);
}

async fn edge_queries_filter_and_limit(f: &Fixture) {
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(workload(&f.store, &format!("w{i}")).await);
    }
    // A ring: w_i -> w_{i+1}, seen at time i.
    let flows = (0..6)
        .map(|i| resolved(flow(Direction::Egress, 80, 1, 1, 1, i as i64, i as i64), ids[i], ids[(i + 1) % 6]))
        .collect();
    ingest(&f.store, &batch("node-a", 1, flows)).await;

    let all = all_edges(&f.store).await;
    let times: Vec<i64> = all.iter().map(|e| e.edge.last_seen_unix_ms).collect();
    assert_eq!(times, vec![5, 4, 3, 2, 1, 0], "most recently seen first");
    let q = |since, identity, limit| EdgeQuery { since_unix_ms: since, identity, limit };
    let touching = f.store.edges(&q(None, Some(ids[2]), None)).await.expect("by identity");
    let pairs: Vec<(Identity, Identity)> = touching.iter().map(|e| (e.edge.key.src, e.edge.key.dst)).collect();
    assert_eq!(pairs, vec![(ids[2], ids[3]), (ids[1], ids[2])]);
    assert_eq!(f.store.edges(&q(Some(4), None, None)).await.expect("since").len(), 2);
    assert_eq!(f.store.edges(&q(None, None, Some(3))).await.expect("limit").len(), 3);
    // Edges touching w0: w0 -> w1 (t=0) and w5 -> w0 (t=5).
    assert_eq!(f.store.edges(&q(Some(2), Some(ids[0]), Some(10))).await.expect("all filters").len(), 1);
    assert_eq!(f.store.edges(&q(Some(0), Some(ids[0]), Some(10))).await.expect("all filters").len(), 2);
    assert_eq!(
        f.store.edges(&q(Some(0), Some(ids[0]), Some(1))).await.expect("all filters")[0].edge.last_seen_unix_ms,
        5
    );
}

/// Sizes beyond one statement's rows (1024 flows or edges, 512 DNS answers on SQLite)
/// and odd remainders: every row is stored once, nothing is padded in.
async fn large_batches_span_statement_chunks(f: &Fixture) {
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(workload(&f.store, &format!("w{i}")).await);
    }
    // 2500 flows over 1500 distinct edges (40 x 40 pairs, ports 80/81 for the first 700).
    let flows: Vec<ResolvedFlow> = (0..2500usize)
        .map(|i| {
            let e = i % 1500;
            let (src, dst) = (ids[e % 40], ids[(e / 40) % 40]);
            let port = if e < 1600 - 900 { 80 } else { 81 };
            let mut fl = flow(Direction::Egress, port, 1, 2, 3, i as i64, i as i64 + 1);
            fl.src_addr = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32));
            fl.comm = format!("c{}", i % 7);
            resolved(fl, src, dst)
        })
        .collect();
    let mut x = batch("node-big", 1, flows.clone());
    x.dns_answers = (0..600u32).map(|i| dns(&format!("n{i}.example"), (i % 200) as u8, 30, i64::from(i))).collect();
    let distinct_edges: BTreeSet<(Identity, Identity, u16)> =
        flows.iter().map(|r| (r.src_identity, r.dst_identity, r.flow.dst_port)).collect();
    assert_eq!(ingest(&f.store, &x).await, IngestOutcome::Stored { flows: 2500, edges: distinct_edges.len() as u64 });
    // A second, exactly-one-chunk batch right after.
    let y = batch("node-big", 2, flows[..1024].to_vec());
    assert!(matches!(ingest(&f.store, &y).await, IngestOutcome::Stored { flows: 1024, .. }));

    let stored = all_flows(&f.store).await;
    assert_eq!(stored.len(), 2500 + 1024);
    // Newest first: batch 2 reversed, then batch 1 reversed, contents exact.
    let expected: Vec<&Flow> = flows[..1024].iter().rev().chain(flows.iter().rev()).map(|r| &r.flow).collect();
    let got: Vec<&Flow> = stored.iter().map(|r| &r.flow).collect();
    assert_eq!(got, expected);
    assert!(stored.windows(2).all(|w| w[0].id > w[1].id));
    assert!(stored.iter().all(|r| r.node_id == "node-big" && r.received_unix_ms == 1_000_000));
    let edges = all_edges(&f.store).await;
    assert_eq!(edges.len(), distinct_edges.len());
    assert_eq!(edges.iter().map(|e| e.edge.connections).sum::<u64>(), 2500 + 1024);
    assert_eq!(f.store.dns_answers(0).await.expect("dns").len(), 600);
    assert_eq!(f.store.stored_through_seq("node-big", "boot-1").await.expect("seq"), 2);
}

/// Pruning removes exactly the flows last seen before the cutoff, whether their batch
/// expired wholly or partly, and keeps every query working; ids are never reused.
async fn prune_by_blocks_is_exact_and_ids_never_reused(f: &Fixture) {
    let (a, b, c) = (workload(&f.store, "a").await, workload(&f.store, "b").await, workload(&f.store, "c").await);
    // Batch 1: last seen 0..99 (all old); batch 2: 50..149 (straddles 100); batch 3:
    // 200..299 (all new); batch 4 from another node: 0..9 (all old).
    let make = |start: i64, dst: Identity| -> Vec<ResolvedFlow> {
        (0..100).map(|i| resolved(flow(Direction::Egress, 80, 1, 1, 1, start + i, start + i), a, dst)).collect()
    };
    ingest(&f.store, &batch("node-1", 1, make(0, b))).await;
    ingest(&f.store, &batch("node-1", 2, make(50, c))).await;
    ingest(&f.store, &batch("node-1", 3, make(200, b))).await;
    ingest(&f.store, &batch("node-2", 1, make(0, c)[..10].to_vec())).await;
    let before = all_flows(&f.store).await;
    let max_id = before.iter().map(|r| r.id).max().expect("flows");

    assert_eq!(f.store.prune_flows(100).await.expect("prune"), 100 + 50 + 10);
    let left = all_flows(&f.store).await;
    let expected: Vec<i64> = before.iter().filter(|r| r.flow.last_seen_unix_ms >= 100).map(|r| r.id).collect();
    assert_eq!(left.iter().map(|r| r.id).collect::<Vec<_>>(), expected);
    assert_eq!(f.store.prune_flows(100).await.expect("again"), 0);
    let q = |identity: Option<Identity>, node: Option<&str>| FlowQuery {
        identity,
        node_id: node.map(str::to_owned),
        limit: 1000,
        ..FlowQuery::default()
    };
    assert_eq!(f.store.flows(&q(Some(c), None)).await.expect("c").len(), 50);
    assert_eq!(f.store.flows(&q(Some(b), None)).await.expect("b").len(), 100);
    assert_eq!(f.store.flows(&q(None, Some("node-2"))).await.expect("node-2").len(), 0);
    assert_eq!(f.store.flows(&q(None, Some("node-1"))).await.expect("node-1").len(), 150);
    // The partly pruned batch prunes further later.
    assert_eq!(f.store.prune_flows(120).await.expect("prune more"), 20);
    assert_eq!(f.store.flows(&q(Some(c), None)).await.expect("c").len(), 30);

    // Everything gone, then new flows: ids keep growing.
    assert_eq!(f.store.prune_flows(i64::MAX).await.expect("all"), 130);
    assert!(all_flows(&f.store).await.is_empty());
    ingest(&f.store, &batch("node-1", 4, make(1_000, b)[..5].to_vec())).await;
    let fresh = all_flows(&f.store).await;
    assert_eq!(fresh.len(), 5);
    assert!(fresh.iter().all(|r| r.id > max_id), "flow ids are never reused");
    assert_eq!(f.store.flows(&q(Some(b), Some("node-1"))).await.expect("after refill").len(), 5);
}

/// Every filter combination and page size gives exactly the flows a plain filter over
/// all stored flows gives, across many small batches from interleaved nodes (SQLite
/// walks `flow_blocks` in steps; this crosses steps and non-adjacent blocks).
async fn flow_queries_match_a_model_across_many_batches(f: &Fixture) {
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(workload(&f.store, &format!("m{i}")).await);
    }
    let mut seqs = [0u64; 3];
    for k in 0..150usize {
        let node = k % 3;
        let flows = (0..(1 + k % 4))
            .map(|j| {
                let t = (k * 10 + j) as i64;
                let port = [80, 443, 53][(k + j) % 3];
                resolved(flow(Direction::Egress, port, 1, 1, 1, t, t), ids[k % 5], ids[(k / 5 + j) % 5])
            })
            .collect();
        seqs[node] += 1;
        ingest(&f.store, &batch(&format!("node-{node}"), seqs[node], flows)).await;
    }
    let all = all_flows(&f.store).await;
    assert_eq!(all.len(), (0..150).map(|k| 1 + k % 4).sum::<usize>());
    for identity in [None, Some(ids[0]), Some(ids[3])] {
        for node in [None, Some("node-1")] {
            for port in [None, Some(443u16)] {
                for since in [None, Some(700i64)] {
                    let expected: Vec<i64> = all
                        .iter()
                        .filter(|r| identity.is_none_or(|i| r.src_identity == i || r.dst_identity == i))
                        .filter(|r| node.is_none_or(|n| r.node_id == n))
                        .filter(|r| port.is_none_or(|p| r.flow.dst_port == p))
                        .filter(|r| since.is_none_or(|s| r.flow.last_seen_unix_ms >= s))
                        .map(|r| r.id)
                        .collect();
                    for page in [1u32, 7, 100, 1000] {
                        let mut got = Vec::new();
                        let mut before = None;
                        loop {
                            let q = FlowQuery {
                                since_unix_ms: since,
                                until_unix_ms: None,
                                node_id: node.map(str::to_owned),
                                identity,
                                dst_port: port,
                                limit: page,
                                before_id: before,
                            };
                            let rows = f.store.flows(&q).await.expect("flows");
                            assert!(rows.len() <= page as usize);
                            for r in &rows {
                                let model = all.iter().find(|m| m.id == r.id).expect("known flow");
                                assert_eq!(r, model, "rows carry their batch's node and receive time");
                            }
                            let Some(last) = rows.last() else { break };
                            before = Some(last.id);
                            got.extend(rows.iter().map(|r| r.id));
                            if page > 100 {
                                break;
                            }
                        }
                        if page > 100 {
                            assert_eq!(got, expected.iter().copied().take(page as usize).collect::<Vec<_>>());
                        } else {
                            assert_eq!(got, expected, "{identity:?} {node:?} {port:?} {since:?} page {page}");
                        }
                    }
                }
            }
        }
    }
}

// === schema hygiene (backend-independent) ===

/// The two migration directories must list the same numbered migrations.
#[test]
fn migrations_are_in_lockstep() {
    let dir = |b: &str| -> Vec<String> {
        let path = format!("{}/../migrations/{b}", env!("CARGO_MANIFEST_DIR"));
        let mut names: Vec<String> = std::fs::read_dir(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        names.sort();
        names
    };
    let (sqlite, postgres) = (dir("sqlite"), dir("postgres"));
    assert!(!sqlite.is_empty());
    assert_eq!(sqlite, postgres);
}

#[tokio::test]
async fn unsupported_urls_are_refused_without_echoing_them() {
    let err = Store::open("mysql://root:secret@localhost/db").await.expect_err("mysql is not supported");
    let msg = err.to_string();
    assert!(msg.contains("mysql") && !msg.contains("secret"), "{msg}");
}

#[tokio::test]
async fn in_memory_sqlite_works_for_quick_tests() {
    let store = Store::open("sqlite::memory:").await.expect("in-memory store");
    let id = store.ensure_identity(&labels(&[("app", "x")])).await.expect("identity");
    assert_eq!(id, Identity(Identity::FIRST_ALLOCATED));
    assert_eq!(store.identities().await.expect("identities").len(), ReservedIdentity::ALL.len() + 1);
}
