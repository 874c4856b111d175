//! Configuration: flag > environment > TOML file > default, seen through
//! what the node does; unknown TOML keys refuse the start; the open-file
//! limits are logged at start.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cluster_tests::node::{free_tcp_port, free_udp_port};
use cluster_tests::{herald_bin, Node, NodeBuilder};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A fresh directory for this test's files.
fn temp_dir(label: &str) -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "herald-config-{}-{}-{label}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn write_file(dir: &Path, name: &str, text: &str) -> Result<String> {
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path.to_str().context("utf-8 path")?.to_owned())
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A config file setting the three observed keys (and a node id, which the
/// harness's `--node-id` flag always overrides).
fn config_toml(listen: SocketAddr, max_bytes: usize, vnodes: usize) -> String {
    format!(
        "[node]\nid = \"from-file\"\ndrain_grace = \"2s\"\n\n\
         [client]\nlisten = \"{listen}\"\nmax_message_bytes = {max_bytes}\n\n\
         [cluster]\nvnodes = {vnodes}\n"
    )
}

/// `(node_id, ring.vnodes)` from `/v1/cluster`.
async fn cluster_view(node: &Node) -> Result<(String, u64)> {
    let view = node.admin_get("/v1/cluster").await?.json()?;
    let id = view["node_id"].as_str().unwrap_or_default().to_owned();
    let vnodes = view["ring"]["vnodes"]
        .as_u64()
        .with_context(|| format!("no ring.vnodes: {view}"))?;
    Ok((id, vnodes))
}

/// The status of a `POST /v1/publish/size.t` that declares `length` body
/// bytes but sends none: a declared length over the limit is refused (413)
/// before any body is read.
async fn declared_length_status(addr: SocketAddr, length: usize) -> Result<u16> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let head = format!(
            "POST /v1/publish/size.t HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 1024];
        while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await?;
            ensure!(n > 0, "closed before a response head");
            raw.extend_from_slice(&buf[..n]);
        }
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or(raw.len());
        Ok(cluster_tests::http::parse_head(&raw[..end])?.0)
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .context("no response to a declared-length publish")?
}

/// The node's message limit is exactly `limit`: a body of `limit` bytes is
/// published, one more byte is 413.
async fn check_limit(node: &Node, limit: usize) -> Result<()> {
    let body = vec![b'x'; limit];
    let resp = node
        .http_publish("size.t", Some("application/octet-stream"), &body, &[])
        .await?;
    ensure!(
        resp.status == 200,
        "a body of {limit} bytes: {} {}",
        resp.status,
        resp.text()
    );
    let status = declared_length_status(node.client_addr(), limit + 1).await?;
    ensure!(
        status == 413,
        "a body of {} bytes: HTTP {status}",
        limit + 1
    );
    Ok(())
}

/// Nothing listens at `addr`.
async fn check_not_listening(addr: SocketAddr, what: &str) -> Result<()> {
    let attempt = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await;
    ensure!(
        !matches!(attempt, Ok(Ok(_))),
        "something listens at {addr} ({what})"
    );
    Ok(())
}

#[tokio::test]
async fn defaults_apply_without_file_env_or_flag() -> Result<()> {
    let node = Node::start(&[]).await?;
    let (_, vnodes) = cluster_view(&node).await?;
    ensure!(vnodes == 160, "default vnodes: {vnodes}");
    // 1 MiB exactly is allowed; one byte more is not.
    check_limit(&node, 1024 * 1024).await
}

#[tokio::test]
async fn the_file_beats_the_defaults() -> Result<()> {
    let dir = temp_dir("file")?;
    let from_file = loopback(free_tcp_port());
    let file = write_file(&dir, "herald.toml", &config_toml(from_file, 1000, 11))?;
    let node = NodeBuilder::new("n1")
        .client_listen_elsewhere(from_file)
        .args(["--config", file.as_str()])
        .start()
        .await?;
    let (id, vnodes) = cluster_view(&node).await?;
    ensure!(vnodes == 11, "vnodes from the file: {vnodes}");
    ensure!(id == "n1", "--node-id beats the file's node.id: {id}");
    check_limit(&node, 1000).await?;
    // The client listener is where the file put it.
    let mut ws = node.ws().await?;
    ws.assert_alive().await?;
    ws.close().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test]
