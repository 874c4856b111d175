//! The cluster coordinator: turns membership (gossip) and peer connections
//! (QUIC) into the placement ring, and tells the shards when peers come and
//! go. It answers each `PeerUp` with the router as the sink for that peer's
//! frames, which then go from the link's task straight to the shards.
//!
//! One task owns this state. A member is placed on the ring only when gossip
//! says it is ready AND this node holds an authenticated connection to it:
//! gossip is unauthenticated UDP and never routes a message on its own.
//! The task is written against a members `watch` and a [`Transport`], so the
//! whole cluster logic runs in tests over the in-memory transport with a
//! members list the test controls.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::info;

use crate::lifecycle::{Lifecycle, Phase};
use crate::membership::{Member, MemberState};
use crate::metrics::METRICS;
use crate::owner::NodeId;
use crate::ring::Placement;
use crate::router::Router;
use crate::transport::{Inbound, PeerAddr, SharedTransport};

/// What `/v1/cluster` and `/readyz` show.
#[derive(Debug, Clone)]
pub struct ClusterView {
    pub members: Vec<Member>,
    pub placement: Arc<Placement>,
    /// This node's own state (what it gossips).
    pub state: MemberState,
}

impl ClusterView {
    pub fn joined(&self) -> bool {
        self.state != MemberState::Joining
    }
}

pub struct ClusterSetup {
    pub node: NodeId,
    pub vnodes: usize,
    /// With seeds, a node looks for a live member for up to `join_timeout`
    /// before it serves alone; without, it is a cluster's first node.
    pub has_seeds: bool,
    pub join_timeout: Duration,
    pub router: Router,
    pub transport: SharedTransport,
    pub inbound: mpsc::Receiver<Inbound>,
    pub members: watch::Receiver<Arc<Vec<Member>>>,
    pub lifecycle: Lifecycle,
}

/// How often the join condition and draining are looked at.
const TICK: Duration = Duration::from_millis(100);

/// Starts the coordinator; returns the view (for admin) and this node's
/// state (for membership to gossip).
pub fn start(
    setup: ClusterSetup,
) -> (
    watch::Receiver<Arc<ClusterView>>,
    watch::Receiver<MemberState>,
) {
    let placement = Arc::new(Placement::new(Vec::new(), setup.vnodes, 0));
    let view = Arc::new(ClusterView {
        members: setup.members.borrow().as_ref().clone(),
        placement: placement.clone(),
        state: MemberState::Joining,
    });
    let (view_tx, view_rx) = watch::channel(view);
    let (state_tx, state_rx) = watch::channel(MemberState::Joining);
    let coordinator = Coordinator {
        join_deadline: Instant::now() + setup.join_timeout,
        setup,
        connected: HashSet::new(),
        seen: HashMap::new(),
        alone_since: None,
        placement,
        state: MemberState::Joining,
        view: view_tx,
        state_tx,
    };
    tokio::spawn(coordinator.run());
    (view_rx, state_rx)
}

struct Coordinator {
    setup: ClusterSetup,
    connected: HashSet<NodeId>,
    /// The generation of every peer this node has been connected to.
    seen: HashMap<NodeId, u64>,
    /// Since when the ring would hold only this node after holding others.
    alone_since: Option<Instant>,
    placement: Arc<Placement>,
    state: MemberState,
    join_deadline: Instant,
    view: watch::Sender<Arc<ClusterView>>,
    state_tx: watch::Sender<MemberState>,
}

