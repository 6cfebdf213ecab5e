//! The collector's main loop: drain the kernel every poll interval, aggregate, cut a
//! batch every flush interval into the spool, and let the shipper deliver it.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bulkhead_collector::aggregate::{Aggregator, AggregatorConfig};
use bulkhead_collector::datapath::{Datapath, DatapathOptions, NetnsFilter};
use bulkhead_collector::metrics::{self, Metrics};
use bulkhead_collector::ship::{self, ShipperConfig};
use bulkhead_collector::spool::Spool;
use bulkhead_collector::{endpoints, seed};
use bulkhead_model::{DnsAnswer, EndpointFact};
use bulkhead_proto::v1;
use tokio::sync::Notify;

use crate::Args;

pub async fn run(args: Args, transport: bulkhead_proto::tls::AgentTransport) -> anyhow::Result<()> {
    let node_id = match &args.node_id {
        Some(n) => n.clone(),
        None => {
            nix::unistd::gethostname().context("reading the hostname for --node-id")?.to_string_lossy().into_owned()
        }
    };
    let boot_id = uuid::Uuid::new_v4().to_string();
    let metrics = Metrics::new();
    tracing::info!(node = %node_id, boot = %boot_id, learner = %args.learner, "Starting collector.");

    let opts = DatapathOptions { ringbuf_bytes: args.ringbuf_bytes, ..Default::default() };
    let mut datapath = Datapath::load(&opts).context("loading the eBPF datapath")?;
    let host_ino = endpoints::host_netns_ino();
    // The filter goes in before the agent opens any connection of its own (metrics,
    // learner), so its own traffic is never reported as a workload's.
    let mut facts = endpoints::scan().context("scanning network namespaces")?;
    let mut known_ns: HashSet<u64> = facts.iter().map(|f| f.netns_ino).collect();
    let mut filter = netns_filter(&args, host_ino, &facts);
    datapath.set_netns_filter(&filter).context("setting the network-namespace filter")?;

    let spool = Spool::open(&args.spool_dir, args.spool_max_bytes)
        .with_context(|| format!("opening the spool at {}", args.spool_dir.display()))?;
    if !spool.entries().is_empty() {
        tracing::info!(
            batches = spool.entries().len(),
            bytes = spool.bytes(),
            "Found undelivered batches from an earlier run."
        );
    }
    let spool = Arc::new(Mutex::new(spool));
    let wake = Arc::new(Notify::new());

    let metrics_task = tokio::spawn(metrics::serve(args.metrics_listen, metrics.clone()));
    let shipper = tokio::spawn(ship::run(
        ShipperConfig {
            learner_url: args.learner.clone(),
            transport,
            node_id: node_id.clone(),
            boot_id: boot_id.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            window: 8,
            max_backoff: Duration::from_secs(5),
        },
        spool.clone(),
        wake.clone(),
        metrics.clone(),
    ));

    let ephemeral = read_ephemeral_range().unwrap_or(32768..=60999);
    let mut agg = Aggregator::new(AggregatorConfig { ephemeral_ports: ephemeral, ..Default::default() });
    let mut cutter = BatchCutter { node_id, boot_id, seq: 0, max_flows: args.max_batch_flows.max(1) };

    // Connections that predate us; the first batch also carries the endpoints, so the
    // learner knows who is who before it resolves them.
    let observed: Vec<EndpointFact> = facts.iter().filter(|f| is_observed(&filter, f.netns_ino)).cloned().collect();
    match seed::seed(&observed) {
        Ok(events) => {
            tracing::info!(connections = events.len(), "Seeded connections that predate the collector.");
            for ev in &events {
                agg.record(ev);
            }
        }
        Err(err) => tracing::warn!(error = %err, "Could not seed existing connections."),
    }
    let mut endpoints_dirty = true;
    let mut last_scan = Instant::now();

    let mut poll = tokio::time::interval(args.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut flush = tokio::time::interval(args.flush_interval);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut events = Vec::with_capacity(4096);
    let mut dns: Vec<DnsAnswer> = Vec::new();
    let mut http = Vec::with_capacity(1024);
    let mut seen_ringbuf_dropped = 0;
    let mut seen_agg = agg.stats();
    let mut seen_http = (0u64, 0u64);
    let mut unknown_ns_seen = false;
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            _ = poll.tick() => {
                events.clear();
                http.clear();
                datapath.drain(&mut events, &mut dns, &mut http).context("draining the ring buffer")?;
                // Requests first: a request may be copied before its connection's
                // Accept, and must be counted before its Close (see `aggregate`).
                for r in &http {
                    if is_observed(&filter, r.netns_ino) {
                        agg.record_http(r);
                    }
                }
                for ev in &events {
                    // The kernel filters; this catches what was queued before the
                    // filter went in or while it changed (it may over-report, briefly).
                    if !is_observed(&filter, ev.netns_ino) {
                        continue;
                    }
                    unknown_ns_seen |= !known_ns.contains(&ev.netns_ino);
                    agg.record(ev);
                }
                metrics.events.inc_by(events.len() as u64);
            }
            _ = flush.tick() => {
                if unknown_ns_seen || last_scan.elapsed() >= args.endpoint_interval {
                    match endpoints::scan() {
                        Ok(new) => {
                            if new != facts {
                                facts = new;
                                known_ns = facts.iter().map(|f| f.netns_ino).collect();
                                endpoints_dirty = true;
                                let next = netns_filter(&args, host_ino, &facts);
                                if next != filter {
                                    datapath.set_netns_filter(&next).context("updating the network-namespace filter")?;
                                    filter = next;
                                }
                            }
                        }
                        Err(err) => tracing::warn!(error = %err, "Endpoint scan failed; keeping the last one."),
                    }
                    last_scan = Instant::now();
                    unknown_ns_seen = false;
                }
                let dropped = datapath.ringbuf_dropped();
                metrics.ringbuf_dropped.inc_by(dropped.saturating_sub(seen_ringbuf_dropped));
                seen_ringbuf_dropped = seen_ringbuf_dropped.max(dropped);
                let stats = agg.stats();
                metrics.queue_dropped.inc_by(stats.queue_dropped - seen_agg.queue_dropped);
                metrics.unattributed.inc_by(stats.unattributed - seen_agg.unattributed);
                metrics.http_overflow.inc_by(stats.http_overflow - seen_agg.http_overflow);
                metrics.opaque_connections.inc_by(stats.opaque_connections - seen_agg.opaque_connections);
                seen_agg = stats;
                let counters = datapath.counters();
                metrics.http_requests.inc_by(counters.http_requests.saturating_sub(seen_http.0));
                metrics.http_unparsed.inc_by(counters.http_unparsed.saturating_sub(seen_http.1));
                seen_http = (counters.http_requests, counters.http_unparsed);

                let flows = agg.flush();
                metrics.dns_answers.inc_by(dns.len() as u64);
                let endpoints = endpoints_dirty.then(|| reported(&filter, &facts));
                let batches = cutter.cut(flows, endpoints, std::mem::take(&mut dns), &metrics);
                endpoints_dirty = false;
                if !batches.is_empty() {
                    let mut s = spool.lock().unwrap_or_else(|p| p.into_inner());
                    for b in &batches {
                        metrics.flows.inc_by(b.flows.len() as u64);
                        match s.push(b) {
                            Ok((_, evicted)) => {
                                metrics.batches_spooled.inc();
                                metrics.spool_evicted_batches.inc_by(evicted.batches);
                                metrics.spool_evicted_flows.inc_by(evicted.flows);
                            }
                            Err(err) => {
                                metrics.spool_evicted_batches.inc();
                                metrics.spool_evicted_flows.inc_by(b.flows.len() as u64);
                                tracing::error!(error = %err, seq = b.seq, "Could not spool a batch; counted as lost.");
                            }
                        }
                    }
                    metrics.spool_batches.set(s.entries().len() as i64);
                    metrics.spool_bytes.set(s.bytes() as i64);
                    drop(s);
                    wake.notify_one();
                }
            }
            _ = &mut shutdown => {
                tracing::info!("Shutting down; undelivered batches stay in the spool.");
                break;
            }
        }
    }
    shipper.abort();
    metrics_task.abort();
    Ok(())
}

