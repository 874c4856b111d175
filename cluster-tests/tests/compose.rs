//! The compose stack (docker-compose.yml, docs/compose.md) end to end: every
//! image it runs made sure of (the herald and certs images of the current
//! sources, built with scripts/compose-build.sh when missing or stale, as
//! for the chaos run), the stack started with `docker compose` (or Compose
//! v1's `docker-compose`) under a project of its own with every published
//! port moved to a free one, then `scripts/compose-smoke.py` against it.
//! The stack is always taken down (`down -v --remove-orphans`), after its
//! logs are printed when anything failed.
//!
//! Skipped (with a message) only when no Docker daemon answers or neither
//! Compose is installed. `HERALD_CHAOS_BUILD` (`stale`, `missing`, `never`)
//! applies here too.

// The chaos harness's images module, and the docker module it uses (as
// `super::docker`), without the rest of the harness.
#[path = "../src/chaos/docker.rs"]
#[allow(dead_code)] // the rest of it is the harness's
mod docker;
#[path = "../src/chaos/images.rs"]
mod images;

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The variables docker-compose.yml (and the smoke script) read for the
/// published ports.
const PORT_VARIABLES: [&str; 6] = [
    "LB_PORT",
    "LB_STATS_PORT",
    "PROMETHEUS_PORT",
    "N1_ADMIN_PORT",
    "N2_ADMIN_PORT",
    "N3_ADMIN_PORT",
];

const UP_TIMEOUT: Duration = Duration::from_secs(120);
const SMOKE_TIMEOUT: Duration = Duration::from_secs(180);
const LOGS_TIMEOUT: Duration = Duration::from_secs(60);
const DOWN_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn compose_stack_passes_the_smoke_check() {
    if let Err(why) = docker::docker_available() {
        eprintln!("SKIPPED: the compose test needs a Docker daemon: {why}");
        return;
    }
    let Some(compose) = compose_command() else {
        eprintln!("SKIPPED: the compose test needs `docker compose` or `docker-compose`");
        return;
    };
    let started = Instant::now();
    let root = images::repo_root();
    let project = format!("herald-compose-test-{}", std::process::id());
    let dir = root.join("target/compose-test").join(&project);
    std::fs::create_dir_all(&dir).expect("artifacts directory");

    let policy = std::env::var("HERALD_CHAOS_BUILD").map_or(images::BuildPolicy::IfStale, |p| {
        images::BuildPolicy::parse(&p)
            .unwrap_or_else(|| panic!("HERALD_CHAOS_BUILD={p:?}: never, missing or stale"))
    });
    let (herald, others) = images::COMPOSE_IMAGES.split_first().expect("images");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (run_images, notes) = runtime
        .block_on(images::ensure(
            herald,
            others,
            policy,
            dir.parent().expect("parent"),
        ))
        .unwrap_or_else(|e| panic!("images for docker-compose.yml: {e:#}"));
    for note in &notes {
        println!("compose: {note}");
    }
    let images_took = started.elapsed();

    // The compose file names the images by their `:local` tags; where the
    // image of the current sources has another tag, an override says so.
    let mut files = vec![root.join("docker-compose.yml")];
    let mut overrides = String::from("services:\n");
    for (image, run) in images::COMPOSE_IMAGES.iter().zip(&run_images) {
        if image != run {
            for service in services(image) {
                overrides.push_str(&format!("  {service}:\n    image: {run}\n"));
            }
        }
    }
    if overrides.lines().count() > 1 {
        let path = dir.join("images.override.yml");
        std::fs::write(&path, &overrides).expect("writing the override file");
        files.push(path);
    }

    let ports = free_ports();
    let env: Vec<(String, String)> = PORT_VARIABLES
        .iter()
        .zip(&ports)
        .map(|(name, port)| ((*name).to_owned(), port.to_string()))
        .collect();
    println!("compose: project {project}, ports {env:?}, images {run_images:?}");

    let stack = Stack {
        compose,
        project,
        files,
        env,
        root,
        dir,
    };
    let up_started = Instant::now();
    let (status, out) = stack.compose(&["up", "-d", "--no-build"], "up", UP_TIMEOUT);
    println!("{out}");
    assert!(
        status.is_some_and(|s| s.success()),
        "compose up: {}",
        describe(status, UP_TIMEOUT)
    );
    let up_took = up_started.elapsed();

    let smoke_started = Instant::now();
    let mut smoke = Command::new("python3");
    smoke
        .arg("scripts/compose-smoke.py")
        .current_dir(&stack.root)
        .envs(stack.env.iter().map(|(k, v)| (k, v)));
    let (status, out) = stack.run(&mut smoke, "smoke", SMOKE_TIMEOUT);
    println!("{out}");
    assert!(
        status.is_some_and(|s| s.success()),
        "scripts/compose-smoke.py: {}",
        describe(status, SMOKE_TIMEOUT)
    );
    println!(
        "compose: passed; images {:.1?}, up {:.1?}, smoke {:.1?} (then down)",
        images_took,
        up_took,
        smoke_started.elapsed()
    );
}

