//! The FlowIngest service: agents stream batches, the learner resolves identities,
//! stores each batch in one transaction and acks it.
//!
//! Error policy, so that bad input loses nothing that was already stored:
//! * a batch that fails validation is acked `REJECTED` with the reason and the stream
//!   goes on — resending it would fail the same way;
//! * a store failure ends the stream with `UNAVAILABLE` *without* an ack, so the agent
//!   keeps the batch spooled and sends it again after reconnecting;
//! * a stream that does not start with a Hello, from a node that is not enrolled, or
//!   (over mTLS) whose Hello names another node than the client certificate, is
//!   refused with a status that says what to do.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bulkhead_model::{FlowBatch, Identity};
use bulkhead_proto::v1::{self, flow_ingest_server::FlowIngest, ingest_request, ingest_response};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::grpc::clock::{SkewEstimator, corrected};
use crate::grpc::tls::Peer;
use crate::identity::{IdentityCache, Resolver, Subject};
use crate::metrics::{BatchOutcome, Metrics, StoreUser};
use crate::store::{ClockOf, IngestBatch, IngestOutcome, ResolvedEndpoint, ResolvedFlow, Store, StoreError};

/// Whether unknown nodes may join by saying Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Enrollment {
    /// Any node that connects is registered (with mTLS: any node holding a
    /// certificate from the client CA).
    Open,
    /// Only nodes registered with `bulkhead-learner node add` may stream.
    Closed,
}

/// Shared state of the ingest service.
#[derive(Debug, Clone)]
pub struct IngestService {
    pub store: Store,
    pub resolver: Arc<RwLock<Resolver>>,
    pub identities: Arc<IdentityCache>,
    pub enrollment: Enrollment,
    pub max_batch_bytes: usize,
    /// Batches, flows, open streams and store failures are counted here.
    pub metrics: Arc<Metrics>,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<v1::IngestResponse, Status>> + Send>>;

#[tonic::async_trait]
impl FlowIngest for IngestService {
    type IngestStream = ResponseStream;

