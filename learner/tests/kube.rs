//! The Kubernetes identity source against a real API server (etcd + kube-apiserver
//! v1.20.2 from `bulkhead_testkit::kube`): pods become identities the way the pure
//! state machine says, follow relabels and deletions, survive an API server restart
//! (re-list after 410 Gone), and an RBAC denial is reported, not fatal.
//!
//! Each test starts its own API server and uses its own namespace. v1.20 has no
//! kubelet: pod IPs are set with a status patch.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bulkhead_learner::grpc::ingest::Enrollment;
use bulkhead_learner::identity::kube::{KubeConfigSource, KubeWatchers, SERVICE_ACCOUNT_KEY};
use bulkhead_learner::identity::{ConflictKind, Resolver, Subject};
use bulkhead_learner::server::{self, KUBE_HEALTH_SERVICE, Running, ServerConfig};
use bulkhead_learner::store::EdgeQuery;
use bulkhead_model::labels::NAMESPACE_KEY;
use bulkhead_model::{Direction, Flow, Labels, Protocol, Verdict};
use bulkhead_proto::v1::{self, flow_ingest_client::FlowIngestClient, ingest_request, ingest_response};
use bulkhead_testkit::assert_eventually_async;
use bulkhead_testkit::kube::{KubeApiServer, RESTRICTED_USER, TcpProxy};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

/// Watches see changes within milliseconds; a restarted API server and the watchers'
/// backoff (up to 30 s between retries) take longer on a busy machine.
const CONVERGE: Duration = Duration::from_secs(30);
const RECOVER: Duration = Duration::from_secs(120);

const NODE: &str = "node-1";

/// Learner logs in the test's captured output (shown when it fails).
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_runtime=warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// What the resolver says about `addr` as a flow's peer (the ingest path).
fn peer(resolver: &RwLock<Resolver>, addr: &str) -> Subject {
    let flow = Flow {
        src_addr: ip("192.0.2.1"),
        src_port: 40000,
        dst_addr: ip(addr),
        dst_port: 80,
        protocol: Protocol::Tcp,
        direction: Direction::Egress,
        netns_ino: 1,
        cgroup_id: 0,
        pid: 1,
        comm: "curl".into(),
        connections: 1,
        bytes_sent: 0,
        bytes_received: 0,
        packets: 0,
        verdict: Verdict::Forwarded,
        first_seen_unix_ms: 0,
        last_seen_unix_ms: 0,
        http: Default::default(),
    };
    resolver.read().expect("resolver lock").peer_subject(NODE, &flow)
}

/// `(workload name, labels)` when `addr` resolves to a workload.
fn workload(resolver: &RwLock<Resolver>, addr: &str) -> Option<(String, Labels)> {
    match peer(resolver, addr) {
        Subject::Workload { name, labels } => Some((name, labels)),
        Subject::Reserved(_) => None,
    }
}

fn labels(r: &RwLock<Resolver>, addr: &str) -> Option<Labels> {
    workload(r, addr).map(|(_, l)| l)
}

/// A pod of a Deployment-made ReplicaSet, with the instance-unique labels a real one
/// carries.
fn replica(ns: &str, name: &str, app: &str) -> serde_json::Value {
    json!({
        "metadata": {
            "name": name, "namespace": ns,
            "labels": {"app": app, "pod-template-hash": "5d8f7c9b4d", "tier": "frontend",
                       // A pod trying to pass as kube-system's.
                       "io.kubernetes.pod.namespace": "kube-system"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-5d8f7c9b4d"),
                                 "uid": "6a1f0c8e-0000-4000-8000-000000000001", "controller": true}],
        },
        "spec": {"serviceAccountName": "web-sa",
                 "containers": [{"name": "main", "image": "registry.invalid/web:1"}]},
    })
}

async fn learner(server: &KubeApiServer, inventory: &str) -> (Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let inv = dir.path().join("inventory.yaml");
    std::fs::write(&inv, inventory).expect("inventory");
    let cfg = ServerConfig {
        db_url: format!("sqlite://{}", dir.path().join("learner.db").display()),
        grpc_listen: "127.0.0.1:0".parse().expect("addr"),
        http_listen: "127.0.0.1:0".parse().expect("addr"),
        inventory: Some(inv),
        enrollment: Enrollment::Open,
        max_batch_bytes: 4 << 20,
        flow_retention: Duration::from_secs(3600),
        policy: Default::default(),
        auth: Default::default(),
        tls: None,
    };
    let source = KubeConfigSource::Kubeconfig(server.kubeconfig_path().to_owned());
    let running = server::start_with_kube(cfg, Some(source)).await.expect("learner starts");
    (running, dir)
}

