//! Policy learning in the learner: gathering synthesis input from the store, storing
//! proposals, reviewing them, and replaying recorded flows against policies. The
//! decisions themselves are pure ([`bulkhead_synth`]); this module only moves data.
//!
//! * [`inputs`] — store rows → synthesis input (identities with names and kinds,
//!   edges, external peers, DNS answers by client, the active policy set);
//! * [`PolicyService::synthesize`] — run synthesis off the async runtime, store one
//!   version per changed workload;
//! * [`review`] — approve / reject / diff;
//! * [`replay`] — "what would this block?" over any time range;
//! * [`rollout`] — learn → monitor → enforce with its gates.

pub mod explain;
pub mod graph_view;
pub mod inputs;
pub mod replay;
pub mod review;
pub mod risk;
pub mod rollout;

use std::sync::Arc;

use bulkhead_model::{Identity, Level, Window};
use bulkhead_synth::Options;
use serde::{Deserialize, Serialize};

use crate::identity::Resolver;
use crate::identity::inventory::Inventory;
use crate::store::{ProposalSummary, Store, StoreError};

/// How long a learning window is unless a request says otherwise.
pub const DEFAULT_WINDOW_MS: i64 = 24 * 3600 * 1000;

/// Why a policy operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("proposal {id} does not exist")]
    NoSuchProposal { id: i64 },
    #[error("{0}")]
    Approve(#[from] bulkhead_synth::ApproveError),
    #[error("invalid request: {reason}")]
    InvalidRequest { reason: String },
    #[error("gate not met for identity {}: {reason}", target.0)]
    Gate { target: Identity, reason: String },
    #[error("this needs the {} role or higher", needed.as_str())]
    Forbidden { needed: crate::auth::Role },
    #[error("synthesis task failed: {reason}")]
    Task { reason: String },
}

/// What to synthesize.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SynthesisRequest {
    pub level: Option<Level>,
    /// Learning window length ending now (default [`DEFAULT_WINDOW_MS`]).
    pub window_ms: Option<i64>,
    /// Only these workloads (default: every workload with traffic or a policy).
    #[serde(default)]
    pub targets: Vec<Identity>,
}

/// Defaults for synthesis that operators configure once.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// Generalization level of automatic synthesis.
    pub level: Level,
    /// Learning window length.
    pub window_ms: i64,
    /// Converged = no new edge for this long.
    pub quiet_period_ms: i64,
    /// Deployed rules unused this long are suggested for removal.
    pub unused_after_ms: i64,
    /// Re-synthesize this often in the background (`None`: only on request). Keeps
    /// proposals fresh and turns new edges of approved workloads into drift proposals.
    pub synthesize_every: Option<std::time::Duration>,
    /// How the review queue ranks proposals (sensitive namespaces, rare ports).
    pub risk: risk::RiskConfig,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        let o = Options::default();
        Self {
            level: Level::Exact,
            window_ms: DEFAULT_WINDOW_MS,
            quiet_period_ms: o.quiet_period_ms,
            unused_after_ms: o.unused_after_ms,
            synthesize_every: None,
            risk: risk::RiskConfig::default(),
        }
    }
}

/// The learner's policy operations over one store.
#[derive(Debug, Clone)]
pub struct PolicyService {
    pub store: Store,
    pub inventory: Arc<Inventory>,
    pub config: PolicyConfig,
    /// The live identity view; its Kubernetes part says which workloads back a Service.
    pub resolver: Option<Arc<std::sync::RwLock<Resolver>>>,
    /// Woken after every decision or rollout change, so enforcers get the new policy
    /// without waiting for the periodic recompile.
    pub changed: Option<Arc<tokio::sync::Notify>>,
}

impl PolicyService {
    pub fn new(store: Store, inventory: Arc<Inventory>, config: PolicyConfig) -> Self {
        Self { store, inventory, config, resolver: None, changed: None }
    }

    /// With the live resolver (Service backends for lints).
    pub fn with_resolver(mut self, resolver: Arc<std::sync::RwLock<Resolver>>) -> Self {
        self.resolver = Some(resolver);
        self
    }

    /// Wake `n` after decisions and rollout changes.
    pub fn notify_on_change(mut self, n: Arc<tokio::sync::Notify>) -> Self {
        self.changed = Some(n);
        self
    }

    pub(crate) fn changed(&self) {
        if let Some(n) = &self.changed {
            n.notify_one();
        }
    }

    /// Label sets of the pods some Kubernetes Service selects.
    fn service_backends(&self) -> std::collections::HashSet<bulkhead_model::Labels> {
        let Some(r) = &self.resolver else { return Default::default() };
        // A poisoned lock still holds a consistent view (writers replace whole maps).
        let r = r.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        r.kube().service_backends().into_values().flatten().cloned().collect()
    }

