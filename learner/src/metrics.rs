//! Learner metrics in Prometheus text format, served on their own listener
//! (`--metrics-listen`, `GET /metrics`) like the agents' — never on the UI port: the
//! UI answers only to sessions and API tokens, and a scraper has neither.
//!
//! What is here is what an operator alerts on: batches and flows the ingest takes or
//! refuses, agent streams open, enforcers that do not run the policy they should,
//! policy compilations, verdict events kept and lost, UI/API answers by class, and
//! store failures on the agents' paths. Per-node collector and enforcer loss is not
//! repeated: each agent exports its own, and the learner's store holds the reported
//! numbers (`bulkhead enforcers`, the UI).
//!
//! Label values are fixed sets (`&'static str` chosen in code): no path, node or
//! identity ever becomes a label, so the number of series stays bounded however many
//! nodes and requests there are.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::distribute::Distributor;

/// How a flow batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Stored and acked.
    Stored,
    /// Already stored (a resend after a lost ack); acked, nothing written.
    Duplicate,
    /// Failed validation; acked `REJECTED` and lost (the agent counts it too).
    Rejected,
}

impl BatchOutcome {
    fn as_str(self) -> &'static str {
        match self {
            BatchOutcome::Stored => "stored",
            BatchOutcome::Duplicate => "duplicate",
            BatchOutcome::Rejected => "rejected",
        }
    }
}

/// Which part of the learner met a store failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreUser {
    /// Flow ingest (the batch stays with the agent and is resent).
    Ingest,
    /// Enforcer Hello/Ack/report recording.
    EnforcerStream,
    /// Gathering the inputs of a policy compilation.
    PolicyCompile,
}

