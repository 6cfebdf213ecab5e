//! Root tests of the tc variant of the enforcer: workloads that are bare network
//! namespaces (the hosts of a `TestNet`), whose processes sit in cgroups the
//! enforcer does not manage. The real eBPF object judges real TCP and UDP
//! packets on the hosts' `eth0`, from inside each namespace.
//!
//! The cgroup_skb programs are attached too, at the cgroup above the workloads'
//! ones: they see every packet of these processes and must leave them alone
//! (none of their cgroups is an endpoint), so the two program types are shown to
//! share the maps without stepping on each other.
//!
//! Every namespace, cgroup and bpffs pin directory has a unique name and is
//! removed on drop, also when a test panics. Without root every test fails.
//!
//! Run: `cargo test -p bulkhead-enforcer --test tc` as root.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use aya::programs::links::{FdLink, PinnedLink};
use bulkhead_abi::enforcer as abi;
use bulkhead_enforcer::datapath::{
    Datapath, DatapathOptions, Direction, Mode, ResolvedNetns, TcAttachKind, TcError, VerdictRecord, resolve_netns,
};
use bulkhead_enforcer::render::{Capacity, diff, render_resolved};
use bulkhead_model::{
    Direction as ModelDirection, HttpRule, Identity, IpcacheEntry, NodePolicy, NodeRule, PolicyEndpoint, Protocol,
    RolloutMode, RuleKey,
};
use bulkhead_testkit::assert_eventually;
use bulkhead_testkit::cgroup::TestCgroup;
use bulkhead_testkit::error_chain as chain;
use bulkhead_testkit::netns::{Netns, TestNet};
use bulkhead_testkit::{require_root, unique_suffix};
use common::{Agent, FAIL_TIMEOUT_MS, OK_TIMEOUT_MS, Pins, SubCgroup, spawn_workload};

const WAIT: Duration = Duration::from_secs(10);

const ID_A: u32 = 2001;
const ID_B: u32 = 2002;
const ID_C: u32 = 2003;
const HTTP: u16 = 80;
const UDP_PORT: u16 = 5353;
const RULE_A_EGRESS_HTTP: u32 = 30;
const RULE_B_INGRESS_HTTP: u32 = 31;
const RULE_A_EGRESS_UDP: u32 = 32;
const RULE_B_INGRESS_UDP: u32 = 33;

#[test]
#[ignore = "workload process of the other tests, started by them with --ignored"]
fn helper_agent() {
    common::workload_main();
}

// === fixtures ===

/// Three workloads A, B, C: hosts 0, 1, 2 of a TestNet, each an agent process in
/// an unmanaged cgroup. A and B are managed as network namespaces (tc), C is
/// not managed at all. B serves TCP 80 and UDP 5353 on IPv4 and IPv6; A too
/// (for B → A).
struct World {
    // Fields drop in order: processes, cgroups, datapath, pins, then the net.
    agents: Vec<Agent>,
    cgroups: Vec<SubCgroup>,
    dp: Option<Datapath>,
    opts: DatapathOptions,
    /// A's and B's namespaces as the enforcer resolved them.
    netns: Vec<ResolvedNetns>,
    _pins: Pins,
    _parent: TestCgroup,
    net: TestNet,
}

impl World {
    fn new() -> World {
        require_root();
        let net = TestNet::new(3);
        let parent = TestCgroup::new();
        let instance = format!("test-tc-{}", unique_suffix());
        let pins = Pins { instance: instance.clone() };
        let opts = DatapathOptions {
            // Small maps: many tests run at once.
            ipcache_entries: 1024,
            policy_entries: 1024,
            conntrack_entries: 4096,
            events_bytes: 1 << 16,
            ..DatapathOptions::new(instance, parent.path())
        };
        let dp = Datapath::load(&opts).unwrap_or_else(|e| panic!("loading the datapath: {}", chain(&e)));
        let mut w = World {
            agents: Vec::new(),
            cgroups: Vec::new(),
            dp: Some(dp),
            opts,
            netns: Vec::new(),
            _pins: pins,
            _parent: parent,
            net,
        };
        for (i, name) in ["A", "B", "C"].into_iter().enumerate() {
            let cg = SubCgroup::new(w._parent.path(), &name.to_lowercase());
            w.agents.push(spawn_workload(name, &w.net.hosts()[i].netns, &cg));
            w.cgroups.push(cg);
        }
        for (agent, host) in [(1, 1), (0, 0)] {
            let h = &w.net.hosts()[host];
            for ip in [IpAddr::from(h.ipv4), IpAddr::from(h.ipv6)] {
                w.agents[agent].listen("tcp", SocketAddr::new(ip, HTTP));
                w.agents[agent].listen("udp", SocketAddr::new(ip, UDP_PORT));
            }
        }
        for i in 0..2 {
            let ns = &w.net.hosts()[i].netns;
            let resolved = resolve_netns(Some(ns.name()), Some(ns.ino()))
                .unwrap_or_else(|e| panic!("resolving {}: {}", ns.name(), chain(&e)));
            w.netns.push(resolved);
        }
        let wanted = w.netns.clone();
        let report = w.dp().sync_netns(&wanted).expect("sync");
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        w
    }

