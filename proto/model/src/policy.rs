//! Policies: what a workload may talk to. Semantics follow Kubernetes NetworkPolicy so
//! that what an analyst approves here means the same thing once exported:
//! * a [`Policy`] selects workloads by [`LabelSelector`] and *covers* the directions
//!   whose rule list is `Some` — default deny applies only there;
//! * everything that selects a workload is an allow-list union;
//! * connection-based: a reply of an allowed connection is not a new connection.
//!
//! Peers are label selectors, reserved entities, CIDRs, inventory CIDR groups or DNS
//! names ([`Peer`]) — never a pod's IP: pods churn, labels don't.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{Direction, Labels, Protocol, ReservedIdentity};

// === selectors ===

/// How a [`SelectorRequirement`] compares a label (Kubernetes' `LabelSelectorOperator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    /// Sorted; empty for `Exists` / `DoesNotExist`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

impl SelectorRequirement {
    pub fn does_not_exist(key: impl Into<String>) -> Self {
        Self { key: key.into(), operator: SelectorOperator::DoesNotExist, values: Vec::new() }
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            SelectorOperator::In => value.is_some_and(|v| self.values.iter().any(|x| x == v)),
            SelectorOperator::NotIn => value.is_none_or(|v| self.values.iter().all(|x| x != v)),
            SelectorOperator::Exists => value.is_some(),
            SelectorOperator::DoesNotExist => value.is_none(),
        }
    }
}

/// A Kubernetes-style label selector over workload labels (the namespace is the label
/// [`crate::labels::NAMESPACE_KEY`]). The empty selector selects every workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Sorted and deduplicated, so equal selectors compare equal.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<SelectorRequirement>,
}

impl LabelSelector {
    /// Selects workloads carrying all of `labels` (and possibly more).
    pub fn with_labels<'a>(labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self {
            match_labels: labels.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
            match_expressions: Vec::new(),
        }
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v.as_str()))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// Sorts and deduplicates the expressions (the canonical form).
    pub fn normalize(&mut self) {
        for r in &mut self.match_expressions {
            r.values.sort();
            r.values.dedup();
        }
        self.match_expressions.sort();
        self.match_expressions.dedup();
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("{all}");
        }
        let mut parts: Vec<String> = self.match_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for r in &self.match_expressions {
            parts.push(match r.operator {
                SelectorOperator::In => format!("{} in ({})", r.key, r.values.join(",")),
                SelectorOperator::NotIn => format!("{} notin ({})", r.key, r.values.join(",")),
                SelectorOperator::Exists => r.key.clone(),
                SelectorOperator::DoesNotExist => format!("!{}", r.key),
            });
        }
        write!(f, "{{{}}}", parts.join(", "))
    }
}

// === ports ===

/// A protocol and an inclusive port range. Synthesis only ever emits single ports
/// (`first == last`): ephemeral ranges are never opened, replies pass by connection
/// tracking. Ranges exist for imported policies (`endPort`, port omitted = all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub protocol: Protocol,
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn single(protocol: Protocol, port: u16) -> Self {
        Self { protocol, first: port, last: port }
    }

    pub fn all(protocol: Protocol) -> Self {
        Self { protocol, first: 0, last: u16::MAX }
    }

    pub fn contains(&self, protocol: Protocol, port: u16) -> bool {
        self.protocol == protocol && (self.first..=self.last).contains(&port)
    }

    pub fn is_single(&self) -> bool {
        self.first == self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.protocol.as_str();
        match (self.first, self.last) {
            (a, b) if a == b => write!(f, "{a}/{p}"),
            (0, u16::MAX) => write!(f, "any/{p}"),
            (a, b) => write!(f, "{a}-{b}/{p}"),
        }
    }
}

// === peers and rules ===

/// The other side of a rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Peer {
    /// Managed workloads whose labels match.
    Workloads { selector: LabelSelector },
    /// A reserved entity: host, world, remote-node, kube-apiserver, unmanaged.
    Entity { entity: ReservedIdentity },
    /// External addresses in `cidr` but not in `except`.
    Cidr {
        cidr: IpNet,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        except: Vec<IpNet>,
    },
    /// A named external CIDR group from the inventory (an identity of its own).
    CidrGroup { name: String, cidrs: Vec<IpNet> },
    /// External addresses a DNS name resolved to. `addresses` are the ones still valid
    /// (TTL) when the policy was made: what a plain NetworkPolicy falls back to.
    Fqdn { name: String, addresses: Vec<IpAddr> },
}

