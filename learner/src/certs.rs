//! Minting the mTLS material between agents and the learner (`bulkhead certs`): a CA,
//! the learner's server certificate, one client certificate per node. Certificates
//! are built here (pure, given a random source) and written by [`write_files`]; the
//! CLI only parses flags and prints what was written.
//!
//! Choices, and why:
//! * ECDSA P-256 with SHA-256 keys: supported by every rustls provider and small.
//! * The CA may only issue leaves (path length 0) and only signs (keyCertSign,
//!   cRLSign); leaves carry digitalSignature and exactly the purpose they serve —
//!   serverAuth for the learner, clientAuth for nodes — so a node certificate cannot
//!   impersonate the learner and the learner's certificate cannot enroll as a node.
//! * A node certificate names its node in the URI SAN
//!   `spiffe://bulkhead/node/<NODE_ID>` (what the learner checks, see
//!   [`bulkhead_proto::tls`]) and in its common name (for people).
//! * Validity starts an hour back, so a peer whose clock is a little behind accepts a
//!   certificate minted a moment ago; the CA lasts ten years, leaves one year.
//! * Serial numbers are 16 random bytes from the operating system.

use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bulkhead_proto::tls::{TlsError, node_uri};
use rand::TryRng as _;
use rand::rngs::SysRng;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use tokio_rustls::rustls::pki_types::DnsName;

/// File names in a certificate directory.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const LEARNER_CERT: &str = "learner.crt";
pub const LEARNER_KEY: &str = "learner.key";

/// `node-<NODE_ID>.crt` / `.key`.
pub fn node_files(node: &str) -> (String, String) {
    (format!("node-{node}.crt"), format!("node-{node}.key"))
}

/// Default lifetimes, in days.
pub const DEFAULT_CA_DAYS: u32 = 3650;
pub const DEFAULT_LEAF_DAYS: u32 = 365;

/// How far back validity starts (clock skew between the minting host and peers).
const BACKDATE: Duration = Duration::from_secs(3600);

/// Why minting or writing failed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating the {what}: {source}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("{san:?} is neither an IP address nor a DNS name")]
    InvalidSan { san: String },
    #[error("the learner's certificate needs at least one name (--san): the DNS name or IP agents connect to")]
    NoSan,
    #[error(transparent)]
    InvalidNode(#[from] TlsError),
    #[error("validity ends before it starts")]
    EmptyValidity,
    #[error("the CA certificate or key does not load: {source}")]
    LoadCa {
        #[source]
        source: rcgen::Error,
    },
    #[error("the CA key is not the key of the CA certificate")]
    CaKeyMismatch,
    #[error("the operating system's random number generator failed")]
    Entropy {
        #[source]
        source: rand::rngs::SysError,
    },
    #[error("{} exists; pass --force to replace it", path.display())]
    Exists { path: PathBuf },
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From an hour ago for `days` days.
    pub fn days_from_now(days: u32) -> Self {
        let now = SystemTime::now();
        Validity {
            not_before: now.checked_sub(BACKDATE).unwrap_or(now),
            not_after: now + Duration::from_secs(u64::from(days) * 86_400),
        }
    }
}

/// A certificate and its private key, both PEM. `Debug` never shows the key.
pub struct Minted {
    pub cert_pem: String,
    key_pem: String,
}

impl Minted {
    /// The private key (PEM): for writing to a file, nothing else.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }
}

impl fmt::Debug for Minted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Minted").field("cert_pem", &self.cert_pem).field("key_pem", &"<redacted>").finish()
    }
}