/// Which namespaces the kernel reports: the named ones when `--netns` is given, else
/// all but the host's (unless `--observe-host`). An exclusion list rather than an
/// inclusion list by default, so a namespace created between two scans is observed
/// from its first connection.
fn netns_filter(args: &Args, host_ino: u64, facts: &[EndpointFact]) -> NetnsFilter {
    if !args.netns.is_empty() {
        let inos: BTreeSet<u64> = facts
            .iter()
            .filter(|f| f.netns_name.as_ref().is_some_and(|n| args.netns.contains(n)))
            .map(|f| f.netns_ino)
            .collect();
        return NetnsFilter::Only(inos);
    }
    if args.observe_host { NetnsFilter::All } else { NetnsFilter::Except(BTreeSet::from([host_ino])) }
}

/// The endpoint facts sent to the learner: the observed namespaces and the host's.
/// Namespaces the collector was told to ignore are left out: on a node where isolated
/// namespaces reuse addresses, their facts would only make addresses ambiguous.
fn reported(filter: &NetnsFilter, facts: &[EndpointFact]) -> Vec<EndpointFact> {
    facts.iter().filter(|f| f.host || is_observed(filter, f.netns_ino)).cloned().collect()
}

fn is_observed(filter: &NetnsFilter, ino: u64) -> bool {
    match filter {
        NetnsFilter::All => true,
        NetnsFilter::Only(set) => set.contains(&ino),
        NetnsFilter::Except(set) => !set.contains(&ino),
    }
}

