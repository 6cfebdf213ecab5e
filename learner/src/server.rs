//! Wiring of the learner process: store, identity resolution, gRPC and HTTP servers
//! and background retention, all on one tokio runtime. Tests start it in-process on
//! port 0 through [`start`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use bulkhead_proto::v1::flow_ingest_server::FlowIngestServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use crate::grpc::ingest::{Enrollment, IngestService, unix_ms};
use crate::identity::inventory::Inventory;
use crate::identity::{IdentityCache, Resolver};
use crate::store::Store;
use crate::web::{self, AppState};

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
}

/// A started learner.
#[derive(Debug)]
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub store: Store,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops serving at once (a crash, as far as agents can tell).
    pub fn abort(self) {
        for t in &self.tasks {
            t.abort();
        }
    }

    /// Waits until any server task ends (they normally run forever).
    pub async fn wait(mut self) {
        let (_, _, rest) = futures::future::select_all(self.tasks.iter_mut()).await;
        for t in rest {
            t.abort();
        }
    }
}

pub async fn start(cfg: ServerConfig) -> anyhow::Result<Running> {
    let inventory = match &cfg.inventory {
        Some(p) => Inventory::load(p).with_context(|| format!("loading inventory {}", p.display()))?,
        None => Inventory::default(),
    };
    tracing::info!(workloads = inventory.workloads().len(), "Loaded inventory.");
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

    let ingest = IngestService {
        store: store.clone(),
        resolver: Arc::new(RwLock::new(resolver)),
        identities: Arc::new(IdentityCache::new(store.clone())),
        enrollment: cfg.enrollment,
        max_batch_bytes: cfg.max_batch_bytes,
    };
    let grpc_listener =
        TcpListener::bind(cfg.grpc_listen).await.with_context(|| format!("binding gRPC on {}", cfg.grpc_listen))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_listener =
        TcpListener::bind(cfg.http_listen).await.with_context(|| format!("binding HTTP on {}", cfg.http_listen))?;
    let http_addr = http_listener.local_addr()?;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<FlowIngestServer<IngestService>>().await;
    let grpc = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(
            FlowIngestServer::new(ingest)
                .max_decoding_message_size(cfg.max_batch_bytes)
                .max_encoding_message_size(1 << 20),
        )
        .serve_with_incoming(TcpListenerStream::new(grpc_listener));
    let grpc_task = tokio::spawn(async move {
        if let Err(err) = grpc.await {
            tracing::error!(error = %err, "gRPC server stopped.");
        }
    });

    let app = web::router(AppState { store: store.clone() });
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
    tracing::info!(%grpc_addr, %http_addr, "Learner serving.");
    Ok(Running { grpc_addr, http_addr, store, tasks: vec![grpc_task, http_task, retention_task] })
}
