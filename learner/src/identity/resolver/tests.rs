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
