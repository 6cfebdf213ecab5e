//! The enforcer's transport flags (shared with the collector, `bulkhead_proto::tls`):
//! it refuses to talk to the learner in plaintext unless told to, and refuses a
//! `--node-id` that its certificate contradicts — at start, before touching the kernel
//! (so no root is needed here). The mTLS stream itself is exercised by the learner's
//! `mtls` tests and by the scenario (`cargo xtask scenario`).

use std::process::Command;

use bulkhead_learner::certs::{self, Ca, OutputFile, Validity};

fn enforcer(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead-enforcer")).args(args).output().expect("run bulkhead-enforcer");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn enforcer_refuses_plaintext_unasked_and_a_contradicted_node_id() {
    let (ok, out) = enforcer(&["--learner", "http://127.0.0.1:1"]);
    assert!(!ok && out.contains("refusing to talk to the learner in plaintext"), "{out}");
    let (ok, out) = enforcer(&["--learner", "http://127.0.0.1:1", "--tls-cert", "/x.crt"]);
    assert!(!ok && out.contains("missing --tls-key, --tls-ca"), "{out}");

    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::generate("Test CA", Validity::days_from_now(1)).expect("CA");
    let node = ca.node("node-e", Validity::days_from_now(1)).expect("node cert");
    let files = [
        OutputFile { name: "ca.crt".into(), contents: &ca.minted().cert_pem, secret: false },
        OutputFile { name: "node.crt".into(), contents: &node.cert_pem, secret: false },
        OutputFile { name: "node.key".into(), contents: node.key_pem(), secret: true },
    ];
    certs::write_files(dir.path(), &files, false).expect("write");
    let path = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    let (crt, key, ca) = (path("node.crt"), path("node.key"), path("ca.crt"));
    let tls = ["--tls-cert", &crt, "--tls-key", &key, "--tls-ca", &ca];
    let (ok, out) = enforcer(&[&["--learner", "https://127.0.0.1:1", "--node-id", "node-f"], &tls[..]].concat());
    assert!(!ok && out.contains("\"node-f\"") && out.contains("node-e"), "{out}");
    let (ok, out) = enforcer(&[&["--learner", "http://127.0.0.1:1"], &tls[..]].concat());
    assert!(!ok && out.contains("must start with https://"), "{out}");
}
