//! Root tests of the enforcer's kernel datapath: the real eBPF object, attached to
//! a cgroup of this test's own, judging real TCP and UDP packets between
//! workloads that live in network namespaces (`TestNet`) and in child cgroups
//! of that cgroup.
//!
//! The workloads are processes: this test binary re-run as an "agent"
//! (`helper_agent`) started inside its namespace and cgroup from its first
//! instruction, so every socket it creates belongs to the workload's cgroup. The
//! test drives it over stdin/stdout: listen, connect, send.
//!
//! Every namespace, cgroup and bpffs pin directory has a unique name and is
//! removed on drop, also when a test panics. Without root every test fails.
//!
//! Run: `cargo test -p bulkhead-enforcer --test datapath` as root.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bulkhead_abi::enforcer as abi;
use bulkhead_enforcer::datapath::{
    Datapath, DatapathOptions, Direction, EgressCheck, Endpoint, KernelRule, Mode, VerdictRecord,
};
use bulkhead_enforcer::render::{IpcachePrefix, MapOp, MapState, diff, render};
use bulkhead_model::{
    Direction as ModelDirection, EndpointCgroup, HttpRule, Identity, IpcacheEntry, NodePolicy, NodeRule,
    PolicyEndpoint, Protocol, RolloutMode, RuleKey, RuleRef,
};
use bulkhead_testkit::assert_eventually;
use bulkhead_testkit::cgroup::TestCgroup;
use bulkhead_testkit::error_chain as chain;
use bulkhead_testkit::netns::TestNet;
use bulkhead_testkit::{require_root, unique_suffix};
use common::{Agent, FAIL_TIMEOUT_MS, OK_TIMEOUT_MS, Pins, SubCgroup, spawn_workload};

const WAIT: Duration = Duration::from_secs(10);

const ID_A: u32 = 1001;
const ID_B: u32 = 1002;
const ID_C: u32 = 1003;
const HTTP: u16 = 80;
const UDP_PORT: u16 = 5353;
const RULE_A_EGRESS_HTTP: u32 = 10;
const RULE_B_INGRESS_HTTP: u32 = 11;
const RULE_A_EGRESS_UDP: u32 = 12;
const RULE_B_INGRESS_UDP: u32 = 13;
const RULE_B_INGRESS_HTTP_FROM_C: u32 = 21;
/// Rules that never match, there to make writing a generation take a while.
const RULE_FILLER: u32 = 99;

#[test]
#[ignore = "workload process of the other tests, started by them with --ignored"]
fn helper_agent() {
    common::workload_main();
}

// === fixtures ===

/// Three workloads A, B, C (hosts 0, 1, 2 of a TestNet), each an agent process
/// in its own cgroup below the cgroup the enforcer attaches to. B serves TCP 80
/// and UDP 5353 on IPv4 and IPv6; A serves TCP 80 too (for B → A).
struct World {
    // Fields drop in order: processes, then cgroups, then pins, then the net.
    agents: Vec<Agent>,
    cgroups: Vec<SubCgroup>,
    dp: Option<Datapath>,
    opts: DatapathOptions,
    _pins: Pins,
    _parent: TestCgroup,
    net: TestNet,
}

impl World {
    fn new() -> World {
        World::with(1024, EgressCheck::default())
    }

    /// A world whose egress is judged `egress`.
    fn with_egress(egress: EgressCheck) -> World {
        World::with(1024, egress)
    }

    /// A world whose policy map holds `policy_entries` (both generations).
    fn with_policy_entries(policy_entries: u32) -> World {
        World::with(policy_entries, EgressCheck::default())
    }

    fn with(policy_entries: u32, egress: EgressCheck) -> World {
        require_root();
        let net = TestNet::new(3);
        let parent = TestCgroup::new();
        let instance = format!("test-{}", unique_suffix());
        let pins = Pins { instance: instance.clone() };
        let opts = DatapathOptions {
            // Small maps: many tests run at once.
            ipcache_entries: 1024,
            policy_entries,
            conntrack_entries: 4096,
            events_bytes: 1 << 16,
            egress,
            ..DatapathOptions::new(instance, parent.path())
        };
        let dp = Datapath::load(&opts).unwrap_or_else(|e| panic!("loading the datapath: {}", chain(&e)));
        assert!(!dp.adopted(), "a fresh instance adopts nothing");
        let mut world =
            World { agents: Vec::new(), cgroups: Vec::new(), dp: Some(dp), opts, _pins: pins, _parent: parent, net };
        for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
            let cg = SubCgroup::new(world._parent.path(), name);
            let agent = spawn_workload(["A", "B", "C"][i], &world.net.hosts()[i].netns, &cg);
            world.cgroups.push(cg);
            world.agents.push(agent);
        }
        for (agent, host) in [(1, 1), (0, 0)] {
            let h = &world.net.hosts()[host];
            for ip in [IpAddr::from(h.ipv4), IpAddr::from(h.ipv6)] {
                world.agents[agent].listen("tcp", SocketAddr::new(ip, HTTP));
                world.agents[agent].listen("udp", SocketAddr::new(ip, UDP_PORT));
            }
        }
        // The ipcache: every host's addresses → its identity.
        for (i, id) in [ID_A, ID_B, ID_C].into_iter().enumerate() {
            let (v4, v6) = (world.net.hosts()[i].ipv4, world.net.hosts()[i].ipv6);
            world.dp().set_ipcache(format!("{v4}/32").parse().expect("net"), id).expect("ipcache v4");
            world.dp().set_ipcache(format!("{v6}/128").parse().expect("net"), id).expect("ipcache v6");
        }
        world
    }

    fn dp(&mut self) -> &mut Datapath {
        self.dp.as_mut().expect("datapath loaded")
    }

    fn agent(&mut self, i: usize) -> &mut Agent {
        &mut self.agents[i]
    }

    fn cgroup_id(&self, i: usize) -> u64 {
        self.cgroups[i].id()
    }

    fn v4(&self, i: usize, port: u16) -> SocketAddr {
        SocketAddr::new(self.net.hosts()[i].ipv4.into(), port)
    }

    fn v6(&self, i: usize, port: u16) -> SocketAddr {
        SocketAddr::new(self.net.hosts()[i].ipv6.into(), port)
    }

    /// A and B managed with both directions covered; C unmanaged.
    fn manage(&mut self, mode_a: Mode, mode_b: Mode) {
        let (a, b) = (self.cgroup_id(0), self.cgroup_id(1));
        let ep = |identity, mode| Endpoint { identity, mode, ingress_covered: true, egress_covered: true };
        self.dp().set_endpoint(a, ep(ID_A, mode_a)).expect("endpoint A");
        self.dp().set_endpoint(b, ep(ID_B, mode_b)).expect("endpoint B");
    }

    fn set_mode(&mut self, i: usize, mode: Mode) {
        let id = self.cgroup_id(i);
        self.dp().set_mode(id, mode).expect("set mode");
    }

    /// Waits until the kernel reported `n` events matching `pred` (draining as
    /// it goes) and returns every event seen.
    fn wait_events(&mut self, seen: &mut Vec<VerdictRecord>, n: usize, pred: impl Fn(&VerdictRecord) -> bool) {
        assert_eventually!(
            WAIT,
            || {
                self.dp().drain_events(seen);
                seen.iter().filter(|e| pred(e)).count() >= n
            },
            "{n} matching verdict events; have {seen:#?}"
        );
    }
}

