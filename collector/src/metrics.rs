//! Collector metrics in Prometheus text format. Loss counters live here too because
//! the same numbers travel to the learner in every batch: what an operator scrapes and
//! what the learner shows must agree.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::routing::get;
use bulkhead_model::LossCounters;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// All collector metrics. Cheap to clone handles; updated once per drain or flush,
/// never per packet.
#[derive(Debug, Default)]
pub struct Metrics {
    pub events: Counter,
    pub dns_answers: Counter,
    pub http_requests: Counter,
    pub http_unparsed: Counter,
    pub http_overflow: Counter,
    pub opaque_connections: Counter,
    pub flows: Counter,
    pub ringbuf_dropped: Counter,
    pub queue_dropped: Counter,
    pub unattributed: Counter,
    pub spool_evicted_batches: Counter,
    pub spool_evicted_flows: Counter,
    pub batches_spooled: Counter,
    pub batches_acked: Counter,
    pub batches_duplicate: Counter,
    pub batches_rejected: Counter,
    pub spool_batches: Gauge,
    pub spool_bytes: Gauge,
    pub learner_connected: Gauge,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The cumulative loss of this boot, as reported to the learner.
    pub fn loss(&self) -> LossCounters {
        LossCounters {
            ringbuf_dropped: self.ringbuf_dropped.get(),
            queue_dropped: self.queue_dropped.get(),
            spool_evicted_batches: self.spool_evicted_batches.get(),
            spool_evicted_flows: self.spool_evicted_flows.get(),
            rejected_batches: self.batches_rejected.get(),
        }
    }

    fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("bulkhead_collector");
        r.register("events", "Socket events read from the kernel", self.events.clone());
        r.register("dns_answers", "DNS answers captured", self.dns_answers.clone());
        r.register("http_requests", "HTTP request lines captured and parsed", self.http_requests.clone());
        r.register(
            "http_unparsed",
            "Segments starting like an HTTP method that were not a request line we accept",
            self.http_unparsed.clone(),
        );
        r.register(
            "http_overflow",
            "HTTP requests counted without their path (per-flow or per-interval bound)",
            self.http_overflow.clone(),
        );
        r.register(
            "opaque_connections",
            "Accepted connections that received payload but no HTTP request line",
            self.opaque_connections.clone(),
        );
        r.register("flows", "Aggregated flows cut into batches", self.flows.clone());
        r.register("ringbuf_dropped", "Events the kernel could not queue (lost)", self.ringbuf_dropped.clone());
        r.register("queue_dropped", "Events dropped by a full aggregation table (lost)", self.queue_dropped.clone());
        r.register("unattributed", "Late counters attributed by port heuristics", self.unattributed.clone());
        r.register(
            "spool_evicted_batches",
            "Batches evicted from a full spool (lost)",
            self.spool_evicted_batches.clone(),
        );
        r.register("spool_evicted_flows", "Flows in evicted batches (lost)", self.spool_evicted_flows.clone());
        r.register("batches_spooled", "Batches written to the spool", self.batches_spooled.clone());
        r.register("batches_acked", "Batches the learner stored", self.batches_acked.clone());
        r.register("batches_duplicate", "Batches the learner had already stored", self.batches_duplicate.clone());
        r.register("batches_rejected", "Batches the learner rejected (lost)", self.batches_rejected.clone());
        r.register("spool_batches", "Batches waiting in the spool", self.spool_batches.clone());
        r.register("spool_bytes", "Bytes waiting in the spool", self.spool_bytes.clone());
        r.register("learner_connected", "1 while a stream to the learner is open", self.learner_connected.clone());
        r
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry());
        out
    }
}

/// Serves `/metrics` until the listener fails.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let m = metrics.clone();
            async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], m.render()) }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "Serving metrics.");
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_is_rendered_and_reported() {
        let m = Metrics::new();
        m.ringbuf_dropped.inc_by(3);
        m.spool_evicted_flows.inc_by(7);
        let text = m.render();
        assert!(text.contains("bulkhead_collector_ringbuf_dropped_total 3"), "{text}");
        assert!(text.contains("bulkhead_collector_spool_evicted_flows_total 7"), "{text}");
        assert_eq!(m.loss().ringbuf_dropped, 3);
        assert_eq!(m.loss().spool_evicted_flows, 7);
    }
}
