//! Delivery bookkeeping: loss, duplicates, order, and latency.
//!
//! Each subscriber owns a [`DeliveryTracker`] (a bitmap of message indices
//! seen, plus Herald's `seq` checks). Latencies are buffered per subscriber
//! and flushed in batches into one histogram per process; child processes
//! send their [`GroupReport`] to the parent as JSON, where reports merge.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::session::Delivery;

/// Latencies recorded up to this many nanoseconds (10 minutes); longer ones are clamped.
const MAX_LATENCY_NS: u64 = 600_000_000_000;
/// Latencies buffered by a subscriber before they go into the shared histogram.
const LATENCY_BATCH: usize = 512;

/// A latency histogram in nanoseconds, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    // Bounds are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("valid histogram bounds")
}

/// A histogram shared by the subscribers of one process.
pub type SharedHistogram = Arc<Mutex<Histogram<u64>>>;

/// Per-subscriber state.
pub struct DeliveryTracker {
    expected: u64,
    seen: Vec<u64>,
    received: u64,
    distinct: u64,
    duplicates: u64,
    out_of_order: u64,
    beyond_range: u64,
    malformed: u64,
    max_index: Option<u64>,
    subscribed_at_seq: Option<u64>,
    first_seq: Option<u64>,
    last_seq: Option<u64>,
    seq_gaps: u64,
    seq_backwards: u64,
    first_delivery_ns: Option<u64>,
    last_delivery_ns: Option<u64>,
    latencies: Vec<u64>,
    histogram: SharedHistogram,
}

impl DeliveryTracker {
    /// Tracks `expected` messages (indices `0..expected`).
    pub fn new(expected: u64, subscribed_at_seq: Option<u64>, histogram: SharedHistogram) -> Self {
        DeliveryTracker {
            expected,
            seen: vec![0; expected.div_ceil(64) as usize],
            received: 0,
            distinct: 0,
            duplicates: 0,
            out_of_order: 0,
            beyond_range: 0,
            malformed: 0,
            max_index: None,
            subscribed_at_seq,
            first_seq: None,
            last_seq: None,
            seq_gaps: 0,
            seq_backwards: 0,
            first_delivery_ns: None,
            last_delivery_ns: None,
            latencies: Vec::with_capacity(LATENCY_BATCH),
            histogram,
        }
    }

    /// Whether every expected message arrived.
    pub fn complete(&self) -> bool {
        self.distinct == self.expected
    }

    /// Records one delivery received at `now_ns`.
    pub fn record(&mut self, delivery: Delivery, now_ns: u64) {
        self.received += 1;
        self.first_delivery_ns.get_or_insert(now_ns);
        self.last_delivery_ns = Some(now_ns);
        if let Some(seq) = delivery.seq {
            self.record_seq(seq);
        }
        let Some((index, sent_ns)) = delivery.payload else {
            self.malformed += 1;
            return;
        };
        if index >= self.expected {
            self.beyond_range += 1;
            return;
        }
        let (word, bit) = ((index / 64) as usize, 1u64 << (index % 64));
        if self.seen[word] & bit != 0 {
            self.duplicates += 1;
            return;
        }
        self.seen[word] |= bit;
        self.distinct += 1;
        match self.max_index {
            Some(max) if index < max => self.out_of_order += 1,
            _ => self.max_index = Some(index),
        }
        self.latencies.push(now_ns.saturating_sub(sent_ns).max(1));
        if self.latencies.len() >= LATENCY_BATCH {
            self.flush_latencies();
        }
    }

    fn record_seq(&mut self, seq: u64) {
        match self.last_seq {
            None => {
                self.first_seq = Some(seq);
                self.last_seq = Some(seq);
            }
            Some(last) if seq == last + 1 => self.last_seq = Some(seq),
            Some(last) if seq > last => {
                self.seq_gaps += seq - last - 1;
                self.last_seq = Some(seq);
            }
            Some(_) => self.seq_backwards += 1,
        }
    }

