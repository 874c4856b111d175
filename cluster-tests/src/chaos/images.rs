//! The images a run needs (the herald image and the HAProxy image), built
//! on this machine by the project's own `scripts/compose-build.sh` when
//! they are missing, or when no herald image of the current sources exists
//! (a stale image would test old code).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    /// Build missing images, and the herald image again when the sources
    /// changed since this harness last built it.
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

/// Makes sure both images exist (with [`BuildPolicy::IfStale`]: a herald
/// image built from the sources as they are now) and returns the herald
/// image to run, and what was done, for the report. A build's output goes
/// to `log_dir/image-build.log`.
///
/// Freshness is by content, not by time: an image built by this harness is
/// also tagged `herald-chaos:<hash of the sources>`, so a fresh clone of
/// unchanged sources reuses it, and any change to `node/`, `protocol/`,
/// `Cargo.toml`, `Cargo.lock` or `deploy/docker/` builds again.
pub async fn ensure(
    herald: &str,
    haproxy: &str,
    policy: BuildPolicy,
    log_dir: &Path,
) -> Result<(String, Vec<String>)> {
    let root = repo_root();
    let haproxy_present = exists(haproxy).await;
    let herald_present = exists(herald).await;
    let mut notes = Vec::new();
    let by_content = policy == BuildPolicy::IfStale && herald == HERALD_IMAGE;
    let fresh_tag = if by_content {
        Some(format!("herald-chaos:{}", source_hash(&root)?))
    } else {
        None
    };
    let herald_ok = match &fresh_tag {
        Some(tag) => exists(tag).await,
        None => herald_present,
    };
    let use_image = fresh_tag.clone().unwrap_or_else(|| herald.to_owned());
    if herald_ok && haproxy_present {
        return Ok((use_image, notes));
    }
    if policy == BuildPolicy::Never {
        bail!(
            "image {} is missing and building was turned off: run scripts/compose-build.sh",
            if herald_present { haproxy } else { herald }
        );
    }
    if herald != HERALD_IMAGE && !herald_ok || haproxy != HAPROXY_IMAGE && !haproxy_present {
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
    let why = match (herald_ok, herald_present, haproxy_present) {
        (_, _, false) => format!("{haproxy} is missing"),
        (_, false, _) => format!("{herald} is missing"),
        _ => format!("no herald image of the current sources ({use_image})"),
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
        if !exists(image).await {
            bail!("{image} still missing after scripts/compose-build.sh");
        }
    }
    if let Some(tag) = &fresh_tag {
        docker(&["tag", herald, tag]).await?;
        // Older tags of this harness only: the images stay while in use.
        let old = docker(&[
            "image",
            "ls",
            "herald-chaos",
            "--format",
            "{{.Repository}}:{{.Tag}}",
        ])
        .await?;
        for name in old
            .lines()
            .filter(|n| n != tag && n.starts_with("herald-chaos:"))
        {
            let _ = docker(&["rmi", name]).await;
        }
    }
    Ok((use_image, notes))
}

async fn exists(image: &str) -> bool {
    docker(&["image", "inspect", "--format", "{{.Id}}", image])
        .await
        .is_ok()
}

/// FNV-1a (64 bit) of the paths and contents of every file the herald image
/// is built from, as 16 hex digits.
fn source_hash(root: &Path) -> Result<String> {
    let mut files: Vec<PathBuf> = ["Cargo.toml", "Cargo.lock", "deploy/docker/Dockerfile"]
        .iter()
        .map(|f| root.join(f))
        .collect();
    let mut stack = vec![
        root.join("node"),
        root.join("protocol"),
        root.join("deploy/docker/rootfs"),
    ];
    while let Some(dir) = stack.pop() {
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "target") {
                    stack.push(path);
                }
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for file in &files {
        let rel = file.strip_prefix(root).unwrap_or(file);
        feed(rel.to_string_lossy().as_bytes());
        feed(&[0]);
        feed(&std::fs::read(file).with_context(|| format!("reading {}", file.display()))?);
        feed(&[0xff]);
    }
    Ok(format!("{h:016x}"))
}
