//! `/graph`: the service graph page. The page is a shell — controls, legend, side panel
//! — and `graph.js` draws the graph with the vendored Cytoscape.js from
//! `/api/v1/graph` (the URL is in the container's `data-src`; the CSP allows no inline
//! script). Past the size limits, or with `view=table`, the edges are a table instead:
//! rendered here for `view=table` (works without JavaScript), by the script when an
//! answer comes back truncated.
//!
//! Also home of the small time helpers the policy pages share (UTC formatting, the
//! range selector).

use askama::Template;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use bulkhead_model::Identity;
use serde::Deserialize;

use super::{Chrome, render, render_status};
use crate::grpc::ingest::unix_ms;
use crate::policy::graph_view::{GraphLevel, GraphView, VerdictClass, identity_name};
use crate::web::AppState;
use crate::web::api::ApiError;
use crate::web::auth::Viewer;
use crate::web::graph::{GraphParams, build};

// === time helpers (shared by the policy pages) ===

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// (year, month, day) → days since 1970-01-01 (`days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn split(ms: i64) -> (i64, u32, u32, i64, i64, i64) {
    let secs = ms.div_euclid(1_000);
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    (y, mo, d, s / 3_600, (s % 3_600) / 60, s % 60)
}

/// `2023-11-14 22:13:20` (UTC).
pub(crate) fn fmt_time(ms: i64) -> String {
    let (y, mo, d, h, mi, s) = split(ms);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}")
}

/// [`fmt_time`] of an optional time, `–` for none.
pub(crate) fn fmt_opt_time(ms: Option<i64>) -> String {
    ms.map_or_else(|| "–".to_owned(), fmt_time)
}

/// Parses a `datetime-local` value (`YYYY-MM-DDTHH:MM`, optionally `:SS`; a space works
/// as the separator too) as UTC.
pub(crate) fn parse_input(s: &str) -> Option<i64> {
    let s = s.trim();
    let (date, time) = s.split_once(['T', ' '])?;
    let mut d = date.splitn(3, '-');
    let y: i64 = d.next()?.parse().ok()?;
    let mo: u32 = d.next()?.parse().ok()?;
    let day: u32 = d.next()?.parse().ok()?;
    let mut t = time.splitn(3, ':');
    let h: i64 = t.next()?.parse().ok()?;
    let mi: i64 = t.next()?.parse().ok()?;
    let sec: i64 = t.next().map_or(Some(0), |x| x.parse().ok())?;
    let valid = (1..=12).contains(&mo)
        && (1..=31).contains(&day)
        && (0..24).contains(&h)
        && (0..60).contains(&mi)
        && (0..60).contains(&sec)
        && (1970..=9999).contains(&y);
    if !valid {
        return None;
    }
    let days = days_from_civil(y, mo, day);
    // 31 February and friends: reject what does not round-trip.
    if civil_from_days(days) != (y, mo, day) {
        return None;
    }
    Some(((days * 86_400) + h * 3_600 + mi * 60 + sec) * 1_000)
}

/// `3 d 4 h`, `5 h 2 min`, `40 s`.
pub(crate) fn fmt_duration(ms: i64) -> String {
    let s = (ms / 1_000).max(0);
    let (d, h, m) = (s / 86_400, (s % 86_400) / 3_600, (s % 3_600) / 60);
    if d > 0 {
        format!("{d} d {h} h")
    } else if h > 0 {
        format!("{h} h {m} min")
    } else if m > 0 {
        format!("{m} min")
    } else {
        format!("{s} s")
    }
}

