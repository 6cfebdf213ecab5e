//! mTLS between the agents and the learner, in one place for all three binaries:
//! rustls configurations from PEM files, the node identity a client certificate
//! carries, and the agents' transport flags.
//!
//! Node identity: a node certificate names its node in a URI subject alternative
//! name, `spiffe://bulkhead/node/<NODE_ID>` ([`node_uri`]), and — for people reading
//! it with `openssl x509` — in its common name. Only the SAN counts: a SAN is typed
//! and unambiguous, and a URI can hold any node name made of URI-unreserved characters
//! (`A-Z a-z 0-9 - . _ ~`), where a DNS SAN would refuse `_` and upper case. The learner
//! admits a stream only when the node it claims is the node its certificate names.
//!
//! Versions and algorithms: the learner speaks TLS 1.3 only (both ends are ours, so
//! there is nothing older to talk to), with rustls' ring provider (the one kube's
//! rustls uses too).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// What precedes the node name in a node certificate's URI SAN.
pub const NODE_URI_PREFIX: &str = "spiffe://bulkhead/node/";

/// Longest node name (as the learner accepts in a Hello).
pub const MAX_NODE_NAME: usize = 253;

/// ALPN protocol of gRPC; tonic's client refuses a TLS server that does not offer it.
const ALPN_H2: &[u8] = b"h2";

/// Why TLS material could not be loaded or a certificate names no node.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not valid PEM: {source}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} holds a certificate that is not a usable CA: {source}", path.display())]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot verify client certificates against {}: {source}", path.display())]
    ClientVerifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("certificate {} and key {} do not make a TLS identity: {source}", cert.display(), key.display())]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the certificate does not parse: {reason}")]
    CertificateParse { reason: String },
    #[error(
        "the certificate names no node (no `{NODE_URI_PREFIX}<NODE_ID>` URI SAN); make one with `bulkhead certs node`"
    )]
    NoNodeIdentity,
    #[error("the certificate names several nodes ({names:?}); a node certificate names exactly one")]
    SeveralNodeIdentities { names: Vec<String> },
    #[error(
        "node name {name:?} is not usable in a certificate: 1 to {MAX_NODE_NAME} characters from A-Z a-z 0-9 - . _ ~"
    )]
    InvalidNodeName { name: String },
    #[error(
        "refusing to talk to the learner in plaintext: give --tls-cert, --tls-key and --tls-ca (made by \
         `bulkhead certs`), or --insecure-grpc for a local demo"
    )]
    PlaintextRefused,
    #[error(
        "refusing to serve agents' gRPC in plaintext: give --tls-cert, --tls-key and --tls-client-ca (made by \
         `bulkhead certs`), or --insecure-grpc for a local demo"
    )]
    ServePlaintextRefused,
    #[error("--insecure-grpc and --tls-* exclude each other: choose mTLS or plaintext")]
    InsecureWithTls,
    #[error("{all} go together; missing {missing}")]
    Incomplete { all: &'static str, missing: String },
    #[error("learner URL {url:?} must start with {want}:// {why}")]
    Scheme { url: String, want: &'static str, why: &'static str },
    #[error(
        "--node-id is {flag:?} but the certificate names node {certificate:?}; the learner would refuse the stream"
    )]
    NodeMismatch { flag: String, certificate: String },
}

// === node names ===

/// Whether `name` can be a node name in a certificate (and so on an mTLS stream).
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NODE_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// The URI SAN that names `node` in its certificate.
pub fn node_uri(node: &str) -> Result<String, TlsError> {
    if !valid_node_name(node) {
        return Err(TlsError::InvalidNodeName { name: node.to_owned() });
    }
    Ok(format!("{NODE_URI_PREFIX}{node}"))
}

/// The node a (verified) client certificate names: its one
/// `spiffe://bulkhead/node/<NODE_ID>` URI SAN. The common name is not consulted.
pub fn node_identity(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::CertificateParse { reason: e.to_string() })?;
    let san = x509.subject_alternative_name().map_err(|e| TlsError::CertificateParse { reason: e.to_string() })?;
    let mut names: Vec<String> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) => uri.strip_prefix(NODE_URI_PREFIX),
            _ => None,
        })
        .map(str::to_owned)
        .collect();
    match names.len() {
        0 => Err(TlsError::NoNodeIdentity),
        1 => {
            let name = names.remove(0);
            if valid_node_name(&name) { Ok(name) } else { Err(TlsError::InvalidNodeName { name }) }
        }
        _ => Err(TlsError::SeveralNodeIdentities { names }),
    }
}

// === the learner's side ===

/// The learner's TLS files.
#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    /// Its certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA(s) whose node certificates are admitted (PEM).
    pub client_ca: PathBuf,
}

