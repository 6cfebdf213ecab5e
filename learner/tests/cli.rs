//! The `bulkhead` CLI against a served `/api/v1` (real binary, real HTTP): the policy
//! commands an operator runs — synthesize, list, show, diff, approve, simulate,
//! export, audit.

use std::net::IpAddr;
use std::process::Output;

use bulkhead_learner::auth::Role;
use bulkhead_learner::grpc::ingest::unix_ms;
use bulkhead_learner::store::{IngestBatch, ResolvedFlow, Store};
use bulkhead_learner::web::{AppState, router};
use bulkhead_model::labels::NAMESPACE_KEY;
use bulkhead_model::{Direction, Flow, Identity, Labels, Protocol, Verdict};

fn flow(src: &str, dst: &str, at: i64) -> Flow {
    Flow {
        src_addr: src.parse::<IpAddr>().expect("ip"),
        src_port: 0,
        dst_addr: dst.parse::<IpAddr>().expect("ip"),
        dst_port: 80,
        protocol: Protocol::Tcp,
        direction: Direction::Egress,
        netns_ino: 1,
        cgroup_id: 0,
        pid: 1,
        comm: "curl".into(),
        connections: 1,
        bytes_sent: 1,
        bytes_received: 1,
        packets: 2,
        verdict: Verdict::Forwarded,
        first_seen_unix_ms: at,
        last_seen_unix_ms: at,
        http: Default::default(),
    }
}

async fn record(store: &Store, seq: u64, src: Identity, dst: Identity, f: Flow) {
    let batch = IngestBatch {
        node_id: "node-1".into(),
        boot_id: "boot".into(),
        seq,
        received_unix_ms: f.last_seen_unix_ms,
        flows: vec![ResolvedFlow { flow: f, src_identity: src, dst_identity: dst }],
        endpoints: None,
        dns_answers: vec![],
        loss: Default::default(),
    };
    store.ingest(&batch).await.expect("ingest");
}

/// A served API and the API tokens of its users.
struct Server {
    url: String,
    /// Approvers.
    alice: String,
    bob: String,
}

/// Runs the CLI as alice (through `BULKHEAD_TOKEN`).
async fn bulkhead(server: &Server, args: &[&str]) -> Output {
    bulkhead_with(server, &[("BULKHEAD_TOKEN", server.alice.as_str())], args).await
}

async fn bulkhead_with(server: &Server, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_bulkhead"));
    cmd.arg("--server").arg(&server.url).args(args);
    // No token from the environment or a home directory of whoever runs the tests.
    cmd.env_remove("BULKHEAD_TOKEN").env_remove("BULKHEAD_TOKEN_FILE").env("HOME", "/nonexistent");
    cmd.envs(env.iter().copied());
    cmd.output().await.expect("run bulkhead")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test]
