//! Kubernetes name and label syntax, checked before anything is exported.
//!
//! Workload labels are stored verbatim (any UTF-8 up to 1024 bytes, see
//! `bulkhead_model::labels`): inventory files and, indirectly, whoever can name a pod
//! choose them. Kubernetes is much stricter, and an export that the API server rejects
//! — or, worse, one a hand-written tool mangles — is useless to an analyst. So every
//! key, value and name is checked here against the rules of
//! `k8s.io/apimachinery/pkg/util/validation` and refused with the rule it broke.
//! Hand-written matchers rather than regexes: the learner has no regex dependency and
//! these grammars are small.

use std::fmt;

/// Longest label value and longest label-key name part (`validation.LabelValueMaxLength`,
/// `qualifiedNameMaxLength`).
pub const LABEL_MAX_LEN: usize = 63;
/// Longest DNS-1123 subdomain (`validation.DNS1123SubdomainMaxLength`).
pub const SUBDOMAIN_MAX_LEN: usize = 253;
/// Longest DNS name Cilium accepts in `toFQDNs[].matchName` (CRD `maxLength`).
pub const FQDN_MAX_LEN: usize = 255;

/// The syntax rule a string broke. The `Display` text is the rule itself, so that an
/// error message tells the analyst what *would* be accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyntaxRule {
    /// A label value: empty, or ≤63 of `[A-Za-z0-9-_.]` starting and ending alphanumeric.
    LabelValue,
    /// A label key: `[prefix/]name`, prefix a DNS-1123 subdomain, name like a value but
    /// non-empty.
    LabelKey,
    /// A DNS-1123 label (namespace names).
    Dns1123Label,
    /// A DNS-1123 subdomain (object names).
    Dns1123Subdomain,
    /// A DNS name as Cilium's `matchName` accepts it.
    DnsName,
}

impl fmt::Display for SyntaxRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SyntaxRule::LabelValue => {
                "must be empty or ≤63 characters of [A-Za-z0-9-_.], starting and ending alphanumeric"
            }
            SyntaxRule::LabelKey => {
                "must be a name of ≤63 characters of [A-Za-z0-9-_.] starting and ending alphanumeric, \
                 optionally prefixed by a DNS subdomain of ≤253 characters of [a-z0-9-.] and '/'"
            }
            SyntaxRule::Dns1123Label => {
                "must be ≤63 characters of [a-z0-9-], starting and ending with a lower-case letter or digit"
            }
            SyntaxRule::Dns1123Subdomain => {
                "must be ≤253 characters of [a-z0-9-.], each dot-separated part starting and ending \
                 with a lower-case letter or digit"
            }
            SyntaxRule::DnsName => {
                "must be ≤255 characters of dot-separated non-empty parts of [A-Za-z0-9-_], \
                 optionally ending in '.'"
            }
        })
    }
}

/// Checks a label value (`validation.IsValidLabelValue`).
pub fn label_value(value: &str) -> Result<(), SyntaxRule> {
    if value.is_empty() || is_qualified_name_part(value) { Ok(()) } else { Err(SyntaxRule::LabelValue) }
}

/// Checks a label key (`validation.IsQualifiedName`).
pub fn label_key(key: &str) -> Result<(), SyntaxRule> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| dns1123_subdomain(p).is_ok());
    if prefix_ok && is_qualified_name_part(name) { Ok(()) } else { Err(SyntaxRule::LabelKey) }
}

/// Checks a DNS-1123 label, the syntax of namespace names.
pub fn dns1123_label(s: &str) -> Result<(), SyntaxRule> {
    if is_dns_label(s) { Ok(()) } else { Err(SyntaxRule::Dns1123Label) }
}

/// Checks a DNS-1123 subdomain, the syntax of NetworkPolicy and CiliumNetworkPolicy names.
pub fn dns1123_subdomain(s: &str) -> Result<(), SyntaxRule> {
    if !s.is_empty() && s.len() <= SUBDOMAIN_MAX_LEN && s.split('.').all(is_dns_label) {
        Ok(())
    } else {
        Err(SyntaxRule::Dns1123Subdomain)
    }
}

/// Checks a DNS name against the pattern of Cilium's `matchName`
/// (`^([-a-zA-Z0-9_]+[.]?)+$`, at most 255 characters).
pub fn dns_name(s: &str) -> Result<(), SyntaxRule> {
    let body = s.strip_suffix('.').unwrap_or(s);
    let ok = !body.is_empty()
        && s.len() <= FQDN_MAX_LEN
        && body
            .split('.')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    if ok { Ok(()) } else { Err(SyntaxRule::DnsName) }
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, at most 63 bytes. Works on bytes: any
/// non-ASCII byte fails the charset, so multi-byte UTF-8 cannot sneak through.
fn is_qualified_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    match (b.first(), b.last()) {
        (Some(first), Some(last)) => {
            b.len() <= LABEL_MAX_LEN
                && first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 bytes.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    match (b.first(), b.last()) {
        (Some(first), Some(last)) => {
            b.len() <= LABEL_MAX_LEN && alnum(first) && alnum(last) && b.iter().all(|c| alnum(c) || *c == b'-')
        }
        _ => false,
    }
}

/// Shortens untrusted text for an error message: at most 64 characters, with an
/// ellipsis when cut. Messages are printed with `{:?}` so control characters and quotes
/// are escaped; this only bounds their length (values may be 1024 bytes).
pub(crate) fn shown(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(MAX).collect();
        out.push('…');
        out
    }
}