/// Numbers batches and splits an interval into batches of bounded size.
struct BatchCutter {
    node_id: String,
    boot_id: String,
    seq: u64,
    max_flows: usize,
}

impl BatchCutter {
    fn cut(
        &mut self,
        flows: Vec<bulkhead_model::Flow>,
        endpoints: Option<Vec<EndpointFact>>,
        dns_answers: Vec<DnsAnswer>,
        metrics: &Metrics,
    ) -> Vec<v1::FlowBatch> {
        if flows.is_empty() && endpoints.is_none() && dns_answers.is_empty() {
            return Vec::new();
        }
        let now = unix_ms();
        let loss = v1::LossCounters::from(metrics.loss());
        // Endpoints and DNS answers travel in the first batch of the interval, so the
        // learner knows the addresses before it resolves the flows.
        let mut endpoints = Some(endpoints);
        let mut dns_answers = Some(dns_answers);
        let mut chunks: Vec<&[bulkhead_model::Flow]> = flows.chunks(self.max_flows).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        chunks
            .into_iter()
            .map(|chunk| {
                self.seq += 1;
                let eps = endpoints.take().flatten();
                v1::FlowBatch {
                    node_id: self.node_id.clone(),
                    boot_id: self.boot_id.clone(),
                    seq: self.seq,
                    created_unix_ms: now,
                    flows: chunk.iter().map(v1::Flow::from).collect(),
                    endpoints_snapshot: eps.is_some(),
                    endpoints: eps.iter().flatten().map(v1::EndpointFact::from).collect(),
                    dns_answers: dns_answers.take().unwrap_or_default().iter().map(v1::DnsAnswer::from).collect(),
                    loss: Some(loss),
                    // Stamped by the shipper on each send.
                    sent_unix_ms: 0,
                }
            })
            .collect()
    }
}

fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn read_ephemeral_range() -> Option<std::ops::RangeInclusive<u16>> {
    let s = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
    let (lo, hi) = (it.next()??, it.next()??);
    Some(lo..=hi)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