/// "A → B:80/TCP and A → B:5353/UDP allowed", written as both A's egress and
/// B's ingress rule.
fn a_to_b_rules() -> Vec<KernelRule> {
    let rule = |local, peer, port, protocol, direction, rule_id| KernelRule {
        local_identity: local,
        peer_identity: peer,
        port,
        protocol,
        direction,
        rule_id,
        allow: true,
    };
    vec![
        rule(ID_A, ID_B, HTTP, abi::IPPROTO_TCP, Direction::Egress, RULE_A_EGRESS_HTTP),
        rule(ID_B, ID_A, HTTP, abi::IPPROTO_TCP, Direction::Ingress, RULE_B_INGRESS_HTTP),
        rule(ID_A, ID_B, UDP_PORT, abi::IPPROTO_UDP, Direction::Egress, RULE_A_EGRESS_UDP),
        rule(ID_B, ID_A, UDP_PORT, abi::IPPROTO_UDP, Direction::Ingress, RULE_B_INGRESS_UDP),
    ]
}

/// A node policy over a [`World`]: every host's addresses in the ipcache; A
/// managed in monitor mode without coverage (its traffic is never judged) and
/// owning `filler` rules that never match (writing a generation then takes a
/// while: the window in which unversioned endpoints or prefixes would show a
/// packet half a policy); B managed in `mode_b` (unless `None`) with its ingress
/// covered and its egress not (connections open when B becomes managed have no
/// conntrack entry, and their replies must not be judged as new egress); plus
/// B's ingress `rules` as (peer, rule id), TCP port 80.
fn node_policy(w: &World, mode_b: Option<RolloutMode>, rules: &[(u32, u32)], filler: u16) -> NodePolicy {
    let mut p = NodePolicy { version: 1, ..NodePolicy::default() };
    for (i, id) in [ID_A, ID_B, ID_C].into_iter().enumerate() {
        let h = &w.net.hosts()[i];
        for net in [format!("{}/32", h.ipv4), format!("{}/128", h.ipv6)] {
            p.ipcache.push(IpcacheEntry { prefix: net.parse().expect("net"), identity: Identity(id) });
        }
    }
    let endpoint = |i: usize, identity, mode, ingress_covered| PolicyEndpoint {
        identity: Identity(identity),
        netns_ino: None,
        netns_name: None,
        cgroups: vec![EndpointCgroup { cgroup_id: w.cgroup_id(i), path: format!("/{i}") }],
        mode,
        ingress_covered,
        egress_covered: false,
    };
    p.endpoints.push(endpoint(0, ID_A, RolloutMode::Monitor, false));
    if let Some(mode) = mode_b {
        p.endpoints.push(endpoint(1, ID_B, mode, true));
    }
    let rule = |local, peer: Option<u32>, port, rule_id| NodeRule {
        key: RuleKey {
            local: Identity(local),
            direction: ModelDirection::Ingress,
            peer: peer.map(Identity),
            port: Some(port),
            protocol: Some(Protocol::Tcp),
        },
        rule_id,
        http: Vec::new(),
    };
    p.rules = (1..=filler).map(|port| rule(ID_A, None, port, RULE_FILLER)).collect();
    p.rules.extend(rules.iter().map(|&(peer, rule_id)| rule(ID_B, Some(peer), HTTP, rule_id)));
    p.rules.sort();
    let rule_ids: std::collections::BTreeSet<u32> = p.rules.iter().map(|r| r.rule_id).collect();
    p.rule_refs = rule_ids
        .into_iter()
        .map(|rule_id| RuleRef {
            rule_id,
            proposal_id: 1,
            policy_name: "p".into(),
            direction: ModelDirection::Ingress,
            rule_index: 0,
        })
        .collect();
    p.validate().unwrap_or_else(|e| panic!("test policy: {e}"));
    p
}

/// Applies `policy` the way the map owner does: rendered under the next
/// generation, diffed against what the kernel holds, the ops applied in order.
fn apply_policy(dp: &mut Datapath, current: &mut MapState, policy: &NodePolicy) {
    let target = render(policy, current.generation.wrapping_add(1)).unwrap_or_else(|e| panic!("rendering: {e}"));
    dp.apply(&diff(current, &target)).unwrap_or_else(|e| panic!("applying: {}", chain(&e)));
    *current = target;
}

/// While `client` connects to `to` back to back for `ms`, flips the kernel
/// between `policies` (in turn, each one a new generation) as fast as it can.
/// Returns the client's answer and the number of flips.
fn flip_while_connecting(
    w: &mut World,
    client: usize,
    to: SocketAddr,
    ms: u64,
    policies: &[NodePolicy],
) -> (Result<String, String>, usize) {
    let dp = w.dp.as_mut().expect("datapath loaded");
    let mut current = dp.read_state().expect("read state").state;
    apply_policy(dp, &mut current, &policies[0]);
    let agent = &mut w.agents[client];
    let mut flips = 0;
    let answer = std::thread::scope(|s| {
        let looping = s.spawn(|| agent.ask_value(&format!("loop tcp {to} {ms}")));
        while !looping.is_finished() {
            flips += 1;
            apply_policy(dp, &mut current, &policies[flips % policies.len()]);
        }
        looping.join().expect("client thread")
    });
    // What the kernel holds is exactly the last target, every entry settled.
    assert_eq!(dp.read_state().expect("read state").state, current);
    (answer, flips)
}

// === tests ===

