use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

use super::*;

/// A CA and a way to issue leaves from it (the real minting lives in the learner's
/// `certs` module; this crate must not depend on it).
struct TestCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca() -> TestCa {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::CommonName, "test CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key).expect("CA cert");
    TestCa { pem: cert.pem(), issuer: Issuer::new(params, key) }
}

/// A client leaf with these URI SANs; returns (cert PEM, key PEM, DER).
fn leaf(ca: &TestCa, uris: &[&str]) -> (String, String, CertificateDer<'static>) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(DnType::CommonName, "node");
    params.subject_alt_names = uris.iter().map(|u| SanType::URI((*u).to_owned().try_into().expect("ia5"))).collect();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &ca.issuer).expect("sign");
    (cert.pem(), key.serialize_pem(), cert.der().clone())
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).expect("write");
    p
}

#[test]
fn node_names() {
    for ok in ["node-a", "ip-10-0-0-1.eu-west-1.compute.internal", "Node_7", "a~b", &"x".repeat(253)] {
        assert!(valid_node_name(ok), "{ok:?}");
    }
    for bad in ["", "a b", "a/b", "ü", "a%20b", "a:b", &"x".repeat(254)] {
        assert!(!valid_node_name(bad), "{bad:?}");
        assert!(matches!(node_uri(bad), Err(TlsError::InvalidNodeName { .. })), "{bad:?}");
    }
    assert_eq!(node_uri("node-a").expect("valid"), "spiffe://bulkhead/node/node-a");
}

#[test]
fn the_node_is_the_one_uri_san() {
    let ca = ca();
    let cases: &[(&[&str], Result<&str, &str>)] = &[
        (&["spiffe://bulkhead/node/node-a"], Ok("node-a")),
        (&["https://example.com/", "spiffe://bulkhead/node/n1"], Ok("n1")),
        (&[], Err("NoNodeIdentity")),
        (&["spiffe://other/node/node-a"], Err("NoNodeIdentity")),
        (&["spiffe://bulkhead/node/a", "spiffe://bulkhead/node/b"], Err("SeveralNodeIdentities")),
        (&["spiffe://bulkhead/node/a/b"], Err("InvalidNodeName")),
        (&["spiffe://bulkhead/node/"], Err("InvalidNodeName")),
    ];
    for (uris, want) in cases {
        let (_, _, der) = leaf(&ca, uris);
        let got = node_identity(&der);
        match (want, &got) {
            (Ok(name), Ok(n)) => assert_eq!(n, name),
            (Err(kind), Err(e)) => assert!(format!("{e:?}").starts_with(kind), "{uris:?}: {e:?}"),
            _ => panic!("{uris:?}: want {want:?}, got {got:?}"),
        }
    }
    assert!(matches!(node_identity(&CertificateDer::from(vec![1, 2, 3])), Err(TlsError::CertificateParse { .. })));
}

