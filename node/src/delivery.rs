//! Local delivery: which of this node's sessions hold which subscriptions,
//! and handing a sequenced message to each of them.
//!
//! A message reaches a session at most once, however many of its
//! subscriptions match; each queue group the owner assigned to this node
//! gets it on exactly one member, chosen in turn.

use std::collections::{HashMap, HashSet};

use indexmap::IndexMap;
use protocol::{GroupName, Pattern, PatternIndex, Topic};

use crate::metrics::METRICS;
use crate::outbox::{Pushed, SessionHandle, SessionId, Wakes};
use crate::owner::{Sequenced, SubKey};

/// Did adding or removing a subscription change this node's interest?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The first subscriber for the key on this node: the owner must learn it.
    First,
    /// The last subscriber for the key left: the owner must forget it.
    Last,
    Other,
    /// The session already held (or never held) that subscription.
    Unchanged,
}

/// The sessions of one subscription key. A few are a vector (small, which
/// matters when every connection has a topic of its own); past
/// `SMALL_SESSION_SET` they move to an index map, so that adding and
/// removing one stays O(1) on a broadcast topic that holds a node's every
/// session (scanning a list per change made a mass reconnect quadratic).
/// Iterating is as fast as a vector's either way.
#[derive(Debug)]
enum Sessions {
    Few(Vec<SessionHandle>),
    // Boxed: the enum stays a vector's size for the many small sets.
    Many(Box<IndexMap<SessionId, SessionHandle>>),
}

const SMALL_SESSION_SET: usize = 32;

impl Default for Sessions {
    fn default() -> Self {
        Sessions::Few(Vec::new())
    }
}