async fn policy_commands_end_to_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&format!("sqlite://{}", dir.path().join("cli.db").display())).await.expect("store");
    let l = |class: &str, org: &str| {
        Labels::new([(NAMESPACE_KEY, "default"), ("org", org), ("class", class)]).expect("labels")
    };
    let deathstar = store.ensure_identity(&l("deathstar", "empire")).await.expect("id");
    let tiefighter = store.ensure_identity(&l("tiefighter", "empire")).await.expect("id");
    let xwing = store.ensure_identity(&l("xwing", "alliance")).await.expect("id");
    store.register_agent("node-1", 1).await.expect("agent");
    let now = unix_ms();
    record(&store, 1, tiefighter, deathstar, flow("10.202.0.11", "10.202.0.10", now - 3_600_000)).await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let token = |name: &'static str| {
        let store = store.clone();
        async move {
            let (t, _) = store.create_token_user(name, Role::Approver, "cli", "test", 1).await.expect("token user");
            t.expose().to_owned()
        }
    };
    let server = Server { url, alice: token("alice").await, bob: token("bob").await };
    let app = router(AppState::for_store(store.clone()));
    let serving = tokio::spawn(async move { axum::serve(listener, app).await });

    // Without a token the CLI says how to get one; with a bad one the learner refuses.
    let out = bulkhead_with(&server, &[], &["proposals", "list"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401") && err.contains("bulkhead-learner user token"), "{err}");
    let out = bulkhead_with(&server, &[("BULKHEAD_TOKEN", "bht_not-a-real-token")], &["proposals", "list"]).await;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("401"), "{out:?}");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{}\n", server.alice)).expect("token file");
    let out =
        bulkhead_with(&server, &[], &["--token-file", token_file.to_str().expect("path"), "proposals", "list"]).await;
    assert!(out.status.success(), "{out:?}");

    let out = bulkhead(&server, &["proposals", "synthesize"]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("proposals awaiting review"), "{}", stdout(&out));

    let out = bulkhead(&server, &["--json", "proposals", "list", "--target", &deathstar.0.to_string()]).await;
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json list");
    let id = list[0]["id"].as_i64().expect("a deathstar proposal");

    let out = bulkhead(&server, &["proposals", "show", &id.to_string()]).await;
    let text = stdout(&out);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("class=tiefighter") && text.contains("80/tcp"), "{text}");

    let out = bulkhead(&server, &["proposals", "diff", &id.to_string()]).await;
    assert!(stdout(&out).contains("+ ingress from workloads"), "{}", stdout(&out));

    // xwing attacks later; the replay lists it.
    record(&store, 2, xwing, deathstar, flow("10.202.0.12", "10.202.0.10", now - 60_000)).await;
    let out = bulkhead(&server, &["simulate", "--proposal", &id.to_string(), "--since-hours", "0.5"]).await;
    let text = stdout(&out);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("1 would be denied") && text.contains("10.202.0.12"), "{text}");

    let out = bulkhead(&server, &["proposals", "approve", &id.to_string(), "--comment", "ok"]).await;
    assert!(out.status.success(), "{out:?}");
    let bob = [("BULKHEAD_TOKEN", server.bob.as_str())];
    let out = bulkhead_with(&server, &bob, &["proposals", "approve", &id.to_string()]).await;
    assert!(!out.status.success(), "a second decision must fail");
    assert!(String::from_utf8_lossy(&out.stderr).contains("409"), "{out:?}");

    let file = dir.path().join("policies.yaml");
    let out = bulkhead(&server, &["export", "--namespace", "default", "-o", file.to_str().expect("path")]).await;
    assert!(out.status.success(), "{out:?}");
    let yaml = std::fs::read_to_string(&file).expect("exported file");
    assert!(yaml.contains("kind: NetworkPolicy") && yaml.contains("port: 80"), "{yaml}");
    let out = bulkhead(&server, &["export", "--format", "cilium"]).await;
    assert!(stdout(&out).contains("kind: CiliumNetworkPolicy"), "{out:?}");

    // Rollout: approved deathstar goes to monitor; xwing (no policy) may not.
    let out = bulkhead(&server, &["rollout", "set", "--target", &deathstar.0.to_string(), "--mode", "monitor"]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("learn -> monitor"), "{}", stdout(&out));
    let out = bulkhead(&server, &["rollout", "list"]).await;
    assert!(stdout(&out).contains("monitor"), "{}", stdout(&out));
    let out = bulkhead(&server, &["rollout", "set", "--namespace", "default", "--mode", "enforce"]).await;
    assert!(!out.status.success(), "tiefighter has no approved policy: the namespace change is refused as a whole");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no approved policy"), "{out:?}");

    // What enforcers report shows up per node and per workload, and in the gate.
    store.enforcer_hello("node-1", "boot-1", "test", Some(41), now).await.expect("hello");
    store.set_desired_version("node-1", 42, now).await.expect("desired");
    let ev = bulkhead_learner::store::VerdictEventRow {
        at_unix_ms: now,
        local: deathstar,
        peer: xwing,
        direction: Direction::Ingress,
        verdict: Verdict::Audit,
        src_addr: "10.202.0.12".parse().expect("ip"),
        dst_addr: "10.202.0.10".parse().expect("ip"),
        dst_port: 80,
        protocol: Protocol::Tcp,
        policy_version: 41,
        rule: None,
        http: None,
    };
    store.insert_verdict_events("node-1", &[ev], now).await.expect("events");
    let text = stdout(&bulkhead(&server, &["enforcers"]).await);
    assert!(text.contains("node-1") && text.contains("42") && text.contains("41") && text.contains("no"), "{text}");
    let text =
        stdout(&bulkhead(&server, &["verdicts", "--identity", &deathstar.0.to_string(), "--verdict", "audit"]).await);
    assert!(
        text.contains("audit") && text.contains("10.202.0.12 -> 10.202.0.10:80/tcp") && text.contains("default deny"),
        "{text}"
    );
    // Rule use per approved rule: the one ingress rule was hit on node-1 and node-2.
    let rule = bulkhead_learner::store::RuleRef { proposal_id: id, direction: Direction::Ingress, rule_index: 0 };
    for (node, hits) in [("node-1", 5), ("node-2", 2)] {
        let h = bulkhead_learner::store::RuleHits { rule, hits, last_hit_unix_ms: now - 60_000 };
        store.add_rule_hits(node, &[h]).await.expect("hits");
    }
    let text = stdout(&bulkhead(&server, &["proposals", "show", &id.to_string()]).await);
    let enforced = text.split("Enforced rules").nth(1).unwrap_or_else(|| panic!("enforced rules section: {text}"));
    let line =
        enforced.lines().find(|l| l.starts_with("ingress-0")).unwrap_or_else(|| panic!("enforced rule row: {text}"));
    assert!(line.contains(" 7 ") && line.contains("node-1,node-2") && line.contains("ago"), "{line}");
    let out = bulkhead(&server, &["--json", "rollout", "list"]).await;
    let states: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let ds = states.as_array().and_then(|a| a.iter().find(|r| r["target"] == deathstar.0)).expect("deathstar");
    assert_eq!(ds["audit_events"], 1, "{states}");
    let out = bulkhead(&server, &["verdicts", "--verdict", "maybe"]).await;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("400"), "{out:?}");

    let out = bulkhead(&server, &["audit", "--action", "proposal."]).await;
    let text = stdout(&out);
    assert!(text.contains("proposal.approve") && text.contains("alice"), "{text}");
    serving.abort();
}
