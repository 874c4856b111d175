//! Mutual TLS between nodes: loads the cluster CA, this node's certificate
//! and key, and turns them into quinn server and client configurations that
//! only talk to holders of a certificate from that CA.
//!
//! Every configuration is built on rustls' ring provider explicitly, never
//! the process default: a second provider compiled in by another crate
//! would otherwise make rustls panic at run time.
//!
//! A node's identity is its certificate's common name (or, without one, its
//! first DNS name). Dialing checks the DNS name against the node id; the
//! accepting side has no name to check, so the transport compares the
//! peer's hello with [`peer_node_id`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use protocol::peer::PEER_ALPN;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use x509_parser::extensions::GeneralName;

use crate::config::ClusterConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cluster TLS is not configured: {0} is not set")]
    Missing(&'static str),
    #[error("cannot read the {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("the {what} {path} holds no PEM certificate")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("the {what} {path} is not usable: {detail}")]
    BadFile {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("the node certificate {cert} does not verify against the cluster CA {ca}: {source}")]
    NotSignedByCa {
        cert: PathBuf,
        ca: PathBuf,
        source: Box<TlsError>,
    },
    #[error("the certificate for {node} is not trusted: {source}")]
    Untrusted { node: String, source: rustls::Error },
    #[error("certificate names no node id (no common name and no DNS name)")]
    NoNodeId,
    #[error("cannot parse a certificate: {0}")]
    Parse(String),
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("building the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("building the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("the TLS configuration has no cipher suite QUIC can start with")]
    NoInitialCipherSuite,
    #[error("cluster.idle_timeout {0:?} is too long for QUIC")]
    IdleTimeout(Duration),
}

/// The files of a node's cluster TLS, parsed.
#[derive(Debug)]
pub struct TlsMaterial {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    node_id: String,
    not_after: SystemTime,
    ca_not_after: SystemTime,
}

/// What the QUIC transport needs: both sides of the handshake, and the node
/// id this node's certificate proves.
#[derive(Debug, Clone)]
pub struct QuicConfigs {
    pub server: quinn::ServerConfig,
    pub client: quinn::ClientConfig,
    pub node_id: String,
}

impl TlsMaterial {
    /// Loads `cluster.ca`, `cluster.cert` and `cluster.key`.
    pub fn from_config(cluster: &ClusterConfig) -> Result<TlsMaterial, TlsError> {
        let ca = cluster
            .ca
            .as_deref()
            .ok_or(TlsError::Missing("cluster.ca"))?;
        let cert = cluster
            .cert
            .as_deref()
            .ok_or(TlsError::Missing("cluster.cert"))?;
        let key = cluster
            .key
            .as_deref()
            .ok_or(TlsError::Missing("cluster.key"))?;
        TlsMaterial::load(ca, cert, key)
    }

    /// Loads PEM files: the CA certificate(s) (several while a CA is being
    /// rotated), this node's certificate (chain) and its private key. Checks
    /// that the certificate verifies against the CA, so that a wrong file is
    /// reported at start and not as refused connections later.
    pub fn load(
        ca_path: &Path,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<TlsMaterial, TlsError> {
        let material = TlsMaterial::read(ca_path, cert_path, key_path)?;
        verify_chain(&material.ca, &material.chain, &material.node_id).map_err(|source| {
            TlsError::NotSignedByCa {
                cert: cert_path.to_owned(),
                ca: ca_path.to_owned(),
                source: Box::new(source),
            }
        })?;
        Ok(material)
    }

    /// [`TlsMaterial::load`] without checking the certificate against the
    /// CA: tests use it to play a node that trusts the cluster CA but holds
    /// a certificate from another.
    #[cfg(test)]
    pub(crate) fn load_unverified(
        ca_path: &Path,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<TlsMaterial, TlsError> {
        TlsMaterial::read(ca_path, cert_path, key_path)
    }

    fn read(ca_path: &Path, cert_path: &Path, key_path: &Path) -> Result<TlsMaterial, TlsError> {
        let ca = load_certs(ca_path, "cluster CA")?;
        let chain = load_certs(cert_path, "node certificate")?;
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|source| TlsError::Read {
            what: "node key",
            path: key_path.to_owned(),
            source,
        })?;
        let leaf = chain.first().ok_or_else(|| TlsError::NoCertificate {
            what: "node certificate",
            path: cert_path.to_owned(),
        })?;
        let bad_cert = |e: TlsError| TlsError::BadFile {
            what: "node certificate",
            path: cert_path.to_owned(),
            detail: e.to_string(),
        };
        let node_id = peer_node_id(leaf).map_err(bad_cert)?;
        let expires = not_after(leaf).map_err(bad_cert)?;
        let mut ca_not_after = None;
        for cert in &ca {
            let t = not_after(cert).map_err(|e| TlsError::BadFile {
                what: "cluster CA",
                path: ca_path.to_owned(),
                detail: e.to_string(),
            })?;
            ca_not_after = Some(ca_not_after.map_or(t, |o: SystemTime| o.max(t)));
        }
        // The key must match the certificate; rustls checks that when it
        // builds a config, which names no file, so do it here.
        let provider = ring_provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| TlsError::BadFile {
                what: "node key",
                path: key_path.to_owned(),
                detail: e.to_string(),
            })?;
        rustls::sign::CertifiedKey::new(chain.clone(), signing_key)
            .keys_match()
            .map_err(|e| TlsError::BadFile {
                what: "node key",
                path: key_path.to_owned(),
                detail: format!("does not belong to {}: {e}", cert_path.display()),
            })?;
        Ok(TlsMaterial {
            ca,
            chain,
            key,
            node_id,
            ca_not_after: ca_not_after.unwrap_or(UNIX_EPOCH),
            not_after: expires,
        })
    }