#[test]
fn enforce_allows_the_rule_and_drops_everything_else_v4_and_v6() {
    let mut w = World::new();
    w.dp().replace_policy(&a_to_b_rules()).expect("policy");
    w.manage(Mode::Enforce, Mode::Enforce);
    let (a, b, c) = (0, 1, 2);

    for (b80, b53, a80) in
        [(w.v4(b, HTTP), w.v4(b, UDP_PORT), w.v4(a, HTTP)), (w.v6(b, HTTP), w.v6(b, UDP_PORT), w.v6(a, HTTP))]
    {
        // Allowed, and B's replies (B's egress is covered) pass by conntrack.
        w.agent(a).tcp_ok(b80);
        w.agent(a).udp(b53, OK_TIMEOUT_MS).unwrap_or_else(|e| panic!("A → {b53}/udp must succeed: {e}"));
        // Not allowed: C → B (B's ingress), B → A (B's egress is covered).
        w.agent(c).tcp_fails(b80);
        assert!(w.agent(c).udp(b53, FAIL_TIMEOUT_MS).is_err(), "C → {b53}/udp must fail");
        w.agent(b).tcp_fails(a80);
    }

    let b_cg = w.cgroup_id(b);
    let c_v4 = w.net.hosts()[c].ipv4;
    let mut seen = Vec::new();
    w.wait_events(&mut seen, 1, |e| {
        e.cgroup_id == b_cg
            && e.remote.ip() == IpAddr::from(c_v4)
            && e.local.port() == HTTP
            && e.protocol == abi::IPPROTO_TCP
    });
    let ev = seen
        .iter()
        .find(|e| e.cgroup_id == b_cg && e.remote.ip() == IpAddr::from(c_v4) && e.protocol == abi::IPPROTO_TCP)
        .expect("C → B event");
    assert_eq!(
        (ev.verdict, ev.reason, ev.rule_id, ev.direction, ev.mode),
        (abi::VERDICT_DENIED, abi::REASON_DEFAULT_DENY, 0, Direction::Ingress, Mode::Enforce)
    );
    assert_eq!((ev.local_identity, ev.peer_identity), (ID_B, ID_C));
    // B → A was stopped on B's egress, with B's identity and A's as the peer.
    w.wait_events(&mut seen, 2, |e| e.cgroup_id == b_cg && e.direction == Direction::Egress && e.peer_identity == ID_A);

    let counters = w.dp().counters();
    assert!(counters.denied >= 6, "{counters:?}");
    assert!(counters.allowed >= 4 && counters.ct_hits > 0, "{counters:?}");
    assert_eq!(counters.events_lost, 0, "{counters:?}");
    let rules = w.dp().rule_use();
    for rule in [RULE_A_EGRESS_HTTP, RULE_B_INGRESS_HTTP, RULE_A_EGRESS_UDP, RULE_B_INGRESS_UDP] {
        let used = rules.get(&rule).copied().unwrap_or_default();
        assert!(used.hits >= 2 && used.last_hit_ns > 0, "rule {rule}: {used:?} ({rules:?})");
    }
}

#[test]
fn monitor_passes_and_audits_once_per_connection_then_modes_switch() {
    let mut w = World::new();
    w.dp().replace_policy(&a_to_b_rules()).expect("policy");
    w.manage(Mode::Enforce, Mode::Monitor);
    let (a, b, c) = (0, 1, 2);
    let b80 = w.v4(b, HTTP);
    let b_cg = w.cgroup_id(b);
    let is_c_audit =
        |e: &VerdictRecord| e.cgroup_id == b_cg && e.verdict == abi::VERDICT_AUDIT && e.peer_identity == ID_C;

    const ATTEMPTS: usize = 3;
    for _ in 0..ATTEMPTS {
        w.agent(c).tcp_ok(b80);
    }
    w.agent(a).tcp_ok(b80);
    let mut seen = Vec::new();
    w.wait_events(&mut seen, ATTEMPTS, is_c_audit);
    // Exactly one per connection: the kernel counted as many audits as it
    // reported, every one for a distinct client port, and nothing was lost.
    let counters = w.dp().counters();
    assert_eq!(counters.audit, ATTEMPTS as u64, "{counters:?}");
    assert_eq!((counters.events_lost, counters.events_rate_limited), (0, 0), "{counters:?}");
    let audits: Vec<&VerdictRecord> = seen.iter().filter(|e| is_c_audit(e)).collect();
    assert_eq!(audits.len(), ATTEMPTS, "{audits:#?}");
    let mut ports: Vec<u16> = audits.iter().map(|e| e.remote.port()).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), ATTEMPTS, "{audits:#?}");
    assert!(audits.iter().all(|e| e.reason == abi::REASON_DEFAULT_DENY && e.mode == Mode::Monitor));

    // Enforce: C is dropped, A still gets through.
    w.set_mode(b, Mode::Enforce);
    w.agent(c).tcp_fails(b80);
    w.agent(a).tcp_ok(b80);
    w.wait_events(&mut seen, 1, |e| e.cgroup_id == b_cg && e.verdict == abi::VERDICT_DENIED && e.peer_identity == ID_C);

    // Back to monitor: traffic is restored (and audited again).
    w.set_mode(b, Mode::Monitor);
    w.agent(c).tcp_ok(b80);
    w.wait_events(&mut seen, ATTEMPTS + 1, is_c_audit);

    // Learn: no verdicts at all.
    w.set_mode(b, Mode::Learn);
    let before = w.dp().counters();
    w.agent(c).tcp_ok(b80);
    let after = w.dp().counters();
    assert_eq!((after.audit, after.denied), (before.audit, before.denied), "learn mode judged something");
}

#[test]
fn a_generation_flip_changes_the_policy_at_once_per_packet() {
    a_generation_flip_changes_the_policy_at_once(EgressCheck::Packet);
}

#[test]
fn a_generation_flip_changes_the_policy_at_once_at_connect() {
    a_generation_flip_changes_the_policy_at_once(EgressCheck::Connect);
}

