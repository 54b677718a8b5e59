//! Fixed-bound histograms, Prometheus style: a count per bucket and a sum.
//! The bounds are chosen for what each one measures (README, "Metrics").

/// Handshakes, in seconds: 10 µs (same host) to 16 s. Below 1 s a bucket
/// every ~2.5×; from 1 s the bounds separate 1, 2 and 3 SYN retransmits
/// (the kernel retries after 1, 3 and 7 s).
pub const HANDSHAKE_SECONDS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.0, 4.0, 8.0, 16.0,
];

/// Head-of-line and zero-window stalls, in seconds: 100 µs to 30 s. 200 ms
/// is the minimum RTO: stalls above it waited for a timeout, not for fast
/// retransmit.
pub const STALL_SECONDS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Bytes held in the out-of-order queue: one segment to 16 MiB, ×4.
pub const HELD_BYTES: &[f64] = &[
    1_500.0, 6_000.0, 24_000.0, 96_000.0, 384_000.0, 1_536_000.0, 6_144_000.0, 16_777_216.0,
];

/// Connection lifetimes, in seconds: 1 ms to 1 h. Under 1 s is churn.
pub const LIFETIME_SECONDS: &[f64] =
    &[0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3_600.0];

/// Smoothed RTT at close, in seconds: 10 µs (loopback) to 2 s.
pub const SRTT_SECONDS: &[f64] = &[
    0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0,
];

/// Accept-queue waits, in seconds: 10 µs (accepted at once) to 10 s (an
/// overloaded or stuck server).
pub const ACCEPT_WAIT_SECONDS: &[f64] = &[
    0.000_01, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Counts per bucket (not cumulative; the last slot is +Inf) and the sum.
#[derive(Clone, Debug, PartialEq)]
pub struct Buckets {
    pub bounds: &'static [f64],
    pub counts: Vec<u64>,
    pub sum: f64,
}

impl Buckets {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0 }
    }

    pub fn observe(&mut self, value: f64) {
        // A scan from the lowest bound, not a binary search: most values
        // land in the same few low buckets, so it stops after a compare or
        // two that the branch predictor gets right (top spent a quarter of
        // its time in the binary search's dependent loads).
        let slot = self.bounds.iter().position(|&bound| bound >= value).unwrap_or(self.bounds.len());
        self.counts[slot] += 1;
        self.sum += value;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `self - other`: what is left of a total once tracked parts are taken
    /// out (the `other` series).
    pub fn subtract(&mut self, other: &Buckets) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine = mine.saturating_sub(*theirs);
        }
        self.sum = (self.sum - other.sum).max(0.0);
    }

    /// (upper bound, cumulative count) pairs without +Inf, as Prometheus
    /// exposes them.
    pub fn cumulative(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        self.bounds.iter().zip(self.counts.iter().scan(0u64, |running, count| {
            *running += count;
            Some(*running)
        })).map(|(bound, count)| (*bound, count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_on_a_bound_counts_in_that_bucket() {
        let mut buckets = Buckets::new(&[1.0, 2.0]);
        buckets.observe(1.0);
        buckets.observe(1.5);
        buckets.observe(9.0);
        assert_eq!(buckets.counts, vec![1, 1, 1]);
        assert_eq!(buckets.cumulative().collect::<Vec<_>>(), vec![(1.0, 1), (2.0, 2)]);
        assert_eq!(buckets.count(), 3);
        assert_eq!(buckets.sum, 11.5);
    }

    #[test]
    fn subtracting_leaves_the_rest() {
        let mut total = Buckets::new(&[1.0]);
        let mut part = Buckets::new(&[1.0]);
        for value in [0.5, 0.5, 3.0] {
            total.observe(value);
        }
        part.observe(0.5);
        total.subtract(&part);
        assert_eq!(total.counts, vec![1, 1]);
        assert_eq!(total.sum, 3.5);
    }

    #[test]
    fn bounds_ascend() {
        for bounds in [HANDSHAKE_SECONDS, STALL_SECONDS, HELD_BYTES, LIFETIME_SECONDS, SRTT_SECONDS, ACCEPT_WAIT_SECONDS] {
            assert!(bounds.windows(2).all(|pair| pair[0] < pair[1]));
        }
    }
}
