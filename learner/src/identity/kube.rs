//! Kubernetes as an identity source: one `kube` watcher per kind (Pods, Namespaces,
//! Services, NetworkPolicies) feeds the pure [`KubeSnapshot`] inside the shared
//! [`Resolver`], next to the inventory (both may run at once; see the resolver's docs
//! for who wins when they disagree).
//!
//! The watchers own resourceVersions, bookmarks and re-lists: a watch that breaks is
//! resumed where it left off, and one that has expired (410 Gone, e.g. after an API
//! server restart) is listed again, the snapshot replacing the kind's objects at the
//! list's end so that objects deleted meanwhile disappear. Errors are retried with
//! `kube`'s default backoff, never fatal: an RBAC denial is logged once as an error
//! that names the missing permission, shown in [`KubeStatus`] (and so in the gRPC health
//! service `bulkhead.kube`), and retried until someone grants it.
//!
//! The learner needs `get`, `list` and `watch` on `pods`, `namespaces`, `services` (core
//! group) and `networkpolicies` (`networking.k8s.io`), cluster-wide.

mod state;
#[cfg(test)]
pub(crate) mod tests;

use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::config::{InClusterError, InferConfigError, KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use self::state::{
    INSTANCE_UNIQUE_LABELS, KubeKind, KubePod, KubeService, KubeServicePort, KubeSnapshot, NAMESPACE_LABELS_PREFIX,
    NAMESPACE_NAME_LABEL, ObjectKey, SERVICE_ACCOUNT_KEY, identity_labels, is_reserved_key, pod_uid_from_cgroup,
    workload_name,
};
use super::Resolver;

/// Most watch events applied under one write lock of the resolver: enough to absorb
/// a re-list quickly, small enough that flow ingest never waits long.
const MAX_EVENTS_PER_LOCK: usize = 256;

/// Where the learner finds its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeConfigSource {
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
    /// The pod's service account (`KUBERNETES_SERVICE_HOST` and the mounted token).
    InCluster,
    /// `$KUBECONFIG` or `~/.kube/config`, else in-cluster — what `kubectl` would use.
    Infer,
}

/// Why the learner could not set up its Kubernetes client. Failures of the API server
/// itself (unreachable, forbidden) are not errors here but [`KubeStatus`].
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig { path: PathBuf, source: KubeconfigError },
    #[error("in-cluster Kubernetes configuration (is the learner running in a pod?): {0}")]
    InCluster(#[from] InClusterError),
    #[error("no Kubernetes configuration found: {0}")]
    Infer(#[from] InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// Builds a client for `source`. Does not contact the API server.
pub async fn connect(source: &KubeConfigSource) -> Result<Client, KubeError> {
    let config = match source {
        KubeConfigSource::Kubeconfig(path) => {
            let err = |source| KubeError::Kubeconfig { path: path.clone(), source };
            let kubeconfig = Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.map_err(err)?
        }
        KubeConfigSource::InCluster => kube::Config::incluster()?,
        KubeConfigSource::Infer => kube::Config::infer().await?,
    };
    tracing::info!(url = %config.cluster_url, "Using Kubernetes API server.");
    Client::try_from(config).map_err(KubeError::Client)
}

// === status ===

/// Health of one kind's watch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KindStatus {
    /// The initial list completed at least once.
    pub synced: bool,
    /// Complete lists started (1 at start; more after expired watches).
    pub lists: u64,
    /// Watch events applied.
    pub events: u64,
    /// The current failure, with what to do about it; `None` once it works again.
    pub error: Option<String>,
    /// Failures so far.
    pub errors: u64,
}

/// Health of the Kubernetes source as a whole.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KubeStatus {
    pub pods: KindStatus,
    pub namespaces: KindStatus,
    pub services: KindStatus,
    pub network_policies: KindStatus,
}