impl Peer {
    /// Whether this peer names something outside the cluster / inventory.
    pub fn is_external(&self) -> bool {
        match self {
            Peer::Workloads { .. } => false,
            Peer::Entity { entity } => *entity == ReservedIdentity::World,
            Peer::Cidr { .. } | Peer::CidrGroup { .. } | Peer::Fqdn { .. } => true,
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Workloads { selector } => write!(f, "workloads {selector}"),
            Peer::Entity { entity } => write!(f, "entity {}", entity.name()),
            Peer::Cidr { cidr, except } if except.is_empty() => write!(f, "cidr {cidr}"),
            Peer::Cidr { cidr, except } => {
                let ex: Vec<String> = except.iter().map(ToString::to_string).collect();
                write!(f, "cidr {cidr} except {}", ex.join(","))
            }
            Peer::CidrGroup { name, .. } => write!(f, "cidr-group {name}"),
            Peer::Fqdn { name, .. } => write!(f, "fqdn {name}"),
        }
    }
}

/// One allow rule: a peer and the ports it may use (empty = every port), optionally
/// narrowed to HTTP requests (L7).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Rule {
    pub peer: Peer,
    /// Sorted and deduplicated.
    pub ports: Vec<PortRange>,
    /// Empty: L4 only (any payload on the ports). Non-empty: the peer may use these
    /// ports only for HTTP requests matching one of these (Cilium's `rules.http[]`).
    /// Sorted and deduplicated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRule>,
}

impl Rule {
    /// A plain L4 rule: the peer may use `ports` for anything.
    pub fn l4(peer: Peer, ports: Vec<PortRange>) -> Rule {
        Rule { peer, ports, http: Vec::new() }
    }

    pub fn allows_port(&self, protocol: Protocol, port: u16) -> bool {
        self.ports.is_empty() || self.ports.iter().any(|p| p.contains(protocol, port))
    }

    /// Whether the rule is narrowed to HTTP requests.
    pub fn is_l7(&self) -> bool {
        !self.http.is_empty()
    }

    /// Whether one HTTP request is allowed by the rule's L7 part (an L4 rule allows
    /// every request).
    pub fn allows_request(&self, method: &str, path: &str) -> bool {
        self.http.is_empty() || self.http.iter().any(|h| h.matches(method, path))
    }
}

// === HTTP (L7) ===

/// Longest HTTP path (exact or prefix) a rule may carry, in bytes. The enforcer parses
/// the request line of a connection's first segment in the kernel and compares at most
/// this many bytes of the path, so a longer rule could never be enforced as written.
pub const MAX_HTTP_PATH_LEN: usize = 128;

/// Longest HTTP method a rule may carry (`OPTIONS` is 7; extension methods are short).
pub const MAX_HTTP_METHOD_LEN: usize = 16;

/// One allowed HTTP request shape (L7), as Cilium's `rules.http[]` {method, path}.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HttpRule {
    /// Upper-case method (`GET`, `POST`, …); `None` = any method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Which request paths (never the query string).
    pub path: HttpPath,
}

/// Which request paths an [`HttpRule`] matches. Paths are compared byte for byte as
/// they appear on the request line (no percent-decoding, no normalization), up to the
/// first space or `?`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "match", content = "value")]
pub enum HttpPath {
    /// Every path.
    Any,
    /// Exactly this path.
    Exact(String),
    /// Every path starting with this (`/v1/` matches `/v1/a` and `/v1/`).
    Prefix(String),
}

/// Why an [`HttpRule`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpRuleError {
    #[error("HTTP method {method:?} is not an upper-case token of 1–{max} letters A–Z")]
    InvalidMethod { method: String, max: usize },
    #[error("HTTP path {path:?} must start with '/'")]
    PathNotAbsolute { path: String },
    #[error("HTTP path is {len} bytes long; at most {max} bytes can be enforced")]
    PathTooLong { len: usize, max: usize },
    #[error("HTTP path {path:?} contains byte {byte:#04x} at {index} (only visible ASCII, no '?' or '#')")]
    InvalidPathByte { path: String, byte: u8, index: usize },
}