async fn the_environment_beats_the_file() -> Result<()> {
    let dir = temp_dir("env")?;
    let from_file = loopback(free_tcp_port());
    let from_env = loopback(free_tcp_port());
    let file = write_file(&dir, "herald.toml", &config_toml(from_file, 1000, 11))?;
    let node = NodeBuilder::new("n1")
        .client_listen_elsewhere(from_env)
        .args(["--config", file.as_str()])
        .env("HERALD_CLIENT_LISTEN", &from_env.to_string())
        .env("HERALD_CLIENT_MAX_MESSAGE_BYTES", "2000")
        .env("HERALD_CLUSTER_VNODES", "22")
        .env("HERALD_NODE_ID", "from-env")
        .start()
        .await?;
    let (id, vnodes) = cluster_view(&node).await?;
    ensure!(vnodes == 22, "vnodes: {vnodes} (file 11, env 22)");
    ensure!(id == "n1", "--node-id beats HERALD_NODE_ID: {id}");
    check_limit(&node, 2000).await?;
    let mut ws = node.ws().await?;
    ws.assert_alive().await?;
    ws.close().await?;
    check_not_listening(from_file, "the file's client.listen").await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test]
async fn a_flag_beats_the_environment_and_the_file() -> Result<()> {
    let dir = temp_dir("flag")?;
    let from_file = loopback(free_tcp_port());
    let from_env = loopback(free_tcp_port());
    let file = write_file(&dir, "herald.toml", &config_toml(from_file, 1000, 11))?;
    // The harness passes --client-listen with its own port.
    let node = NodeBuilder::new("n1")
        .args([
            "--config",
            file.as_str(),
            "--client-max-message-bytes",
            "3000",
            "--cluster-vnodes",
            "33",
        ])
        .env("HERALD_CLIENT_LISTEN", &from_env.to_string())
        .env("HERALD_CLIENT_MAX_MESSAGE_BYTES", "2000")
        .env("HERALD_CLUSTER_VNODES", "22")
        .start()
        .await?;
    let (_, vnodes) = cluster_view(&node).await?;
    ensure!(vnodes == 33, "vnodes: {vnodes} (file 11, env 22, flag 33)");
    check_limit(&node, 3000).await?;
    let mut ws = node.ws().await?;
    ws.assert_alive().await?;
    ws.close().await?;
    check_not_listening(from_file, "the file's client.listen").await?;
    check_not_listening(from_env, "HERALD_CLIENT_LISTEN").await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test]
async fn herald_config_names_the_file_and_config_flag_beats_it() -> Result<()> {
    let dir = temp_dir("which-file")?;
    let by_env = write_file(&dir, "env.toml", "[cluster]\nvnodes = 44\n")?;
    let by_flag = write_file(&dir, "flag.toml", "[cluster]\nvnodes = 55\n")?;
    let node = NodeBuilder::new("n1")
        .env("HERALD_CONFIG", &by_env)
        .start()
        .await?;
    let (_, vnodes) = cluster_view(&node).await?;
    ensure!(vnodes == 44, "HERALD_CONFIG: vnodes {vnodes}");
    drop(node);
    let node = NodeBuilder::new("n1")
        .env("HERALD_CONFIG", &by_env)
        .args(["--config", by_flag.as_str()])
        .start()
        .await?;
    let (_, vnodes) = cluster_view(&node).await?;
    ensure!(vnodes == 55, "--config over HERALD_CONFIG: vnodes {vnodes}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Spawns `herald` with these arguments (and fresh listen ports, so a node
/// that does start cannot collide with anything), stdout and stderr to
/// `log`, and `pre_exec` run in the child before exec.
fn spawn_herald(
    args: &[&str],
    log: &Path,
    pre_exec: Option<fn() -> std::io::Result<()>>,
) -> Result<Child> {
    spawn_herald_with(args, log, pre_exec, None)
}

fn spawn_herald_with(
    args: &[&str],
    log: &Path,
    pre_exec: Option<fn() -> std::io::Result<()>>,
    env: Option<(&str, &str)>,
) -> Result<Child> {
    let mut cmd = Command::new(herald_bin()?);
    cmd.args(["--node-id", "raw"])
        .args(["--client-listen", &loopback(free_tcp_port()).to_string()])
        .args(["--admin-listen", &loopback(free_tcp_port()).to_string()])
        .args(["--cluster-listen", &loopback(free_udp_port()).to_string()])
        .args(["--gossip-listen", &loopback(free_udp_port()).to_string()])
        .args(args)
        .stdin(Stdio::null());
    let file = std::fs::File::create(log)?;
    cmd.stdout(file.try_clone()?).stderr(file);
    for (key, _) in std::env::vars() {
        if key.starts_with("HERALD_") {
            cmd.env_remove(key);
        }
    }
    if let Some((key, value)) = env {
        cmd.env(key, value);
    }
    // SAFETY: prctl and setrlimit are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            match pre_exec {
                Some(f) => f(),
                None => Ok(()),
            }
        });
    }
    cmd.spawn().context("spawn herald")
}

