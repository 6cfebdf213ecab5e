//! PolicyStream end to end in process: a tonic server on 127.0.0.1:0 over a
//! `Distributor`, and a fake enforcer that says Hello, receives its node's snapshot,
//! acks it, and sees a new snapshot when the compiled policy changes.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bulkhead_learner::distribute::{Distributor, Recorder};
use bulkhead_learner::grpc::ingest::Enrollment;
use bulkhead_learner::identity::inventory::Inventory;
use bulkhead_learner::store::Store;
use bulkhead_model::{
    Direction, EndpointCgroup, EnforcerHello, EnforcerMessage, Identity, IpcacheEntry, NodePolicy, NodeRule, PolicyAck,
    PolicyAckStatus, PolicyEndpoint, PolicyUpdate, Protocol, RolloutMode, RuleKey, RuleRef,
};
use bulkhead_proto::v1::{self, policy_stream_client::PolicyStreamClient};
use bulkhead_testkit::assert_eventually_async;
use common::{deathstar_proposal, endpoint, serve_policy_stream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const TIMEOUT: Duration = Duration::from_secs(10);

fn policy(version: u64, port: u16) -> NodePolicy {
    NodePolicy {
        version,
        ipcache: vec![
            IpcacheEntry { prefix: "10.202.0.10/32".parse().expect("net"), identity: Identity(256) },
            IpcacheEntry { prefix: "10.202.0.11/32".parse().expect("net"), identity: Identity(257) },
        ],
        endpoints: vec![PolicyEndpoint {
            identity: Identity(256),
            netns_ino: Some(4026532001),
            netns_name: Some("bh-demo-deathstar".into()),
            cgroups: vec![EndpointCgroup { cgroup_id: 42, path: "/bulkhead/deathstar".into() }],
            mode: RolloutMode::Monitor,
            ingress_covered: true,
            egress_covered: false,
        }],
        rules: vec![NodeRule {
            key: RuleKey {
                local: Identity(256),
                direction: Direction::Ingress,
                peer: Some(Identity(257)),
                port: Some(port),
                protocol: Some(Protocol::Tcp),
            },
            rule_id: 1,
            http: Vec::new(),
        }],
        rule_refs: vec![RuleRef {
            rule_id: 1,
            proposal_id: 1,
            policy_name: "bulkhead-deathstar".into(),
            direction: Direction::Ingress,
            rule_index: 0,
        }],
    }
}

async fn serve(distributor: Distributor) -> String {
    serve_policy_stream(distributor, None).await
}

fn hello(node: &str, applied: u64) -> v1::EnforcerMessage {
    (&EnforcerMessage::Hello(EnforcerHello {
        node_id: node.into(),
        boot_id: "boot-1".into(),
        agent_version: "test".into(),
        applied_version: applied,
    }))
        .into()
}

#[tokio::test]
async fn enforcer_gets_snapshot_acks_and_follows_changes() {
    let distributor = Distributor::new();
    distributor.publish(BTreeMap::from([("node-a".to_owned(), policy(100, 80))]));
    let url = serve(distributor.clone()).await;

    let mut client = PolicyStreamClient::connect(url).await.expect("connects");
    let (tx, rx) = mpsc::channel(8);
    tx.send(hello("node-a", 0)).await.expect("send hello");
    let mut updates = client.subscribe(ReceiverStream::new(rx)).await.expect("subscribes").into_inner();

    let first = updates.message().await.expect("stream ok").expect("a snapshot");
    let first = NodePolicy::try_from(first).expect("valid snapshot");
    assert_eq!(first, policy(100, 80));
    let ack = EnforcerMessage::Ack(PolicyAck { version: first.version, status: PolicyAckStatus::Applied, error: None });
    tx.send((&ack).into()).await.expect("send ack");
    assert_eventually_async!(
        TIMEOUT,
        async || distributor.status().get("node-a").and_then(|s| s.applied_version) == Some(100),
        "the learner records the applied version"
    );
    let status = &distributor.status()["node-a"];
    assert!(status.connected);
    assert_eq!(status.boot_id.as_deref(), Some("boot-1"));

    // Same content again: nothing is sent; new content: a higher version.
    assert!(distributor.publish(BTreeMap::from([("node-a".to_owned(), policy(101, 80))])).is_empty());
    assert_eq!(distributor.publish(BTreeMap::from([("node-a".to_owned(), policy(101, 443))])), ["node-a"]);
    // The enforcer acked v100, so v101 travels as the change against it.
    let second =
        PolicyUpdate::try_from(updates.message().await.expect("stream ok").expect("an update")).expect("valid");
    let PolicyUpdate::Delta(delta) = second else { panic!("expected a delta, got {second:?}") };
    assert_eq!(
        (delta.base_version, delta.version, delta.rules_upsert.len(), delta.rules_remove.len()),
        (100, 101, 1, 1)
    );
    assert!(delta.ipcache_upsert.is_empty() && delta.endpoints.is_none());
    let second = delta.apply(&first).expect("applies to v100");
    assert_eq!(second.version, 101);
    assert_eq!(second.rules[0].key.port, Some(443));
    // Reports name rule ids of the version the node ran; both versions still resolve.
    for version in [100, 101] {
        let r = distributor.rule_ref("node-a", version, 1).expect("rule 1 is known");
        assert_eq!((r.proposal_id, r.direction, r.rule_index), (1, Direction::Ingress, 0));
    }
    assert_eq!(distributor.rule_ref("node-a", 99, 1), None);

    let reject = EnforcerMessage::Ack(PolicyAck {
        version: 101,
        status: PolicyAckStatus::Rejected,
        error: Some("maps full".into()),
    });
    tx.send((&reject).into()).await.expect("send ack");
    assert_eventually_async!(
        TIMEOUT,
        async || distributor.status()["node-a"]
            .last_ack
            .as_ref()
            .is_some_and(|a| a.status == PolicyAckStatus::Rejected),
        "a rejection is recorded"
    );
    assert_eq!(distributor.status()["node-a"].applied_version, Some(100), "a rejected version is not applied");
    // After a rejection the stream does not guess what the enforcer holds: a snapshot.
    assert_eq!(distributor.publish(BTreeMap::from([("node-a".to_owned(), policy(102, 8080))])), ["node-a"]);
    let third = PolicyUpdate::try_from(updates.message().await.expect("stream ok").expect("an update")).expect("valid");
    assert!(matches!(&third, PolicyUpdate::Snapshot(p) if p.version == 102), "{third:?}");

    drop(tx);
    assert_eventually_async!(TIMEOUT, async || !distributor.status()["node-a"].connected, "disconnect is noticed");
}

#[tokio::test]
async fn hello_must_come_first_and_versions_never_go_back() {
    let distributor = Distributor::new();
    let url = serve(distributor.clone()).await;
    let mut client = PolicyStreamClient::connect(url).await.expect("connects");

    let (tx, rx) = mpsc::channel(8);
    let ack = EnforcerMessage::Ack(PolicyAck { version: 1, status: PolicyAckStatus::Applied, error: None });
    tx.send((&ack).into()).await.expect("send");
    let err = match client.subscribe(ReceiverStream::new(rx)).await {
        Ok(mut s) => s.get_mut().message().await.expect_err("refused"),
        Err(e) => e,
    };
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");

    // Before the learner compiled anything (it just restarted), a connecting enforcer
    // is sent nothing: it keeps what it enforces.
    let (tx, rx) = mpsc::channel(8);
    tx.send(hello("node-new", 500)).await.expect("send hello");
    let mut updates = client.subscribe(ReceiverStream::new(rx)).await.expect("subscribes").into_inner();
    assert_eventually_async!(
        Duration::from_secs(10),
        async || distributor.status().get("node-new").is_some_and(|s| s.connected),
        "the stream is registered"
    );
    assert_eq!(distributor.status()["node-new"].published_version, 0, "nothing published for it yet");
    // The first compilation has nothing for the node: now an empty policy, stamped
    // above what it says it applied (e.g. from before a restart whose clock went back).
    assert_eq!(distributor.publish(BTreeMap::new()), ["node-new"]);
    let snap = NodePolicy::try_from(updates.message().await.expect("ok").expect("snapshot")).expect("valid");
    assert_eq!(snap.version, 501, "the first message is the compiled one: {snap:?}");
    assert!(snap.endpoints.is_empty() && snap.rules.is_empty());
}

#[tokio::test]
async fn recompile_over_an_empty_store_publishes_nothing() {
    let store = Store::open("sqlite::memory:").await.expect("store");
    let distributor = Distributor::new();
    let changed =
        distributor.recompile(&store, &Inventory::default(), None, 1_700_000_000_000).await.expect("recompiles");
    assert!(changed.is_empty());
    assert!(distributor.status().is_empty());
}

// === from the store ===

fn labels(pairs: &[(&str, &str)]) -> bulkhead_model::Labels {
    bulkhead_model::Labels::new(pairs.iter().copied()).expect("labels")
}

fn endpoints_batch(
    node: &str,
    endpoints: Vec<bulkhead_learner::store::ResolvedEndpoint>,
) -> bulkhead_learner::store::IngestBatch {
    bulkhead_learner::store::IngestBatch {
        node_id: node.into(),
        boot_id: "boot-1".into(),
        seq: 1,
        received_unix_ms: 1_000,
        flows: vec![],
        endpoints: Some(endpoints),
        dns_answers: vec![],
        loss: bulkhead_model::LossCounters::default(),
    }
}

/// deathstar accepts the empire on 80/TCP.
fn empire_on_80(target: Identity) -> bulkhead_model::Proposal {
    use bulkhead_model::{LabelSelector, Peer, PortRange, Rule};
    let rule = Rule {
        peer: Peer::Workloads { selector: LabelSelector::with_labels([("org", "empire")]) },
        ports: vec![PortRange::single(Protocol::Tcp, 80)],
        http: vec![],
    };
    deathstar_proposal(target, None, rule)
}

#[tokio::test]
async fn recompile_follows_approval_and_rollout() {
    let store = Store::open("sqlite::memory:").await.expect("store");
    let deathstar = store.ensure_identity(&labels(&[("org", "empire"), ("class", "deathstar")])).await.expect("id");
    let tiefighter = store.ensure_identity(&labels(&[("org", "empire"), ("class", "tiefighter")])).await.expect("id");
    let xwing = store.ensure_identity(&labels(&[("org", "alliance"), ("class", "xwing")])).await.expect("id");
    store
        .ingest(&endpoints_batch(
            "node-a",
            vec![endpoint(deathstar, 11, "10.202.0.10"), endpoint(tiefighter, 12, "10.202.0.11")],
        ))
        .await
        .expect("ingest a");
    store.ingest(&endpoints_batch("node-b", vec![endpoint(xwing, 13, "10.202.0.12")])).await.expect("ingest b");

    let distributor = Distributor::new();
    let inventory = Inventory::default();
    let changed = distributor.recompile(&store, &inventory, None, 2_000).await.expect("recompiles");
    assert_eq!(changed, ["node-a", "node-b"], "every node with endpoints gets a (so far empty) policy");
    assert!(distributor.current("node-a").expect("node-a").endpoints.is_empty(), "everything is in learn");

    let p = empire_on_80(deathstar);
    let record = store.put_proposal(&p, 3_000).await.expect("put");
    let approve = bulkhead_learner::store::Decision::Approve { policy: p.policy.clone() };
    store.decide_proposal(record.summary.id, approve, "alice", None, 3_100).await.expect("approve");
    assert!(
        distributor.recompile(&store, &inventory, None, 3_200).await.expect("recompiles").is_empty(),
        "an approved policy for a workload in learn changes no node"
    );

    store.set_rollout_mode(deathstar, RolloutMode::Monitor, "alice", "try it", 4_000).await.expect("monitor");
    assert_eq!(distributor.recompile(&store, &inventory, None, 4_100).await.expect("recompiles"), ["node-a"]);
    let a = distributor.current("node-a").expect("node-a");
    assert_eq!(a.version, 4_100);
    assert_eq!(a.endpoints.len(), 1);
    assert_eq!((a.endpoints[0].identity, a.endpoints[0].mode), (deathstar, RolloutMode::Monitor));
    assert_eq!(a.rule_refs[0].proposal_id, record.summary.id);
    let ix = a.index();
    let peer = |addr: &str| ix.identity_of(addr.parse().expect("ip"));
    assert!(ix.decide(deathstar, Direction::Ingress, peer("10.202.0.11"), 80, Protocol::Tcp).allows());
    assert!(!ix.decide(deathstar, Direction::Ingress, peer("10.202.0.12"), 80, Protocol::Tcp).allows());

    store.set_rollout_mode(deathstar, RolloutMode::Enforce, "alice", "quiet", 5_000).await.expect("enforce");
    // The clock may go back: versions still grow.
    assert_eq!(distributor.recompile(&store, &inventory, None, 10).await.expect("recompiles"), ["node-a"]);
    let a = distributor.current("node-a").expect("node-a");
    assert_eq!((a.version, a.endpoints[0].mode), (4_101, RolloutMode::Enforce));
}

/// What an enforcer says ends up in the store: its applied version, its audit events
/// (named by workload and oriented initiator → responder) and the hits of the
/// approved rule the node-local rule id stands for.
#[tokio::test]
async fn hello_acks_and_reports_are_recorded_in_the_store() {
    let store = Store::open("sqlite::memory:").await.expect("store");
    let deathstar = store.ensure_identity(&labels(&[("org", "empire"), ("class", "deathstar")])).await.expect("id");
    let tiefighter = store.ensure_identity(&labels(&[("org", "empire"), ("class", "tiefighter")])).await.expect("id");
    let xwing = store.ensure_identity(&labels(&[("org", "alliance"), ("class", "xwing")])).await.expect("id");
    let eps = vec![endpoint(deathstar, 11, "10.202.0.10"), endpoint(tiefighter, 12, "10.202.0.11")];
    store.ingest(&endpoints_batch("node-a", eps)).await.expect("ingest");
    let p = empire_on_80(deathstar);
    let record = store.put_proposal(&p, 3_000).await.expect("put");
    let approve = bulkhead_learner::store::Decision::Approve { policy: p.policy.clone() };
    store.decide_proposal(record.summary.id, approve, "alice", None, 3_100).await.expect("approve");
    store.set_rollout_mode(deathstar, RolloutMode::Monitor, "alice", "try it", 4_000).await.expect("monitor");

    let distributor = Distributor::new();
    distributor.recompile(&store, &Inventory::default(), None, 5_000).await.expect("recompiles");
    let recorder = Recorder { store: store.clone(), distributor: distributor.clone(), enrollment: Enrollment::Open };
    let url = serve_policy_stream(distributor.clone(), Some(recorder)).await;

    let mut client = PolicyStreamClient::connect(url).await.expect("connects");
    let (tx, rx) = mpsc::channel(8);
    tx.send(hello("node-a", 0)).await.expect("send hello");
    let mut updates = client.subscribe(ReceiverStream::new(rx)).await.expect("subscribes").into_inner();
    let snap = NodePolicy::try_from(updates.message().await.expect("ok").expect("snapshot")).expect("valid");
    let ack = EnforcerMessage::Ack(PolicyAck { version: snap.version, status: PolicyAckStatus::Applied, error: None });
    tx.send((&ack).into()).await.expect("ack");
    let rule_id = snap.rule_refs[0].rule_id;
    let event = bulkhead_model::node_policy::VerdictEvent {
        time_unix_ms: 6_000,
        cgroup_id: 0,
        netns_ino: 11,
        local_identity: deathstar,
        peer_identity: xwing,
        local_addr: "10.202.0.10".parse().expect("ip"),
        local_port: 80,
        peer_addr: "10.202.0.12".parse().expect("ip"),
        peer_port: 40000,
        protocol: Protocol::Tcp,
        direction: Direction::Ingress,
        verdict: bulkhead_model::Verdict::Audit,
        rule_id: None,
        suppressed: 0,
        http: None,
    };
    let report = EnforcerMessage::Report(bulkhead_model::node_policy::VerdictReport {
        policy_version: snap.version,
        events: vec![event],
        rule_counters: vec![bulkhead_model::node_policy::RuleCounter { rule_id, hits: 7, last_hit_unix_ms: 6_100 }],
        loss: Default::default(),
        sent_unix_ms: 0,
    });
    tx.send((&report).into()).await.expect("report");

    assert_eventually_async!(
        TIMEOUT,
        async || store.enforcers().await.is_ok_and(|e| e.iter().any(|r| r.applied_version == Some(snap.version))),
        "the applied version is stored"
    );
    let q = bulkhead_learner::store::VerdictQuery { identity: Some(deathstar), limit: 10, ..Default::default() };
    assert_eventually_async!(
        TIMEOUT,
        async || store.verdict_events(&q).await.is_ok_and(|v| v.len() == 1),
        "the audit event is stored"
    );
    let ev = &store.verdict_events(&q).await.expect("events")[0].event;
    assert_eq!(
        (ev.src_addr.to_string(), ev.dst_addr.to_string(), ev.dst_port),
        ("10.202.0.12".into(), "10.202.0.10".into(), 80)
    );
    assert_eq!((ev.peer, ev.rule.as_ref()), (xwing, None), "default deny names no rule");
    assert_eventually_async!(
        TIMEOUT,
        async || store.rule_hits(record.summary.id).await.is_ok_and(|h| h.iter().any(|r| r.hits == 7)),
        "rule hits are stored against the approved rule"
    );
    // The first node that applied the approved version deployed it, on the record.
    assert_eventually_async!(
        TIMEOUT,
        async || store
            .proposal(record.summary.id)
            .await
            .is_ok_and(|p| p.is_some_and(|p| p.summary.status == bulkhead_model::ProposalStatus::Deployed)),
        "the approved version becomes deployed"
    );
    let q = bulkhead_learner::store::AuditQuery { limit: 100, ..Default::default() };
    let audit = store.audit(&q).await.expect("audit");
    assert!(audit.iter().any(|e| e.action == "proposal.deploy" && e.actor == "enforcer:node-a"), "{audit:?}");
    // Re-acking (a reconnect) changes nothing and fails nothing.
    tx.send((&ack).into()).await.expect("ack again");
    let enforcers = store.enforcers().await.expect("enforcers");
    assert_eq!(enforcers[0].applied_version, Some(snap.version));
}

/// Closed enrollment holds for the policy stream as for flows: an unregistered node
/// learns nothing (policy names workloads and addresses); once registered it does.
#[tokio::test]
async fn closed_enrollment_refuses_unregistered_enforcers() {
    let store = Store::open("sqlite::memory:").await.expect("store");
    let distributor = Distributor::new();
    distributor.publish(BTreeMap::from([("node-a".to_owned(), policy(5, 80))]));
    let recorder = Recorder { store: store.clone(), distributor: distributor.clone(), enrollment: Enrollment::Closed };
    let url = serve_policy_stream(distributor.clone(), Some(recorder)).await;

    let subscribe = |url: String| async move {
        let mut client = PolicyStreamClient::connect(url).await.expect("connects");
        let (tx, rx) = mpsc::channel(8);
        tx.send(hello("node-a", 0)).await.expect("send hello");
        let result = client.subscribe(ReceiverStream::new(rx)).await;
        (result, tx)
    };
    let (refused, _tx) = subscribe(url.clone()).await;
    let status = refused.expect_err("an unregistered node is refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(status.message().contains("bulkhead-learner node add node-a"), "{status:?}");

    store.register_agent("node-a", 1_000).await.expect("register");
    let (admitted, _tx) = subscribe(url).await;
    let mut updates = admitted.expect("a registered node is admitted").into_inner();
    let snap = NodePolicy::try_from(updates.message().await.expect("ok").expect("snapshot")).expect("valid");
    assert_eq!(snap.version, 5);
}
