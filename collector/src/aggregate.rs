//! Aggregation of socket events into flows over one flush interval.
//!
//! Pure and synchronous so it can be tested without a kernel. Every connection becomes
//! one count on a flow keyed by who talked to whom on which server port. The
//! initiator's port is always folded to 0: it identifies a connection, not a service,
//! policy (NetworkPolicy, Cilium) only ever names destination ports, and keeping it
//! would make the learner store one row per connection. Folding by "is it in the
//! ephemeral range" would not do: that range is a per-namespace sysctl that workloads
//! may change.
//!
//! Byte counters arrive later than the connection (TCP close, UDP traffic updates), so
//! the aggregator remembers which flow each open socket pair belongs to across flush
//! intervals. That table is bounded: past the bound the oldest entries are forgotten and
//! their late counters are attributed by port heuristics instead (counted in
//! [`AggregatorStats::unattributed`]).
//!
//! HTTP: request lines ([`HttpRequest`]) are counted per (method, path) on the flow of
//! their connection, found by the same socket-pair table. That table also remembers
//! whether a connection carried a request line: an accepted TCP connection that closes
//! having received payload but no request line is *opaque* (TLS, another protocol)
//! and counted as such on its flow, so the learner never narrows that edge to HTTP.
//! Feed each drain's requests before its socket events: a request can be copied
//! before the Accept of its connection is (the handshake's last ACK may carry it),
//! and must be known before the Close is.

use std::collections::VecDeque;
use std::collections::hash_map::Entry;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;

use bulkhead_model::{Direction, Flow, FlowHttp, HttpRequestCount, MAX_HTTP_PER_FLOW, Protocol, Verdict};

use rustc_hash::FxHashMap as HashMap;

use crate::event::{Comm, HttpMethod, HttpRequest, SockEvent, SockEventKind};

/// What `tcp_sock.bytes_received` holds for an accepted connection that received no
/// payload: it counts sequence space, and a received FIN takes one.
const NO_PAYLOAD_BYTES: u64 = 1;

/// Limits of the aggregator.
#[derive(Debug, Clone)]
pub struct AggregatorConfig {
    /// Local ports the kernel usually hands out for outgoing connections
    /// (`/proc/sys/net/ipv4/ip_local_port_range`); only used to guess which side
    /// started a connection whose start was not seen.
    pub ephemeral_ports: RangeInclusive<u16>,
    /// Most distinct flows kept in one interval; events beyond are dropped and counted.
    pub max_flows: usize,
    /// Most open socket pairs remembered for attributing late byte counters.
    pub max_open: usize,
    /// Most (method, path) entries itemized in one interval over all flows (each flow
    /// itemizes at most [`MAX_HTTP_PER_FLOW`]); requests beyond either bound are
    /// counted as their flow's `overflow_requests`.
    pub max_http_entries: usize,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        Self { ephemeral_ports: 32768..=60999, max_flows: 200_000, max_open: 500_000, max_http_entries: 100_000 }
    }
}

/// Counters the collector exports as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AggregatorStats {
    /// Events dropped because `max_flows` was reached (loss: reported to the learner).
    pub queue_dropped: u64,
    /// Late counters whose connection had been forgotten; attributed by heuristics.
    pub unattributed: u64,
    /// HTTP requests counted only as overflow (a flow or the interval was full).
    pub http_overflow: u64,
    /// Accepted connections that closed opaque (payload, no request line).
    pub opaque_connections: u64,
}

/// What identifies one aggregated flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    protocol: Protocol,
    direction: Direction,
    src_addr: IpAddr,
    src_port: u16,
    dst_addr: IpAddr,
    dst_port: u16,
    netns_ino: u64,
    cgroup_id: u64,
    comm: Comm,
}

#[derive(Debug, Clone)]
struct FlowValue {
    pid: u32,
    connections: u64,
    bytes_sent: u64,
    bytes_received: u64,
    packets: u64,
    first_seen_unix_ms: i64,
    last_seen_unix_ms: i64,
    /// Boxed: most flows never carry HTTP.
    http: Option<Box<HttpValue>>,
}

#[derive(Debug, Clone, Default)]
struct HttpValue {
    requests: HashMap<(HttpMethod, Box<str>), u64>,
    overflow: u64,
    opaque: u64,
}

/// A socket pair within one network namespace.
type OpenKey = (Protocol, u64, SocketAddr, SocketAddr);

/// What is remembered about an open connection.
#[derive(Debug, Clone, Copy)]
struct OpenConn {
    key: FlowKey,
    /// A request line was seen on it.
    http: bool,
    /// Created by a request line before the connection's Accept: the Accept keeps
    /// `http` (any other entry it replaces is a stale one whose Close was lost).
    early: bool,
}

/// Folds [`SockEvent`]s and [`HttpRequest`]s into [`Flow`]s.
#[derive(Debug)]
pub struct Aggregator {
    config: AggregatorConfig,
    flows: HashMap<FlowKey, FlowValue>,
    open: HashMap<OpenKey, OpenConn>,
    open_order: VecDeque<OpenKey>,
    /// (method, path) entries itemized in the current interval.
    http_entries: usize,
    stats: AggregatorStats,
}

