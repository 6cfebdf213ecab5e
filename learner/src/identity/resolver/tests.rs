use bulkhead_model::{CgroupFact, Direction, InterfaceAddress, Protocol, Verdict};

use super::*;

const INV: &str = r#"
workloads:
  - name: deathstar
    labels: {org: empire, class: deathstar}
    match: {netns: [bh-ds]}
  - name: tiefighter
    labels: {org: empire, class: tiefighter}
    match: {netns: [bh-tie]}
  - name: sshd
    labels: {app: sshd}
    match: {process: [sshd]}
  - name: billing
    labels: {app: billing}
    match: {cgroup: [/billing]}
external:
  - name: corp
    cidrs: [192.0.2.0/24]
"#;

fn fact(ino: u64, name: Option<&str>, addr: &str, host: bool) -> EndpointFact {
    EndpointFact {
        netns_ino: ino,
        netns_name: name.map(str::to_owned),
        addresses: vec![
            InterfaceAddress { interface: "lo".into(), addr: "127.0.0.1".parse().expect("ip"), prefix_len: 8 },
            InterfaceAddress { interface: "eth0".into(), addr: addr.parse().expect("ip"), prefix_len: 24 },
        ],
        cgroups: vec![],
        host,
    }
}

fn flow(ino: u64, dir: Direction, local: &str, peer: &str, comm: &str) -> Flow {
    let (src, dst) = match dir {
        Direction::Egress => (local, peer),
        Direction::Ingress => (peer, local),
    };
    Flow {
        src_addr: src.parse().expect("ip"),
        src_port: 0,
        dst_addr: dst.parse().expect("ip"),
        dst_port: 80,
        protocol: Protocol::Tcp,
        direction: dir,
        netns_ino: ino,
        cgroup_id: 0,
        pid: 1,
        comm: comm.into(),
        connections: 1,
        bytes_sent: 0,
        bytes_received: 0,
        packets: 0,
        verdict: Verdict::Forwarded,
        first_seen_unix_ms: 0,
        last_seen_unix_ms: 0,
        http: Default::default(),
    }
}

fn resolver() -> Resolver {
    let mut r = Resolver::new(Inventory::parse(INV).expect("valid inventory"));
    r.update_node(
        "node-a",
        vec![
            fact(1, None, "192.168.50.1", true),
            fact(10, Some("bh-ds"), "10.0.0.10", false),
            fact(11, Some("bh-tie"), "10.0.0.11", false),
            fact(12, Some("bh-unknown"), "10.0.0.12", false),
        ],
    );
    r.update_node("node-b", vec![fact(1, None, "192.168.50.2", true), fact(20, Some("bh-tie"), "10.0.1.20", false)]);
    r
}

fn name(s: &Subject) -> String {
    match s {
        Subject::Reserved(r) => format!("reserved:{}", r.name()),
        Subject::Workload { name, .. } => name.clone(),
    }
}

#[test]
fn resolves_both_ends_by_netns_and_address() {
    let r = resolver();
    let f = flow(11, Direction::Egress, "10.0.0.11", "10.0.0.10", "curl");
    assert_eq!(name(&r.local_subject("node-a", &f)), "tiefighter");
    assert_eq!(name(&r.peer_subject("node-a", &f)), "deathstar");
    // The server side reports the same connection as ingress.
    let f = flow(10, Direction::Ingress, "10.0.0.10", "10.0.0.11", "");
    assert_eq!(name(&r.local_subject("node-a", &f)), "deathstar");
    assert_eq!(name(&r.peer_subject("node-a", &f)), "tiefighter");
}

#[test]
fn peers_on_other_nodes_resolve_through_the_ipcache() {
    let r = resolver();
    let f = flow(10, Direction::Ingress, "10.0.0.10", "10.0.1.20", "");
    assert_eq!(name(&r.peer_subject("node-a", &f)), "tiefighter");
    let f = flow(10, Direction::Ingress, "10.0.0.10", "192.168.50.2", "");
    assert_eq!(name(&r.peer_subject("node-a", &f)), "reserved:remote-node");
    let f = flow(10, Direction::Ingress, "10.0.0.10", "192.168.50.1", "");
    assert_eq!(name(&r.peer_subject("node-a", &f)), "reserved:host");
}

