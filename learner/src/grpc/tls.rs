//! The agents' side of the learner over mTLS: the listener that completes TLS
//! handshakes (and logs the ones it refuses, with the peer's address), and the check
//! that an agent speaks only for the node its certificate names.
//!
//! Handshakes run here rather than in tonic's own TLS acceptor because tonic logs a
//! refused handshake at DEBUG without the peer; an operator looking for "why is this
//! node not connecting" must find it in the learner's log. Connections still reach
//! tonic as `tokio_rustls::server::TlsStream`s, so requests carry the verified client
//! certificate (`Request::peer_certs`).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_proto::tls::node_identity;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Status};

/// A handshake that has not finished by then is dropped (a stalled or slow-loris peer
/// must not hold a slot for long).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; beyond that, connections wait in the kernel's
/// accept queue.
const MAX_HANDSHAKES: usize = 512;

/// Accepts connections on `listener` and yields those whose TLS handshake (client
/// certificate required and verified by `config`) succeeded. Handshakes run
/// concurrently, each bounded by [`HANDSHAKE_TIMEOUT`]; every refusal is logged with
/// the peer address. The accept task ends when the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> impl Stream<Item = io::Result<TlsStream<TcpStream>>> + Send + 'static {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), tx));
    ReceiverStream::new(rx).map(Ok)
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, tx: mpsc::Sender<TlsStream<TcpStream>>) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let slot = tokio::select! {
            _ = tx.closed() => return,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => return, // never closed
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = tx.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    // Out of file descriptors and the like: the condition outlasts a
                    // retry loop, so pause instead of spinning.
                    tracing::warn!(error = %err, "Accepting a gRPC connection failed.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = tx.send(tls).await;
                }
                Ok(Err(err)) => log_refusal(peer, &err),
                Err(_) => tracing::warn!(
                    peer = %peer,
                    timeout_s = HANDSHAKE_TIMEOUT.as_secs(),
                    "Refused a gRPC connection: the TLS handshake did not finish in time."
                ),
            }
        });
    }
}

/// A peer that closes before saying anything (a TCP health probe, a port scan) is
/// not news; everything else — no client certificate, one from another CA, an expired
/// one, plaintext spoken to a TLS port — is.
fn log_refusal(peer: SocketAddr, err: &io::Error) {
    if err.kind() == io::ErrorKind::UnexpectedEof {
        tracing::debug!(peer = %peer, error = %err, "A gRPC connection closed before its TLS handshake.");
    } else {
        tracing::warn!(peer = %peer, error = %err, "Refused a gRPC connection: TLS handshake failed.");
    }
}

// === who is on the other end ===

/// How a stream's peer is authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAuth {
    /// A plaintext connection: the learner serves without TLS (`--insecure-grpc`, or
    /// an in-process test), so an agent is whichever node it says.
    Plaintext,
    /// A verified client certificate that names this node.
    Node(String),
    /// A TLS connection whose certificate names no node (why).
    Unidentified(String),
}

/// The other end of an agent stream.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    pub auth: PeerAuth,
}

impl Peer {
    /// Reads the connection's address and verified certificate from `request`.
    pub fn of<T>(request: &Request<T>) -> Self {
        let auth = match request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>() {
            None => PeerAuth::Plaintext,
            Some(info) => match info.peer_certs().as_deref().and_then(|certs| certs.first()) {
                // rustls requires a certificate, so this is not expected; refuse anyway.
                None => PeerAuth::Unidentified("no client certificate".to_owned()),
                Some(leaf) => match node_identity(leaf) {
                    Ok(node) => PeerAuth::Node(node),
                    Err(err) => PeerAuth::Unidentified(err.to_string()),
                },
            },
        };
        Peer { addr: request.remote_addr(), auth }
    }

    /// Admits a stream that claims to be `claimed` (the node in its Hello; every later
    /// message of the stream is bound to that). On refusal, logs who claimed what.
    pub fn authorize(&self, claimed: &str, stream: &'static str) -> Result<(), Status> {
        let peer = self.addr.map(|a| a.to_string()).unwrap_or_else(|| "unknown".to_owned());
        match &self.auth {
            PeerAuth::Plaintext => Ok(()),
            PeerAuth::Node(node) if node == claimed => Ok(()),
            PeerAuth::Node(node) => {
                tracing::warn!(
                    claimed = %claimed,
                    certificate = %node,
                    peer = %peer,
                    stream,
                    "Refused an agent stream: it claims another node than its certificate names."
                );
                Err(Status::permission_denied(format!(
                    "this connection's certificate belongs to node {node:?}, not {claimed:?}: an agent may only \
                     speak for the node its certificate names"
                )))
            }
            PeerAuth::Unidentified(why) => {
                tracing::warn!(
                    claimed = %claimed,
                    certificate = %why,
                    peer = %peer,
                    stream,
                    "Refused an agent stream: its certificate names no node."
                );
                Err(Status::permission_denied(format!(
                    "this connection's certificate names no node ({why}); use one made by `bulkhead certs node`"
                )))
            }
        }
    }
}