impl HttpRule {
    /// `method path` as an exact rule.
    pub fn exact(method: impl Into<String>, path: impl Into<String>) -> Self {
        Self { method: Some(method.into()), path: HttpPath::Exact(path.into()) }
    }

    /// `method` on every path under `prefix`.
    pub fn prefix(method: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self { method: Some(method.into()), path: HttpPath::Prefix(prefix.into()) }
    }

    /// Checks the rule is something the enforcer can match and the exports can
    /// express: an upper-case token method and a bounded path of visible ASCII.
    pub fn validate(&self) -> Result<(), HttpRuleError> {
        if let Some(m) = &self.method {
            validate_method(m)?;
        }
        match &self.path {
            HttpPath::Any => Ok(()),
            HttpPath::Exact(p) | HttpPath::Prefix(p) => validate_path(p),
        }
    }

    /// Whether a request with this method and path (no query string) matches.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        self.method.as_deref().is_none_or(|m| m == method) && self.path.matches(path)
    }

    /// Whether every request `other` matches is matched by `self` too.
    pub fn covers(&self, other: &HttpRule) -> bool {
        let method = match (&self.method, &other.method) {
            (None, _) => true,
            (Some(a), Some(b)) => a == b,
            (Some(_), None) => false,
        };
        method && self.path.covers(&other.path)
    }
}

impl HttpPath {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            HttpPath::Any => true,
            HttpPath::Exact(p) => p == path,
            HttpPath::Prefix(p) => path.starts_with(p.as_str()),
        }
    }

    /// Whether every path `other` matches is matched by `self` too.
    pub fn covers(&self, other: &HttpPath) -> bool {
        match (self, other) {
            (HttpPath::Any, _) => true,
            (_, HttpPath::Any) => false,
            (HttpPath::Exact(a), HttpPath::Exact(b)) => a == b,
            (HttpPath::Exact(_), HttpPath::Prefix(_)) => false,
            (HttpPath::Prefix(p), HttpPath::Exact(q) | HttpPath::Prefix(q)) => q.starts_with(p.as_str()),
        }
    }
}

/// Checks an HTTP method: 1–[`MAX_HTTP_METHOD_LEN`] upper-case letters.
pub fn validate_method(method: &str) -> Result<(), HttpRuleError> {
    let ok =
        !method.is_empty() && method.len() <= MAX_HTTP_METHOD_LEN && method.bytes().all(|b| b.is_ascii_uppercase());
    if ok { Ok(()) } else { Err(HttpRuleError::InvalidMethod { method: method.to_owned(), max: MAX_HTTP_METHOD_LEN }) }
}

/// Checks an HTTP path: starts with `/`, at most [`MAX_HTTP_PATH_LEN`] bytes of visible
/// ASCII, no `?` (the query is never part of a path) and no `#`.
pub fn validate_path(path: &str) -> Result<(), HttpRuleError> {
    if path.len() > MAX_HTTP_PATH_LEN {
        return Err(HttpRuleError::PathTooLong { len: path.len(), max: MAX_HTTP_PATH_LEN });
    }
    if !path.starts_with('/') {
        return Err(HttpRuleError::PathNotAbsolute { path: path.to_owned() });
    }
    match path.bytes().enumerate().find(|&(_, b)| !b.is_ascii_graphic() || b == b'?' || b == b'#') {
        Some((index, byte)) => Err(HttpRuleError::InvalidPathByte { path: path.to_owned(), byte, index }),
        None => Ok(()),
    }
}

impl fmt::Display for HttpRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.method.as_deref().unwrap_or("*"))?;
        f.write_str(" ")?;
        fmt::Display::fmt(&self.path, f)
    }
}

impl fmt::Display for HttpPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpPath::Any => f.write_str("(any path)"),
            HttpPath::Exact(p) => f.write_str(p),
            HttpPath::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// The policy for the workloads `selector` selects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Kubernetes object name (DNS-1123).
    pub name: String,
    /// Namespace of the selected workloads, when they have one.
    pub namespace: Option<String>,
    /// Selects the workloads the policy applies to (includes the namespace label).
    pub selector: LabelSelector,
    /// `None`: ingress not covered (everything allowed); `Some(empty)`: deny all.
    pub ingress: Option<Vec<Rule>>,
    /// `None`: egress not covered; `Some(empty)`: deny all.
    pub egress: Option<Vec<Rule>>,
}

