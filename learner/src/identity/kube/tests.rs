//! The pure Kubernetes view, fed with constructed watch events. Builders here are also
//! used by the resolver's tests.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::watcher::Event;
use serde_json::{Value, json};

use super::*;
use crate::identity::Subject;

// === builders ===

/// A pod as the API server would send it. `ip` `None`: not scheduled yet.
#[derive(Debug, Clone)]
pub(crate) struct PodSpec<'a> {
    pub ns: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub labels: Vec<(&'a str, &'a str)>,
    pub ips: Vec<&'a str>,
    pub owner: Option<(&'a str, &'a str)>,
    pub host_network: bool,
    pub phase: &'a str,
    pub created: &'a str,
    pub terminating: bool,
    pub service_account: Option<&'a str>,
}

impl<'a> PodSpec<'a> {
    pub fn new(ns: &'a str, name: &'a str, uid: &'a str) -> Self {
        PodSpec {
            ns,
            name,
            uid,
            labels: vec![],
            ips: vec![],
            owner: None,
            host_network: false,
            phase: "Running",
            created: "2026-01-01T00:00:00Z",
            terminating: false,
            service_account: None,
        }
    }
    pub fn labels(mut self, labels: &[(&'a str, &'a str)]) -> Self {
        self.labels = labels.to_vec();
        self
    }
    pub fn ip(mut self, ip: &'a str) -> Self {
        self.ips.push(ip);
        self
    }
    pub fn owner(mut self, kind: &'a str, name: &'a str) -> Self {
        self.owner = Some((kind, name));
        self
    }
    pub fn host_network(mut self) -> Self {
        self.host_network = true;
        self
    }
    pub fn phase(mut self, phase: &'a str) -> Self {
        self.phase = phase;
        self
    }
    pub fn created(mut self, created: &'a str) -> Self {
        self.created = created;
        self
    }
    pub fn terminating(mut self) -> Self {
        self.terminating = true;
        self
    }
    pub fn service_account(mut self, sa: &'a str) -> Self {
        self.service_account = Some(sa);
        self
    }

    pub fn build(&self) -> Pod {
        let labels: serde_json::Map<String, Value> =
            self.labels.iter().map(|(k, v)| ((*k).to_owned(), Value::from(*v))).collect();
        let mut meta = json!({
            "name": self.name, "namespace": self.ns, "uid": self.uid, "labels": labels,
            "creationTimestamp": self.created, "resourceVersion": "1",
        });
        if let Some((kind, name)) = self.owner {
            meta["ownerReferences"] =
                json!([{"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "o", "controller": true}]);
        }
        if self.terminating {
            meta["deletionTimestamp"] = json!("2026-01-02T00:00:00Z");
        }
        let mut spec = json!({"containers": [{"name": "c", "image": "i"}], "hostNetwork": self.host_network});
        if let Some(sa) = self.service_account {
            spec["serviceAccountName"] = json!(sa);
        }
        let ips: Vec<Value> = self.ips.iter().map(|ip| json!({"ip": ip})).collect();
        let mut status = json!({"phase": self.phase});
        if let Some(first) = self.ips.first() {
            status["podIP"] = json!(first);
            status["podIPs"] = Value::Array(ips);
        }
        serde_json::from_value(json!({"metadata": meta, "spec": spec, "status": status})).expect("valid pod")
    }
}

pub(crate) fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
    let mut labels: serde_json::Map<String, Value> =
        labels.iter().map(|(k, v)| ((*k).to_owned(), Value::from(*v))).collect();
    labels.insert(NAMESPACE_NAME_LABEL.to_owned(), Value::from(name));
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).expect("valid namespace")
}

fn service(ns: &str, name: &str, selector: Value, cluster_ip: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": selector, "clusterIP": cluster_ip, "ports": [{"port": 80, "protocol": "TCP"}]},
    }))
    .expect("valid service")
}

fn netpol(ns: &str, name: &str) -> NetworkPolicy {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns,
                     "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]},
    }))
    .expect("valid network policy")
}

