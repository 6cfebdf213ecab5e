//! What enforcers say, kept: Hello and Ack move the node's applied version in the
//! store, verdict reports become verdict events and rule hit counters named by the
//! approved rule (not the node-local rule id, which changes with every version).
//!
//! Recording failures are logged and do not end the stream: the enforcer keeps
//! enforcing whatever the store's state, and its next Hello/Ack/report brings the
//! store up to date again. Admission is the exception: a node that is not enrolled
//! (closed enrollment) is refused at its Hello, as on the flow stream — policy
//! names workloads and addresses, which only enrolled nodes may learn.

use std::collections::BTreeSet;

use bulkhead_model::node_policy::{EnforcerHello, PolicyAck, PolicyAckStatus, VerdictReport};
use bulkhead_model::{Direction, ProposalStatus};

use super::Distributor;
use crate::grpc::ingest::{Enrollment, unix_ms};
use crate::store::{AckOutcome, RuleHits, RuleRef, Store, StoreError, VerdictEventRow};

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
        let unavailable = |e: crate::store::StoreError| tonic::Status::unavailable(format!("store: {e}"));
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

    pub async fn hello(&self, h: &EnforcerHello) {
        let applied = (h.applied_version > 0).then_some(h.applied_version);
        if let Err(err) = self.store.enforcer_hello(&h.node_id, &h.boot_id, &h.agent_version, applied, unix_ms()).await
        {
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
                    tracing::warn!(node = %node, proposal = id, error = %err, "Marking a proposal deployed failed.")
                }
            }
        }
    }

    /// Events keep the initiator/responder orientation of flows: egress means the
    /// local workload initiated.
    pub async fn report(&self, node: &str, r: &VerdictReport) {
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
                }
            })
            .collect();
        if !events.is_empty()
            && let Err(err) = self.store.insert_verdict_events(node, &events, unix_ms()).await
        {
            tracing::warn!(node = %node, events = events.len(), error = %err, "Recording verdict events failed.");
        }
        if let Err(err) = self.store.enforcer_loss(node, &r.loss, unix_ms()).await {
            tracing::warn!(node = %node, error = %err, "Recording enforcer loss counters failed.");
        }
        let hits: Vec<RuleHits> = r
            .rule_counters
            .iter()
            .filter_map(|c| {
                Some(RuleHits { rule: rule_ref(c.rule_id)?, hits: c.hits, last_hit_unix_ms: c.last_hit_unix_ms })
            })
            .collect();
        if !hits.is_empty()
            && let Err(err) = self.store.add_rule_hits(node, &hits).await
        {
            tracing::warn!(node = %node, error = %err, "Recording rule hits failed.");
        }
    }
}