/// A certificate authority that can issue learner and node certificates.
pub struct Ca {
    minted: Minted,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca").field("minted", &self.minted).finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed CA named `common_name`. Its distinguished name also holds a
    /// random id (OU `ca-<hex>`): a certificate from another Bulkhead CA then has an
    /// issuer nobody here knows, and is refused as `UnknownIssuer` rather than with a
    /// puzzling `BadSignature` (which is what two CAs of the same name produce).
    pub fn generate(common_name: &str, validity: Validity) -> Result<Self, CertError> {
        let key = new_key("CA key")?;
        let mut params = base_params(validity)?;
        params.distinguished_name = name(common_name);
        let mut id = [0u8; 6];
        SysRng.try_fill_bytes(&mut id).map_err(|source| CertError::Entropy { source })?;
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        params.distinguished_name.push(DnType::OrganizationalUnitName, format!("ca-{id}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).map_err(|source| CertError::Generate { what: "CA certificate", source })?;
        let minted = Minted { cert_pem: cert.pem(), key_pem: key.serialize_pem() };
        Ok(Ca { minted, issuer: Issuer::new(params, key) })
    }

    /// A CA written earlier (`ca.crt`, `ca.key`).
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem).map_err(|source| CertError::LoadCa { source })?;
        let der = pem_der(cert_pem).ok_or(CertError::LoadCa { source: rcgen::Error::CouldNotParseCertificate })?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|_| CertError::LoadCa { source: rcgen::Error::CouldNotParseCertificate })?;
        if x509.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            return Err(CertError::CaKeyMismatch);
        }
        let minted = Minted { cert_pem: cert_pem.to_owned(), key_pem: key_pem.to_owned() };
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|source| CertError::LoadCa { source })?;
        Ok(Ca { minted, issuer })
    }

    /// The CA's own certificate and key.
    pub fn minted(&self) -> &Minted {
        &self.minted
    }

    /// The learner's server certificate for these names (DNS names or IP addresses,
    /// as agents write them in `https://NAME:PORT`); the first is also its common name.
    pub fn learner(&self, sans: &[String], validity: Validity) -> Result<Minted, CertError> {
        let first = sans.first().ok_or(CertError::NoSan)?;
        let mut params = base_params(validity)?;
        params.distinguished_name = name(first);
        params.subject_alt_names = sans
            .iter()
            .map(|san| match san.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                // rcgen takes any IA5 string; agents will only match a valid DNS name.
                Err(_) if DnsName::try_from(san.as_str()).is_err() => Err(CertError::InvalidSan { san: san.clone() }),
                Err(_) => san
                    .clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|source| CertError::Generate { what: "learner certificate", source }),
            })
            .collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, "learner certificate")
    }

    /// The client certificate of node `node`.
    pub fn node(&self, node: &str, validity: Validity) -> Result<Minted, CertError> {
        let uri = node_uri(node)?;
        let mut params = base_params(validity)?;
        params.distinguished_name = name(node);
        params.subject_alt_names = vec![SanType::URI(
            uri.try_into().map_err(|source| CertError::Generate { what: "node certificate", source })?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, "node certificate")
    }

    fn issue(&self, mut params: CertificateParams, what: &'static str) -> Result<Minted, CertError> {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = new_key(what)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(|source| CertError::Generate { what, source })?;
        Ok(Minted { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

fn new_key(what: &'static str) -> Result<KeyPair, CertError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| CertError::Generate { what, source })
}

fn base_params(validity: Validity) -> Result<CertificateParams, CertError> {
    if validity.not_after <= validity.not_before {
        return Err(CertError::EmptyValidity);
    }
    let mut serial = [0u8; 16];
    SysRng.try_fill_bytes(&mut serial).map_err(|source| CertError::Entropy { source })?;
    serial[0] &= 0x7f; // a positive INTEGER of 16 bytes
    let mut params = CertificateParams::default();
    params.not_before = validity.not_before.into();
    params.not_after = validity.not_after.into();
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(params)
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Bulkhead");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// The DER of the first certificate in a PEM text.
fn pem_der(pem: &str) -> Option<Vec<u8>> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok().map(|(_, p)| p.contents)
}

// === files ===

/// One file to write.
#[derive(Debug)]
pub struct OutputFile<'a> {
    pub name: String,
    pub contents: &'a str,
    /// Private keys: mode 0600 from the moment the file exists.
    pub secret: bool,
}

/// Writes `files` into `dir` (created, mode 0700, when missing), each atomically: a
/// temporary file in the same directory, flushed to disk, then renamed into place —
/// or, without `force`, linked into place, which fails rather than replace a file
/// that appeared meanwhile. Without `force`, nothing is written when any target
/// exists. Returns the paths written.
pub fn write_files(dir: &Path, files: &[OutputFile<'_>], force: bool) -> Result<Vec<PathBuf>, CertError> {
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|source| CertError::Write { path: dir.to_owned(), source })?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|source| CertError::Write { path: dir.to_owned(), source })?;
    }
    if !force && let Some(f) = files.iter().find(|f| dir.join(&f.name).exists()) {
        return Err(CertError::Exists { path: dir.join(&f.name) });
    }
    let mut written = Vec::with_capacity(files.len());
    for f in files {
        let path = dir.join(&f.name);
        let tmp = dir.join(format!(".{}.tmp-{}", f.name, std::process::id()));
        let write_error = |source| CertError::Write { path: path.clone(), source };
        let _ = std::fs::remove_file(&tmp);
        let result = (|| {
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(if f.secret { 0o600 } else { 0o644 })
                .open(&tmp)?;
            out.write_all(f.contents.as_bytes())?;
            out.sync_all()?;
            if force {
                std::fs::rename(&tmp, &path)
            } else {
                std::fs::hard_link(&tmp, &path).and_then(|()| std::fs::remove_file(&tmp))
            }
        })();
        if let Err(source) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(if source.kind() == std::io::ErrorKind::AlreadyExists {
                CertError::Exists { path }
            } else {
                write_error(source)
            });
        }
        written.push(path);
    }
    // The renames themselves reach the disk with the directory.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| CertError::Write { path: dir.to_owned(), source })?;
    Ok(written)
}

/// Reads the CA written by `bulkhead certs ca` from `dir`.
pub fn load_ca(dir: &Path) -> Result<Ca, CertError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| CertError::Read { path, source })
    };
    Ca::load(&read(CA_CERT)?, &read(CA_KEY)?)
}

#[cfg(test)]
mod tests;
