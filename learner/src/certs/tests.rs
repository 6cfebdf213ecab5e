use std::sync::Arc;

use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::client::danger::ServerCertVerifier as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::*;

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from(pem_der(pem).expect("PEM certificate"))
}

fn parsed<'a>(der: &'a CertificateDer<'_>) -> X509Certificate<'a> {
    x509_parser::parse_x509_certificate(der.as_ref()).expect("parses").1
}

fn roots(ca: &Ca) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots.add(der(&ca.minted().cert_pem)).expect("CA is a trust anchor");
    Arc::new(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Verifies `leaf` as a client certificate against `ca`, as the learner does.
fn verify_client(ca: &Ca, leaf: &Minted) -> Result<(), rustls::Error> {
    let v = WebPkiClientVerifier::builder_with_provider(roots(ca), provider()).build().expect("verifier");
    v.verify_client_cert(&der(&leaf.cert_pem), &[], UnixTime::now()).map(|_| ())
}

/// Verifies `leaf` as the server `name` against `ca`, as agents do.
fn verify_server(ca: &Ca, leaf: &Minted, name: &str) -> Result<(), rustls::Error> {
    let v = WebPkiServerVerifier::builder_with_provider(roots(ca), provider()).build().expect("verifier");
    let name = ServerName::try_from(name.to_owned()).expect("server name");
    v.verify_server_cert(&der(&leaf.cert_pem), &[], &name, &[], UnixTime::now()).map(|_| ())
}

#[test]
fn ca_is_an_ecdsa_p256_leaf_only_signing_authority() {
    let ca = Ca::generate("Test CA", Validity::days_from_now(DEFAULT_CA_DAYS)).expect("CA");
    let cert = der(&ca.minted().cert_pem);
    let x = parsed(&cert);
    let bc = x.basic_constraints().expect("unique").expect("basic constraints").value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
    let ku = x.key_usage().expect("unique").expect("key usage").value;
    assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
    assert_eq!(x.signature_algorithm.algorithm, x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256);
    assert_eq!(x.subject().iter_common_name().next().and_then(|c| c.as_str().ok()), Some("Test CA"));
    let ou = x.subject().iter_organizational_unit().next().and_then(|o| o.as_str().ok()).expect("OU");
    assert!(ou.starts_with("ca-") && ou.len() == 15, "{ou}");
    let days = (x.validity().not_after.timestamp() - x.validity().not_before.timestamp()) / 86_400;
    assert_eq!(days, i64::from(DEFAULT_CA_DAYS)); // plus the hour of backdating
    assert!(x.validity().is_valid());
    assert!(ca.minted().key_pem().contains("PRIVATE KEY"));
}

#[test]
fn node_certificate_names_the_node_for_client_auth_only() {
    let ca = Ca::generate("Test CA", Validity::days_from_now(30)).expect("CA");
    let node = ca.node("node-a.example", Validity::days_from_now(DEFAULT_LEAF_DAYS)).expect("node cert");
    let cert = der(&node.cert_pem);
    assert_eq!(bulkhead_proto::tls::node_identity(&cert).expect("identity"), "node-a.example");
    let x = parsed(&cert);
    let sans: Vec<String> = x
        .subject_alternative_name()
        .expect("unique")
        .expect("SAN")
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => format!("URI:{u}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(sans, ["URI:spiffe://bulkhead/node/node-a.example"]);
    assert_eq!(x.subject().iter_common_name().next().and_then(|c| c.as_str().ok()), Some("node-a.example"));
    let eku = x.extended_key_usage().expect("unique").expect("EKU").value;
    assert!(eku.client_auth && !eku.server_auth);
    assert!(x.key_usage().expect("unique").expect("key usage").value.digital_signature());
    assert!(!x.is_ca());

    verify_client(&ca, &node).expect("a node certificate verifies as a client");
    let err = verify_server(&ca, &node, "node-a.example").expect_err("but not as a server");
    assert!(format!("{err:?}").contains("InvalidPurpose"), "{err:?}");
    // Another CA's node certificate does not verify — even when the CAs share a name.
    let other = Ca::generate("Test CA", Validity::days_from_now(30)).expect("CA");
    let err =
        verify_client(&ca, &other.node("node-a", Validity::days_from_now(1)).expect("cert")).expect_err("foreign");
    assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");

    for bad in ["", "a b", "a/b", "näde"] {
        assert!(matches!(ca.node(bad, Validity::days_from_now(1)), Err(CertError::InvalidNode(_))), "{bad:?}");
    }
}

#[test]
fn learner_certificate_serves_its_names_and_cannot_act_as_a_node() {
    let ca = Ca::generate("Test CA", Validity::days_from_now(30)).expect("CA");
    let sans = ["learner.bulkhead.svc".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    let learner = ca.learner(&sans, Validity::days_from_now(DEFAULT_LEAF_DAYS)).expect("learner cert");
    for name in ["learner.bulkhead.svc", "127.0.0.1", "::1"] {
        verify_server(&ca, &learner, name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert!(verify_server(&ca, &learner, "other.example").is_err());
    let err = verify_client(&ca, &learner).expect_err("a server certificate is no client certificate");
    assert!(format!("{err:?}").contains("InvalidPurpose"), "{err:?}");
    assert!(bulkhead_proto::tls::node_identity(&der(&learner.cert_pem)).is_err());

    assert!(matches!(ca.learner(&[], Validity::days_from_now(1)), Err(CertError::NoSan)));
    assert!(matches!(
        ca.learner(&["not a name".to_owned()], Validity::days_from_now(1)),
        Err(CertError::InvalidSan { .. })
    ));
}

#[test]
fn expired_certificates_are_minted_on_request_and_refused() {
    let ca = Ca::generate("Test CA", Validity::days_from_now(30)).expect("CA");
    let now = SystemTime::now();
    let past = Validity { not_before: now - Duration::from_secs(7200), not_after: now - Duration::from_secs(3600) };
    let expired = ca.node("node-a", past).expect("cert");
    let err = verify_client(&ca, &expired).expect_err("expired");
    assert!(format!("{err:?}").contains("Expired"), "{err:?}");
    let empty = Validity { not_before: now, not_after: now };
    assert!(matches!(ca.node("node-a", empty), Err(CertError::EmptyValidity)));
}

#[test]
fn a_loaded_ca_issues_certificates_that_chain_to_it() {
    let ca = Ca::generate("Test CA", Validity::days_from_now(30)).expect("CA");
    let loaded = Ca::load(&ca.minted().cert_pem, ca.minted().key_pem()).expect("load");
    let node = loaded.node("node-b", Validity::days_from_now(1)).expect("node cert");
    verify_client(&ca, &node).expect("issued by the same CA");

    let other = Ca::generate("Other CA", Validity::days_from_now(30)).expect("CA");
    assert!(matches!(Ca::load(&ca.minted().cert_pem, other.minted().key_pem()), Err(CertError::CaKeyMismatch)));
    assert!(matches!(Ca::load("garbage", ca.minted().key_pem()), Err(CertError::LoadCa { .. })));
}

#[test]
fn serials_differ_and_debug_hides_keys() {
    let ca = Ca::generate("Test CA", Validity::days_from_now(30)).expect("CA");
    let a = ca.node("n", Validity::days_from_now(1)).expect("cert");
    let b = ca.node("n", Validity::days_from_now(1)).expect("cert");
    let (da, db) = (der(&a.cert_pem), der(&b.cert_pem));
    assert_ne!(parsed(&da).raw_serial(), parsed(&db).raw_serial());
    assert_eq!(parsed(&da).raw_serial().len(), 16);
    for shown in [format!("{a:?}"), format!("{ca:?}")] {
        assert!(!shown.contains("PRIVATE KEY") && shown.contains("<redacted>"), "{shown}");
    }
}

#[test]
fn files_are_written_atomically_with_key_modes_and_never_clobbered() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("certs");
    let files = |c: &'static str| {
        vec![
            OutputFile { name: "x.crt".into(), contents: c, secret: false },
            OutputFile { name: "x.key".into(), contents: c, secret: true },
        ]
    };
    let written = write_files(&dir, &files("one"), false).expect("write");
    assert_eq!(written, [dir.join("x.crt"), dir.join("x.key")]);
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("x.crt")), 0o644);
    assert_eq!(mode(&dir.join("x.key")), 0o600);

    // One existing target: nothing is written.
    std::fs::remove_file(dir.join("x.crt")).expect("rm");
    let err = write_files(&dir, &files("two"), false).expect_err("x.key exists");
    assert!(matches!(&err, CertError::Exists { path } if path == &dir.join("x.key")), "{err:?}");
    assert!(!dir.join("x.crt").exists());
    assert_eq!(std::fs::read_to_string(dir.join("x.key")).expect("read"), "one");

    write_files(&dir, &files("three"), true).expect("force");
    assert_eq!(std::fs::read_to_string(dir.join("x.key")).expect("read"), "three");
    assert_eq!(mode(&dir.join("x.key")), 0o600);
    let names: Vec<String> =
        std::fs::read_dir(&dir).expect("ls").map(|e| e.expect("entry").file_name().to_string_lossy().into()).collect();
    assert_eq!(names.len(), 2, "no temporary files left: {names:?}");
}