    fn dp(&mut self) -> &mut Datapath {
        self.dp.as_mut().expect("datapath loaded")
    }

    fn agent(&mut self, i: usize) -> &mut Agent {
        &mut self.agents[i]
    }

    fn key(&self, i: usize) -> u64 {
        self.netns[i].endpoint_key()
    }

    fn v4(&self, i: usize, port: u16) -> SocketAddr {
        SocketAddr::new(self.net.hosts()[i].ipv4.into(), port)
    }

    fn v6(&self, i: usize, port: u16) -> SocketAddr {
        SocketAddr::new(self.net.hosts()[i].ipv6.into(), port)
    }

    /// The node policy: every host's addresses in the ipcache, A and B managed
    /// as bare namespaces with both directions covered, A → B:80/TCP and
    /// A → B:5353/UDP allowed (as A's egress and B's ingress rule).
    fn policy(&self, mode_a: RolloutMode, mode_b: RolloutMode) -> NodePolicy {
        let mut p = NodePolicy { version: 1, ..NodePolicy::default() };
        for (i, id) in [ID_A, ID_B, ID_C].into_iter().enumerate() {
            let h = &self.net.hosts()[i];
            for net in [format!("{}/32", h.ipv4), format!("{}/128", h.ipv6)] {
                p.ipcache.push(IpcacheEntry { prefix: net.parse().expect("net"), identity: Identity(id) });
            }
        }
        for (i, (id, mode)) in [(ID_A, mode_a), (ID_B, mode_b)].into_iter().enumerate() {
            let ns = &self.net.hosts()[i].netns;
            p.endpoints.push(PolicyEndpoint {
                identity: Identity(id),
                netns_ino: Some(ns.ino()),
                netns_name: Some(ns.name().to_owned()),
                cgroups: vec![],
                mode,
                ingress_covered: true,
                egress_covered: true,
            });
        }
        let rule = |local, direction, peer, port, protocol, rule_id| NodeRule {
            key: RuleKey { local: Identity(local), direction, peer: Some(Identity(peer)), port: Some(port), protocol },
            rule_id,
            http: Vec::new(),
        };
        p.rules = vec![
            rule(ID_A, ModelDirection::Egress, ID_B, HTTP, Some(Protocol::Tcp), RULE_A_EGRESS_HTTP),
            rule(ID_B, ModelDirection::Ingress, ID_A, HTTP, Some(Protocol::Tcp), RULE_B_INGRESS_HTTP),
            rule(ID_A, ModelDirection::Egress, ID_B, UDP_PORT, Some(Protocol::Udp), RULE_A_EGRESS_UDP),
            rule(ID_B, ModelDirection::Ingress, ID_A, UDP_PORT, Some(Protocol::Udp), RULE_B_INGRESS_UDP),
        ];
        p.rules.sort();
        p
    }

    /// Renders `policy` with the resolved namespaces and applies it the way the
    /// map owner does: diff against what the kernel holds, next generation.
    fn apply(&mut self, policy: &NodePolicy) {
        let keys: BTreeMap<u64, u64> = self.netns.iter().map(|ns| (ns.ino, ns.endpoint_key())).collect();
        let current = self.dp().read_state().expect("read state").state;
        let target = render_resolved(policy, current.generation.wrapping_add(1), &Capacity::DEFAULT, &keys)
            .unwrap_or_else(|e| panic!("rendering: {e}"));
        self.dp().apply(&diff(&current, &target)).unwrap_or_else(|e| panic!("applying: {}", chain(&e)));
    }

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