/// Waits (bounded) for the child to exit; kills it if it does not.
async fn wait_child(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("herald still running after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn unknown_toml_keys_refuse_the_start_and_are_named() -> Result<()> {
    let dir = temp_dir("unknown")?;
    for (key, toml) in [
        ("lisen", "[client]\nlisen = \"127.0.0.1:1\"\n"),
        ("clinet", "[clinet]\nlisten = \"127.0.0.1:1\"\n"),
        ("bogus_key", "bogus_key = 1\n"),
        ("max_mesages", "[history]\nmax_mesages = 5\n"),
        ("drain_grce", "[node]\nid = \"x\"\ndrain_grce = \"1s\"\n"),
    ] {
        let file = write_file(&dir, &format!("{key}.toml"), toml)?;
        let log = dir.join(format!("{key}.log"));
        let mut child = spawn_herald(&["--config", &file], &log, None)?;
        let status = wait_child(&mut child, Duration::from_secs(10)).await?;
        let output = std::fs::read_to_string(&log)?;
        ensure!(
            !status.success(),
            "herald started with unknown key {key}: {status}\n{output}"
        );
        ensure!(
            output.contains(key),
            "the error for unknown key {key} does not name it:\n{output}"
        );
        ensure!(
            !output.contains("herald is ready"),
            "herald got as far as ready with unknown key {key}:\n{output}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test]
async fn invalid_values_refuse_the_start_and_say_where() -> Result<()> {
    let dir = temp_dir("invalid")?;
    let bad_duration = write_file(&dir, "duration.toml", "[node]\ndrain_grace = \"soon\"\n")?;
    let zero = write_file(&dir, "zero.toml", "[client]\nmax_message_bytes = 0\n")?;
    let missing = dir.join("missing.toml");
    let missing = missing.to_str().context("utf-8 path")?;
    // (what, arguments, environment, what the error must name)
    type Case<'a> = (&'a str, Vec<&'a str>, Option<(&'a str, &'a str)>, &'a str);
    let cases: [Case; 7] = [
        (
            "flag",
            vec!["--client-idle-timeout", "soon"],
            None,
            "client-idle-timeout",
        ),
        (
            "env",
            vec![],
            Some(("HERALD_CLIENT_MAX_MESSAGE_BYTES", "lots")),
            "max-message-bytes",
        ),
        (
            "toml duration",
            vec!["--config", &bad_duration],
            None,
            "drain_grace",
        ),
        (
            "toml zero",
            vec!["--config", &zero],
            None,
            "client.max_message_bytes",
        ),
        (
            "write delay",
            vec!["--client-write-delay", "2s"],
            None,
            "client.write_delay",
        ),
        (
            "history budget below one message",
            vec!["--history-max-bytes", "1000"],
            None,
            "history.max_bytes",
        ),
        (
            "missing file",
            vec!["--config", missing],
            None,
            "missing.toml",
        ),
    ];
    for (what, args, env, named) in cases {
        let log = dir.join(format!("{}.log", what.replace(' ', "-")));
        let mut child = match env {
            None => spawn_herald(&args, &log, None)?,
            Some((key, value)) => spawn_herald_env(&args, &log, (key, value))?,
        };
        let status = wait_child(&mut child, Duration::from_secs(10)).await?;
        let output = std::fs::read_to_string(&log)?;
        ensure!(
            !status.success(),
            "herald started with an invalid {what}: {status}\n{output}"
        );
        ensure!(
            output.contains(named),
            "the error for the invalid {what} does not name {named}:\n{output}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// [`spawn_herald`] with one environment variable set.
fn spawn_herald_env(args: &[&str], log: &Path, env: (&str, &str)) -> Result<Child> {
    spawn_herald_with(args, log, None, Some(env))
}

#[tokio::test]
async fn durations_in_the_file_are_humantime() -> Result<()> {
    let dir = temp_dir("grace")?;
    let file = write_file(&dir, "grace.toml", "[node]\ndrain_grace = \"600ms\"\n")?;
    let mut node = NodeBuilder::new("n1")
        .args(["--config", file.as_str()])
        .start()
        .await?;
    let mut ws = node.ws().await?;
    ws.assert_alive().await?;
    let signalled = Instant::now();
    node.sigterm()?;
    // Closed with 1001 after the file's 600 ms, not the default 10 s.
    ws.expect_close(1001, Duration::from_secs(4)).await?;
    let took = signalled.elapsed();
    ensure!(
        took >= Duration::from_millis(550) && took < Duration::from_secs(3),
        "1001 after {took:?} with drain_grace = 600ms"
    );
    drop(ws);
    let status = node.wait_exit(Duration::from_secs(5)).await?;
    ensure!(status.code() == Some(0), "exit status {status}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// This process's RLIMIT_NOFILE (soft, hard); children inherit it.
fn nofile() -> (libc::rlim_t, libc::rlim_t) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes to a valid rlimit.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(rc, 0, "getrlimit");
    (limit.rlim_cur, limit.rlim_max)
}

/// Drops ANSI escape sequences (colours in the text log).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test]
async fn the_open_file_limits_are_logged_at_start() -> Result<()> {
    let (soft, hard) = nofile();
    let node = Node::start(&[]).await?;
    let log = strip_ansi(&node.log());
    let line = log
        .lines()
        .find(|l| l.contains("open file limit"))
        .with_context(|| format!("no open-file-limit line in the log:\n{log}"))?;
    // The node raises its soft limit to the hard one.
    for field in [
        format!("soft_before={soft}"),
        format!("soft={hard}"),
        format!("hard={hard}"),
    ] {
        ensure!(
            line.split_whitespace().any(|w| w == field),
            "the log line lacks {field}: {line}"
        );
    }
    Ok(())
}

/// In the child: soft 400, hard 800 open files.
fn lower_nofile() -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: 400,
        rlim_max: 800,
    };
    // SAFETY: setrlimit reads a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The JSON log events of a run, once `herald is ready` is among them.
async fn wait_ready_events(child: &mut Child, log: &Path) -> Result<Vec<Value>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let events: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if events.iter().any(|e| e["message"] == "herald is ready") {
            return Ok(events);
        }
        if let Some(status) = child.try_wait()? {
            bail!("herald exited with {status}:\n{text}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("herald not ready within 10 s:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_low_soft_limit_is_raised_to_the_hard_one_and_both_are_logged() -> Result<()> {
    if nofile().1 < 800 {
        eprintln!("note: the hard open-file limit is below 800; skipping");
        return Ok(());
    }
    let dir = temp_dir("rlimit")?;
    for (max_connections, warns) in [("1000", true), ("100", false)] {
        let log = dir.join(format!("herald-{max_connections}.log"));
        let mut child = spawn_herald(
            &[
                "--log-format",
                "json",
                "--client-max-connections",
                max_connections,
            ],
            &log,
            Some(lower_nofile),
        )?;
        let events = wait_ready_events(&mut child, &log).await?;
        let limits = events
            .iter()
            .find(|e| e["message"] == "open file limit")
            .with_context(|| format!("no open file limit event in {events:?}"))?;
        ensure!(
            limits["soft_before"] == 400 && limits["soft"] == 800 && limits["hard"] == 800,
            "logged limits: {limits}"
        );
        let warning = events.iter().find(|e| {
            e["level"] == "WARN"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("open file limit is below"))
        });
        ensure!(
            warning.is_some() == warns,
            "max_connections {max_connections} with 800 files: warning {warning:?}"
        );
        // Stop it the way an operator would.
        let pid = libc::pid_t::try_from(child.id())?;
        // SAFETY: kill has no memory-safety preconditions; pid is our child.
        ensure!(unsafe { libc::kill(pid, libc::SIGTERM) } == 0, "kill");
        let status = wait_child(&mut child, Duration::from_secs(5)).await?;
        ensure!(status.code() == Some(0), "exit status {status}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
