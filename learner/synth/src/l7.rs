//! HTTP (L7) narrowing of ingress rules: which requests a rule's port should allow.
//!
//! A port is narrowed only when what was seen there is the whole story. For the edges
//! a rule covers on that port, within the window:
//! * every edge carried HTTP requests (a peer whose connections showed none would be
//!   cut off by rules made from the others);
//! * none carried *opaque* connections — payload that was not a plaintext HTTP/1.x
//!   request line: TLS, another protocol, a request line too long to write a rule for;
//! * none lost paths to a bound (*overflow*): the path list is complete.
//!
//! Then the port allows exactly the observed (method, path) pairs, except that more
//! than [`Options::http_prefix_after`] distinct paths of one method under one parent
//! (`/v1/ships/1`, `/v1/ships/2`, … → prefix `/v1/ships/`) become one prefix rule,
//! cascading upwards (`/v1/` when enough of its children are prefixes or paths). The
//! evidence of a prefix says how many observed paths it stands for and that it also
//! allows paths never seen. Past [`Options::http_max_rules`] rules the port stays L4.
//! Whatever keeps a port with HTTP traffic at L4 is said in an info lint.

use std::collections::BTreeMap;

use bulkhead_model::{EdgeHttp, EdgeKey, HttpEvidence, HttpPath, HttpRule, Window};

use crate::input::Options;

/// What to do with one port of one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No HTTP request was seen: plain L4, nothing to say.
    NoData,
    /// Narrow to these HTTP rules (sorted by rule, one evidence entry each).
    Narrow(Vec<HttpEvidence>),
    /// HTTP requests were seen, but the port stays L4.
    Stays(Reason),
}

/// Why a port with HTTP requests stays L4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Connections carried payload that was not a plaintext HTTP request line.
    Opaque { connections: u64 },
    /// Requests were counted without their paths: the path list is incomplete.
    Overflow { requests: u64 },
    /// Even generalized to prefixes, more HTTP rules than allowed.
    TooManyRules { rules: usize, max: usize },
    /// Some covered edges carried no HTTP request at all.
    Silent { edges: usize },
}

impl Reason {
    pub fn describe(&self) -> String {
        match *self {
            Reason::Opaque { connections } => format!(
                "{connections} connection(s) carried payload that was not a plaintext HTTP request (TLS or another \
                 protocol), which HTTP rules would cut off"
            ),
            Reason::Overflow { requests } => format!(
                "{requests} request(s) were counted without their path (too many distinct paths to keep), so the \
                 observed path list is incomplete"
            ),
            Reason::TooManyRules { rules, max } => {
                format!("the observed paths need {rules} HTTP rules even as prefixes, more than the {max} allowed")
            }
            Reason::Silent { edges } => {
                format!("{edges} of the peers' connections showed no HTTP request, which HTTP rules would cut off")
            }
        }
    }
}

/// Observed requests of one HTTP rule under construction.
#[derive(Debug, Clone, Copy)]
struct Acc {
    requests: u64,
    first: i64,
    last: i64,
    paths: u64,
}

impl Acc {
    fn merge(&mut self, o: &Acc) {
        self.requests = self.requests.saturating_add(o.requests);
        self.first = self.first.min(o.first);
        self.last = self.last.max(o.last);
        self.paths = self.paths.saturating_add(o.paths);
    }
}

/// Decides one port of one rule from the HTTP facts of the edges it covers there
/// (`None`: the edge has none).
pub fn narrow(edges: &[(EdgeKey, Option<&EdgeHttp>)], window: Window, opts: &Options) -> Outcome {
    let in_window = |first: i64, last: i64| last >= window.from_unix_ms && first <= window.to_unix_ms;
    let since = |t: Option<i64>| t.is_some_and(|t| t >= window.from_unix_ms);
    let mut entries: BTreeMap<(String, HttpPath), Acc> = BTreeMap::new();
    let (mut opaque, mut overflow, mut silent) = (0u64, 0u64, 0usize);
    for (_, h) in edges {
        let mut any = false;
        if let Some(h) = h {
            for r in h.requests.iter().filter(|r| in_window(r.first_seen_unix_ms, r.last_seen_unix_ms)) {
                any = true;
                let acc =
                    Acc { requests: r.requests, first: r.first_seen_unix_ms, last: r.last_seen_unix_ms, paths: 0 };
                entries
                    .entry((r.method.clone(), HttpPath::Exact(r.path.clone())))
                    .and_modify(|a| a.merge(&acc))
                    .or_insert(Acc { paths: 1, ..acc });
            }
            if h.opaque_connections > 0 && since(h.opaque_last_seen_unix_ms) {
                opaque = opaque.saturating_add(h.opaque_connections);
            }
            if h.overflow_requests > 0 && since(h.overflow_last_seen_unix_ms) {
                overflow = overflow.saturating_add(h.overflow_requests);
            }
        }
        silent += usize::from(!any);
    }
    if entries.is_empty() {
        return Outcome::NoData;
    }
    if opaque > 0 {
        return Outcome::Stays(Reason::Opaque { connections: opaque });
    }
    if overflow > 0 {
        return Outcome::Stays(Reason::Overflow { requests: overflow });
    }
    if silent > 0 {
        return Outcome::Stays(Reason::Silent { edges: silent });
    }
    generalize(&mut entries, opts.http_prefix_after.max(1));
    if entries.len() > opts.http_max_rules {
        return Outcome::Stays(Reason::TooManyRules { rules: entries.len(), max: opts.http_max_rules });
    }
    Outcome::Narrow(
        entries
            .into_iter()
            .map(|((method, path), a)| HttpEvidence {
                generalized: matches!(path, HttpPath::Prefix(_)),
                rule: HttpRule { method: Some(method), path },
                requests: a.requests,
                first_seen_unix_ms: a.first,
                last_seen_unix_ms: a.last,
                paths: a.paths,
            })
            .collect(),
    )
}

