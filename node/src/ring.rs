//! Placement: which node owns a topic, by a consistent-hash ring over the
//! members that are ready and reachable.
//!
//! Every node computes the ring from the same inputs (gossiped members,
//! filtered to those it has a live QUIC connection with), so views agree
//! once membership has converged; while they differ, an owner refuses
//! topics it does not own and the sender retries (see `shard`).

use std::collections::BTreeMap;

use consistent_hash_ring::{Ring, RingBuilder};

use crate::owner::NodeId;

/// One computed placement. Cheap to share (`Arc<Placement>`); a new one is
/// built on every membership change.
#[derive(Clone)]
pub struct Placement {
    /// Node ids as `String`: the ring hashes keys and nodes with
    /// `std::hash::Hash`, and `str`/`String` hash alike (`Arc<str>` too, but
    /// one key type everywhere keeps that from ever drifting).
    ring: Ring<String>,
    members: Vec<NodeId>,
    vnodes: usize,
    /// Rises with every change, for logs and `/v1/cluster`.
    pub version: u64,
}

impl std::fmt::Debug for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placement")
            .field("members", &self.members)
            .field("vnodes", &self.vnodes)
            .field("version", &self.version)
            .finish()
    }
}

impl Placement {
    pub fn new(members: impl IntoIterator<Item = NodeId>, vnodes: usize, version: u64) -> Self {
        let mut members: Vec<NodeId> = members.into_iter().collect();
        members.sort();
        members.dedup();
        let ring = RingBuilder::default()
            .vnodes(vnodes.max(1))
            .nodes_iter(members.iter().map(|m| m.to_string()))
            .build();
        Placement {
            ring,
            members,
            vnodes,
            version,
        }
    }

    /// The node that owns `topic`; `None` when no member is placed.
    pub fn owner(&self, topic: &str) -> Option<&str> {
        self.ring.try_get(topic).map(String::as_str)
    }

    /// True when `node` owns `topic`.
    pub fn owns(&self, node: &str, topic: &str) -> bool {
        self.owner(topic) == Some(node)
    }

    pub fn members(&self) -> &[NodeId] {
        &self.members
    }

    pub fn contains(&self, node: &str) -> bool {
        self.members.iter().any(|m| &**m == node)
    }

    pub fn vnodes(&self) -> usize {
        self.vnodes
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Each member's share of the hash space (they sum to 1).
    pub fn shares(&self) -> BTreeMap<String, f64> {
        let mut shares: BTreeMap<String, f64> =
            self.members.iter().map(|m| (m.to_string(), 0.0)).collect();
        for range in self.ring.resident_ranges() {
            let width = (*range.keys().end() - *range.keys().start()) as f64 + 1.0;
            if let Some(share) = shares.get_mut(range.node().as_str()) {
                *share += width / 18_446_744_073_709_551_616.0;
            }
        }
        shares
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<NodeId> {
        names.iter().map(|n| NodeId::from(*n)).collect()
    }

    #[test]
    fn an_empty_placement_owns_nothing() {
        let placement = Placement::new(Vec::new(), 160, 0);
        assert_eq!(placement.owner("a.b"), None);
        assert!(placement.shares().is_empty());
    }

    #[test]
    fn placement_ignores_member_order_and_duplicates() {
        let a = Placement::new(ids(&["n1", "n2", "n3"]), 160, 1);
        let b = Placement::new(ids(&["n3", "n1", "n2", "n1"]), 160, 2);
        for i in 0..1000 {
            let topic = format!("t.{i}");
            assert_eq!(a.owner(&topic), b.owner(&topic));
        }
    }

    #[test]
    fn shares_sum_to_one_and_are_balanced_with_160_vnodes() {
        let placement = Placement::new(ids(&["n1", "n2", "n3", "n4", "n5"]), 160, 1);
        let shares = placement.shares();
        let total: f64 = shares.values().sum();
        assert!((total - 1.0).abs() < 1e-9, "{total}");
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for i in 0..100_000 {
            let topic = format!("topic.{i}");
            *counts
                .entry(placement.owner(&topic).expect("owner"))
                .or_default() += 1;
        }
        for (node, count) in counts {
            assert!((15_000..=25_000).contains(&count), "{node}: {count}");
        }
    }

    #[test]
    fn a_join_moves_only_topics_to_the_new_member() {
        let before = Placement::new(ids(&["n1", "n2", "n3"]), 160, 1);
        let after = Placement::new(ids(&["n1", "n2", "n3", "n4"]), 160, 2);
        let mut moved = 0;
        for i in 0..10_000 {
            let topic = format!("t.{i}");
            let (old, new) = (before.owner(&topic), after.owner(&topic));
            if old != new {
                assert_eq!(new, Some("n4"));
                moved += 1;
            }
        }
        assert!((1_500..=3_500).contains(&moved), "{moved} moved");
    }
}