    /// The `tc_` link pins of this instance, by name.
    fn tc_pins(&mut self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dp().pin_dir())
            .expect("pin dir")
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| n.starts_with("tc_"))
            .collect();
        names.sort();
        names
    }
}

/// (link id, program id) of a pinned link.
fn link_ids(pin: &Path) -> (u32, u32) {
    let link = FdLink::from(PinnedLink::from_pin(pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display())));
    let info = link.info().expect("link info");
    (info.id(), info.program_id())
}

// === tests ===

#[test]
fn enforce_allows_the_rule_and_drops_everything_else_v4_and_v6() {
    let mut w = World::new();
    w.apply(&w.policy(RolloutMode::Enforce, RolloutMode::Enforce));
    let (a, b, c) = (0, 1, 2);
    // The processes' cgroups are not endpoints: only tc can be judging them.
    for i in [a, b, c] {
        let id = w.cgroups[i].id();
        assert_eq!(w.dp().endpoint(id).expect("read"), None);
    }

    for (b80, b53, a80, a53) in [
        (w.v4(b, HTTP), w.v4(b, UDP_PORT), w.v4(a, HTTP), w.v4(a, UDP_PORT)),
        (w.v6(b, HTTP), w.v6(b, UDP_PORT), w.v6(a, HTTP), w.v6(a, UDP_PORT)),
    ] {
        // Allowed, and B's replies (B's egress is covered) pass by conntrack.
        w.agent(a).tcp_ok(b80);
        w.agent(a).udp(b53, OK_TIMEOUT_MS).unwrap_or_else(|e| panic!("A → {b53}/udp must succeed: {e}"));
        // Not allowed: C → B (B's ingress), B → A (B's egress is covered).
        w.agent(c).tcp_fails(b80);
        assert!(w.agent(c).udp(b53, FAIL_TIMEOUT_MS).is_err(), "C → {b53}/udp must fail");
        w.agent(b).tcp_fails(a80);
        assert!(w.agent(b).udp(a53, FAIL_TIMEOUT_MS).is_err(), "B → {a53}/udp must fail");
    }

    let b_key = w.key(b);
    let c_v4 = IpAddr::from(w.net.hosts()[c].ipv4);
    let is_c_to_b = |e: &VerdictRecord| {
        e.cgroup_id == b_key && e.remote.ip() == c_v4 && e.local.port() == HTTP && e.protocol == abi::IPPROTO_TCP
    };
    let mut seen = Vec::new();
    w.wait_events(&mut seen, 1, is_c_to_b);
    let ev = seen.iter().find(|e| is_c_to_b(e)).expect("C → B event");
    assert_eq!(
        (ev.verdict, ev.reason, ev.rule_id, ev.direction, ev.mode),
        (abi::VERDICT_DENIED, abi::REASON_DEFAULT_DENY, 0, Direction::Ingress, Mode::Enforce)
    );
    assert_eq!((ev.local_identity, ev.peer_identity), (ID_B, ID_C));
    assert!(abi::is_tc_endpoint_key(ev.cgroup_id), "{ev:?}");
    // B → A was stopped on B's egress (TCP and UDP, both families).
    w.wait_events(&mut seen, 4, |e| {
        e.cgroup_id == b_key && e.direction == Direction::Egress && e.peer_identity == ID_A
    });

    let counters = w.dp().counters();
    assert!(counters.denied >= 8, "{counters:?}");
    assert!(counters.allowed >= 4 && counters.ct_hits > 0, "{counters:?}");
    // The cgroup_skb programs saw the same processes and let them be.
    assert!(counters.unmanaged > 0, "{counters:?}");
    assert_eq!(counters.events_lost, 0, "{counters:?}");
    let rules = w.dp().rule_use();
    for rule in [RULE_A_EGRESS_HTTP, RULE_B_INGRESS_HTTP, RULE_A_EGRESS_UDP, RULE_B_INGRESS_UDP] {
        let used = rules.get(&rule).copied().unwrap_or_default();
        assert!(used.hits >= 2 && used.last_hit_ns > 0, "rule {rule}: {used:?} ({rules:?})");
    }
}

