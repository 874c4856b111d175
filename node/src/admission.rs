//! Admission control: the connection cap, and the rate at which new
//! connections are taken once the node is past its soft threshold, so a
//! reconnect storm cannot flatten it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::metrics::{Rejection, METRICS};

#[derive(Debug)]
struct TokenBucket {
    tokens: f64,
    rate: f64,
    last: Instant,
}

impl TokenBucket {
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        // A burst of one second's worth at most.
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate.max(1.0));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Debug)]
pub struct Admission {
    active: AtomicUsize,
    max: usize,
    threshold: usize,
    soft_limit: usize,
    bucket: Mutex<TokenBucket>,
}

/// Holds one connection's place; dropping it frees the place.
#[derive(Debug)]
pub struct ConnectionPermit(Arc<Admission>);

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// `max` is the hard cap; above `threshold` new connections are
    /// admitted at `rate_per_second`; at `soft_limit` the node is
    /// overloaded (it should get no new clients).
    pub fn new(
        max: usize,
        threshold: usize,
        rate_per_second: u32,
        soft_limit: usize,
    ) -> Arc<Admission> {
        Arc::new(Admission {
            active: AtomicUsize::new(0),
            max,
            threshold,
            soft_limit,
            bucket: Mutex::new(TokenBucket {
                tokens: f64::from(rate_per_second),
                rate: f64::from(rate_per_second),
                last: Instant::now(),
            }),
        })
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// At or past the soft limit (or the hard cap, when that is lower): the
    /// node should get no new clients.
    pub fn overloaded(&self) -> bool {
        self.active() >= self.soft_limit.min(self.max)
    }

    pub fn try_admit(self: &Arc<Self>) -> Result<ConnectionPermit, Rejection> {
        let mut current = self.active();
        loop {
            if current >= self.max {
                METRICS.rejected(Rejection::ConnectionLimit);
                return Err(Rejection::ConnectionLimit);
            }
            if current >= self.threshold {
                let admitted = self
                    .bucket
                    .lock()
                    .map(|mut bucket| bucket.take(Instant::now()))
                    .unwrap_or(false);
                if !admitted {
                    METRICS.rejected(Rejection::AdmissionRate);
                    return Err(Rejection::AdmissionRate);
                }
            }
            match self.active.compare_exchange(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(ConnectionPermit(self.clone())),
                Err(actual) => current = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_rate_limits() {
        let admission = Admission::new(5, 2, 1, 4);
        let a = admission.try_admit().expect("below threshold");
        let _b = admission.try_admit().expect("below threshold");
        // Past the threshold: one per second, and the bucket starts full.
        let _c = admission.try_admit().expect("one token");
        assert!(matches!(
            admission.try_admit(),
            Err(Rejection::AdmissionRate)
        ));
        drop(a);
        assert_eq!(admission.active(), 2);
        let full = Admission::new(1, 10, 10, 1);
        let _only = full.try_admit().expect("first");
        assert!(matches!(full.try_admit(), Err(Rejection::ConnectionLimit)));
    }
}