/// The prefix a path or prefix is grouped under: `/a/b` and `/a/b/` → `/a/`... for an
/// exact path its directory (`/a/b` → `/a/`, `/a/b/` → `/a/b/`); for a prefix the one
/// above it (`/a/b/` → `/a/`); `None` above the root.
fn parent(path: &HttpPath) -> Option<String> {
    match path {
        HttpPath::Any => None,
        HttpPath::Exact(p) => p.rfind('/').map(|i| p[..=i].to_owned()),
        HttpPath::Prefix(p) => {
            let above = p.strip_suffix('/')?;
            above.rfind('/').map(|i| above[..=i].to_owned())
        }
    }
}

/// Replaces every group of more than `after` entries of one method under one parent by
/// a prefix rule for that parent, until no group is that large.
fn generalize(entries: &mut BTreeMap<(String, HttpPath), Acc>, after: usize) {
    loop {
        let mut groups: BTreeMap<(String, String), Vec<HttpPath>> = BTreeMap::new();
        for (method, path) in entries.keys() {
            if let Some(p) = parent(path) {
                groups.entry((method.clone(), p)).or_default().push(path.clone());
            }
        }
        let Some(((method, prefix), members)) = groups.into_iter().find(|(_, m)| m.len() > after) else {
            return;
        };
        let mut acc: Option<Acc> = None;
        for path in members {
            if let Some(a) = entries.remove(&(method.clone(), path)) {
                acc.get_or_insert(Acc { requests: 0, first: a.first, last: a.last, paths: 0 }).merge(&a);
            }
        }
        if let Some(acc) = acc {
            entries.entry((method, HttpPath::Prefix(prefix))).and_modify(|a| a.merge(&acc)).or_insert(acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use bulkhead_model::{EdgeHttpRequest, Identity, Protocol};

    use super::*;

    const W: Window = Window { from_unix_ms: 1_000, to_unix_ms: 10_000 };

    fn key(src: u32) -> EdgeKey {
        EdgeKey { src: Identity(src), dst: Identity(256), dst_port: 80, protocol: Protocol::Tcp }
    }

    fn facts(src: u32, reqs: &[(&str, &str, u64)]) -> EdgeHttp {
        EdgeHttp {
            key: key(src),
            requests: reqs
                .iter()
                .map(|(m, p, n)| EdgeHttpRequest {
                    method: (*m).into(),
                    path: (*p).into(),
                    requests: *n,
                    first_seen_unix_ms: 2_000,
                    last_seen_unix_ms: 3_000,
                })
                .collect(),
            opaque_connections: 0,
            opaque_last_seen_unix_ms: None,
            overflow_requests: 0,
            overflow_last_seen_unix_ms: None,
        }
    }

    fn rules(o: &Outcome) -> Vec<String> {
        match o {
            Outcome::Narrow(ev) => ev.iter().map(|e| e.rule.to_string()).collect(),
            other => panic!("expected narrowing, got {other:?}"),
        }
    }

    fn opts() -> Options {
        Options { http_prefix_after: 3, http_max_rules: 4, ..Options::default() }
    }

    #[test]
    fn table() {
        let landing = facts(257, &[("POST", "/v1/request-landing", 42)]);
        let mut opaque = facts(258, &[("GET", "/", 1)]);
        (opaque.opaque_connections, opaque.opaque_last_seen_unix_ms) = (3, Some(5_000));
        let mut old_opaque = opaque.clone();
        old_opaque.opaque_last_seen_unix_ms = Some(500);
        let mut overflow = facts(259, &[("GET", "/", 1)]);
        (overflow.overflow_requests, overflow.overflow_last_seen_unix_ms) = (7, Some(9_000));
        let items = facts(
            260,
            &[
                ("GET", "/items/1", 1),
                ("GET", "/items/2", 2),
                ("GET", "/items/3", 3),
                ("GET", "/items/4", 4),
                ("PUT", "/items/1", 1),
            ],
        );
        let wide = facts(
            261,
            &[("GET", "/a", 1), ("GET", "/b/x", 1), ("POST", "/c", 1), ("PUT", "/d", 1), ("PATCH", "/e", 1)],
        );
        let nested = facts(
            262,
            &[
                ("GET", "/v1/a/1", 1),
                ("GET", "/v1/a/2", 1),
                ("GET", "/v1/a/3", 1),
                ("GET", "/v1/a/4", 1),
                ("GET", "/v1/b/1", 1),
                ("GET", "/v1/b/2", 1),
                ("GET", "/v1/b/3", 1),
                ("GET", "/v1/b/4", 1),
                ("GET", "/v1/c/1", 1),
                ("GET", "/v1/c/2", 1),
                ("GET", "/v1/c/3", 1),
                ("GET", "/v1/c/4", 1),
                ("GET", "/v1/d", 1),
            ],
        );
        let mut stale = facts(263, &[("GET", "/old", 1)]);
        stale.requests[0].last_seen_unix_ms = 900;

        let o = narrow(&[(key(257), Some(&landing))], W, &opts());
        assert_eq!(rules(&o), vec!["POST /v1/request-landing"]);
        let Outcome::Narrow(ev) = &o else { unreachable!() };
        assert_eq!((ev[0].requests, ev[0].paths, ev[0].generalized), (42, 1, false));
        assert_eq!((ev[0].first_seen_unix_ms, ev[0].last_seen_unix_ms), (2_000, 3_000));

        assert_eq!(narrow(&[(key(258), Some(&opaque))], W, &opts()), Outcome::Stays(Reason::Opaque { connections: 3 }));
        assert_eq!(
            rules(&narrow(&[(key(258), Some(&old_opaque))], W, &opts())),
            vec!["GET /"],
            "opaque before the window"
        );
        assert_eq!(
            narrow(&[(key(259), Some(&overflow))], W, &opts()),
            Outcome::Stays(Reason::Overflow { requests: 7 })
        );
        assert_eq!(narrow(&[(key(257), None)], W, &opts()), Outcome::NoData);
        assert_eq!(narrow(&[(key(263), Some(&stale))], W, &opts()), Outcome::NoData, "requests before the window");
        assert_eq!(
            narrow(&[(key(257), Some(&landing)), (key(300), None)], W, &opts()),
            Outcome::Stays(Reason::Silent { edges: 1 })
        );

        // Four GETs under /items/ (more than 3) become a prefix; the one PUT stays exact.
        let o = narrow(&[(key(260), Some(&items))], W, &opts());
        assert_eq!(rules(&o), vec!["GET /items/*", "PUT /items/1"]);
        let Outcome::Narrow(ev) = &o else { unreachable!() };
        assert_eq!((ev[0].requests, ev[0].paths, ev[0].generalized), (10, 4, true));

        // Five distinct rules, no group large enough: too many for max 4.
        assert_eq!(
            narrow(&[(key(261), Some(&wide))], W, &opts()),
            Outcome::Stays(Reason::TooManyRules { rules: 5, max: 4 })
        );

        // Cascading: /v1/a/ /v1/b/ /v1/c/ become prefixes, then with /v1/d they are four
        // entries under /v1/ → one prefix.
        let o = narrow(&[(key(262), Some(&nested))], W, &opts());
        assert_eq!(rules(&o), vec!["GET /v1/*"]);
        let Outcome::Narrow(ev) = &o else { unreachable!() };
        assert_eq!((ev[0].requests, ev[0].paths), (13, 13));

        // Several peers' edges union their requests.
        let other = facts(264, &[("GET", "/health", 5)]);
        assert_eq!(
            rules(&narrow(&[(key(257), Some(&landing)), (key(264), Some(&other))], W, &opts())),
            vec!["GET /health", "POST /v1/request-landing"]
        );
    }

    #[test]
    fn parents() {
        let p = |s: &str| parent(&HttpPath::Exact(s.into()));
        assert_eq!(p("/a/b"), Some("/a/".into()));
        assert_eq!(p("/a/b/"), Some("/a/b/".into()));
        assert_eq!(p("/"), Some("/".into()));
        assert_eq!(parent(&HttpPath::Prefix("/a/b/".into())), Some("/a/".into()));
        assert_eq!(parent(&HttpPath::Prefix("/".into())), None);
        assert_eq!(parent(&HttpPath::Any), None);
    }
}