    /// The node id this node's certificate proves.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// When this node's certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When the (latest of the) cluster CA certificates expires.
    pub fn ca_not_after(&self) -> SystemTime {
        self.ca_not_after
    }

    /// Server and client configurations for the cluster listener. Peers are
    /// on a LAN: `keep_alive` (about 1 s) and `idle_timeout` (about 5 s)
    /// notice a silent peer quickly instead of after quinn's 30 s default.
    pub fn quic_configs(
        &self,
        keep_alive: Duration,
        idle_timeout: Duration,
    ) -> Result<QuicConfigs, TlsError> {
        let transport = Arc::new(transport_config(keep_alive, idle_timeout)?);
        let provider = ring_provider();
        let roots = Arc::new(self.root_store()?);

        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        server.alpn_protocols = vec![PEER_ALPN.to_vec()];
        // No 0-RTT: early data would arrive before the client certificate
        // is verified.
        server.max_early_data_size = 0;
        let server =
            QuicServerConfig::try_from(server).map_err(|_| TlsError::NoInitialCipherSuite)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
        server.transport_config(transport.clone());

        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        client.alpn_protocols = vec![PEER_ALPN.to_vec()];
        client.enable_early_data = false;
        let client =
            QuicClientConfig::try_from(client).map_err(|_| TlsError::NoInitialCipherSuite)?;
        let mut client = quinn::ClientConfig::new(Arc::new(client));
        client.transport_config(transport);

        Ok(QuicConfigs {
            server,
            client,
            node_id: self.node_id.clone(),
        })
    }

    fn root_store(&self) -> Result<RootCertStore, TlsError> {
        root_store(&self.ca)
    }
}

/// The QUIC transport parameters of node-to-node connections.
pub fn transport_config(
    keep_alive: Duration,
    idle_timeout: Duration,
) -> Result<quinn::TransportConfig, TlsError> {
    let idle = quinn::IdleTimeout::try_from(idle_timeout)
        .map_err(|_| TlsError::IdleTimeout(idle_timeout))?;
    let mut config = quinn::TransportConfig::default();
    config
        .keep_alive_interval(Some(keep_alive))
        .max_idle_timeout(Some(idle))
        // One stream for the hello, one per direction for frames.
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(1))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(1))
        .datagram_receive_buffer_size(None);
    Ok(config)
}

/// Reads every certificate of a PEM file.
pub fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_err = |source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_err)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The node id a certificate proves: its subject's common name, or its first
/// DNS name when it has no common name.
pub fn peer_node_id(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    let (_, x509) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| TlsError::Parse(e.to_string()))?;
    if let Some(cn) = x509.subject().iter_common_name().next() {
        let cn = cn.as_str().map_err(|e| TlsError::Parse(e.to_string()))?;
        if !cn.is_empty() {
            return Ok(cn.to_owned());
        }
    }
    let sans = x509
        .subject_alternative_name()
        .map_err(|e| TlsError::Parse(e.to_string()))?;
    sans.into_iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .find_map(|name| match name {
            GeneralName::DNSName(dns) if !dns.is_empty() => Some((*dns).to_owned()),
            _ => None,
        })
        .ok_or(TlsError::NoNodeId)
}

/// When a certificate expires.
pub fn not_after(cert: &CertificateDer<'_>) -> Result<SystemTime, TlsError> {
    let (_, x509) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| TlsError::Parse(e.to_string()))?;
    let secs = x509.validity().not_after.timestamp();
    Ok(match u64::try_from(secs) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => UNIX_EPOCH,
    })
}

