//! Enforcer metrics in Prometheus text format (`--metrics-listen`, `/metrics`).
//!
//! The kernel's counters are cumulative for the life of the pinned maps, across agent
//! restarts; they are read once a second by the map owner and exported as counters
//! that move by the difference (a smaller reading means the maps were re-created:
//! the new value counts from zero). The loss numbers are the ones each verdict report
//! carries to the learner, so what an operator scrapes and what `bulkhead enforcers`
//! shows agree.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::http::header;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::datapath::DatapathCounters;

/// All enforcer metrics; updated by the map owner once a second and by the stream.
#[derive(Debug, Default)]
pub struct Metrics {
    pub allowed: Counter,
    pub audit: Counter,
    pub denied: Counter,
    pub conntrack_hits: Counter,
    pub unmanaged: Counter,
    pub other_protocol: Counter,
    pub events_lost: Counter,
    pub events_rate_limited: Counter,
    pub fail_actions: Counter,
    pub conntrack_insert_failed: Counter,
    pub decode_errors: Counter,
    /// Events dropped by the agent's own queue while the learner was away (lost).
    pub queue_dropped: Counter,
    pub events_reported: Counter,
    pub policies_applied: Counter,
    pub policies_rejected: Counter,
    pub applied_version: Gauge<u64, AtomicU64>,
    pub generation: Gauge,
    pub endpoints: Gauge,
    pub policy_entries: Gauge,
    pub learner_connected: Gauge,
    last: Mutex<DatapathCounters>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Moves the exported counters to the kernel's current values.
    pub fn observe(&self, now: &DatapathCounters) {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let pairs = [
            (&self.allowed, now.allowed, last.allowed),
            (&self.audit, now.audit, last.audit),
            (&self.denied, now.denied, last.denied),
            (&self.conntrack_hits, now.ct_hits, last.ct_hits),
            (&self.unmanaged, now.unmanaged, last.unmanaged),
            (&self.other_protocol, now.other_proto, last.other_proto),
            (&self.events_lost, now.events_lost, last.events_lost),
            (&self.events_rate_limited, now.events_rate_limited, last.events_rate_limited),
            (&self.fail_actions, now.fail_actions, last.fail_actions),
            (&self.conntrack_insert_failed, now.ct_insert_failed, last.ct_insert_failed),
            (&self.decode_errors, now.decode_errors, last.decode_errors),
        ];
        for (counter, now, before) in pairs {
            counter.inc_by(if now >= before { now - before } else { now });
        }
        *last = *now;
    }

    fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("bulkhead_enforcer");
        let counters: [(&str, &str, &Counter); 15] = [
            ("verdicts_allowed", "New connections a rule allowed (per direction)", &self.allowed),
            ("verdicts_audit", "Would-be denials passed in monitor mode", &self.audit),
            ("verdicts_denied", "Packets dropped in enforce mode (or fail-closed)", &self.denied),
            ("conntrack_hits", "Packets of known connections", &self.conntrack_hits),
            ("packets_unmanaged", "Packets of workloads not in monitor or enforce", &self.unmanaged),
            ("packets_other_protocol", "Packets that are not TCP or UDP (passed)", &self.other_protocol),
            ("events_lost", "Verdict events the kernel could not queue (lost)", &self.events_lost),
            ("events_rate_limited", "Verdict events folded by the per-CPU rate limit", &self.events_rate_limited),
            ("fail_actions", "Packets decided by the fail-open/closed choice", &self.fail_actions),
            ("conntrack_insert_failed", "Connections not tracked: conntrack full", &self.conntrack_insert_failed),
            ("decode_errors", "Verdict events user space could not decode", &self.decode_errors),
            ("queue_dropped", "Verdict events dropped while the learner was away (lost)", &self.queue_dropped),
            ("events_reported", "Verdict events sent to the learner", &self.events_reported),
            ("policies_applied", "Policy versions applied", &self.policies_applied),
            ("policies_rejected", "Policy updates rejected (the applied policy stayed)", &self.policies_rejected),
        ];
        for (name, help, c) in counters {
            r.register(name, help, c.clone());
        }
        r.register("applied_version", "Policy version the kernel enforces (0: unknown)", self.applied_version.clone());
        r.register("generation", "Active policy generation in the kernel", self.generation.clone());
        r.register("endpoints", "Managed workload entries (cgroups and namespaces)", self.endpoints.clone());
        r.register("policy_entries", "Rule entries of the active generation", self.policy_entries.clone());
        r.register(
            "learner_connected",
            "1 while a policy stream to the learner is open",
            self.learner_connected.clone(),
        );
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

/// Serves `/metrics` on `listener` until it fails.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let m = metrics.clone();
            async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], m.render()) }
        }),
    );
    axum::serve(listener, app).await
}

/// Binds `addr` (port 0: any) and says where, so scrapers and tests can find it.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "Serving metrics.");
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_counters_move_by_difference_and_survive_recreated_maps() {
        let m = Metrics::new();
        m.observe(&DatapathCounters { denied: 5, events_lost: 2, ..DatapathCounters::default() });
        m.observe(&DatapathCounters { denied: 8, events_lost: 2, ..DatapathCounters::default() });
        assert_eq!((m.denied.get(), m.events_lost.get()), (8, 2));
        // The pins were re-created: counting starts again from the new value.
        m.observe(&DatapathCounters { denied: 1, ..DatapathCounters::default() });
        assert_eq!(m.denied.get(), 9);
        m.applied_version.set(1_700_000_000_123);
        let text = m.render();
        assert!(text.contains("bulkhead_enforcer_verdicts_denied_total 9"), "{text}");
        assert!(text.contains("bulkhead_enforcer_applied_version 1700000000123"), "{text}");
    }
}
