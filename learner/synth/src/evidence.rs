//! Accumulating evidence: which edges and addresses back a rule, and how much traffic.

use std::net::IpAddr;

use bulkhead_model::{EdgeKey, Evidence, Identity};

/// Evidence under construction. Plain vectors, sorted and deduplicated once in
/// [`Agg::finish`]: evidence is merged several times on its way into a rule, and tree
/// sets made that the biggest cost of synthesis (measured).
#[derive(Debug, Clone, Default)]
pub struct Agg {
    pub edges: Vec<EdgeKey>,
    pub peers: Vec<Identity>,
    pub addresses: Vec<IpAddr>,
    pub connections: u64,
    pub bytes: u64,
    pub first_seen_unix_ms: Option<i64>,
    pub last_seen_unix_ms: Option<i64>,
}

impl Agg {
    pub fn add(&mut self, connections: u64, bytes: u64, first: i64, last: i64) {
        self.connections = self.connections.saturating_add(connections);
        self.bytes = self.bytes.saturating_add(bytes);
        self.first_seen_unix_ms = Some(self.first_seen_unix_ms.map_or(first, |f| f.min(first)));
        self.last_seen_unix_ms = Some(self.last_seen_unix_ms.map_or(last, |l| l.max(last)));
    }

    pub fn merge(&mut self, other: &Agg) {
        self.edges.extend_from_slice(&other.edges);
        self.peers.extend_from_slice(&other.peers);
        self.addresses.extend_from_slice(&other.addresses);
        self.connections = self.connections.saturating_add(other.connections);
        self.bytes = self.bytes.saturating_add(other.bytes);
        if let (Some(f), Some(l)) = (other.first_seen_unix_ms, other.last_seen_unix_ms) {
            self.add(0, 0, f, l);
        }
    }

    pub fn finish(mut self) -> Evidence {
        self.edges.sort_unstable();
        self.edges.dedup();
        self.peers.sort_unstable();
        self.peers.dedup();
        self.addresses.sort_unstable();
        self.addresses.dedup();
        Evidence {
            edges: self.edges,
            peers: self.peers,
            addresses: self.addresses,
            connections: self.connections,
            bytes: self.bytes,
            first_seen_unix_ms: self.first_seen_unix_ms.unwrap_or(0),
            last_seen_unix_ms: self.last_seen_unix_ms.unwrap_or(0),
            http: Vec::new(),
        }
    }
}
