//! Wiring of the learner process: store, identity resolution (inventory and, when
//! configured, Kubernetes watchers), gRPC and HTTP servers and background retention,
//! all on one tokio runtime. Tests start it in-process on port 0 through [`start`] (or
//! [`start_with_kube`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use bulkhead_proto::v1::flow_ingest_server::FlowIngestServer;
use bulkhead_proto::v1::policy_stream_server::PolicyStreamServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use crate::distribute::{Distributor, PolicyStreamService, Recorder};
use crate::export::import_network_policy;
use crate::grpc::ingest::{Enrollment, IngestService, unix_ms};
use crate::identity::inventory::Inventory;
use crate::identity::kube::{self, KubeConfigSource, KubeStatus, KubeWatchers};
use crate::identity::{IdentityCache, Resolver};
use crate::metrics::Metrics;
use crate::policy::{PolicyConfig, PolicyService, SynthesisRequest};
use crate::store::{ClusterPolicyRow, Store};
use crate::web::{self, AppState, AuthConfig};

/// gRPC health service name that reports the Kubernetes source: `SERVING` while every
/// watch is listed and working, `NOT_SERVING` while one fails (e.g. an RBAC denial) or
/// has not listed yet. Not registered when no cluster is configured.
pub const KUBE_HEALTH_SERVICE: &str = "bulkhead.kube";

/// How long (node, boot, seq) dedupe records are kept.
const BATCH_RECORD_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;

/// What a learner needs to run.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `sqlite://path.db` or `postgres://…`.
    pub db_url: String,
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub inventory: Option<PathBuf>,
    pub enrollment: Enrollment,
    /// Largest encoded FlowBatch accepted.
    pub max_batch_bytes: usize,
    /// How long recorded flows are kept (edges are kept forever).
    pub flow_retention: Duration,
    /// Synthesis defaults and the background re-synthesis period.
    pub policy: PolicyConfig,
    /// UI sessions and cookies.
    pub auth: AuthConfig,
    /// mTLS on the agents' gRPC port (see [`bulkhead_proto::tls::server_config`]):
    /// client certificates required, each stream admitted only for the node its
    /// certificate names. `None` serves plaintext and believes the node an agent
    /// claims (`--insecure-grpc`; in-process tests).
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

/// How often the Kubernetes NetworkPolicies seen by the watchers are re-imported into
/// the store (only when the watched state changed).
const CLUSTER_POLICY_IMPORT_EVERY: Duration = Duration::from_secs(10);

/// Node policies are recompiled at least this often.
const RECOMPILE_EVERY: Duration = Duration::from_secs(5);

/// Largest policy snapshot sent to an enforcer (NodePolicy limits stay well below).
const MAX_POLICY_MESSAGE_BYTES: usize = 256 << 20;

/// A started learner.
#[derive(Debug)]
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub store: Store,
    /// Who is who: inventory, Kubernetes view, nodes' endpoints, conflicts.
    pub resolver: Arc<RwLock<Resolver>>,
    /// The Kubernetes watchers, when a cluster is configured.
    pub kube: Option<KubeWatchers>,
    /// This learner's metrics (served by [`Running::serve_metrics`]).
    pub metrics: Arc<Metrics>,
    distributor: Distributor,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops serving at once (a crash, as far as agents can tell).
    pub fn abort(self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(k) = &self.kube {
            k.abort();
        }
    }

    /// The Kubernetes source's health, when a cluster is configured.
    pub fn kube_status(&self) -> Option<KubeStatus> {
        self.kube.as_ref().map(KubeWatchers::status)
    }

    /// Serves `GET /metrics` on `addr`, a listener of its own: the UI port answers only
    /// to sessions and API tokens. Returns the bound address; the server runs with
    /// the learner's other tasks ([`Running::wait`], [`Running::abort`]).
    pub async fn serve_metrics(&mut self, addr: SocketAddr) -> anyhow::Result<SocketAddr> {
        let (bound, serve) = crate::metrics::bind(addr, self.metrics.clone(), self.distributor.clone())
            .await
            .with_context(|| format!("binding metrics on {addr}"))?;
        self.tasks.push(tokio::spawn(async move {
            if let Err(err) = serve.await {
                tracing::error!(error = %err, "Metrics server stopped.");
            }
        }));
        Ok(bound)
    }

    /// Waits until any server task ends (they normally run forever).
    pub async fn wait(mut self) {
        let (_, _, rest) = futures::future::select_all(self.tasks.iter_mut()).await;
        for t in rest {
            t.abort();
        }
    }
}

