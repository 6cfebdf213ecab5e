//! Review: approving (with explicit decisions on flagged rules), rejecting, and
//! structural diffs between versions or against what is deployed.

use bulkhead_model::{Policy, ProposalStatus};
use bulkhead_synth::{PolicyDiff, approved_policy, diff};
use serde::{Deserialize, Serialize};

use super::{PolicyError, PolicyService};
use crate::store::{ActivePolicy, ClusterPolicyRow, Decision, ProposalRecord, RuleHitRow};

/// An approval: which flagged rules the analyst confirmed and which they dropped.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Approval {
    #[serde(default)]
    pub confirm: Vec<String>,
    #[serde(default)]
    pub drop: Vec<String>,
    pub comment: Option<String>,
}

/// What to diff a proposal against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Against {
    /// The target's deployed (else approved) policy; nothing if there is none.
    Active,
    /// The previous version of the same target.
    Previous,
    /// A given version of the same target.
    Version(u32),
}

/// A diff with what it compared.
#[derive(Debug, Clone, Serialize)]
pub struct ProposalDiff {
    pub proposal_id: i64,
    pub version: u32,
    /// Proposal id and version compared against; `None`: against nothing.
    pub against: Option<(i64, u32)>,
    pub diff: PolicyDiff,
    pub text: String,
}

/// A proposal with what already applies to its workload: the Kubernetes
/// NetworkPolicies imported from the cluster that select it, and Bulkhead's own active
/// (approved / deployed) versions — so a reviewer sees the proposal next to the
/// policy in force.
#[derive(Debug, Clone, Serialize)]
pub struct ProposalView {
    #[serde(flatten)]
    pub record: ProposalRecord,
    pub cluster_policies: Vec<ClusterPolicyRow>,
    pub active: Vec<ActivePolicy>,
    /// Use of the rules of this version and of the active ones, per rule and node, as
    /// enforcers reported it (rule index into the approved policy's rule list): what
    /// finds the rules nobody uses. A rule that is absent was never hit.
    pub rule_hits: Vec<RuleHitRow>,
}

impl PolicyService {
    pub async fn proposal(&self, id: i64) -> Result<ProposalRecord, PolicyError> {
        self.store.proposal(id).await?.ok_or(PolicyError::NoSuchProposal { id })
    }

    /// [`ProposalView`] of proposal `id`.
    pub async fn view(&self, id: i64) -> Result<ProposalView, PolicyError> {
        let record = self.proposal(id).await?;
        let target = record.summary.target;
        let labels = self.store.identities().await?.into_iter().find(|r| r.id == target).map(|r| r.labels);
        let cluster_policies = match &labels {
            Some(l) => {
                self.store.cluster_policies().await?.into_iter().filter(|c| c.policy.selector.matches(l)).collect()
            }
            None => Vec::new(),
        };
        let active: Vec<ActivePolicy> =
            self.store.active_policies().await?.into_iter().filter(|a| a.target == target).collect();
        let mut ids: Vec<i64> = active.iter().map(|a| a.proposal_id).chain([id]).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut rule_hits = Vec::new();
        for pid in ids {
            rule_hits.extend(self.store.rule_hits(pid).await?);
        }
        Ok(ProposalView { record, cluster_policies, active, rule_hits })
    }

    /// Approves proposal `id`; every flagged rule must be confirmed or dropped.
    pub async fn approve(
        &self,
        id: i64,
        a: &Approval,
        actor: &str,
        now_ms: i64,
    ) -> Result<ProposalRecord, PolicyError> {
        let record = self.proposal(id).await?;
        let policy = approved_policy(&record.proposal, &a.confirm, &a.drop)?;
        let decision = Decision::Approve { policy };
        let record = self.store.decide_proposal(id, decision, actor, a.comment.as_deref(), now_ms).await?;
        self.changed();
        Ok(record)
    }

    /// Rejects proposal `id` (a comment saying why is required by the store).
    pub async fn reject(
        &self,
        id: i64,
        comment: &str,
        actor: &str,
        now_ms: i64,
    ) -> Result<ProposalRecord, PolicyError> {
        self.proposal(id).await?;
        Ok(self.store.decide_proposal(id, Decision::Reject, actor, Some(comment), now_ms).await?)
    }

    /// The policy a version stands for: what was approved, else what was proposed.
    fn policy_of(record: &ProposalRecord) -> &Policy {
        record.approved_policy.as_ref().unwrap_or(&record.proposal.policy)
    }

    /// Diffs proposal `id` against the active policy or another version.
    pub async fn diff(&self, id: i64, against: Against) -> Result<ProposalDiff, PolicyError> {
        let record = self.proposal(id).await?;
        let target = record.summary.target;
        let base: Option<ProposalRecord> = match against {
            Against::Active => {
                let mut active: Vec<_> = self
                    .store
                    .active_policies()
                    .await?
                    .into_iter()
                    .filter(|a| a.target == target && a.proposal_id != id)
                    .collect();
                // Deployed is what runs; approved-but-not-deployed only if nothing is.
                active.sort_by_key(|a| (a.status != ProposalStatus::Deployed, std::cmp::Reverse(a.version)));
                match active.first() {
                    Some(a) => self.store.proposal(a.proposal_id).await?,
                    None => None,
                }
            }
            Against::Previous | Against::Version(_) => {
                let want = match against {
                    Against::Version(v) => Some(v),
                    _ => record.summary.version.checked_sub(1),
                };
                let versions = self.store.proposal_versions(target).await?;
                match want.and_then(|v| versions.iter().find(|s| s.version == v)) {
                    Some(s) => self.store.proposal(s.id).await?,
                    None if matches!(against, Against::Version(_)) => {
                        return Err(PolicyError::InvalidRequest {
                            reason: format!("workload {} has no version {:?}", target.0, want),
                        });
                    }
                    None => None,
                }
            }
        };
        let d = diff(base.as_ref().map(Self::policy_of), &record.proposal.policy);
        Ok(ProposalDiff {
            proposal_id: id,
            version: record.summary.version,
            against: base.as_ref().map(|b| (b.summary.id, b.summary.version)),
            text: d.to_text(),
            diff: d,
        })
    }
}
