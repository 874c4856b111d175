//! The short chaos run (docs/chaos.md): a three-node cluster in containers
//! behind HAProxy, each kind of fault once while publishers and subscribers
//! run, then the checker. About 70 s once the images exist; missing or
//! stale images are built first with scripts/compose-build.sh (docs/chaos.md
//! has the costs).
//!
//! Skipped (with a message) only when no Docker daemon answers. Set
//! `HERALD_CHAOS_SEED` to run another seed, and `HERALD_CHAOS_BUILD` to
//! `missing` (build only missing images) or `never` (use them as they are).

#[path = "../src/chaos/mod.rs"]
mod chaos;

use std::time::Duration;

#[test]
fn short_chaos_run_finds_no_violation() {
    if let Err(why) = chaos::docker_available() {
        eprintln!("SKIPPED: the chaos run needs a Docker daemon: {why}");
        return;
    }
    let seed = std::env::var("HERALD_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    // No time budget: the first round of the plan alone, one of each kind.
    let mut config = chaos::Config::new(seed, Duration::ZERO);
    if let Ok(policy) = std::env::var("HERALD_CHAOS_BUILD") {
        config.build = chaos::BuildPolicy::parse(&policy)
            .unwrap_or_else(|| panic!("HERALD_CHAOS_BUILD={policy:?}: never, missing or stale"));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let outcome = runtime
        .block_on(chaos::run(config))
        .unwrap_or_else(|e| panic!("the chaos harness failed: {e:#}"));
    println!("{}", outcome.report);
    assert!(
        outcome.harness_errors.is_empty(),
        "chaos run {}: docker commands of the harness failed: {:?}",
        outcome.run,
        outcome.harness_errors
    );
    assert!(
        outcome.passed(),
        "chaos run {} (seed {seed}) found {} violation(s); report and node logs in {}:\n{}",
        outcome.run,
        outcome.violations.len(),
        outcome.artifacts.display(),
        outcome.report
    );
}
