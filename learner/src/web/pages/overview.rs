//! `/`: the overview — flows per minute over a chosen range (a server-rendered SVG
//! chart, no script), top talkers, audit and deny counts per workload, the agents
//! (collectors and enforcers: versions, last seen, applied policy, loss counters) and
//! totals.

pub mod show;

use askama::Template;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use bulkhead_model::LossCounters;
use serde::Deserialize;

use self::show::{Choice, Directory, Peer, RangePreset};
use super::{Chrome, render, render_status};
use crate::grpc::ingest::unix_ms;
use crate::store::{AgentRow, EnforcerRow, RateBucket, TalkerOrder};
use crate::web::AppState;
use crate::web::auth::Viewer;

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 60 * MINUTE_MS;

/// The chart's ranges: value, label, length; the bucket of each is [`bucket_ms`].
const RANGES: &[RangePreset] = &[
    ("1h", "last hour", HOUR_MS),
    ("6h", "last 6 hours", 6 * HOUR_MS),
    ("24h", "last 24 hours", 24 * HOUR_MS),
    ("7d", "last 7 days", 7 * 24 * HOUR_MS),
];
const DEFAULT_RANGE: &str = "6h";

/// Bars per range: 60 × 1 min, 72 × 5 min, 96 × 15 min, 84 × 2 h.
fn bucket_ms(range_ms: i64) -> i64 {
    match range_ms {
        r if r <= HOUR_MS => MINUTE_MS,
        r if r <= 6 * HOUR_MS => 5 * MINUTE_MS,
        r if r <= 24 * HOUR_MS => 15 * MINUTE_MS,
        _ => 120 * MINUTE_MS,
    }
}

/// Top talkers shown.
const TOP_TALKERS: u32 = 10;
/// Workloads shown in the audit / deny table.
const TOP_VERDICT_WORKLOADS: usize = 20;
/// A collector or enforcer silent this long is marked stale.
const STALE_MS: i64 = 5 * MINUTE_MS;

#[derive(Debug, Deserialize)]
pub struct OverviewParams {
    range: Option<String>,
    /// End of the range (`datetime-local`, UTC); now when absent.
    end: Option<String>,
    /// Top talkers by `connections` (default) or `bytes`.
    by: Option<String>,
}

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage {
    chrome: Chrome,
    error: Option<String>,
    ranges: Vec<Choice>,
    end_input: String,
    by_bytes: bool,
    range_label: String,
    window: String,
    /// Start of the range: talkers and verdict counts cover everything since then.
    since: String,
    chart: Chart,
    totals: Vec<Total>,
    talkers: Vec<Talker>,
    verdicts: Vec<VerdictLine>,
    collectors: Vec<Collector>,
    enforcers: Vec<Enforcer>,
}

/// One header number.
struct Total {
    label: &'static str,
    value: String,
    href: Option<&'static str>,
}

struct Talker {
    src: Peer,
    dst: Peer,
    port: u16,
    protocol: &'static str,
    connections: String,
    bytes: String,
    last_seen: String,
    last_seen_ago: String,
}

struct VerdictLine {
    workload: Peer,
    audit: String,
    denied: String,
    last: String,
    last_ago: String,
}

struct Collector {
    node: String,
    version: String,
    boot: String,
    last_seen: String,
    last_seen_ago: String,
    stale: bool,
    batches: String,
    /// Non-zero loss counters as `name: n`.
    loss: Vec<String>,
    clock: Clock,
}

struct Enforcer {
    node: String,
    version: String,
    desired: String,
    applied: String,
    /// `in-sync`, `behind`, `rejected`, `unknown`: the badge's class suffix and text.
    state: &'static str,
    state_class: &'static str,
    error: Option<String>,
    last_seen: String,
    last_seen_ago: String,
    stale: bool,
    last_report_ago: String,
    loss: Vec<String>,
    clock: Clock,
}

/// A node's clock as the learner measured it.
struct Clock {
    text: String,
    /// Beyond the tolerance: the node's times are being corrected.
    off: bool,
}

impl Clock {
    fn of(skew_ms: Option<i64>) -> Clock {
        match skew_ms {
            None => Clock { text: "—".into(), off: false },
            Some(s) => {
                let off = s.abs() > crate::grpc::clock::TOLERANCE_MS;
                let secs = s.unsigned_abs() as f64 / 1000.0;
                let text = match (off, s > 0) {
                    (false, _) => "in sync".into(),
                    (true, true) => format!("{secs:.1} s behind"),
                    (true, false) => format!("{secs:.1} s ahead"),
                };
                Clock { text, off }
            }
        }
    }
}

// === the chart ===

