//! Faults: what they are, the seeded plan, and how one is carried out.
//!
//! The plan is a function of the seed alone: first every allowed kind once,
//! in a seeded order, then kinds drawn at random; each with a seeded target
//! node, hold time and pause after it. A run carries out the plan in order
//! until its time budget is spent (but always the first round, so every
//! kind runs at least once), so two runs with one seed inject the same
//! faults in the same order.

use std::fmt;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::cluster::DockerCluster;

/// The kinds of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// `docker kill -s KILL`, held down, then `docker start`.
    Kill,
    /// `docker pause` (the cgroup freezer), held, then `docker unpause`.
    Pause,
    /// `docker network disconnect`, held, then `docker network connect`
    /// at the same address.
    Partition,
    /// `docker restart -t 15` (SIGTERM: the node drains) of every node in
    /// turn, waiting for convergence after each.
    RollingRestart,
}

impl FaultKind {
    pub const ALL: [FaultKind; 4] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::Partition,
        FaultKind::RollingRestart,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Partition => "partition",
            FaultKind::RollingRestart => "rolling-restart",
        }
    }

    /// Whether the node stays up but silent (its clients' sessions stall
    /// rather than break).
    pub fn stalls(self) -> bool {
        matches!(self, FaultKind::Pause | FaultKind::Partition)
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One planned fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub kind: FaultKind,
    /// Node indices: the target, or every node in restart order.
    pub targets: Vec<usize>,
    /// How long the fault is held before it is healed.
    pub hold: Duration,
    /// Quiet time after the fault healed and the cluster converged.
    pub after: Duration,
}

/// The first `count` faults of the plan for `seed` over `nodes` nodes.
pub fn plan(seed: u64, kinds: &[FaultKind], nodes: usize, count: usize) -> Vec<Planned> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut first_round = kinds.to_vec();
    first_round.shuffle(&mut rng);
    (0..count)
        .map(|i| {
            let kind = first_round
                .get(i)
                .copied()
                .unwrap_or_else(|| kinds[rng.random_range(0..kinds.len())]);
            let targets = if kind == FaultKind::RollingRestart {
                let mut order: Vec<usize> = (0..nodes).collect();
                order.shuffle(&mut rng);
                order
            } else {
                vec![rng.random_range(0..nodes)]
            };
            Planned {
                kind,
                targets,
                hold: Duration::from_millis(rng.random_range(5_000..=9_000)),
                after: Duration::from_millis(rng.random_range(2_000..=4_000)),
            }
        })
        .collect()
}

/// What happened when one fault (or one step of a rolling restart) was
/// carried out. Times are since the run's origin.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    pub kind: FaultKind,
    pub node: String,
    pub injected: Duration,
    pub healed: Option<Duration>,
    /// How long until the other nodes stopped placing the target (`None`:
    /// not within the hold time; not asked for rolling restarts).
    pub detected: Option<Duration>,
    /// How long after the heal until every node placed every node again;
    /// `Err` holds what was seen when the bound passed.
    pub converged: Option<std::result::Result<Duration, String>>,
    /// Failures of the harness's own docker commands.
    pub errors: Vec<String>,
}

impl FaultRecord {
    fn new(kind: FaultKind, node: &str, origin: Instant) -> FaultRecord {
        FaultRecord {
            kind,
            node: node.to_owned(),
            injected: origin.elapsed(),
            healed: None,
            detected: None,
            converged: None,
            errors: Vec::new(),
        }
    }

    /// When clients of the target may see a silent session (the node is
    /// up but unreachable), with margins.
    pub fn stall_window(&self) -> Option<(Duration, Duration)> {
        if !self.kind.stalls() {
            return None;
        }
        let end = self.healed.unwrap_or(Duration::MAX / 4) + Duration::from_secs(2);
        Some((
            self.injected.saturating_sub(Duration::from_millis(500)),
            end,
        ))
    }
}

/// The container exits a fault causes on purpose: (container, exit code).
pub type ExpectedExit = (String, i64);