impl Coordinator {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.members_changed();
        loop {
            tokio::select! {
                event = self.setup.inbound.recv() => {
                    let Some(event) = event else { return };
                    if !self.on_inbound(event).await {
                        return;
                    }
                }
                changed = self.setup.members.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.members_changed();
                    self.update().await;
                }
                _ = tick.tick() => self.update().await,
            }
        }
    }

    /// False when the node is stopping (the router is gone).
    async fn on_inbound(&mut self, event: Inbound) -> bool {
        let delivered = match event {
            Inbound::PeerUp {
                node,
                generation,
                frames,
            } => {
                // The same generation again: the link broke and healed, and
                // either side may have owned the other's topics meanwhile.
                let reconnect = self.seen.insert(node.clone(), generation) == Some(generation);
                info!(peer = %node, generation, reconnect, "peer connected");
                self.connected.insert(node.clone());
                let result = self.setup.router.peer_up(node, reconnect).await;
                self.update().await;
                // Every shard has the PeerUp queued: the peer's frames,
                // dispatched from now on, come after it.
                if result.is_ok() {
                    let _ = frames.send(Arc::new(self.setup.router.clone()));
                }
                result
            }
            Inbound::PeerDown { node } => {
                info!(peer = %node, "peer disconnected");
                self.connected.remove(&node);
                let result = self.setup.router.peer_down(node).await;
                self.update().await;
                result
            }
        };
        delivered.is_ok()
    }

    /// Connect to every live member (the transport dials and re-dials), and
    /// hold client publishes back while another member's links are.
    fn members_changed(&mut self) {
        let members = self.setup.members.borrow().clone();
        let peers = members
            .iter()
            .filter(|m| !m.is_self && m.state != MemberState::Dead)
            .filter_map(|m| {
                Some(PeerAddr {
                    node: m.node.clone(),
                    generation: m.generation,
                    addr: m.cluster_socket?,
                })
            })
            .collect();
        self.setup.transport.set_peers(peers);
        let congested = members
            .iter()
            .filter(|m| !m.is_self && m.state != MemberState::Dead && m.congested)
            .count();
        self.setup
            .transport
            .backlog()
            .set_remote_congested(congested);
        METRICS.members_congested.set(congested as i64);
        let count = |state| members.iter().filter(|m| m.state == state).count() as i64;
        METRICS.members_joining.set(count(MemberState::Joining));
        METRICS.members_ready.set(count(MemberState::Ready));
        METRICS.members_draining.set(count(MemberState::Draining));
        METRICS.members_dead.set(count(MemberState::Dead));
    }

    /// Recomputes this node's state and the ring; tells the shards when the
    /// ring changed.
    async fn update(&mut self) {
        let members = self.setup.members.borrow().clone();
        let state = self.next_state(&members);
        if state != self.state {
            info!(
                from = self.state.as_str(),
                to = state.as_str(),
                "node state"
            );
            self.state = state;
            let _ = self.state_tx.send(state);
        }
        let mut placed: Vec<NodeId> = members
            .iter()
            .filter(|m| {
                !m.is_self && m.state == MemberState::Ready && self.connected.contains(&m.node)
            })
            .map(|m| m.node.clone())
            .collect();
        if self.state == MemberState::Ready {
            placed.push(self.setup.node.clone());
        }
        let mut sorted = placed.clone();
        sorted.sort();
        // Every peer lost at once (this node was paused, or cut off) looks
        // the same as everyone else dying. Taking every topic alone at once
        // would sequence them in epochs the cluster drops when the links
        // come back, acked messages included. Wait as a joining node would;
        // meanwhile requests to other owners fail `unavailable`.
        let alone = sorted.len() == 1 && self.placement.members().len() > 1;
        if alone {
            let since = *self.alone_since.get_or_insert_with(Instant::now);
            if since.elapsed() < self.setup.join_timeout {
                sorted = self.placement.members().to_vec();
            }
        } else {
            self.alone_since = None;
        }
        if sorted != self.placement.members() {
            let placement = Arc::new(Placement::new(
                placed,
                self.setup.vnodes,
                self.placement.version + 1,
            ));
            info!(version = placement.version, members = ?placement.members(), "ring changed");
            METRICS.ring_changes.inc();
            self.placement = placement.clone();
            if self.setup.router.set_placement(placement).await.is_err() {
                return;
            }
        }
        let view = ClusterView {
            members: members.as_ref().clone(),
            placement: self.placement.clone(),
            state: self.state,
        };
        self.view.send_if_modified(|current| {
            let changed = current.members != view.members
                || current.state != view.state
                || !Arc::ptr_eq(&current.placement, &view.placement);
            if changed {
                *current = Arc::new(view);
            }
            changed
        });
    }

    fn next_state(&self, members: &[Member]) -> MemberState {
        if self.setup.lifecycle.phase() != Phase::Ready {
            return MemberState::Draining;
        }
        if self.state != MemberState::Joining {
            return self.state;
        }
        // Joined once connected to a member that serves: then the ring this
        // node starts with already holds the cluster, instead of only itself
        // (which would make it sequence every topic for a moment). Nodes all
        // seeded with each other and starting together find no such member
        // and start after the join timeout.
        let joined = !self.setup.has_seeds
            || Instant::now() >= self.join_deadline
            || members.iter().any(|m| {
                !m.is_self && m.state == MemberState::Ready && self.connected.contains(&m.node)
            });
        if joined {
            MemberState::Ready
        } else {
            MemberState::Joining
        }
    }
}

