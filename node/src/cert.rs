//! `herald cert`: makes the certificates of the cluster's mutual TLS (a CA,
//! and node certificates it signs) for development and compose setups.
//!
//! A node certificate names its node id twice: as the subject's common name
//! (what a peer checks the hello against) and as a DNS name (what a dialing
//! node checks the server against). Production setups may bring their own
//! PKI as long as their certificates follow the same rule.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::{Ia5String, PrintableString};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use x509_parser::asn1_rs::Tag;
use x509_parser::extensions::ParsedExtension;

use crate::config::CertCommand;

/// File names inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
const NODE_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Certificates start a little in the past: a node whose clock is slightly
/// behind the one that made the certificate must still accept it.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} already exists: remove it to make a new CA (certificates signed by the old \
         one would stop being trusted)"
    )]
    CaExists { path: PathBuf },
    #[error("invalid node id {id:?}: {reason}")]
    InvalidNodeId { id: String, reason: &'static str },
    #[error("invalid --san {value:?}: {reason}")]
    InvalidSan { value: String, reason: &'static str },
    #[error("{path} holds no usable CA certificate: {detail}")]
    BadCaCert { path: PathBuf, detail: String },
    #[error("{path} holds no usable private key: {detail}")]
    BadKey { path: PathBuf, detail: String },
    #[error("the key {key} does not belong to the CA certificate {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the new certificate for {node} does not verify against the CA in {ca}: {reason}")]
    SelfCheck {
        node: String,
        ca: PathBuf,
        reason: String,
    },
}

/// Where a CA was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where a node certificate was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Runs a `herald cert` subcommand, saying on stdout what it wrote.
pub fn run(command: &CertCommand) -> Result<(), CertError> {
    match command {
        CertCommand::Ca { out } => {
            let files = make_ca(out)?;
            println!("wrote {} and {}", files.cert.display(), files.key.display());
        }
        CertCommand::Node {
            ca,
            name,
            out,
            extra_names,
        } => {
            let files = make_node(ca, name, out, extra_names)?;
            println!("wrote {} and {}", files.cert.display(), files.key.display());
        }
    }
    Ok(())
}

/// Writes a new CA into `out_dir` (created if missing). Refuses to replace
/// an existing one.
pub fn make_ca(out_dir: &Path) -> Result<CaFiles, CertError> {
    create_dir(out_dir)?;
    let files = CaFiles {
        cert: out_dir.join(CA_CERT_FILE),
        key: out_dir.join(CA_KEY_FILE),
    };
    for path in [&files.cert, &files.key] {
        if path.exists() {
            return Err(CertError::CaExists { path: path.clone() });
        }
    }

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    // A random tag tells two CAs apart in logs and in `herald doctor`.
    params.distinguished_name.push(
        DnType::CommonName,
        format!("Herald cluster CA {:08x}", rand::random::<u32>()),
    );
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Herald");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_VALIDITY);
    let cert = params.self_signed(&key)?;

    write_file(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&files.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(files)
}

/// Writes a certificate for node `name`, signed by the CA in `ca_dir`, into
/// `out_dir` (created if missing) as `name.pem` and `name-key.pem`. Its
/// names: DNS `name`, `localhost`, 127.0.0.1, and `extra_names` (an IP
/// address when one parses, a DNS name otherwise).
pub fn make_node(
    ca_dir: &Path,
    name: &str,
    out_dir: &Path,
    extra_names: &[String],
) -> Result<NodeFiles, CertError> {
    validate_node_id(name)?;
    let sans = subject_alt_names(name, extra_names)?;
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let (ca_der, issuer) = load_issuer(&ca_cert_path, &ca_key_path)?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Herald");
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every node is both a server (it is dialed) and a client (it dials).
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, NODE_VALIDITY);
    let cert = params.signed_by(&key, &issuer)?;

    // The issuer was rebuilt from the CA's PEM: prove that a peer will
    // accept the result before writing it.
    crate::tls::verify_node_cert(std::slice::from_ref(&ca_der), cert.der(), name).map_err(|e| {
        CertError::SelfCheck {
            node: name.to_owned(),
            ca: ca_cert_path.clone(),
            reason: e.to_string(),
        }
    })?;

    create_dir(out_dir)?;
    let files = NodeFiles {
        cert: out_dir.join(format!("{name}.pem")),
        key: out_dir.join(format!("{name}-key.pem")),
    };
    write_file(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&files.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(files)
}

/// A node id becomes a file name, a DNS name in the certificate and the TLS
/// server name peers dial: it must be all three.
fn validate_node_id(id: &str) -> Result<(), CertError> {
    let invalid = |reason| {
        Err(CertError::InvalidNodeId {
            id: id.to_owned(),
            reason,
        })
    };
    if id.is_empty() || id.len() > 253 {
        return invalid("must be 1 to 253 characters");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return invalid("may hold only ASCII letters, digits, '-', '_' and '.'");
    }
    if rustls_pki_types::DnsName::try_from(id).is_err() {
        return invalid("is not a valid DNS name (peers dial it as the TLS server name)");
    }
    Ok(())
}

fn subject_alt_names(name: &str, extra_names: &[String]) -> Result<Vec<SanType>, CertError> {
    let mut sans = vec![
        SanType::DnsName(ia5(name)?),
        SanType::DnsName(ia5("localhost")?),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    ];
    for value in extra_names {
        let invalid = |reason| CertError::InvalidSan {
            value: value.clone(),
            reason,
        };
        let san = match value.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) if value.is_empty() => return Err(invalid("empty")),
            Err(_) => SanType::DnsName(
                Ia5String::try_from(value.as_str()).map_err(|_| invalid("not ASCII"))?,
            ),
        };
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    Ok(sans)
}

fn ia5(name: &str) -> Result<Ia5String, CertError> {
    Ia5String::try_from(name).map_err(|_| CertError::InvalidNodeId {
        id: name.to_owned(),
        reason: "not ASCII",
    })
}

/// rcgen's own CA loader needs its `x509-parser` feature (a second
/// x509-parser version); rebuilding the issuer's name and key identifier
/// from our x509-parser is enough to sign.
fn load_issuer(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(CertificateDer<'static>, Issuer<'static, KeyPair>), CertError> {
    let bad_ca = |detail: String| CertError::BadCaCert {
        path: cert_path.to_owned(),
        detail,
    };
    let pem = fs::read(cert_path).map_err(|source| CertError::Read {
        path: cert_path.to_owned(),
        source,
    })?;
    let der = CertificateDer::from_pem_slice(&pem).map_err(|e| bad_ca(e.to_string()))?;
    let key_pem = fs::read_to_string(key_path).map_err(|source| CertError::Read {
        path: key_path.to_owned(),
        source,
    })?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| CertError::BadKey {
        path: key_path.to_owned(),
        detail: e.to_string(),
    })?;

    let (_, x509) = x509_parser::parse_x509_certificate(&der).map_err(|e| bad_ca(e.to_string()))?;
    if !x509.is_ca() {
        return Err(bad_ca("not a CA certificate (basic constraints)".into()));
    }
    if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(CertError::KeyMismatch {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
        });
    }

    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    for attr in x509.subject().iter_attributes() {
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or_else(|| bad_ca("subject attribute with an oversized OID".into()))?
            .collect();
        let text = attr
            .as_str()
            .map_err(|_| bad_ca("subject uses a string type herald cannot copy".into()))?;
        // The issuer name must match the CA's subject byte for byte, so
        // keep each value's string type.
        let value = match attr.attr_value().tag() {
            Tag::PrintableString => DnValue::PrintableString(
                PrintableString::try_from(text).map_err(|e| bad_ca(e.to_string()))?,
            ),
            Tag::Ia5String => {
                DnValue::Ia5String(Ia5String::try_from(text).map_err(|e| bad_ca(e.to_string()))?)
            }
            Tag::Utf8String => DnValue::Utf8String(text.to_owned()),
            _ => {
                return Err(bad_ca(
                    "subject uses a string type herald cannot copy".into(),
                ))
            }
        };
        params
            .distinguished_name
            .push(DnType::from_oid(&oid), value);
    }
    params.key_identifier_method = x509
        .iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => {
                Some(KeyIdMethod::PreSpecified(id.0.to_vec()))
            }
            _ => None,
        })
        .unwrap_or(KeyIdMethod::Sha256);
    let der = der.into_owned();
    Ok((der, Issuer::new(params, key)))
}