/// A synced snapshot holding these namespaces and pods (initial lists done).
pub(crate) fn synced(namespaces: Vec<Namespace>, pods: Vec<Pod>) -> KubeSnapshot {
    let mut s = KubeSnapshot::new();
    s.apply_namespace(Event::Init);
    for ns in namespaces {
        s.apply_namespace(Event::InitApply(ns));
    }
    s.apply_namespace(Event::InitDone);
    s.apply_pod(Event::Init);
    for p in pods {
        s.apply_pod(Event::InitApply(p));
    }
    s.apply_pod(Event::InitDone);
    s
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// `(workload name, labels)` of the pod owning `addr`.
fn at(s: &KubeSnapshot, addr: &str) -> Option<(String, Vec<(String, String)>)> {
    s.subject_by_ip(ip(addr)).map(|(_, subject)| match subject {
        Subject::Workload { name, labels } => {
            (name.clone(), labels.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect())
        }
        Subject::Reserved(r) => panic!("a pod resolved to reserved {r:?}"),
    })
}

fn name_at(s: &KubeSnapshot, addr: &str) -> Option<String> {
    at(s, addr).map(|(n, _)| n)
}

fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    v.sort();
    v
}

const UID_A: &str = "3e6b4ee8-1c6e-4d4f-9f0a-0b5c3d1c2a11";
const UID_B: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
const UID_C: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";

// === identity labels ===

#[test]
fn replicas_share_one_identity_without_instance_unique_labels() {
    let web = |name, uid, hash_ip: (&'static str, &'static str)| {
        PodSpec::new("shop", name, uid)
            .labels(&[
                ("app", "web"),
                ("pod-template-hash", hash_ip.0),
                ("controller-revision-hash", "rev-1"),
                ("statefulset.kubernetes.io/pod-name", name),
                ("apps.kubernetes.io/pod-index", "0"),
                ("batch.kubernetes.io/controller-uid", uid),
                ("controller-uid", uid),
                ("batch.kubernetes.io/job-name", name),
                ("job-name", name),
                ("pod-template-generation", "3"),
            ])
            .owner("ReplicaSet", "web-5d8f7c9b4d")
            .service_account("web-sa")
            .ip(hash_ip.1)
            .build()
    };
    let s = synced(
        vec![namespace("shop", &[("team", "payments")])],
        vec![
            web("web-5d8f7c9b4d-abcde", UID_A, ("5d8f7c9b4d", "10.244.1.5")),
            web("web-5d8f7c9b4d-fghij", UID_B, ("5d8f7c9b4d", "10.244.2.7")),
        ],
    );
    let a = at(&s, "10.244.1.5").expect("first replica");
    let b = at(&s, "10.244.2.7").expect("second replica");
    assert_eq!(a, b, "replicas must share an identity");
    assert_eq!(a.0, "shop/web", "the Deployment's name, without the template hash");
    assert_eq!(
        a.1,
        kv(&[
            ("app", "web"),
            ("io.cilium.k8s.namespace.labels.team", "payments"),
            ("io.cilium.k8s.policy.serviceaccount", "web-sa"),
            ("io.kubernetes.pod.namespace", "shop"),
        ])
    );
    for unique in INSTANCE_UNIQUE_LABELS {
        assert!(a.1.iter().all(|(k, _)| k != unique), "{unique} must be dropped");
    }
}

