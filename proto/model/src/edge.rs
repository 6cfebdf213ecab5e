//! Service-graph edges: who talks to whom on which port, between identities.

use serde::{Deserialize, Serialize};

use crate::{Identity, Protocol};

/// The edge tuple the graph is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EdgeKey {
    pub src: Identity,
    pub dst: Identity,
    pub dst_port: u16,
    pub protocol: Protocol,
}

/// An edge with what is known about its use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edge {
    #[serde(flatten)]
    pub key: EdgeKey,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
    pub connections: u64,
    pub bytes: u64,
}

impl Edge {
    /// Folds another observation of the same edge in.
    pub fn absorb(&mut self, first_seen_unix_ms: i64, last_seen_unix_ms: i64, connections: u64, bytes: u64) {
        self.first_seen_unix_ms = self.first_seen_unix_ms.min(first_seen_unix_ms);
        self.last_seen_unix_ms = self.last_seen_unix_ms.max(last_seen_unix_ms);
        self.connections = self.connections.saturating_add(connections);
        self.bytes = self.bytes.saturating_add(bytes);
    }
}
