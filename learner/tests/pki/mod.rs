//! A throwaway PKI laid out as `bulkhead certs` writes it (`ca.crt`, `learner.crt`,
//! `learner.key`, `node-<node>.crt/.key`, keys mode 0600), shared by the tests and
//! benchmarks that run agents against a learner over mTLS (`tests/mtls.rs`,
//! `benches/resync.rs`). The certificates come from the product's own
//! [`Ca`](bulkhead_learner::certs::Ca), so the node identity they carry is the one the
//! learner checks.

// Not `expect`: each test or bench binary compiles its own copy and uses a different part.
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::path::{Path, PathBuf};

use bulkhead_learner::certs::{self, Ca, Minted, OutputFile, Validity};
use bulkhead_proto::tls::{AgentTlsArgs, ServerTlsFiles};

/// How long the certificates are valid: longer than any test or benchmark runs.
const DAYS: u32 = 30;

/// A CA with the learner's certificate for 127.0.0.1, in a temp dir removed on drop.
pub struct Pki {
    dir: tempfile::TempDir,
    /// The CA, to mint certificates the tests shape themselves (expired, …).
    pub ca: Ca,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::generate("Test CA", Validity::days_from_now(DAYS)).expect("CA");
        let learner = ca.learner(&["127.0.0.1".to_owned()], Validity::days_from_now(DAYS)).expect("learner cert");
        write(
            dir.path(),
            &[
                file(certs::CA_CERT, &ca.minted().cert_pem, false),
                file(certs::LEARNER_CERT, &learner.cert_pem, false),
                file(certs::LEARNER_KEY, learner.key_pem(), true),
            ],
        );
        Pki { dir, ca }
    }

    /// A file in the PKI's directory (tests also keep their database there).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The learner's `--tls-cert`, `--tls-key` and `--tls-client-ca` files.
    pub fn server_files(&self) -> ServerTlsFiles {
        ServerTlsFiles {
            cert: self.path(certs::LEARNER_CERT),
            key: self.path(certs::LEARNER_KEY),
            client_ca: self.path(certs::CA_CERT),
        }
    }

    /// Writes `minted` as `<name>.crt/.key`; returns the agent flags that use them
    /// (trusting this CA for the learner).
    pub fn agent_args(&self, name: &str, minted: &Minted) -> AgentTlsArgs {
        let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
        write(self.dir.path(), &[file(&crt, &minted.cert_pem, false), file(&key, minted.key_pem(), true)]);
        self.args(&crt, &key)
    }

    /// A certificate for `node` from this CA, written where `bulkhead certs node` puts
    /// it; returns the agent flags that use it.
    pub fn node(&self, node: &str) -> AgentTlsArgs {
        let minted = self.ca.node(node, Validity::days_from_now(DAYS)).expect("node cert");
        let (crt, key) = certs::node_files(node);
        write(self.dir.path(), &[file(&crt, &minted.cert_pem, false), file(&key, minted.key_pem(), true)]);
        self.args(&crt, &key)
    }

    fn args(&self, crt: &str, key: &str) -> AgentTlsArgs {
        AgentTlsArgs {
            tls_cert: Some(self.path(crt)),
            tls_key: Some(self.path(key)),
            tls_ca: Some(self.path(certs::CA_CERT)),
            insecure_grpc: false,
        }
    }
}

fn file<'a>(name: &str, contents: &'a str, secret: bool) -> OutputFile<'a> {
    OutputFile { name: name.to_owned(), contents, secret }
}

/// Written as `bulkhead certs` writes (never over an existing file).
fn write(dir: &Path, files: &[OutputFile<'_>]) {
    certs::write_files(dir, files, false).unwrap_or_else(|e| panic!("writing certificates in {}: {e}", dir.display()));
}