/// Starts a learner with the inventory as its only identity source.
pub async fn start(cfg: ServerConfig) -> anyhow::Result<Running> {
    start_with_kube(cfg, None).await
}

/// Starts a learner that also watches the Kubernetes cluster `kube_source` names (both
/// sources run at once). A configuration that cannot be loaded fails the start; an API
/// server that is unreachable or refuses access does not — the watchers retry, and log
/// and report ([`Running::kube_status`], [`KUBE_HEALTH_SERVICE`]) what is wrong.
pub async fn start_with_kube(cfg: ServerConfig, kube_source: Option<KubeConfigSource>) -> anyhow::Result<Running> {
    let kube_client = match &kube_source {
        Some(source) => Some(kube::connect(source).await.context("configuring the Kubernetes source")?),
        None => None,
    };
    let inventory = match &cfg.inventory {
        Some(p) => Inventory::load(p).with_context(|| format!("loading inventory {}", p.display()))?,
        None => Inventory::default(),
    };
    tracing::info!(workloads = inventory.workloads().len(), "Loaded inventory.");
    let policy_inventory = Arc::new(inventory.clone());
    let store = Store::open(&cfg.db_url).await.context("opening the store")?;

    // Endpoints reported before a restart keep resolving until agents send new ones.
    let mut resolver = Resolver::new(inventory);
    let mut by_node: std::collections::BTreeMap<String, Vec<bulkhead_model::EndpointFact>> = Default::default();
    for row in store.endpoints().await.context("loading endpoints")? {
        by_node.entry(row.node_id).or_default().push(row.fact);
    }
    for (node, facts) in by_node {
        resolver.update_node(&node, facts);
    }

    let resolver = Arc::new(RwLock::new(resolver));
    let kube_watchers = kube_client.map(|client| KubeWatchers::spawn(client, resolver.clone()));
    let metrics = Metrics::new();
    let ingest = IngestService {
        store: store.clone(),
        resolver: resolver.clone(),
        identities: Arc::new(IdentityCache::new(store.clone())),
        enrollment: cfg.enrollment,
        max_batch_bytes: cfg.max_batch_bytes,
        metrics: metrics.clone(),
    };
    let grpc_listener =
        TcpListener::bind(cfg.grpc_listen).await.with_context(|| format!("binding gRPC on {}", cfg.grpc_listen))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_listener =
        TcpListener::bind(cfg.http_listen).await.with_context(|| format!("binding HTTP on {}", cfg.http_listen))?;
    let http_addr = http_listener.local_addr()?;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<FlowIngestServer<IngestService>>().await;
    let mut tasks = Vec::new();
    if let Some(watchers) = &kube_watchers {
        let mut status = watchers.subscribe();
        let reporter = health_reporter.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let healthy = status.borrow_and_update().healthy();
                let serving = if healthy {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                reporter.set_service_status(KUBE_HEALTH_SERVICE, serving).await;
                if status.changed().await.is_err() {
                    break;
                }
            }
        }));
    }
    let distributor = Distributor::with_metrics(metrics.clone());
    let policy_stream = PolicyStreamService {
        distributor: distributor.clone(),
        recorder: Some(Recorder { store: store.clone(), distributor: distributor.clone(), enrollment: cfg.enrollment }),
    };
    health_reporter.set_serving::<PolicyStreamServer<PolicyStreamService>>().await;
    let grpc = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(PolicyStreamServer::new(policy_stream).max_encoding_message_size(MAX_POLICY_MESSAGE_BYTES))
        .add_service(
            FlowIngestServer::new(ingest)
                .max_decoding_message_size(cfg.max_batch_bytes)
                .max_encoding_message_size(1 << 20),
        );
    let grpc_task = match cfg.tls.clone() {
        Some(tls) => {
            tracing::info!(%grpc_addr, "Agents' gRPC requires client certificates (mTLS).");
            tokio::spawn(log_stop(grpc.serve_with_incoming(crate::grpc::tls::incoming(grpc_listener, tls))))
        }
        None => {
            tracing::warn!(
                %grpc_addr,
                "Agents' gRPC is PLAINTEXT and unauthenticated: anyone who reaches this port can pose as any node."
            );
            tokio::spawn(log_stop(grpc.serve_with_incoming(TcpListenerStream::new(grpc_listener))))
        }
    };

    let policy_changed = Arc::new(tokio::sync::Notify::new());
    let policy = PolicyService::new(store.clone(), policy_inventory.clone(), cfg.policy.clone())
        .with_resolver(resolver.clone())
        .notify_on_change(policy_changed.clone());
    let state = AppState::new(store.clone(), policy.clone(), cfg.auth.clone());
    tasks.push(tokio::spawn(prune_sessions(state.clone())));
    // Peer addresses feed the per-address login throttle.
    let app = web::router(state)
        .layer(axum::middleware::from_fn_with_state(metrics.clone(), crate::metrics::track_http))
        .into_make_service_with_connect_info::<SocketAddr>();
    let http_task = tokio::spawn(async move {
        if let Err(err) = axum::serve(http_listener, app).await {
            tracing::error!(error = %err, "HTTP server stopped.");
        }
    });

    let retention_store = store.clone();
    let retention = cfg.flow_retention;
    let retention_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60).min(retention.max(Duration::from_secs(1))));
        loop {
            tick.tick().await;
            let cutoff = unix_ms() - retention.as_millis() as i64;
            if let Err(err) = retention_store.prune_flows(cutoff).await {
                tracing::warn!(error = %err, "Pruning flows failed; will retry.");
            }
            // DNS answers age out with the flows they explain.
            if let Err(err) = retention_store.prune_dns_answers(cutoff).await {
                tracing::warn!(error = %err, "Pruning DNS answers failed; will retry.");
            }
            // Dedupe records only need to outlive the agents' spools; a week is far
            // beyond any spool, and the store keeps a per-boot watermark anyway.
            if let Err(err) = retention_store.prune_batch_records(unix_ms() - BATCH_RECORD_RETENTION_MS).await {
                tracing::warn!(error = %err, "Pruning batch records failed; will retry.");
            }
        }
    });
    if let Some(every) = cfg.policy.synthesize_every {
        tasks.push(tokio::spawn(synthesize_periodically(policy, every)));
    }
    if kube_watchers.is_some() {
        tasks.push(tokio::spawn(import_cluster_policies(store.clone(), resolver.clone())));
    }
    tasks.push(tokio::spawn(distribute(
        distributor.clone(),
        store.clone(),
        policy_inventory,
        resolver.clone(),
        policy_changed,
    )));
    tracing::info!(%grpc_addr, %http_addr, "Learner serving.");
    tasks.extend([grpc_task, http_task, retention_task]);
    Ok(Running { grpc_addr, http_addr, store, resolver, kube: kube_watchers, metrics, distributor, tasks })
}

