//! A three-node Herald cluster in containers on a Docker network of its
//! own, with HAProxy in front, and the operations the faults are made of.
//!
//! - The network gets an explicit subnet (the one Docker itself picks for a
//!   new network) so that every container has a fixed address: a node cut
//!   off and connected again, or killed and started again, comes back at the
//!   same IP, as a host on a LAN does.
//! - Nodes are `n1`..`n3` (node id, host name and network alias); container
//!   names carry the run's name, so runs never collide. Certificates are made
//!   by the herald image itself (`herald cert`) into a scratch directory that
//!   the nodes mount read-only.
//! - Only 127.0.0.1 ports are published: HAProxy's client port (the
//!   workload's only way in) and each node's admin port (for `/v1/cluster`).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use cluster_tests::http;
use cluster_tests::node::{free_tcp_port, ring_owners, TEST_CLUSTER_FLAGS};
use cluster_tests::ws::WsConnect;

use super::docker::{docker, labels, Guard};

/// The nodes' user in the herald image (certificates must be readable by it).
const HERALD_UID: &str = "10001:10001";
/// Grace period of a draining node (SIGTERM) before it closes sessions.
pub const DRAIN_GRACE: Duration = Duration::from_secs(3);
/// How long `docker restart` waits after SIGTERM before it sends SIGKILL.
pub const STOP_TIMEOUT_SECS: u64 = 15;
/// Memory limit per node container: a leak under faults ends in an OOM
/// kill, which the run reports.
const NODE_MEMORY: &str = "1g";

/// One node of the cluster.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// Node id, host name and network alias: `n1`, `n2`, `n3`.
    pub id: String,
    pub container: String,
    pub ip: Ipv4Addr,
    /// The admin port, published on 127.0.0.1.
    pub admin: SocketAddr,
}

/// The containers of one run.
pub struct DockerCluster {
    pub network: String,
    pub nodes: Vec<NodeInfo>,
    pub lb_container: String,
    /// HAProxy's client port on 127.0.0.1: where the workload connects.
    pub lb_addr: SocketAddr,
    /// `--cluster-request-timeout` of every node.
    pub request_timeout: Duration,
    dir: PathBuf,
    herald_image: String,
}

/// How convergence ended: after how long, or with what was seen last.
pub type Converged = std::result::Result<Duration, String>;

