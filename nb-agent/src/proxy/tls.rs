//! TLS for https ports: certificates and keys from PEM files, checked when loaded (so a bad
//! file refuses a start or a reload instead of failing handshakes), chosen by SNI, with the
//! cipher set the port asks for and ALPN `h2` / `http/1.1`.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    ServerConfig,
    crypto::{CryptoProvider, ring},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use thiserror::Error;
use tokio_rustls::TlsAcceptor;

use crate::config::{CipherSuite, Port};

/// Why an https port's certificates cannot be served.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("port {port}: {path}: {source}")]
    Read {
        port: u16,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("port {port}: {path}: no PEM certificate in the file")]
    NoCertificate { port: u16, path: PathBuf },
    #[error("port {port}: {path}: not a PEM certificate file: {reason}")]
    BadCertificate {
        port: u16,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "port {port}: {path}: the private key is encrypted (passphrase-protected); nb needs a passphraseless key"
    )]
    EncryptedKey { port: u16, path: PathBuf },
    #[error("port {port}: {path}: no usable PEM private key: {reason}")]
    BadKey {
        port: u16,
        path: PathBuf,
        reason: String,
    },
    #[error("port {port}: {key} does not match the certificate {cert}")]
    KeyMismatch {
        port: u16,
        cert: PathBuf,
        key: PathBuf,
    },
    #[error("port {port}: TLS settings: {reason}")]
    Config { port: u16, reason: String },
}

/// The certificates of one port; the first answers clients whose SNI names none of them
/// (or who send none).
pub struct CertStore {
    certs: Vec<Arc<CertifiedKey>>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertStore({} certificate(s))", self.certs.len())
    }
}

impl CertStore {
    /// The certificate whose names cover `sni`; the first one otherwise.
    fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = sni.and_then(|s| ServerName::try_from(s.to_string()).ok()) {
            for ck in &self.certs {
                let Some(der) = ck.cert.first() else { continue };
                if let Ok(ee) = webpki::EndEntityCert::try_from(der)
                    && ee.verify_is_valid_for_subject_name(&name).is_ok()
                {
                    return Some(ck.clone());
                }
            }
        }
        self.certs.first().cloned()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}

/// The crypto provider for a cipher set. `recommended` is TLS 1.3 plus the TLS 1.2 ECDHE
/// suites with AEAD ciphers (Mozilla "intermediate"); `legacy` is every suite rustls has. rustls
/// implements no CBC, RSA key exchange or pre-1.2 protocol, so today both sets are the same and
/// TLS 1.1 and older are refused either way.
pub fn provider(suites: CipherSuite) -> CryptoProvider {
    let mut p = ring::default_provider();
    p.cipher_suites = ring::ALL_CIPHER_SUITES
        .iter()
        .copied()
        .filter(|s| match suites {
            CipherSuite::Legacy => true,
            CipherSuite::Recommended => {
                let name = format!("{:?}", s.suite());
                s.version() == &rustls::version::TLS13
                    || (name.contains("_ECDHE_")
                        && (name.contains("_GCM_") || name.contains("CHACHA20_POLY1305")))
            }
        })
        .collect();
    p
}