/// Runs the gRPC server; its end is an error worth logging (it normally runs forever).
async fn log_stop(serve: impl std::future::Future<Output = Result<(), tonic::transport::Error>>) {
    if let Err(err) = serve.await {
        tracing::error!(error = %err, "gRPC server stopped.");
    }
}

/// Deletes expired sessions and forgets idle login-throttle keys, once a minute.
async fn prune_sessions(state: AppState) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        match state.store.prune_expired_sessions(unix_ms()).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(sessions = n, "Pruned expired sessions."),
            Err(err) => tracing::warn!(error = %err, "Pruning sessions failed; will retry."),
        }
        state.login_throttle.forget_idle();
    }
}

/// Recompiles node policies when a decision or rollout change says so, and at least
/// every [`RECOMPILE_EVERY`] (endpoints, identities and DNS answers change without
/// one); only nodes whose content changed get a new version.
async fn distribute(
    distributor: Distributor,
    store: Store,
    inventory: Arc<Inventory>,
    resolver: Arc<RwLock<Resolver>>,
    changed: Arc<tokio::sync::Notify>,
) {
    let mut tick = tokio::time::interval(RECOMPILE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = changed.notified() => {}
        }
        match distributor.recompile(&store, &inventory, Some(&resolver), unix_ms()).await {
            Ok(nodes) => {
                for node in nodes {
                    let Some(p) = distributor.current(&node) else { continue };
                    if let Err(err) = store.set_desired_version(&node, p.version, unix_ms()).await {
                        tracing::warn!(node = %node, error = %err, "Recording the desired policy version failed.");
                    }
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "Compiling node policies failed; enforcers keep their last policy.")
            }
        }
    }
}