#[test]
fn monitor_passes_and_audits_once_per_connection_attempt() {
    let mut w = World::new();
    w.apply(&w.policy(RolloutMode::Enforce, RolloutMode::Monitor));
    let (a, b, c) = (0, 1, 2);
    let (b80, b53) = (w.v4(b, HTTP), w.v6(b, UDP_PORT));
    let b_key = w.key(b);
    let is_c_audit =
        move |e: &VerdictRecord| e.cgroup_id == b_key && e.verdict == abi::VERDICT_AUDIT && e.peer_identity == ID_C;

    const ATTEMPTS: usize = 3;
    for _ in 0..ATTEMPTS {
        w.agent(c).tcp_ok(b80);
    }
    w.agent(c).udp(b53, OK_TIMEOUT_MS).unwrap_or_else(|e| panic!("C → {b53}/udp must pass in monitor: {e}"));
    w.agent(a).tcp_ok(b80);
    let mut seen = Vec::new();
    w.wait_events(&mut seen, ATTEMPTS + 1, is_c_audit);
    // Exactly one per connection: the kernel counted as many audits as it
    // reported, each TCP one for a distinct client port, nothing lost.
    let counters = w.dp().counters();
    assert_eq!(counters.audit, ATTEMPTS as u64 + 1, "{counters:?}");
    assert_eq!((counters.events_lost, counters.events_rate_limited), (0, 0), "{counters:?}");
    let audits: Vec<&VerdictRecord> = seen.iter().filter(|e| is_c_audit(e)).collect();
    assert_eq!(audits.len(), ATTEMPTS + 1, "{audits:#?}");
    let mut ports: Vec<u16> =
        audits.iter().filter(|e| e.protocol == abi::IPPROTO_TCP).map(|e| e.remote.port()).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), ATTEMPTS, "{audits:#?}");
    assert!(audits.iter().all(|e| e.reason == abi::REASON_DEFAULT_DENY && e.mode == Mode::Monitor));
    assert!(audits.iter().any(|e| e.protocol == abi::IPPROTO_UDP && e.local.is_ipv6()), "{audits:#?}");

    // Enforce by one map update: C is dropped, A still gets through.
    w.dp().set_mode(b_key, Mode::Enforce).expect("mode");
    w.agent(c).tcp_fails(b80);
    w.agent(a).tcp_ok(b80);
    w.wait_events(&mut seen, 1, |e| {
        e.cgroup_id == b_key && e.verdict == abi::VERDICT_DENIED && e.peer_identity == ID_C
    });
}

#[test]
fn a_generation_flip_applies_to_netns_workloads() {
    let mut w = World::new();
    let policy = w.policy(RolloutMode::Learn, RolloutMode::Enforce);
    // A in learn is left out of the policy (NodePolicy lists monitor/enforce only).
    let mut p = policy.clone();
    p.endpoints.retain(|e| e.identity.0 != ID_A);
    p.rules.retain(|r| r.key.local.0 != ID_A);
    w.apply(&p);
    let (a, b, c) = (0, 1, 2);
    let b80 = w.v6(b, HTTP);
    w.agent(a).tcp_ok(b80);
    w.agent(c).tcp_fails(b80);
    // An established connection of A, allowed by this generation only.
    w.agent(a).ask(&format!("open {b80}")).expect("A opens a connection");

    // The next policy allows C instead of A.
    let mut only_c = p.clone();
    for r in &mut only_c.rules {
        if r.key.local.0 == ID_B {
            r.key.peer = Some(Identity(ID_C));
        }
    }
    only_c.rules.sort();
    w.apply(&only_c);
    w.agent(c).tcp_ok(b80);
    w.agent(a).tcp_fails(b80);
    assert!(w.agent(a).ask(&format!("send 0 {FAIL_TIMEOUT_MS}")).is_err(), "the flip revoked A's open connection");
    assert_eq!(w.dp().read_state().expect("read").stale_generations, Vec::<u32>::new());
}

