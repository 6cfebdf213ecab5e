//! Proposals: a synthesized policy for one workload with the evidence behind every
//! rule, what it would widen, what it lints, and where it is in review.
//!
//! A proposal is meant to be *trusted by someone who did not write it*: every rule says
//! which edges it covers and when they were seen, the proposal says how far it reaches
//! beyond what was observed, and rules that look hostile are not part of the policy
//! until an analyst confirms them.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Direction, EdgeKey, HttpRule, Identity, Policy, PortRange, Rule};

/// How far synthesis may generalize peers beyond the identities observed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Peers select exactly the observed identities (several may share one selector
    /// when it selects nobody else). Widening is zero.
    #[default]
    Exact,
    /// Peers select the labels observed peers share with other workloads (e.g.
    /// `org=empire` rather than `class=tiefighter`); what that adds is listed.
    Labels,
    /// Peers select whole namespaces; what that adds is listed.
    Namespace,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Exact => "exact",
            Level::Labels => "labels",
            Level::Namespace => "namespace",
        }
    }
}

impl FromStr for Level {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "exact" => Ok(Level::Exact),
            "labels" => Ok(Level::Labels),
            "namespace" => Ok(Level::Namespace),
            other => Err(format!("unknown level {other:?}; expected exact, labels or namespace")),
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What backs one rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// The service-graph edges the rule covers (sorted).
    pub edges: Vec<EdgeKey>,
    /// Observed peer identities (sorted).
    pub peers: Vec<Identity>,
    /// Observed external addresses (sorted), for CIDR / FQDN / world peers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpAddr>,
    pub connections: u64,
    pub bytes: u64,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
    /// One entry per HTTP rule of an L7 rule ([`Rule::http`]), in the same order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpEvidence>,
}

/// What backs one HTTP rule: the requests it stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpEvidence {
    pub rule: HttpRule,
    pub requests: u64,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
    /// Distinct observed paths the rule covers (1 for an exact path).
    pub paths: u64,
    /// The rule is a prefix generalized from `paths` observed paths sharing it: it
    /// also allows paths under it that were never seen.
    #[serde(default)]
    pub generalized: bool,
}

/// Why a rule was held back for explicit confirmation (learning hygiene).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HygieneFlag {
    /// The peer touched many distinct ports of this workload: looks like a port scan.
    PortScan,
    /// Egress to a cloud instance-metadata address (credential theft path).
    CloudMetadata,
    /// External egress that no approved policy of this workload allowed before.
    NewExternalEgress,
}

impl HygieneFlag {
    pub fn describe(self) -> &'static str {
        match self {
            HygieneFlag::PortScan => "the peer touched many distinct ports of this workload (possible port scan)",
            HygieneFlag::CloudMetadata => "egress to a cloud instance-metadata address (credential theft path)",
            HygieneFlag::NewExternalEgress => "external egress not allowed by any approved policy of this workload",
        }
    }
}

/// One rule of a proposal with its provenance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposedRule {
    /// Stable within a proposal ("ingress-0", "egress-3"); approve requests name
    /// flagged rules by it.
    pub id: String,
    pub direction: Direction,
    pub rule: Rule,
    pub evidence: Evidence,
    /// Non-empty: held back until an analyst confirms the rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<HygieneFlag>,
    /// Whether the rule is part of [`Proposal::policy`] (false while flagged).
    pub included: bool,
    /// (peer, port) pairs this rule allows that were never observed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub widens: Vec<WidenedPair>,
    /// Number of widened pairs, when `widens` is truncated.
    pub widens_total: u64,
}

/// A (peer identity, port) a rule allows beyond the evidence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WidenedPair {
    pub peer: Identity,
    pub port: PortRange,
}

/// Whether the learning window has settled for this workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Convergence {
    /// No new edge for the target during the last `quiet_period_ms`.
    pub converged: bool,
    /// When the target's newest edge first appeared.
    pub last_new_edge_unix_ms: Option<i64>,
    pub quiet_period_ms: i64,
}

/// How serious a lint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
}

/// A known pitfall the policy would hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LintCode {
    /// Egress is covered but DNS (53) is not allowed.
    DnsEgressMissing,
    /// FQDN rules need DNS egress to work at all.
    FqdnWithoutDns,
    /// Ingress is covered but health probes from the host (kubelet) are not allowed.
    HostProbesMissing,
    /// A monitoring scraper exists that this policy would cut off.
    ScraperMissing,
    /// An ingress controller exists that this policy would cut off from a backend.
    IngressControllerMissing,
    /// Egress is covered and the Kubernetes API server is not allowed.
    ApiServerMissing,
    /// A rule allows all of `world`.
    WorldAllowed,
    /// Nothing was observed for this workload: the policy denies everything.
    NoTraffic,
    /// Some rules are held back for confirmation.
    RulesNeedConfirmation,
    /// An HTTP port stays L4: what was seen there cannot be narrowed to HTTP rules
    /// (TLS or other protocols, too many paths, an incomplete path list).
    HttpNotNarrowed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lint {
    pub code: LintCode,
    pub severity: Severity,
    pub message: String,
}

/// A deployed rule nobody used for a while: suggested for removal (drift).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovalSuggestion {
    pub direction: Direction,
    pub rule: Rule,
    /// Last time traffic it covers was seen; `None` = never.
    pub last_used_unix_ms: Option<i64>,
}

/// The learning window a proposal was made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub from_unix_ms: i64,
    pub to_unix_ms: i64,
}

/// A synthesized policy for one workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub target: Identity,
    /// Human name of the workload (inventory / owner name, else the identity).
    pub workload: String,
    pub level: Level,
    pub window: Window,
    /// The policy made of the included rules.
    pub policy: Policy,
    pub rules: Vec<ProposedRule>,
    /// Unobserved (peer, port) pairs the policy allows, over all rules.
    pub widening_total: u64,
    pub convergence: Convergence,
    pub lints: Vec<Lint>,
    /// Drift: deployed rules unused for the configured period.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removals: Vec<RemovalSuggestion>,
}

/// Where a proposal version is in review.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProposalStatus {
    Proposed,
    Approved,
    Rejected,
    Deployed,
    /// A newer version for the same workload replaced it before a decision.
    Superseded,
}

impl ProposalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ProposalStatus::Proposed => "proposed",
            ProposalStatus::Approved => "approved",
            ProposalStatus::Rejected => "rejected",
            ProposalStatus::Deployed => "deployed",
            ProposalStatus::Superseded => "superseded",
        }
    }
}

impl FromStr for ProposalStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "proposed" => ProposalStatus::Proposed,
            "approved" => ProposalStatus::Approved,
            "rejected" => ProposalStatus::Rejected,
            "deployed" => ProposalStatus::Deployed,
            "superseded" => ProposalStatus::Superseded,
            other => return Err(format!("unknown proposal status {other:?}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        for l in [Level::Exact, Level::Labels, Level::Namespace] {
            assert_eq!(l.as_str().parse::<Level>(), Ok(l));
        }
        for s in [
            ProposalStatus::Proposed,
            ProposalStatus::Approved,
            ProposalStatus::Rejected,
            ProposalStatus::Deployed,
            ProposalStatus::Superseded,
        ] {
            assert_eq!(s.as_str().parse::<ProposalStatus>(), Ok(s));
            assert_eq!(serde_json::to_value(s).expect("serializes"), serde_json::json!(s.as_str()));
        }
        assert!("wide".parse::<Level>().is_err());
    }
}