#[test]
fn unknown_things_get_reserved_identities() {
    let r = resolver();
    let f = flow(12, Direction::Egress, "10.0.0.12", "8.8.8.8", "x");
    assert_eq!(name(&r.local_subject("node-a", &f)), "reserved:unmanaged");
    assert_eq!(name(&r.peer_subject("node-a", &f)), "reserved:world");
    let f = flow(12, Direction::Egress, "10.0.0.12", "192.0.2.9", "x");
    assert_eq!(name(&r.peer_subject("node-a", &f)), "corp");
    // A namespace the node has not reported yet.
    let f = flow(99, Direction::Egress, "10.9.9.9", "10.0.0.10", "x");
    assert_eq!(name(&r.local_subject("node-a", &f)), "reserved:unmanaged");
    assert_eq!(name(&r.local_subject("node-z", &f)), "reserved:unmanaged");
}

#[test]
fn loopback_peer_is_the_workload_itself() {
    let r = resolver();
    let f = flow(10, Direction::Egress, "127.0.0.1", "127.0.0.1", "x");
    assert_eq!(name(&r.peer_subject("node-a", &f)), "deathstar");
}

#[test]
fn host_processes_are_host_unless_the_inventory_names_them() {
    let mut r = resolver();
    let f = flow(1, Direction::Ingress, "192.168.50.1", "10.0.0.11", "sshd");
    assert_eq!(name(&r.local_subject("node-a", &f)), "sshd");
    let f = flow(1, Direction::Egress, "192.168.50.1", "10.0.0.11", "bash");
    assert_eq!(name(&r.local_subject("node-a", &f)), "reserved:host");
    let mut host = fact(1, None, "192.168.50.1", true);
    host.cgroups = vec![CgroupFact { cgroup_id: 500, path: "/billing/worker".into(), comms: vec!["java".into()] }];
    r.update_node("node-a", vec![host]);
    let mut f = flow(1, Direction::Egress, "192.168.50.1", "10.0.0.11", "java");
    f.cgroup_id = 500;
    assert_eq!(name(&r.local_subject("node-a", &f)), "billing");
}

#[test]
fn a_new_snapshot_replaces_the_old_one() {
    let mut r = resolver();
    r.update_node("node-a", vec![fact(10, Some("bh-ds"), "10.0.0.99", false)]);
    let f = flow(10, Direction::Ingress, "10.0.0.99", "10.0.0.11", "");
    // 10.0.0.11 left node-a's snapshot; nobody else has it.
    assert_eq!(name(&r.peer_subject("node-a", &f)), "reserved:world");
}

#[test]
fn a_reused_address_resolves_to_the_managed_namespace_whatever_the_order() {
    for order in [[12u64, 10], [10, 12]] {
        let mut r = Resolver::new(Inventory::parse(INV).expect("valid inventory"));
        let facts = order
            .iter()
            .map(|ino| match ino {
                10 => fact(10, Some("bh-ds"), "10.0.0.50", false),
                _ => fact(12, Some("bh-unknown"), "10.0.0.50", false),
            })
            .collect();
        r.update_node("node-a", facts);
        let f = flow(99, Direction::Egress, "10.0.0.1", "10.0.0.50", "x");
        assert_eq!(name(&r.peer_subject("node-a", &f)), "deathstar", "order {order:?}");
    }
}

// === Kubernetes ===

mod kubernetes {
    use ::kube::runtime::watcher::Event;

    use super::*;
    use crate::identity::kube::tests::{PodSpec, namespace, synced};
    use crate::identity::{Conflict, ConflictKind};

    const UID_WEB: &str = "3e6b4ee8-1c6e-4d4f-9f0a-0b5c3d1c2a11";
    const UID_PROXY: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    const KUBE_INV: &str = r#"
workloads:
  - name: legacy-db
    labels: {app: legacy-db}
    match: {ips: [10.244.0.50]}
  - name: mirrored
    labels: {app: web, io.kubernetes.pod.namespace: shop, io.cilium.k8s.policy.serviceaccount: default}
    match: {ips: [10.244.0.51]}
  - name: sidecar-host
    labels: {app: agent}
    match: {netns: [bh-pod-db]}
external:
  - name: pod-network
    cidrs: [10.244.0.0/16]
"#;

