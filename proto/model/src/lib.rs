//! Bulkhead's domain vocabulary, shared by every component: [`Labels`] describe a
//! workload, an [`Identity`] numbers one security-relevant label set, an [`Endpoint`]
//! is one running instance, a [`Flow`] is what a collector saw and an [`Edge`] is the
//! service-graph fact the learner keeps. Plain data with serde, no I/O, so policy
//! synthesis can depend on it and stay pure.
#![forbid(unsafe_code)]

pub mod edge;
pub mod endpoint;
pub mod flow;
pub mod identity;
pub mod labels;
pub mod node_policy;
pub mod policy;
pub mod policy_delta;
pub mod proposal;
#[cfg(feature = "proto")]
pub mod proto;

pub use edge::{Edge, EdgeHttp, EdgeHttpRequest, EdgeKey, MAX_HTTP_PATHS_PER_EDGE};
pub use endpoint::{CgroupFact, EndpointFact, InterfaceAddress};
pub use flow::{
    Direction, DnsAnswer, Flow, FlowBatch, FlowHttp, HttpRequestCount, LossCounters, MAX_HTTP_PER_FLOW, Protocol,
    Verdict,
};
pub use identity::{Identity, ReservedIdentity};
pub use labels::{LabelError, Labels};
pub use node_policy::{
    EndpointCgroup, EnforcerHello, EnforcerLoss, EnforcerMessage, HttpRequestLine, IpcacheEntry,
    MAX_HTTP_LINE_PATH_BYTES, NodePolicy, NodePolicyError, NodeRule, PolicyAck, PolicyAckStatus, PolicyEndpoint,
    RuleCounter, RuleKey, RuleRef, RuleVerdict, VerdictEvent, VerdictReport,
};
pub use policy::{
    HttpPath, HttpRule, HttpRuleError, LabelSelector, MAX_HTTP_METHOD_LEN, MAX_HTTP_PATH_LEN, Peer, Policy, PortRange,
    RolloutMode, Rule, SelectorOperator, SelectorRequirement,
};
pub use policy_delta::{DeltaError, NodePolicyDelta, PolicyUpdate};
pub use proposal::{
    Convergence, Evidence, HttpEvidence, HygieneFlag, Level, Lint, LintCode, Proposal, ProposalStatus, ProposedRule,
    RemovalSuggestion, Severity, WidenedPair, Window,
};