#[test]
fn a_new_process_adopts_the_tc_links_and_enforcement_never_stops() {
    let mut w = World::new();
    w.apply(&w.policy(RolloutMode::Enforce, RolloutMode::Enforce));
    let (a, b, c) = (0, 1, 2);
    let b80 = w.v4(b, HTTP);
    w.agent(c).tcp_fails(b80);
    let pins_before = w.tc_pins();
    // One interface (eth0) per namespace, both directions.
    assert_eq!(pins_before.len(), 4, "{pins_before:?}");
    let pin_dir = w.dp().pin_dir().to_owned();
    let before: Vec<(u32, u32)> = pins_before.iter().map(|n| link_ids(&pin_dir.join(n))).collect();

    // A connects to B back to back the whole time the agent is replaced (a reload
    // verifies every program again: about 3 s with two tests loading at once).
    const LOOP_MS: u64 = 8000;
    let World { agents, dp, opts, netns, .. } = &mut w;
    let (a_agent, others) = agents.split_at_mut(1);
    let c_agent = &mut others[c - 1];
    let started = Instant::now();
    let looped = std::thread::scope(|s| {
        let looping = s.spawn(|| a_agent[a].ask_value(&format!("loop tcp {b80} {LOOP_MS}")));
        // The agent goes away: the pinned links keep enforcing with the old programs.
        drop(dp.take());
        c_agent.tcp_fails(b80);
        // A new one adopts the maps and swaps its programs into the same links.
        let mut fresh = Datapath::load(opts).unwrap_or_else(|e| panic!("reloading: {}", chain(&e)));
        assert!(fresh.adopted());
        let report = fresh.sync_netns(netns).expect("sync");
        assert!(report.failed.is_empty() && report.detached == 0, "{report:?}");
        *dp = Some(fresh);
        c_agent.tcp_fails(b80);
        let replaced_in = started.elapsed();
        assert!(replaced_in < Duration::from_millis(LOOP_MS), "the reload ({replaced_in:?}) outlasted the loop");
        looping.join().expect("loop thread")
    });
    let n = looped.unwrap_or_else(|e| panic!("A → B failed while the enforcer was replaced: {e}"));
    assert!(n.parse::<u64>().is_ok_and(|n| n > 10), "too few connections: {n}");

    // Same links (never detached), new programs in them.
    assert_eq!(w.tc_pins(), pins_before);
    let after: Vec<(u32, u32)> = pins_before.iter().map(|n| link_ids(&pin_dir.join(n))).collect();
    for ((link0, prog0), (link1, prog1)) in before.iter().zip(&after) {
        assert_eq!(link0, link1, "the link was replaced, not updated");
        assert_ne!(prog0, prog1, "the program was not replaced");
    }
    w.agent(c).tcp_fails(b80);
    w.agent(a).tcp_ok(b80);
    // Writes through the new handles reach the programs.
    let b_key = w.key(b);
    w.dp().set_mode(b_key, Mode::Monitor).expect("mode");
    w.agent(c).tcp_ok(b80);
}