impl Aggregator {
    pub fn new(config: AggregatorConfig) -> Self {
        Self {
            config,
            flows: HashMap::default(),
            open: HashMap::default(),
            open_order: VecDeque::new(),
            http_entries: 0,
            stats: Default::default(),
        }
    }

    pub fn stats(&self) -> AggregatorStats {
        self.stats
    }

    /// Number of distinct flows in the current interval.
    pub fn pending(&self) -> usize {
        self.flows.len()
    }

    /// Folds one event in.
    pub fn record(&mut self, ev: &SockEvent) {
        let open_key: OpenKey = (ev.protocol, ev.netns_ino, ev.local, ev.remote);
        match ev.kind {
            SockEventKind::Connect | SockEventKind::SeedEgress => {
                let key = self.key_for(ev, Direction::Egress);
                self.remember(open_key, key, false);
                self.add(key, ev, 1);
            }
            SockEventKind::Accept | SockEventKind::SeedIngress => {
                let key = self.key_for(ev, Direction::Ingress);
                self.remember(open_key, key, false);
                self.add(key, ev, 1);
            }
            // The attempt was counted at Connect; success adds nothing to the flow.
            SockEventKind::Established => {}
            SockEventKind::Traffic | SockEventKind::Close => {
                let (key, http) = match self.open.get(&open_key) {
                    Some(c) => (c.key, Some(c.http)),
                    None => {
                        self.stats.unattributed += 1;
                        let key = self.key_for(ev, self.guess_direction(ev));
                        if ev.kind == SockEventKind::Traffic {
                            self.remember(open_key, key, false);
                        }
                        (key, None)
                    }
                };
                self.add(key, ev, 0);
                if ev.kind == SockEventKind::Close {
                    self.open.remove(&open_key);
                    // Opaque only when we know: the connection was tracked (its
                    // requests would have been seen) and it received payload.
                    let opaque = ev.protocol == Protocol::Tcp
                        && key.direction == Direction::Ingress
                        && http == Some(false)
                        && ev.bytes_received > NO_PAYLOAD_BYTES;
                    if opaque && let Some(v) = self.flows.get_mut(&key) {
                        v.http.get_or_insert_default().opaque += 1;
                        self.stats.opaque_connections += 1;
                    }
                }
            }
        }
    }

    /// Counts one HTTP request on the flow of its connection.
    pub fn record_http(&mut self, r: &HttpRequest) {
        let open_key: OpenKey = (Protocol::Tcp, r.netns_ino, r.local, r.remote);
        let key = match self.open.get_mut(&open_key) {
            Some(c) => {
                c.http = true;
                c.key
            }
            None => {
                // Before its Accept (or the connection predates us): the key the
                // Accept will have — the socket's cgroup, no comm in softirq.
                let key = FlowKey {
                    protocol: Protocol::Tcp,
                    direction: Direction::Ingress,
                    src_addr: canonical_ip(r.remote.ip()),
                    src_port: 0,
                    dst_addr: canonical_ip(r.local.ip()),
                    dst_port: r.local.port(),
                    netns_ino: r.netns_ino,
                    cgroup_id: r.cgroup_id,
                    comm: Comm::default(),
                };
                self.remember(open_key, key, true);
                key
            }
        };
        let room = self.http_entries < self.config.max_http_entries;
        let Some(v) = self.value(key, r.unix_ms) else { return };
        v.last_seen_unix_ms = v.last_seen_unix_ms.max(r.unix_ms);
        v.first_seen_unix_ms = v.first_seen_unix_ms.min(r.unix_ms);
        let h = v.http.get_or_insert_default();
        let k = (r.method, r.path.clone());
        if let Some(n) = h.requests.get_mut(&k) {
            *n += 1;
        } else if room && h.requests.len() < MAX_HTTP_PER_FLOW {
            h.requests.insert(k, 1);
            self.http_entries += 1;
        } else {
            h.overflow += 1;
            self.stats.http_overflow += 1;
        }
    }

    /// Takes the flows of the interval that just ended, sorted for deterministic output.
    pub fn flush(&mut self) -> Vec<Flow> {
        self.http_entries = 0;
        let mut out: Vec<Flow> = self
            .flows
            .drain()
            .map(|(k, v)| Flow {
                src_addr: k.src_addr,
                src_port: k.src_port,
                dst_addr: k.dst_addr,
                dst_port: k.dst_port,
                protocol: k.protocol,
                direction: k.direction,
                netns_ino: k.netns_ino,
                cgroup_id: k.cgroup_id,
                pid: v.pid,
                comm: k.comm.to_string(),
                connections: v.connections,
                bytes_sent: v.bytes_sent,
                bytes_received: v.bytes_received,
                packets: v.packets,
                verdict: Verdict::Forwarded,
                first_seen_unix_ms: v.first_seen_unix_ms,
                last_seen_unix_ms: v.last_seen_unix_ms,
                http: v.http.map(|h| flow_http(*h)).unwrap_or_default(),
            })
            .collect();
        out.sort_by(|a, b| {
            (a.netns_ino, a.direction, a.src_addr, a.dst_addr, a.dst_port, a.protocol, &a.comm).cmp(&(
                b.netns_ino,
                b.direction,
                b.src_addr,
                b.dst_addr,
                b.dst_port,
                b.protocol,
                &b.comm,
            ))
        });
        out
    }

