//! A shard: one task owning a slice of the topic space (by hash).
//!
//! It plays both roles for its topics: owner (through [`TopicOwner`]) and
//! local delivery (through [`LocalSubscriptions`]). Commands arrive on one
//! bounded channel and run to completion one at a time, which is what makes
//! a subscription's `ok`, its replay and the live messages after it come out
//! in order. A shard never waits on a session: outboxes take pushes or close.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::{Data, OkReply, Reply, Topic, TraceParent};
use tokio::sync::{mpsc, oneshot};

use crate::delivery::{Change, LocalSubscriptions};
use crate::metrics::METRICS;
use crate::outbox::{SessionHandle, SessionId};
use crate::owner::{NodeId, OwnerLimits, Sequenced, SubKey, TopicOwner};

/// What a publisher learns once its message is sequenced.
#[derive(Debug, Clone)]
pub struct Acked {
    pub seq: u64,
    pub epoch: Arc<str>,
}

/// Where a publish's acknowledgement goes.
#[derive(Debug)]
pub enum Ack {
    /// An `ok` with the request id, into the publishing session.
    Session { session: SessionHandle, id: u64 },
    /// The HTTP publish handler waiting for the result.
    Http(oneshot::Sender<Acked>),
}

#[derive(Debug)]
pub struct Publish {
    pub topic: Topic,
    pub data: Data,
    pub trace: Option<TraceParent>,
    pub tracestate: Option<String>,
    pub ack: Option<Ack>,
}

/// A reply that several shards contribute to: the last one to finish sends
/// the session its `ok`. Wildcard subscriptions live on every shard.
#[derive(Debug)]
pub struct Completion {
    remaining: AtomicUsize,
    session: SessionHandle,
    id: u64,
}

impl Completion {
    pub fn new(parts: usize, session: SessionHandle, id: u64) -> Arc<Completion> {
        Arc::new(Completion {
            remaining: AtomicUsize::new(parts),
            session,
            id,
        })
    }

    fn part_done(&self, recovered: Option<bool>) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let ok = OkReply {
                id: self.id,
                recovered,
                ..OkReply::default()
            };
            self.session
                .push(self.session.codec.encode_reply(&Reply::Ok(ok)));
        }
    }
}

#[derive(Debug)]
pub enum Command {
    Publish(Publish),
    Subscribe {
        session: SessionHandle,
        key: SubKey,
        since: Option<u64>,
        epoch: Option<String>,
        done: Arc<Completion>,
    },
    Unsubscribe {
        session: SessionId,
        key: SubKey,
        done: Option<Arc<Completion>>,
    },
    /// Answers once the shard has run everything sent before it.
    Health(oneshot::Sender<()>),
}

pub struct Shard {
    node: NodeId,
    owner: TopicOwner,
    local: LocalSubscriptions,
    commands: mpsc::Receiver<Command>,
}

/// How often history is aged out and idle topics are forgotten.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Commands taken per wake-up.
const BATCH: usize = 128;

impl Shard {
    pub fn new(node: NodeId, limits: OwnerLimits, commands: mpsc::Receiver<Command>) -> Shard {
        Shard {
            node,
            owner: TopicOwner::new(limits),
            local: LocalSubscriptions::default(),
            commands,
        }
    }

    /// Runs until every sender is gone.
    pub async fn run(mut self) {
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                received = self.commands.recv_many(&mut batch, BATCH) => {
                    if received == 0 {
                        return;
                    }
                    for command in batch.drain(..) {
                        self.handle(command);
                    }
                }
                _ = sweep.tick() => self.owner.sweep(Instant::now()),
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Publish(publish) => self.publish(publish),
            Command::Subscribe {
                session,
                key,
                since,
                epoch,
                done,
            } => self.subscribe(session, key, since, epoch, done),
            Command::Unsubscribe { session, key, done } => {
                if self.local.remove(&key, session) == Change::Last {
                    self.owner.remove_interest(&self.node, &key);
                }
                if let Some(done) = done {
                    done.part_done(None);
                }
            }
            Command::Health(reply) => {
                let _ = reply.send(());
            }
        }
    }

    fn publish(&mut self, publish: Publish) {
        let (message, routes) = self.owner.publish(
            publish.topic,
            publish.data,
            publish.trace,
            publish.tracestate,
            Instant::now(),
        );
        match publish.ack {
            Some(Ack::Session { session, id }) => {
                let ok = OkReply {
                    id,
                    seq: Some(message.seq),
                    epoch: Some(&message.epoch),
                    recovered: None,
                };
                session.push(session.codec.encode_reply(&Reply::Ok(ok)));
            }
            Some(Ack::Http(reply)) => {
                let _ = reply.send(Acked {
                    seq: message.seq,
                    epoch: message.epoch.clone(),
                });
            }
            None => {}
        }
        for route in routes {
            if route.node == self.node {
                self.local.deliver(&message, &route.groups);
            }
        }
    }

    fn subscribe(
        &mut self,
        session: SessionHandle,
        key: SubKey,
        since: Option<u64>,
        epoch: Option<String>,
        done: Arc<Completion>,
    ) {
        let change = self.local.add(&key, session.clone());
        if change == Change::First {
            self.owner.add_interest(&self.node, &key);
        }
        let Some(topic) = key.pattern.as_topic() else {
            // History is per topic: a wildcard subscription has nothing to
            // replay, so `since` on one is never recovered.
            done.part_done(since.map(|_| false));
            return;
        };
        let snapshot = self.owner.snapshot(&topic, since, epoch.as_deref());
        let (recovered, replay) = if change == Change::Unchanged {
            // Already subscribed: the subscription never stopped, and
            // replaying would repeat messages it already delivered.
            (since.map(|_| false), Vec::new())
        } else {
            (snapshot.recovered, snapshot.replay)
        };
        let ok = OkReply {
            id: done.id,
            seq: Some(snapshot.seq),
            epoch: Some(&snapshot.epoch),
            recovered,
        };
        session.push(session.codec.encode_reply(&Reply::Ok(ok)));
        for message in replay {
            replay_one(&session, &message);
        }
    }
}

fn replay_one(session: &SessionHandle, message: &Sequenced) {
    if session.push(message.encoded(session.codec).clone()) == crate::outbox::Pushed::Queued {
        METRICS.messages_out.inc();
    }
}
