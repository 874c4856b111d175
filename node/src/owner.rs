//! The topic owner: the one place a topic's messages are sequenced.
//!
//! For each topic it owns, the owner keeps the epoch and the last seq, the
//! bounded history, and the interest table: which nodes have subscribers
//! (plain, or members of which queue groups). Wildcard interest is kept per
//! pattern and consulted for every topic. The owner decides, per message,
//! which nodes get it and which node serves each matching group; it never
//! sees a session. In a cluster, other nodes reach it across the network with
//! the same requests.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use protocol::{Codec, Data, GroupName, MsgView, Pattern, PatternIndex, Topic, TraceParent};

use crate::history::{History, Retained};
use crate::metrics::METRICS;

/// A node's id, as gossiped and shown in `/v1/cluster`.
pub type NodeId = Arc<str>;

/// A message its owner has sequenced: what every subscriber receives. The
/// encoded form is made at most once per codec and shared by all sessions.
#[derive(Debug)]
pub struct Sequenced {
    pub topic: Topic,
    pub seq: u64,
    pub epoch: Arc<str>,
    pub data: Data,
    pub trace: Option<TraceParent>,
    pub tracestate: Option<String>,
    /// When the owner sequenced it, µs since the Unix epoch.
    pub sequenced_at_us: u64,
    encoded: [OnceLock<Bytes>; 2],
}

impl Sequenced {
    pub fn new(
        topic: Topic,
        seq: u64,
        epoch: Arc<str>,
        data: Data,
        trace: Option<TraceParent>,
        tracestate: Option<String>,
    ) -> Sequenced {
        Sequenced {
            topic,
            seq,
            epoch,
            data,
            trace,
            tracestate,
            sequenced_at_us: crate::metrics::now_micros(),
            encoded: [OnceLock::new(), OnceLock::new()],
        }
    }

    /// The same message as sequenced elsewhere at `at_us`.
    pub fn sequenced_at(mut self, at_us: u64) -> Sequenced {
        self.sequenced_at_us = at_us;
        self
    }

    /// The `msg` object for `codec`, encoded on first use.
    pub fn encoded(&self, codec: Codec) -> &Bytes {
        let slot = match codec {
            Codec::Json => &self.encoded[0],
            Codec::Msgpack => &self.encoded[1],
        };
        slot.get_or_init(|| {
            codec.encode_msg(&MsgView {
                topic: self.topic.as_str(),
                seq: self.seq,
                data: &self.data,
                trace: self.trace.as_ref(),
                tracestate: self.tracestate.as_deref(),
            })
        })
    }
}

/// A subscription as interest is counted: a pattern and, for a queue group,
/// its name (a group is keyed by both). The same type crosses the wire.
pub type SubKey = protocol::peer::InterestKey;

/// Where one message goes: a node, and the groups that node serves for it.
#[derive(Debug)]
pub struct Route {
    pub node: NodeId,
    pub groups: Vec<SubKey>,
}

/// What a subscriber learns when its exact subscription starts.
#[derive(Debug)]
pub struct Snapshot {
    pub seq: u64,
    pub epoch: Arc<str>,
    /// Present when `since` was given: does `replay` hold every message
    /// after it?
    pub recovered: Option<bool>,
    pub replay: Vec<Arc<Sequenced>>,
}

#[derive(Debug, Clone)]
pub struct OwnerLimits {
    pub history_messages: usize,
    pub history_age: Duration,
    /// What this owner's histories may hold together
    /// ([`crate::history::retained_size`]), if bounded; past it the oldest
    /// messages go.
    pub history_bytes: Option<usize>,
}

/// Nodes with interest in one key; groups pick among them in turn.
#[derive(Debug, Default)]
struct Nodes {
    nodes: Vec<NodeId>,
    next: usize,
}

impl Nodes {
    fn add(&mut self, node: &NodeId) {
        if !self.nodes.contains(node) {
            self.nodes.push(node.clone());
        }
    }

    fn remove(&mut self, node: &NodeId) {
        self.nodes.retain(|n| n != node);
    }

    fn pick(&mut self) -> Option<&NodeId> {
        if self.nodes.is_empty() {
            return None;
        }
        self.next = (self.next + 1) % self.nodes.len();
        self.nodes.get(self.next)
    }
}