/// A rustls server configuration that requires a client certificate issued by the
/// client CA (with the clientAuth purpose, within its validity) and offers `h2`.
pub fn server_config(files: &ServerTlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let roots = read_roots(&files.client_ca)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|source| TlsError::ClientVerifier { path: files.client_ca.clone(), source })?;
    let identity_error = |source| TlsError::Identity { cert: files.cert.clone(), key: files.key.clone(), source };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(identity_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(identity_error)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

// === the agents' side ===

/// How an agent reaches the learner: the flags the collector and the enforcer share
/// (`#[command(flatten)]`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AgentTlsArgs {
    /// This node's certificate (PEM), made by `bulkhead certs node NODE_ID`; it names
    /// the node, and the learner admits only streams for that node.
    #[arg(long, env = "BULKHEAD_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "BULKHEAD_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
    /// The CA that issued the learner's certificate (PEM).
    #[arg(long, env = "BULKHEAD_TLS_CA", value_name = "PATH")]
    pub tls_ca: Option<PathBuf>,
    /// Talk to the learner in plaintext, unauthenticated (local demos only; the
    /// learner must run with --insecure-grpc too).
    #[arg(long, env = "BULKHEAD_INSECURE_GRPC")]
    pub insecure_grpc: bool,
}

/// A checked transport choice, files loaded.
#[derive(Debug, Clone)]
pub enum AgentTransport {
    /// mTLS with this node's certificate.
    Tls {
        config: ClientTlsConfig,
        /// The node the certificate names.
        node: String,
        /// Its expiry, for the log.
        not_after: String,
        /// Whether it is within its validity by this host's clock.
        currently_valid: bool,
    },
    /// Plaintext (`--insecure-grpc`).
    Insecure,
}

impl AgentTlsArgs {
    /// Checks the flags against the learner URL (`https://` with TLS, `http://` with
    /// `--insecure-grpc`, nothing else) and loads the files, so that a mistake stops
    /// the agent at start rather than in its reconnect loop.
    pub fn transport(&self, learner_url: &str) -> Result<AgentTransport, TlsError> {
        let scheme = learner_url.split_once("://").map(|(s, _)| s.to_ascii_lowercase()).unwrap_or_default();
        let scheme_error = |want, why| TlsError::Scheme { url: learner_url.to_owned(), want, why };
        let files = [(&self.tls_cert, "--tls-cert"), (&self.tls_key, "--tls-key"), (&self.tls_ca, "--tls-ca")];
        match choose(files, self.insecure_grpc, "--tls-cert, --tls-key and --tls-ca")? {
            None if scheme == "http" => Ok(AgentTransport::Insecure),
            None => Err(scheme_error("http", "with --insecure-grpc")),
            Some([cert, key, ca]) if scheme == "https" => client_transport(cert, key, ca),
            Some(_) => Err(scheme_error("https", "with --tls-cert/--tls-key/--tls-ca")),
        }
    }
}

/// The learner's TLS flags (`#[command(flatten)]` into its serve flags).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerTlsArgs {
    /// The gRPC listener's certificate chain (PEM; `bulkhead certs learner`). With
    /// --tls-key and --tls-client-ca, agents must present a node certificate.
    #[arg(long, env = "BULKHEAD_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "BULKHEAD_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
    /// The CA whose node certificates are admitted (PEM; `bulkhead certs ca`).
    #[arg(long, env = "BULKHEAD_TLS_CLIENT_CA", value_name = "PATH")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve agents' gRPC in plaintext without client certificates (local demos only:
    /// anyone who reaches the port can pose as any node).
    #[arg(long, env = "BULKHEAD_INSECURE_GRPC")]
    pub insecure_grpc: bool,
}

impl ServerTlsArgs {
    /// The rustls configuration for mTLS, or `None` for plaintext when
    /// `--insecure-grpc` asks for it; anything else is an error.
    pub fn server_config(&self) -> Result<Option<Arc<rustls::ServerConfig>>, TlsError> {
        let files =
            [(&self.tls_cert, "--tls-cert"), (&self.tls_key, "--tls-key"), (&self.tls_client_ca, "--tls-client-ca")];
        match choose(files, self.insecure_grpc, "--tls-cert, --tls-key and --tls-client-ca") {
            Ok(None) => Ok(None),
            Ok(Some([cert, key, client_ca])) => server_config(&ServerTlsFiles {
                cert: cert.to_owned(),
                key: key.to_owned(),
                client_ca: client_ca.to_owned(),
            })
            .map(Some),
            Err(TlsError::PlaintextRefused) => Err(TlsError::ServePlaintextRefused),
            Err(e) => Err(e),
        }
    }
}

