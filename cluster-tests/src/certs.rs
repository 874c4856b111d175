//! Certificates for the cluster's mutual TLS, made by the binary under test
//! (`herald cert ca`, `herald cert node`), as operators make them.
//!
//! [`Ca::shared`] is one CA per test process, made on first use in a temp
//! directory; node certificates are made once per node id and reused (a
//! restarted node presents the same certificate). [`Ca::new`] makes another,
//! unrelated CA, for tests of nodes that must not be trusted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};

use crate::node::herald_bin;

/// Temp directories of CAs are named `herald-tests-ca-<pid>-<n>`.
const DIR_PREFIX: &str = "herald-tests-ca-";

/// A cluster CA in a directory of its own (`ca.pem`, `ca-key.pem`), and the
/// node certificates it has signed there.
#[derive(Debug)]
pub struct Ca {
    dir: PathBuf,
    nodes: Mutex<HashMap<String, NodeCert>>,
}

/// What one node needs for `--cluster-ca`, `--cluster-cert`, `--cluster-key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCert {
    pub id: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    /// The CA of this test process, made once (with `herald cert ca`).
    pub fn shared() -> Result<&'static Ca> {
        static SHARED: OnceLock<Result<Ca, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| Ca::new().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow!("making the test CA: {e}"))
    }

    /// A new CA, unrelated to every other one.
    pub fn new() -> Result<Ca> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        remove_stale_dirs();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{n}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        herald_cert(&["ca", "--out", path_str(&dir)?])?;
        for file in ["ca.pem", "ca-key.pem"] {
            if !dir.join(file).is_file() {
                bail!("herald cert ca did not write {}", dir.join(file).display());
            }
        }
        Ok(Ca {
            dir,
            nodes: Mutex::new(HashMap::new()),
        })
    }

    /// The directory holding `ca.pem` and `ca-key.pem`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate.
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The certificate for node `id`, made (with `herald cert node`) on the
    /// first call for that id and reused after.
    pub fn node(&self, id: &str) -> Result<NodeCert> {
        let mut nodes = self
            .nodes
            .lock()
            .map_err(|_| anyhow!("cert cache poisoned"))?;
        if let Some(cert) = nodes.get(id) {
            return Ok(cert.clone());
        }
        let dir = path_str(&self.dir)?;
        herald_cert(&["node", "--ca", dir, "--name", id, "--out", dir])?;
        let cert = NodeCert {
            id: id.to_owned(),
            ca: self.ca_pem(),
            cert: self.dir.join(format!("{id}.pem")),
            key: self.dir.join(format!("{id}-key.pem")),
        };
        for file in [&cert.cert, &cert.key] {
            if !file.is_file() {
                bail!("herald cert node did not write {}", file.display());
            }
        }
        nodes.insert(id.to_owned(), cert.clone());
        Ok(cert)
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| anyhow!("path is not UTF-8: {}", path.display()))
}

/// Runs `herald cert ARGS`; an error carries its output.
fn herald_cert(args: &[&str]) -> Result<()> {
    let output = Command::new(herald_bin()?)
        .arg("cert")
        .args(args)
        .env_remove("HERALD_CONFIG")
        .output()
        .context("running herald cert")?;
    if !output.status.success() {
        bail!(
            "herald cert {} failed with {}: {}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// CA directories of test processes that are gone (a CA lives as long as
/// its process, and nothing else removes it).
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest
            .split('-')
            .next()
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