/// Makes `params` valid from a little before now for `length`. (rcgen's
/// dates are `time` values; setting them here keeps `time` out of our
/// dependencies.)
fn set_validity(params: &mut CertificateParams, length: Duration) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    params.not_before = epoch + now.saturating_sub(BACKDATE);
    params.not_after = epoch + now + length;
}

fn create_dir(path: &Path) -> Result<(), CertError> {
    fs::create_dir_all(path).map_err(|source| CertError::CreateDir {
        path: path.to_owned(),
        source,
    })
}

/// Writes through a temporary file and a rename, so that a reader never
/// sees half a key and a key file is never readable by others, not even
/// for a moment.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let err = |source| CertError::Write {
        path: path.to_owned(),
        source,
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// A directory under the system temp dir, removed when dropped.
#[cfg(test)]
pub(crate) struct TestDir(PathBuf);

#[cfg(test)]
impl TestDir {
    pub(crate) fn new(tag: &str) -> TestDir {
        let dir = std::env::temp_dir().join(format!(
            "herald-{tag}-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        fs::create_dir_all(&dir).expect("temp dir");
        TestDir(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

#[cfg(test)]
impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use x509_parser::extensions::GeneralName;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn makes_a_ca_and_a_node_certificate_with_its_names() {
        let dir = TestDir::new("cert");
        let ca = make_ca(&dir.path().join("ca")).expect("ca");
        assert_eq!(mode(&ca.key), 0o600);
        let node = make_node(
            &dir.path().join("ca"),
            "node-1",
            &dir.path().join("out"),
            &[
                "10.1.2.3".into(),
                "herald.example".into(),
                "localhost".into(),
            ],
        )
        .expect("node");
        assert_eq!(node.cert, dir.path().join("out/node-1.pem"));
        assert_eq!(node.key, dir.path().join("out/node-1-key.pem"));
        assert_eq!(mode(&node.key), 0o600);

        let pem = fs::read(&node.cert).expect("read");
        let der = CertificateDer::from_pem_slice(&pem).expect("pem");
        let (_, x509) = x509_parser::parse_x509_certificate(&der).expect("x509");
        let cn: Vec<_> = x509
            .subject()
            .iter_common_name()
            .map(|cn| cn.as_str().expect("cn").to_owned())
            .collect();
        assert_eq!(cn, ["node-1"]);
        let sans = x509
            .subject_alternative_name()
            .expect("san")
            .expect("has san");
        let names: Vec<String> = sans
            .value
            .general_names
            .iter()
            .map(|name| match name {
                GeneralName::DNSName(dns) => format!("dns {dns}"),
                GeneralName::IPAddress(&[a, b, c, d]) => {
                    format!("ip {}", Ipv4Addr::new(a, b, c, d))
                }
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            names,
            [
                "dns node-1",
                "dns localhost",
                "ip 127.0.0.1",
                "ip 10.1.2.3",
                "dns herald.example",
            ]
        );
        assert!(!x509.is_ca());
        let year = 365 * 24 * 3600;
        let validity = x509.validity();
        let span = validity.not_after.timestamp() - validity.not_before.timestamp();
        assert!((year..year + 3600).contains(&span), "{span}");
        let ca_der = CertificateDer::from_pem_slice(&fs::read(&ca.cert).expect("ca")).expect("pem");
        crate::tls::verify_node_cert(&[ca_der], &der, "node-1").expect("verifies");
    }

    #[test]
    fn refuses_to_replace_a_ca_and_bad_names() {
        let dir = TestDir::new("cert-refuse");
        make_ca(dir.path()).expect("ca");
        assert!(matches!(
            make_ca(dir.path()),
            Err(CertError::CaExists { .. })
        ));
        for bad in ["", "../x", "a/b", "é", "a b"] {
            let err = make_node(dir.path(), bad, dir.path(), &[]).expect_err(bad);
            assert!(
                matches!(err, CertError::InvalidNodeId { .. }),
                "{bad}: {err}"
            );
        }
        let err = make_node(dir.path(), "n1", dir.path(), &["ü.example".into()]).expect_err("san");
        assert!(matches!(err, CertError::InvalidSan { .. }), "{err}");
        let missing =
            make_node(&dir.path().join("nope"), "n1", dir.path(), &[]).expect_err("no ca");
        assert!(missing.to_string().contains("ca.pem"), "{missing}");
    }

    #[test]
    fn a_ca_key_that_does_not_match_is_named() {
        let (a, b) = (TestDir::new("cert-a"), TestDir::new("cert-b"));
        make_ca(a.path()).expect("ca a");
        let ca_b = make_ca(b.path()).expect("ca b");
        fs::copy(&ca_b.key, a.path().join(CA_KEY_FILE)).expect("copy");
        let err = make_node(a.path(), "n1", a.path(), &[]).expect_err("mismatch");
        assert!(matches!(err, CertError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn a_node_certificate_may_be_reissued() {
        let dir = TestDir::new("cert-again");
        make_ca(dir.path()).expect("ca");
        let first = make_node(dir.path(), "n1", dir.path(), &[]).expect("first");
        let before = fs::read(&first.cert).expect("read");
        make_node(dir.path(), "n1", dir.path(), &[]).expect("second");
        assert_ne!(before, fs::read(&first.cert).expect("read"));
        assert_eq!(mode(&first.key), 0o600);
    }
}