#[derive(Debug)]
struct OwnedTopic {
    seq: u64,
    epoch: Arc<str>,
    history: History,
    /// Exact-topic interest: plain (`None`) and per group.
    interest: HashMap<Option<GroupName>, Nodes>,
    /// Nodes this epoch's messages went to from its start or from when
    /// their exact interest was recorded (which marks them), or through a
    /// wildcard: they need no catching up (see
    /// [`TopicOwner::rejoin_interest`]). At most one entry per member.
    reached: Vec<NodeId>,
}

impl OwnedTopic {
    fn new() -> OwnedTopic {
        METRICS.topics.inc();
        OwnedTopic {
            seq: 0,
            epoch: new_epoch(),
            history: History::default(),
            interest: HashMap::new(),
            reached: Vec::new(),
        }
    }

    /// (node, key) pairs of this topic's interest table.
    fn interest_entries(&self) -> usize {
        self.interest.values().map(|nodes| nodes.nodes.len()).sum()
    }

    fn reach(&mut self, node: &NodeId) {
        if !self.reached.contains(node) {
            self.reached.push(node.clone());
        }
    }
}

/// Owner state for the topics of one shard.
#[derive(Debug)]
pub struct TopicOwner {
    limits: OwnerLimits,
    topics: HashMap<Topic, OwnedTopic>,
    wildcards: HashMap<SubKey, Nodes>,
    /// The keys of `wildcards` by pattern token, so that sequencing a
    /// message looks up the wildcard interest that matches it.
    wildcard_index: PatternIndex<SubKey>,
    /// What every topic's history holds, together.
    retained: Retained,
    /// With `history_bytes`, every retained message (topic, epoch, seq), in
    /// the order it was sequenced: the oldest goes first when `retained` is
    /// over `history_bytes`. Entries of messages that already left (by count,
    /// age or a new epoch) are skipped then, and dropped in bulk once they
    /// outnumber the live ones.
    order: VecDeque<(Topic, Arc<str>, u64)>,
}

/// Entries `order` may hold beyond twice the retained messages before it is
/// cleaned: cleaning is linear, so this keeps it rare.
const ORDER_SLACK: usize = 4096;

/// Applies a change in what histories hold to an owner's total and to the
/// node's gauges.
fn account(total: &mut Retained, (messages, bytes): (i64, i64)) {
    total.messages = total.messages.saturating_add_signed(messages as isize);
    total.bytes = total.bytes.saturating_add_signed(bytes as isize);
    METRICS.history_messages.add(messages);
    METRICS.history_bytes.add(bytes);
}

impl TopicOwner {
    pub fn new(limits: OwnerLimits) -> TopicOwner {
        TopicOwner {
            limits,
            topics: HashMap::new(),
            wildcards: HashMap::new(),
            wildcard_index: PatternIndex::new(),
            retained: Retained::default(),
            order: VecDeque::new(),
        }
    }

    fn topic_mut(&mut self, topic: &Topic) -> &mut OwnedTopic {
        self.topics
            .entry(topic.clone())
            .or_insert_with(OwnedTopic::new)
    }