async fn kube_health(r: &Running) -> Option<i32> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", r.grpc_addr))
        .expect("url")
        .connect()
        .await
        .expect("health channel");
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let req = tonic_health::pb::HealthCheckRequest { service: KUBE_HEALTH_SERVICE.into() };
    client.check(req).await.ok().map(|resp| resp.into_inner().status)
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
const NOT_SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

const INVENTORY: &str = r#"
workloads:
  - name: legacy-db
    labels: {app: legacy-db}
    match: {ips: [10.244.9.9]}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_become_identities_that_follow_the_cluster() {
    init_logs();
    let server = KubeApiServer::start().await;
    let ns = server.create_namespace("ident", &[("team", "payments")]).await;
    let (r, _dir) = learner(&server, INVENTORY).await;
    let resolver = r.resolver.clone();

    // Two replicas of one Deployment share one identity, without the template hash.
    for (name, addr) in [("web-5d8f7c9b4d-aaaaa", "10.244.1.5"), ("web-5d8f7c9b4d-bbbbb", "10.244.2.6")] {
        server.create_pod(replica(&ns, name, "web")).await;
        server.set_pod_ips(&ns, name, &[addr, "fd00:10:244::5"]).await;
    }
    assert_eventually_async!(CONVERGE, async || labels(&resolver, "10.244.2.6").is_some(), "second replica");
    let (name, a) = workload(&resolver, "10.244.1.5").expect("first replica");
    assert_eq!(name, format!("{ns}/web"));
    assert_eq!(Some(&a), labels(&resolver, "10.244.2.6").as_ref(), "replicas share an identity");
    assert_eq!(a.get("app"), Some("web"));
    assert_eq!(a.get("pod-template-hash"), None);
    assert_eq!(a.get(NAMESPACE_KEY), Some(ns.as_str()), "the forged namespace label is overridden");
    assert_eq!(a.get(SERVICE_ACCOUNT_KEY), Some("web-sa"));
    assert_eq!(a.get("io.cilium.k8s.namespace.labels.team"), Some("payments"));

    // The health service says the source works.
    assert_eventually_async!(CONVERGE, async || kube_health(&r).await == Some(SERVING), "kube health SERVING");
    assert!(r.kube_status().expect("kube configured").healthy());

    // A relabel makes a new identity for that pod only.
    Api::<Pod>::namespaced(server.client(), &ns)
        .patch(
            "web-5d8f7c9b4d-aaaaa",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"tier": "canary"}}})),
        )
        .await
        .expect("relabel");
    assert_eventually_async!(
        CONVERGE,
        async || labels(&resolver, "10.244.1.5").and_then(|l| l.get("tier").map(str::to_owned)).as_deref()
            == Some("canary"),
        "relabel seen"
    );
    assert_eq!(
        labels(&resolver, "10.244.2.6").and_then(|l| l.get("tier").map(str::to_owned)).as_deref(),
        Some("frontend")
    );

    // Namespace labels are part of the identity.
    Api::<Namespace>::all(server.client())
        .patch(&ns, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"team": "risk"}}})))
        .await
        .expect("namespace relabel");
    assert_eventually_async!(
        CONVERGE,
        async || labels(&resolver, "10.244.2.6")
            .and_then(|l| l.get("io.cilium.k8s.namespace.labels.team").map(str::to_owned))
            .as_deref()
            == Some("risk"),
        "namespace relabel seen"
    );

    // A host-network pod never takes the node's address.
    server
        .create_pod(json!({"metadata": {"name": "node-agent", "namespace": ns, "labels": {"app": "agent"}},
                           "spec": {"hostNetwork": true, "containers": [{"name": "a", "image": "registry.invalid/a"}]}}))
        .await;
    server.set_pod_ips(&ns, "node-agent", &["192.168.50.1"]).await;

    // A pod on an address the inventory gives to another workload: the inventory wins
    // and the conflict is listed.
    server.create_pod(replica(&ns, "db-5d8f7c9b4d-ccccc", "db")).await;
    server.set_pod_ips(&ns, "db-5d8f7c9b4d-ccccc", &["10.244.9.9"]).await;
    assert_eventually_async!(
        CONVERGE,
        async || resolver.read().expect("lock").conflicts().any(|c| c.what == ConflictKind::Address),
        "conflict listed"
    );
    let conflict = resolver.read().expect("lock").conflicts().next().cloned().expect("conflict");
    assert_eq!(conflict.value, "10.244.9.9");
    assert_eq!(conflict.inventory_workload, "legacy-db");
    assert_eq!(conflict.kube_pod, format!("{ns}/db-5d8f7c9b4d-ccccc"));
    assert_eq!(workload(&resolver, "10.244.9.9").map(|(n, _)| n).as_deref(), Some("legacy-db"));
    assert!(
        resolver.read().expect("lock").kube().pods().any(|p| p.key.name == "node-agent"),
        "the host-network pod was seen"
    );
    assert!(workload(&resolver, "192.168.50.1").is_none(), "host-network pods own no address");

    // Services and NetworkPolicies are there for synthesis and import.
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": ns},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "protocol": "TCP"}]},
    }))
    .expect("service");
    Api::<Service>::namespaced(server.client(), &ns).create(&PostParams::default(), &svc).await.expect("service");
    let np: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": "web-ingress", "namespace": ns},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"ports": [{"port": 80, "protocol": "TCP"}]}]},
    }))
    .expect("network policy");
    Api::<NetworkPolicy>::namespaced(server.client(), &ns)
        .create(&PostParams::default(), &np)
        .await
        .expect("network policy");
    assert_eventually_async!(
        CONVERGE,
        async || {
            let Some(web) = labels(&resolver, "10.244.2.6") else { return false };
            let r = resolver.read().expect("lock");
            let backed = r.kube().services_backed_by(&web).iter().any(|s| s.key.name == "web");
            let imported = r.kube().network_policies().any(|p| p.metadata.name.as_deref() == Some("web-ingress"));
            backed && imported
        },
        "service backends and network policies"
    );

    // Flows through the real ingest path get the pods' identities on both ends: the
    // local side by the pod UID in its cgroup path, the peer by pod IP.
    let uid = Api::<Pod>::namespaced(server.client(), &ns)
        .get("web-5d8f7c9b4d-aaaaa")
        .await
        .expect("pod")
        .metadata
        .uid
        .expect("uid");
    ingest_one_flow(&r, &uid).await;
    let edges = r.store.edges(&EdgeQuery::default()).await.expect("edges");
    assert_eq!(edges.len(), 1, "{edges:?}");
    assert_eq!(edges[0].src_labels.get("tier"), Some("canary"), "local side by cgroup pod UID");
    assert_eq!(edges[0].dst_labels.get("tier"), Some("frontend"), "peer by pod IP");

    // The cluster's NetworkPolicies are imported into the store, and a proposal for
    // the web pods shows the one that selects them next to it.
    assert_eventually_async!(
        CONVERGE,
        async || r.store.cluster_policies().await.is_ok_and(|c| c.iter().any(|p| p.name == "web-ingress")),
        "cluster policy imported into the store"
    );
    let base = format!("http://{}/api/v1", r.http_addr);
    let (token, _) = r
        .store
        .create_token_user("analyst", bulkhead_learner::auth::Role::Analyst, "test", "test", 1)
        .await
        .expect("token user");
    let http = reqwest::Client::builder()
        .default_headers(
            [(reqwest::header::AUTHORIZATION, format!("Bearer {}", token.expose()).parse().expect("header value"))]
                .into_iter()
                .collect(),
        )
        .build()
        .expect("client");
    // The flow above is from 1970: a window reaching back that far covers it.
    let list: serde_json::Value = http
        .post(format!("{base}/proposals/synthesize"))
        .json(&json!({"window_ms": bulkhead_learner::grpc::ingest::unix_ms()}))
        .send()
        .await
        .expect("synthesize")
        .json()
        .await
        .expect("json");
    let web_id = edges[0].edge.key.dst.0;
    let id =
        list.as_array().and_then(|l| l.iter().find(|p| p["target"] == web_id)).expect("web proposal")["id"].clone();
    let view: serde_json::Value =
        http.get(format!("{base}/proposals/{id}")).send().await.expect("show").json().await.expect("json");
    assert_eq!(view["cluster_policies"][0]["name"], "web-ingress", "{view}");
    let lints: Vec<&str> =
        view["proposal"]["lints"].as_array().expect("lints").iter().filter_map(|l| l["code"].as_str()).collect();
    assert!(lints.contains(&"host-probes-missing"), "a pod's proposal lints kubelet probes: {lints:?}");

    // Deleted pods vanish.
    Api::<Pod>::namespaced(server.client(), &ns)
        .delete("web-5d8f7c9b4d-bbbbb", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete");
    assert_eventually_async!(CONVERGE, async || workload(&resolver, "10.244.2.6").is_none(), "deleted pod gone");
    assert!(workload(&resolver, "10.244.1.5").is_some(), "the other replica stays");
    r.abort();
}

