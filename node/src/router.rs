//! The router: how sessions and the HTTP API reach the shards.
//!
//! It is a cheap, cloneable handle. A topic belongs to one shard (by hash);
//! a wildcard subscription is placed on every shard, and its `ok` is sent
//! when the last shard has it.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::outbox::{SessionHandle, SessionId};
use crate::owner::{NodeId, OwnerLimits, SubKey};
use crate::shard::{Command, Completion, Publish, Shard};

/// Commands a shard may have queued before senders wait.
const SHARD_QUEUE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("the node is shutting down")]
    Stopped,
}

#[derive(Debug, Clone)]
pub struct Router {
    shards: Arc<[mpsc::Sender<Command>]>,
}

impl Router {
    /// Starts `count` shard tasks on the current runtime.
    pub fn start(node: NodeId, count: usize, limits: OwnerLimits) -> Router {
        let shards: Vec<mpsc::Sender<Command>> = (0..count.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(SHARD_QUEUE);
                tokio::spawn(Shard::new(node.clone(), limits.clone(), rx).run());
                tx
            })
            .collect();
        Router {
            shards: shards.into(),
        }
    }

    fn shard_of(&self, topic: &str) -> &mpsc::Sender<Command> {
        // DefaultHasher::new() has fixed keys: placement is stable.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        topic.hash(&mut hasher);
        &self.shards[(hasher.finish() % self.shards.len() as u64) as usize]
    }

    async fn send(
        &self,
        shard: &mpsc::Sender<Command>,
        command: Command,
    ) -> Result<(), RouterError> {
        shard.send(command).await.map_err(|_| RouterError::Stopped)
    }

    pub async fn publish(&self, publish: Publish) -> Result<(), RouterError> {
        let shard = self.shard_of(publish.topic.as_str());
        self.send(shard, Command::Publish(publish)).await
    }

    /// Subscribes a session; the session gets its `ok` (and any replay)
    /// through its outbox.
    pub async fn subscribe(
        &self,
        session: SessionHandle,
        id: u64,
        key: SubKey,
        since: Option<u64>,
        epoch: Option<String>,
    ) -> Result<(), RouterError> {
        if key.pattern.is_wildcard() {
            let done = Completion::new(self.shards.len(), session.clone(), id);
            for shard in self.shards.iter() {
                let command = Command::Subscribe {
                    session: session.clone(),
                    key: key.clone(),
                    since,
                    epoch: epoch.clone(),
                    done: done.clone(),
                };
                self.send(shard, command).await?;
            }
            Ok(())
        } else {
            let done = Completion::new(1, session.clone(), id);
            let shard = self.shard_of(key.pattern.as_str());
            let command = Command::Subscribe {
                session,
                key,
                since,
                epoch,
                done,
            };
            self.send(shard, command).await
        }
    }

    /// Unsubscribes; with `reply`, the session gets `ok` once no shard will
    /// deliver on that subscription any more.
    pub async fn unsubscribe(
        &self,
        session: SessionId,
        key: SubKey,
        reply: Option<(SessionHandle, u64)>,
    ) -> Result<(), RouterError> {
        let targets: Vec<&mpsc::Sender<Command>> = if key.pattern.is_wildcard() {
            self.shards.iter().collect()
        } else {
            vec![self.shard_of(key.pattern.as_str())]
        };
        let done = reply.map(|(handle, id)| Completion::new(targets.len(), handle, id));
        for shard in targets {
            let command = Command::Unsubscribe {
                session,
                key: key.clone(),
                done: done.clone(),
            };
            self.send(shard, command).await?;
        }
        Ok(())
    }

    /// Removes every subscription of a session that has ended.
    pub async fn forget_session(&self, session: SessionId, keys: Vec<SubKey>) {
        for key in keys {
            if self.unsubscribe(session, key, None).await.is_err() {
                return;
            }
        }
    }

    /// True when every shard answers within `timeout`.
    pub async fn healthy(&self, timeout: Duration) -> bool {
        let checks = self.shards.iter().map(|shard| async move {
            let (tx, rx) = oneshot::channel();
            shard.send(Command::Health(tx)).await.is_ok() && rx.await.is_ok()
        });
        let all = futures_util::future::join_all(checks);
        matches!(tokio::time::timeout(timeout, all).await, Ok(results) if results.iter().all(|ok| *ok))
    }
}
