//! The `docker` CLI as a child process: commands with a time bound, a guard
//! that removes everything a run made (also on error and panic), removal of
//! what runs that are gone left behind, and a watcher of container events
//! (exits, OOM kills).
//!
//! Every container and network a run makes carries the labels
//! `herald.chaos=1`, `herald.chaos.run=<run name>` and
//! `herald.chaos.pid=<pid of the harness>`.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// On everything a chaos run makes.
pub const LABEL: &str = "herald.chaos";
/// The run's name.
pub const LABEL_RUN: &str = "herald.chaos.run";
/// The pid of the harness process that made it.
pub const LABEL_PID: &str = "herald.chaos.pid";

/// Upper bound on one `docker` command (a `docker restart -t 15` included).
const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// The `--label` arguments for a resource of run `run`.
pub fn labels(run: &str) -> Vec<String> {
    vec![
        "--label".to_owned(),
        format!("{LABEL}=1"),
        "--label".to_owned(),
        format!("{LABEL_RUN}={run}"),
        "--label".to_owned(),
        format!("{LABEL_PID}={}", std::process::id()),
    ]
}

/// Runs `docker ARGS` and returns its standard output, trimmed; a failure
/// or a run longer than a minute is an error that carries standard error.
pub async fn docker<S: AsRef<str>>(args: &[S]) -> Result<String> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let child = Command::new("docker")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("running the docker CLI")?;
    let out = tokio::time::timeout(CLI_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            anyhow!(
                "docker {}: no answer within {CLI_TIMEOUT:?}",
                args.join(" ")
            )
        })??;
    stdout_of(&args, out)
}

/// `docker ARGS` from synchronous code (drop guards, stale cleanup).
fn docker_blocking(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running the docker CLI")?;
    stdout_of(args, out)
}

/// A finished `docker ARGS`: its standard output, trimmed, or an error that
/// carries its standard error.
fn stdout_of(args: &[&str], out: std::process::Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "docker {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Whether a Docker daemon answers (`Err` says why not).
pub fn docker_available() -> Result<String, String> {
    match docker_blocking(&["version", "--format", "{{.Server.Version}}"]) {
        Ok(version) if !version.is_empty() => Ok(version),
        Ok(_) => Err("docker version printed no server version".to_owned()),
        Err(e) => Err(format!("{e:#}")),
    }
}

fn pid_alive(pid: libc::pid_t) -> bool {
    // SAFETY: kill with signal 0 only checks whether the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes containers and networks of chaos runs whose harness process is
/// gone (a run killed hard cannot clean up after itself). Returns what was
/// removed.
pub fn remove_stale() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let format = format!("{{{{.Names}}}}\t{{{{.Label \"{LABEL_PID}\"}}}}");
    let containers = docker_blocking(&[
        "ps",
        "-a",
        "--filter",
        &format!("label={LABEL}"),
        "--format",
        &format,
    ])?;
    let networks = docker_blocking(&[
        "network",
        "ls",
        "--filter",
        &format!("label={LABEL}"),
        "--format",
        &format.replace(".Names", ".Name"),
    ])?;
    let stale = |line: &str| -> Option<String> {
        let (name, pid) = line.split_once('\t')?;
        let alive = pid.trim().parse::<libc::pid_t>().is_ok_and(pid_alive);
        (!alive && !name.is_empty()).then(|| name.to_owned())
    };
    for name in containers.lines().filter_map(stale) {
        if docker_blocking(&["rm", "-f", "-v", &name]).is_ok() {
            removed.push(format!("container {name}"));
        }
    }
    for name in networks.lines().filter_map(stale) {
        if docker_blocking(&["network", "rm", &name]).is_ok() {
            removed.push(format!("network {name}"));
        }
    }
    Ok(removed)
}

/// Everything one run made; removed by [`Guard::cleanup`] or on drop (so
/// also when the run fails or panics).
#[derive(Default)]
pub struct Guard {
    containers: Mutex<Vec<String>>,
    networks: Mutex<Vec<String>>,
    dirs: Mutex<Vec<PathBuf>>,
}

impl Guard {
    pub fn container(&self, name: &str) {
        self.containers
            .lock()
            .expect("guard lock")
            .push(name.to_owned());
    }

    pub fn network(&self, name: &str) {
        self.networks
            .lock()
            .expect("guard lock")
            .push(name.to_owned());
    }

    pub fn dir(&self, path: PathBuf) {
        self.dirs.lock().expect("guard lock").push(path);
    }

    /// Removes containers (paused ones too), then networks, then scratch
    /// directories. Idempotent; errors are printed, not returned.
    pub fn cleanup(&self) {
        let containers = std::mem::take(&mut *self.containers.lock().expect("guard lock"));
        if !containers.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(containers.iter().map(String::as_str));
            if let Err(e) = docker_blocking(&args) {
                // Some may never have been created.
                if !format!("{e:#}").contains("No such container") {
                    eprintln!("chaos: cleanup: {e:#}");
                }
            }
        }
        for network in std::mem::take(&mut *self.networks.lock().expect("guard lock")) {
            if let Err(e) = docker_blocking(&["network", "rm", &network]) {
                eprintln!("chaos: cleanup: {e:#}");
            }
        }
        for dir in std::mem::take(&mut *self.dirs.lock().expect("guard lock")) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// One container event (`docker events`).
#[derive(Debug, Clone)]
pub struct ContainerEvent {
    /// When the harness read it, since the run's origin.
    pub at: Duration,
    pub container: String,
    pub action: String,
    pub exit_code: Option<i64>,
}

/// `docker events` for one run's containers, collected in the background.
pub struct Events {
    _child: Child,
    seen: Arc<Mutex<Vec<ContainerEvent>>>,
}

impl Events {
    /// Starts watching; only events after this call are seen.
    pub async fn watch(run: &str, origin: Instant) -> Result<Events> {
        let mut child = Command::new("docker")
            .args([
                "events",
                "--filter",
                "type=container",
                "--filter",
                &format!("label={LABEL_RUN}={run}"),
                "--format",
                "{{json .}}",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("running docker events")?;
        let stdout = child.stdout.take().context("docker events stdout")?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let attrs = &v["Actor"]["Attributes"];
                let event = ContainerEvent {
                    at: origin.elapsed(),
                    container: attrs["name"].as_str().unwrap_or_default().to_owned(),
                    action: v["Action"]
                        .as_str()
                        .or(v["status"].as_str())
                        .unwrap_or_default()
                        .to_owned(),
                    exit_code: attrs["exitCode"].as_str().and_then(|c| c.parse().ok()),
                };
                sink.lock().expect("events lock").push(event);
            }
        });
        // Let the CLI subscribe before anything happens.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(Events {
            _child: child,
            seen,
        })
    }

    /// Everything seen so far.
    pub fn snapshot(&self) -> Vec<ContainerEvent> {
        self.seen.lock().expect("events lock").clone()
    }
}
