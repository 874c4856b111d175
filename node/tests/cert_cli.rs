//! `herald cert ca` and `herald cert node` as an operator runs them: the
//! files land where the contract says, the keys are private, and the node
//! certificate is one the cluster's TLS accepts.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use node::tls::{self, TlsMaterial};

fn herald(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .output()
        .expect("run herald")
}

/// A fresh directory, removed at the end of the test.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!(
            "herald-cert-cli-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        Dir(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.join(name).display().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "herald failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cert_ca_and_cert_node_make_a_working_pair() {
    let dir = Dir::new("pair");
    let out = herald(&["cert", "ca", "--out", &dir.arg("ca")]);
    assert_ok(&out);
    assert!(dir.join("ca/ca.pem").is_file());
    assert_eq!(mode(&dir.join("ca/ca-key.pem")), 0o600);

    let out = herald(&[
        "cert",
        "node",
        "--ca",
        &dir.arg("ca"),
        "--name",
        "node-a",
        "--out",
        &dir.arg("certs"),
        "--san",
        "10.0.0.5",
        "--san",
        "node-a.herald.internal",
    ]);
    assert_ok(&out);
    let cert = dir.join("certs/node-a.pem");
    let key = dir.join("certs/node-a-key.pem");
    assert!(cert.is_file());
    assert_eq!(mode(&key), 0o600);

    // Loading checks the certificate against the CA, both as a client and
    // as a server named node-a.
    let material = TlsMaterial::load(&dir.join("ca/ca.pem"), &cert, &key).expect("verifies");
    assert_eq!(material.node_id(), "node-a");
    assert!(material.not_after() > std::time::SystemTime::now());
    material
        .quic_configs(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(5),
        )
        .expect("quic configs");

    let ca = tls::load_certs(&dir.join("ca/ca.pem"), "CA").expect("ca");
    let leaf = tls::load_certs(&cert, "cert").expect("cert");
    assert!(tls::verify_node_cert(&ca, &leaf[0], "node-a").is_ok());
    assert!(
        tls::verify_node_cert(&ca, &leaf[0], "node-b").is_err(),
        "the certificate must not pass for another node"
    );
}

#[test]
fn a_second_ca_in_the_same_place_is_refused() {
    let dir = Dir::new("again");
    assert_ok(&herald(&["cert", "ca", "--out", &dir.arg("ca")]));
    let before = std::fs::read(dir.join("ca/ca.pem")).expect("read");
    let out = herald(&["cert", "ca", "--out", &dir.arg("ca")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(dir.join("ca/ca.pem")).expect("read"), before);
}

#[test]
fn cert_node_without_a_ca_names_the_missing_file() {
    let dir = Dir::new("noca");
    let out = herald(&[
        "cert",
        "node",
        "--ca",
        &dir.arg("nowhere"),
        "--name",
        "n1",
        "--out",
        &dir.arg("certs"),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ca.pem"), "{err}");
    assert!(!dir.join("certs/n1.pem").exists());
}