fn load_pair(
    port: u16,
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            port,
            path: path.to_path_buf(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::BadCertificate {
            port,
            path: cert.to_path_buf(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            port,
            path: cert.to_path_buf(),
        });
    }
    let key_pem = read(key)?;
    // PKCS#8 "ENCRYPTED PRIVATE KEY", or OpenSSL's legacy "Proc-Type: 4,ENCRYPTED" header.
    let text = String::from_utf8_lossy(&key_pem);
    if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") || text.contains("4,ENCRYPTED") {
        return Err(TlsError::EncryptedKey {
            port,
            path: key.to_path_buf(),
        });
    }
    let bad_key = |reason: String| TlsError::BadKey {
        port,
        path: key.to_path_buf(),
        reason,
    };
    let der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| bad_key(e.to_string()))?;
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| bad_key(e.to_string()))?;
    let ck = CertifiedKey::new(chain, signing);
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(ck))
        }
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch {
            port,
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        }),
        Err(e) => Err(TlsError::BadCertificate {
            port,
            path: cert.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// Reads and checks every certificate/key pair of `port` and builds its acceptor. Called at
/// start and on every reload, so renewed certificate files take effect on SIGHUP.
pub fn acceptor(port: &Port) -> Result<TlsAcceptor, TlsError> {
    let provider = provider(port.cipher_suite);
    let mut certs = Vec::new();
    for (cert, key) in port.ssl_cert.iter().zip(&port.ssl_key) {
        certs.push(load_pair(port.port, cert, key, &provider)?);
    }
    if certs.is_empty() {
        return Err(TlsError::Config {
            port: port.port,
            reason: "no certificate configured".to_string(),
        });
    }
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config {
            port: port.port,
            reason: e.to_string(),
        })?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(CertStore { certs }));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recommended_suites_are_tls13_or_ecdhe_aead() {
        let p = provider(CipherSuite::Recommended);
        assert!(!p.cipher_suites.is_empty());
        for s in &p.cipher_suites {
            let name = format!("{:?}", s.suite());
            assert!(
                name.starts_with("TLS13_") || name.starts_with("TLS_ECDHE_"),
                "{name}"
            );
        }
        assert!(provider(CipherSuite::Legacy).cipher_suites.len() >= p.cipher_suites.len());
    }

    /// A scratch directory with a certificate and key for `name`; returns (dir, cert, key).
    fn pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).expect("rcgen");
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, ck.cert.pem()).expect("write cert");
        std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
        (cert, key)
    }

    fn err(r: Result<TlsAcceptor, TlsError>, what: &str) -> TlsError {
        match r {
            Ok(_) => panic!("{what}: accepted"),
            Err(e) => e,
        }
    }

    fn https_port(certs: &[(PathBuf, PathBuf)]) -> Port {
        let mut p = Port::new(443, crate::config::Protocol::Https);
        p.ssl_cert = certs.iter().map(|c| c.0.clone()).collect();
        p.ssl_key = certs.iter().map(|c| c.1.clone()).collect();
        p
    }

    #[test]
    fn loads_pairs_and_refuses_bad_files_clearly() {
        let dir = std::env::temp_dir().join(format!("nb-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let a = pair(&dir, "a.test");
        let b = pair(&dir, "b.test");
        acceptor(&https_port(&[a.clone(), b.clone()])).expect("two good pairs");

        let missing = (dir.join("nope.crt"), a.1.clone());
        let e = err(acceptor(&https_port(&[missing])), "missing file");
        assert!(matches!(e, TlsError::Read { .. }), "{e}");
        assert!(e.to_string().contains("nope.crt"), "{e}");

        let mismatched = (a.0.clone(), b.1.clone());
        let e = err(acceptor(&https_port(&[mismatched])), "key of another cert");
        assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
        assert!(e.to_string().contains("does not match"), "{e}");

        let enc = dir.join("enc.key");
        std::fs::write(
            &enc,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBvTBXBgkqhkiG9w0BBQ0wSjApBgkqhkiG9w0BBQwwHAQI\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .expect("write");
        let e = err(
            acceptor(&https_port(&[(a.0.clone(), enc)])),
            "encrypted key",
        );
        assert!(matches!(e, TlsError::EncryptedKey { .. }), "{e}");

        let e = err(
            acceptor(&https_port(&[(a.1.clone(), a.1.clone())])),
            "key as cert",
        );
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn sni_picks_the_certificate_naming_the_host() {
        let dir = std::env::temp_dir().join(format!("nb-sni-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let provider = provider(CipherSuite::Recommended);
        let a = pair(&dir, "a.test");
        let b = pair(&dir, "b.test");
        let store = CertStore {
            certs: vec![
                load_pair(443, &a.0, &a.1, &provider).expect("a"),
                load_pair(443, &b.0, &b.1, &provider).expect("b"),
            ],
        };
        let der = |ck: Arc<CertifiedKey>| ck.cert[0].clone();
        assert_eq!(
            der(store.pick(Some("b.test")).unwrap()),
            store.certs[1].cert[0]
        );
        assert_eq!(
            der(store.pick(Some("a.test")).unwrap()),
            store.certs[0].cert[0]
        );
        assert_eq!(
            der(store.pick(Some("other.test")).unwrap()),
            store.certs[0].cert[0]
        );
        assert_eq!(der(store.pick(None).unwrap()), store.certs[0].cert[0]);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
