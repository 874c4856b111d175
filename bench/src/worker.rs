//! Child processes: the parent re-executes this binary as `herald-bench
//! worker --spec JSON`, and the two talk in lines.
//!
//! Child to parent, on stdout: `TAG JSON` lines (`READY`, `ALIVE`,
//! `RESULT`); anything for people goes to stderr. Parent to child, on stdin:
//! `TAG JSON` commands. A child whose stdin closes stops, and every child
//! has its own deadline, so none outlives a crashed parent for long.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::group::GroupSpec;
use crate::idle::IdleGroupSpec;

/// What a child process is asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum WorkerSpec {
    /// Subscribers (fan-out or topics).
    Group(GroupSpec),
    Idle(IdleGroupSpec),
}

/// The parent's handle on one child.
pub struct Worker {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Worker {
    /// Starts a child running `spec` on a runtime with `threads` worker threads.
    pub fn spawn(name: String, spec: &WorkerSpec, threads: usize) -> Result<Self> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let mut child = Command::new(exe)
            .arg("worker")
            .arg("--threads")
            .arg(threads.max(1).to_string())
            .arg("--spec")
            .arg(serde_json::to_string(spec)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stdin = child.stdin.take().context("child stdin")?;
        let stdout = child.stdout.take().context("child stdout")?;
        Ok(Worker {
            name,
            child,
            stdin: Some(stdin),
            stdout: BufReader::new(stdout).lines(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends a command line.
    pub async fn send(&mut self, tag: &str, value: &impl Serialize) -> Result<()> {
        let line = format!("{tag} {}\n", serde_json::to_string(value)?);
        let stdin = self.stdin.as_mut().context("child stdin already closed")?;
        stdin
            .write_all(line.as_bytes())
            .await
            .with_context(|| format!("writing to {}", self.name))?;
        stdin.flush().await?;
        Ok(())
    }

    /// Waits (at most `timeout`) for the child's next `tag` line.
    pub async fn expect<T: DeserializeOwned>(&mut self, tag: &str, timeout: Duration) -> Result<T> {
        let name = self.name.clone();
        tokio::time::timeout(timeout, async {
            loop {
                let Some(line) = self.stdout.next_line().await? else {
                    bail!("{name} exited before sending {tag}");
                };
                match line.split_once(' ') {
                    Some((t, json)) if t == tag => {
                        return serde_json::from_str(json)
                            .with_context(|| format!("{name} sent a bad {tag} line"));
                    }
                    _ => eprintln!("[{name}] {line}"),
                }
            }
        })
        .await
        .with_context(|| format!("timed out waiting for {tag} from {}", self.name))?
    }

    /// Closes the child's stdin and waits for it to exit (killing it after `timeout`).
    pub async fn finish(mut self, timeout: Duration) -> Result<()> {
        drop(self.stdin.take());
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!("{} exited with {status}", self.name);
                }
                Ok(())
            }
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("{} did not exit in time; killed", self.name)
            }
        }
    }
}

/// The child's side: commands from stdin, reports to stdout.
pub struct ParentLink {
    stdin: Lines<BufReader<tokio::io::Stdin>>,
}

impl ParentLink {
    pub fn new() -> Self {
        ParentLink {
            stdin: BufReader::new(tokio::io::stdin()).lines(),
        }
    }

    /// Writes a `TAG JSON` line to the parent.
    pub fn report(&self, tag: &str, value: &impl Serialize) -> Result<()> {
        use std::io::Write;
        let line = format!("{tag} {}\n", serde_json::to_string(value)?);
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(line.as_bytes())?;
        stdout.flush()?;
        Ok(())
    }

    /// The next command as `(tag, json)`; `None` when the parent went away.
    pub async fn command(&mut self) -> Result<Option<(String, String)>> {
        let Some(line) = self.stdin.next_line().await? else {
            return Ok(None);
        };
        let (tag, json) = line.split_once(' ').unwrap_or((line.as_str(), "null"));
        Ok(Some((tag.to_string(), json.to_string())))
    }
}

/// Splits `total` into `parts` near-equal shares: `(offset, count)` pairs.
pub fn shares(total: usize, parts: usize) -> Vec<(usize, usize)> {
    let parts = parts.max(1);
    let mut out = Vec::with_capacity(parts);
    let mut offset = 0;
    for i in 0..parts {
        let count = total / parts + usize::from(i < total % parts);
        out.push((offset, count));
        offset += count;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::shares;

    #[test]
    fn shares_cover_everything() {
        assert_eq!(shares(10, 3), vec![(0, 4), (4, 3), (7, 3)]);
        assert_eq!(shares(2, 4), vec![(0, 1), (1, 1), (2, 0), (2, 0)]);
    }
}
