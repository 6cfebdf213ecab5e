//! How the observe pages (overview, flows, workloads, audit, users) show things: times
//! (always UTC, the same for every analyst), counts, bytes, workload names and links,
//! label chips, the time-range form fields, and query strings for pagination links.
//!
//! Everything here produces plain text; the templates escape it. Nothing builds HTML.

use std::collections::HashMap;
use std::fmt::Display;

use axum::http::StatusCode;
use axum::response::Response;
use bulkhead_model::{Identity, Labels, Verdict};

use crate::store::{Store, StoreError, WorkloadEntry};

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 60 * MINUTE_MS;
const DAY_MS: i64 = 24 * HOUR_MS;

// === times ===

/// `(year, month, day)` of a day count since 1970-01-01 (proleptic Gregorian; Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a civil date (inverse of [`civil_from_days`]).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The parts of a Unix-ms time in UTC: date, hours, minutes, seconds.
fn parts(ms: i64) -> ((i64, u32, u32), i64, i64, i64) {
    let days = ms.div_euclid(DAY_MS);
    let in_day = ms.rem_euclid(DAY_MS) / 1000;
    (civil_from_days(days), in_day / 3600, in_day % 3600 / 60, in_day % 60)
}

/// `2024-05-01 12:34:56` (UTC).
pub fn time(ms: i64) -> String {
    let ((y, mo, d), h, mi, s) = parts(ms);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}")
}

/// [`time`], or a dash.
pub fn time_opt(ms: Option<i64>) -> String {
    ms.map_or_else(|| "—".to_owned(), time)
}

/// `12:34` (UTC), for chart axes.
pub fn clock(ms: i64) -> String {
    let (_, h, mi, _) = parts(ms);
    format!("{h:02}:{mi:02}")
}

/// `05-01 12:34` (UTC), for chart axes spanning days.
pub fn day_clock(ms: i64) -> String {
    let ((_, mo, d), h, mi, _) = parts(ms);
    format!("{mo:02}-{d:02} {h:02}:{mi:02}")
}

/// The value of a `datetime-local` input for a time: `2024-05-01T12:34` (UTC).
pub fn datetime_input(ms: i64) -> String {
    let ((y, mo, d), h, mi, _) = parts(ms);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}")
}

/// Parses `YYYY-MM-DDTHH:MM[:SS]` (a `datetime-local` input; a space instead of the `T`
/// too) as UTC.
pub fn parse_datetime(s: &str) -> Option<i64> {
    let s = s.trim();
    let (date, clock) = s.split_once(['T', ' ']).unwrap_or((s, "00:00"));
    let mut d = date.splitn(3, '-');
    let year: i64 = d.next()?.parse().ok()?;
    let month: u32 = d.next()?.parse().ok()?;
    let day: u32 = d.next()?.parse().ok()?;
    let mut c = clock.splitn(3, ':');
    let hour: i64 = c.next()?.parse().ok()?;
    let minute: i64 = c.next()?.parse().ok()?;
    let second: f64 = c.next().map_or(Some(0.0), |s| s.parse().ok())?;
    let valid = (1970..=9999).contains(&year)
        && (1..=12).contains(&month)
        && (1..=31).contains(&day)
        && (0..24).contains(&hour)
        && (0..60).contains(&minute)
        && (0.0..60.0).contains(&second);
    if !valid {
        return None;
    }
    let days = days_from_civil(year, month, day);
    if civil_from_days(days) != (year, month, day) {
        return None; // 31 April and the like
    }
    Some(days * DAY_MS + hour * HOUR_MS + minute * MINUTE_MS + (second * 1000.0) as i64)
}

/// `5 s ago`, `3 min ago`, `2 h ago`, `4 d ago` (or `in …` for a time ahead of `now`).
pub fn ago(now_ms: i64, ms: i64) -> String {
    let (d, future) = if ms > now_ms { (ms - now_ms, true) } else { (now_ms - ms, false) };
    let span = if d < MINUTE_MS {
        format!("{} s", d / 1000)
    } else if d < HOUR_MS {
        format!("{} min", d / MINUTE_MS)
    } else if d < 2 * DAY_MS {
        format!("{} h", d / HOUR_MS)
    } else {
        format!("{} d", d / DAY_MS)
    };
    if future { format!("in {span}") } else { format!("{span} ago") }
}

/// [`ago`], or `never`.
pub fn ago_opt(now_ms: i64, ms: Option<i64>) -> String {
    ms.map_or_else(|| "never".to_owned(), |ms| ago(now_ms, ms))
}

// === numbers ===

/// `1,234,567`.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `512 B`, `1.5 KiB`, `20.0 MiB`, ….
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

// === verdicts ===

/// The UI's word for a flow verdict (`forwarded` is what analysts call allowed).
pub fn verdict_word(v: Verdict) -> &'static str {
    match v {
        Verdict::Forwarded => "allowed",
        Verdict::Audit => "audit",
        Verdict::Denied => "denied",
    }
}

/// The CSS class of a verdict badge (`app.css`).
pub fn verdict_class(v: Verdict) -> &'static str {
    match v {
        Verdict::Forwarded => "verdict-allowed",
        Verdict::Audit => "verdict-audit",
        Verdict::Denied => "verdict-denied",
    }
}

// === workloads ===

/// `key=value` pairs of a label set, for `label-chip`s.
pub fn chips(labels: &Labels) -> Vec<String> {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// A workload as a table cell shows it: its name, linked to its page unless reserved.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Peer {
    pub id: u32,
    pub name: String,
    /// `/workloads/<id>`; `None` for reserved identities (world, host, …).
    pub href: Option<String>,
}