impl Policy {
    pub fn rules(&self, direction: Direction) -> Option<&[Rule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// Sorts rules and ports so equal policies serialize identically.
    pub fn normalize(&mut self) {
        self.selector.normalize();
        for rules in [self.ingress.as_mut(), self.egress.as_mut()].into_iter().flatten() {
            for r in rules.iter_mut() {
                if let Peer::Workloads { selector } = &mut r.peer {
                    selector.normalize();
                }
                r.ports.sort();
                r.ports.dedup();
                r.http.sort();
                r.http.dedup();
            }
            rules.sort();
            rules.dedup();
        }
    }
}

/// Per-workload rollout stage (DESIGN.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutMode {
    /// No policy; observe.
    Learn,
    /// Policy installed in audit: would-deny traffic reported, nothing dropped.
    Monitor,
    /// Would-deny traffic dropped and reported.
    Enforce,
}

impl RolloutMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutMode::Learn => "learn",
            RolloutMode::Monitor => "monitor",
            RolloutMode::Enforce => "enforce",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        Labels::new(pairs.iter().copied()).expect("valid labels")
    }

    #[test]
    fn selector_semantics_follow_kubernetes() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        assert!(LabelSelector::default().matches(&l));
        assert!(LabelSelector::with_labels([("app", "web")]).matches(&l));
        assert!(!LabelSelector::with_labels([("app", "db")]).matches(&l));
        let mut s = LabelSelector::with_labels([("app", "web")]);
        s.match_expressions.push(SelectorRequirement::does_not_exist("tier"));
        assert!(!s.matches(&l));
        assert!(s.matches(&labels(&[("app", "web")])));
        let not_in =
            SelectorRequirement { key: "tier".into(), operator: SelectorOperator::NotIn, values: vec!["back".into()] };
        assert!(not_in.matches(&l));
        assert!(not_in.matches(&labels(&[])));
        let in_ = SelectorRequirement { key: "tier".into(), operator: SelectorOperator::In, values: vec![] };
        assert!(!in_.matches(&l));
    }

    #[test]
    fn ports_display_and_contain() {
        assert_eq!(PortRange::single(Protocol::Tcp, 80).to_string(), "80/tcp");
        assert_eq!(PortRange::all(Protocol::Udp).to_string(), "any/udp");
        let r = PortRange { protocol: Protocol::Tcp, first: 8000, last: 8080 };
        assert!(r.contains(Protocol::Tcp, 8080) && !r.contains(Protocol::Udp, 8000) && !r.contains(Protocol::Tcp, 80));
        let rule = Rule::l4(Peer::Entity { entity: ReservedIdentity::Host }, vec![]);
        assert!(rule.allows_port(Protocol::Udp, 53));
    }

    #[test]
    fn http_rules_validate_what_the_enforcer_can_match() {
        assert_eq!(HttpRule::exact("POST", "/v1/request-landing").validate(), Ok(()));
        assert_eq!(HttpRule::prefix("GET", "/").validate(), Ok(()));
        assert_eq!(HttpRule { method: None, path: HttpPath::Any }.validate(), Ok(()));
        let long = format!("/{}", "a".repeat(MAX_HTTP_PATH_LEN - 1));
        assert_eq!(HttpRule::exact("GET", long.as_str()).validate(), Ok(()));
        let bad = [
            (HttpRule::exact("get", "/"), "method"),
            (HttpRule::exact("", "/"), "method"),
            (HttpRule::exact("G3T", "/"), "method"),
            (HttpRule::exact("A".repeat(MAX_HTTP_METHOD_LEN + 1), "/"), "method"),
            (HttpRule::exact("GET", "v1/x"), "start with '/'"),
            (HttpRule::exact("GET", ""), "start with '/'"),
            (HttpRule::exact("GET", format!("{long}b")), "at most 128 bytes"),
            (HttpRule::exact("GET", "/a b"), "byte 0x20"),
            (HttpRule::exact("GET", "/a\r\n"), "byte 0x0d"),
            (HttpRule::exact("GET", "/a?x=1"), "byte 0x3f"),
            (HttpRule::prefix("GET", "/caf\u{e9}"), "byte 0xc3"),
            (HttpRule::prefix("GET", "/#frag"), "byte 0x23"),
        ];
        for (rule, want) in bad {
            let err = rule.validate().expect_err("must be refused").to_string();
            assert!(err.contains(want), "{rule}: {err:?} should mention {want:?}");
        }
    }

    #[test]
    fn http_rules_match_method_and_path() {
        let landing = HttpRule::exact("POST", "/v1/request-landing");
        assert!(landing.matches("POST", "/v1/request-landing"));
        assert!(!landing.matches("PUT", "/v1/request-landing"));
        assert!(!landing.matches("POST", "/v1/request-landing/x"));
        let v1 = HttpRule::prefix("GET", "/v1/");
        assert!(v1.matches("GET", "/v1/") && v1.matches("GET", "/v1/a/b"));
        assert!(!v1.matches("GET", "/v1") && !v1.matches("HEAD", "/v1/a"));
        assert!(HttpRule { method: None, path: HttpPath::Any }.matches("DELETE", "/x"));
        let l4 = Rule::l4(Peer::Entity { entity: ReservedIdentity::Host }, vec![]);
        assert!(!l4.is_l7() && l4.allows_request("PUT", "/v1/exhaust-port"));
        let l7 = Rule { http: vec![landing.clone()], ..l4 };
        assert!(l7.is_l7() && l7.allows_request("POST", "/v1/request-landing"));
        assert!(!l7.allows_request("PUT", "/v1/exhaust-port"));
        assert!(v1.covers(&HttpRule::exact("GET", "/v1/x")) && v1.covers(&HttpRule::prefix("GET", "/v1/a/")));
        assert!(!v1.covers(&HttpRule::prefix("GET", "/")) && !v1.covers(&HttpRule::exact("POST", "/v1/x")));
        assert!(!landing.covers(&HttpRule { method: None, path: HttpPath::Exact("/v1/request-landing".into()) }));
        assert!(HttpRule { method: None, path: HttpPath::Any }.covers(&v1));
        assert_eq!(landing.to_string(), "POST /v1/request-landing");
        assert_eq!(v1.to_string(), "GET /v1/*");
    }

    #[test]
    fn http_rules_serialize_like_the_documented_shape() {
        let rule = Rule {
            peer: Peer::Entity { entity: ReservedIdentity::Host },
            ports: vec![PortRange::single(Protocol::Tcp, 80)],
            http: vec![HttpRule::exact("POST", "/v1/request-landing"), HttpRule { method: None, path: HttpPath::Any }],
        };
        let json = serde_json::to_value(&rule).expect("serializes");
        assert_eq!(
            json["http"],
            serde_json::json!([
                {"method": "POST", "path": {"match": "exact", "value": "/v1/request-landing"}},
                {"path": {"match": "any"}},
            ])
        );
        // An L4 rule has no `http` key at all, and old JSON without one still parses.
        let l4 = serde_json::to_value(Rule::l4(Peer::Entity { entity: ReservedIdentity::Host }, vec![])).expect("json");
        assert!(l4.get("http").is_none(), "{l4}");
        let back: Rule = serde_json::from_value(l4).expect("parses");
        assert!(back.http.is_empty());
    }

    #[test]
    fn policy_round_trips_through_json() {
        let mut p = Policy {
            name: "bulkhead-deathstar".into(),
            namespace: Some("empire".into()),
            selector: LabelSelector::with_labels([("class", "deathstar")]),
            ingress: Some(vec![Rule {
                peer: Peer::Workloads { selector: LabelSelector::with_labels([("org", "empire")]) },
                ports: vec![PortRange::single(Protocol::Tcp, 80)],
                http: vec![
                    HttpRule::exact("POST", "/v1/request-landing"),
                    HttpRule::exact("POST", "/v1/request-landing"),
                ],
            }]),
            egress: None,
        };
        p.normalize();
        assert_eq!(p.ingress.as_ref().expect("ingress")[0].http.len(), 1, "normalize dedups http rules");
        let json = serde_json::to_string(&p).expect("serializes");
        let back: Policy = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, p);
    }
}