#[cfg(test)]
mod tests {
    //! The cluster logic end to end in one process: routers, shards and
    //! coordinators joined by the in-memory transport.

    use super::*;
    use crate::outbox::{next_session_id, outbox, Outbox, SessionHandle};
    use crate::owner::OwnerLimits;
    use crate::router::RouterSetup;
    use crate::shard::Publish;
    use crate::transport::memory::MemoryNetwork;
    use protocol::peer::InterestKey;
    use protocol::{Codec, Data, GroupName, Pattern, Topic};
    use serde_json::Value;

    const WAIT: Duration = Duration::from_secs(5);

    struct TestNode {
        id: NodeId,
        router: Router,
        transport: SharedTransport,
        view: watch::Receiver<Arc<ClusterView>>,
        members: watch::Sender<Arc<Vec<Member>>>,
        _lifecycle: Lifecycle,
    }

    fn member(node: &str, me: &str) -> Member {
        Member {
            node: node.into(),
            generation: 1,
            state: MemberState::Ready,
            client_addr: String::new(),
            admin_addr: String::new(),
            cluster_addr: String::new(),
            cluster_socket: Some("127.0.0.1:9".parse().expect("addr")),
            gossip_addr: "127.0.0.1:9".parse().expect("addr"),
            connections: 0,
            congested: false,
            is_self: node == me,
        }
    }

    fn start_node(net: &MemoryNetwork, me: &str, all: &[&str]) -> TestNode {
        let (inbound_tx, inbound_rx) = mpsc::channel(1024);
        let transport: SharedTransport = Arc::new(net.join(me.into(), 1, inbound_tx));
        let router = Router::start(RouterSetup {
            node: me.into(),
            shards: 2,
            limits: OwnerLimits {
                history_messages: 100,
                history_age: Duration::from_secs(60),
                history_bytes: None,
            },
            transport: Some(transport.clone()),
            request_timeout: Duration::from_millis(500),
        });
        let members: Vec<Member> = all.iter().map(|n| member(n, me)).collect();
        let (members_tx, members_rx) = watch::channel(Arc::new(members));
        let lifecycle = Lifecycle::new();
        let (view, _state) = start(ClusterSetup {
            node: me.into(),
            vnodes: 64,
            has_seeds: true,
            join_timeout: Duration::from_secs(30),
            router: router.clone(),
            transport: transport.clone(),
            inbound: inbound_rx,
            members: members_rx,
            lifecycle: lifecycle.clone(),
        });
        TestNode {
            id: me.into(),
            router,
            transport,
            view,
            members: members_tx,
            _lifecycle: lifecycle,
        }
    }

    async fn wait_for_ring(nodes: &mut [TestNode], expected: &[&str]) {
        for node in nodes.iter_mut() {
            let placed = tokio::time::timeout(
                WAIT,
                node.view.wait_for(|v| {
                    let members: Vec<&str> = v.placement.members().iter().map(|m| &**m).collect();
                    members == expected
                }),
            )
            .await;
            assert!(placed.is_ok(), "{} never placed {expected:?}", node.id);
        }
    }

    async fn cluster(names: &[&str]) -> (MemoryNetwork, Vec<TestNode>) {
        let net = MemoryNetwork::new();
        let mut nodes: Vec<TestNode> = names.iter().map(|n| start_node(&net, n, names)).collect();
        wait_for_ring(&mut nodes, names).await;
        (net, nodes)
    }

    struct Client {
        handle: SessionHandle,
        outbox: Outbox,
        buffered: std::collections::VecDeque<bytes::Bytes>,
        next_id: u64,
    }

    impl Client {
        fn new() -> Client {
            let (handle, outbox) = outbox(next_session_id(), Codec::Json, 10_000, 1 << 24);
            Client {
                handle,
                outbox,
                buffered: Default::default(),
                next_id: 0,
            }
        }

        async fn sub(&mut self, node: &TestNode, pattern: &str, group: Option<&str>) -> Value {
            self.sub_since(node, pattern, group, None, None).await
        }