    fn key_for(&self, ev: &SockEvent, direction: Direction) -> FlowKey {
        let (src, dst) = match direction {
            Direction::Egress => (ev.local, ev.remote),
            Direction::Ingress => (ev.remote, ev.local),
        };
        FlowKey {
            protocol: ev.protocol,
            direction,
            src_addr: canonical_ip(src.ip()),
            src_port: 0,
            dst_addr: canonical_ip(dst.ip()),
            dst_port: dst.port(),
            netns_ino: ev.netns_ino,
            // Accept-side events run in softirq context, so they carry no pid or comm;
            // their cgroup is the accepted socket's, inherited from the listener.
            cgroup_id: ev.cgroup_id,
            comm: ev.comm,
        }
    }

    /// For counters whose connection was not seen: the side on an ephemeral port is the
    /// client; otherwise the lower port is the service.
    fn guess_direction(&self, ev: &SockEvent) -> Direction {
        let local_eph = self.config.ephemeral_ports.contains(&ev.local.port());
        let remote_eph = self.config.ephemeral_ports.contains(&ev.remote.port());
        match (local_eph, remote_eph) {
            (true, false) => Direction::Egress,
            (false, true) => Direction::Ingress,
            _ if ev.local.port() > ev.remote.port() => Direction::Egress,
            _ => Direction::Ingress,
        }
    }

    fn remember(&mut self, open_key: OpenKey, key: FlowKey, from_http: bool) {
        match self.open.entry(open_key) {
            Entry::Occupied(mut o) => {
                let c = o.get_mut();
                c.http = c.early && c.http;
                c.early = false;
                c.key = key;
            }
            Entry::Vacant(v) => {
                v.insert(OpenConn { key, http: from_http, early: from_http });
                self.open_order.push_back(open_key);
            }
        }
        while self.open.len() > self.config.max_open {
            match self.open_order.pop_front() {
                Some(old) => {
                    self.open.remove(&old);
                }
                None => break,
            }
        }
        // Closed entries leave stale keys in the order queue; compact when it doubles.
        if self.open_order.len() > 2 * self.config.max_open.max(1024) {
            let open = &self.open;
            self.open_order.retain(|k| open.contains_key(k));
        }
    }

    fn add(&mut self, key: FlowKey, ev: &SockEvent, connections: u64) {
        if let Some(v) = self.value(key, ev.unix_ms) {
            absorb(v, ev, connections);
        }
    }

    /// The flow's value in this interval, created if there is room (else the event
    /// is dropped and counted).
    fn value(&mut self, key: FlowKey, unix_ms: i64) -> Option<&mut FlowValue> {
        let len = self.flows.len();
        match self.flows.entry(key) {
            Entry::Occupied(o) => Some(o.into_mut()),
            Entry::Vacant(_) if len >= self.config.max_flows => {
                self.stats.queue_dropped += 1;
                None
            }
            Entry::Vacant(v) => Some(v.insert(FlowValue {
                pid: 0,
                connections: 0,
                bytes_sent: 0,
                bytes_received: 0,
                packets: 0,
                first_seen_unix_ms: unix_ms,
                last_seen_unix_ms: unix_ms,
                http: None,
            })),
        }
    }
}

/// A flow's HTTP view as reported: entries sorted by method and path.
fn flow_http(h: HttpValue) -> FlowHttp {
    let mut requests: Vec<HttpRequestCount> = h
        .requests
        .into_iter()
        .map(|((method, path), requests)| HttpRequestCount {
            method: method.as_str().to_owned(),
            path: path.into(),
            requests,
        })
        .collect();
    requests.sort();
    FlowHttp { requests, overflow_requests: h.overflow, opaque_connections: h.opaque }
}

fn absorb(v: &mut FlowValue, ev: &SockEvent, connections: u64) {
    if ev.pid != 0 {
        v.pid = ev.pid;
    }
    v.connections += connections;
    v.bytes_sent = v.bytes_sent.saturating_add(ev.bytes_sent);
    v.bytes_received = v.bytes_received.saturating_add(ev.bytes_received);
    v.packets = v.packets.saturating_add(ev.packets);
    v.first_seen_unix_ms = v.first_seen_unix_ms.min(ev.unix_ms);
    v.last_seen_unix_ms = v.last_seen_unix_ms.max(ev.unix_ms);
}

/// IPv4-mapped IPv6 addresses (dual-stack sockets) are reported as IPv4 so one
/// workload has one address family per peer.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests;
