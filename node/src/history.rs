//! A topic's retained messages, bounded by count and by age, for recovery.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::owner::Sequenced;

/// The retained tail of one topic, oldest first, seqs consecutive.
#[derive(Debug, Default)]
pub struct History {
    entries: VecDeque<(Instant, Arc<Sequenced>)>,
}

impl History {
    /// Appends a message and drops what the limits no longer allow; returns
    /// how the number of retained messages changed.
    pub fn push(
        &mut self,
        message: Arc<Sequenced>,
        now: Instant,
        max_messages: usize,
        max_age: Duration,
    ) -> i64 {
        self.entries.push_back((now, message));
        let mut change = 1;
        while self.entries.len() > max_messages {
            self.entries.pop_front();
            change -= 1;
        }
        change - self.expire(now, max_age) as i64
    }

    /// Drops messages older than `max_age`; returns how many.
    pub fn expire(&mut self, now: Instant, max_age: Duration) -> usize {
        let mut dropped = 0;
        while let Some((at, _)) = self.entries.front() {
            if now.saturating_duration_since(*at) <= max_age {
                break;
            }
            self.entries.pop_front();
            dropped += 1;
        }
        dropped
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The seq of the oldest retained message.
    pub fn first_seq(&self) -> Option<u64> {
        self.entries.front().map(|(_, m)| m.seq)
    }

    /// Retained messages with seq greater than `since`, in order.
    pub fn after(&self, since: u64) -> impl Iterator<Item = &Arc<Sequenced>> {
        let skip = match self.first_seq() {
            Some(first) if since >= first => (since - first + 1) as usize,
            _ => 0,
        };
        self.entries.iter().skip(skip).map(|(_, m)| m)
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
    }
}