        async fn sub_since(
            &mut self,
            node: &TestNode,
            pattern: &str,
            group: Option<&str>,
            since: Option<u64>,
            epoch: Option<String>,
        ) -> Value {
            self.next_id += 1;
            let key = InterestKey {
                pattern: Pattern::parse(pattern).expect("pattern"),
                group: group.map(|g| GroupName::parse(g).expect("group")),
            };
            node.router
                .subscribe(self.handle.clone(), self.next_id, key, since, epoch)
                .await
                .expect("subscribe");
            let ok = self.next().await;
            assert_eq!(ok["op"], "ok", "{ok}");
            assert_eq!(ok["id"], self.next_id, "{ok}");
            ok
        }

        /// The next object queued for this client.
        async fn next(&mut self) -> Value {
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                if let Some(first) = self.buffered.pop_front() {
                    return serde_json::from_slice(&first).expect("json");
                }
                let taken = self.outbox.take();
                self.buffered.extend(taken.objects.drain(..));
                if self.buffered.is_empty() {
                    assert!(tokio::time::Instant::now() < deadline, "nothing arrived");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }

        /// The next object, which must be a `msg`: its `seq` and `data`.
        async fn next_msg(&mut self) -> (u64, u64) {
            let msg = self.next().await;
            match (
                msg["op"].as_str(),
                msg["seq"].as_u64(),
                msg["data"].as_u64(),
            ) {
                (Some("msg"), Some(seq), Some(data)) => (seq, data),
                _ => panic!("expected a msg with numeric data, got {msg}"),
            }
        }

        async fn nothing_more(&mut self) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let taken = self.outbox.take();
            assert!(
                taken.objects.is_empty() && self.buffered.is_empty(),
                "unexpected {:?} {:?}",
                taken.objects,
                self.buffered
            );
        }
    }