fn a_generation_flip_changes_the_policy_at_once(egress: EgressCheck) {
    let mut w = World::with_egress(egress);
    let g1 = w.dp().replace_policy(&a_to_b_rules()).expect("policy");
    w.manage(Mode::Learn, Mode::Enforce);
    let (a, b, c) = (0, 1, 2);
    let b80 = w.v6(b, HTTP);
    w.agent(a).tcp_ok(b80);
    w.agent(c).tcp_fails(b80);

    // The next generation allows only C. Written, not active: nothing changes.
    let g2 = g1 + 1;
    let only_c = [KernelRule {
        local_identity: ID_B,
        peer_identity: ID_C,
        port: HTTP,
        protocol: abi::IPPROTO_TCP,
        direction: Direction::Ingress,
        rule_id: RULE_B_INGRESS_HTTP_FROM_C,
        allow: true,
    }];
    w.dp().write_generation(g2, &only_c).expect("write generation");
    assert!(w.dp().write_generation(g1, &only_c).is_err(), "the active generation is never written in place");
    w.agent(a).tcp_ok(b80);
    w.agent(c).tcp_fails(b80);

    // An established connection of A, allowed by g1 only. After its first
    // packets B's socket carries the verdict: the rest take the fast path.
    w.agent(a).ask(&format!("open {b80}")).expect("A opens a connection");
    w.agent(a).ask(&format!("send 0 {OK_TIMEOUT_MS}")).expect("A's open connection works under g1");
    let fast = w.dp().counters().fast_path;
    w.agent(a).ask(&format!("send 0 {OK_TIMEOUT_MS}")).expect("A's open connection works under g1");
    let counters = w.dp().counters();
    assert!(counters.fast_path > fast, "B's established socket takes the fast path: {counters:?}");

    // One map update flips everything, established connections included (their
    // conntrack entries name g1, so their next packet is judged again).
    w.dp().activate(g2).expect("activate");
    w.agent(c).tcp_ok(b80);
    w.agent(a).tcp_fails(b80);
    assert!(w.agent(a).ask(&format!("send 0 {FAIL_TIMEOUT_MS}")).is_err(), "g2 revoked A's open connection");
    assert_eq!(w.dp().delete_generation(g1).expect("delete"), a_to_b_rules().len());
    w.agent(c).tcp_ok(b80);
    assert!(w.dp().rule_use().get(&RULE_B_INGRESS_HTTP_FROM_C).is_some_and(|u| u.hits >= 2));

    // A connection allowed by both the old and the new generation never notices
    // the flip (g3: the same rule under another id).
    w.agent(c).ask(&format!("open {b80}")).expect("C opens a connection");
    let g3 = g2 + 1;
    let renumbered = [KernelRule { rule_id: RULE_B_INGRESS_HTTP_FROM_C + 1, ..only_c[0] }];
    w.dp().write_generation(g3, &renumbered).expect("write g3");
    w.dp().activate(g3).expect("activate g3");
    w.agent(c).ask(&format!("send 0 {OK_TIMEOUT_MS}")).expect("C's connection survives a flip that still allows it");
    w.agent(c).tcp_ok(b80);
    assert!(w.dp().rule_use().get(&(RULE_B_INGRESS_HTTP_FROM_C + 1)).is_some_and(|u| u.hits >= 2));
}

#[test]
fn verdicts_cached_on_sockets_are_judged_again_after_a_mode_switch_or_a_flush_per_packet() {
    verdicts_cached_on_sockets_are_judged_again_after_a_mode_switch_or_a_flush(EgressCheck::Packet);
}

#[test]
fn verdicts_cached_on_sockets_are_judged_again_after_a_mode_switch_or_a_flush_at_connect() {
    verdicts_cached_on_sockets_are_judged_again_after_a_mode_switch_or_a_flush(EgressCheck::Connect);
}

fn verdicts_cached_on_sockets_are_judged_again_after_a_mode_switch_or_a_flush(egress: EgressCheck) {
    let mut w = World::with_egress(egress);
    let g1 = w.dp().replace_policy(&a_to_b_rules()).expect("policy");
    w.manage(Mode::Learn, Mode::Monitor);
    let (a, b, c) = (0, 1, 2);
    let b_cg = w.cgroup_id(b);
    let b80 = w.v4(b, HTTP);

    // C has no rule: its connection is audited and passes, and after the
    // handshake its packets pass on the audit without another event (per packet:
    // cached on B's socket, the fast path; egress at connect: its conntrack entry).
    let audit_passes = |c: &bulkhead_enforcer::datapath::DatapathCounters| match egress {
        EgressCheck::Packet => c.fast_path,
        EgressCheck::Connect => c.ct_hits,
    };
    w.agent(c).ask(&format!("open {b80}")).expect("C opens a connection");
    w.agent(c).ask(&format!("send 0 {OK_TIMEOUT_MS}")).expect("C's audited connection works in monitor");
    let before = w.dp().counters();
    w.agent(c).ask(&format!("send 0 {OK_TIMEOUT_MS}")).expect("C's audited connection works in monitor");
    let counters = w.dp().counters();
    assert!(audit_passes(&counters) > audit_passes(&before), "B passes the audited connection: {counters:?}");
    assert_eq!(counters.audit, before.audit, "one audit per connection");

    // Enforce: the cached audit no longer holds; the connection is judged again
    // and dropped, as a new one would be.
    w.set_mode(b, Mode::Enforce);
    assert!(w.agent(c).ask(&format!("send 0 {FAIL_TIMEOUT_MS}")).is_err(), "enforce cut C's audited connection");
    let mut seen = Vec::new();
    w.wait_events(&mut seen, 1, |e| e.cgroup_id == b_cg && e.verdict == abi::VERDICT_DENIED && e.peer_identity == ID_C);
    // Back to monitor: the connection (its retransmissions) is judged and
    // audited again, not passed silently by the audit its socket once carried.
    let audits = w.dp().counters().audit;
    w.set_mode(b, Mode::Monitor);
    w.agent(c).ask(&format!("send 0 {OK_TIMEOUT_MS}")).expect("monitor lets C's connection through again");
    let counters = w.dp().counters();
    assert!(counters.audit > audits, "the connection was audited again: {counters:?}");
    w.set_mode(b, Mode::Enforce);

    // A's allowed connection takes the fast path too; a rule removed in place
    // (not atomic, so no flip) reaches it once conntrack is flushed, which also
    // invalidates the verdicts cached on sockets.
    w.agent(a).ask(&format!("open {b80}")).expect("A opens a connection");
    w.agent(a).ask(&format!("send 0 {OK_TIMEOUT_MS}")).expect("A's connection works");
    let fast = w.dp().counters().fast_path;
    w.agent(a).ask(&format!("send 0 {OK_TIMEOUT_MS}")).expect("A's connection works");
    let counters = w.dp().counters();
    assert!(counters.fast_path > fast, "B's allowed socket takes the fast path: {counters:?}");
    let key = abi::PolicyKey {
        generation: g1,
        local_identity: ID_B,
        peer_identity: ID_A,
        port: HTTP,
        protocol: abi::IPPROTO_TCP,
        direction: abi::DIR_INGRESS,
    };
    w.dp().apply(&[MapOp::DeletePolicy { key }]).unwrap_or_else(|e| panic!("delete rule: {}", chain(&e)));
    w.agent(a).ask(&format!("send 0 {OK_TIMEOUT_MS}")).expect("judged by conntrack until it is flushed");
    w.dp().flush_conntrack().expect("flush");
    assert!(w.agent(a).ask(&format!("send 0 {FAIL_TIMEOUT_MS}")).is_err(), "the flush re-judged A's connection");
}