/// Every identity's name, to label flows, edges and events.
#[derive(Debug, Default)]
pub struct Directory {
    by_id: HashMap<Identity, WorkloadEntry>,
}

impl Directory {
    pub async fn load(store: &Store) -> Result<Self, StoreError> {
        Ok(Self::from_entries(store.workload_directory().await?))
    }

    pub fn from_entries(entries: Vec<WorkloadEntry>) -> Self {
        Self { by_id: entries.into_iter().map(|e| (e.identity, e)).collect() }
    }

    pub fn get(&self, id: Identity) -> Option<&WorkloadEntry> {
        self.by_id.get(&id)
    }

    /// The name of `id` (`identity-<n>` for a number the store does not know).
    pub fn name(&self, id: Identity) -> String {
        self.by_id.get(&id).map_or_else(|| format!("identity-{}", id.0), |e| e.name.clone())
    }

    pub fn peer(&self, id: Identity) -> Peer {
        Peer { id: id.0, name: self.name(id), href: (!id.is_reserved()).then(|| format!("/workloads/{}", id.0)) }
    }

    /// Every entry, by identity.
    pub fn entries(&self) -> Vec<&WorkloadEntry> {
        let mut all: Vec<&WorkloadEntry> = self.by_id.values().collect();
        all.sort_by_key(|e| e.identity);
        all
    }

    /// Distinct namespaces, sorted.
    pub fn namespaces(&self) -> Vec<String> {
        let mut ns: Vec<String> = self.by_id.values().filter_map(|e| e.namespace.clone()).collect();
        ns.sort();
        ns.dedup();
        ns
    }
}

// === forms and links ===

/// A form field's value: trimmed, `None` when blank.
pub fn field(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// `?a=1&b=x%20y` from the pairs with a value (empty when none).
pub fn query_string(pairs: &[(&str, Option<String>)]) -> String {
    let present: Vec<(&str, &str)> = pairs.iter().filter_map(|(k, v)| v.as_deref().map(|v| (*k, v))).collect();
    if present.is_empty() {
        return String::new();
    }
    serde_urlencoded::to_string(present).map(|q| format!("?{q}")).unwrap_or_default()
}

/// A range preset of the time-range selects: value, label, length.
pub type RangePreset = (&'static str, &'static str, i64);

/// Presets of the flows page's "seen within" select.
pub const FLOW_RANGES: &[RangePreset] = &[
    ("15m", "last 15 minutes", 15 * MINUTE_MS),
    ("1h", "last hour", HOUR_MS),
    ("6h", "last 6 hours", 6 * HOUR_MS),
    ("24h", "last 24 hours", DAY_MS),
    ("7d", "last 7 days", 7 * DAY_MS),
];

/// The preset named `value`.
pub fn preset(presets: &[RangePreset], value: &str) -> Option<RangePreset> {
    presets.iter().copied().find(|p| p.0 == value)
}

/// An option of a `<select>`.
#[derive(Debug, Clone)]
pub struct Choice {
    pub value: String,
    pub label: String,
    pub selected: bool,
}

/// Options for `presets`, `current` selected, after an "any time" option when
/// `any_label` is given.
pub fn choices(presets: &[RangePreset], current: &str, any_label: Option<&str>) -> Vec<Choice> {
    let any = any_label.map(|l| Choice { value: String::new(), label: l.to_owned(), selected: current.is_empty() });
    any.into_iter()
        .chain(presets.iter().map(|(v, l, _)| Choice {
            value: (*v).to_owned(),
            label: (*l).to_owned(),
            selected: *v == current,
        }))
        .collect()
}

/// Options from `(value, label)` pairs.
pub fn options(values: &[(&str, &str)], current: &str) -> Vec<Choice> {
    values
        .iter()
        .map(|(v, l)| Choice { value: (*v).to_owned(), label: (*l).to_owned(), selected: *v == current })
        .collect()
}

/// A store failure as a page: logged with its cause, shown without it.
pub fn store_failed(what: &str, err: impl Display) -> Response {
    tracing::error!(error = %err, page = what, "Reading the store for a page failed.");
    super::super::error::page(StatusCode::SERVICE_UNAVAILABLE, "the store is unavailable; try again")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_and_round_trip() {
        assert_eq!(time(0), "1970-01-01 00:00:00");
        assert_eq!(time(1_700_000_000_000), "2023-11-14 22:13:20");
        assert_eq!(time(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(time(-1000), "1969-12-31 23:59:59");
        // Inputs carry whole minutes.
        for ms in [0, 1_699_999_980_000, 951_782_400_000, 4_102_444_800_000] {
            assert_eq!(parse_datetime(&datetime_input(ms)), Some(ms), "{ms}");
        }
        assert_eq!(parse_datetime("2023-11-14T22:13:20"), Some(1_700_000_000_000));
        assert_eq!(parse_datetime("2023-11-14 22:13"), Some(1_699_999_980_000));
        assert_eq!(parse_datetime("2023-11-14"), Some(1_699_920_000_000));
        for bad in ["", "x", "2023-02-29T00:00", "2023-13-01T00:00", "2023-01-01T24:00", "2023-01-01T00:60"] {
            assert_eq!(parse_datetime(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_000), "1,000");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(u64::MAX), "16.0 EiB");
        assert_eq!(ago(100_000, 95_000), "5 s ago");
        assert_eq!(ago(0, 3 * HOUR_MS), "in 3 h");
        assert_eq!(ago(10 * DAY_MS, 0), "10 d ago");
    }

    #[test]
    fn query_strings_encode_values() {
        assert_eq!(query_string(&[("a", None)]), "");
        assert_eq!(
            query_string(&[("ns", Some("a b&c".into())), ("x", None), ("p", Some("80".into()))]),
            "?ns=a+b%26c&p=80"
        );
    }
}