#[test]
fn workload_names_follow_the_controller() {
    let owners = |kind: &str, name: &str| {
        serde_json::from_value::<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>(json!([
            {"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "u", "controller": true}
        ]))
        .expect("owner")
    };
    let hash: std::collections::BTreeMap<String, String> =
        [("pod-template-hash".to_owned(), "abc12".to_owned())].into_iter().collect();
    let none = Default::default();
    let cases = [
        (workload_name("ns", "web-abc12-x", &hash, &owners("ReplicaSet", "web-abc12")), "ns/web"),
        // A ReplicaSet not made by a Deployment keeps its name.
        (workload_name("ns", "rs-x", &none, &owners("ReplicaSet", "rs")), "ns/rs"),
        (workload_name("ns", "db-0", &none, &owners("StatefulSet", "db")), "ns/db"),
        (workload_name("ns", "agent-x", &none, &owners("DaemonSet", "agent")), "ns/agent"),
        (workload_name("ns", "backup-123-x", &none, &owners("Job", "backup-123")), "ns/backup-123"),
        (workload_name("ns", "etcd-node1", &none, &owners("Node", "node1")), "ns/etcd-node1"),
        (workload_name("ns", "bare", &none, &[]), "ns/bare"),
    ];
    for (got, want) in cases {
        assert_eq!(got, want);
    }
}

#[test]
fn default_service_account_when_none_is_named() {
    let s = synced(vec![namespace("ns", &[])], vec![PodSpec::new("ns", "p", UID_A).ip("10.0.0.1").build()]);
    let (_, labels) = at(&s, "10.0.0.1").expect("pod");
    assert!(labels.contains(&(SERVICE_ACCOUNT_KEY.to_owned(), "default".to_owned())), "{labels:?}");
}

#[test]
fn hostile_label_values_are_kept_verbatim_and_reserved_keys_cannot_be_forged() {
    let hostile = "x'); DROP TABLE identities;-- <script>ü\u{202e}";
    let pod = PodSpec::new("evil", "p", UID_A)
        .labels(&[
            ("app", hostile),
            // Attempts to look like another namespace's pods.
            ("io.kubernetes.pod.namespace", "kube-system"),
            ("io.cilium.k8s.namespace.labels.team", "payments"),
            ("io.cilium.k8s.policy.serviceaccount", "admin"),
            ("io.cilium.k8s.policy.cluster", "other"),
        ])
        .ip("10.0.0.66")
        .build();
    let s = synced(vec![namespace("evil", &[])], vec![pod]);
    let (_, labels) = at(&s, "10.0.0.66").expect("pod");
    assert_eq!(
        labels,
        kv(&[
            ("app", hostile),
            ("io.cilium.k8s.policy.serviceaccount", "default"),
            ("io.kubernetes.pod.namespace", "evil"),
        ])
    );
}

#[test]
fn a_label_set_that_cannot_be_stored_gives_no_identity() {
    let long = "v".repeat(bulkhead_model::labels::MAX_VALUE_LEN + 1);
    let pod = PodSpec::new("ns", "p", UID_A).labels(&[("app", &long)]).ip("10.0.0.1").build();
    let s = synced(vec![namespace("ns", &[])], vec![pod]);
    assert!(s.subject_by_ip(ip("10.0.0.1")).is_none());
    assert!(s.pod_by_ip(ip("10.0.0.1")).is_some(), "the pod still owns its address");
}

// === readiness and namespaces ===

#[test]
fn nothing_resolves_before_pods_and_namespaces_are_listed() {
    let mut s = KubeSnapshot::new();
    s.apply_pod(Event::Init);
    s.apply_pod(Event::InitApply(PodSpec::new("ns", "p", UID_A).ip("10.0.0.1").build()));
    s.apply_pod(Event::InitDone);
    assert!(!s.is_ready());
    assert!(s.subject_by_ip(ip("10.0.0.1")).is_none());
    s.apply_namespace(Event::Init);
    s.apply_namespace(Event::InitApply(namespace("ns", &[])));
    assert!(s.subject_by_ip(ip("10.0.0.1")).is_none(), "namespace list not complete yet");
    s.apply_namespace(Event::InitDone);
    assert!(s.is_ready());
    assert_eq!(name_at(&s, "10.0.0.1").as_deref(), Some("ns/p"));
}

#[test]
fn a_pod_of_an_unknown_namespace_waits_for_it_and_follows_its_labels() {
    let mut s = synced(vec![], vec![]);
    s.apply_pod(Event::Apply(PodSpec::new("new", "p", UID_A).labels(&[("app", "a")]).ip("10.0.0.1").build()));
    assert!(s.subject_by_ip(ip("10.0.0.1")).is_none(), "no identity without the namespace's labels");
    s.apply_namespace(Event::Apply(namespace("new", &[("env", "prod")])));
    let (_, labels) = at(&s, "10.0.0.1").expect("identity once the namespace is known");
    assert!(labels.contains(&("io.cilium.k8s.namespace.labels.env".to_owned(), "prod".to_owned())));
    s.apply_namespace(Event::Apply(namespace("new", &[("env", "dev")])));
    let (_, labels) = at(&s, "10.0.0.1").expect("identity");
    assert!(labels.contains(&("io.cilium.k8s.namespace.labels.env".to_owned(), "dev".to_owned())));
    assert!(!labels.iter().any(|(k, _)| k.ends_with(NAMESPACE_NAME_LABEL)), "{labels:?}");
    s.apply_namespace(Event::Delete(namespace("new", &[])));
    assert!(s.subject_by_ip(ip("10.0.0.1")).is_none());
}

// === addresses ===

#[test]
fn relabel_changes_the_identity_and_delete_removes_address_and_uid() {
    let mut s = synced(vec![namespace("ns", &[])], vec![]);
    let p = PodSpec::new("ns", "p", UID_A).ip("10.0.0.1").ip("fd00::1");
    s.apply_pod(Event::Apply(p.clone().labels(&[("v", "1")]).build()));
    assert!(at(&s, "10.0.0.1").expect("v4").1.contains(&("v".to_owned(), "1".to_owned())));
    assert_eq!(at(&s, "10.0.0.1"), at(&s, "fd00::1"), "dual-stack addresses resolve alike");
    s.apply_pod(Event::Apply(p.clone().labels(&[("v", "2")]).build()));
    assert!(at(&s, "10.0.0.1").expect("v4").1.contains(&("v".to_owned(), "2".to_owned())));
    assert!(s.subject_by_uid(UID_A).is_some());
    s.apply_pod(Event::Delete(p.build()));
    assert!(s.subject_by_ip(ip("10.0.0.1")).is_none());
    assert!(s.subject_by_ip(ip("fd00::1")).is_none());
    assert!(s.subject_by_uid(UID_A).is_none());
    assert_eq!(s.pods().count(), 0);
}

#[test]
fn an_address_change_releases_the_old_address() {
    let mut s = synced(vec![namespace("ns", &[])], vec![]);
    s.apply_pod(Event::Apply(PodSpec::new("ns", "p", UID_A).ip("10.0.0.1").build()));
    s.apply_pod(Event::Apply(PodSpec::new("ns", "p", UID_A).ip("10.0.0.2").build()));
    assert!(s.subject_by_ip(ip("10.0.0.1")).is_none());
    assert_eq!(name_at(&s, "10.0.0.2").as_deref(), Some("ns/p"));
}

#[test]
fn a_reused_address_moves_to_the_new_pod_whatever_the_order() {
    let old = PodSpec::new("ns", "old", UID_A).ip("10.0.0.9").created("2026-01-01T00:00:00Z").terminating().build();
    let new = PodSpec::new("ns", "new", UID_B).ip("10.0.0.9").created("2026-01-01T00:05:00Z").build();
    let older_running = PodSpec::new("ns", "old", UID_A).ip("10.0.0.9").created("2026-01-01T00:00:00Z").build();
    for pods in [vec![old.clone(), new.clone()], vec![new.clone(), old.clone()]] {
        // Through a list…
        let s = synced(vec![namespace("ns", &[])], pods.clone());
        assert_eq!(name_at(&s, "10.0.0.9").as_deref(), Some("ns/new"));
        // …and through single events.
        let mut s = synced(vec![namespace("ns", &[])], vec![]);
        for p in pods {
            s.apply_pod(Event::Apply(p));
        }
        assert_eq!(name_at(&s, "10.0.0.9").as_deref(), Some("ns/new"));
        // The old pod's deletion leaves the address with the new one.
        s.apply_pod(Event::Delete(old.clone()));
        assert_eq!(name_at(&s, "10.0.0.9").as_deref(), Some("ns/new"));
    }
    // Both running (the old one's deletion not seen yet): the newer wins.
    let s = synced(vec![namespace("ns", &[])], vec![new.clone(), older_running]);
    assert_eq!(name_at(&s, "10.0.0.9").as_deref(), Some("ns/new"));
    // The new pod's deletion hands the address back to the remaining claim.
    let mut s = synced(vec![namespace("ns", &[])], vec![old, new.clone()]);
    s.apply_pod(Event::Delete(new));
    assert_eq!(name_at(&s, "10.0.0.9").as_deref(), Some("ns/old"));
}

#[test]
fn finished_pods_release_their_address() {
    let done = PodSpec::new("ns", "job", UID_A).ip("10.0.0.3").phase("Succeeded").build();
    let failed = PodSpec::new("ns", "crash", UID_B).ip("10.0.0.4").phase("Failed").build();
    let s = synced(vec![namespace("ns", &[])], vec![done, failed]);
    assert!(s.subject_by_ip(ip("10.0.0.3")).is_none());
    assert!(s.subject_by_ip(ip("10.0.0.4")).is_none());
}

#[test]
fn host_network_pods_never_claim_the_node_address_but_keep_their_uid() {
    let p = PodSpec::new("kube-system", "proxy", UID_A).ip("192.168.1.10").host_network().build();
    let s = synced(vec![namespace("kube-system", &[])], vec![p]);
    assert!(s.subject_by_ip(ip("192.168.1.10")).is_none());
    assert!(s.pod_by_ip(ip("192.168.1.10")).is_none());
    let (pod, _) = s.subject_by_uid(UID_A).expect("by uid");
    assert!(pod.host_network);
}

#[test]
fn pods_without_an_address_are_known_by_uid_only() {
    let s = synced(vec![namespace("ns", &[])], vec![PodSpec::new("ns", "pending", UID_A).phase("Pending").build()]);
    assert_eq!(s.pod_addresses().count(), 0);
    assert!(s.subject_by_uid(UID_A).is_some());
}

// === re-lists ===

#[test]
fn a_relist_replaces_everything_at_its_end() {
    let a = PodSpec::new("ns", "a", UID_A).ip("10.0.0.1").build();
    let b = PodSpec::new("ns", "b", UID_B).ip("10.0.0.2").build();
    let c = PodSpec::new("ns", "c", UID_C).ip("10.0.0.3").build();
    let mut s = synced(vec![namespace("ns", &[])], vec![a.clone(), b]);
    // The watch expired; a deleted meanwhile is absent from the new list, c is new.
    s.apply_pod(Event::Init);
    s.apply_pod(Event::InitApply(c));
    assert_eq!(name_at(&s, "10.0.0.2").as_deref(), Some("ns/b"), "the old view serves until the list ends");
    assert!(s.subject_by_ip(ip("10.0.0.3")).is_none());
    s.apply_pod(Event::InitApply(PodSpec::new("ns", "a", UID_A).ip("10.0.0.1").labels(&[("v", "2")]).build()));
    s.apply_pod(Event::InitDone);
    assert!(s.subject_by_ip(ip("10.0.0.2")).is_none(), "b vanished while the watch was down");
    assert!(s.subject_by_uid(UID_B).is_none());
    assert_eq!(name_at(&s, "10.0.0.3").as_deref(), Some("ns/c"));
    assert!(at(&s, "10.0.0.1").expect("a").1.contains(&("v".to_owned(), "2".to_owned())));
    assert!(s.is_ready());
    // Namespaces re-list the same way; pods of a vanished namespace lose their identity.
    s.apply_namespace(Event::Init);
    s.apply_namespace(Event::InitDone);
    assert!(s.subject_by_ip(ip("10.0.0.1")).is_none());
    let _ = a;
}

// === cgroups ===

#[test]
fn pod_uids_are_found_in_both_cgroup_layouts() {
    let cases = [
        (format!("/kubepods/burstable/pod{UID_A}/0123456789abcdef"), Some(UID_A)),
        (format!("/kubepods/pod{UID_A}/c"), Some(UID_A)),
        (
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-0a1b.scope",
                UID_A.replace('-', "_")
            ),
            Some(UID_A),
        ),
        (format!("/kubepods.slice/kubepods-pod{}.slice", UID_A.replace('-', "_").to_uppercase()), Some(UID_A)),
        (format!("/system.slice/pod{UID_A}"), None),
        ("/kubepods/burstable/podnot-a-uid/c".to_owned(), None),
        ("/kubepods.slice/kubepods-besteffort.slice".to_owned(), None),
        (String::new(), None),
    ];
    for (path, want) in cases {
        assert_eq!(pod_uid_from_cgroup(&path).as_deref(), want, "{path}");
    }
    let s = synced(vec![namespace("ns", &[])], vec![PodSpec::new("ns", "p", UID_A).build()]);
    let systemd = format!("/kubepods.slice/kubepods-pod{}.slice/cri-o-1.scope", UID_A.replace('-', "_"));
    assert_eq!(s.subject_by_cgroup(&systemd).map(|(p, _)| p.key.to_string()).as_deref(), Some("ns/p"));
}

