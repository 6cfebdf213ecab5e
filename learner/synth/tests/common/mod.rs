//! Scenario builders shared by the synthesis tests.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::collections::BTreeMap;
use std::net::IpAddr;

use bulkhead_model::labels::NAMESPACE_KEY;
use bulkhead_model::{Edge, EdgeHttp, EdgeHttpRequest, EdgeKey, Identity, Labels, Level, Protocol, Window};
use bulkhead_synth::{ExternalObservation, IdentityInfo, Options};

pub const HOUR: i64 = 3600 * 1000;
pub const NOW: i64 = 1_800_000_000_000;

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    Labels::new(pairs.iter().copied()).expect("valid labels")
}

pub fn workload(id: u32, name: &str, pairs: &[(&str, &str)]) -> IdentityInfo {
    IdentityInfo::workload(Identity(id), name, labels(pairs))
}

pub fn edge(src: u32, dst: u32, port: u16, connections: u64) -> Edge {
    Edge {
        key: EdgeKey { src: Identity(src), dst: Identity(dst), dst_port: port, protocol: Protocol::Tcp },
        first_seen_unix_ms: NOW - 10 * HOUR,
        last_seen_unix_ms: NOW - HOUR,
        connections,
        bytes: connections * 100,
    }
}

pub fn egress_to(local: u32, addr: &str, port: u16) -> ExternalObservation {
    ExternalObservation {
        local: Identity(local),
        direction: bulkhead_model::Direction::Egress,
        addr: addr.parse::<IpAddr>().expect("ip"),
        port,
        protocol: Protocol::Tcp,
        connections: 3,
        bytes: 300,
        first_seen_unix_ms: NOW - 5 * HOUR,
        last_seen_unix_ms: NOW - 2 * HOUR,
    }
}

pub fn options(level: Level) -> Options {
    Options {
        level,
        window: Window { from_unix_ms: NOW - 24 * HOUR, to_unix_ms: NOW },
        max_widening_examples: usize::MAX,
        ..Options::default()
    }
}

/// The reference scenario of DESIGN.md §9: deathstar, tiefighter, xwing in `default`.
pub struct Reference {
    pub identities: Vec<IdentityInfo>,
    pub edges: Vec<Edge>,
}

pub const DEATHSTAR: u32 = 256;
pub const TIEFIGHTER: u32 = 257;
pub const XWING: u32 = 258;

pub fn reference() -> Reference {
    let ns = (NAMESPACE_KEY, "default");
    Reference {
        identities: vec![
            workload(DEATHSTAR, "default/deathstar", &[ns, ("org", "empire"), ("class", "deathstar")]),
            workload(TIEFIGHTER, "default/tiefighter", &[ns, ("org", "empire"), ("class", "tiefighter")]),
            workload(XWING, "default/xwing", &[ns, ("org", "alliance"), ("class", "xwing")]),
        ],
        // Learning: tiefighter lands, again and again. xwing never shows up.
        edges: vec![edge(TIEFIGHTER, DEATHSTAR, 80, 42)],
    }
}

/// HTTP facts of the edge `src` → `dst`:`port`: these (method, path, requests), seen
/// with the edge's times, and nothing opaque.
pub fn http(src: u32, dst: u32, port: u16, requests: &[(&str, &str, u64)]) -> EdgeHttp {
    let e = edge(src, dst, port, 0);
    EdgeHttp {
        key: e.key,
        requests: requests
            .iter()
            .map(|(m, p, n)| EdgeHttpRequest {
                method: (*m).into(),
                path: (*p).into(),
                requests: *n,
                first_seen_unix_ms: e.first_seen_unix_ms,
                last_seen_unix_ms: e.last_seen_unix_ms,
            })
            .collect(),
        opaque_connections: 0,
        opaque_last_seen_unix_ms: None,
        overflow_requests: 0,
        overflow_last_seen_unix_ms: None,
    }
}

/// The reference scenario's L7 facts: tiefighter only ever lands.
pub fn reference_http() -> Vec<EdgeHttp> {
    vec![http(TIEFIGHTER, DEATHSTAR, 80, &[("POST", "/v1/request-landing", 42)])]
}

/// Deterministic pseudo-random scenario (xorshift), so failures reproduce by seed.
pub struct Generated {
    pub identities: Vec<IdentityInfo>,
    pub edges: Vec<Edge>,
    pub external: Vec<ExternalObservation>,
}

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// `workloads` identities with random labels (from a small vocabulary, so selectors
/// overlap and generalization has something to do) and about `edges` random edges.
pub fn generated(seed: u64, workloads: usize, edges: usize, ports: &[u16]) -> Generated {
    let mut rng = Rng::new(seed);
    let mut seen = BTreeMap::new();
    let mut identities = Vec::new();
    let mut next_id = Identity::FIRST_ALLOCATED;
    let mut attempts = 0;
    while identities.len() < workloads && attempts < workloads * 20 {
        attempts += 1;
        let mut pairs: Vec<(String, String)> = vec![(NAMESPACE_KEY.into(), format!("ns{}", rng.below(4)))];
        pairs.push(("app".into(), format!("app{}", rng.below((workloads as u64 / 2).max(2)))));
        if rng.below(2) == 0 {
            pairs.push(("tier".into(), format!("t{}", rng.below(3))));
        }
        if rng.below(3) == 0 {
            pairs.push(("team".into(), format!("team{}", rng.below(5))));
        }
        let l = Labels::new(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))).expect("labels");
        if seen.insert(l.clone(), ()).is_some() {
            continue;
        }
        identities.push(IdentityInfo::workload(Identity(next_id), format!("w{next_id}"), l));
        next_id += 1;
    }
    let ids: Vec<u32> = identities.iter().map(|i| i.id.0).collect();
    let mut out_edges = BTreeMap::new();
    for _ in 0..edges {
        let src = ids[rng.below(ids.len() as u64) as usize];
        let dst = ids[rng.below(ids.len() as u64) as usize];
        let port = ports[rng.below(ports.len() as u64) as usize];
        let e = edge(src, dst, port, 1 + rng.below(50));
        out_edges.insert(e.key, e);
    }
    // Some infrastructure: host probes and a little external egress.
    let mut external = Vec::new();
    for (n, id) in ids.iter().enumerate().filter(|(n, _)| n % 7 == 0) {
        let e = edge(1, *id, 8080, 5);
        out_edges.insert(e.key, e);
        let e = edge(*id, 2, 443, 2);
        out_edges.insert(e.key, e);
        external.push(egress_to(*id, &format!("198.51.{}.{}", n % 3, 1 + n % 250), 443));
    }
    Generated { identities, edges: out_edges.into_values().collect(), external }
}
