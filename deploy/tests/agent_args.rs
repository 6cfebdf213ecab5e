//! Do the node agents accept the arguments deploy/ gives them? Shared by
//! `collector/tests/deploy.rs` and `enforcer/tests/deploy.rs` (included with
//! `#[path]`): only an agent's own tests can run its binary (`CARGO_BIN_EXE_…`).
//!
//! The real binary parses the arguments, followed by `--help`: clap checks every
//! argument's name and value before `--help` and stops there, so nothing starts. The
//! arguments come from `deploy/kubernetes/bulkhead.yaml` (the Helm chart's defaults;
//! `learner/tests/deploy.rs` proves it is the current rendering) and from the agent's
//! systemd unit.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    // CARGO_MANIFEST_DIR of the including crate: collector/ or enforcer/.
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the agent is one level below the root").to_owned()
}

/// Runs `binary ARGS --help`; panics with clap's complaint unless it succeeds.
/// Returns the help text.
fn accepts(binary: &str, args: &[String], envs: &[(&str, &str)], what: &str) -> String {
    let out = Command::new(binary)
        .args(args)
        .arg("--help")
        .envs(envs.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("running {binary}: {e}"));
    assert!(
        out.status.success(),
        "{binary} refuses the arguments of {what}: {args:?} {envs:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `args:` list of the container named `container` in the generated manifests
/// (the chart writes one `- --flag=value` per line).
fn manifest_args(manifests: &str, container: &str) -> Vec<String> {
    let mut lines = manifests.lines().skip_while(|l| l.trim() != format!("- name: {container}"));
    assert!(lines.next().is_some(), "no container {container} in deploy/kubernetes/bulkhead.yaml");
    let mut lines = lines.skip_while(|l| l.trim() != "args:");
    let args_line = lines.next().unwrap_or_else(|| panic!("container {container} has no args"));
    let indent = args_line.len() - args_line.trim_start().len();
    lines
        .take_while(|l| l.len() - l.trim_start().len() > indent && l.trim_start().starts_with("- "))
        .map(|l| l.trim_start().trim_start_matches("- ").trim_matches('"').to_owned())
        .collect()
}

/// The checks for one agent (`collector` or `enforcer`, binary `bulkhead-<agent>`).
pub fn check(agent: &str, binary: &str) {
    let manifests = std::fs::read_to_string(repo().join("deploy/kubernetes/bulkhead.yaml"))
        .expect("reads deploy/kubernetes/bulkhead.yaml");
    let args = manifest_args(&manifests, agent);
    assert!(args.iter().any(|a| a.starts_with("--learner=https://")), "{args:?}");
    assert!(args.iter().any(|a| a.starts_with("--tls-cert=")), "{args:?}");
    // The kubelet expands $(NODE_NAME) from the pod's node name.
    let args: Vec<String> = args.iter().map(|a| a.replace("$(NODE_NAME)", "node-1")).collect();
    accepts(binary, &args, &[], "deploy/kubernetes/bulkhead.yaml");
    // The chart's plaintext choice (tls.enabled=false).
    let plaintext = ["--learner=http://bulkhead-learner.bulkhead.svc:7400".to_owned(), "--insecure-grpc".to_owned()];
    accepts(binary, &plaintext, &[], "the chart with tls.enabled=false");

    let unit_path = repo().join(format!("deploy/systemd/bulkhead-{agent}.service"));
    let unit = std::fs::read_to_string(&unit_path).unwrap_or_else(|e| panic!("{}: {e}", unit_path.display()));
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart");
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some(format!("/usr/local/bin/bulkhead-{agent}").as_str()));
    // %d is systemd's credentials directory.
    let args: Vec<String> = words.map(|w| w.replace("%d", "/run/credentials/unit")).collect();
    let envs: Vec<(&str, &str)> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .map(|kv| kv.split_once('=').expect("KEY=value"))
        .collect();
    let help = accepts(binary, &args, &envs, unit_path.to_str().unwrap_or("the unit"));
    for (key, _) in envs {
        // BULKHEAD_LOG is the log filter, read outside clap.
        assert!(
            key == "BULKHEAD_LOG" || help.contains(&format!("[env: {key}=")),
            "{key} in {} is not one of {binary}'s variables",
            unit_path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_are_the_list_under_the_named_container() {
        let yaml = "      containers:\n        - name: a\n          args:\n            - --x=1\n            - \"--y\"\n          \
                    env:\n            - name: N\n        - name: c\n          args:\n            - --z\n";
        assert_eq!(manifest_args(yaml, "a"), ["--x=1", "--y"]);
        assert_eq!(manifest_args(yaml, "c"), ["--z"]);
    }
}