/// The flow-rate chart as SVG geometry (viewBox units). Positions are numbers, so the
/// template writes them into presentation attributes (`x`, `height`, …) — allowed
/// under the CSP, unlike `style`.
struct Chart {
    width: u32,
    height: u32,
    plot_left: u32,
    plot_right: u32,
    plot_top: u32,
    plot_bottom: u32,
    bars: Vec<Bar>,
    y_ticks: Vec<Tick>,
    x_ticks: Vec<Tick>,
    /// For screen readers and the caption.
    summary: String,
    empty: bool,
}

struct Bar {
    x: String,
    y: String,
    w: String,
    h: String,
    title: String,
}

struct Tick {
    pos: String,
    label: String,
    /// `text-anchor`: the outermost x labels stay inside the chart.
    anchor: &'static str,
}

const CHART_W: u32 = 960;
const CHART_H: u32 = 260;
const PLOT_LEFT: u32 = 64;
const PLOT_RIGHT: u32 = CHART_W - 12;
const PLOT_TOP: u32 = 14;
const PLOT_BOTTOM: u32 = CHART_H - 30;

/// The smallest 1, 2 or 5 × 10^k at or above `v` (at least 1).
fn nice_ceiling(v: f64) -> f64 {
    if v <= 1.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|c| *c >= v).unwrap_or(10.0 * magnitude)
}

fn rate_label(v: f64) -> String {
    if v >= 100.0 || v == v.trunc() { show::count(v.round() as u64) } else { format!("{v:.1}") }
}

/// Lays out `buckets` (sparse, from the store) as `n` bars of `bucket_ms` from `since`,
/// each the bucket's average flows per minute.
fn chart(since: i64, bucket_ms: i64, n: usize, buckets: &[RateBucket], days: bool) -> Chart {
    let per_minute = MINUTE_MS as f64 / bucket_ms as f64;
    let mut values = vec![0.0f64; n];
    let mut total = 0u64;
    for b in buckets {
        let i = (b.start_unix_ms - since) / bucket_ms;
        if let Some(slot) = usize::try_from(i).ok().and_then(|i| values.get_mut(i)) {
            *slot = b.flows as f64 * per_minute;
            total = total.saturating_add(b.flows);
        }
    }
    let peak = values.iter().copied().fold(0.0, f64::max);
    let top = nice_ceiling(peak);
    let plot_w = f64::from(PLOT_RIGHT - PLOT_LEFT);
    let plot_h = f64::from(PLOT_BOTTOM - PLOT_TOP);
    let slot = plot_w / n.max(1) as f64;
    let gap = if slot > 4.0 { 1.0 } else { 0.0 };
    let label_of = |ms: i64| if days { show::day_clock(ms) } else { show::clock(ms) };
    let bars = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let h = (v / top * plot_h).max(if *v > 0.0 { 1.0 } else { 0.0 });
            let start = since + i as i64 * bucket_ms;
            Bar {
                x: format!("{:.1}", f64::from(PLOT_LEFT) + i as f64 * slot),
                y: format!("{:.1}", f64::from(PLOT_BOTTOM) - h),
                w: format!("{:.1}", (slot - gap).max(0.5)),
                h: format!("{h:.1}"),
                title: format!(
                    "{} – {} UTC: {} flows/min",
                    show::time(start),
                    label_of(start + bucket_ms),
                    rate_label(*v)
                ),
            }
        })
        .collect();
    let y_ticks = (0..=4)
        .map(|k| {
            let v = top * f64::from(k) / 4.0;
            Tick {
                pos: format!("{:.1}", f64::from(PLOT_BOTTOM) - v / top * plot_h),
                label: rate_label(v),
                anchor: "end",
            }
        })
        .collect();
    let every = (n / 6).max(1);
    let x_ticks = (0..=n)
        .step_by(every)
        .map(|i| Tick {
            pos: format!("{:.1}", f64::from(PLOT_LEFT) + i as f64 * slot),
            label: label_of(since + i as i64 * bucket_ms),
            anchor: if i == n { "end" } else { "middle" },
        })
        .collect();
    let end = since + n as i64 * bucket_ms;
    let summary = format!(
        "Flows per minute from {} to {} UTC: {} flows in total, peak {} per minute.",
        show::time(since),
        show::time(end),
        show::count(total),
        rate_label(peak)
    );
    Chart {
        width: CHART_W,
        height: CHART_H,
        plot_left: PLOT_LEFT,
        plot_right: PLOT_RIGHT,
        plot_top: PLOT_TOP,
        plot_bottom: PLOT_BOTTOM,
        bars,
        y_ticks,
        x_ticks,
        summary,
        empty: total == 0,
    }
}

// === agents ===