// === services and network policies ===

#[test]
fn services_know_which_identities_back_them() {
    let web = |name, uid, ip| PodSpec::new("shop", name, uid).labels(&[("app", "web"), ("tier", "fe")]).ip(ip).build();
    let db = PodSpec::new("shop", "db-0", UID_C).labels(&[("app", "db")]).ip("10.0.0.3").build();
    let mut s = synced(
        vec![namespace("shop", &[]), namespace("other", &[])],
        vec![web("web-1", UID_A, "10.0.0.1"), web("web-2", UID_B, "10.0.0.2"), db],
    );
    s.apply_service(Event::Init);
    s.apply_service(Event::InitApply(service("shop", "web", json!({"app": "web"}), "10.96.0.10")));
    s.apply_service(Event::InitApply(service("other", "web", json!({"app": "web"}), "10.96.0.11")));
    s.apply_service(Event::InitApply(service("shop", "manual", json!({}), "10.96.0.12")));
    s.apply_service(Event::InitDone);
    assert!(s.is_synced(KubeKind::Services));
    let backends = s.service_backends();
    let key = |ns: &str, name: &str| ObjectKey { namespace: ns.into(), name: name.into() };
    assert_eq!(backends[&key("shop", "web")].len(), 1, "two replicas, one identity");
    assert!(backends[&key("other", "web")].is_empty(), "selectors stay in their namespace");
    assert!(backends[&key("shop", "manual")].is_empty(), "no selector, no backends");
    let web_labels = s.subject_by_ip(ip("10.0.0.1")).and_then(|(_, s)| s.labels().cloned()).expect("web");
    let db_labels = s.subject_by_ip(ip("10.0.0.3")).and_then(|(_, s)| s.labels().cloned()).expect("db");
    let backed: Vec<String> = s.services_backed_by(&web_labels).iter().map(|svc| svc.key.to_string()).collect();
    assert_eq!(backed, ["shop/web"]);
    assert!(s.services_backed_by(&db_labels).is_empty());
    let svc = s.services().find(|svc| svc.key == key("shop", "web")).expect("service");
    assert_eq!(svc.cluster_ips, vec![ip("10.96.0.10")]);
    assert_eq!(svc.ports, vec![KubeServicePort { port: 80, protocol: "TCP".into() }]);
    s.apply_service(Event::Delete(service("shop", "web", json!({}), "")));
    assert!(s.services_backed_by(&web_labels).is_empty());
}