    async fn publish(node: &TestNode, topic: &str, data: &str) -> Result<(u64, String), ()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        node.router
            .publish(Publish {
                topic: Topic::parse(topic).expect("topic"),
                data: Data::Json(bytes::Bytes::from(data.to_owned())),
                trace: None,
                tracestate: None,
                ack: Some(crate::shard::Ack::Http(tx)),
            })
            .await
            .expect("publish");
        match tokio::time::timeout(WAIT, rx).await {
            Ok(Ok(Ok(acked))) => Ok((acked.seq, acked.epoch.to_string())),
            _ => Err(()),
        }
    }

    fn topic_owned_by(node: &TestNode, owner: &str, prefix: &str) -> String {
        let view = node.view.borrow().clone();
        (0..10_000)
            .map(|i| format!("{prefix}.{i}"))
            .find(|t| view.placement.owns(owner, t))
            .expect("some topic lands on every owner")
    }

    #[tokio::test]
    async fn every_pair_of_nodes_delivers_both_ways_in_order() {
        let names = ["a", "b", "c"];
        let (_net, nodes) = cluster(&names).await;
        for owner in names {
            let topic = topic_owned_by(&nodes[0], owner, "pair");
            for publisher in &nodes {
                for subscriber in &nodes {
                    let mut client = Client::new();
                    let ok = client.sub(subscriber, &topic, None).await;
                    let start = ok["seq"].as_u64().expect("seq");
                    for i in 1..=3 {
                        publish(publisher, &topic, &i.to_string())
                            .await
                            .expect("acked");
                    }
                    for i in 1..=3u64 {
                        let msg = client.next().await;
                        assert_eq!(msg["op"], "msg");
                        assert_eq!(msg["seq"], start + i, "{msg}");
                        assert_eq!(msg["data"], i);
                    }
                    client.nothing_more().await;
                }
            }
        }
    }

    #[tokio::test]
    async fn wildcards_reach_subscribers_on_every_node() {
        let (_net, nodes) = cluster(&["a", "b", "c"]).await;
        let mut clients = Vec::new();
        for node in &nodes {
            let mut client = Client::new();
            client.sub(node, "wild.>", None).await;
            clients.push(client);
        }
        for owner in ["a", "b", "c"] {
            let topic = topic_owned_by(&nodes[0], owner, "wild.x");
            publish(&nodes[1], &topic, "1").await.expect("acked");
            for client in &mut clients {
                let msg = client.next().await;
                assert_eq!(msg["topic"], topic.as_str());
            }
        }
        for client in &mut clients {
            client.nothing_more().await;
        }
    }

    #[tokio::test]
    async fn a_queue_group_gets_each_message_once_across_nodes() {
        let (_net, nodes) = cluster(&["a", "b", "c"]).await;
        let topic = topic_owned_by(&nodes[0], "b", "jobs");
        let mut members = Vec::new();
        for node in &nodes {
            let mut client = Client::new();
            client.sub(node, &topic, Some("workers")).await;
            members.push(client);
        }
        let mut plain = Client::new();
        plain.sub(&nodes[2], &topic, None).await;
        for i in 0..30 {
            publish(&nodes[0], &topic, &i.to_string())
                .await
                .expect("acked");
        }
        // Give stragglers a moment, then count what every member got.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut got = Vec::new();
        for member in &mut members {
            let taken = member.outbox.take();
            member.buffered.extend(taken.objects.drain(..));
            for object in member.buffered.drain(..) {
                let v: Value = serde_json::from_slice(&object).expect("json");
                got.push(v["data"].as_u64().expect("data"));
            }
        }
        got.sort_unstable();
        assert_eq!(got, (0..30).collect::<Vec<u64>>());
        for i in 0..30u64 {
            assert_eq!(plain.next().await["data"], i);
        }
    }

    /// Waits until `node`'s tables hold `want` ([interest, local, pending]).
    async fn tables_become(node: &TestNode, want: [usize; 3]) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let now = node.router.table_entries().await.expect("tables");
            if now == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: tables [interest, local, pending] are {now:?}, not {want:?}",
                node.id
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_subscription_withdrawn_before_its_owner_answered_leaves_no_interest() {
        let (_net, nodes) = cluster(&["a", "b"]).await;
        let topic = topic_owned_by(&nodes[0], "b", "hasty");
        let key = InterestKey {
            pattern: Pattern::parse(&topic).expect("pattern"),
            group: None,
        };
        let mut client = Client::new();
        // The unsubscribe reaches a's shard before b's answer can: the
        // Subscribe is withdrawn while b records a's interest.
        let router = &nodes[0].router;
        router
            .subscribe(client.handle.clone(), 1, key.clone(), None, None)
            .await
            .expect("subscribe");
        router
            .unsubscribe(client.handle.id, key, None)
            .await
            .expect("unsubscribe");
        tables_become(&nodes[1], [0, 0, 0]).await;
        tables_become(&nodes[0], [0, 0, 0]).await;
        // And b's messages on the topic no longer come to a.
        publish(&nodes[1], &topic, "1").await.expect("acked");
        client.nothing_more().await;
    }

    #[tokio::test]
    async fn publishes_wait_while_another_member_gossips_backed_up_links() {
        let (_net, nodes) = cluster(&["a", "b"]).await;
        let backlog = || nodes[0].transport.backlog();
        let gossip_b_congested = |congested: bool| {
            nodes[0].members.send_modify(|members| {
                let mut list = members.as_ref().clone();
                for m in list.iter_mut().filter(|m| &*m.node == "b") {
                    m.congested = congested;
                }
                *members = Arc::new(list);
            })
        };
        gossip_b_congested(true);
        let deadline = tokio::time::Instant::now() + WAIT;
        while !backlog().is_congested() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "b's word never held a back"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // a's own links are clear: a does not pass b's word on.
        assert!(!backlog().links_congested());
        let waiting = backlog().wait_clear(WAIT);
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut waiting)
                .await
                .is_err(),
            "a publish on a went ahead while b was backed up"
        );
        gossip_b_congested(false);
        assert_eq!(waiting.await, crate::transport::Waited::Relieved);
    }

    #[tokio::test]
    async fn recovery_through_a_remote_owner_replays_then_goes_live() {
        let (_net, nodes) = cluster(&["a", "b"]).await;
        let topic = topic_owned_by(&nodes[0], "b", "rec");
        let (_, epoch) = publish(&nodes[1], &topic, "1").await.expect("acked");
        publish(&nodes[1], &topic, "2").await.expect("acked");
        publish(&nodes[0], &topic, "3").await.expect("acked");
        let mut client = Client::new();
        let ok = client
            .sub_since(&nodes[0], &topic, None, Some(1), Some(epoch))
            .await;
        assert_eq!(ok["recovered"], true, "{ok}");
        assert_eq!(ok["seq"], 3);
        assert_eq!(client.next().await["seq"], 2);
        assert_eq!(client.next().await["seq"], 3);
        publish(&nodes[1], &topic, "4").await.expect("acked");
        assert_eq!(client.next().await["seq"], 4);
        client.nothing_more().await;
    }

    #[tokio::test]
    async fn a_dead_owner_fails_fast_and_its_topics_move() {
        let (net, mut nodes) = cluster(&["a", "b", "c"]).await;
        let topic = topic_owned_by(&nodes[0], "c", "move");
        let mut client = Client::new();
        client.sub(&nodes[0], &topic, None).await;
        publish(&nodes[1], &topic, "1").await.expect("acked");
        assert_eq!(client.next().await["seq"], 1);
        // c dies: its links go down, and gossip (here: the test) says dead.
        net.leave(&"c".into());
        for node in &nodes[..2] {
            let mut members = node.members.borrow().as_ref().clone();
            for m in &mut members {
                if &*m.node == "c" {
                    m.state = MemberState::Dead;
                }
            }
            node.members.send_replace(Arc::new(members));
        }
        nodes.truncate(2);
        wait_for_ring(&mut nodes, &["a", "b"]).await;
        // The new owner starts a new epoch; the subscriber, registered
        // again without reconnecting, sees seq start over.
        let (seq, _) = publish(&nodes[1], &topic, "2").await.expect("acked");
        assert_eq!(seq, 1);
        assert_eq!(client.next_msg().await, (1, 2));
    }

    #[tokio::test]
    async fn a_new_owner_catches_up_a_node_whose_ring_moved_later() {
        let (net, mut nodes) = cluster(&["a", "b", "c"]).await;
        // A topic of c's that moves to a once c is gone.
        let without_c = Placement::new(["a".into(), "b".into()], 64, 0);
        let topic = (0..10_000)
            .map(|i| format!("late.{i}"))
            .find(|t| nodes[0].view.borrow().placement.owns("c", t) && without_c.owns("a", t))
            .expect("a topic moving from c to a");
        let mut client = Client::new();
        let ok = client.sub(&nodes[1], &topic, None).await;
        assert_eq!(ok["seq"], 0, "{ok}");
        publish(&nodes[0], &topic, "1").await.expect("acked");
        assert_eq!(client.next().await["data"], 1);

        // a loses c first and takes the topic over (a new epoch) while b,
        // whose subscriber registered at c, still places it on c.
        net.cut(&"a".into(), &"c".into());
        wait_for_ring(&mut nodes[..1], &["a", "b"]).await;
        let first = publish(&nodes[0], &topic, "2").await.expect("acked");
        let second = publish(&nodes[0], &topic, "3").await.expect("acked");
        assert_eq!((first.0, second.0), (1, 2), "a new epoch at a");
        assert_eq!(first.1, second.1);

        // Then b loses c and registers its subscriber at a: what a
        // sequenced meanwhile arrives, in order, from the epoch's start.
        net.cut(&"b".into(), &"c".into());
        wait_for_ring(&mut nodes[1..2], &["a", "b"]).await;
        for expected in [(1, 2), (2, 3)] {
            assert_eq!(client.next_msg().await, expected);
        }
        let (seq, _) = publish(&nodes[1], &topic, "4").await.expect("acked");
        assert_eq!(seq, 3);
        assert_eq!(client.next_msg().await, (3, 4));
        client.nothing_more().await;
    }

    #[tokio::test]
    async fn a_publish_to_an_unreachable_owner_is_unavailable_in_bounded_time() {
        let (net, nodes) = cluster(&["a", "b"]).await;
        let topic = topic_owned_by(&nodes[0], "b", "cut");
        // Cut the link but keep b "ready" in gossip: a's ring drops b only
        // once the connection is gone; until then requests time out.
        net.cut(&"a".into(), &"b".into());
        let started = std::time::Instant::now();
        let result = publish(&nodes[0], &topic, "1").await;
        // Either a took the topic over (ring without b) or it was refused
        // in time: nothing hangs.
        assert!(started.elapsed() < Duration::from_secs(2));
        if let Ok((seq, _)) = result {
            assert_eq!(seq, 1);
        }
    }
}
