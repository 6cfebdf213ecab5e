//! Kubernetes-safe policy names derived from workload names.

/// Longest workload part: DNS-1123 labels are ≤ 63 = "bulkhead-" (9) + this +
/// room for a `-<identity>` suffix (≤ 11) when two names collide.
const MAX_BASE: usize = 43;

/// `bulkhead-<workload>`: lowercase alphanumerics and '-', ≤ 63 characters, never
/// empty. The part after the last '/' is used (`namespace/name` → `name`).
pub fn policy_name(workload: &str) -> String {
    let base = workload.rsplit('/').next().unwrap_or(workload);
    let mut out = String::with_capacity(base.len());
    for c in base.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
        if out.len() >= MAX_BASE {
            break;
        }
    }
    let trimmed = out.trim_matches('-');
    if trimmed.is_empty() { "bulkhead-workload".to_owned() } else { format!("bulkhead-{trimmed}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_1123() {
        assert_eq!(policy_name("default/deathstar"), "bulkhead-deathstar");
        assert_eq!(policy_name("Web_Front.end"), "bulkhead-web-front-end");
        assert_eq!(policy_name("<script>"), "bulkhead-script");
        assert_eq!(policy_name("日本"), "bulkhead-workload");
        let long = policy_name(&"x".repeat(500));
        assert!(long.len() + 11 <= 63, "{long}");
    }
}
