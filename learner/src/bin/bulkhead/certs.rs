//! `bulkhead certs`: mints the mTLS material between agents and the learner into a
//! directory. The certificates are built by [`bulkhead_learner::certs`]; this only
//! reads flags and says what was written (never a key).

use std::path::{Path, PathBuf};

use anyhow::Context;
use bulkhead_learner::certs::{
    self, CA_CERT, CA_KEY, Ca, DEFAULT_CA_DAYS, DEFAULT_LEAF_DAYS, LEARNER_CERT, LEARNER_KEY, Minted, OutputFile,
    Validity,
};
use clap::Subcommand;
use sha2::{Digest, Sha256};

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create the CA (`ca.crt`, `ca.key`) that issues the learner's and the nodes'
    /// certificates. Keep `ca.key` off the nodes.
    Ca {
        /// Directory to write into (created mode 0700 when missing).
        #[arg(long)]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "Bulkhead CA")]
        name: String,
        /// Days of validity.
        #[arg(long, default_value_t = DEFAULT_CA_DAYS)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Create the learner's server certificate (`learner.crt`, `learner.key`), signed
    /// by the CA in --dir. Names are the hosts agents connect to (`https://NAME:PORT`).
    Learner {
        #[arg(long)]
        dir: PathBuf,
        /// A DNS name or IP address agents use to reach the learner (repeatable), e.g.
        /// `--san learner.bulkhead.svc --san 127.0.0.1`.
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
        #[arg(long, default_value_t = DEFAULT_LEAF_DAYS)]
        days: u32,
        #[arg(long)]
        force: bool,
    },
    /// Create a node's client certificate (`node-NODE_ID.crt`, `node-NODE_ID.key`),
    /// signed by the CA in --dir; it names the node (URI SAN
    /// `spiffe://bulkhead/node/NODE_ID` and common name), and the learner admits the
    /// node's collector and enforcer only as that node.
    Node {
        #[arg(long)]
        dir: PathBuf,
        /// The node names (as the agents' --node-id, default their hostname).
        #[arg(required = true)]
        node_ids: Vec<String>,
        #[arg(long, default_value_t = DEFAULT_LEAF_DAYS)]
        days: u32,
        #[arg(long)]
        force: bool,
    },
}

pub fn run(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Ca { dir, name, days, force } => {
            let ca = Ca::generate(&name, Validity::days_from_now(days)).context("generating the CA")?;
            write(&dir, &[(CA_CERT.to_owned(), CA_KEY.to_owned(), ca.minted())], force)?;
            println!(
                "CA {name:?}, valid {days} days. Give {CA_CERT} to the learner and the agents; keep {CA_KEY} private."
            );
        }
        CertsCommand::Learner { dir, sans, days, force } => {
            let ca = load_ca(&dir)?;
            let minted =
                ca.learner(&sans, Validity::days_from_now(days)).context("generating the learner certificate")?;
            write(&dir, &[(LEARNER_CERT.to_owned(), LEARNER_KEY.to_owned(), &minted)], force)?;
            println!(
                "Learner certificate for {}, valid {days} days: bulkhead-learner --tls-cert {} --tls-key {} \
                 --tls-client-ca {}",
                sans.join(", "),
                dir.join(LEARNER_CERT).display(),
                dir.join(LEARNER_KEY).display(),
                dir.join(CA_CERT).display()
            );
        }
        CertsCommand::Node { dir, node_ids, days, force } => {
            let ca = load_ca(&dir)?;
            let mut minted = Vec::with_capacity(node_ids.len());
            for node in &node_ids {
                let m = ca
                    .node(node, Validity::days_from_now(days))
                    .with_context(|| format!("generating the certificate of node {node:?}"))?;
                let (cert, key) = certs::node_files(node);
                minted.push((cert, key, m));
            }
            let files: Vec<(String, String, &Minted)> =
                minted.iter().map(|(c, k, m)| (c.clone(), k.clone(), m)).collect();
            write(&dir, &files, force)?;
            for node in &node_ids {
                let (cert, key) = certs::node_files(node);
                println!(
                    "Node {node:?}, valid {days} days: --tls-cert {} --tls-key {} --tls-ca {}",
                    dir.join(cert).display(),
                    dir.join(key).display(),
                    dir.join(CA_CERT).display()
                );
            }
        }
    }
    Ok(())
}

fn load_ca(dir: &Path) -> anyhow::Result<Ca> {
    certs::load_ca(dir).with_context(|| format!("loading the CA from {} (made by `bulkhead certs ca`)", dir.display()))
}

/// Writes every (certificate, key) pair, or none when one exists and `force` is off;
/// prints each certificate's fingerprint.
fn write(dir: &Path, pairs: &[(String, String, &Minted)], force: bool) -> anyhow::Result<()> {
    let files: Vec<OutputFile<'_>> = pairs
        .iter()
        .flat_map(|(cert, key, m)| {
            [
                OutputFile { name: cert.clone(), contents: &m.cert_pem, secret: false },
                OutputFile { name: key.clone(), contents: m.key_pem(), secret: true },
            ]
        })
        .collect();
    for path in certs::write_files(dir, &files, force)? {
        println!("wrote {}", path.display());
    }
    for (cert, _, m) in pairs {
        println!("{cert} SHA-256 fingerprint {}", fingerprint(&m.cert_pem));
    }
    Ok(())
}

/// SHA-256 of the certificate's DER, as `openssl x509 -fingerprint -sha256` prints it.
fn fingerprint(cert_pem: &str) -> String {
    let der = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).map(|(_, p)| p.contents).unwrap_or_default();
    Sha256::digest(&der).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}
