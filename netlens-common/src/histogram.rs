//! Per-packet distributions kept in the kernel: log2 buckets, per CPU,
//! summed by userspace. Per-packet values never cross to userspace one by
//! one.

/// Bucket `i > 0` holds values in `[2^(i-1), 2^i)`; bucket 0 holds 0; the
/// last bucket also holds everything larger.
pub const LOG2_BUCKETS: usize = 32;

/// The bucket of `value` (shared by the kernel side and the tests).
#[inline(always)]
pub fn log2_bucket(value: u32) -> usize {
    // No count-leading-zeros instruction in BPF: five halving steps.
    let mut rest = value;
    let mut bits = 0usize;
    if rest >= 1 << 16 {
        rest >>= 16;
        bits += 16;
    }
    if rest >= 1 << 8 {
        rest >>= 8;
        bits += 8;
    }
    if rest >= 1 << 4 {
        rest >>= 4;
        bits += 4;
    }
    if rest >= 1 << 2 {
        rest >>= 2;
        bits += 2;
    }
    if rest >= 1 << 1 {
        bits += 1;
    }
    if value == 0 {
        0
    } else if bits + 1 < LOG2_BUCKETS {
        bits + 1
    } else {
        LOG2_BUCKETS - 1
    }
}

/// One per-CPU slot: the distributions `tcp_probe` keeps, one sample per
/// received segment of a tracked connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketHistograms {
    /// The socket's smoothed RTT (µs) as of each segment.
    pub srtt_us: [u64; LOG2_BUCKETS],
    /// Its congestion window (segments) as of each segment.
    pub cwnd: [u64; LOG2_BUCKETS],
}

impl Default for PacketHistograms {
    fn default() -> Self {
        Self { srtt_us: [0; LOG2_BUCKETS], cwnd: [0; LOG2_BUCKETS] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two() {
        assert_eq!(log2_bucket(0), 0);
        assert_eq!(log2_bucket(1), 1);
        assert_eq!(log2_bucket(2), 2);
        assert_eq!(log2_bucket(3), 2);
        assert_eq!(log2_bucket(4), 3);
        assert_eq!(log2_bucket(1023), 10);
        assert_eq!(log2_bucket(1024), 11);
        assert_eq!(log2_bucket(u32::MAX), LOG2_BUCKETS - 1);
    }
}