#[test]
fn removing_absent_keys_is_not_an_error() {
    let mut w = World::new();
    let g = w.dp().replace_policy(&a_to_b_rules()).expect("policy");
    let absent_cgroup = u64::from(u32::MAX) - 7;
    let absent_net: ipnet::IpNet = "198.51.100.0/24".parse().expect("net");
    let absent_rule = |generation| abi::PolicyKey {
        generation,
        local_identity: ID_C,
        peer_identity: ID_C,
        port: 9,
        protocol: abi::IPPROTO_TCP,
        direction: abi::DIR_EGRESS,
    };
    // aya 0.14 reports these as ENOENT syscall errors: all mean "already gone".
    w.dp().remove_endpoint(absent_cgroup).unwrap_or_else(|e| panic!("absent endpoint: {}", chain(&e)));
    w.dp().remove_ipcache(absent_net).unwrap_or_else(|e| panic!("absent prefix: {}", chain(&e)));
    assert_eq!(w.dp().delete_generation(g + 1).expect("absent generation"), 0);
    assert_eq!(w.dp().delete_generation_keys(g + 1, &[absent_rule(g + 1)]).expect("absent keys"), 0);
    w.dp().flush_conntrack().expect("flush");
    let ops = [
        MapOp::DeleteEndpoint { key: abi::EndpointKey { cgroup_id: absent_cgroup } },
        MapOp::DeleteIpcache { prefix: IpcachePrefix::new(absent_net) },
        MapOp::DeletePolicy { key: absent_rule(g) },
        MapOp::DeleteGeneration { generation: g + 1 },
        MapOp::DeleteGenerationKeys { generation: g + 1, keys: vec![absent_rule(g + 1)] },
    ];
    w.dp().apply(&ops).unwrap_or_else(|e| panic!("deleting absent keys: {}", chain(&e)));
    // The policy is untouched.
    assert_eq!(w.dp().read_state().expect("read").state.policy.len(), a_to_b_rules().len());
}

#[test]
fn a_new_process_adopts_the_pins_and_enforcement_never_stops_per_packet() {
    a_new_process_adopts_the_pins_and_enforcement_never_stops(EgressCheck::Packet);
}

#[test]
fn a_new_process_adopts_the_pins_and_enforcement_never_stops_at_connect() {
    a_new_process_adopts_the_pins_and_enforcement_never_stops(EgressCheck::Connect);
}

fn a_new_process_adopts_the_pins_and_enforcement_never_stops(egress: EgressCheck) {
    let mut w = World::with_egress(egress);
    w.dp().replace_policy(&a_to_b_rules()).expect("policy");
    w.manage(Mode::Enforce, Mode::Enforce);
    let (a, b, c) = (0, 1, 2);
    let b80 = w.v4(b, HTTP);
    w.agent(c).tcp_fails(b80);

    // The agent goes away: the pins keep enforcing.
    drop(w.dp.take());
    w.agent(c).tcp_fails(b80);
    w.agent(a).tcp_ok(b80);

    // A new one adopts maps and links: same policy, same generation.
    let dp = Datapath::load(&w.opts).unwrap_or_else(|e| panic!("reloading: {}", chain(&e)));
    assert!(dp.adopted());
    w.dp = Some(dp);
    let b_cg = w.cgroup_id(b);
    assert_eq!(w.dp().endpoint(b_cg).expect("read").map(|e| e.mode), Some(Mode::Enforce));
    w.agent(c).tcp_fails(b80);
    w.agent(a).tcp_ok(b80);
    // Exactly one set of links stays attached: the old pins were replaced.
    assert_eq!(link_pins(w.dp().pin_dir()), expected_links(egress));
    // Writes through the new handles reach the programs.
    w.set_mode(b, Mode::Monitor);
    w.agent(c).tcp_ok(b80);
    w.set_mode(b, Mode::Enforce);

    // A process that judges egress the other way takes over: its programs
    // replace the old ones (the other way's links are gone), enforcing throughout.
    let other = if egress == EgressCheck::Packet { EgressCheck::Connect } else { EgressCheck::Packet };
    drop(w.dp.take());
    w.opts.egress = other;
    w.dp = Some(Datapath::load(&w.opts).unwrap_or_else(|e| panic!("switching: {}", chain(&e))));
    assert_eq!(link_pins(w.dp().pin_dir()), expected_links(other));
    w.agent(c).tcp_fails(b80);
    w.agent(a).tcp_ok(b80);
    let a80 = w.v4(a, HTTP);
    w.agent(b).tcp_fails(a80);
}

/// The names of the link pins in `dir`, sorted.
fn link_pins(dir: &std::path::Path) -> Vec<String> {
    let mut links: Vec<String> = std::fs::read_dir(dir)
        .expect("pin dir")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("link_"))
        .collect();
    links.sort();
    links
}

fn expected_links(egress: EgressCheck) -> Vec<String> {
    let names: &[&str] = match egress {
        EgressCheck::Packet => &["link_egress", "link_ingress"],
        EgressCheck::Connect => {
            &["link_connect4", "link_connect6", "link_ingress", "link_sendmsg4", "link_sendmsg6", "link_sock_create"]
        }
    };
    names.iter().map(|n| (*n).to_owned()).collect()
}

#[test]
fn http_request_lines_are_judged_on_cgroup_workloads_per_packet() {
    http_request_lines_are_judged_on_cgroup_workloads(EgressCheck::Packet);
}

#[test]
fn http_request_lines_are_judged_on_cgroup_workloads_at_connect() {
    http_request_lines_are_judged_on_cgroup_workloads(EgressCheck::Connect);
}

