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

/// Most distinct (method, path) pairs the learner keeps per edge. Beyond it, requests
/// of new pairs are only counted ([`EdgeHttp::overflow_requests`]): the path set is
/// then known to be incomplete, and synthesis does not narrow the edge to HTTP rules.
pub const MAX_HTTP_PATHS_PER_EDGE: usize = 200;

/// Requests of one method and path on an edge.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EdgeHttpRequest {
    pub method: String,
    pub path: String,
    pub requests: u64,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
}

/// What an edge carried at L7, as the learner keeps it: the HTTP requests its server
/// side received, and what says the list is not the whole story.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeHttp {
    pub key: EdgeKey,
    /// Sorted by (method, path); at most [`MAX_HTTP_PATHS_PER_EDGE`].
    pub requests: Vec<EdgeHttpRequest>,
    /// Connections that carried payload but no HTTP request line (TLS, other protocols).
    pub opaque_connections: u64,
    /// When the last of those closed.
    pub opaque_last_seen_unix_ms: Option<i64>,
    /// Requests whose (method, path) was not kept (collector or learner bound).
    pub overflow_requests: u64,
    pub overflow_last_seen_unix_ms: Option<i64>,
}