impl KubeStatus {
    pub fn kind(&self, kind: KubeKind) -> &KindStatus {
        match kind {
            KubeKind::Pods => &self.pods,
            KubeKind::Namespaces => &self.namespaces,
            KubeKind::Services => &self.services,
            KubeKind::NetworkPolicies => &self.network_policies,
        }
    }

    fn kind_mut(&mut self, kind: KubeKind) -> &mut KindStatus {
        match kind {
            KubeKind::Pods => &mut self.pods,
            KubeKind::Namespaces => &mut self.namespaces,
            KubeKind::Services => &mut self.services,
            KubeKind::NetworkPolicies => &mut self.network_policies,
        }
    }

    /// Every kind listed and none failing now.
    pub fn healthy(&self) -> bool {
        KubeKind::ALL.iter().all(|k| self.kind(*k).synced && self.kind(*k).error.is_none())
    }

    /// `kind: error` for every failing kind.
    pub fn errors(&self) -> Vec<(KubeKind, &str)> {
        KubeKind::ALL.iter().filter_map(|k| Some((*k, self.kind(*k).error.as_deref()?))).collect()
    }
}

/// What an operator should read for a failed watch: for RBAC and authentication
/// failures, what to grant or fix; otherwise the error itself.
pub fn describe_error(kind: KubeKind, err: &watcher::Error) -> String {
    let status = match err {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::WatchError(s) => Some(s),
        _ => None,
    };
    match status {
        Some(s) if s.code == 403 => {
            let group = match kind.api_group() {
                "" => "the core API group".to_owned(),
                g => format!("API group {g}"),
            };
            format!(
                "forbidden: the learner may not list and watch {res} cluster-wide; grant the verbs get, list and watch \
                 on resource {res} in {group} to its service account or kubeconfig user (API server said: {msg})",
                res = kind.resource(),
                msg = s.message,
            )
        }
        Some(s) if s.code == 401 => format!(
            "unauthorized: the API server rejected the learner's credentials while listing {}; check the kubeconfig's \
             token or certificate, or the service account token (API server said: {})",
            kind.resource(),
            s.message
        ),
        _ => format!("watching {}: {err}", kind.resource()),
    }
}

/// A 410 Gone: the watch expired and the watcher lists again. Routine, not a failure.
fn is_expired(err: &watcher::Error) -> bool {
    matches!(err, watcher::Error::WatchError(s) if s.code == 410)
        || matches!(err, watcher::Error::WatchStartFailed(kube::Error::Api(s)) if s.code == 410)
}

// === watchers ===

/// The running watch tasks. Dropping this stops them.
#[derive(Debug)]
pub struct KubeWatchers {
    tasks: Vec<JoinHandle<()>>,
    status: watch::Receiver<KubeStatus>,
}

impl KubeWatchers {
    /// Starts one watch task per kind, feeding `resolver`.
    pub fn spawn(client: Client, resolver: Arc<RwLock<Resolver>>) -> Self {
        Self::spawn_with(client, resolver, watcher::Config::default())
    }

    /// [`Self::spawn`] with a watcher configuration (e.g. a short watch timeout).
    pub fn spawn_with(client: Client, resolver: Arc<RwLock<Resolver>>, config: watcher::Config) -> Self {
        let (tx, status) = watch::channel(KubeStatus::default());
        let tx = Arc::new(tx);
        let tasks = vec![
            tokio::spawn(run_kind(
                Api::<Pod>::all(client.clone()),
                config.clone(),
                KubeKind::Pods,
                resolver.clone(),
                tx.clone(),
                KubeSnapshot::apply_pod,
            )),
            tokio::spawn(run_kind(
                Api::<Namespace>::all(client.clone()),
                config.clone(),
                KubeKind::Namespaces,
                resolver.clone(),
                tx.clone(),
                KubeSnapshot::apply_namespace,
            )),
            tokio::spawn(run_kind(
                Api::<Service>::all(client.clone()),
                config.clone(),
                KubeKind::Services,
                resolver.clone(),
                tx.clone(),
                KubeSnapshot::apply_service,
            )),
            tokio::spawn(run_kind(
                Api::<NetworkPolicy>::all(client),
                config,
                KubeKind::NetworkPolicies,
                resolver,
                tx,
                KubeSnapshot::apply_network_policy,
            )),
        ];
        Self { tasks, status }
    }