/// The services of docker-compose.yml that run `image`.
fn services(image: &str) -> &'static [&'static str] {
    match image {
        images::HERALD_IMAGE => &["n1", "n2", "n3"],
        images::CERTS_IMAGE => &["certs"],
        images::HAPROXY_IMAGE => &["haproxy"],
        images::PROMETHEUS_IMAGE => &["prometheus"],
        _ => panic!("{image} is not in docker-compose.yml"),
    }
}

/// `docker compose` when the v2 plugin answers, else Compose v1's
/// `docker-compose`, else `None`.
fn compose_command() -> Option<Vec<String>> {
    [&["docker", "compose"][..], &["docker-compose"][..]]
        .into_iter()
        .find(|cmd| {
            Command::new(cmd[0])
                .args(&cmd[1..])
                .arg("version")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|cmd| cmd.iter().map(|s| (*s).to_owned()).collect())
}

/// A free port on 127.0.0.1 for each published port, all different (the
/// listeners are held until all are chosen).
fn free_ports() -> Vec<u16> {
    let listeners: Vec<TcpListener> = PORT_VARIABLES
        .iter()
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("binding a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}

fn describe(status: Option<ExitStatus>, limit: Duration) -> String {
    match status {
        Some(status) => format!("failed ({status})"),
        None => format!("killed after {limit:?}"),
    }
}

/// One compose project; taken down on drop (so also when the test fails or
/// panics), after printing its logs if the test is failing.
struct Stack {
    compose: Vec<String>,
    project: String,
    files: Vec<PathBuf>,
    env: Vec<(String, String)>,
    root: PathBuf,
    /// Where each command's output is kept.
    dir: PathBuf,
}

impl Stack {
    /// `compose -p PROJECT -f FILE.. ARGS`, with the port variables.
    fn compose(&self, args: &[&str], name: &str, limit: Duration) -> (Option<ExitStatus>, String) {
        let mut cmd = Command::new(&self.compose[0]);
        cmd.args(&self.compose[1..]).args(["-p", &self.project]);
        for file in &self.files {
            cmd.arg("-f").arg(file);
        }
        cmd.args(args)
            .current_dir(&self.root)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        self.run(&mut cmd, name, limit)
    }

    /// Runs `cmd` with its output into `dir/NAME.log`, killed after `limit`;
    /// returns its exit status (`None` when killed or not started) and its
    /// output.
    fn run(&self, cmd: &mut Command, name: &str, limit: Duration) -> (Option<ExitStatus>, String) {
        let path = self.dir.join(format!("{name}.log"));
        let status = run_bounded(cmd, &path, limit).unwrap_or_else(|e| {
            eprintln!("compose: running {cmd:?}: {e}");
            None
        });
        (status, std::fs::read_to_string(&path).unwrap_or_default())
    }
}

fn run_bounded(
    cmd: &mut Command,
    log: &Path,
    limit: Duration,
) -> std::io::Result<Option<ExitStatus>> {
    let out = File::create(log)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()?;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if failed {
            let (_, logs) = self.compose(&["logs", "--no-color"], "logs", LOGS_TIMEOUT);
            println!(
                "---- logs of {} ----\n{logs}\n---- end of logs ----",
                self.project
            );
        }
        let started = Instant::now();
        let (status, out) = self.compose(&["down", "-v", "--remove-orphans"], "down", DOWN_TIMEOUT);
        if status.is_some_and(|s| s.success()) {
            println!("compose: down in {:.1?}", started.elapsed());
            if !failed {
                let _ = std::fs::remove_dir_all(&self.dir);
            }
        } else {
            eprintln!(
                "compose: down {} for project {}:\n{out}",
                describe(status, DOWN_TIMEOUT),
                self.project
            );
        }
        if failed {
            println!("compose: command output kept in {}", self.dir.display());
        }
    }
}