/// B's ingress rule from A narrowed to `POST /v1/request-landing` (egress at
/// connect: the ingress program hands the connection's segments to the tail-called
/// L7 program).
fn http_request_lines_are_judged_on_cgroup_workloads(egress: EgressCheck) {
    const LANDING: &str = "POST_/v1/request-landing_HTTP/1.1~Host:_deathstar~~";
    const EXHAUST: &str = "PUT_/v1/exhaust-port_HTTP/1.1~Host:_deathstar~~";
    let mut w = World::with_egress(egress);
    let mut policy = node_policy(&w, Some(RolloutMode::Enforce), &[(ID_A, RULE_B_INGRESS_HTTP)], 0);
    for r in &mut policy.rules {
        if r.rule_id == RULE_B_INGRESS_HTTP {
            r.http = vec![HttpRule::exact("POST", "/v1/request-landing")];
        }
    }
    let mut current = MapState::default();
    apply_policy(w.dp(), &mut current, &policy);
    let (a, b) = (0, 1);
    for b80 in [w.v4(b, HTTP), w.v6(b, HTTP)] {
        w.agent(a).http(b80, OK_TIMEOUT_MS, &[LANDING]).unwrap_or_else(|e| panic!("the landing → {b80}: {e}"));
        // A request's body (a later segment) passes once its request line did.
        w.agent(a)
            .http(b80, OK_TIMEOUT_MS, &["POST_/v1/request-landing_HTTP/1.1~Content-Length:_4~~", "ship"])
            .unwrap_or_else(|e| panic!("a body → {b80}: {e}"));
        assert!(w.agent(a).http(b80, FAIL_TIMEOUT_MS, &[EXHAUST]).is_err(), "PUT /v1/exhaust-port → {b80}");
        // Keep-alive: the second request on the connection is judged too.
        assert!(w.agent(a).http(b80, FAIL_TIMEOUT_MS, &[LANDING, EXHAUST]).is_err(), "a second request");
    }
    let b_cg = w.cgroup_id(b);
    let mut seen = Vec::new();
    w.wait_events(&mut seen, 4, |e| e.cgroup_id == b_cg && e.reason == abi::REASON_HTTP);
    let ev = seen.iter().find(|e| e.reason == abi::REASON_HTTP).expect("an HTTP event");
    assert_eq!(
        (ev.verdict, ev.rule_id, ev.direction, ev.local_identity, ev.peer_identity),
        (abi::VERDICT_DENIED, RULE_B_INGRESS_HTTP, Direction::Ingress, ID_B, ID_A)
    );
    let line = ev.http.as_ref().expect("the request line");
    assert_eq!((line.method.as_str(), line.path.as_str()), ("PUT", "/v1/exhaust-port"));
}

#[test]
fn egress_judged_at_connect_tracks_no_tcp_connection_and_judges_every_arriving_segment() {
    let mut w = World::with_egress(EgressCheck::Connect);
    w.dp().replace_policy(&a_to_b_rules()).expect("policy");
    w.manage(Mode::Enforce, Mode::Enforce);
    let (a, b) = (0, 1);
    w.dp().flush_conntrack().expect("flush");

    // Allowed TCP leaves no per-connection state on either side: B's SYN and A's
    // connect() were judged, every later segment passes on a cached decision.
    let b80 = w.v4(b, HTTP);
    let before = w.dp().counters();
    w.agent(a).tcp_ok(b80);
    w.agent(a).tcp_ok(b80);
    let after = w.dp().counters();
    assert_eq!(w.dp().conntrack_len(), 0, "no TCP connection is tracked");
    assert_eq!(after.allowed - before.allowed, 4, "two connections, each allowed at A's connect and B's SYN");
    assert!(after.fast_path > before.fast_path, "{after:?}");
    let rules = w.dp().rule_use();
    assert!(rules.get(&RULE_A_EGRESS_HTTP).is_some_and(|u| u.hits >= 2), "{rules:?}");
    assert!(rules.get(&RULE_B_INGRESS_HTTP).is_some_and(|u| u.hits >= 2), "{rules:?}");

    // UDP has no handshake: each side tracks the flow.
    let b53 = w.v4(b, UDP_PORT);
    w.agent(a).udp(b53, OK_TIMEOUT_MS).expect("A → B/udp");
    assert_eq!(w.dp().conntrack_len(), 2, "UDP is tracked on both ends");

    // An open connection whose rule goes (in place, then a flush: no flip) has
    // its next arriving segment judged again and dropped, on B's side and on A's.
    w.agent(a).ask(&format!("open {b80}")).expect("A opens a connection");
    w.agent(a).ask(&format!("send 0 {OK_TIMEOUT_MS}")).expect("A's connection works");
    let g = w.dp().active_generation().expect("generation");
    for (local, peer, direction) in [(ID_B, ID_A, abi::DIR_INGRESS), (ID_A, ID_B, abi::DIR_EGRESS)] {
        let key = abi::PolicyKey {
            generation: g,
            local_identity: local,
            peer_identity: peer,
            port: HTTP,
            protocol: abi::IPPROTO_TCP,
            direction,
        };
        w.dp().apply(&[MapOp::DeletePolicy { key }]).unwrap_or_else(|e| panic!("delete rule: {}", chain(&e)));
    }
    w.dp().flush_conntrack().expect("flush");
    let denied = w.dp().counters().denied;
    assert!(w.agent(a).ask(&format!("send 0 {FAIL_TIMEOUT_MS}")).is_err(), "the revoked connection is cut");
    assert!(w.dp().counters().denied > denied);
    w.agent(a).tcp_fails(b80);
}

#[test]
fn egress_judged_at_connect_refuses_before_anything_is_sent() {
    let mut w = World::with_egress(EgressCheck::Connect);
    w.dp().replace_policy(&a_to_b_rules()).expect("policy");
    w.manage(Mode::Enforce, Mode::Enforce);
    let (a, b) = (0, 1);
    let b_cg = w.cgroup_id(b);
    let denied = w.dp().counters().denied;
    for (a80, b53, a53) in
        [(w.v4(a, HTTP), w.v4(b, UDP_PORT), w.v4(a, UDP_PORT)), (w.v6(a, HTTP), w.v6(b, UDP_PORT), w.v6(a, UDP_PORT))]
    {
        // B → A has no rule: connect() itself fails (EPERM), no SYN leaves B.
        let err = w.agent(b).tcp(a80, OK_TIMEOUT_MS).expect_err("B → A/tcp is refused");
        assert!(err.contains("not permitted"), "refused at connect, not timed out: {err}");
        // UDP, connected and sent to an address alike.
        let err = w.agent(b).ask(&format!("connected udp {a53} {OK_TIMEOUT_MS}")).expect_err("B → A/udp connect");
        assert!(err.contains("not permitted"), "{err}");
        let err = w.agent(b).udp(a53, OK_TIMEOUT_MS).expect_err("B → A/udp sendto");
        assert!(err.contains("not permitted"), "{err}");
        // A's allowed UDP to B, connected: B's replies pass on A's socket's verdict.
        w.agent(a).ask(&format!("connected udp {b53} {OK_TIMEOUT_MS}")).expect("A → B/udp, connected");
        w.agent(a).udp(b53, OK_TIMEOUT_MS).expect("A → B/udp, sendto");
    }
    assert!(w.dp().counters().denied >= denied + 6, "{:?}", w.dp().counters());
    let mut seen = Vec::new();
    w.wait_events(&mut seen, 6, |e| {
        e.cgroup_id == b_cg
            && e.direction == Direction::Egress
            && e.peer_identity == ID_A
            && e.verdict == abi::VERDICT_DENIED
    });

    // Raw IP sockets would send what no connect() judges: refused while B's
    // egress is enforced, allowed (and counted as audits) in monitor mode.
    let err = w.agent(b).ask("raw").expect_err("B may not open a raw socket in enforce mode");
    assert!(err.contains("not permitted"), "{err}");
    w.set_mode(b, Mode::Monitor);
    let audits = w.dp().counters().audit;
    w.agent(b).ask("raw").expect("a raw socket in monitor mode");
    assert!(w.dp().counters().audit > audits);
    // In monitor mode B → A passes (A in learn mode: its ingress judges nothing)
    // and is audited at connect.
    w.set_mode(a, Mode::Learn);
    let a80 = w.v4(a, HTTP);
    w.agent(b).tcp_ok(a80);
    w.wait_events(&mut seen, 1, |e| {
        e.cgroup_id == b_cg && e.direction == Direction::Egress && e.verdict == abi::VERDICT_AUDIT
    });
}