    /// The current status.
    pub fn status(&self) -> KubeStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change.
    pub fn subscribe(&self) -> watch::Receiver<KubeStatus> {
        self.status.clone()
    }

    /// Stops the watch tasks.
    pub fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for KubeWatchers {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Watches one kind forever, applying its events to the resolver in batches.
async fn run_kind<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: KubeKind,
    resolver: Arc<RwLock<Resolver>>,
    status: Arc<watch::Sender<KubeStatus>>,
    apply: fn(&mut KubeSnapshot, Event<K>),
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let stream = watcher::watcher(api, config).default_backoff().ready_chunks(MAX_EVENTS_PER_LOCK);
    let mut stream = std::pin::pin!(stream);
    while let Some(items) = stream.next().await {
        let mut events = Vec::with_capacity(items.len());
        for item in items {
            match item {
                Ok(event) => events.push(event),
                Err(err) => {
                    // Events before the failure are applied first, in order.
                    apply_events(kind, &resolver, &status, std::mem::take(&mut events), apply);
                    report_error(kind, &status, &err);
                }
            }
        }
        apply_events(kind, &resolver, &status, events, apply);
    }
    // `watcher` streams never end; if this one did, say so rather than go quiet.
    tracing::error!(kind = %kind, "Kubernetes watch ended; this kind is no longer updated.");
    status.send_modify(|s| s.kind_mut(kind).error = Some(format!("the watch of {kind} ended unexpectedly")));
}

fn apply_events<K>(
    kind: KubeKind,
    resolver: &RwLock<Resolver>,
    status: &watch::Sender<KubeStatus>,
    events: Vec<Event<K>>,
    apply: fn(&mut KubeSnapshot, Event<K>),
) {
    if events.is_empty() {
        return;
    }
    let n = events.len() as u64;
    let lists = events.iter().filter(|e| matches!(e, Event::Init)).count() as u64;
    let done = events.iter().any(|e| matches!(e, Event::InitDone));
    let objects = resolver.write().unwrap_or_else(|p| p.into_inner()).update_kube(|snapshot| {
        for e in events {
            apply(snapshot, e);
        }
        match kind {
            KubeKind::Pods => snapshot.pods().count(),
            KubeKind::Namespaces => snapshot.namespaces().count(),
            KubeKind::Services => snapshot.services().count(),
            KubeKind::NetworkPolicies => snapshot.network_policies().count(),
        }
    });
    status.send_modify(|s| {
        let k = s.kind_mut(kind);
        if let Some(error) = k.error.take() {
            tracing::info!(kind = %kind, previous_error = %error, "Kubernetes watch works again.");
        }
        if done && !k.synced {
            tracing::info!(kind = %kind, objects, "Listed Kubernetes objects.");
        }
        k.synced |= done;
        k.lists += lists;
        k.events += n;
    });
}

fn report_error(kind: KubeKind, status: &watch::Sender<KubeStatus>, err: &watcher::Error) {
    if is_expired(err) {
        tracing::info!(kind = %kind, "Kubernetes watch expired (410 Gone); listing again.");
        return;
    }
    let message = describe_error(kind, err);
    status.send_modify(|s| {
        let k = s.kind_mut(kind);
        k.errors += 1;
        if k.error.as_deref() != Some(&message) {
            // Logged when it starts or changes; the backoff retries are quiet.
            tracing::error!(kind = %kind, error = %message, "Kubernetes watch failed; retrying with backoff.");
        } else {
            tracing::debug!(kind = %kind, error = %message, "Kubernetes watch still failing.");
        }
        k.error = Some(message);
    });
}
