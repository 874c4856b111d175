//! A topic's retained messages, bounded by count and by age, for recovery,
//! and what they weigh: the owner bounds the sum over its topics
//! (`history.max_bytes`) by dropping the oldest messages first.

use std::collections::VecDeque;
use std::ops::{AddAssign, Sub};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::owner::Sequenced;

/// Bytes a retained message is counted as, beyond its topic and twice its
/// data (the data, and the `msg` encoded from it for local subscribers):
/// the message's own allocation, its encodings' headers, its places in the
/// history and in the owner's eviction order.
const PER_MESSAGE_BYTES: usize = 256;

/// What a retained message is counted as against `history.max_bytes`.
pub fn retained_size(message: &Sequenced) -> usize {
    PER_MESSAGE_BYTES + message.topic.as_str().len() + 2 * message.data.len()
}

/// How much some histories hold.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Retained {
    pub messages: usize,
    pub bytes: usize,
}

impl AddAssign for Retained {
    fn add_assign(&mut self, other: Retained) {
        self.messages += other.messages;
        self.bytes += other.bytes;
    }
}

impl Sub for Retained {
    type Output = (i64, i64);

    /// The change from `other` to `self`, in messages and bytes.
    fn sub(self, other: Retained) -> (i64, i64) {
        (
            self.messages as i64 - other.messages as i64,
            self.bytes as i64 - other.bytes as i64,
        )
    }
}

#[derive(Debug)]
struct Entry {
    at: Instant,
    /// [`retained_size`] when it was pushed.
    size: usize,
    message: Arc<Sequenced>,
}

/// The retained tail of one topic, oldest first, seqs consecutive.
#[derive(Debug, Default)]
pub struct History {
    entries: VecDeque<Entry>,
    bytes: usize,
}

impl History {
    /// Appends a message and drops what the limits no longer allow.
    pub fn push(
        &mut self,
        message: Arc<Sequenced>,
        now: Instant,
        max_messages: usize,
        max_age: Duration,
    ) {
        let size = retained_size(&message);
        self.bytes += size;
        self.entries.push_back(Entry {
            at: now,
            size,
            message,
        });
        while self.entries.len() > max_messages {
            self.pop_oldest();
        }
        self.expire(now, max_age);
    }

    /// Drops messages older than `max_age`; returns how many.
    pub fn expire(&mut self, now: Instant, max_age: Duration) -> usize {
        let mut dropped = 0;
        while let Some(entry) = self.entries.front() {
            if now.saturating_duration_since(entry.at) <= max_age {
                break;
            }
            self.pop_oldest();
            dropped += 1;
        }
        dropped
    }

    /// Drops the oldest message, if any.
    pub fn pop_oldest(&mut self) {
        if let Some(entry) = self.entries.pop_front() {
            self.bytes -= entry.size;
        }
    }

    pub fn retained(&self) -> Retained {
        Retained {
            messages: self.entries.len(),
            bytes: self.bytes,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The seq of the oldest retained message.
    pub fn first_seq(&self) -> Option<u64> {
        self.entries.front().map(|e| e.message.seq)
    }

    /// Retained messages with seq greater than `since`, in order.
    pub fn after(&self, since: u64) -> impl Iterator<Item = &Arc<Sequenced>> {
        let skip = match self.first_seq() {
            Some(first) if since >= first => (since - first + 1) as usize,
            _ => 0,
        };
        self.entries.iter().skip(skip).map(|e| &e.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{Data, Topic};

    fn message(seq: u64) -> Arc<Sequenced> {
        Arc::new(Sequenced::new(
            Topic::parse("t").expect("topic"),
            seq,
            Arc::from("e"),
            Data::null(),
            None,
            None,
        ))
    }

    #[test]
    fn keeps_the_newest_by_count() {
        let mut h = History::default();
        let now = Instant::now();
        for seq in 1..=5 {
            h.push(message(seq), now, 3, Duration::from_secs(60));
        }
        assert_eq!(h.first_seq(), Some(3));
        let after: Vec<u64> = h.after(3).map(|m| m.seq).collect();
        assert_eq!(after, vec![4, 5]);
        assert_eq!(h.after(0).count(), 3);
        assert_eq!(h.after(5).count(), 0);
        let one = retained_size(&message(1));
        assert_eq!(
            h.retained(),
            Retained {
                messages: 3,
                bytes: 3 * one
            }
        );
    }

    #[test]
    fn expires_by_age() {
        let mut h = History::default();
        let start = Instant::now();
        h.push(message(1), start, 10, Duration::from_secs(1));
        h.push(
            message(2),
            start + Duration::from_secs(2),
            10,
            Duration::from_secs(1),
        );
        assert_eq!(h.first_seq(), Some(2));
        assert_eq!(
            h.expire(start + Duration::from_secs(5), Duration::from_secs(1)),
            1
        );
        assert!(h.is_empty());
        assert_eq!(h.retained(), Retained::default());
    }
}