    fn cgroup(id: u64, uid: &str) -> CgroupFact {
        CgroupFact {
            cgroup_id: id,
            path: format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-1.scope",
                uid.replace('-', "_")
            ),
            comms: vec![],
        }
    }

    /// Inventory above, plus a cluster with `shop/web` at 10.244.1.5, a host-network
    /// proxy, and node-a's namespaces.
    fn kube_resolver() -> Resolver {
        let mut r = Resolver::new(Inventory::parse(KUBE_INV).expect("valid inventory"));
        let snapshot = synced(
            vec![namespace("shop", &[]), namespace("kube-system", &[])],
            vec![
                PodSpec::new("shop", "web-1", UID_WEB).labels(&[("app", "web")]).ip("10.244.1.5").build(),
                PodSpec::new("shop", "api-1", "11111111-2222-3333-4444-555555555555").ip("10.244.2.2").build(),
                PodSpec::new("kube-system", "proxy", UID_PROXY)
                    .labels(&[("app", "proxy")])
                    .ip("192.168.50.1")
                    .host_network()
                    .build(),
            ],
        );
        r.update_kube(|k| *k = snapshot);
        let mut host = fact(1, None, "192.168.50.1", true);
        host.cgroups = vec![
            cgroup(700, UID_PROXY),
            CgroupFact { cgroup_id: 5, path: "/system.slice/ssh.service".into(), comms: vec![] },
        ];
        let mut web = fact(30, None, "10.244.1.5", false);
        web.cgroups = vec![cgroup(800, UID_WEB)];
        r.update_node("node-a", vec![host, web]);
        // A pod's namespace known only by its address.
        r.update_node("node-b", vec![fact(1, None, "192.168.50.2", true), fact(31, None, "10.244.2.2", false)]);
        r
    }

    #[test]
    fn pod_addresses_and_cgroups_resolve_to_the_pod() {
        let r = kube_resolver();
        // Peer by pod IP, from another node.
        let f = flow(1, Direction::Egress, "192.168.50.2", "10.244.1.5", "curl");
        assert_eq!(name(&r.peer_subject("node-b", &f)), "shop/web-1");
        // Local side by the cgroup's pod UID (systemd layout).
        let mut f = flow(30, Direction::Egress, "10.244.1.5", "10.96.0.1", "nginx");
        f.cgroup_id = 800;
        assert_eq!(name(&r.local_subject("node-a", &f)), "shop/web-1");
        let labels = r.local_subject("node-a", &f).labels().cloned().expect("workload");
        assert_eq!(labels.namespace(), Some("shop"));
        // An unknown cgroup in the pod's own namespace is still the pod.
        f.cgroup_id = 999;
        assert_eq!(name(&r.local_subject("node-a", &f)), "shop/web-1");
        // A namespace without pod cgroups: its address.
        let f = flow(31, Direction::Egress, "10.244.2.2", "10.244.1.5", "x");
        assert_eq!(name(&r.local_subject("node-b", &f)), "shop/api-1");
        assert_eq!(name(&r.peer_subject("node-b", &f)), "shop/web-1");
        // Not in any endpoint fact: the flow's own address.
        let f = flow(77, Direction::Egress, "10.244.1.5", "8.8.8.8", "x");
        assert_eq!(name(&r.local_subject("node-z", &f)), "shop/web-1");
    }

    #[test]
    fn host_network_pods_are_named_by_cgroup_and_the_node_stays_host() {
        let r = kube_resolver();
        let mut f = flow(1, Direction::Egress, "192.168.50.1", "10.244.1.5", "kube-proxy");
        f.cgroup_id = 700;
        assert_eq!(name(&r.local_subject("node-a", &f)), "kube-system/proxy");
        f.cgroup_id = 5;
        assert_eq!(name(&r.local_subject("node-a", &f)), "reserved:host");
        // The node's address is the host's, never the host-network pod's.
        let f = flow(30, Direction::Ingress, "10.244.1.5", "192.168.50.1", "");
        assert_eq!(name(&r.peer_subject("node-a", &f)), "reserved:host");
        let f = flow(1, Direction::Ingress, "192.168.50.2", "192.168.50.1", "");
        assert_eq!(name(&r.peer_subject("node-b", &f)), "reserved:remote-node");
    }

    #[test]
    fn the_inventory_wins_a_conflict_and_the_conflict_is_listed() {
        let mut r = kube_resolver();
        assert_eq!(r.conflicts().len(), 0);
        // A pod takes an address the inventory gives to another workload.
        r.update_kube(|k| {
            k.apply_pod(Event::Apply(
                PodSpec::new("shop", "db-0", "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")
                    .labels(&[("app", "db")])
                    .ip("10.244.0.50")
                    .build(),
            ))
        });
        let f = flow(1, Direction::Egress, "192.168.50.2", "10.244.0.50", "psql");
        assert_eq!(name(&r.peer_subject("node-b", &f)), "legacy-db", "inventory is operator configuration");
        let conflicts: Vec<&Conflict> = r.conflicts().collect();
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        let c = conflicts[0];
        assert_eq!((c.what, c.value.as_str()), (ConflictKind::Address, "10.244.0.50"));
        assert_eq!((c.inventory_workload.as_str(), c.kube_pod.as_str()), ("legacy-db", "shop/db-0"));
        assert_eq!(c.kube_labels.get("app"), Some("db"));
        assert_eq!(c.inventory_labels.get("app"), Some("legacy-db"));
        // The pod goes away: so does the conflict.
        r.update_kube(|k| {
            k.apply_pod(Event::Delete(PodSpec::new("shop", "db-0", "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee").build()))
        });
        assert_eq!(r.conflicts().len(), 0);
    }

    #[test]
    fn agreeing_sources_and_external_groups_are_no_conflict() {
        let mut r = kube_resolver();
        r.update_kube(|k| {
            k.apply_pod(Event::Apply(
                PodSpec::new("shop", "web-2", "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")
                    .labels(&[("app", "web")])
                    .ip("10.244.0.51")
                    .build(),
            ))
        });
        assert_eq!(r.conflicts().len(), 0, "same labels on both sides: {:?}", r.conflicts().collect::<Vec<_>>());
        // 10.244.1.5 is inside the external pod-network group, but the pod is more specific.
        let f = flow(1, Direction::Egress, "192.168.50.2", "10.244.1.5", "curl");
        assert_eq!(name(&r.peer_subject("node-b", &f)), "shop/web-1");
        // An address of the range no pod holds stays the group.
        let f = flow(1, Direction::Egress, "192.168.50.2", "10.244.9.9", "curl");
        assert_eq!(name(&r.peer_subject("node-b", &f)), "pod-network");
    }

    #[test]
    fn an_endpoint_named_by_both_is_a_conflict() {
        let mut r = kube_resolver();
        let mut db = fact(40, Some("bh-pod-db"), "10.244.3.3", false);
        db.cgroups = vec![cgroup(900, "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")];
        r.update_kube(|k| {
            k.apply_pod(Event::Apply(
                PodSpec::new("shop", "db-0", "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee").labels(&[("app", "db")]).build(),
            ))
        });
        r.update_node("node-c", vec![db]);
        let mut f = flow(40, Direction::Egress, "10.244.3.3", "10.244.1.5", "psql");
        f.cgroup_id = 900;
        assert_eq!(name(&r.local_subject("node-c", &f)), "sidecar-host");
        let conflicts: Vec<&Conflict> = r.conflicts().collect();
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        assert_eq!(conflicts[0].what, ConflictKind::Endpoint);
        assert_eq!(conflicts[0].value, "node-c netns 40 (bh-pod-db)");
        assert_eq!(conflicts[0].kube_pod, "shop/db-0");
    }

    #[test]
    fn nothing_comes_from_kubernetes_before_its_lists_complete() {
        let mut r = Resolver::new(Inventory::default());
        r.update_kube(|k| {
            k.apply_pod(Event::Init);
            k.apply_pod(Event::InitApply(PodSpec::new("shop", "web-1", UID_WEB).ip("10.244.1.5").build()));
            k.apply_pod(Event::InitDone);
        });
        let f = flow(1, Direction::Egress, "192.168.50.2", "10.244.1.5", "curl");
        assert_eq!(name(&r.peer_subject("node-b", &f)), "reserved:world");
        r.update_kube(|k| {
            k.apply_namespace(Event::Init);
            k.apply_namespace(Event::InitApply(namespace("shop", &[])));
            k.apply_namespace(Event::InitDone);
        });
        assert_eq!(name(&r.peer_subject("node-b", &f)), "shop/web-1");
    }
}