    /// Synthesizes proposals from the window ending at `now_ms` and stores them: a new
    /// version only where the content changed (see `Store::put_proposal`). Workloads
    /// without traffic in the window and without an active policy are skipped — there
    /// is nothing to review for them yet.
    pub async fn synthesize(&self, req: &SynthesisRequest, now_ms: i64) -> Result<Vec<ProposalSummary>, PolicyError> {
        let window_ms = req.window_ms.unwrap_or(self.config.window_ms);
        if window_ms <= 0 {
            return Err(PolicyError::InvalidRequest { reason: format!("window_ms must be positive, got {window_ms}") });
        }
        let window = Window { from_unix_ms: now_ms.saturating_sub(window_ms), to_unix_ms: now_ms };
        let input = inputs::gather(&self.store, &self.inventory, &self.service_backends(), window).await?;
        let opts = Options {
            level: req.level.unwrap_or(self.config.level),
            window,
            quiet_period_ms: self.config.quiet_period_ms,
            unused_after_ms: self.config.unused_after_ms,
            targets: (!req.targets.is_empty()).then(|| req.targets.clone()),
            ..Options::default()
        };
        let started = std::time::Instant::now();
        let proposals = tokio::task::spawn_blocking(move || {
            let active: std::collections::HashSet<Identity> = input.active.iter().map(|a| a.target).collect();
            bulkhead_synth::synthesize(&input.as_input(), &opts)
                .into_iter()
                .filter(|p| active.contains(&p.target) || p.rules.iter().any(|r| !r.evidence.edges.is_empty()))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| PolicyError::Task { reason: e.to_string() })?;
        tracing::info!(
            proposals = proposals.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "Synthesized proposals."
        );
        let mut out = Vec::with_capacity(proposals.len());
        for p in &proposals {
            out.push(self.store.put_proposal(p, now_ms).await?.summary);
        }
        Ok(out)
    }
}

/// What to export.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExportRequest {
    /// `networkpolicy` (default) or `cilium`.
    pub format: Option<String>,
    /// One workload (identity): the policies that select it.
    pub target: Option<Identity>,
    /// One namespace.
    pub namespace: Option<String>,
    /// Export this proposal's policy instead of the active set.
    pub proposal: Option<i64>,
}

/// Exported YAML with everything the analyst must know about it.
#[derive(Debug, Clone, Serialize)]
pub struct ExportResponse {
    pub format: String,
    pub yaml: String,
    pub warnings: Vec<String>,
    /// Policies that could not be exported, and why.
    pub errors: Vec<String>,
}

impl PolicyService {
    /// Exports the active policy set (or one proposal) as Kubernetes YAML.
    pub async fn export(&self, req: &ExportRequest) -> Result<ExportResponse, PolicyError> {
        use crate::export::{Format, Scope, export_yaml};
        let format = match req.format.as_deref().unwrap_or("networkpolicy") {
            "networkpolicy" | "NetworkPolicy" | "k8s" => Format::NetworkPolicy,
            "cilium" | "CiliumNetworkPolicy" | "cnp" => Format::CiliumNetworkPolicy,
            other => {
                return Err(PolicyError::InvalidRequest {
                    reason: format!("unknown format {other:?}; expected networkpolicy or cilium"),
                });
            }
        };
        let policies: Vec<bulkhead_model::Policy> = match req.proposal {
            Some(id) => {
                let r = self.proposal(id).await?;
                vec![r.approved_policy.unwrap_or(r.proposal.policy)]
            }
            None => {
                // Per target the newest intent (approved over deployed).
                let mut by: std::collections::BTreeMap<Identity, (u32, bulkhead_model::Policy)> = Default::default();
                for a in self.store.active_policies().await? {
                    let slot = by.entry(a.target).or_insert((a.version, a.policy.clone()));
                    if a.version > slot.0 {
                        *slot = (a.version, a.policy);
                    }
                }
                by.into_values().map(|(_, p)| p).collect()
            }
        };
        let scope = match (&req.target, &req.namespace) {
            (Some(_), Some(_)) => {
                return Err(PolicyError::InvalidRequest { reason: "give a target or a namespace, not both".into() });
            }
            (Some(id), None) => {
                let labels =
                    self.store.identities().await?.into_iter().find(|r| r.id == *id).map(|r| r.labels).ok_or_else(
                        || PolicyError::InvalidRequest { reason: format!("identity {} does not exist", id.0) },
                    )?;
                Scope::Workload(labels)
            }
            (None, Some(ns)) => Scope::Namespace(ns.clone()),
            (None, None) => Scope::All,
        };
        let out = export_yaml(&policies, format, &scope);
        Ok(ExportResponse {
            format: format.kind().to_owned(),
            yaml: out.yaml,
            warnings: out.warnings.iter().map(ToString::to_string).collect(),
            errors: out.errors.iter().map(ToString::to_string).collect(),
        })
    }
}