/// Keeps proposals fresh: new workloads get proposals, approved ones drift proposals.
async fn synthesize_periodically(policy: PolicyService, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick fires at once; give agents one period to report first.
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(err) = policy.synthesize(&SynthesisRequest::default(), unix_ms()).await {
            tracing::warn!(error = %err, "Background synthesis failed; will retry.");
        }
    }
}

/// Mirrors the cluster's NetworkPolicies into the store (source `kubernetes`), so the
/// policy already deployed there is shown next to proposals. Objects that cannot be
/// represented are logged and left out; the rest is still imported.
async fn import_cluster_policies(store: Store, resolver: Arc<RwLock<Resolver>>) {
    let mut tick = tokio::time::interval(CLUSTER_POLICY_IMPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut imported_generation = None;
    loop {
        tick.tick().await;
        let (generation, rows) = {
            let r = resolver.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            let kube = r.kube();
            // Until everything is listed once, "no policies" may just mean "not yet".
            if !kube.is_ready() || imported_generation == Some(kube.generation()) {
                continue;
            }
            let rows: Vec<ClusterPolicyRow> = kube.network_policies().filter_map(cluster_policy_row).collect();
            (kube.generation(), rows)
        };
        match store.replace_cluster_policies("kubernetes", rows, unix_ms()).await {
            Ok(_) => imported_generation = Some(generation),
            Err(err) => tracing::warn!(error = %err, "Importing cluster NetworkPolicies failed; will retry."),
        }
    }
}

fn cluster_policy_row(np: &k8s_openapi::api::networking::v1::NetworkPolicy) -> Option<ClusterPolicyRow> {
    let meta = &np.metadata;
    let (namespace, name) = (meta.namespace.clone()?, meta.name.clone()?);
    match import_network_policy(np) {
        Ok((policy, warnings)) => {
            for w in &warnings {
                tracing::info!(namespace = %namespace, name = %name, warning = %w, "NetworkPolicy imported incompletely.");
            }
            Some(ClusterPolicyRow {
                namespace,
                name,
                uid: meta.uid.clone().unwrap_or_default(),
                resource_version: meta.resource_version.clone().unwrap_or_default(),
                policy,
                raw: serde_json::to_value(np).unwrap_or(serde_json::Value::Null),
            })
        }
        Err(err) => {
            tracing::warn!(namespace = %namespace, name = %name, error = %err, "NetworkPolicy cannot be imported.");
            None
        }
    }
}