    async fn ingest(
        &self,
        request: Request<Streaming<v1::IngestRequest>>,
    ) -> Result<Response<Self::IngestStream>, Status> {
        let peer = Peer::of(&request);
        let mut inbound = request.into_inner();
        let hello = match inbound.next().await {
            Some(Ok(v1::IngestRequest { msg: Some(ingest_request::Msg::Hello(h)) })) => h,
            Some(Ok(_)) => return Err(Status::invalid_argument("the first message of a stream must be a Hello")),
            Some(Err(status)) => return Err(status),
            None => return Err(Status::invalid_argument("stream closed before Hello")),
        };
        let v1::Hello { node_id, boot_id, agent_version } = hello;
        if node_id.is_empty() || node_id.len() > 253 || boot_id.is_empty() || boot_id.len() > 253 {
            return Err(Status::invalid_argument("Hello needs a node_id and boot_id of 1 to 253 bytes"));
        }
        // Every batch must name this node too (`handle_batch`), so the stream cannot
        // speak for another node later.
        peer.authorize(&node_id, "flow ingest")?;
        let now = unix_ms();
        let store_status = |err| {
            self.metrics.store_error(StoreUser::Ingest);
            store_status(err)
        };
        if !self.store.agent_known(&node_id).await.map_err(store_status)? {
            match self.enrollment {
                Enrollment::Open => self.store.register_agent(&node_id, now).await.map_err(store_status)?,
                Enrollment::Closed => {
                    tracing::warn!(node = %node_id, "Refused a stream from an unregistered node.");
                    return Err(Status::permission_denied(format!(
                        "node {node_id:?} is not registered: run `bulkhead-learner node add {node_id}` on the learner"
                    )));
                }
            }
        }
        self.store.touch_agent(&node_id, &boot_id, &agent_version, now).await.map_err(store_status)?;
        let stored_through_seq = self.store.stored_through_seq(&node_id, &boot_id).await.map_err(store_status)?;
        tracing::info!(node = %node_id, boot = %boot_id, stored_through_seq, "Agent connected.");

        let (tx, rx) = mpsc::channel(16);
        let welcome = v1::Welcome { stored_through_seq, max_batch_bytes: self.max_batch_bytes as u64 };
        let _ = tx.send(Ok(v1::IngestResponse { msg: Some(ingest_response::Msg::Welcome(welcome)) })).await;
        let svc = self.clone();
        let open = self.metrics.collector_stream();
        tokio::spawn(async move {
            let _open = open;
            let mut clock = SkewEstimator::default();
            while let Some(msg) = inbound.next().await {
                let reply = match msg {
                    Ok(v1::IngestRequest { msg: Some(ingest_request::Msg::Batch(b)) }) => {
                        let reply = svc.handle_batch(&node_id, b, &mut clock).await;
                        svc.count(&reply);
                        reply
                    }
                    Ok(_) => Err(Status::invalid_argument("only FlowBatch messages may follow the Hello")),
                    Err(status) => {
                        tracing::warn!(node = %node_id, error = %status, "Agent stream failed.");
                        Err(status)
                    }
                };
                let fatal = reply.is_err();
                let out = reply.map(|ack| v1::IngestResponse { msg: Some(ingest_response::Msg::Ack(ack)) });
                if tx.send(out).await.is_err() || fatal {
                    break;
                }
            }
            tracing::info!(node = %node_id, "Agent stream ended.");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl IngestService {
    /// Counts a batch's answer: an ack by its status, an error (only store failures
    /// end a batch with one) as a store error.
    fn count(&self, reply: &Result<v1::BatchAck, Status>) {
        match reply {
            Ok(ack) => {
                let outcome = match v1::AckStatus::try_from(ack.status) {
                    Ok(v1::AckStatus::Stored) => BatchOutcome::Stored,
                    Ok(v1::AckStatus::Duplicate) => BatchOutcome::Duplicate,
                    _ => BatchOutcome::Rejected,
                };
                self.metrics.batch(outcome, u64::from(ack.flows_stored));
            }
            Err(_) => self.metrics.store_error(StoreUser::Ingest),
        }
    }

    async fn handle_batch(
        &self,
        node: &str,
        wire: v1::FlowBatch,
        clock: &mut SkewEstimator,
    ) -> Result<v1::BatchAck, Status> {
        let seq = wire.seq;
        let mut batch = match FlowBatch::try_from(wire) {
            Ok(b) => b,
            Err(e) => return Ok(reject(node, seq, e.to_string())),
        };
        if batch.node_id != node {
            let reason = format!("batch names node {:?} but the stream belongs to {node:?}", batch.node_id);
            return Ok(reject(node, seq, reason));
        }
        let before = clock.correction_ms();
        clock.observe(batch.sent_unix_ms, unix_ms());
        let correction = clock.correction_ms();
        if correction != 0 && before == 0 {
            tracing::warn!(
                node,
                skew_ms = correction,
                "The node's clock is off; its flow times are corrected by the measured skew. Fix its time sync (NTP)."
            );
        }
        correct_times(&mut batch, correction);
        if let Some(skew) = clock.skew_to_record() {
            self.store.record_clock_skew(ClockOf::Collector, node, skew).await.map_err(store_status)?;
        }
        let ingest = self.resolve(batch).await.map_err(store_status)?;
        let flows = ingest.flows.len();
        match self.store.ingest(&ingest).await.map_err(store_status)? {
            IngestOutcome::Stored { flows: stored, .. } => {
                tracing::debug!(node, seq, flows, "Stored batch.");
                Ok(v1::BatchAck {
                    seq,
                    status: v1::AckStatus::Stored as i32,
                    error: String::new(),
                    flows_stored: u32::try_from(stored).unwrap_or(u32::MAX),
                })
            }
            IngestOutcome::Duplicate => {
                tracing::debug!(node, seq, "Duplicate batch ignored.");
                Ok(v1::BatchAck { seq, status: v1::AckStatus::Duplicate as i32, error: String::new(), flows_stored: 0 })
            }
        }
    }

    /// Turns a validated batch into rows with identities on both ends.
    async fn resolve(&self, batch: FlowBatch) -> Result<IngestBatch, StoreError> {
        let node = batch.node_id.as_str();
        if let Some(facts) = &batch.endpoints {
            self.resolver.write().unwrap_or_else(|p| p.into_inner()).update_node(node, facts.clone());
        }
        // Resolve under the lock (pure, fast), then number without it. A batch holds
        // thousands of flows but only a handful of distinct ends: each distinct end is
        // resolved and numbered once, and flows keep indices into that list.
        let (distinct, ends, endpoint_subjects) = {
            let r = self.resolver.read().unwrap_or_else(|p| p.into_inner());
            let mut distinct: Vec<Subject> = Vec::new();
            let mut local: HashMap<(u64, u64, &str, IpAddr), usize> = HashMap::new();
            let mut peer: HashMap<(u64, IpAddr), usize> = HashMap::new();
            let mut index: HashMap<Subject, usize> = HashMap::new();
            let mut intern = |s: Subject| {
                *index.entry(s).or_insert_with_key(|s| {
                    distinct.push(s.clone());
                    distinct.len() - 1
                })
            };
            let ends: Vec<(usize, usize)> = batch
                .flows
                .iter()
                .map(|f| {
                    let lk = (f.netns_ino, f.cgroup_id, f.comm.as_str(), f.local_addr());
                    let l = *local.entry(lk).or_insert_with(|| intern(r.local_subject(node, f)));
                    let p =
                        *peer.entry((f.netns_ino, f.peer_addr())).or_insert_with(|| intern(r.peer_subject(node, f)));
                    (l, p)
                })
                .collect();
            let eps: Option<Vec<Subject>> =
                batch.endpoints.as_ref().map(|facts| facts.iter().map(|f| r.endpoint_subject(f)).collect());
            (distinct, ends, eps)
        };
        let mut numbered: HashMap<Subject, Identity> = HashMap::new();
        let mut ids = Vec::with_capacity(distinct.len());
        for s in &distinct {
            ids.push(self.number(&mut numbered, s).await?);
        }
        let flows = batch
            .flows
            .into_iter()
            .zip(ends)
            .map(|(flow, (l, p))| {
                let (src, dst) = match flow.direction {
                    bulkhead_model::Direction::Egress => (l, p),
                    bulkhead_model::Direction::Ingress => (p, l),
                };
                ResolvedFlow { flow, src_identity: ids[src], dst_identity: ids[dst] }
            })
            .collect();
        let endpoints = match (batch.endpoints, endpoint_subjects) {
            (Some(facts), Some(subjects)) => {
                let mut out = Vec::with_capacity(facts.len());
                for (fact, subject) in facts.into_iter().zip(subjects) {
                    let identity = self.number(&mut numbered, &subject).await?;
                    out.push(ResolvedEndpoint { fact, identity, workload: subject.workload_name().map(str::to_owned) });
                }
                Some(out)
            }
            _ => None,
        };
        Ok(IngestBatch {
            node_id: batch.node_id,
            boot_id: batch.boot_id,
            seq: batch.seq,
            received_unix_ms: unix_ms(),
            flows,
            endpoints,
            dns_answers: batch.dns_answers,
            loss: batch.loss,
        })
    }

    async fn number(&self, memo: &mut HashMap<Subject, Identity>, s: &Subject) -> Result<Identity, StoreError> {
        if let Some(id) = memo.get(s) {
            return Ok(*id);
        }
        let id = self.identities.identity(s).await?;
        memo.insert(s.clone(), id);
        Ok(id)
    }
}

/// Puts a batch's agent timestamps on the learner's clock (see [`crate::grpc::clock`]).
fn correct_times(batch: &mut FlowBatch, correction_ms: i64) {
    if correction_ms == 0 {
        return;
    }
    for f in &mut batch.flows {
        f.first_seen_unix_ms = corrected(f.first_seen_unix_ms, correction_ms);
        f.last_seen_unix_ms = corrected(f.last_seen_unix_ms, correction_ms);
    }
    for d in &mut batch.dns_answers {
        d.seen_unix_ms = corrected(d.seen_unix_ms, correction_ms);
    }
    batch.created_unix_ms = corrected(batch.created_unix_ms, correction_ms);
}

fn reject(node: &str, seq: u64, error: String) -> v1::BatchAck {
    tracing::warn!(node, seq, %error, "Rejected a batch.");
    v1::BatchAck { seq, status: v1::AckStatus::Rejected as i32, error, flows_stored: 0 }
}

/// Store errors become UNAVAILABLE: the agent retries later, nothing is acked.
/// Internals stay in the learner's log, not on the wire.
pub fn store_status(err: StoreError) -> Status {
    tracing::error!(error = %err, "Store operation failed.");
    Status::unavailable("the learner's store is unavailable; the batch stays with the agent and will be retried")
}

pub fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