impl StoreUser {
    fn as_str(self) -> &'static str {
        match self {
            StoreUser::Ingest => "ingest",
            StoreUser::EnforcerStream => "enforcer_stream",
            StoreUser::PolicyCompile => "policy_compile",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ComponentLabels {
    component: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    class: &'static str,
    status: &'static str,
}

/// All learner metrics. One per learner process (in-process test learners have their
/// own); shared as `Arc<Metrics>` by the ingest service, the [`Distributor`] and the
/// HTTP layer. Updated once per batch, message or request, never per flow.
#[derive(Debug, Default)]
pub struct Metrics {
    batches: Family<OutcomeLabels, Counter>,
    flows_stored: Counter,
    collector_streams: Gauge,
    enforcer_streams: Gauge,
    compiles: Counter,
    compile_failures: Counter,
    compile_last_seconds: Gauge<f64, AtomicU64>,
    compile_last_success: Gauge,
    verdict_events_recorded: Counter,
    backlog_dropped: Family<KindLabels, Counter>,
    http_requests: Family<HttpLabels, Counter>,
    store_errors: Family<ComponentLabels, Counter>,
}

impl Metrics {
    /// Metrics with every labelled counter but the HTTP ones present at zero: a series
    /// that appears only with its first increment hides that increment from `rate()`
    /// and `increase()`, exactly the events (rejections, losses, store failures) worth
    /// an alert.
    pub fn new() -> Arc<Self> {
        let m = Self::default();
        for outcome in [BatchOutcome::Stored, BatchOutcome::Duplicate, BatchOutcome::Rejected] {
            let _ = m.batches.get_or_create(&OutcomeLabels { outcome: outcome.as_str() });
        }
        for kind in ["verdict_event", "rule_hit"] {
            let _ = m.backlog_dropped.get_or_create(&KindLabels { kind });
        }
        for user in [StoreUser::Ingest, StoreUser::EnforcerStream, StoreUser::PolicyCompile] {
            let _ = m.store_errors.get_or_create(&ComponentLabels { component: user.as_str() });
        }
        Arc::new(m)
    }

    /// A flow batch was answered; `flows` stored by it (0 unless stored).
    pub fn batch(&self, outcome: BatchOutcome, flows: u64) {
        self.batches.get_or_create(&OutcomeLabels { outcome: outcome.as_str() }).inc();
        self.flows_stored.inc_by(flows);
    }

    /// Counts an open collector stream until the guard drops (the stream's task ends,
    /// however it ends).
    pub fn collector_stream(self: &Arc<Self>) -> StreamGuard {
        StreamGuard::open(self.clone(), |m| &m.collector_streams)
    }

    /// Counts an open enforcer stream until the guard drops.
    pub fn enforcer_stream(self: &Arc<Self>) -> StreamGuard {
        StreamGuard::open(self.clone(), |m| &m.enforcer_streams)
    }

    /// A policy compilation (gather, compile, publish) ended after `took`.
    pub fn compiled(&self, ok: bool, took: Duration) {
        self.compiles.inc();
        self.compile_last_seconds.set(took.as_secs_f64());
        if ok {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            self.compile_last_success.set(i64::try_from(now).unwrap_or(i64::MAX));
        } else {
            self.compile_failures.inc();
        }
    }

    /// Verdict events written to the store.
    pub fn verdict_events_recorded(&self, n: u64) {
        self.verdict_events_recorded.inc_by(n);
    }

    /// Verdict events and rule-hit rows thrown away by a stream's report backlog (full,
    /// or the stream ended while the store refused them).
    pub fn backlog_dropped(&self, events: u64, rule_hits: u64) {
        if events > 0 {
            self.backlog_dropped.get_or_create(&KindLabels { kind: "verdict_event" }).inc_by(events);
        }
        if rule_hits > 0 {
            self.backlog_dropped.get_or_create(&KindLabels { kind: "rule_hit" }).inc_by(rule_hits);
        }
    }

    /// A store call failed.
    pub fn store_error(&self, user: StoreUser) {
        self.store_errors.get_or_create(&ComponentLabels { component: user.as_str() }).inc();
    }

    fn registry(&self, distributor: &Distributor) -> Registry {
        let mut r = Registry::with_prefix("bulkhead_learner");
        r.register(
            "ingest_batches",
            "Flow batches answered, by outcome (stored, duplicate, rejected: failed validation, lost)",
            self.batches.clone(),
        );
        r.register("ingest_flows_stored", "Flows stored from collector batches", self.flows_stored.clone());
        r.register("collector_streams", "Collector flow streams open", self.collector_streams.clone());
        r.register("enforcer_streams", "Enforcer policy streams open", self.enforcer_streams.clone());
        let sync = distributor.sync_summary();
        let nodes: Gauge = Gauge::default();
        nodes.set(i64::try_from(sync.connected).unwrap_or(i64::MAX));
        r.register("enforcer_nodes_connected", "Nodes with an enforcer stream open", nodes);
        let out_of_sync: Gauge = Gauge::default();
        out_of_sync.set(i64::try_from(sync.out_of_sync).unwrap_or(i64::MAX));
        r.register(
            "enforcers_out_of_sync",
            "Connected enforcers whose applied policy version is not the desired one (rollout in \
             progress, or a rejected policy)",
            out_of_sync,
        );
        r.register("policy_compiles", "Node policy compilations run (gather, compile, publish)", self.compiles.clone());
        r.register(
            "policy_compile_failures",
            "Node policy compilations that failed; enforcers keep their last policy",
            self.compile_failures.clone(),
        );
        r.register(
            "policy_compile_last_duration_seconds",
            "How long the last node policy compilation took",
            self.compile_last_seconds.clone(),
        );
        r.register(
            "policy_compile_last_success_timestamp_seconds",
            "Unix time of the last successful node policy compilation (0: none yet)",
            self.compile_last_success.clone(),
        );
        r.register(
            "verdict_events_recorded",
            "Verdict events from enforcers written to the store",
            self.verdict_events_recorded.clone(),
        );
        r.register(
            "report_backlog_dropped",
            "Verdict events and rule-hit rows dropped while the store was unavailable (lost), by kind",
            self.backlog_dropped.clone(),
        );
        r.register(
            "http_requests",
            "UI and API requests answered, by route class and status class",
            self.http_requests.clone(),
        );
        r.register("store_errors", "Failed store calls on the agents' and compiler's paths", self.store_errors.clone());
        r
    }

    /// Prometheus text exposition; the enforcer sync gauges are read from
    /// `distributor` now.
    pub fn render(&self, distributor: &Distributor) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry(distributor));
        out
    }
}