fn collector_loss(l: &LossCounters) -> Vec<String> {
    [
        ("ring buffer dropped", l.ringbuf_dropped),
        ("queue dropped", l.queue_dropped),
        ("spool evicted batches", l.spool_evicted_batches),
        ("spool evicted flows", l.spool_evicted_flows),
        ("rejected batches", l.rejected_batches),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .map(|(what, n)| format!("{what}: {}", show::count(n)))
    .collect()
}

fn collector(now: i64, a: AgentRow) -> Collector {
    Collector {
        loss: collector_loss(&a.loss),
        stale: a.last_seen_unix_ms.is_none_or(|t| now - t > STALE_MS),
        last_seen: show::time_opt(a.last_seen_unix_ms),
        last_seen_ago: show::ago_opt(now, a.last_seen_unix_ms),
        version: a.agent_version.unwrap_or_else(|| "—".into()),
        boot: a.boot_id.map(|b| b.chars().take(12).collect()).unwrap_or_else(|| "—".into()),
        batches: show::count(a.batches_stored),
        clock: Clock::of(a.clock_skew_ms),
        node: a.node_id,
    }
}

fn enforcer(now: i64, e: EnforcerRow) -> Enforcer {
    let version = |v: Option<u64>| v.map_or_else(|| "—".to_owned(), |v| format!("v{v}"));
    let (state, state_class) = if e.rejected_version.is_some() {
        ("rejected", "verdict-denied")
    } else if e.in_sync() {
        ("in sync", "verdict-allowed")
    } else if e.desired_version.is_some() {
        ("behind", "verdict-audit")
    } else {
        ("no policy yet", "verdict-nopolicy")
    };
    let error = match (e.rejected_version, &e.last_error) {
        (Some(v), Some(err)) => Some(format!("v{v} rejected: {err}")),
        _ => None,
    };
    let loss = [
        ("ring buffer dropped", e.loss.ringbuf_dropped),
        ("queue dropped", e.loss.queue_dropped),
        ("conntrack full", e.loss.conntrack_full),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .map(|(what, n)| format!("{what}: {}", show::count(n)))
    .collect();
    Enforcer {
        version: e.agent_version.clone().unwrap_or_else(|| "—".into()),
        desired: version(e.desired_version),
        applied: version(e.applied_version),
        state,
        state_class,
        error,
        stale: e.last_seen_unix_ms.is_none_or(|t| now - t > STALE_MS),
        last_seen: show::time_opt(e.last_seen_unix_ms),
        last_seen_ago: show::ago_opt(now, e.last_seen_unix_ms),
        last_report_ago: show::ago_opt(now, e.last_report_unix_ms),
        loss,
        clock: Clock::of(e.clock_skew_ms),
        node: e.node_id,
    }
}

// === handler ===

/// GET /.
pub async fn page(caller: Viewer, State(state): State<AppState>, Query(p): Query<OverviewParams>) -> Response {
    let now = unix_ms();
    let mut error = None;
    let range_value = show::field(&p.range).unwrap_or(DEFAULT_RANGE);
    let (range_value, range_label, range_ms) = match show::preset(RANGES, range_value) {
        Some(r) => r,
        None => {
            error = Some(format!("Unknown range; showing the {}.", "last 6 hours"));
            show::preset(RANGES, DEFAULT_RANGE).unwrap_or(("6h", "last 6 hours", 6 * HOUR_MS))
        }
    };
    let end = match show::field(&p.end) {
        None => now,
        Some(s) => show::parse_datetime(s).unwrap_or_else(|| {
            error = Some("The end time is not a date and time (YYYY-MM-DDTHH:MM, UTC); showing until now.".into());
            now
        }),
    };
    let by = if show::field(&p.by) == Some("bytes") { TalkerOrder::Bytes } else { TalkerOrder::Connections };
    let bucket = bucket_ms(range_ms);
    // Whole buckets ending at or after `end`: bar edges fall on round times.
    let end_aligned = end.div_euclid(bucket) * bucket + if end.rem_euclid(bucket) == 0 { 0 } else { bucket };
    let since = end_aligned - range_ms;
    let n = usize::try_from(range_ms / bucket).unwrap_or(1);

    let store = &state.store;
    // Independent reads: run at once (the store's readers are a pool), so the page
    // costs its slowest query rather than their sum.
    let loaded = tokio::try_join!(
        store.flow_rate(since, end_aligned, bucket),
        store.dashboard_totals(),
        store.top_edges(since, by, TOP_TALKERS),
        store.verdict_counts(since),
        store.agents(),
        store.enforcers(),
        Directory::load(store),
    );
    let (buckets, totals, talkers, mut counts, agents, enforcers, directory) = match loaded {
        Ok(v) => v,
        Err(err) => return show::store_failed("overview", err),
    };

    let chart = chart(since, bucket, n, &buckets, range_ms > 24 * HOUR_MS);
    let flows_in_range: u64 = buckets.iter().map(|b| b.flows).fold(0, u64::saturating_add);
    let (audit_total, denied_total) =
        counts.iter().fold((0u64, 0u64), |(a, d), c| (a.saturating_add(c.audit), d.saturating_add(c.denied)));
    let in_sync = enforcers.iter().filter(|e| e.in_sync()).count();
    let totals = vec![
        Total { label: "flows in range", value: show::count(flows_in_range), href: Some("/flows") },
        Total { label: "workloads", value: show::count(totals.workloads), href: Some("/workloads") },
        Total { label: "endpoints", value: show::count(totals.endpoints), href: None },
        Total { label: "edges", value: show::count(totals.edges), href: Some("/graph") },
        Total { label: "pending proposals", value: show::count(totals.pending_proposals), href: Some("/proposals") },
        Total { label: "audit events since range start", value: show::count(audit_total), href: None },
        Total { label: "denied events since range start", value: show::count(denied_total), href: None },
        Total { label: "collectors", value: show::count(agents.len() as u64), href: None },
        Total {
            label: "enforcers in sync",
            value: format!("{} / {}", show::count(in_sync as u64), show::count(enforcers.len() as u64)),
            href: Some("/rollout"),
        },
    ];
    let talkers = talkers
        .into_iter()
        .map(|e| Talker {
            src: directory.peer(e.edge.key.src),
            dst: directory.peer(e.edge.key.dst),
            port: e.edge.key.dst_port,
            protocol: e.edge.key.protocol.as_str(),
            connections: show::count(e.edge.connections),
            bytes: show::bytes(e.edge.bytes),
            last_seen: show::time(e.edge.last_seen_unix_ms),
            last_seen_ago: show::ago(now, e.edge.last_seen_unix_ms),
        })
        .collect();
    counts.sort_by(|a, b| {
        (b.audit.saturating_add(b.denied), b.last_unix_ms).cmp(&(a.audit.saturating_add(a.denied), a.last_unix_ms))
    });
    let verdicts = counts
        .into_iter()
        .take(TOP_VERDICT_WORKLOADS)
        .map(|c| VerdictLine {
            workload: directory.peer(c.identity),
            audit: show::count(c.audit),
            denied: show::count(c.denied),
            last: show::time(c.last_unix_ms),
            last_ago: show::ago(now, c.last_unix_ms),
        })
        .collect();
    let page = OverviewPage {
        chrome: Chrome::new(&caller, "/"),
        ranges: show::choices(RANGES, range_value, None),
        end_input: show::field(&p.end).map(|_| show::datetime_input(end)).unwrap_or_default(),
        by_bytes: by == TalkerOrder::Bytes,
        range_label: range_label.to_owned(),
        window: format!("{} – {} UTC", show::time(since), show::time(end_aligned)),
        since: show::time(since),
        chart,
        totals,
        talkers,
        verdicts,
        collectors: agents.into_iter().map(|a| collector(now, a)).collect(),
        enforcers: enforcers.into_iter().map(|e| enforcer(now, e)).collect(),
        error,
    };
    if page.error.is_some() { render_status(StatusCode::BAD_REQUEST, &page) } else { render(&page) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_places_buckets_and_scales_to_a_round_top() {
        let since = 1_700_000_000_000 - 1_700_000_000_000 % MINUTE_MS;
        let buckets = [
            RateBucket { start_unix_ms: since, flows: 30, batches: 1 },
            RateBucket { start_unix_ms: since + 2 * MINUTE_MS, flows: 70, batches: 2 },
        ];
        let c = chart(since, MINUTE_MS, 3, &buckets, false);
        assert_eq!(c.bars.len(), 3);
        assert!(!c.empty);
        assert_eq!(c.y_ticks.last().map(|t| t.label.as_str()), Some("100"), "70/min rounds up to 100");
        assert_eq!(c.bars[1].h, "0.0", "a bucket without batches is an empty bar");
        let h = |b: &Bar| b.h.parse::<f64>().expect("height");
        assert!(h(&c.bars[2]) > h(&c.bars[0]));
        assert!(c.summary.contains("100 flows in total"), "{}", c.summary);
        assert!(chart(since, MINUTE_MS, 3, &[], false).empty);
    }

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(1.5), 2.0);
        assert_eq!(nice_ceiling(3.0), 5.0);
        assert_eq!(nice_ceiling(70.0), 100.0);
        assert_eq!(nice_ceiling(100.0), 100.0);
        assert_eq!(nice_ceiling(101.0), 200.0);
    }

    #[test]
    fn ranges_have_sane_bucket_counts() {
        for (_, _, range) in RANGES {
            let n = range / bucket_ms(*range);
            assert!((50..=100).contains(&n), "{range}: {n}");
        }
    }
}
