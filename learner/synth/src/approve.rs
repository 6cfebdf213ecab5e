//! Turning a reviewed proposal into the policy that gets approved: included rules plus
//! the flagged rules the analyst explicitly confirmed. Every flagged rule must be
//! decided one way or the other, so nothing hostile slips in by default and nothing
//! needed is lost by oversight.

use std::collections::BTreeSet;

use bulkhead_model::{Policy, Proposal};

/// Why an approval request does not fit the proposal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApproveError {
    #[error("rule {id:?} does not exist in this proposal")]
    UnknownRule { id: String },
    #[error("rule {id:?} is not flagged; only flagged rules are confirmed or dropped")]
    NotFlagged { id: String },
    #[error("rule {id:?} is both confirmed and dropped")]
    Contradiction { id: String },
    #[error("flagged rule(s) {ids:?} must be confirmed or dropped explicitly before approval")]
    Undecided { ids: Vec<String> },
}

/// The policy an approval installs: `proposal.policy` plus the `confirmed` flagged
/// rules; `dropped` flagged rules stay out.
pub fn approved_policy(proposal: &Proposal, confirmed: &[String], dropped: &[String]) -> Result<Policy, ApproveError> {
    let confirmed: BTreeSet<&str> = confirmed.iter().map(String::as_str).collect();
    let dropped: BTreeSet<&str> = dropped.iter().map(String::as_str).collect();
    for id in confirmed.iter().chain(dropped.iter()) {
        match proposal.rules.iter().find(|r| r.id == *id) {
            None => return Err(ApproveError::UnknownRule { id: (*id).to_owned() }),
            Some(r) if r.flags.is_empty() => return Err(ApproveError::NotFlagged { id: (*id).to_owned() }),
            Some(_) => {}
        }
    }
    if let Some(id) = confirmed.intersection(&dropped).next() {
        return Err(ApproveError::Contradiction { id: (*id).to_owned() });
    }
    let undecided: Vec<String> = proposal
        .rules
        .iter()
        .filter(|r| !r.flags.is_empty() && !confirmed.contains(r.id.as_str()) && !dropped.contains(r.id.as_str()))
        .map(|r| r.id.clone())
        .collect();
    if !undecided.is_empty() {
        return Err(ApproveError::Undecided { ids: undecided });
    }
    let mut policy = proposal.policy.clone();
    for r in proposal.rules.iter().filter(|r| confirmed.contains(r.id.as_str())) {
        let slot = match r.direction {
            bulkhead_model::Direction::Ingress => &mut policy.ingress,
            bulkhead_model::Direction::Egress => &mut policy.egress,
        };
        slot.get_or_insert_with(Vec::new).push(r.rule.clone());
    }
    policy.normalize();
    Ok(policy)
}
