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

/// Whether `value` falls in `bucket` (see [`log2_bucket`]): two shifts and
/// a compare, against the five halving steps of finding its bucket. A
/// connection's RTT and window stay in one bucket for many segments, so
/// the per-segment path checks the bucket of its last segment first.
#[inline(always)]
pub fn in_bucket(value: u32, bucket: usize) -> bool {
    match bucket {
        0 => value == 0,
        // The last bucket also holds everything larger.
        b if b >= LOG2_BUCKETS - 1 => value >> (LOG2_BUCKETS - 2) != 0,
        b => value >> (b - 1) == 1,
    }
}

/// The bucket of `value`, where `last` holds the bucket of the previous
/// value of the same series (updated when it moved).
#[inline(always)]
pub fn log2_bucket_from(value: u32, last: &mut u8) -> usize {
    let bucket = usize::from(*last);
    if in_bucket(value, bucket) {
        return bucket;
    }
    let bucket = log2_bucket(value);
    *last = bucket as u8;
    bucket
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

    #[test]
    fn in_bucket_agrees_with_log2_bucket() {
        let values = (0..=4096u32).chain((12..32).flat_map(|shift| [(1u32 << shift) - 1, 1 << shift, (1 << shift) + 1])).chain([u32::MAX]);
        for value in values {
            let own = log2_bucket(value);
            for bucket in 0..LOG2_BUCKETS {
                assert_eq!(in_bucket(value, bucket), bucket == own, "value {value}, bucket {bucket}");
            }
        }
    }

    #[test]
    fn the_last_bucket_is_remembered_and_moved() {
        let mut last = 0u8;
        assert_eq!(log2_bucket_from(100, &mut last), 7);
        assert_eq!(last, 7);
        assert_eq!(log2_bucket_from(127, &mut last), 7);
        assert_eq!(log2_bucket_from(128, &mut last), 8);
        assert_eq!(last, 8);
        assert_eq!(log2_bucket_from(0, &mut last), 0);
        assert_eq!(last, 0);
    }
}