#[test]
fn verdict_events_are_rate_limited_per_cpu_and_counted() {
    let mut w = World::new();
    w.dp().replace_policy(&a_to_b_rules()).expect("policy");
    w.manage(Mode::Enforce, Mode::Enforce);
    // One event per second, no burst beyond one.
    let mut cfg = w.dp().config().expect("config");
    cfg.event_rate = 1;
    cfg.event_burst = 1;
    w.dp().set_config(cfg).expect("set config");
    let (b, c) = (1, 2);
    let b53 = w.v4(b, UDP_PORT);
    // Three datagrams well within one second: one event, two suppressed. (Even
    // if they ran on different CPUs, each CPU's bucket holds one token, so the
    // totals below still add up.)
    const SENT: u64 = 3;
    for _ in 0..SENT {
        assert!(w.agent(c).udp(b53, 100).is_err(), "C → {b53}/udp must fail");
    }
    let b_cg = w.cgroup_id(b);
    let is_c = |e: &VerdictRecord| e.cgroup_id == b_cg && e.peer_identity == ID_C;
    let mut seen = Vec::new();
    w.wait_events(&mut seen, 1, is_c);
    assert_eventually!(WAIT, || w.dp().counters().denied >= SENT, "{:?}", w.dp().counters());
    let counters = w.dp().counters();
    let reported = {
        w.dp().drain_events(&mut seen);
        seen.iter().filter(|e| is_c(e)).count() as u64
    };
    assert!(counters.events_rate_limited >= 1, "{counters:?}");
    assert_eq!(reported + counters.events_rate_limited, counters.denied, "{counters:?} {seen:#?}");
    assert_eq!(counters.events_lost, 0);
}

#[test]
fn a_new_enforced_endpoint_and_its_rules_flip_together() {
    // 20k filler rules per generation: each flip writes and deletes 40k entries.
    let mut w = World::with_policy_entries(1 << 17);
    let (a, b) = (0, 1);
    let b80 = w.v4(b, HTTP);
    // B unmanaged (everything passes), then B enforced with A → B:80 allowed.
    let without_b = node_policy(&w, None, &[], 20_000);
    let with_b = node_policy(&w, Some(RolloutMode::Enforce), &[(ID_A, RULE_B_INGRESS_HTTP)], 20_000);
    w.agent(a).tcp_ok(b80);
    let before = w.dp().counters();

    let (answer, flips) = flip_while_connecting(&mut w, a, b80, 3000, &[without_b, with_b]);
    let connections = answer.unwrap_or_else(|e| panic!("A → B during {flips} flips: {e}"));
    assert!(flips >= 4, "only {flips} flips during the connect loop");
    let counters = w.dp().counters();
    // Not one packet was dropped: B was never enforced without its rule (the
    // old generation's rules) nor judged by the rule before it was managed.
    assert_eq!(counters.denied, before.denied, "{counters:?} ({connections} connections, {flips} flips)");
    assert!(w.dp().rule_use().get(&RULE_B_INGRESS_HTTP).is_some_and(|u| u.hits > 0), "B was enforced at times");
    let mut seen = Vec::new();
    w.dp().drain_events(&mut seen);
    assert!(seen.iter().all(|e| e.verdict != abi::VERDICT_DENIED), "{seen:#?}");
    // And B is enforced now (the loop ended on whichever policy; end on B's).
    let mut current = w.dp().read_state().expect("read").state;
    let with_b = node_policy(&w, Some(RolloutMode::Enforce), &[(ID_A, RULE_B_INGRESS_HTTP)], 0);
    apply_policy(w.dp(), &mut current, &with_b);
    w.agent(2).tcp_fails(b80);
    w.agent(a).tcp_ok(b80);
}

#[test]
fn monitor_to_enforce_with_a_new_rule_never_drops_the_newly_allowed_traffic() {
    let mut w = World::with_policy_entries(1 << 17);
    let (b, c) = (1, 2);
    let b80 = w.v6(b, HTTP);
    // B monitored with no rule for C (C's connections are audited), then B
    // enforced with C → B:80 allowed.
    let monitor = node_policy(&w, Some(RolloutMode::Monitor), &[(ID_A, RULE_B_INGRESS_HTTP)], 20_000);
    let enforce = node_policy(
        &w,
        Some(RolloutMode::Enforce),
        &[(ID_A, RULE_B_INGRESS_HTTP), (ID_C, RULE_B_INGRESS_HTTP_FROM_C)],
        20_000,
    );
    let before = w.dp().counters();

    let (answer, flips) = flip_while_connecting(&mut w, c, b80, 3000, &[monitor, enforce]);
    let connections = answer.unwrap_or_else(|e| panic!("C → B during {flips} flips: {e}"));
    assert!(flips >= 4, "only {flips} flips during the connect loop");
    let counters = w.dp().counters();
    assert_eq!(counters.denied, before.denied, "{counters:?} ({connections} connections, {flips} flips)");
    assert!(counters.audit > before.audit, "C was audited under monitor: {counters:?}");
    assert!(w.dp().rule_use().get(&RULE_B_INGRESS_HTTP_FROM_C).is_some_and(|u| u.hits > 0), "C's rule was used");
    let mut seen = Vec::new();
    w.dp().drain_events(&mut seen);
    assert!(seen.iter().all(|e| e.verdict != abi::VERDICT_DENIED), "{seen:#?}");
}