#[test]
fn network_policies_are_kept_for_import() {
    let mut s = KubeSnapshot::new();
    s.apply_network_policy(Event::Init);
    s.apply_network_policy(Event::InitApply(netpol("shop", "b")));
    s.apply_network_policy(Event::InitApply(netpol("shop", "a")));
    assert_eq!(s.network_policies().count(), 0, "not before the list ends");
    s.apply_network_policy(Event::InitDone);
    let names: Vec<String> = s.network_policies().map(|np| np.metadata.name.clone().unwrap_or_default()).collect();
    assert_eq!(names, ["a", "b"]);
    assert!(s.network_policies().all(|np| np.metadata.managed_fields.is_none()));
    s.apply_network_policy(Event::Apply(netpol("other", "c")));
    s.apply_network_policy(Event::Delete(netpol("shop", "a")));
    let names: Vec<String> = s.network_policies().map(|np| np.metadata.name.clone().unwrap_or_default()).collect();
    assert_eq!(names, ["c", "b"], "sorted by namespace, then name");
    assert!(s.is_synced(KubeKind::NetworkPolicies));
    assert!(!s.is_ready(), "policies alone do not make the pod view ready");
}

#[test]
fn watch_errors_name_the_missing_permission() {
    let forbidden = kube::core::Status {
        code: 403,
        message: "pods is forbidden: User \"restricted\" cannot list resource \"pods\"".into(),
        ..Default::default()
    };
    let err = kube::runtime::watcher::Error::InitialListFailed(kube::Error::Api(Box::new(forbidden)));
    let msg = super::describe_error(KubeKind::Pods, &err);
    assert!(msg.contains("grant the verbs get, list and watch on resource pods in the core API group"), "{msg}");
    assert!(msg.contains("cannot list resource"), "{msg}");
    let np = super::describe_error(KubeKind::NetworkPolicies, &err);
    assert!(np.contains("networkpolicies in API group networking.k8s.io"), "{np}");
    let gone =
        kube::runtime::watcher::Error::WatchError(Box::new(kube::core::Status { code: 410, ..Default::default() }));
    assert!(super::is_expired(&gone));
    assert!(!super::is_expired(&err));
}