/// `1.5 MB`, `812 B`.
pub(crate) fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    if n < 1_000 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1_000.0;
    let mut unit = 0;
    while v >= 1_000.0 && unit + 1 < UNITS.len() {
        v /= 1_000.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// URL query string of the non-empty pairs.
pub(crate) fn query(pairs: &[(&str, &str)]) -> String {
    let kept: Vec<(&str, &str)> = pairs.iter().copied().filter(|(_, v)| !v.is_empty()).collect();
    serde_urlencoded::to_string(kept).unwrap_or_default()
}

/// One option of a `<select>`.
#[derive(Debug, Clone)]
pub(crate) struct Choice {
    pub value: &'static str,
    pub label: &'static str,
    pub selected: bool,
}

/// The range presets: key, label, length.
pub(crate) const RANGES: &[(&str, &str, Option<i64>)] = &[
    ("1h", "last hour", Some(3_600_000)),
    ("24h", "last 24 hours", Some(24 * 3_600_000)),
    ("7d", "last 7 days", Some(7 * 24 * 3_600_000)),
    ("30d", "last 30 days", Some(30 * 24 * 3_600_000)),
    ("all", "all time", None),
    ("custom", "from / to below", None),
];

/// A chosen time range: a preset ending now, or a custom `[from, to]` in UTC.
#[derive(Debug, Clone)]
pub(crate) struct TimeRange {
    pub key: &'static str,
    pub since: Option<i64>,
    pub until: Option<i64>,
    /// The custom bounds as typed back into the form.
    pub from: String,
    pub to: String,
}

impl TimeRange {
    /// Parses the range fields; custom bounds win over a preset. `Err`: a message.
    pub(crate) fn parse(
        range: Option<&str>,
        from: Option<&str>,
        to: Option<&str>,
        default: &'static str,
        now: i64,
    ) -> Result<Self, String> {
        let from = from.map(str::trim).filter(|s| !s.is_empty());
        let to = to.map(str::trim).filter(|s| !s.is_empty());
        if from.is_some() || to.is_some() || range == Some("custom") {
            let since = from
                .map(|f| {
                    parse_input(f)
                        .ok_or_else(|| format!("“From” {f:?} is not a date and time (YYYY-MM-DDTHH:MM, UTC)."))
                })
                .transpose()?;
            let until = to
                .map(|t| {
                    parse_input(t).ok_or_else(|| format!("“To” {t:?} is not a date and time (YYYY-MM-DDTHH:MM, UTC)."))
                })
                .transpose()?;
            if let (Some(s), Some(u)) = (since, until)
                && s > u
            {
                return Err("The range ends before it starts.".into());
            }
            return Ok(TimeRange {
                key: "custom",
                since,
                until,
                from: from.unwrap_or_default().to_owned(),
                to: to.unwrap_or_default().to_owned(),
            });
        }
        let key = range.filter(|r| !r.is_empty()).unwrap_or(default);
        let Some(&(key, _, len)) = RANGES.iter().find(|(k, ..)| *k == key) else {
            return Err(format!("Unknown range {key:?}."));
        };
        Ok(TimeRange { key, since: len.map(|l| now - l), until: None, from: String::new(), to: String::new() })
    }

    pub(crate) fn all() -> Self {
        TimeRange { key: "all", since: None, until: None, from: String::new(), to: String::new() }
    }

    /// The `<select>` options with this range's preset selected.
    pub(crate) fn choices(&self) -> Vec<Choice> {
        RANGES.iter().map(|&(value, label, _)| Choice { value, label, selected: value == self.key }).collect()
    }

    /// The range as query pairs (to carry it along in links).
    pub(crate) fn pairs(&self) -> Vec<(&'static str, String)> {
        if self.key == "custom" {
            vec![("range", "custom".to_owned()), ("from", self.from.clone()), ("to", self.to.clone())]
        } else {
            vec![("range", self.key.to_owned())]
        }
    }

    /// In words, for headings.
    pub(crate) fn describe(&self) -> String {
        match (self.since, self.until) {
            (None, None) => "all time".to_owned(),
            (Some(s), None) if self.key != "custom" => RANGES
                .iter()
                .find(|(k, ..)| *k == self.key)
                .map_or_else(|| format!("since {}", fmt_time(s)), |r| r.1.to_owned()),
            (Some(s), None) => format!("since {} UTC", fmt_time(s)),
            (None, Some(u)) => format!("until {} UTC", fmt_time(u)),
            (Some(s), Some(u)) => format!("{} – {} UTC", fmt_time(s), fmt_time(u)),
        }
    }
}

// === the page ===

#[derive(Debug, Clone, Default, Deserialize)]
pub struct GraphPageParams {
    level: Option<String>,
    namespace: Option<String>,
    workload: Option<String>,
    range: Option<String>,
    from: Option<String>,
    to: Option<String>,
    /// `table`: the edges as a table instead of a drawing.
    view: Option<String>,
}

/// One step of the drill-down path.
#[derive(Debug, Clone)]
struct Crumb {
    label: String,
    href: Option<String>,
}

/// One legend entry.
#[derive(Debug, Clone)]
struct LegendItem {
    class: &'static str,
    label: &'static str,
    describe: &'static str,
}

/// A row of the table view.
#[derive(Debug, Clone)]
struct EdgeLine {
    source: String,
    target: String,
    verdict: &'static str,
    predicted: bool,
    ports: String,
    connections: u64,
    bytes: String,
    bytes_raw: u64,
    last_seen: String,
    last_seen_raw: i64,
    flows_href: Option<String>,
}

#[derive(Template)]
#[template(path = "graph.html")]
struct GraphPage {
    chrome: Chrome,
    level: &'static str,
    namespace: String,
    workload: String,
    crumbs: Vec<Crumb>,
    ranges: Vec<Choice>,
    range: TimeRange,
    range_text: String,
    data_src: String,
    /// The range as a query string, for links the script builds.
    range_query: String,
    table_view: bool,
    graph_href: String,
    table_href: String,
    legend: Vec<LegendItem>,
    error: Option<String>,
    /// `view=table`: the rows, and whether they are the busiest only.
    rows: Vec<EdgeLine>,
    truncated: bool,
    total_edges: u64,
    total_nodes: u64,
}

fn legend() -> Vec<LegendItem> {
    [VerdictClass::Allowed, VerdictClass::Audit, VerdictClass::Denied, VerdictClass::NoPolicy]
        .into_iter()
        .map(|c| LegendItem {
            class: c.as_str(),
            label: match c {
                VerdictClass::NoPolicy => "no policy",
                other => other.as_str(),
            },
            describe: c.describe(),
        })
        .collect()
}

fn lines(view: &GraphView) -> Vec<EdgeLine> {
    view.edges
        .iter()
        .map(|e| EdgeLine {
            source: e.source_label.clone(),
            target: e.target_label.clone(),
            verdict: e.verdict.as_str(),
            predicted: e.basis == crate::policy::graph_view::Basis::Policy && e.verdict != VerdictClass::Allowed,
            ports: e.label.clone(),
            connections: e.connections,
            bytes: fmt_bytes(e.bytes),
            bytes_raw: e.bytes,
            last_seen: fmt_opt_time(e.last_seen_ms),
            last_seen_raw: e.last_seen_ms.unwrap_or(0),
            flows_href: e.flows_href.clone(),
        })
        .collect()
}

fn api_message(e: ApiError) -> String {
    match e {
        ApiError::BadRequest(m) | ApiError::NotFound(m) | ApiError::Forbidden(m) | ApiError::Conflict(m) => m,
        ApiError::Unavailable => "The store is unavailable; try again.".into(),
    }
}

/// GET /graph.
pub async fn page(caller: Viewer, State(state): State<AppState>, Query(q): Query<GraphPageParams>) -> Response {
    let now = unix_ms();
    let mut error = None;
    let field = |v: &Option<String>| v.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned);
    let level = match field(&q.level).map(|l| l.parse::<GraphLevel>()) {
        None => GraphLevel::Namespace,
        Some(Ok(l)) => l,
        Some(Err(e)) => {
            error = Some(e);
            GraphLevel::Namespace
        }
    };
    let namespace = field(&q.namespace).unwrap_or_default();
    let workload_text = field(&q.workload).unwrap_or_default();
    let workload = if workload_text.is_empty() {
        None
    } else {
        match workload_text.parse::<u32>() {
            Ok(w) => Some(w),
            Err(_) => {
                error = Some(format!("Workload {workload_text:?} is not an identity number."));
                None
            }
        }
    };
    let (level, workload) = match (level, workload) {
        (GraphLevel::Endpoint, None) => {
            error.get_or_insert_with(|| "The endpoint view needs a workload.".into());
            (GraphLevel::Namespace, None)
        }
        other => other,
    };
    let range =
        TimeRange::parse(q.range.as_deref(), q.from.as_deref(), q.to.as_deref(), "all", now).unwrap_or_else(|e| {
            error = Some(e);
            TimeRange::all()
        });
    let params = GraphParams {
        level: Some(level.as_str().to_owned()),
        namespace: (level == GraphLevel::Workload && !namespace.is_empty()).then(|| namespace.clone()),
        workload: if level == GraphLevel::Endpoint { workload } else { None },
        since_ms: range.since,
        until_ms: range.until,
        max_nodes: None,
        max_edges: None,
    };
    let range_pairs = range.pairs();
    let range_query = {
        let pairs: Vec<(&str, &str)> = range_pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        query(&pairs)
    };
    let workload_s = params.workload.map(|w| w.to_string()).unwrap_or_default();
    let ns_s = params.namespace.clone().unwrap_or_default();
    let here = |view: &str| {
        let mut pairs: Vec<(&str, &str)> =
            vec![("level", level.as_str()), ("namespace", &ns_s), ("workload", &workload_s)];
        pairs.extend(range_pairs.iter().map(|(k, v)| (*k, v.as_str())));
        pairs.push(("view", view));
        format!("/graph?{}", query(&pairs))
    };
    let mut api_pairs: Vec<(&str, String)> = vec![("level", level.as_str().to_owned())];
    if let Some(ns) = &params.namespace {
        api_pairs.push(("namespace", ns.clone()));
    }
    if let Some(w) = params.workload {
        api_pairs.push(("workload", w.to_string()));
    }
    if let Some(s) = params.since_ms {
        api_pairs.push(("since_ms", s.to_string()));
    }
    if let Some(u) = params.until_ms {
        api_pairs.push(("until_ms", u.to_string()));
    }
    let data_src = format!("/api/v1/graph?{}", serde_urlencoded::to_string(&api_pairs).unwrap_or_default());

    // The drill-down path.
    let with_range = |pairs: &[(&str, &str)]| {
        let mut all: Vec<(&str, &str)> = pairs.to_vec();
        all.extend(range_pairs.iter().map(|(k, v)| (*k, v.as_str())));
        format!("/graph?{}", query(&all))
    };
    let mut crumbs = vec![Crumb { label: "Namespaces".into(), href: Some(with_range(&[])) }];
    match level {
        GraphLevel::Namespace => {}
        GraphLevel::Workload if namespace.is_empty() => {
            crumbs.push(Crumb { label: "All workloads".into(), href: None });
        }
        GraphLevel::Workload => {
            crumbs.push(Crumb { label: format!("Namespace {namespace}"), href: None });
        }
        GraphLevel::Endpoint => {
            let id = Identity(workload.unwrap_or_default());
            let labels = match state.store.identities().await {
                Ok(rows) => rows.into_iter().find(|r| r.id == id).map(|r| r.labels),
                Err(err) => {
                    tracing::error!(error = %err, "Reading identities for the graph page failed.");
                    None
                }
            };
            if let Some(ns) = labels.as_ref().and_then(|l| l.namespace()) {
                let href = with_range(&[("level", "workload"), ("namespace", ns)]);
                crumbs.push(Crumb { label: format!("Namespace {ns}"), href: Some(href) });
            }
            let name = labels.as_ref().map_or_else(|| format!("identity-{}", id.0), |l| identity_name(id, l, None));
            crumbs.push(Crumb { label: format!("Workload {name} (endpoints)"), href: None });
        }
    }
    if let Some(last) = crumbs.last_mut() {
        last.href = None;
    }

    let table_view = q.view.as_deref() == Some("table");
    let mut page = GraphPage {
        chrome: Chrome::new(&caller, "/graph"),
        level: level.as_str(),
        namespace: ns_s.clone(),
        workload: workload_s.clone(),
        crumbs,
        ranges: range.choices(),
        range_text: range.describe(),
        range: range.clone(),
        data_src,
        range_query,
        table_view,
        graph_href: here(""),
        table_href: here("table"),
        legend: legend(),
        error,
        rows: Vec::new(),
        truncated: false,
        total_edges: 0,
        total_nodes: 0,
    };
    if table_view && page.error.is_none() {
        match build(&state, &params).await {
            Ok(view) => {
                page.rows = lines(&view);
                page.truncated = view.truncated;
                page.total_edges = view.totals.edges;
                page.total_nodes = view.totals.nodes;
            }
            Err(e) => {
                let status = match &e {
                    ApiError::NotFound(_) => StatusCode::NOT_FOUND,
                    ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::BAD_REQUEST,
                };
                page.error = Some(api_message(e));
                return render_status(status, &page);
            }
        }
    }
    if page.error.is_some() {
        return render_status(StatusCode::BAD_REQUEST, &page);
    }
    render(&page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_in_utc() {
        assert_eq!(fmt_time(0), "1970-01-01 00:00:00");
        assert_eq!(fmt_time(1_700_000_000_000), "2023-11-14 22:13:20");
        assert_eq!(fmt_time(-1_000), "1969-12-31 23:59:59");
        assert_eq!(parse_input("2023-11-14T22:13"), Some(1_699_999_980_000));
        assert_eq!(parse_input("2023-11-14 22:13:20"), Some(1_700_000_000_000));
        assert_eq!(parse_input("2024-02-29T00:00"), Some(1_709_164_800_000), "leap day");
        for bad in ["2023-02-30T00:00", "2023-13-01T00:00", "2023-11-14", "yesterday", "2023-11-14T24:00", ""] {
            assert_eq!(parse_input(bad), None, "{bad}");
        }
        assert_eq!(fmt_duration(90_061_000), "1 d 1 h");
        assert_eq!(fmt_duration(3_720_000), "1 h 2 min");
        assert_eq!(fmt_duration(40_000), "40 s");
        assert_eq!(fmt_bytes(812), "812 B");
        assert_eq!(fmt_bytes(1_500_000), "1.5 MB");
    }

    #[test]
    fn ranges_parse_presets_and_custom_bounds() {
        let now = 1_700_000_000_000;
        let r = TimeRange::parse(Some("24h"), None, None, "all", now).expect("preset");
        assert_eq!((r.key, r.since, r.until), ("24h", Some(now - 86_400_000), None));
        let r = TimeRange::parse(None, None, None, "all", now).expect("default");
        assert_eq!((r.since, r.until), (None, None));
        let r = TimeRange::parse(Some("1h"), Some("2023-11-14T20:00"), Some(""), "all", now).expect("custom");
        assert_eq!(r.key, "custom");
        assert_eq!(r.since, parse_input("2023-11-14T20:00"));
        assert_eq!(r.pairs(), [("range", "custom".into()), ("from", "2023-11-14T20:00".into()), ("to", String::new())]);
        assert!(TimeRange::parse(None, Some("2023-11-14T20:00"), Some("2023-11-14T19:00"), "all", now).is_err());
        assert!(TimeRange::parse(Some("forever"), None, None, "all", now).is_err());
        assert!(TimeRange::parse(None, Some("soon"), None, "all", now).is_err());
    }
}