#[test]
fn namespaces_and_interfaces_that_go_are_detached() {
    let mut w = World::new();
    w.apply(&w.policy(RolloutMode::Enforce, RolloutMode::Enforce));
    let (a, b, c) = (0, 1, 2);
    let b80 = w.v4(b, HTTP);
    w.agent(c).tcp_fails(b80);

    // B leaves the set of namespaces: its programs go, its packets pass.
    let only_a = vec![w.netns[a].clone()];
    let report = w.dp().sync_netns(&only_a).expect("sync");
    assert_eq!(report.detached, 2, "{report:?}");
    let cookies: Vec<u64> = w.dp().tc_attachments().expect("list").iter().map(|t| t.cookie).collect();
    assert_eq!(cookies, vec![w.netns[a].cookie; 2]);
    w.agent(c).tcp_ok(b80);
    let all = w.netns.clone();
    w.dp().sync_netns(&all).expect("sync");
    w.agent(c).tcp_fails(b80);

    // A new interface is attached on the next sync, and forgotten once deleted.
    let ns_a = w.net.hosts()[a].netns.name().to_owned();
    let ip = |args: &[&str]| {
        let out = std::process::Command::new("ip").args(args).output().expect("ip");
        assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    // A veth whose peer lives in C's namespace (this kernel has no dummy links).
    let ns_c = w.net.hosts()[c].netns.name().to_owned();
    ip(&["-n", &ns_a, "link", "add", "bhx0", "type", "veth", "peer", "name", "bhx1", "netns", &ns_c]);
    let refreshed = resolve_netns(Some(&ns_a), None).expect("resolve");
    assert_eq!(refreshed.interfaces.len(), 2, "{refreshed:?}");
    let attached = w.dp().attach_netns(&refreshed).expect("attach");
    assert_eq!(attached.len(), 4, "{attached:?}");
    assert!(attached.iter().all(|t| t.kind == TcAttachKind::Tcx));
    assert_eq!(w.tc_pins().len(), 6);
    ip(&["-n", &ns_a, "link", "del", "bhx0"]);
    w.dp().attach_netns(&refreshed).expect("attach");
    assert_eq!(w.tc_pins().len(), 4);
}

#[test]
fn namespaces_resolve_by_name_or_inode_and_replacements_are_refused() {
    require_root();
    let x = Netns::new("tcx");
    let y = Netns::new("tcy");
    let by_name = resolve_netns(Some(x.name()), Some(x.ino())).expect("by name");
    let by_ino = resolve_netns(None, Some(x.ino())).expect("by inode");
    let by_path = resolve_netns(Some(&x.path().display().to_string()), None).expect("by path");
    assert_eq!(by_name, by_ino);
    assert_eq!(by_name.cookie, by_path.cookie);
    assert_eq!(by_name.interfaces, vec![], "loopback is never an interface of ours");
    assert_ne!(by_name.cookie, resolve_netns(Some(y.name()), None).expect("y").cookie);
    // The name now points at another namespace than the policy's.
    assert!(matches!(resolve_netns(Some(x.name()), Some(y.ino())), Err(TcError::NetnsMismatch { .. })));
    assert!(matches!(resolve_netns(Some("bh-no-such-netns"), None), Err(TcError::NetnsOpen { .. })));
    assert!(matches!(resolve_netns(None, Some(1)), Err(TcError::NetnsNotFound { .. })));
}

#[test]
fn without_tcx_the_programs_attach_as_clsact_filters_replaced_in_place() {
    let mut w = World::new();
    w.apply(&w.policy(RolloutMode::Enforce, RolloutMode::Enforce));
    let (a, b, c) = (0, 1, 2);
    let b80 = w.v4(b, HTTP);
    let ns_b = w.net.hosts()[b].netns.name().to_owned();
    let filters = |dir: &str| {
        let out = std::process::Command::new("tc")
            .args(["-n", &ns_b, "filter", "show", "dev", "eth0", dir])
            .output()
            .expect("tc");
        assert!(out.status.success(), "tc: {}", String::from_utf8_lossy(&out.stderr));
        // One line per filter names its program (`… handle 0xb1 enforce_tc_in direct-action …`).
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("direct-action")).count()
    };
    assert_eq!((filters("ingress"), filters("egress")), (0, 0), "TCX links are not clsact filters");

    // B moves to netlink: its TCX links go, clsact filters take over.
    let ns = w.netns[b].clone();
    for round in 0..2 {
        let attached = w.dp().attach_netns_with(&ns, TcAttachKind::Netlink).expect("netlink attach");
        assert_eq!(attached.len(), 2, "{attached:?}");
        assert!(attached.iter().all(|t| t.kind == TcAttachKind::Netlink), "{attached:?}");
        let mine: Vec<TcAttachKind> =
            w.dp().tc_attachments().expect("list").iter().filter(|t| t.cookie == ns.cookie).map(|t| t.kind).collect();
        assert_eq!(mine, vec![TcAttachKind::Netlink; 2]);
        // The second round replaced the filters in place: still one per direction.
        assert_eq!((filters("ingress"), filters("egress")), (1, 1), "round {round}");
        w.agent(c).tcp_fails(b80);
        w.agent(a).tcp_ok(b80);
        let a80 = w.v4(a, HTTP);
        w.agent(b).tcp_fails(a80);
    }

    // Back to TCX: the links come back and the filters go (no double judging).
    let attached = w.dp().attach_netns(&ns).expect("tcx attach");
    assert!(attached.iter().all(|t| t.kind == TcAttachKind::Tcx), "{attached:?}");
    assert_eq!((filters("ingress"), filters("egress")), (0, 0));
    w.agent(c).tcp_fails(b80);
    w.agent(a).tcp_ok(b80);

    // Detaching with the namespace at hand removes netlink filters themselves.
    w.dp().attach_netns_with(&ns, TcAttachKind::Netlink).expect("netlink attach");
    assert_eq!((filters("ingress"), filters("egress")), (1, 1));
    assert_eq!(w.dp().detach_netns(ns.cookie, Some(&ns)).expect("detach"), 2);
    assert_eq!((filters("ingress"), filters("egress")), (0, 0));
    w.agent(c).tcp_ok(b80);
}

