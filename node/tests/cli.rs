//! The `herald` command line as a user meets it. Having an integration test
//! here also makes `cargo test --workspace` build the binary that
//! `cluster-tests` starts.

use std::process::Command;

fn herald() -> Command {
    Command::new(env!("CARGO_BIN_EXE_herald"))
}

#[test]
fn help_lists_the_contract_flags() {
    let out = herald().arg("--help").output().expect("run herald --help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--node-id",
        "--client-listen",
        "--admin-listen",
        "--cluster-listen",
        "--gossip-listen",
        "--advertise",
        "--seed",
        "--cluster-name",
        "--cluster-ca",
        "--cluster-cert",
        "--cluster-key",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}:\n{text}");
    }
}

#[test]
fn unknown_config_key_is_refused_with_its_name() {
    let dir = std::env::temp_dir().join(format!("herald-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[client]\nlisten = \"127.0.0.1:0\"\nlisen = 1\n").expect("write");
    let out = herald()
        .arg("--config")
        .arg(&file)
        .output()
        .expect("run herald");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lisen"), "stderr does not name the key: {err}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[test]
fn doctor_passes_a_fitting_host_and_fails_a_taken_port() {
    let admin = format!("127.0.0.1:{}", free_port());
    let client = format!("127.0.0.1:{}", free_port());
    let doctor = || {
        herald()
            .args([
                "--client-max-connections",
                "100",
                "--client-listen",
                &client,
            ])
            .args(["--admin-listen", &admin, "doctor"])
            .output()
            .expect("run herald doctor")
    };
    let ok = doctor();
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{text}");
    for item in [
        "fd-limit",
        "somaxconn",
        "tcp-buffers",
        "memory-limit",
        "history-memory",
        "selinux",
        "client-port",
    ] {
        assert!(text.contains(item), "no {item} line:\n{text}");
    }
    let holder = std::net::TcpListener::bind(&client).expect("hold the client port");
    let taken = doctor();
    drop(holder);
    let text = String::from_utf8_lossy(&taken.stdout);
    assert!(!taken.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("fail  client-port") && l.contains("fix:")),
        "{text}"
    );
}

#[test]
fn doctor_fails_when_the_fd_limit_is_too_low() {
    let out = herald()
        .args(["--client-max-connections", "100000000", "doctor"])
        .output()
        .expect("run herald doctor");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.lines().any(|l| l.starts_with("fail  fd-limit")),
        "{text}"
    );
}