/// The choice both sides make: all three files (`Some`), or none and
/// `--insecure-grpc` (`None`); never some, never both, never neither.
fn choose<'a>(
    files: [(&'a Option<PathBuf>, &'static str); 3],
    insecure: bool,
    all: &'static str,
) -> Result<Option<[&'a Path; 3]>, TlsError> {
    let missing: Vec<&str> = files.iter().filter(|(p, _)| p.is_none()).map(|(_, name)| *name).collect();
    match (files, insecure) {
        (_, true) if missing.len() == files.len() => Ok(None),
        (_, true) => Err(TlsError::InsecureWithTls),
        ([(Some(cert), _), (Some(key), _), (Some(ca), _)], false) => {
            Ok(Some([cert.as_path(), key.as_path(), ca.as_path()]))
        }
        _ if missing.len() == files.len() => Err(TlsError::PlaintextRefused),
        _ => Err(TlsError::Incomplete { all, missing: missing.join(", ") }),
    }
}

impl AgentTransport {
    /// The node this agent speaks for: `--node-id` when given, else the node its
    /// certificate names; `None` (use the hostname) in plaintext without `--node-id`.
    /// A flag that contradicts the certificate is an error: the learner would refuse
    /// every stream.
    pub fn node_id(&self, flag: Option<&str>) -> Result<Option<String>, TlsError> {
        match (self, flag) {
            (AgentTransport::Tls { node, .. }, Some(flag)) if flag != node => {
                Err(TlsError::NodeMismatch { flag: flag.to_owned(), certificate: node.clone() })
            }
            (AgentTransport::Tls { node, .. }, _) => Ok(Some(node.clone())),
            (AgentTransport::Insecure, flag) => Ok(flag.map(str::to_owned)),
        }
    }

    /// Says in the agent's log how it talks to the learner, and warns about a
    /// certificate outside its validity (by this host's clock; the learner decides).
    pub fn log(&self, learner_url: &str) {
        match self {
            AgentTransport::Tls { node, not_after, currently_valid: true, .. } => {
                tracing::info!(learner = %learner_url, node = %node, expires = %not_after, "Using mTLS with the learner.")
            }
            AgentTransport::Tls { node, not_after, currently_valid: false, .. } => tracing::warn!(
                learner = %learner_url,
                node = %node,
                expires = %not_after,
                "The node certificate is not valid now by this host's clock; the learner will likely refuse it."
            ),
            AgentTransport::Insecure => tracing::warn!(
                learner = %learner_url,
                "Talking to the learner in plaintext, unauthenticated (--insecure-grpc)."
            ),
        }
    }

    /// Opens a channel to the learner at `url`.
    pub async fn connect(&self, url: &str) -> Result<Channel, tonic::transport::Error> {
        let endpoint = Endpoint::from_shared(url.to_owned())?;
        let endpoint = match self {
            AgentTransport::Tls { config, .. } => endpoint.tls_config(config.clone())?,
            AgentTransport::Insecure => endpoint,
        };
        endpoint.connect().await
    }
}

/// Loads and checks the agent's files: the key must belong to the certificate, the
/// certificate must name a node, the CA file must hold a certificate.
fn client_transport(cert: &Path, key: &Path, ca: &Path) -> Result<AgentTransport, TlsError> {
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let ca_pem = read(ca)?;
    let chain = parse_certs(cert, &cert_pem)?;
    let private_key = parse_key(key, &key_pem)?;
    let roots = read_roots(ca)?;
    // tonic builds its own rustls configuration from the PEM when it connects; build
    // one here too, so a key that does not match the certificate fails at start.
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .and_then(|b| b.with_root_certificates(roots).with_client_auth_cert(chain.clone(), private_key))
        .map_err(|source| TlsError::Identity { cert: cert.to_owned(), key: key.to_owned(), source })?;
    let leaf = chain.first().ok_or_else(|| TlsError::NoCertificate { path: cert.to_owned() })?;
    let node = node_identity(leaf)?;
    let (not_after, currently_valid) = match x509_parser::parse_x509_certificate(leaf.as_ref()) {
        Ok((_, x509)) => (x509.validity().not_after.to_string(), x509.validity().is_valid()),
        Err(e) => return Err(TlsError::CertificateParse { reason: e.to_string() }),
    };
    let config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(cert_pem, key_pem));
    Ok(AgentTransport::Tls { config, node, not_after, currently_valid })
}

// === PEM files ===

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { path: path.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_owned() });
    }
    Ok(certs)
}

fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| TlsError::Pem { path: path.to_owned(), source })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certs(path, &read(path)?)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    parse_key(path, &read(path)?)
}

fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in read_certs(path)? {
        roots.add(ca).map_err(|source| TlsError::BadCa { path: path.to_owned(), source })?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests;