    /// Sequences a message and says where it goes.
    pub fn publish(
        &mut self,
        topic: Topic,
        data: Data,
        trace: Option<TraceParent>,
        tracestate: Option<String>,
        now: Instant,
    ) -> (Arc<Sequenced>, Vec<Route>) {
        let limits = self.limits.clone();
        // Not `topic_mut`: the wildcard fields are borrowed alongside.
        let owned = self
            .topics
            .entry(topic.clone())
            .or_insert_with(OwnedTopic::new);
        owned.seq += 1;
        let message = Arc::new(Sequenced::new(
            topic,
            owned.seq,
            owned.epoch.clone(),
            data,
            trace,
            tracestate,
        ));
        let before = owned.history.retained();
        owned.history.push(
            message.clone(),
            now,
            limits.history_messages,
            limits.history_age,
        );
        account(&mut self.retained, owned.history.retained() - before);
        if limits.history_bytes.is_some() {
            self.order
                .push_back((message.topic.clone(), message.epoch.clone(), message.seq));
        }

        let mut routes: Vec<Route> = Vec::new();
        fn route_for<'a>(routes: &'a mut Vec<Route>, node: &NodeId) -> &'a mut Route {
            let at = match routes.iter().position(|r| r.node == *node) {
                Some(at) => at,
                None => {
                    routes.push(Route {
                        node: node.clone(),
                        groups: Vec::new(),
                    });
                    routes.len() - 1
                }
            };
            &mut routes[at]
        }
        let topic = &message.topic;
        for (group, nodes) in owned.interest.iter_mut() {
            match group {
                None => nodes.nodes.iter().for_each(|n| {
                    route_for(&mut routes, n);
                }),
                Some(group) => {
                    if let Some(node) = nodes.pick() {
                        route_for(&mut routes, node).groups.push(SubKey {
                            pattern: Pattern::from(topic.clone()),
                            group: Some(group.clone()),
                        });
                    }
                }
            }
        }
        // Exact interest marked its nodes reached when it was recorded;
        // only wildcard routes can reach a node for the first time.
        let wildcards = &mut self.wildcards;
        self.wildcard_index.for_each_match(topic, |key| {
            let Some(nodes) = wildcards.get_mut(key) else {
                return;
            };
            match &key.group {
                None => nodes.nodes.iter().for_each(|n| {
                    route_for(&mut routes, n);
                    owned.reach(n);
                }),
                Some(_) => {
                    if let Some(node) = nodes.pick() {
                        route_for(&mut routes, node).groups.push(key.clone());
                        owned.reach(node);
                    }
                }
            }
        });
        self.evict_over_budget();
        (message, routes)
    }

    /// Drops the oldest retained messages, whatever their topic, until the
    /// histories fit `history_bytes`.
    fn evict_over_budget(&mut self) {
        let Some(limit) = self.limits.history_bytes else {
            return;
        };
        while self.retained.bytes > limit {
            let Some((topic, epoch, seq)) = self.order.pop_front() else {
                break;
            };
            let Some(owned) = self.topics.get_mut(&topic) else {
                continue;
            };
            // Older entries are gone, so a live one is its topic's oldest.
            if !Arc::ptr_eq(&owned.epoch, &epoch) || owned.history.first_seq() != Some(seq) {
                continue;
            }
            let before = owned.history.retained();
            owned.history.pop_oldest();
            account(&mut self.retained, owned.history.retained() - before);
            METRICS.history_evicted.inc();
        }
        self.clean_order();
    }

    /// Drops the entries of `order` whose messages left, once they
    /// outnumber the retained ones: linear, so rare enough to be O(1) per
    /// message.
    fn clean_order(&mut self) {
        if self.order.len() > 2 * self.retained.messages + ORDER_SLACK {
            let topics = &self.topics;
            self.order.retain(|(topic, epoch, seq)| {
                topics.get(topic).is_some_and(|owned| {
                    Arc::ptr_eq(&owned.epoch, epoch)
                        && owned.history.first_seq().is_some_and(|first| first <= *seq)
                })
            });
            // Give back what a flood grew.
            if self.order.capacity() > 4 * self.order.len() + ORDER_SLACK {
                self.order.shrink_to(2 * self.order.len() + ORDER_SLACK);
            }
        }
    }

    /// Records that `node` has subscribers for `key`. For an exact topic,
    /// `node` counts as caught up with the epoch from here on: it is sent
    /// every later message, and a subscription through here starts from
    /// the topic's current `seq`.
    pub fn add_interest(&mut self, node: &NodeId, key: &SubKey) {
        match key.pattern.as_topic() {
            Some(topic) => {
                let owned = self.topic_mut(&topic);
                owned.reach(node);
                owned
                    .interest
                    .entry(key.group.clone())
                    .or_default()
                    .add(node)
            }
            None => self
                .wildcards
                .entry(key.clone())
                .or_insert_with(|| {
                    self.wildcard_index.insert(&key.pattern, key.clone());
                    Nodes::default()
                })
                .add(node),
        }
    }

    /// Records `node`'s interest in `key` again after the ring moved or a
    /// link came back, and returns the retained messages of the topic's
    /// current epoch that were never routed to `node`. A new owner may
    /// sequence a topic before every node with subscribers has told it of
    /// them; those subscribers then get the new epoch from its start
    /// instead of a gap. Only plain exact interest catches up (a queue
    /// group's messages already went to one member elsewhere, and a
    /// wildcard starts live), and only a node this epoch never reached, so
    /// nothing arrives twice.
    pub fn rejoin_interest(&mut self, node: &NodeId, key: &SubKey) -> Vec<Arc<Sequenced>> {
        let catch_up = match (key.pattern.as_topic(), &key.group) {
            (Some(topic), None) => {
                let owned = self.topic_mut(&topic);
                if owned.reached.contains(node) {
                    Vec::new()
                } else {
                    owned.history.after(0).cloned().collect()
                }
            }
            _ => Vec::new(),
        };
        self.add_interest(node, key);
        catch_up
    }

    /// Records that `node` no longer has subscribers for `key`.
    pub fn remove_interest(&mut self, node: &NodeId, key: &SubKey) {
        match key.pattern.as_topic() {
            Some(topic) => {
                if let Some(owned) = self.topics.get_mut(&topic) {
                    if let Some(nodes) = owned.interest.get_mut(&key.group) {
                        nodes.remove(node);
                        if nodes.nodes.is_empty() {
                            owned.interest.remove(&key.group);
                        }
                    }
                }
            }
            None => {
                if let Some(nodes) = self.wildcards.get_mut(key) {
                    nodes.remove(node);
                    if nodes.nodes.is_empty() {
                        self.wildcards.remove(key);
                        self.wildcard_index.remove(&key.pattern, key);
                    }
                }
            }
        }
    }

    /// Forgets every interest of `node` (it left, or its connection broke:
    /// it registers again when it is back).
    pub fn forget_node(&mut self, node: &NodeId) {
        for owned in self.topics.values_mut() {
            owned.interest.retain(|_, nodes| {
                nodes.remove(node);
                !nodes.nodes.is_empty()
            });
        }
        let index = &mut self.wildcard_index;
        self.wildcards.retain(|key, nodes| {
            nodes.remove(node);
            let keep = !nodes.nodes.is_empty();
            if !keep {
                index.remove(&key.pattern, key);
            }
            keep
        });
    }

    /// Starts a new epoch for every topic, keeping interest. After this node
    /// was cut off from a peer, that peer may have sequenced some of these
    /// topics meanwhile: continuing the old epoch would let a subscriber
    /// resume "recovered" past messages it never saw.
    pub fn new_epochs(&mut self) {
        let held = self.retained;
        account(&mut self.retained, Retained::default() - held);
        for owned in self.topics.values_mut() {
            owned.history = History::default();
            owned.seq = 0;
            owned.epoch = new_epoch();
            // Interest is kept: those nodes get the new epoch from its start.
            owned.reached.clear();
            let interested: Vec<NodeId> = owned
                .interest
                .values()
                .flat_map(|nodes| nodes.nodes.iter().cloned())
                .collect();
            for node in &interested {
                owned.reach(node);
            }
        }
    }

    /// Drops the topics `keep` says this node no longer owns: their new
    /// owner starts a new epoch, so subscribers learn of the gap.
    pub fn retain_topics(&mut self, mut keep: impl FnMut(&Topic) -> bool) {
        let before = self.topics.len();
        let mut dropped = Retained::default();
        self.topics.retain(|topic, owned| {
            let kept = keep(topic);
            if !kept {
                dropped += owned.history.retained();
            }
            kept
        });
        account(&mut self.retained, Retained::default() - dropped);
        METRICS.topics.add(-((before - self.topics.len()) as i64));
    }

    /// The state a new exact subscriber starts from, with the messages it
    /// missed when it gave `since` (and the epoch it knew).
    pub fn snapshot(&mut self, topic: &Topic, since: Option<u64>, epoch: Option<&str>) -> Snapshot {
        let owned = self.topic_mut(topic);
        let mut snapshot = Snapshot {
            seq: owned.seq,
            epoch: owned.epoch.clone(),
            recovered: None,
            replay: Vec::new(),
        };
        let Some(since) = since else {
            return snapshot;
        };
        let same_epoch = epoch.is_none_or(|e| *e == *owned.epoch);
        if !same_epoch || since > owned.seq {
            snapshot.recovered = Some(false);
            return snapshot;
        }
        snapshot.replay = owned.history.after(since).cloned().collect();
        let complete = match snapshot.replay.first() {
            Some(first) => first.seq == since + 1,
            None => since == owned.seq,
        };
        snapshot.recovered = Some(complete);
        snapshot
    }

    /// Ages out history and forgets topics with no history and no interest
    /// (their next message starts a new epoch). Returns
    /// [`TopicOwner::interest_entries`] after it, counted on the way.
    pub fn sweep(&mut self, now: Instant) -> usize {
        let age = self.limits.history_age;
        let before = self.topics.len();
        // One gauge update per sweep, not per topic.
        let (mut held, mut left) = (Retained::default(), Retained::default());
        let mut interest = 0;
        self.topics.retain(|_, owned| {
            held += owned.history.retained();
            owned.history.expire(now, age);
            left += owned.history.retained();
            interest += owned.interest_entries();
            !owned.history.is_empty() || !owned.interest.is_empty()
        });
        account(&mut self.retained, left - held);
        METRICS.topics.add(-((before - self.topics.len()) as i64));
        // Without publishes, this is what lets go of expired messages'
        // entries (and the topics they name).
        self.clean_order();
        interest + self.wildcard_interest_entries()
    }

    pub fn topic_count(&self) -> usize {
        self.topics.len()
    }

    /// (node, key) interest pairs held, exact and wildcard.
    pub fn interest_entries(&self) -> usize {
        let exact: usize = self.topics.values().map(OwnedTopic::interest_entries).sum();
        exact + self.wildcard_interest_entries()
    }

    fn wildcard_interest_entries(&self) -> usize {
        self.wildcards.values().map(|n| n.nodes.len()).sum()
    }
}

