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