impl Sessions {
    fn len(&self) -> usize {
        match self {
            Sessions::Few(list) => list.len(),
            Sessions::Many(map) => map.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn contains(&self, id: SessionId) -> bool {
        match self {
            Sessions::Few(list) => list.iter().any(|s| s.id == id),
            Sessions::Many(map) => map.contains_key(&id),
        }
    }

    /// Adds `session` (the caller checked it is not there).
    fn insert(&mut self, session: SessionHandle) {
        match self {
            Sessions::Few(list) if list.len() < SMALL_SESSION_SET => list.push(session),
            Sessions::Few(list) => {
                let mut map: IndexMap<SessionId, SessionHandle> =
                    list.drain(..).map(|s| (s.id, s)).collect();
                map.insert(session.id, session);
                *self = Sessions::Many(Box::new(map));
            }
            Sessions::Many(map) => {
                map.insert(session.id, session);
            }
        }
    }

    /// False when `id` was not there.
    fn remove(&mut self, id: SessionId) -> bool {
        match self {
            Sessions::Few(list) => match list.iter().position(|s| s.id == id) {
                Some(at) => {
                    list.swap_remove(at);
                    true
                }
                None => false,
            },
            Sessions::Many(map) => map.swap_remove(&id).is_some(),
        }
    }

    fn get(&self, index: usize) -> Option<&SessionHandle> {
        match self {
            Sessions::Few(list) => list.get(index),
            Sessions::Many(map) => map.get_index(index).map(|(_, s)| s),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &SessionHandle> {
        let (few, many) = match self {
            Sessions::Few(list) => (Some(list.iter()), None),
            Sessions::Many(map) => (None, Some(map.values())),
        };
        few.into_iter().flatten().chain(many.into_iter().flatten())
    }
}

#[derive(Debug, Default)]
struct Members {
    sessions: Sessions,
    next: usize,
}

#[derive(Debug, Default)]
struct Subscribers {
    plain: Sessions,
    groups: HashMap<GroupName, Members>,
}

impl Subscribers {
    fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.groups.is_empty()
    }

    fn list_mut(&mut self, group: &Option<GroupName>) -> &mut Sessions {
        match group {
            None => &mut self.plain,
            Some(group) => &mut self.groups.entry(group.clone()).or_default().sessions,
        }
    }
}

/// The subscriptions of this node's sessions on one shard's topics.
#[derive(Debug, Default)]
pub struct LocalSubscriptions {
    exact: HashMap<Topic, Subscribers>,
    wildcard: HashMap<Pattern, Subscribers>,
    /// The patterns of `wildcard`, by token: a message looks up the ones
    /// that match it instead of trying each.
    wildcard_index: PatternIndex<Pattern>,
    /// Sessions already given the current message; reused between messages.
    seen: HashSet<SessionId>,
    /// Writers to wake for what `deliver` queued since the last
    /// [`wake_sessions`](Self::wake_sessions).
    wakes: Wakes,
}

impl LocalSubscriptions {
    fn subscribers_mut(&mut self, pattern: &Pattern) -> &mut Subscribers {
        match pattern.as_topic() {
            Some(topic) => self.exact.entry(topic).or_default(),
            None => self.wildcard.entry(pattern.clone()).or_insert_with(|| {
                self.wildcard_index.insert(pattern, pattern.clone());
                Subscribers::default()
            }),
        }
    }

    pub fn add(&mut self, key: &SubKey, session: SessionHandle) -> Change {
        let list = self.subscribers_mut(&key.pattern).list_mut(&key.group);
        if list.contains(session.id) {
            return Change::Unchanged;
        }
        list.insert(session);
        if list.len() == 1 {
            Change::First
        } else {
            Change::Other
        }
    }

    pub fn remove(&mut self, key: &SubKey, session: SessionId) -> Change {
        let map_key_topic = key.pattern.as_topic();
        let subscribers = match &map_key_topic {
            Some(topic) => self.exact.get_mut(topic),
            None => self.wildcard.get_mut(&key.pattern),
        };
        let Some(subscribers) = subscribers else {
            return Change::Unchanged;
        };
        let list = match &key.group {
            None => &mut subscribers.plain,
            Some(group) => match subscribers.groups.get_mut(group) {
                Some(members) => &mut members.sessions,
                None => return Change::Unchanged,
            },
        };
        if !list.remove(session) {
            return Change::Unchanged;
        }
        let now_empty = list.is_empty();
        if now_empty {
            if let Some(group) = &key.group {
                subscribers.groups.remove(group);
            }
            if subscribers.is_empty() {
                match map_key_topic {
                    Some(topic) => {
                        self.exact.remove(&topic);
                    }
                    None => {
                        self.wildcard.remove(&key.pattern);
                        self.wildcard_index.remove(&key.pattern, &key.pattern);
                    }
                }
            }
            Change::Last
        } else {
            Change::Other
        }
    }

    /// Hands `message` to every plain subscriber that matches and to one
    /// member of each group in `groups`; returns how many sessions got it.
    /// Their writers wake at the next [`wake_sessions`](Self::wake_sessions).
    pub fn deliver(&mut self, message: &Sequenced, groups: &[SubKey]) -> usize {
        let delivered = self.push_to_sessions(message, groups);
        // Once per message, not per session: a counter bumped from every
        // worker for every delivery was 2% of a fan-out node's CPU.
        METRICS.messages_out.add(delivered as u64);
        delivered
    }

    fn push_to_sessions(&mut self, message: &Sequenced, groups: &[SubKey]) -> usize {
        // Wildcard patterns with plain subscribers that match this topic
        // (allocates only when there are some).
        let mut matching: Vec<Pattern> = Vec::new();
        let wildcard = &self.wildcard;
        self.wildcard_index
            .for_each_match(&message.topic, |pattern| {
                if wildcard.get(pattern).is_some_and(|s| !s.plain.is_empty()) {
                    matching.push(pattern.clone());
                }
            });
        let exact = self.exact.get_mut(&message.topic);
        // The common case, one exact topic and no groups, needs no
        // de-duplication, even with unrelated wildcard subscriptions on the
        // shard.
        let wakes = &mut self.wakes;
        if matching.is_empty() && groups.is_empty() {
            return exact.map_or(0, |subs| push_all(&subs.plain, message, None, wakes));
        }
        self.seen.clear();
        let seen = &mut self.seen;
        let mut delivered = 0;
        if let Some(subs) = exact {
            delivered += push_all(&subs.plain, message, Some(seen), wakes);
        }
        for pattern in &matching {
            if let Some(subs) = self.wildcard.get(pattern) {
                delivered += push_all(&subs.plain, message, Some(&mut *seen), wakes);
            }
        }
        for key in groups {
            let Some(group) = &key.group else { continue };
            let subscribers = match key.pattern.as_topic() {
                Some(topic) => self.exact.get_mut(&topic),
                None => self.wildcard.get_mut(&key.pattern),
            };
            let Some(members) = subscribers.and_then(|s| s.groups.get_mut(group)) else {
                continue;
            };
            delivered += push_to_one(members, message, seen, wakes);
        }
        delivered
    }

    /// Wakes the writers of the sessions `deliver` queued messages for.
    /// The shard calls this after each batch of commands: until then the
    /// messages sit queued, unwritten.
    pub fn wake_sessions(&mut self) {
        self.wakes.wake_all();
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }

    /// (session, key) pairs held.
    pub fn entries(&self) -> usize {
        self.exact
            .values()
            .chain(self.wildcard.values())
            .map(|s| s.plain.len() + s.groups.values().map(|m| m.sessions.len()).sum::<usize>())
            .sum()
    }

    /// True when some session here holds `key`.
    pub fn holds(&self, key: &SubKey) -> bool {
        let subscribers = match key.pattern.as_topic() {
            Some(topic) => self.exact.get(&topic),
            None => self.wildcard.get(&key.pattern),
        };
        subscribers.is_some_and(|s| match &key.group {
            None => !s.plain.is_empty(),
            Some(group) => s.groups.contains_key(group),
        })
    }

    /// Every key held here on an exact topic: what this node registers with
    /// the topics' owners.
    pub fn exact_keys(&self) -> Vec<SubKey> {
        keys_of(
            self.exact
                .iter()
                .map(|(t, s)| (Pattern::from(t.clone()), s)),
        )
    }

    /// Every key held here on a wildcard pattern: what this node announces
    /// to every member.
    pub fn wildcard_keys(&self) -> Vec<SubKey> {
        keys_of(self.wildcard.iter().map(|(p, s)| (p.clone(), s)))
    }
}

fn keys_of<'a>(entries: impl Iterator<Item = (Pattern, &'a Subscribers)>) -> Vec<SubKey> {
    let mut keys = Vec::new();
    for (pattern, subscribers) in entries {
        if !subscribers.plain.is_empty() {
            keys.push(SubKey {
                pattern: pattern.clone(),
                group: None,
            });
        }
        for group in subscribers.groups.keys() {
            keys.push(SubKey {
                pattern: pattern.clone(),
                group: Some(group.clone()),
            });
        }
    }
    keys
}

fn push_one(session: &SessionHandle, message: &Sequenced, wakes: &mut Wakes) -> bool {
    session.push_deferred(message.encoded(session.codec).clone(), wakes) == Pushed::Queued
}

fn push_all(
    sessions: &Sessions,
    message: &Sequenced,
    mut seen: Option<&mut HashSet<SessionId>>,
    wakes: &mut Wakes,
) -> usize {
    let mut delivered = 0;
    for session in sessions.iter() {
        if let Some(seen) = seen.as_deref_mut() {
            if !seen.insert(session.id) {
                continue;
            }
        }
        delivered += usize::from(push_one(session, message, wakes));
    }
    delivered
}

/// Gives the message to the next member in turn that can take it. A member
/// that already got it through another subscription counts as served.
fn push_to_one(
    members: &mut Members,
    message: &Sequenced,
    seen: &mut HashSet<SessionId>,
    wakes: &mut Wakes,
) -> usize {
    let count = members.sessions.len();
    for _ in 0..count {
        members.next = (members.next + 1) % count;
        let Some(member) = members.sessions.get(members.next) else {
            return 0;
        };
        if seen.contains(&member.id) {
            return 0;
        }
        if member.is_closed() {
            continue;
        }
        seen.insert(member.id);
        return usize::from(push_one(member, message, wakes));
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{outbox, Outbox};
    use protocol::{Codec, Data};
    use std::sync::Arc;

    fn key(pattern: &str, group: Option<&str>) -> SubKey {
        SubKey {
            pattern: Pattern::parse(pattern).expect("pattern"),
            group: group.map(|g| GroupName::parse(g).expect("group")),
        }
    }

    fn session(id: SessionId) -> (SessionHandle, Outbox) {
        outbox(id, Codec::Json, 100, 1 << 20)
    }

    fn message(topic: &str, seq: u64) -> Sequenced {
        Sequenced::new(
            Topic::parse(topic).expect("topic"),
            seq,
            Arc::from("e"),
            Data::null(),
            None,
            None,
        )
    }

    #[test]
    fn a_session_gets_a_message_once_across_matching_subscriptions() {
        let mut local = LocalSubscriptions::default();
        let (s1, mut o1) = session(1);
        assert_eq!(local.add(&key("a.b", None), s1.clone()), Change::First);
        assert_eq!(local.add(&key("a.*", None), s1.clone()), Change::First);
        assert_eq!(local.add(&key("a.>", None), s1.clone()), Change::First);
        assert_eq!(local.add(&key("a.>", None), s1.clone()), Change::Unchanged);
        assert_eq!(local.deliver(&message("a.b", 1), &[]), 1);
        assert_eq!(o1.take().objects.len(), 1);
    }

    /// True when the writer's wake-up has been signalled (consumes it).
    async fn woken(outbox: &Outbox) -> bool {
        let ready = outbox.ready_signal();
        tokio::time::timeout(std::time::Duration::ZERO, ready.notified())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn writers_wake_once_for_a_run_of_messages() {
        let mut local = LocalSubscriptions::default();
        let (s1, mut o1) = session(1);
        let (s2, o2) = session(2);
        local.add(&key("t", None), s1);
        local.add(&key("t.>", None), s2);
        for seq in 1..=3 {
            assert_eq!(local.deliver(&message("t", seq), &[]), 1);
        }
        assert!(!woken(&o1).await, "woken before the run ended");
        local.wake_sessions();
        assert!(woken(&o1).await, "not woken after the run");
        assert!(!woken(&o1).await, "woken more than once");
        assert!(!woken(&o2).await, "a session given nothing was woken");
        assert_eq!(o1.take().objects.len(), 3);
    }

    #[test]
    fn groups_deliver_to_one_member_in_turn() {
        let mut local = LocalSubscriptions::default();
        let (s1, mut o1) = session(1);
        let (s2, mut o2) = session(2);
        let g = key("jobs.*", Some("workers"));
        assert_eq!(local.add(&g, s1), Change::First);
        assert_eq!(local.add(&g, s2), Change::Other);
        for seq in 1..=4 {
            assert_eq!(
                local.deliver(&message("jobs.x", seq), std::slice::from_ref(&g)),
                1
            );
        }
        assert_eq!((o1.take().objects.len(), o2.take().objects.len()), (2, 2));
        // Not assigned by the owner: nobody in the group gets it.
        assert_eq!(local.deliver(&message("jobs.x", 5), &[]), 0);
    }

    #[test]
    fn removal_reports_the_last_subscriber() {
        let mut local = LocalSubscriptions::default();
        let (s1, _o1) = session(1);
        let (s2, _o2) = session(2);
        let k = key("t", None);
        local.add(&k, s1);
        local.add(&k, s2);
        assert_eq!(local.remove(&k, 1), Change::Other);
        assert_eq!(local.remove(&k, 1), Change::Unchanged);
        assert_eq!(local.remove(&k, 2), Change::Last);
        assert!(local.is_empty());
    }

    #[test]
    fn wildcards_match_through_the_index_and_leave_nothing_behind() {
        let mut local = LocalSubscriptions::default();
        let (s1, mut o1) = session(1);
        let (s2, mut o2) = session(2);
        local.add(&key("user.*.events", None), s1.clone());
        local.add(&key("user.>", None), s2.clone());
        local.add(&key("other.*", None), s2.clone());
        local.add(&key("other.*", Some("g")), s1.clone());
        local.add(&key("other.*", Some("g")), s2.clone());
        assert_eq!(local.entries(), 5);
        local.remove(&key("other.*", Some("g")), 1);
        local.remove(&key("other.*", Some("g")), 2);
        assert_eq!(local.entries(), 3);
        assert_eq!(local.deliver(&message("user.7.events", 1), &[]), 2);
        assert_eq!(local.deliver(&message("user.7", 2), &[]), 1);
        assert_eq!(local.deliver(&message("user", 3), &[]), 0);
        assert_eq!((o1.take().objects.len(), o2.take().objects.len()), (1, 2));

        assert_eq!(local.remove(&key("user.*.events", None), 1), Change::Last);
        assert_eq!(local.deliver(&message("user.7.events", 4), &[]), 1);
        assert_eq!(o1.take().objects.len(), 0);
        local.remove(&key("user.>", None), 2);
        local.remove(&key("other.*", None), 2);
        assert!(local.is_empty());
        assert!(local.wildcard_index.is_empty());
        assert_eq!(local.entries(), 0);
    }

    #[test]
    fn many_sessions_on_one_key_add_deliver_and_leave() {
        let mut local = LocalSubscriptions::default();
        let k = key("broadcast", None);
        let g = key("jobs", Some("workers"));
        let count = 3 * SMALL_SESSION_SET as u64;
        let mut sessions: Vec<(SessionHandle, Outbox)> = (1..=count).map(session).collect();
        for (i, (handle, _)) in sessions.iter().enumerate() {
            let expected = if i == 0 { Change::First } else { Change::Other };
            assert_eq!(local.add(&k, handle.clone()), expected);
            assert_eq!(local.add(&k, handle.clone()), Change::Unchanged);
            assert_eq!(local.add(&g, handle.clone()), expected);
        }
        assert_eq!(local.deliver(&message("broadcast", 1), &[]), count as usize);
        // The group gives one message to each member in turn.
        for seq in 1..=count {
            assert_eq!(
                local.deliver(&message("jobs", seq), std::slice::from_ref(&g)),
                1
            );
        }
        for (_, outbox) in &mut sessions {
            assert_eq!(outbox.take().objects.len(), 2);
        }
        // Half leave, from all over the set.
        for id in (1..=count).filter(|id| id % 2 == 0) {
            assert_eq!(local.remove(&k, id), Change::Other);
            assert_eq!(local.remove(&k, id), Change::Unchanged);
        }
        assert_eq!(
            local.deliver(&message("broadcast", 2), &[]),
            count as usize / 2
        );
        for (id, (_, outbox)) in (1..=count).zip(&mut sessions) {
            let expected = usize::from(id % 2 == 1);
            assert_eq!(outbox.take().objects.len(), expected, "session {id}");
        }
        for id in (1..=count).filter(|id| id % 2 == 1) {
            let last = id == count - 1;
            let expected = if last { Change::Last } else { Change::Other };
            assert_eq!(local.remove(&k, id), expected);
        }
        for id in 1..=count {
            let expected = if id == count {
                Change::Last
            } else {
                Change::Other
            };
            assert_eq!(local.remove(&g, id), expected);
        }
        assert!(local.is_empty());
    }
}