/// Creates and pins an empty map the way an enforcer of the V1 layout did
/// (`BPF_MAP_CREATE`, `BPF_OBJ_PIN`): this build has no object that declares one.
fn pin_legacy_map(path: &std::path::Path, map_type: u32, key_size: u32, value_size: u32, map_flags: u32) {
    use std::os::unix::ffi::OsStrExt;
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    // The leading fields of `union bpf_attr` for each command; the kernel
    // accepts a shorter attr when the rest would be zero.
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let attr = MapCreate { map_type, key_size, value_size, max_entries: 64, map_flags };
    // SAFETY: `attr` is a valid, initialised prefix of `union bpf_attr` for the
    // duration of the call.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, &raw const attr, size_of::<MapCreate>() as libc::c_uint)
    };
    assert!(fd >= 0, "creating {}: {}", path.display(), std::io::Error::last_os_error());
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
    let pin = ObjPin { pathname: name.as_ptr() as u64, bpf_fd: fd as u32, file_flags: 0 };
    // SAFETY: as above; `name` outlives the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, &raw const pin, size_of::<ObjPin>() as libc::c_uint) };
    let err = std::io::Error::last_os_error();
    // SAFETY: our own fd; the pin keeps the map.
    unsafe { libc::close(fd as libc::c_int) };
    assert_eq!(ret, 0, "pinning {}: {err}", path.display());
}

#[test]
fn pins_of_the_single_slot_layout_are_migrated_and_stay_enforced() {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData, lpm_trie::LpmTrie};
    let mut w = World::new();
    w.dp().replace_policy(&a_to_b_rules()).expect("policy");
    let (a, b, c) = (0, 1, 2);
    let b80 = w.v4(b, HTTP);

    // An instance as an enforcer before double-buffered endpoints and ipcache
    // left it: ENDPOINTS_V1 / IPCACHE_V1 pins with single-slot values, the
    // other maps (policy, config) as they are.
    let pin_dir = w.dp().pin_dir().to_path_buf();
    drop(w.dp.take());
    for name in [abi::ENDPOINTS, abi::IPCACHE] {
        std::fs::remove_file(pin_dir.join(name)).expect("unpin");
    }
    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
    const BPF_F_NO_PREALLOC: u32 = 1;
    pin_legacy_map(&pin_dir.join("ENDPOINTS_V1"), BPF_MAP_TYPE_HASH, 8, 8, 0);
    pin_legacy_map(&pin_dir.join("IPCACHE_V1"), BPF_MAP_TYPE_LPM_TRIE, 20, 8, BPF_F_NO_PREALLOC);
    let open = |name: &str| {
        Map::from_map_data(MapData::from_pin(pin_dir.join(name)).expect("open legacy pin")).expect("legacy map")
    };
    let mut endpoints: BpfHashMap<MapData, abi::EndpointKey, [u8; 8]> =
        BpfHashMap::try_from(open("ENDPOINTS_V1")).expect("hash");
    let flags = abi::EP_INGRESS_COVERED | abi::EP_EGRESS_COVERED;
    for (i, id) in [(a, ID_A), (b, ID_B)] {
        let [i0, i1, i2, i3] = id.to_ne_bytes();
        let v1 = [i0, i1, i2, i3, abi::MODE_ENFORCE, flags, 0, 0];
        endpoints.insert(abi::EndpointKey { cgroup_id: w.cgroup_id(i) }, v1, 0).expect("legacy endpoint");
    }
    let mut ipcache: LpmTrie<MapData, [u8; 16], [u8; 8]> = LpmTrie::try_from(open("IPCACHE_V1")).expect("trie");
    for (i, id) in [ID_A, ID_B, ID_C].into_iter().enumerate() {
        let [i0, i1, i2, i3] = id.to_ne_bytes();
        let (v4, v6) = (w.net.hosts()[i].ipv4, w.net.hosts()[i].ipv6);
        for net in [format!("{v4}/32"), format!("{v6}/128")] {
            let key = bulkhead_enforcer::datapath::ipcache_key(net.parse().expect("net"));
            ipcache.insert(&key, [i0, i1, i2, i3, 0, 0, 0, 0], 0).expect("legacy prefix");
        }
    }
    drop((endpoints, ipcache));

    // The new process copies them before its programs attach and drops the old pins.
    let dp = Datapath::load(&w.opts).unwrap_or_else(|e| panic!("reloading: {}", chain(&e)));
    assert!(dp.adopted());
    w.dp = Some(dp);
    for name in ["ENDPOINTS_V1", "IPCACHE_V1"] {
        assert!(!pin_dir.join(name).exists(), "{name} is still pinned");
    }
    let want = Endpoint { identity: ID_B, mode: Mode::Enforce, ingress_covered: true, egress_covered: true };
    let b_cg = w.cgroup_id(b);
    assert_eq!(w.dp().endpoint(b_cg).expect("read"), Some(want));
    let state = w.dp().read_state().expect("read state").state;
    assert_eq!((state.endpoints.len(), state.ipcache.len()), (2, 6), "{state:?}");
    assert!(state.unsettled.is_empty(), "migrated entries are settled: {state:?}");
    w.agent(c).tcp_fails(b80);
    w.agent(a).tcp_ok(b80);
    let mut seen = Vec::new();
    w.wait_events(&mut seen, 1, |e| e.cgroup_id == b_cg && e.peer_identity == ID_C);
}

#[test]
fn a_client_socket_carries_its_own_verdict_so_only_the_server_side_is_tracked() {
    let mut w = World::with_egress(EgressCheck::Packet);
    w.dp().replace_policy(&a_to_b_rules()).expect("policy");
    w.manage(Mode::Enforce, Mode::Enforce);
    let (a, b) = (0, 1);
    w.dp().flush_conntrack().expect("flush");
    assert_eq!(w.dp().conntrack_len(), 0);

    // A's connecting socket takes the verdict of its SYN; every later packet of A's,
    // and B's replies into it, pass by that socket. B's side starts on the
    // listener (no socket of its own yet), so B's SYN-ACK needs the one entry.
    let b80 = w.v4(b, HTTP);
    w.agent(a).tcp_ok(b80);
    assert_eq!(w.dp().conntrack_len(), 1, "only the server side of a TCP connection is tracked");
    let before = w.dp().counters();
    w.agent(a).tcp_ok(b80);
    let after = w.dp().counters();
    assert_eq!(w.dp().conntrack_len(), 2, "one entry per connection");
    assert!(after.fast_path > before.fast_path, "{after:?}");

    // UDP sockets never carry verdicts: both ends are tracked.
    let b53 = w.v4(b, UDP_PORT);
    w.agent(a).udp(b53, OK_TIMEOUT_MS).expect("A → B/udp");
    assert_eq!(w.dp().conntrack_len(), 4, "UDP is tracked on both ends");
}
