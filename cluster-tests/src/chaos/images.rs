//! The images a run needs (the herald image and the HAProxy image), built
//! on this machine by the project's own `scripts/compose-build.sh` when
//! they are missing, or when the herald image is older than the sources it
//! is built from (a stale image would test old code).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

use super::docker::docker;

/// The tags `scripts/compose-build.sh` makes.
pub const HERALD_IMAGE: &str = "herald:local";
pub const HAPROXY_IMAGE: &str = "herald-haproxy:local";

/// Upper bound on one image build (a cold one runs a release build and
/// debootstrap).
const BUILD_TIMEOUT: Duration = Duration::from_secs(45 * 60);

/// When to build images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildPolicy {
    /// Use what is there; a missing image is an error.
    Never,
    /// Build missing images only.
    IfMissing,
    /// Build missing images, and the herald image again when a source file
    /// is newer than it.
    IfStale,
}

impl BuildPolicy {
    /// `never`, `missing` or `stale`.
    pub fn parse(name: &str) -> Option<BuildPolicy> {
        match name {
            "never" => Some(BuildPolicy::Never),
            "missing" => Some(BuildPolicy::IfMissing),
            "stale" => Some(BuildPolicy::IfStale),
            _ => None,
        }
    }
}

/// The repository root (this crate's parent directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Makes sure both images exist (and, with [`BuildPolicy::IfStale`], that
/// the herald image is newer than its sources). Returns what it did, for the
/// report; the build's output goes to `log_dir/image-build.log`.
pub async fn ensure(
    herald: &str,
    haproxy: &str,
    policy: BuildPolicy,
    log_dir: &Path,
) -> Result<Vec<String>> {
    let root = repo_root();
    let herald_created = created(herald).await;
    let haproxy_present = created(haproxy).await.is_some();
    let mut notes = Vec::new();
    let stale = match (policy, herald_created) {
        (BuildPolicy::IfStale, Some(created)) => {
            let newest = newest_source(&root);
            newest.filter(|(t, _)| *t > created).map(|(_, p)| p)
        }
        _ => None,
    };
    let need_herald = herald_created.is_none() || stale.is_some();
    if !need_herald && haproxy_present {
        return Ok(notes);
    }
    if policy == BuildPolicy::Never {
        bail!(
            "image {} is missing and building was turned off: run scripts/compose-build.sh",
            if herald_created.is_none() {
                herald
            } else {
                haproxy
            }
        );
    }
    if herald != HERALD_IMAGE && need_herald || haproxy != HAPROXY_IMAGE && !haproxy_present {
        bail!(
            "images {herald} / {haproxy}: only {HERALD_IMAGE} and {HAPROXY_IMAGE} are built here \
             (scripts/compose-build.sh); build the others yourself"
        );
    }
    // The HAProxy image needs the whole script (Debian base by debootstrap,
    // then every compose image); the herald image alone has a short cut.
    let args: &[&str] = if haproxy_present {
        &["--herald-only"]
    } else {
        &[]
    };
    let why = match (&stale, herald_created, haproxy_present) {
        (Some(path), _, true) => format!("{herald} is older than {}", path.display()),
        (_, None, true) => format!("{herald} is missing"),
        _ => format!("{haproxy} is missing"),
    };
    std::fs::create_dir_all(log_dir)?;
    let log_path = log_dir.join("image-build.log");
    let script = root.join("scripts/compose-build.sh");
    eprintln!(
        "chaos: {why}: running {} {} (output in {})",
        script.display(),
        args.join(" "),
        log_path.display()
    );
    let log = std::fs::File::create(&log_path)?;
    let started = Instant::now();
    let mut child = tokio::process::Command::new(&script)
        .args(args)
        .current_dir(&root)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("running {}", script.display()))?;
    let status = tokio::time::timeout(BUILD_TIMEOUT, child.wait())
        .await
        .with_context(|| format!("image build took longer than {BUILD_TIMEOUT:?}"))??;
    if !status.success() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{} {} failed ({status}); last lines of {}:\n{}",
            script.display(),
            args.join(" "),
            log_path.display(),
            tail.join("\n")
        );
    }
    notes.push(format!(
        "built images ({why}) with scripts/compose-build.sh {} in {:.0?}",
        args.join(" "),
        started.elapsed()
    ));
    for image in [herald, haproxy] {
        if created(image).await.is_none() {
            bail!("{image} still missing after scripts/compose-build.sh");
        }
    }
    Ok(notes)
}

/// When the image was made; `None` if there is no such image.
async fn created(image: &str) -> Option<SystemTime> {
    let text = docker(&["image", "inspect", "--format", "{{.Created}}", image])
        .await
        .ok()?;
    humantime::parse_rfc3339_weak(text.trim())
        .ok()
        // A date this code cannot read: take the image as new rather than
        // rebuild it on every run.
        .or(Some(SystemTime::now()))
}

/// The newest file the herald binary is built from, with its time.
fn newest_source(root: &Path) -> Option<(SystemTime, PathBuf)> {
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    let mut consider = |path: &Path| {
        if let Ok(modified) = std::fs::metadata(path).and_then(|m| m.modified()) {
            if newest.as_ref().is_none_or(|(t, _)| modified > *t) {
                newest = Some((modified, path.to_path_buf()));
            }
        }
    };
    for file in ["Cargo.toml", "Cargo.lock", "deploy/docker/Dockerfile"] {
        consider(&root.join(file));
    }
    let mut stack = vec![root.join("node"), root.join("protocol")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path
                .extension()
                .is_some_and(|e| e == "rs" || e == "toml" || e == "proto")
            {
                consider(&path);
            }
        }
    }
    newest
}