    fn flush_latencies(&mut self) {
        let mut histogram = self
            .histogram
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for &latency in &self.latencies {
            histogram.saturating_record(latency.min(MAX_LATENCY_NS));
        }
        drop(histogram);
        self.latencies.clear();
    }

    /// Final counts; `final_seq` is the publisher's last acknowledged `seq` (Herald).
    pub fn finish(mut self, final_seq: Option<u64>) -> DeliveryTally {
        self.flush_latencies();
        let seq_checked = self.first_seq.is_some() || self.subscribed_at_seq.is_some();
        let mut seq_lost = self.seq_gaps;
        if let (Some(first), Some(at)) = (self.first_seq, self.subscribed_at_seq) {
            seq_lost += first.saturating_sub(at + 1);
        }
        match (self.last_seq, self.subscribed_at_seq, final_seq) {
            (Some(last), _, Some(fin)) => seq_lost += fin.saturating_sub(last),
            (None, Some(at), Some(fin)) => seq_lost += fin.saturating_sub(at),
            _ => {}
        }
        DeliveryTally {
            subscribers: 1,
            expected: self.expected,
            received: self.received,
            distinct: self.distinct,
            lost: self.expected - self.distinct,
            duplicates: self.duplicates,
            out_of_order: self.out_of_order,
            beyond_range: self.beyond_range,
            malformed: self.malformed,
            seq_checked_subscribers: u64::from(seq_checked),
            seq_lost,
            seq_out_of_order: self.seq_backwards,
            complete_subscribers: u64::from(self.distinct == self.expected),
            first_delivery_ns: self.first_delivery_ns,
            last_delivery_ns: self.last_delivery_ns,
            ..DeliveryTally::default()
        }
    }
}

/// Counts over one or more subscribers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeliveryTally {
    pub subscribers: u64,
    /// Messages each subscriber should have received.
    pub expected: u64,
    pub received: u64,
    pub distinct: u64,
    /// By message index: expected minus distinct.
    pub lost: u64,
    pub duplicates: u64,
    /// Arrivals with an index lower than one already seen.
    pub out_of_order: u64,
    /// Indices outside the run (another publisher on the topic?).
    pub beyond_range: u64,
    /// Payloads that could not be read.
    pub malformed: u64,
    pub seq_checked_subscribers: u64,
    /// By `seq`: numbers skipped between the subscription and the last publish.
    pub seq_lost: u64,
    /// Arrivals whose `seq` was not above the previous one.
    pub seq_out_of_order: u64,
    pub complete_subscribers: u64,
    /// Subscribers whose connection ended before the run did.
    pub disconnected: u64,
    /// Close codes of those connections (`none` when the server sent none).
    pub close_codes: BTreeMap<String, u64>,
    /// Read or protocol errors on subscriber connections.
    pub errors: u64,
    pub first_error: Option<String>,
    /// `err` replies received by subscribers.
    pub server_errors: u64,
    pub first_delivery_ns: Option<u64>,
    pub last_delivery_ns: Option<u64>,
}

impl DeliveryTally {
    /// Adds another tally into this one.
    pub fn merge(&mut self, other: &DeliveryTally) {
        self.subscribers += other.subscribers;
        self.expected = self.expected.max(other.expected);
        self.received += other.received;
        self.distinct += other.distinct;
        self.lost += other.lost;
        self.duplicates += other.duplicates;
        self.out_of_order += other.out_of_order;
        self.beyond_range += other.beyond_range;
        self.malformed += other.malformed;
        self.seq_checked_subscribers += other.seq_checked_subscribers;
        self.seq_lost += other.seq_lost;
        self.seq_out_of_order += other.seq_out_of_order;
        self.complete_subscribers += other.complete_subscribers;
        self.disconnected += other.disconnected;
        for (code, count) in &other.close_codes {
            *self.close_codes.entry(code.clone()).or_default() += count;
        }
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        self.server_errors += other.server_errors;
        self.first_delivery_ns = min_opt(self.first_delivery_ns, other.first_delivery_ns);
        self.last_delivery_ns = self.last_delivery_ns.max(other.last_delivery_ns);
    }