/// Sends one batch: pod `uid`'s namespace (known by its cgroup) connects to 10.244.2.6.
async fn ingest_one_flow(r: &Running, uid: &str) {
    let mut client = FlowIngestClient::connect(format!("http://{}", r.grpc_addr)).await.expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let hello = v1::Hello { node_id: NODE.into(), boot_id: "boot-a".into(), agent_version: "test".into() };
    tx.send(v1::IngestRequest { msg: Some(ingest_request::Msg::Hello(hello)) }).await.expect("hello");
    let mut responses = client.ingest(ReceiverStream::new(rx)).await.expect("stream").into_inner();
    let cgroup = format!(
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-abc.scope",
        uid.replace('-', "_")
    );
    let batch = v1::FlowBatch {
        node_id: NODE.into(),
        boot_id: "boot-a".into(),
        seq: 1,
        created_unix_ms: 5_000,
        flows: vec![v1::Flow {
            src_addr: vec![10, 244, 1, 5],
            dst_addr: vec![10, 244, 2, 6],
            dst_port: 80,
            protocol: v1::Protocol::Tcp as i32,
            direction: v1::Direction::Egress as i32,
            netns_ino: 4026532000,
            cgroup_id: 77,
            comm: "curl".into(),
            connections: 1,
            verdict: v1::Verdict::Forwarded as i32,
            first_seen_unix_ms: 1_000,
            last_seen_unix_ms: 2_000,
            ..Default::default()
        }],
        endpoints: vec![v1::EndpointFact {
            netns_ino: 4026532000,
            netns_name: String::new(),
            addresses: vec![],
            cgroups: vec![v1::CgroupFact { cgroup_id: 77, path: cgroup, comms: vec!["curl".into()] }],
            host: false,
        }],
        endpoints_snapshot: true,
        ..Default::default()
    };
    tx.send(v1::IngestRequest { msg: Some(ingest_request::Msg::Batch(batch)) }).await.expect("batch");
    loop {
        match responses.next().await {
            Some(Ok(v1::IngestResponse { msg: Some(ingest_response::Msg::Ack(ack)) })) => {
                assert_eq!(ack.status, v1::AckStatus::Stored as i32, "{ack:?}");
                return;
            }
            Some(Ok(_)) => {}
            other => panic!("expected an ack, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rbac_denial_is_reported_and_recovers_once_granted() {
    init_logs();
    let server = KubeApiServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = ServerConfig {
        db_url: format!("sqlite://{}", dir.path().join("learner.db").display()),
        grpc_listen: "127.0.0.1:0".parse().expect("addr"),
        http_listen: "127.0.0.1:0".parse().expect("addr"),
        inventory: None,
        enrollment: Enrollment::Open,
        max_batch_bytes: 4 << 20,
        flow_retention: Duration::from_secs(3600),
        policy: Default::default(),
        auth: Default::default(),
        tls: None,
    };
    let source = KubeConfigSource::Kubeconfig(server.restricted_kubeconfig_path().to_owned());
    // Starting works: a forbidden cluster is a status, not a crash.
    let r = server::start_with_kube(cfg, Some(source)).await.expect("learner starts despite RBAC");
    assert_eventually_async!(
        CONVERGE,
        async || r.kube_status().is_some_and(|s| s.pods.error.is_some() && s.network_policies.error.is_some()),
        "forbidden reported: {:?}",
        r.kube_status()
    );
    let status = r.kube_status().expect("status");
    let pods = status.pods.error.as_deref().expect("pods error");
    assert!(pods.contains("forbidden"), "{pods}");
    assert!(pods.contains("grant the verbs get, list and watch on resource pods in the core API group"), "{pods}");
    assert!(pods.contains(RESTRICTED_USER), "the API server's own words name the user: {pods}");
    let np = status.network_policies.error.as_deref().expect("netpol error");
    assert!(np.contains("networkpolicies in API group networking.k8s.io"), "{np}");
    assert!(!status.healthy());
    assert_eq!(kube_health(&r).await, Some(NOT_SERVING));
    assert!(r.kube_status().expect("status").pods.errors >= 1);

    // Grant what the module docs ask for; the retrying watchers pick it up.
    let role: ClusterRole = serde_json::from_value(json!({
        "metadata": {"name": "bulkhead-learner"},
        "rules": [
            {"apiGroups": [""], "resources": ["pods", "namespaces", "services"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["get", "list", "watch"]},
        ],
    }))
    .expect("role");
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "bulkhead-learner"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "bulkhead-learner"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": RESTRICTED_USER}],
    }))
    .expect("binding");
    Api::<ClusterRole>::all(server.client()).create(&PostParams::default(), &role).await.expect("role");
    Api::<ClusterRoleBinding>::all(server.client()).create(&PostParams::default(), &binding).await.expect("binding");
    let ns = server.create_namespace("rbac", &[]).await;
    server.create_pod(replica(&ns, "web-5d8f7c9b4d-aaaaa", "web")).await;
    server.set_pod_ips(&ns, "web-5d8f7c9b4d-aaaaa", &["10.244.3.3"]).await;
    assert_eventually_async!(
        RECOVER,
        async || r.kube_status().is_some_and(|s| s.healthy()),
        "recovered: {:?}",
        r.kube_status()
    );
    assert_eventually_async!(CONVERGE, async || labels(&r.resolver, "10.244.3.3").is_some(), "pod resolved");
    assert_eventually_async!(CONVERGE, async || kube_health(&r).await == Some(SERVING), "kube health SERVING");
    r.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_during_an_outage_arrive_through_a_relist() {
    init_logs();
    let mut server = KubeApiServer::start().await;
    let proxy = TcpProxy::start(server.addr()).await;
    let kubeconfig = server.kubeconfig_via("proxied", &proxy.https_url());
    let client =
        bulkhead_learner::identity::kube::connect(&KubeConfigSource::Kubeconfig(kubeconfig)).await.expect("client");
    let resolver = Arc::new(RwLock::new(Resolver::default()));
    let watchers = KubeWatchers::spawn(client, resolver.clone());

    let ns = server.create_namespace("relist", &[]).await;
    for (name, addr) in [("a", "10.244.4.1"), ("c", "10.244.4.3")] {
        server.create_pod(json!({"metadata": {"name": name, "namespace": ns, "labels": {"app": name}}})).await;
        server.set_pod_ips(&ns, name, &[addr]).await;
    }
    assert_eventually_async!(CONVERGE, async || labels(&resolver, "10.244.4.3").is_some(), "pods resolved");
    assert!(labels(&resolver, "10.244.4.1").is_some());
    assert_eq!(watchers.status().pods.lists, 1);

    // The learner loses its connection; meanwhile a is deleted, b created, c relabelled,
    // and the API server restarts (its watch cache starts afresh).
    proxy.cut().await;
    let pods = Api::<Pod>::namespaced(server.client(), &ns);
    pods.delete("a", &DeleteParams::default().grace_period(0)).await.expect("delete a");
    server.create_pod(json!({"metadata": {"name": "b", "namespace": ns, "labels": {"app": "b"}}})).await;
    server.set_pod_ips(&ns, "b", &["10.244.4.2"]).await;
    pods.patch("c", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"app": "c2"}}})))
        .await
        .expect("relabel c");
    server.restart_apiserver().await;
    assert!(labels(&resolver, "10.244.4.1").is_some(), "nothing seen while cut off");
    assert!(labels(&resolver, "10.244.4.2").is_none(), "nothing seen while cut off");
    proxy.restore();

    assert_eventually_async!(
        RECOVER,
        async || {
            labels(&resolver, "10.244.4.1").is_none()
                && labels(&resolver, "10.244.4.2").is_some_and(|l| l.get("app") == Some("b"))
                && labels(&resolver, "10.244.4.3").is_some_and(|l| l.get("app") == Some("c2"))
        },
        "state after the outage; status {:?}",
        watchers.status()
    );
    let status = watchers.status();
    assert!(status.pods.lists >= 2, "the pods were listed again after 410 Gone: {status:?}");
    assert!(status.pods.errors >= 1, "the outage was reported: {status:?}");
    assert_eventually_async!(CONVERGE, async || watchers.status().healthy(), "healthy again: {:?}", watchers.status());
}
