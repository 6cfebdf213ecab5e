//! Delivery of spooled batches to the learner over the FlowIngest stream.
//!
//! The shipper owns the connection: Hello → Welcome, then it keeps up to `window`
//! batches in flight and removes each from the spool only when its ack arrives. Any
//! error drops the stream and reconnects with capped exponential backoff; batches that
//! were in flight stay spooled and are sent again, and the learner's dedupe turns the
//! repeat into a no-op. So the learner may restart at any moment without loss.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulkhead_proto::tls::AgentTransport;
use bulkhead_proto::v1::{self, flow_ingest_client::FlowIngestClient, ingest_request, ingest_response};
use tokio::sync::{Notify, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::metrics::Metrics;
use crate::spool::{Spool, SpoolEntry};

/// Where and as whom to deliver.
#[derive(Debug, Clone)]
pub struct ShipperConfig {
    /// Learner gRPC URL, e.g. `https://learner.bulkhead.svc:7400`.
    pub learner_url: String,
    /// mTLS with this node's certificate, or plaintext (`--insecure-grpc`).
    pub transport: AgentTransport,
    pub node_id: String,
    pub boot_id: String,
    pub agent_version: String,
    /// Batches sent before waiting for acks.
    pub window: usize,
    pub max_backoff: Duration,
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("connecting to {url}: {}", chain(.error))]
    Connect { url: String, error: tonic::transport::Error },
    #[error("learner refused the stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("learner closed the stream")]
    Closed,
    #[error("learner broke the protocol: {0}")]
    Protocol(String),
    #[error("spool: {0}")]
    Spool(#[from] crate::spool::SpoolError),
}

/// Delivers for as long as the task lives; the agent aborts it on shutdown (everything
/// unacked is still in the spool).
pub async fn run(cfg: ShipperConfig, spool: Arc<Mutex<Spool>>, wake: Arc<Notify>, metrics: Arc<Metrics>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match stream_once(&cfg, &spool, &wake, &metrics, &mut backoff).await {
            Ok(()) => return,
            Err(err) => {
                metrics.learner_connected.set(0);
                tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "Learner stream ended; batches stay spooled.");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(cfg.max_backoff);
            }
        }
    }
}

async fn stream_once(
    cfg: &ShipperConfig,
    spool: &Mutex<Spool>,
    wake: &Notify,
    metrics: &Metrics,
    backoff: &mut Duration,
) -> Result<(), StreamError> {
    let channel = cfg
        .transport
        .connect(&cfg.learner_url)
        .await
        .map_err(|error| StreamError::Connect { url: cfg.learner_url.clone(), error })?;
    let mut client = FlowIngestClient::new(channel);
    let (tx, rx) = mpsc::channel::<v1::IngestRequest>(cfg.window + 1);
    let hello = v1::Hello {
        node_id: cfg.node_id.clone(),
        boot_id: cfg.boot_id.clone(),
        agent_version: cfg.agent_version.clone(),
    };
    tx.send(v1::IngestRequest { msg: Some(ingest_request::Msg::Hello(hello)) })
        .await
        .map_err(|_| StreamError::Closed)?;
    let mut responses = client.ingest(ReceiverStream::new(rx)).await?.into_inner();
    let welcome = match responses.next().await {
        Some(Ok(v1::IngestResponse { msg: Some(ingest_response::Msg::Welcome(w)) })) => w,
        Some(Ok(other)) => return Err(StreamError::Protocol(format!("expected Welcome, got {other:?}"))),
        Some(Err(status)) => return Err(status.into()),
        None => return Err(StreamError::Closed),
    };
    metrics.learner_connected.set(1);
    *backoff = Duration::from_millis(100);
    tracing::info!(url = %cfg.learner_url, stored_through = welcome.stored_through_seq, "Connected to learner.");
    {
        // What the learner already has of this boot need not travel again.
        let mut s = lock(spool);
        let done: Vec<SpoolEntry> = s
            .entries()
            .iter()
            .filter(|e| e.boot_id == crate::spool::sanitize(&cfg.boot_id) && e.seq <= welcome.stored_through_seq)
            .cloned()
            .collect();
        for e in &done {
            s.remove(e)?;
        }
        s.release_unacked();
    }

    let mut in_flight: VecDeque<SpoolEntry> = VecDeque::new();
    loop {
        // Fill the window with spooled batches not yet sent on this stream.
        let to_send: Vec<(SpoolEntry, v1::FlowBatch)> = {
            let s = lock(spool);
            let mut out = Vec::new();
            for e in s.entries() {
                if in_flight.len() + out.len() >= cfg.window {
                    break;
                }
                if s.is_unacked(e) {
                    continue;
                }
                out.push((e.clone(), s.read(e)?));
            }
            out
        };
        for (entry, mut batch) in to_send {
            // The learner measures this node's clock skew from it (and corrects the
            // flows' times); a resent batch carries the time of this send.
            batch.sent_unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            tx.send(v1::IngestRequest { msg: Some(ingest_request::Msg::Batch(batch)) })
                .await
                .map_err(|_| StreamError::Closed)?;
            lock(spool).sent(&entry);
            in_flight.push_back(entry);
        }

        tokio::select! {
            resp = responses.next() => {
                let ack = match resp {
                    Some(Ok(v1::IngestResponse { msg: Some(ingest_response::Msg::Ack(a)) })) => a,
                    Some(Ok(other)) => return Err(StreamError::Protocol(format!("expected BatchAck, got {other:?}"))),
                    Some(Err(status)) => return Err(status.into()),
                    None => return Err(StreamError::Closed),
                };
                let Some(entry) = in_flight.pop_front() else {
                    return Err(StreamError::Protocol(format!("ack for seq {} with nothing in flight", ack.seq)));
                };
                if entry.seq != ack.seq {
                    return Err(StreamError::Protocol(format!("ack for seq {} but seq {} was next", ack.seq, entry.seq)));
                }
                match v1::AckStatus::try_from(ack.status) {
                    Ok(v1::AckStatus::Stored) => {
                        metrics.batches_acked.inc();
                    }
                    Ok(v1::AckStatus::Duplicate) => {
                        metrics.batches_duplicate.inc();
                    }
                    _ => {
                        metrics.batches_rejected.inc();
                        tracing::error!(seq = ack.seq, flows = entry.flows, error = %ack.error, "Learner rejected a batch; it is dropped and counted as lost.");
                    }
                };
                let mut s = lock(spool);
                s.remove(&entry)?;
                metrics.spool_batches.set(s.entries().len() as i64);
                metrics.spool_bytes.set(s.bytes() as i64);
            }
            _ = wake.notified(), if in_flight.len() < cfg.window => {}
        }
    }
}

/// A transport error with its causes: tonic's own message is just "transport error";
/// what went wrong (refused, a TLS alert, a bad certificate) is in the causes.
fn chain(err: &tonic::transport::Error) -> String {
    let mut out = err.to_string();
    let mut cause = std::error::Error::source(err);
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

fn lock(spool: &Mutex<Spool>) -> std::sync::MutexGuard<'_, Spool> {
    // A panic while holding the lock cannot leave the spool inconsistent on disk (each
    // operation is one rename or unlink), so a poisoned lock is still usable.
    spool.lock().unwrap_or_else(|p| p.into_inner())
}
