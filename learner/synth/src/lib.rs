//! Policy synthesis: the service graph in, least-privilege policy proposals out.
//!
//! Pure and deterministic by construction — this crate depends on the domain model and
//! collections only (see its Cargo.toml): no clock (callers pass the window), no I/O,
//! no randomness. That is what lets the property tests state the two promises every
//! proposal keeps:
//! * every edge observed in the window is allowed by the synthesized policy set
//!   (unless hygiene held it back for an analyst, and then it is listed as flagged);
//! * no edge between known workloads that was never observed is allowed — except what
//!   a generalizing [`Level`](bulkhead_model::Level) adds, and each rule lists exactly
//!   that as `widens`.
//!
//! Modules follow the pipeline: [`input`] → [`synthesize`] (with [`peers`] for workload
//! selectors, [`external`] for CIDR / FQDN peers, [`l7`] for HTTP rules, [`hygiene`],
//! [`lint`]) → proposals;
//! [`approve`] turns a reviewed proposal into the approved policy, [`diff`] compares
//! versions, [`evaluate`] replays connections against any policy set.
#![forbid(unsafe_code)]

pub mod approve;
pub mod diff;
pub mod evaluate;
mod evidence;
pub mod external;
pub mod hygiene;
pub mod index;
pub mod input;
pub mod l7;
pub mod lint;
pub mod naming;
pub mod peers;
pub mod synthesize;

pub use approve::{ApproveError, approved_policy};
pub use diff::{PolicyDiff, diff};
pub use evaluate::{Connection, Decision, Evaluator, SideVerdict};
pub use input::{
    ActivePolicy, CidrOptions, DnsObservation, ExternalObservation, IdentityInfo, IdentityKind, Input, Options,
};
pub use synthesize::synthesize;