    /// Notes that a subscriber's connection ended with `code`.
    pub fn note_disconnect(&mut self, code: Option<u16>) {
        self.disconnected += 1;
        let key = code.map_or_else(|| "none".to_string(), |c| c.to_string());
        *self.close_codes.entry(key).or_default() += 1;
    }

    /// Notes an error on a subscriber connection.
    pub fn note_error(&mut self, error: String) {
        self.errors += 1;
        self.first_error.get_or_insert(error);
    }
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// A histogram as `(value, count)` pairs, for sending between processes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HistogramData(pub Vec<(u64, u64)>);

impl HistogramData {
    pub fn from_histogram(histogram: &Histogram<u64>) -> Self {
        HistogramData(
            histogram
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        )
    }

    /// Adds these values into `histogram`.
    pub fn add_to(&self, histogram: &mut Histogram<u64>) {
        for &(value, count) in &self.0 {
            let _ = histogram.record_n(value.min(MAX_LATENCY_NS), count);
        }
    }
}

/// Latency percentiles in nanoseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ns: f64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
}

impl LatencySummary {
    pub fn of(histogram: &Histogram<u64>) -> Self {
        LatencySummary {
            count: histogram.len(),
            mean_ns: histogram.mean(),
            p50_ns: histogram.value_at_quantile(0.50),
            p90_ns: histogram.value_at_quantile(0.90),
            p99_ns: histogram.value_at_quantile(0.99),
            p999_ns: histogram.value_at_quantile(0.999),
            max_ns: histogram.max(),
        }
    }
}

/// Formats nanoseconds for people (µs below 1 ms, else ms).
pub fn fmt_ns(ns: u64) -> String {
    if ns < 1_000_000 {
        format!("{:.0} µs", ns as f64 / 1e3)
    } else {
        format!("{:.2} ms", ns as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(index: u64, seq: u64) -> Delivery {
        Delivery {
            payload: Some((index, 0)),
            seq: Some(seq),
        }
    }

    #[test]
    fn counts_loss_duplicates_and_order() {
        let histogram = Arc::new(Mutex::new(new_histogram()));
        let mut tracker = DeliveryTracker::new(5, Some(10), histogram.clone());
        for (index, seq) in [(0, 11), (2, 13), (1, 12), (2, 13), (4, 15)] {
            tracker.record(delivery(index, seq), 1_000);
        }
        let tally = tracker.finish(Some(15));
        assert_eq!(tally.received, 5);
        assert_eq!(tally.distinct, 4);
        assert_eq!(tally.lost, 1);
        assert_eq!(tally.duplicates, 1);
        assert_eq!(tally.out_of_order, 1);
        // seq: 11, 13 (gap of 1), 12 (backwards), 13 (backwards), 15 (gap of 1).
        assert_eq!(tally.seq_lost, 2);
        assert_eq!(tally.seq_out_of_order, 2);
        let recorded = histogram.lock().map(|h| h.len()).unwrap_or(0);
        assert_eq!(recorded, 4);
    }

    #[test]
    fn seq_loss_at_start_and_end() {
        let histogram = Arc::new(Mutex::new(new_histogram()));
        let mut tracker = DeliveryTracker::new(4, Some(0), histogram);
        tracker.record(delivery(1, 2), 5);
        tracker.record(delivery(2, 3), 5);
        let tally = tracker.finish(Some(4));
        assert_eq!(tally.seq_lost, 2);
        assert_eq!(tally.lost, 2);
    }

    #[test]
    fn histogram_data_round_trip() {
        let mut h = new_histogram();
        for v in [100, 2_000, 2_000, 5_000_000] {
            h.record(v).expect("record");
        }
        let data = HistogramData::from_histogram(&h);
        let mut back = new_histogram();
        data.add_to(&mut back);
        assert_eq!(back.len(), 4);
        assert_eq!(back.max(), h.max());
    }
}
