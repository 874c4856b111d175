//! The images a run needs (the herald image and the HAProxy image; the
//! compose test asks for every image of docker-compose.yml), built on this
//! machine by the project's own `scripts/compose-build.sh` when they are
//! missing, or when no image of the current sources exists of those that
//! carry the herald binary (a stale image would test old code).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::docker::docker;

/// The tags `scripts/compose-build.sh` makes.
pub const HERALD_IMAGE: &str = "herald:local";
pub const CERTS_IMAGE: &str = "herald-certs:local";
pub const HAPROXY_IMAGE: &str = "herald-haproxy:local";
pub const PROMETHEUS_IMAGE: &str = "herald-prometheus:local";
/// Every image `docker-compose.yml` runs, all made by the script.
pub const COMPOSE_IMAGES: [&str; 4] = [HERALD_IMAGE, CERTS_IMAGE, HAPROXY_IMAGE, PROMETHEUS_IMAGE];

/// The images that carry the herald binary, and the repository of the tags
/// that name the sources each was built from (see [`ensure`]).
const CONTENT_TAGGED: [(&str, &str); 2] = [
    (HERALD_IMAGE, "herald-chaos"),
    (CERTS_IMAGE, "herald-chaos-certs"),
];

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

/// Makes sure `herald` and `others` exist (with [`BuildPolicy::IfStale`],
/// those that carry the herald binary built from the sources as they are
/// now) and returns the image to run for each (`herald`, then `others` in
/// order) and what was done, for the report. A build's output goes to
/// `log_dir/image-build.log`.
///
/// Freshness is by content, not by time: an image built by this harness is
/// also tagged `herald-chaos:<hash of the sources>` (the certs image
/// `herald-chaos-certs:<hash>`), and that tag is what runs, so a fresh clone
/// of unchanged sources reuses it, and any change to `node/`, `protocol/`,
/// `Cargo.toml`, `Cargo.lock` or the herald and certs images' files in
/// `deploy/docker/` builds again.
pub async fn ensure(
    herald: &str,
    others: &[&str],
    policy: BuildPolicy,
    log_dir: &Path,
) -> Result<(Vec<String>, Vec<String>)> {
    let root = repo_root();
    let wanted: Vec<&str> = std::iter::once(herald)
        .chain(others.iter().copied())
        .collect();
    let mut notes = Vec::new();
    // The wanted images that carry herald, each with its tag of these sources.
    let mut fresh: Vec<(&str, String)> = Vec::new();
    if policy == BuildPolicy::IfStale && herald == HERALD_IMAGE {
        let hash = source_hash(&root)?;
        for (image, repo) in CONTENT_TAGGED {
            if wanted.contains(&image) {
                fresh.push((image, format!("{repo}:{hash}")));
            }
        }
    }
    let mut missing = Vec::new();
    for image in &wanted {
        if !exists(image).await {
            missing.push(*image);
        }
    }
    let mut stale = Vec::new();
    for (image, tag) in &fresh {
        if !exists(tag).await {
            stale.push((*image, tag.as_str()));
        }
    }
    let use_images: Vec<String> = wanted
        .iter()
        .map(|image| match fresh.iter().find(|(i, _)| i == image) {
            Some((_, tag)) => tag.clone(),
            None => (*image).to_owned(),
        })
        .collect();
    if missing.is_empty() && stale.is_empty() {
        return Ok((use_images, notes));
    }
    if policy == BuildPolicy::Never {
        bail!(
            "image {} is missing and building was turned off: run scripts/compose-build.sh",
            missing.join(", ")
        );
    }
    let foreign: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|image| !COMPOSE_IMAGES.contains(image))
        .collect();
    if !foreign.is_empty() {
        bail!(
            "images {}: only {} are built here (scripts/compose-build.sh); build the others yourself",
            foreign.join(", "),
            COMPOSE_IMAGES.join(", ")
        );
    }
    // Only the herald image has a short cut; any other needs the whole
    // script (Debian base by debootstrap, then every compose image).
    let herald_only = missing
        .iter()
        .chain(stale.iter().map(|(image, _)| image))
        .all(|image| *image == HERALD_IMAGE);
    let args: &[&str] = if herald_only { &["--herald-only"] } else { &[] };
    let why = if missing.is_empty() {
        let tags: Vec<&str> = stale.iter().map(|(_, tag)| *tag).collect();
        format!("no image of the current sources ({})", tags.join(", "))
    } else {
        format!("{} missing", missing.join(", "))
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
    for image in &wanted {
        if !exists(image).await {
            bail!("{image} still missing after scripts/compose-build.sh");
        }
    }
    // `--herald-only` leaves the certs image as it was.
    for (image, tag) in fresh
        .iter()
        .filter(|(image, _)| !herald_only || *image == HERALD_IMAGE)
    {
        docker(&["tag", image, tag]).await?;
        // Older tags of this harness only: the images stay while in use.
        let repo = tag.split_once(':').map_or(tag.as_str(), |(repo, _)| repo);
        let old = docker(&["image", "ls", repo, "--format", "{{.Repository}}:{{.Tag}}"]).await?;
        let prefix = format!("{repo}:");
        for name in old.lines().filter(|n| n != tag && n.starts_with(&prefix)) {
            let _ = docker(&["rmi", name]).await;
        }
    }
    Ok((use_images, notes))
}

async fn exists(image: &str) -> bool {
    docker(&["image", "inspect", "--format", "{{.Id}}", image])
        .await
        .is_ok()
}

/// FNV-1a (64 bit) of the paths and contents of every file the herald and
/// certs images are built from, as 16 hex digits.
fn source_hash(root: &Path) -> Result<String> {
    let mut files: Vec<PathBuf> = [
        "Cargo.toml",
        "Cargo.lock",
        "deploy/docker/Dockerfile",
        "deploy/docker/certs.Dockerfile",
        "deploy/docker/make-certs.sh",
    ]
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
