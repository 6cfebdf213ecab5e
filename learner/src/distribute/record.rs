//! What enforcers say, kept: Hello and Ack move the node's applied version in the
//! store, verdict reports become verdict events and rule hit counters named by the
//! approved rule (not the node-local rule id, which changes with every version).
//!
//! Recording failures are logged and do not end the stream: the enforcer keeps
//! enforcing whatever the store's state, and its next Hello/Ack/report brings the
//! store up to date again. Verdict events and rule hits exist only in their report, so
//! a failed write keeps them in the stream's [`ReportBacklog`] until the store is back. Admission is the exception: a node that is not enrolled
//! (closed enrollment) is refused at its Hello, as on the flow stream — policy
//! names workloads and addresses, which only enrolled nodes may learn.

use std::collections::{BTreeSet, VecDeque};

use bulkhead_model::node_policy::{EnforcerHello, PolicyAck, PolicyAckStatus, VerdictReport};
use bulkhead_model::{Direction, ProposalStatus};

use super::Distributor;
use crate::grpc::ingest::{Enrollment, unix_ms};
use crate::metrics::StoreUser;
use crate::store::{AckOutcome, ClockOf, RuleHits, RuleRef, Store, StoreError, VerdictEventRow};

/// Writes enforcer messages to the store.
#[derive(Debug, Clone)]
pub struct Recorder {
    pub store: Store,
    pub distributor: Distributor,
    /// Whether unknown nodes are registered by their Hello or refused.
    pub enrollment: Enrollment,
}

impl Recorder {
    /// Admits the node under the enrollment policy (the same registry as the flow
    /// stream's): `Err` is the status to end the stream with.
    pub async fn admit(&self, h: &EnforcerHello) -> Result<(), tonic::Status> {
        let unavailable = |e: crate::store::StoreError| {
            self.store_failed();
            tonic::Status::unavailable(format!("store: {e}"))
        };
        if self.store.agent_known(&h.node_id).await.map_err(unavailable)? {
            return Ok(());
        }
        match self.enrollment {
            Enrollment::Open => self.store.register_agent(&h.node_id, unix_ms()).await.map_err(unavailable),
            Enrollment::Closed => {
                tracing::warn!(node = %h.node_id, "Refused a policy stream from an unregistered node.");
                Err(tonic::Status::permission_denied(format!(
                    "node {:?} is not registered: run `bulkhead-learner node add {}` on the learner",
                    h.node_id, h.node_id
                )))
            }
        }
    }

    /// Counts a failed store call of this stream (the caller logs it).
    fn store_failed(&self) {
        self.distributor.metrics().store_error(StoreUser::EnforcerStream);
    }

    pub async fn hello(&self, h: &EnforcerHello) {
        let applied = (h.applied_version > 0).then_some(h.applied_version);
        if let Err(err) = self.store.enforcer_hello(&h.node_id, &h.boot_id, &h.agent_version, applied, unix_ms()).await
        {
            self.store_failed();
            tracing::warn!(node = %h.node_id, error = %err, "Recording an enforcer hello failed.");
        }
    }

    pub async fn ack(&self, node: &str, ack: &PolicyAck) {
        let outcome = match ack.status {
            PolicyAckStatus::Applied => AckOutcome::Applied,
            PolicyAckStatus::Rejected => {
                AckOutcome::Rejected { error: ack.error.clone().unwrap_or_else(|| "no reason given".into()) }
            }
        };
        let applied = matches!(outcome, AckOutcome::Applied);
        if let Err(err) = self.store.enforcer_ack(node, ack.version, outcome, unix_ms()).await {
            self.store_failed();
            tracing::warn!(node = %node, version = ack.version, error = %err, "Recording an enforcer ack failed.");
        }
        if applied {
            self.mark_deployed(node, ack.version).await;
        }
    }

    /// The approved versions whose rules a node now enforces become `deployed` (the
    /// first node to apply one deploys it; audited as `proposal.deploy` by
    /// `enforcer:<node>`). Versions without any rule (deny-all) have no rule reference
    /// in the snapshot and stay `approved` while enforced.
    async fn mark_deployed(&self, node: &str, version: u64) {
        let Some(policy) = self.distributor.snapshot(node, version) else { return };
        let ids: BTreeSet<i64> = policy.rule_refs.iter().map(|r| r.proposal_id).collect();
        if ids.is_empty() {
            return;
        }
        let approved: Vec<i64> = match self.store.active_policies().await {
            Ok(active) => active
                .into_iter()
                .filter(|a| a.status == ProposalStatus::Approved && ids.contains(&a.proposal_id))
                .map(|a| a.proposal_id)
                .collect(),
            Err(err) => {
                self.store_failed();
                tracing::warn!(node = %node, error = %err, "Reading the active policies failed.");
                return;
            }
        };
        let actor = format!("enforcer:{node}");
        for id in approved {
            match self.store.mark_deployed(id, &actor, unix_ms()).await {
                // Another node's ack got there first.
                Ok(_) | Err(StoreError::InvalidTransition { .. }) => {}
                Err(err) => {
                    self.store_failed();
                    tracing::warn!(node = %node, proposal = id, error = %err, "Marking a proposal deployed failed.")
                }
            }
        }
    }

    /// Events keep the initiator/responder orientation of flows: egress means the
    /// local workload initiated.
    /// Stores the node's clock skew as measured on its stream.
    pub async fn clock_skew(&self, node: &str, skew_ms: i64) {
        if let Err(err) = self.store.record_clock_skew(ClockOf::Enforcer, node, skew_ms).await {
            self.store_failed();
            tracing::warn!(node = %node, error = %err, "Recording the node's clock skew failed.");
        }
    }