// === L7: HTTP request lines ===

const LANDING: &str = "POST_/v1/request-landing_HTTP/1.1~Host:_deathstar~~";
const EXHAUST: &str = "PUT_/v1/exhaust-port_HTTP/1.1~Host:_deathstar~~";

/// `policy` with B's ingress rule from A narrowed to `POST /v1/request-landing` and
/// `GET /status/…` (A's egress rule stays L4, as the compiler makes it).
fn l7_policy(w: &World, mode_b: RolloutMode) -> NodePolicy {
    let mut p = w.policy(RolloutMode::Enforce, mode_b);
    for r in &mut p.rules {
        if r.rule_id == RULE_B_INGRESS_HTTP {
            r.http = vec![HttpRule::exact("POST", "/v1/request-landing"), HttpRule::prefix("GET", "/status/")];
        }
    }
    p
}

#[test]
fn enforce_judges_each_http_request_line_against_the_rule() {
    let mut w = World::new();
    w.apply(&l7_policy(&w, RolloutMode::Enforce));
    let (a, b, c) = (0, 1, 2);
    let fail = |r: Result<(), String>, what: &str| assert!(r.is_err(), "{what} must be dropped");
    for b80 in [w.v4(b, HTTP), w.v6(b, HTTP)] {
        let ok = |w: &mut World, segs: &[&str], what: &str| {
            w.agent(a).http(b80, OK_TIMEOUT_MS, segs).unwrap_or_else(|e| panic!("{what} → {b80} must pass: {e}"))
        };
        ok(&mut w, &[LANDING], "POST /v1/request-landing");
        ok(&mut w, &["POST_/v1/request-landing?fuel=full_HTTP/1.1~~"], "a query string is not part of the path");
        ok(&mut w, &["GET_/status/shields_HTTP/1.1~~"], "a path under the prefix");
        // A request's body (later segments) passes once its request line did.
        ok(&mut w, &["POST_/v1/request-landing_HTTP/1.1~Content-Length:_4~~", "ship"], "a body");
        fail(w.agent(a).http(b80, FAIL_TIMEOUT_MS, &[EXHAUST]), "PUT /v1/exhaust-port");
        fail(w.agent(a).http(b80, FAIL_TIMEOUT_MS, &["POST_/v1/request-landing-now_HTTP/1.1~~"]), "a longer path");
        fail(w.agent(a).http(b80, FAIL_TIMEOUT_MS, &["GET_/v1/request-landing_HTTP/1.1~~"]), "another method");
        fail(w.agent(a).http(b80, FAIL_TIMEOUT_MS, &["GET_/statusx_HTTP/1.1~~"]), "outside the prefix");
        // A first request line split across segments is judged, not waved through.
        fail(w.agent(a).http(b80, FAIL_TIMEOUT_MS, &["PUT", "_/v1/exhaust-port_HTTP/1.1~~"]), "a split PUT");
        // Keep-alive: the second request on the connection is judged too.
        fail(w.agent(a).http(b80, FAIL_TIMEOUT_MS, &[LANDING, EXHAUST]), "a second request (PUT)");
        // Not allowed at L4 at all.
        fail(w.agent(c).http(b80, FAIL_TIMEOUT_MS, &[LANDING]), "C's landing");
    }
    let b_key = w.key(b);
    let mut seen = Vec::new();
    let is_http = |e: &VerdictRecord| e.cgroup_id == b_key && e.reason == abi::REASON_HTTP;
    w.wait_events(&mut seen, 12, is_http);
    let ev = seen.iter().find(|e| e.reason == abi::REASON_HTTP).expect("an HTTP event");
    assert_eq!(
        (ev.verdict, ev.rule_id, ev.direction, ev.mode, ev.local_identity, ev.peer_identity),
        (abi::VERDICT_DENIED, RULE_B_INGRESS_HTTP, Direction::Ingress, Mode::Enforce, ID_B, ID_A)
    );
    // Each refused request is named by what the kernel read of it, per family: the
    // split PUT's first segment is no request line (no method, nothing read).
    let mut lines: Vec<String> = seen
        .iter()
        .filter(|e| is_http(e))
        .map(|e| {
            let l = e.http.as_ref().unwrap_or_else(|| panic!("an HTTP event carries its request line: {e:?}"));
            format!("{} {}{}", l.method, l.path, if l.truncated { "…" } else { "" })
        })
        .collect();
    lines.sort();
    let mut expected = [
        "PUT /v1/exhaust-port",
        "POST /v1/request-landing-now",
        "GET /v1/request-landing",
        "GET /statusx",
        " …",
        "PUT /v1/exhaust-port",
    ]
    .repeat(2);
    expected.sort();
    assert_eq!(lines, expected, "one event per refused request, v4 and v6");
    // The connection itself was allowed: replies of allowed requests came back by
    // conntrack and the L4 rule counted its hits.
    let used = w.dp().rule_use().get(&RULE_B_INGRESS_HTTP).copied().unwrap_or_default();
    assert!(used.hits >= 8, "{used:?}");
}