/// Keeps a stream gauge raised while alive.
#[derive(Debug)]
pub struct StreamGuard {
    metrics: Arc<Metrics>,
    gauge: fn(&Metrics) -> &Gauge,
}

impl StreamGuard {
    fn open(metrics: Arc<Metrics>, gauge: fn(&Metrics) -> &Gauge) -> Self {
        gauge(&metrics).inc();
        Self { metrics, gauge }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        (self.gauge)(&self.metrics).dec();
    }
}

// === HTTP ===

/// The route class of a UI/API path: a handful of fixed values, so that neither ids in
/// paths nor a scanner's random URLs make new series.
fn route_class(path: &str) -> &'static str {
    let under = |prefix: &str| path == prefix || path.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'));
    if under("/api") {
        "api"
    } else if under("/static") {
        "static"
    } else if path == "/healthz" {
        "health"
    } else if under("/login") || under("/logout") || under("/account") {
        "auth"
    } else {
        "page"
    }
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Axum middleware counting every UI/API answer (`from_fn_with_state` around the
/// whole router, so errors, redirects to the login and unknown paths count too).
pub async fn track_http(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let class = route_class(request.uri().path());
    let response = next.run(request).await;
    let labels = HttpLabels { class, status: status_class(response.status()) };
    metrics.http_requests.get_or_create(&labels).inc();
    response
}

/// Binds the metrics listener (so a bad address fails the start) and returns the task
/// that serves `/metrics` on it, with the address it got.
pub async fn bind(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    distributor: Distributor,
) -> std::io::Result<(SocketAddr, impl Future<Output = std::io::Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let text = metrics.render(&distributor);
            async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text) }
        }),
    );
    tracing::info!(addr = %local, "Serving metrics.");
    Ok((local, async move { axum::serve(listener, app).await }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_classes_are_bounded() {
        let cases = [
            ("/api/v1/proposals/17", "api"),
            ("/api", "api"),
            ("/apis", "page"),
            ("/static/app.js", "static"),
            ("/healthz", "health"),
            ("/login", "auth"),
            ("/logout", "auth"),
            ("/account/password", "auth"),
            ("/workloads/12", "page"),
            ("/", "page"),
            ("/../../etc/passwd", "page"),
        ];
        for (path, class) in cases {
            assert_eq!(route_class(path), class, "{path}");
        }
        assert_eq!(status_class(StatusCode::SEE_OTHER), "3xx");
        assert_eq!(status_class(StatusCode::SERVICE_UNAVAILABLE), "5xx");
    }

    #[test]
    fn renders_counters_with_help() {
        let m = Metrics::new();
        m.batch(BatchOutcome::Stored, 5);
        m.batch(BatchOutcome::Rejected, 0);
        m.backlog_dropped(3, 0);
        m.compiled(false, Duration::from_millis(1500));
        let s = m.collector_stream();
        let text = m.render(&Distributor::new());
        assert!(text.contains("# HELP bulkhead_learner_ingest_batches Flow batches answered"), "{text}");
        assert!(text.contains(r#"bulkhead_learner_ingest_batches_total{outcome="stored"} 1"#), "{text}");
        assert!(text.contains(r#"bulkhead_learner_ingest_batches_total{outcome="rejected"} 1"#), "{text}");
        assert!(text.contains("bulkhead_learner_ingest_flows_stored_total 5"), "{text}");
        assert!(text.contains(r#"bulkhead_learner_report_backlog_dropped_total{kind="verdict_event"} 3"#), "{text}");
        assert!(text.contains("bulkhead_learner_policy_compile_failures_total 1"), "{text}");
        assert!(text.contains("bulkhead_learner_policy_compile_last_duration_seconds 1.5"), "{text}");
        assert!(text.contains("bulkhead_learner_collector_streams 1"), "{text}");
        drop(s);
        assert!(m.render(&Distributor::new()).contains("bulkhead_learner_collector_streams 0"));
    }
}