    /// Records a report: loss counters now (the newest replace the old), events and
    /// rule hits through `backlog` (kept while the store refuses them).
    pub async fn report(&self, node: &str, r: &VerdictReport, backlog: &mut ReportBacklog) {
        let rule_ref = |rule_id: u32| {
            self.distributor.rule_ref(node, r.policy_version, rule_id).map(|x| RuleRef {
                proposal_id: x.proposal_id,
                direction: x.direction,
                rule_index: x.rule_index,
            })
        };
        let events: Vec<VerdictEventRow> = r
            .events
            .iter()
            .map(|e| {
                let (src, dst, port) = match e.direction {
                    Direction::Egress => (e.local_addr, e.peer_addr, e.peer_port),
                    Direction::Ingress => (e.peer_addr, e.local_addr, e.local_port),
                };
                VerdictEventRow {
                    at_unix_ms: e.time_unix_ms,
                    local: e.local_identity,
                    peer: e.peer_identity,
                    direction: e.direction,
                    verdict: e.verdict,
                    src_addr: src,
                    dst_addr: dst,
                    dst_port: port,
                    protocol: e.protocol,
                    policy_version: r.policy_version,
                    rule: e.rule_id.and_then(rule_ref),
                    http: e.http.clone(),
                }
            })
            .collect();
        if let Err(err) = self.store.enforcer_loss(node, &r.loss, unix_ms()).await {
            self.store_failed();
            tracing::warn!(node = %node, error = %err, "Recording enforcer loss counters failed.");
        }
        let hits: Vec<RuleHits> = r
            .rule_counters
            .iter()
            .filter_map(|c| {
                Some(RuleHits { rule: rule_ref(c.rule_id)?, hits: c.hits, last_hit_unix_ms: c.last_hit_unix_ms })
            })
            .collect();
        let dropped = backlog.push(events, hits);
        self.distributor.metrics().backlog_dropped(dropped.events, dropped.rule_hits);
        self.flush(node, backlog).await;
    }

    /// Writes what `backlog` holds, oldest first, until the store refuses; the rest
    /// waits for the next report of the stream.
    pub async fn flush(&self, node: &str, backlog: &mut ReportBacklog) {
        while let Some(write) = backlog.writes.front() {
            let done = match write {
                Write::Events(events) => self.store.insert_verdict_events(node, events, unix_ms()).await.map(|_| ()),
                Write::Hits(hits) => self.store.add_rule_hits(node, hits).await,
            };
            match done {
                Ok(()) => {
                    if let Some(w) = backlog.writes.pop_front() {
                        backlog.rows -= w.rows();
                        if let Write::Events(events) = &w {
                            self.distributor.metrics().verdict_events_recorded(events.len() as u64);
                        }
                    }
                }
                Err(err) => {
                    self.store_failed();
                    tracing::warn!(
                        node = %node,
                        waiting_rows = backlog.rows,
                        error = %err,
                        "Recording verdict events or rule hits failed; kept for the next report."
                    );
                    return;
                }
            }
        }
    }
}

/// Verdict events and rule-hit deltas of one enforcer stream that the store has not
/// taken yet (it was unavailable). Reports are not acked on the wire, so the learner
/// holds on to them rather than drop them; bounded, and what the bound throws away is
/// counted and logged as lost. Loss counters need no backlog: each report carries the
/// node's cumulative values.
#[derive(Debug, Default)]
pub struct ReportBacklog {
    writes: VecDeque<Write>,
    rows: usize,
    /// Rows thrown away because the backlog was full.
    pub dropped_rows: u64,
}

#[derive(Debug)]
enum Write {
    Events(Vec<VerdictEventRow>),
    Hits(Vec<RuleHits>),
}

impl Write {
    fn rows(&self) -> usize {
        match self {
            Write::Events(e) => e.len(),
            Write::Hits(h) => h.len(),
        }
    }
}

/// Most rows one stream's backlog holds (a few MiB).
pub const MAX_BACKLOG_ROWS: usize = 50_000;

/// Rows a [`ReportBacklog`] threw away, by kind (counted as lost in the metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    pub events: u64,
    pub rule_hits: u64,
}

impl Dropped {
    fn add(&mut self, w: &Write) {
        match w {
            Write::Events(e) => self.events += e.len() as u64,
            Write::Hits(h) => self.rule_hits += h.len() as u64,
        }
    }
}

impl ReportBacklog {
    /// Queues a report's rows; returns what the bound threw away to make room.
    fn push(&mut self, events: Vec<VerdictEventRow>, hits: Vec<RuleHits>) -> Dropped {
        let mut dropped = Dropped::default();
        for w in [Write::Events(events), Write::Hits(hits)] {
            if w.rows() == 0 {
                continue;
            }
            self.rows += w.rows();
            self.writes.push_back(w);
        }
        while self.rows > MAX_BACKLOG_ROWS {
            let Some(old) = self.writes.pop_front() else { break };
            self.rows -= old.rows();
            self.dropped_rows += old.rows() as u64;
            dropped.add(&old);
            tracing::error!(
                rows = old.rows(),
                dropped_rows = self.dropped_rows,
                "The store has been unavailable too long: dropped the oldest verdict events or rule hits."
            );
        }
        dropped
    }

    /// Empties the backlog (its stream ended) and returns what it held: lost.
    pub fn discard(&mut self) -> Dropped {
        let mut dropped = Dropped::default();
        for w in self.writes.drain(..) {
            dropped.add(&w);
        }
        self.dropped_rows += self.rows as u64;
        self.rows = 0;
        dropped
    }

    /// Rows waiting for the store.
    pub fn rows(&self) -> usize {
        self.rows
    }
}