#[test]
fn agent_flags_choose_one_transport() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ca();
    let (cert, key, _) = leaf(&ca, &["spiffe://bulkhead/node/node-a"]);
    let cert = write(dir.path(), "node.crt", &cert);
    let key = write(dir.path(), "node.key", &key);
    let ca_path = write(dir.path(), "ca.crt", &ca.pem);
    let tls = AgentTlsArgs {
        tls_cert: Some(cert.clone()),
        tls_key: Some(key.clone()),
        tls_ca: Some(ca_path.clone()),
        insecure_grpc: false,
    };
    let insecure = AgentTlsArgs { insecure_grpc: true, ..AgentTlsArgs::default() };

    let t = tls.transport("https://learner.example:7400").expect("mTLS");
    assert!(matches!(&t, AgentTransport::Tls { node, currently_valid: true, .. } if node == "node-a"), "{t:?}");
    assert!(matches!(insecure.transport("http://127.0.0.1:7400"), Ok(AgentTransport::Insecure)));

    let err = |args: &AgentTlsArgs, url: &str| format!("{:?}", args.transport(url).expect_err(url));
    assert!(err(&AgentTlsArgs::default(), "http://x:1").starts_with("PlaintextRefused"));
    assert!(err(&insecure, "https://x:1").starts_with("Scheme"));
    assert!(err(&tls, "http://x:1").starts_with("Scheme"));
    assert!(err(&AgentTlsArgs { insecure_grpc: true, ..tls.clone() }, "https://x:1").starts_with("InsecureWithTls"));
    let partial = AgentTlsArgs { tls_key: None, tls_ca: None, ..tls.clone() };
    let e = partial.transport("https://x:1").expect_err("incomplete");
    assert_eq!(e.to_string(), "--tls-cert, --tls-key and --tls-ca go together; missing --tls-key, --tls-ca");

    // A key that is not the certificate's, a missing file, a CA file without a certificate.
    let (_, other_key, _) = leaf(&ca, &["spiffe://bulkhead/node/node-a"]);
    let other_key = write(dir.path(), "other.key", &other_key);
    let wrong_key = AgentTlsArgs { tls_key: Some(other_key), ..tls.clone() };
    assert!(err(&wrong_key, "https://x:1").starts_with("Identity"));
    let missing = AgentTlsArgs { tls_cert: Some(dir.path().join("nope.crt")), ..tls.clone() };
    assert!(err(&missing, "https://x:1").starts_with("Read"));
    let empty = write(dir.path(), "empty.crt", "");
    assert!(err(&AgentTlsArgs { tls_ca: Some(empty), ..tls.clone() }, "https://x:1").starts_with("NoCertificate"));
    // A certificate that names no node.
    let (anon, anon_key, _) = leaf(&ca, &[]);
    let anon = AgentTlsArgs {
        tls_cert: Some(write(dir.path(), "anon.crt", &anon)),
        tls_key: Some(write(dir.path(), "anon.key", &anon_key)),
        ..tls.clone()
    };
    assert!(err(&anon, "https://x:1").starts_with("NoNodeIdentity"));
}

#[test]
fn node_id_comes_from_the_certificate() {
    let tls = AgentTransport::Tls {
        config: ClientTlsConfig::new(),
        node: "node-a".into(),
        not_after: String::new(),
        currently_valid: true,
    };
    assert_eq!(tls.node_id(None).expect("cert"), Some("node-a".to_owned()));
    assert_eq!(tls.node_id(Some("node-a")).expect("same"), Some("node-a".to_owned()));
    assert!(matches!(tls.node_id(Some("node-b")), Err(TlsError::NodeMismatch { .. })));
    assert_eq!(AgentTransport::Insecure.node_id(None).expect("hostname"), None);
    assert_eq!(AgentTransport::Insecure.node_id(Some("n")).expect("flag"), Some("n".to_owned()));
}

#[test]
fn server_config_loads_and_offers_h2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ca();
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca.issuer).expect("sign");
    let files = ServerTlsFiles {
        cert: write(dir.path(), "learner.crt", &cert.pem()),
        key: write(dir.path(), "learner.key", &key.serialize_pem()),
        client_ca: write(dir.path(), "ca.crt", &ca.pem),
    };
    let config = server_config(&files).expect("server config");
    assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);

    let wrong = ServerTlsFiles {
        key: write(dir.path(), "other.key", &KeyPair::generate().expect("key").serialize_pem()),
        ..files.clone()
    };
    assert!(matches!(server_config(&wrong), Err(TlsError::Identity { .. })));
    let missing = ServerTlsFiles { client_ca: dir.path().join("nope"), ..files.clone() };
    assert!(matches!(server_config(&missing), Err(TlsError::Read { .. })));

    // The learner's flags: all three files, or none and --insecure-grpc.
    let args = ServerTlsArgs {
        tls_cert: Some(files.cert.clone()),
        tls_key: Some(files.key.clone()),
        tls_client_ca: Some(files.client_ca.clone()),
        insecure_grpc: false,
    };
    assert!(matches!(args.server_config(), Ok(Some(_))));
    let insecure = ServerTlsArgs { insecure_grpc: true, ..ServerTlsArgs::default() };
    assert!(matches!(insecure.server_config(), Ok(None)));
    assert!(matches!(ServerTlsArgs::default().server_config(), Err(TlsError::ServePlaintextRefused)));
    assert!(matches!(
        ServerTlsArgs { insecure_grpc: true, ..args.clone() }.server_config(),
        Err(TlsError::InsecureWithTls)
    ));
    let partial = ServerTlsArgs { tls_key: None, ..args };
    let e = partial.server_config().expect_err("incomplete");
    assert_eq!(e.to_string(), "--tls-cert, --tls-key and --tls-client-ca go together; missing --tls-key");
}