#[test]
fn monitor_reports_would_be_denied_requests_and_drops_nothing() {
    let mut w = World::new();
    w.apply(&l7_policy(&w, RolloutMode::Monitor));
    let (a, b) = (0, 1);
    let b80 = w.v4(b, HTTP);
    w.agent(a).http(b80, OK_TIMEOUT_MS, &[EXHAUST]).unwrap_or_else(|e| panic!("monitor drops nothing: {e}"));
    w.agent(a).http(b80, OK_TIMEOUT_MS, &[LANDING]).unwrap_or_else(|e| panic!("landing: {e}"));
    let b_key = w.key(b);
    let is_http_audit = move |e: &VerdictRecord| {
        e.cgroup_id == b_key && e.reason == abi::REASON_HTTP && e.verdict == abi::VERDICT_AUDIT
    };
    let is_http_denied = move |e: &VerdictRecord| {
        e.cgroup_id == b_key && e.reason == abi::REASON_HTTP && e.verdict == abi::VERDICT_DENIED
    };
    let mut seen = Vec::new();
    w.wait_events(&mut seen, 1, is_http_audit);
    // Exactly the PUT: one request, one event.
    assert_eq!(seen.iter().filter(|e| is_http_audit(e)).count(), 1, "{seen:#?}");
    let line =
        seen.iter().find(|e| is_http_audit(e)).and_then(|e| e.http.clone()).expect("the audit names the request");
    assert_eq!((line.method.as_str(), line.path.as_str(), line.truncated), ("PUT", "/v1/exhaust-port", false));
    // Promote by one map update: the same request is dropped now, landing passes.
    w.dp().set_mode(b_key, Mode::Enforce).expect("mode");
    let denied_before = w.dp().counters().denied;
    // Long enough for TCP to retransmit the refused segment (200 ms, 400 ms, …).
    assert!(w.agent(a).http(b80, 1500, &[EXHAUST]).is_err(), "PUT must be dropped in enforce");
    assert_eventually!(
        WAIT,
        || w.dp().counters().denied >= denied_before + 3,
        "the PUT and at least two retransmissions of it dropped: {:?}",
        w.dp().counters()
    );
    w.agent(a).http(b80, OK_TIMEOUT_MS, &[LANDING]).unwrap_or_else(|e| panic!("landing in enforce: {e}"));
    // One refused request, one event, however often TCP sent it.
    w.dp().drain_events(&mut seen);
    let denied: Vec<_> = seen.iter().filter(|e| is_http_denied(e)).collect();
    assert_eq!(denied.len(), 1, "{denied:#?}");
    let line = denied[0].http.clone().expect("the denial names the request");
    assert_eq!((line.method.as_str(), line.path.as_str()), ("PUT", "/v1/exhaust-port"));
}