impl DockerCluster {
    /// Makes the network, certificates, three nodes and HAProxy, and waits
    /// until every node places all three and a WebSocket through HAProxy
    /// answers a ping.
    pub async fn start(
        run: &str,
        herald_image: &str,
        haproxy_image: &str,
        request_timeout: Duration,
        guard: &Arc<Guard>,
    ) -> Result<DockerCluster> {
        let dir = std::env::temp_dir().join(run);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        guard.dir(dir.clone());
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs)?;
        // The herald image runs as uid 10001: it writes the certificates
        // (so its keys stay 0600 and readable by the nodes) into here.
        for d in [&dir, &certs] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777))?;
        }

        let network = run.to_owned();
        let base = create_network(&network, run, guard).await?;
        let ip = |offset: u32| Ipv4Addr::from(u32::from(base) + offset);
        let ids: Vec<String> = (1..=3).map(|i| format!("n{i}")).collect();
        let nodes: Vec<NodeInfo> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| NodeInfo {
                id: id.clone(),
                container: format!("{run}-{id}"),
                ip: ip(11 + i as u32),
                admin: SocketAddr::from(([127, 0, 0, 1], free_tcp_port())),
            })
            .collect();

        let certs_arg = format!("{}:/certs", path_str(&certs)?);
        herald_cert(herald_image, &certs_arg, &["ca", "--out", "/certs"]).await?;
        for node in &nodes {
            herald_cert(
                herald_image,
                &certs_arg,
                &[
                    "node",
                    "--ca",
                    "/certs",
                    "--name",
                    &node.id,
                    "--out",
                    "/certs",
                    "--san",
                    &node.container,
                ],
            )
            .await?;
        }

        let cluster = DockerCluster {
            network,
            nodes,
            lb_container: format!("{run}-lb"),
            lb_addr: SocketAddr::from(([127, 0, 0, 1], free_tcp_port())),
            request_timeout,
            dir,
            herald_image: herald_image.to_owned(),
        };
        for i in 0..cluster.nodes.len() {
            guard.container(&cluster.nodes[i].container);
            cluster.run_node(run, i).await?;
        }
        for i in 0..cluster.nodes.len() {
            cluster
                .wait_healthy(i, Duration::from_secs(30))
                .await
                .with_context(|| format!("node {} did not start", cluster.nodes[i].id))?;
        }

        let cfg = cluster.dir.join("haproxy.cfg");
        std::fs::write(&cfg, haproxy_config(&cluster.nodes))?;
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644))?;
        guard.container(&cluster.lb_container);
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            cluster.lb_container.clone(),
            "--hostname".into(),
            "lb".into(),
            "--network".into(),
            cluster.network.clone(),
            "--ip".into(),
            ip(10).to_string(),
            "-p".into(),
            format!("{}:7400", cluster.lb_addr),
            "-v".into(),
            format!("{}:/etc/haproxy/haproxy.cfg:ro", path_str(&cfg)?),
        ];
        args.extend(labels(run));
        args.push(haproxy_image.to_owned());
        docker(&args).await.context("starting HAProxy")?;

        let all: Vec<usize> = (0..cluster.nodes.len()).collect();
        cluster
            .wait_converged(&all, Duration::from_secs(30))
            .await
            .map_err(|last| anyhow!("the cluster did not form: {last}"))?;
        cluster.wait_lb(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// Waits until every node's `/readyz` answers 200 and HAProxy has had
    /// time to see it (two checks), so that the workload's connections
    /// spread over all nodes. `Err` says which node was not ready.
    pub async fn wait_ready(&self, timeout: Duration) -> std::result::Result<(), String> {
        let started = Instant::now();
        for node in &self.nodes {
            loop {
                match http::get(node.admin, "/readyz").await {
                    Ok(r) if r.status == 200 => break,
                    other if started.elapsed() > timeout => {
                        return Err(format!(
                            "{} /readyz not 200 within {timeout:?}: {}",
                            node.id,
                            match other {
                                Ok(r) => format!("{} {}", r.status, r.text()),
                                Err(e) => format!("{e:#}"),
                            }
                        ));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Ok(())
    }

    /// `docker run` for node `i` (first start only).
    async fn run_node(&self, run: &str, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            node.container.clone(),
            "--hostname".into(),
            node.id.clone(),
            "--network".into(),
            self.network.clone(),
            "--ip".into(),
            node.ip.to_string(),
            "--network-alias".into(),
            node.id.clone(),
            "-p".into(),
            format!("{}:7480", node.admin),
            "-v".into(),
            format!("{}:/certs:ro", path_str(&self.dir.join("certs"))?),
            "--memory".into(),
            NODE_MEMORY.into(),
            "--stop-timeout".into(),
            STOP_TIMEOUT_SECS.to_string(),
        ];
        args.extend(labels(run));
        args.push(self.herald_image.clone());
        let id = &node.id;
        let mut flags: Vec<String> = vec![
            "--node-id".into(),
            id.clone(),
            "--advertise".into(),
            id.clone(),
            "--cluster-ca".into(),
            "/certs/ca.pem".into(),
            "--cluster-cert".into(),
            format!("/certs/{id}.pem"),
            "--cluster-key".into(),
            format!("/certs/{id}-key.pem"),
            "--cluster-request-timeout".into(),
            humantime::format_duration(self.request_timeout).to_string(),
            "--node-drain-grace".into(),
            humantime::format_duration(DRAIN_GRACE).to_string(),
        ];
        for (flag, value) in TEST_CLUSTER_FLAGS {
            flags.push((*flag).to_owned());
            flags.push((*value).to_owned());
        }
        for other in self.nodes.iter().filter(|n| n.id != *id) {
            flags.push("--seed".into());
            flags.push(format!("{}:7402", other.id));
        }
        args.extend(flags);
        docker(&args)
            .await
            .with_context(|| format!("starting node {id}"))?;
        Ok(())
    }

    /// Node `i`'s `/v1/cluster`.
    pub async fn view(&self, i: usize) -> Result<Value> {
        let resp = http::get(self.nodes[i].admin, "/v1/cluster").await?;
        if resp.status != 200 {
            bail!("/v1/cluster answered {}", resp.status);
        }
        resp.json()
    }

    /// Waits until `/healthz` of node `i` answers 200.
    pub async fn wait_healthy(&self, i: usize, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            match http::get(self.nodes[i].admin, "/healthz").await {
                Ok(r) if r.status == 200 => return Ok(started.elapsed()),
                _ if started.elapsed() > timeout => {
                    bail!(
                        "/healthz of {} not 200 within {timeout:?}",
                        self.nodes[i].id
                    )
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Waits until every node in `live` answers `/v1/cluster` with exactly
    /// the ids of `live` as ring owners. `Err` holds the last views seen.
    pub async fn wait_converged(&self, live: &[usize], bound: Duration) -> Converged {
        let want: BTreeSet<String> = live.iter().map(|&i| self.nodes[i].id.clone()).collect();
        let started = Instant::now();
        loop {
            let mut last = Vec::new();
            let mut all = true;
            for &i in live {
                let owners = tokio::time::timeout(Duration::from_secs(2), self.view(i))
                    .await
                    .map_err(|_| anyhow!("no answer within 2s"))
                    .and_then(|r| r)
                    .map(|v| ring_owners(&v));
                match owners {
                    Ok(owners) => {
                        all &= owners == want;
                        last.push(format!("{}: ring {:?}", self.nodes[i].id, owners));
                    }
                    Err(e) => {
                        all = false;
                        last.push(format!("{}: {e:#}", self.nodes[i].id));
                    }
                }
            }
            if all {
                return Ok(started.elapsed());
            }
            if started.elapsed() > bound {
                return Err(format!(
                    "wanted ring {want:?} on every one of them; last seen: {}",
                    last.join("; ")
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until a WebSocket through HAProxy answers a ping.
    async fn wait_lb(&self, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            let attempt = async {
                let mut ws = WsConnect::new(self.lb_addr).connect().await?;
                ws.assert_alive().await?;
                ws.close().await
            };
            match attempt.await {
                Ok(()) => return Ok(()),
                Err(e) if started.elapsed() > timeout => {
                    return Err(e.context(format!("HAProxy at {} not serving", self.lb_addr)))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    // ---- the operations faults are made of ----

    pub async fn kill(&self, i: usize) -> Result<()> {
        docker(&["kill", "-s", "KILL", &self.nodes[i].container])
            .await
            .map(drop)
    }

    pub async fn start_node(&self, i: usize) -> Result<()> {
        docker(&["start", &self.nodes[i].container]).await.map(drop)
    }

    pub async fn pause(&self, i: usize) -> Result<()> {
        docker(&["pause", &self.nodes[i].container]).await.map(drop)
    }

    pub async fn unpause(&self, i: usize) -> Result<()> {
        docker(&["unpause", &self.nodes[i].container])
            .await
            .map(drop)
    }

    /// Cuts node `i` off the network: from its peers, HAProxy and the host.
    pub async fn disconnect(&self, i: usize) -> Result<()> {
        docker(&[
            "network",
            "disconnect",
            &self.network,
            &self.nodes[i].container,
        ])
        .await
        .map(drop)
    }

    /// Connects node `i` again, at its address and with its alias.
    pub async fn connect(&self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        docker(&[
            "network",
            "connect",
            "--ip",
            &node.ip.to_string(),
            "--alias",
            &node.id,
            &self.network,
            &node.container,
        ])
        .await
        .map(drop)
    }

    /// `docker restart`: SIGTERM (the node drains), SIGKILL after
    /// [`STOP_TIMEOUT_SECS`], then started again. Returns once it runs.
    pub async fn restart(&self, i: usize) -> Result<()> {
        docker(&[
            "restart",
            "-t",
            &STOP_TIMEOUT_SECS.to_string(),
            &self.nodes[i].container,
        ])
        .await
        .map(drop)
    }

    /// Every container of the run: the nodes, then HAProxy.
    pub fn containers(&self) -> Vec<String> {
        let mut all: Vec<String> = self.nodes.iter().map(|n| n.container.clone()).collect();
        all.push(self.lb_container.clone());
        all
    }

    /// `docker inspect` `.State` of a container.
    pub async fn state(&self, container: &str) -> Result<Value> {
        let text = docker(&["inspect", "--format", "{{json .State}}", container]).await?;
        Ok(serde_json::from_str(&text)?)
    }

    /// `docker logs` of a container (both streams) into `path`.
    pub fn save_logs(&self, container: &str, path: &Path) -> Result<()> {
        let file = std::fs::File::create(path)?;
        let status = std::process::Command::new("docker")
            .args(["logs", "--timestamps", container])
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .status()?;
        if !status.success() {
            bail!("docker logs {container} failed: {status}");
        }
        Ok(())
    }
}

/// `herald cert ARGS` in a throw-away container of the herald image.
async fn herald_cert(image: &str, mount: &str, args: &[&str]) -> Result<()> {
    let mut all = vec![
        "run", "--rm", "--user", HERALD_UID, "-v", mount, image, "cert",
    ];
    all.extend_from_slice(args);
    docker(&all).await.context("making certificates")?;
    Ok(())
}

/// Creates the run's network with the subnet Docker picks for it, made
/// explicit (only then may containers have fixed addresses). Returns the
/// subnet's base address.
async fn create_network(name: &str, run: &str, guard: &Guard) -> Result<Ipv4Addr> {
    let mut last_error = None;
    for _ in 0..5 {
        let mut args: Vec<String> = vec!["network".into(), "create".into()];
        args.extend(labels(run));
        args.push(name.to_owned());
        guard.network(name);
        docker(&args).await.context("creating the network")?;
        let subnet = docker(&[
            "network",
            "inspect",
            "--format",
            "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
            name,
        ])
        .await?;
        docker(&["network", "rm", name]).await?;
        let subnet = subnet
            .split_whitespace()
            .find(|s| s.parse::<Ipv4Addr>().is_err() && s.contains('.'))
            .ok_or_else(|| anyhow!("network {name} has no IPv4 subnet: {subnet:?}"))?
            .to_owned();
        let (base, prefix) = subnet
            .split_once('/')
            .ok_or_else(|| anyhow!("bad subnet {subnet:?}"))?;
        let base: Ipv4Addr = base.parse()?;
        let prefix: u8 = prefix.parse()?;
        if prefix > 26 {
            bail!("subnet {subnet} is too small for a run");
        }
        let gateway = Ipv4Addr::from(u32::from(base) + 1);
        let mut args: Vec<String> = vec![
            "network".into(),
            "create".into(),
            "--subnet".into(),
            subnet.clone(),
            "--gateway".into(),
            gateway.to_string(),
        ];
        args.extend(labels(run));
        args.push(name.to_owned());
        // Another network may have taken the subnet in between: try again.
        match docker(&args).await {
            Ok(_) => return Ok(base),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| anyhow!("no network")))
}

/// HAProxy in front of the nodes: WebSocket-aware, new connections only to
/// nodes whose `/readyz` is 200 (checked on the admin port twice a second),
/// least connections first. Addresses are fixed, so no resolver is needed.
fn haproxy_config(nodes: &[NodeInfo]) -> String {
    let mut servers = String::new();
    for n in nodes {
        servers.push_str(&format!("    server {} {}:7400\n", n.id, n.ip));
    }
    format!(
        "# Generated by the chaos harness (cluster-tests/src/chaos/cluster.rs).
global
    log stdout format raw local0 info
    maxconn 4000

defaults
    mode http
    log global
    option httplog
    option dontlognull
    option redispatch
    retries 2
    timeout connect 2s
    timeout client 65s
    timeout server 65s
    timeout tunnel 1h
    timeout client-fin 5s
    timeout server-fin 5s
    timeout http-request 10s
    timeout queue 5s

frontend clients
    bind :7400
    default_backend nodes

backend nodes
    balance leastconn
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host herald
    http-check expect status 200
    default-server check port 7480 inter 500ms fastinter 250ms downinter 1s fall 2 rise 2
{servers}
# For the image's own HEALTHCHECK (GET /healthz on 8404).
frontend stats
    bind :8404
    monitor-uri /healthz
"
    )
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| anyhow!("path is not UTF-8: {}", path.display()))
}