impl Drop for TopicOwner {
    fn drop(&mut self) {
        let held = self.retained;
        account(&mut self.retained, Retained::default() - held);
        METRICS.topics.add(-(self.topics.len() as i64));
    }
}

/// A fresh epoch: unique per topic incarnation across restarts and nodes.
fn new_epoch() -> Arc<str> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(nanos);
    Arc::from(format!("{:016x}", hasher.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> TopicOwner {
        TopicOwner::new(OwnerLimits {
            history_messages: 3,
            history_age: Duration::from_secs(60),
            history_bytes: None,
        })
    }

    fn key(pattern: &str, group: Option<&str>) -> SubKey {
        SubKey {
            pattern: Pattern::parse(pattern).expect("pattern"),
            group: group.map(|g| GroupName::parse(g).expect("group")),
        }
    }

    fn topic(s: &str) -> Topic {
        Topic::parse(s).expect("topic")
    }

    fn publish(owner: &mut TopicOwner, t: &str) -> (Arc<Sequenced>, Vec<Route>) {
        owner.publish(topic(t), Data::null(), None, None, Instant::now())
    }

    #[test]
    fn seq_rises_by_one_per_topic() {
        let mut o = owner();
        assert_eq!(publish(&mut o, "a").0.seq, 1);
        assert_eq!(publish(&mut o, "a").0.seq, 2);
        assert_eq!(publish(&mut o, "b").0.seq, 1);
    }

    #[test]
    fn routes_only_to_interested_nodes_and_one_per_group() {
        let mut o = owner();
        let (n1, n2): (NodeId, NodeId) = (Arc::from("n1"), Arc::from("n2"));
        assert!(publish(&mut o, "a.b").1.is_empty());
        o.add_interest(&n1, &key("a.b", None));
        o.add_interest(&n1, &key("a.*", Some("g")));
        o.add_interest(&n2, &key("a.*", Some("g")));
        let mut group_nodes = Vec::new();
        for _ in 0..4 {
            let routes = publish(&mut o, "a.b").1;
            let with_group: Vec<&Route> = routes.iter().filter(|r| !r.groups.is_empty()).collect();
            assert_eq!(with_group.len(), 1, "exactly one node serves the group");
            group_nodes.push(with_group[0].node.clone());
            assert!(routes.iter().any(|r| r.node == n1));
        }
        assert!(group_nodes.contains(&n1) && group_nodes.contains(&n2));
        o.remove_interest(&n1, &key("a.b", None));
        o.remove_interest(&n1, &key("a.*", Some("g")));
        o.remove_interest(&n2, &key("a.*", Some("g")));
        assert!(publish(&mut o, "a.b").1.is_empty());
    }

    #[test]
    fn wildcard_interest_routes_through_the_index_and_is_forgotten() {
        let mut o = owner();
        let (n1, n2): (NodeId, NodeId) = (Arc::from("n1"), Arc::from("n2"));
        o.add_interest(&n1, &key("a.*", None));
        o.add_interest(&n2, &key("a.>", None));
        o.add_interest(&n2, &key("b.*", None));
        o.add_interest(&n1, &key("c", Some("g")));
        o.add_interest(&n2, &key("c", Some("g")));
        o.add_interest(&n2, &key("c", Some("g")));
        assert_eq!(o.interest_entries(), 5, "a repeated add is one entry");
        assert_eq!(o.sweep(Instant::now()), 5, "the sweep counts the same");
        o.remove_interest(&n1, &key("c", Some("g")));
        o.remove_interest(&n2, &key("c", Some("g")));
        assert_eq!(o.interest_entries(), 3);
        let nodes = |routes: Vec<Route>| {
            let mut nodes: Vec<NodeId> = routes.into_iter().map(|r| r.node).collect();
            nodes.sort();
            nodes
        };
        assert_eq!(nodes(publish(&mut o, "a.x").1), [n1.clone(), n2.clone()]);
        assert_eq!(nodes(publish(&mut o, "a.x.y").1), vec![n2.clone()]);
        o.forget_node(&n2);
        assert_eq!(nodes(publish(&mut o, "a.x").1), vec![n1.clone()]);
        assert!(publish(&mut o, "b.x").1.is_empty());
        assert_eq!(o.interest_entries(), 1);
        o.remove_interest(&n1, &key("a.*", None));
        assert!(o.wildcards.is_empty() && o.wildcard_index.is_empty());
        assert_eq!(o.interest_entries(), 0);
    }

    #[test]
    fn snapshot_replays_after_since() {
        let mut o = owner();
        let t = topic("t");
        let epoch = o.snapshot(&t, None, None).epoch;
        for _ in 0..5 {
            publish(&mut o, "t");
        }
        let s = o.snapshot(&t, Some(3), Some(&epoch));
        assert_eq!((s.seq, s.recovered), (5, Some(true)));
        assert_eq!(
            s.replay.iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![4, 5]
        );
        // History holds 3..=5: since 1 misses seq 2.
        let s = o.snapshot(&t, Some(1), Some(&epoch));
        assert_eq!(s.recovered, Some(false));
        assert_eq!(s.replay.len(), 3);
        assert_eq!(o.snapshot(&t, Some(5), Some(&epoch)).recovered, Some(true));
        assert_eq!(o.snapshot(&t, Some(6), Some(&epoch)).recovered, Some(false));
        let other = o.snapshot(&t, Some(4), Some("other"));
        assert_eq!((other.recovered, other.replay.len()), (Some(false), 0));
    }

    #[test]
    fn a_rejoining_node_catches_up_only_on_what_never_reached_it() {
        let mut o = owner();
        let (n1, n2, n3): (NodeId, NodeId, NodeId) =
            (Arc::from("n1"), Arc::from("n2"), Arc::from("n3"));
        o.add_interest(&n1, &key("t", None));
        for _ in 0..4 {
            publish(&mut o, "t");
        }
        let seqs = |m: Vec<Arc<Sequenced>>| m.iter().map(|m| m.seq).collect::<Vec<_>>();
        // n2 never heard of: what history holds of the epoch (3 of 4).
        assert_eq!(seqs(o.rejoin_interest(&n2, &key("t", None))), [2, 3, 4]);
        // Now it gets every message; registering again replays nothing.
        let (_, routes) = publish(&mut o, "t");
        assert!(routes.iter().any(|r| r.node == n2));
        assert!(o.rejoin_interest(&n2, &key("t", None)).is_empty());
        // n1 was routed every message.
        assert!(o.rejoin_interest(&n1, &key("t", None)).is_empty());
        // Queue groups and wildcards never catch up.
        assert!(o.rejoin_interest(&n3, &key("t", Some("g"))).is_empty());
        assert!(o.rejoin_interest(&n3, &key("t.*", None)).is_empty());
        // n3 was routed a message (for its group): nothing to catch up.
        publish(&mut o, "t");
        assert!(o.rejoin_interest(&n3, &key("t", None)).is_empty());
        // A subscription through this owner starts from its snapshot.
        let fresh: NodeId = Arc::from("n4");
        o.add_interest(&fresh, &key("u", None));
        publish(&mut o, "u");
        assert!(o.rejoin_interest(&fresh, &key("u", None)).is_empty());
        // A node a wildcard brought the messages to has them already.
        let wild: NodeId = Arc::from("n6");
        o.add_interest(&wild, &key("w.*", None));
        publish(&mut o, "w.x");
        assert!(o.rejoin_interest(&wild, &key("w.x", None)).is_empty());
        // A new epoch reaches the nodes with interest from its start.
        o.new_epochs();
        let (message, _) = publish(&mut o, "t");
        assert_eq!(message.seq, 1);
        o.remove_interest(&n1, &key("t", None));
        o.remove_interest(&n2, &key("t", None));
        o.remove_interest(&n3, &key("t", Some("g")));
        o.remove_interest(&n3, &key("t", None));
        let (_, routes) = publish(&mut o, "t");
        assert!(routes.is_empty());
        // n1 had seq 1 of this epoch: it is not sent seq 2 on coming back.
        assert!(o.rejoin_interest(&n1, &key("t", None)).is_empty());
        let late: NodeId = Arc::from("n5");
        assert_eq!(seqs(o.rejoin_interest(&late, &key("t", None))), [1, 2]);
    }

    fn owner_within(history_bytes: usize) -> TopicOwner {
        TopicOwner::new(OwnerLimits {
            history_messages: 1000,
            history_age: Duration::from_secs(60),
            history_bytes: Some(history_bytes),
        })
    }

    fn retained(o: &TopicOwner, t: &str) -> Vec<u64> {
        o.topics
            .get(&topic(t))
            .map(|owned| owned.history.after(0).map(|m| m.seq).collect())
            .unwrap_or_default()
    }

    #[test]
    fn over_the_byte_budget_the_oldest_messages_go_whatever_their_topic() {
        let one = crate::history::retained_size(&publish(&mut owner(), "a").0);
        let mut o = owner_within(4 * one);
        for t in ["a", "b", "a", "c"] {
            publish(&mut o, t);
        }
        assert_eq!(
            (retained(&o, "a"), retained(&o, "b")),
            (vec![1, 2], vec![1])
        );
        // A fifth message pushes out the oldest (a/1), then the next (b/1).
        publish(&mut o, "c");
        assert_eq!(retained(&o, "a"), [2]);
        publish(&mut o, "d");
        assert_eq!(
            (retained(&o, "a"), retained(&o, "b"), retained(&o, "c")),
            (vec![2], vec![], vec![1, 2])
        );
        assert_eq!(o.retained.bytes, 4 * one);
        // A subscriber resuming `a` from the start learns of the gap.
        let snapshot = o.snapshot(&topic("a"), Some(0), None);
        assert_eq!(snapshot.recovered, Some(false));
        assert_eq!(snapshot.replay.len(), 1);
        o.retain_topics(|t| t.as_str() != "c");
        assert_eq!(o.retained.bytes, 2 * one);
        o.new_epochs();
        assert_eq!(o.retained, Retained::default());
    }

    #[test]
    fn the_eviction_order_forgets_messages_that_left_by_count() {
        // One old message on `slow` stays while `busy` turns over its
        // history many times: the order must not keep every busy message.
        let mut o = TopicOwner::new(OwnerLimits {
            history_messages: 10,
            history_age: Duration::from_secs(60),
            history_bytes: Some(usize::MAX),
        });
        publish(&mut o, "slow");
        for _ in 0..100_000 {
            publish(&mut o, "busy");
        }
        assert_eq!(o.retained.messages, 11);
        assert!(
            o.order.len() <= 2 * 11 + ORDER_SLACK + 1,
            "order holds {} entries for 11 retained messages",
            o.order.len()
        );
    }

    #[test]
    fn a_sweep_lets_go_of_expired_messages_in_the_eviction_order() {
        let mut o = TopicOwner::new(OwnerLimits {
            history_messages: 1000,
            history_age: Duration::from_secs(1),
            history_bytes: Some(usize::MAX),
        });
        let start = Instant::now();
        for i in 0..10_000 {
            o.publish(
                topic(&format!("t{}", i % 500)),
                Data::null(),
                None,
                None,
                start,
            );
        }
        assert_eq!(o.order.len(), 10_000);
        o.sweep(start + Duration::from_secs(2));
        assert_eq!((o.topic_count(), o.retained), (0, Retained::default()));
        assert!(o.order.is_empty(), "{} entries left", o.order.len());
    }

    #[test]
    fn sweep_forgets_idle_topics_and_starts_a_new_epoch() {
        let mut o = TopicOwner::new(OwnerLimits {
            history_messages: 3,
            history_age: Duration::from_millis(0),
            history_bytes: Some(usize::MAX),
        });
        let (first, _) = publish(&mut o, "t");
        o.sweep(Instant::now() + Duration::from_millis(5));
        assert_eq!(o.topic_count(), 0);
        let (next, _) = publish(&mut o, "t");
        assert_eq!(next.seq, 1);
        assert_ne!(next.epoch, first.epoch);
    }
}