/// Checks that `cert` is a node certificate for `node_id` that peers signed
/// by `ca` accept, both when it dials (client) and when it is dialed
/// (server).
pub fn verify_node_cert(
    ca: &[CertificateDer<'_>],
    cert: &CertificateDer<'_>,
    node_id: &str,
) -> Result<(), TlsError> {
    let ca: Vec<_> = ca.iter().map(|c| c.clone().into_owned()).collect();
    verify_chain(&ca, std::slice::from_ref(cert), node_id)
}

fn verify_chain(
    ca: &[CertificateDer<'static>],
    chain: &[CertificateDer<'_>],
    node_id: &str,
) -> Result<(), TlsError> {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(TlsError::Parse("empty certificate chain".into()));
    };
    let provider = ring_provider();
    let roots = Arc::new(root_store(ca)?);
    let untrusted = |source| TlsError::Untrusted {
        node: node_id.to_owned(),
        source,
    };
    let now = UnixTime::now();
    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()?
        .verify_client_cert(leaf, intermediates, now)
        .map_err(untrusted)?;
    let name =
        ServerName::try_from(node_id).map_err(|_| TlsError::ServerName(node_id.to_owned()))?;
    rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
        .build()?
        .verify_server_cert(leaf, intermediates, &name, &[], now)
        .map_err(untrusted)?;
    Ok(())
}

fn root_store(ca: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in ca {
        roots.add(cert.clone())?;
    }
    Ok(roots)
}

fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::{self, TestDir};

    #[test]
    fn loads_a_node_certificate_and_reads_its_identity() {
        let dir = TestDir::new("tls-load");
        let dir = dir.path();
        let ca = cert::make_ca(dir).expect("ca");
        let node = cert::make_node(dir, "n1", dir, &["10.0.0.7".into()]).expect("node");
        let material = TlsMaterial::load(&ca.cert, &node.cert, &node.key).expect("load");
        assert_eq!(material.node_id(), "n1");
        let year = Duration::from_secs(365 * 24 * 3600);
        let left = material
            .not_after()
            .duration_since(SystemTime::now())
            .expect("not expired");
        assert!(
            left > year - Duration::from_secs(3600) && left <= year,
            "{left:?}"
        );
        assert!(material.ca_not_after() > material.not_after());
        let configs = material
            .quic_configs(Duration::from_secs(1), Duration::from_secs(5))
            .expect("configs");
        assert_eq!(configs.node_id, "n1");
    }

    #[test]
    fn a_certificate_from_another_ca_is_refused_naming_the_files() {
        let (a, b) = (TestDir::new("tls-a"), TestDir::new("tls-b"));
        let (a, b) = (a.path(), b.path());
        let ca_a = cert::make_ca(a).expect("ca a");
        cert::make_ca(b).expect("ca b");
        let node = cert::make_node(b, "n1", b, &[]).expect("node");
        let err = TlsMaterial::load(&ca_a.cert, &node.cert, &node.key).expect_err("refused");
        assert!(matches!(err, TlsError::NotSignedByCa { .. }), "{err}");
        assert!(err.to_string().contains("n1.pem"), "{err}");
        // The verifier also refuses it for the right name.
        let ca_certs = load_certs(&ca_a.cert, "ca").expect("ca certs");
        let leaf = load_certs(&node.cert, "cert").expect("leaf");
        assert!(verify_node_cert(&ca_certs, &leaf[0], "n1").is_err());
    }

    #[test]
    fn a_key_of_another_node_is_refused() {
        let dir = TestDir::new("tls-key");
        let dir = dir.path();
        let ca = cert::make_ca(dir).expect("ca");
        let n1 = cert::make_node(dir, "n1", dir, &[]).expect("n1");
        let n2 = cert::make_node(dir, "n2", dir, &[]).expect("n2");
        let err = TlsMaterial::load(&ca.cert, &n1.cert, &n2.key).expect_err("refused");
        assert!(err.to_string().contains("n2-key.pem"), "{err}");
    }

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = TestDir::new("tls-missing");
        let dir = dir.path();
        let nowhere = dir.join("nope.pem");
        let err = load_certs(&nowhere, "cluster CA").expect_err("missing");
        assert!(err.to_string().contains("nope.pem"), "{err}");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not pem\n").expect("write");
        let err = load_certs(&empty, "cluster CA").expect_err("empty");
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        let err = TlsMaterial::from_config(&ClusterConfig::default()).expect_err("unset");
        assert!(matches!(err, TlsError::Missing("cluster.ca")), "{err}");
    }

    #[test]
    fn identity_falls_back_to_the_first_dns_name() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["n9".to_owned(), "other".to_owned()])
            .expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(peer_node_id(cert.der()).expect("id"), "n9");
    }
}