/// Carries out one planned fault; returns one record per node it touched
/// and the exits it caused on purpose.
pub async fn execute(
    cluster: &DockerCluster,
    fault: &Planned,
    bound: Duration,
    origin: Instant,
) -> (Vec<FaultRecord>, Vec<ExpectedExit>) {
    let all: Vec<usize> = (0..cluster.nodes.len()).collect();
    let mut records = Vec::new();
    let mut exits = Vec::new();
    if fault.kind == FaultKind::RollingRestart {
        for &i in &fault.targets {
            let node = &cluster.nodes[i];
            let mut rec = FaultRecord::new(fault.kind, &node.id, origin);
            match cluster.restart(i).await {
                // SIGTERM: a clean drain ends with exit code 0.
                Ok(()) => exits.push((node.container.clone(), 0)),
                Err(e) => rec.errors.push(format!("{e:#}")),
            }
            rec.healed = Some(origin.elapsed());
            rec.converged = Some(cluster.wait_converged(&all, bound).await);
            if matches!(rec.converged, Some(Err(_))) {
                settle(cluster, &all).await;
            }
            records.push(rec);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tokio::time::sleep(fault.after).await;
        return (records, exits);
    }

    let i = fault.targets[0];
    let node = &cluster.nodes[i];
    let others: Vec<usize> = all.iter().copied().filter(|&j| j != i).collect();
    let mut rec = FaultRecord::new(fault.kind, &node.id, origin);
    let injected_at = Instant::now();
    let injected = match fault.kind {
        FaultKind::Kill => {
            let killed = cluster.kill(i).await;
            if killed.is_ok() {
                exits.push((node.container.clone(), 137));
            }
            killed
        }
        FaultKind::Pause => cluster.pause(i).await,
        FaultKind::Partition => cluster.disconnect(i).await,
        FaultKind::RollingRestart => unreachable!("handled above"),
    };
    rec.injected = origin.elapsed();
    if let Err(e) = injected {
        rec.errors.push(format!("inject: {e:#}"));
    }
    // The others should stop placing the target while it is away.
    if let Ok(took) = cluster.wait_converged(&others, fault.hold).await {
        rec.detected = Some(took);
    }
    let left = fault.hold.saturating_sub(injected_at.elapsed());
    tokio::time::sleep(left).await;
    let healed = match fault.kind {
        FaultKind::Kill => cluster.start_node(i).await,
        FaultKind::Pause => cluster.unpause(i).await,
        FaultKind::Partition => cluster.connect(i).await,
        FaultKind::RollingRestart => unreachable!("handled above"),
    };
    rec.healed = Some(origin.elapsed());
    if let Err(e) = healed {
        rec.errors.push(format!("heal: {e:#}"));
    }
    rec.converged = Some(cluster.wait_converged(&all, bound).await);
    if matches!(rec.converged, Some(Err(_))) {
        settle(cluster, &all).await;
    }
    records.push(rec);
    tokio::time::sleep(fault.after).await;
    (records, exits)
}

/// After a convergence bound was missed (a violation already): give the
/// cluster a while longer, so the next fault starts from a whole cluster
/// when it can.
async fn settle(cluster: &DockerCluster, all: &[usize]) {
    let _ = cluster.wait_converged(all, Duration::from_secs(30)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_is_a_function_of_the_seed_and_starts_with_every_kind() {
        let a = plan(7, &FaultKind::ALL, 3, 20);
        assert_eq!(a, plan(7, &FaultKind::ALL, 3, 20));
        assert_ne!(a, plan(8, &FaultKind::ALL, 3, 20));
        let mut first: Vec<FaultKind> = a[..4].iter().map(|p| p.kind).collect();
        first.sort();
        assert_eq!(first, FaultKind::ALL.to_vec());
        for p in &a {
            assert!(p.targets.iter().all(|&t| t < 3));
            let want = if p.kind == FaultKind::RollingRestart {
                3
            } else {
                1
            };
            assert_eq!(p.targets.len(), want);
        }
        let only = plan(1, &[FaultKind::Pause], 3, 5);
        assert!(only.iter().all(|p| p.kind == FaultKind::Pause));
    }
}
