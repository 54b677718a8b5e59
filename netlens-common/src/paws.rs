//! Whether the kernel will drop a received segment by PAWS (RFC 7323 §5,
//! Protection Against Wrapped Sequences): its timestamp is older than the
//! last one the connection accepted in order. `tcp:tcp_probe` sees each
//! segment before the kernel validates it, so the per-packet program asks
//! this of a segment it would count as queued out of order (the kernel
//! counts those it rejects in TcpExtPAWSEstab, not TcpExtTCPOFOQueue).
//! Pure logic, shared by the eBPF side and its unit tests; the test is
//! the kernel's `tcp_paws_check`, the timestamp found where senders put it
//! (see [`timestamp_value`]).

/// Bytes of a TCP header, options included, at most (`doff` is 4 bits of
/// 32-bit words).
pub const TCP_HEADER_MAX: usize = 60;
const TCP_HEADER_MIN: usize = 20;

/// A copy of a TCP header's first [`TCP_HEADER_MAX`] bytes.
pub type TcpHeader = [u8; TCP_HEADER_MAX];

/// The word that opens a timestamp option padded as RFC 7323's appendix
/// suggests and Linux, Windows and the BSDs send it: NOP, NOP, kind 8,
/// length 10.
const PADDED_TIMESTAMP: [u8; 4] = [1, 1, 8, 10];
/// A timestamp option without its padding, kind 8 and length 10.
const TIMESTAMP: [u8; 2] = [8, 10];
const RST: u8 = 0x04;

/// The kernel's replay window: a timestamp at most this far behind the
/// last accepted one passes (`TCP_PAWS_WINDOW`).
const PAWS_WINDOW: i32 = 1;

/// Seconds without a new in-order timestamp after which the kernel stops
/// the check (the peer's clock may have wrapped): `TCP_PAWS_WRAP`, 2,147 s,
/// on kernels with microsecond timestamps (6.7+, `tcp_sock.tcp_usec_ts`),
/// before them `TCP_PAWS_24DAYS`.
pub const PAWS_WRAP_S: u32 = 2_147;
pub const PAWS_24DAYS_S: u32 = 60 * 60 * 24 * 24;

/// What the socket remembers of the last in-order timestamp
/// (`tcp_sock.rx_opt`).
#[derive(Clone, Copy, Debug)]
pub struct Recent {
    /// `ts_recent`: that segment's TSval.
    pub tsval: u32,
    /// `ts_recent_stamp`: when it was taken, in seconds of the monotonic
    /// clock (`ktime_get_seconds`).
    pub stamp_s: i32,
}

/// Whether the kernel drops the segment whose TCP header is `header` by
/// PAWS, given what the socket remembers, the monotonic clock's seconds
/// now and the kernel's [`PAWS_WRAP_S`] or [`PAWS_24DAYS_S`]. For data
/// segments only (a pure ACK may pass as a "disordered ACK").
#[inline(always)]
pub fn rejects(header: &TcpHeader, recent: Recent, now_s: u32, wrap_s: u32) -> bool {
    // A reset is not dropped for its timestamp.
    if header[13] & RST != 0 {
        return false;
    }
    let Some(tsval) = timestamp_value(header) else { return false };
    // tcp_paws_check(): each of these lets the segment pass.
    let behind = recent.tsval.wrapping_sub(tsval) as i32;
    let deadline = (recent.stamp_s as u32).wrapping_add(wrap_s);
    let trusted = (now_s.wrapping_sub(deadline) as i32) < 0;
    behind > PAWS_WINDOW && trusted && recent.tsval != 0
}

/// The TSval of the header's timestamp option, if it carries one where
/// senders put it: the padded option at any 32-bit word of the options
/// (Linux writes every option in whole words, a signature's first), or
/// the bare option first. Not a walk of the options as the kernel's
/// parser does: each word here is at a constant offset, which the
/// verifier checks once, where a walk's offsets depend on every option
/// before (a 12-step walk took tcp_probe's verification from 5 to 37 ms).
/// A timestamp elsewhere (no sender known to us) reads as absent, and the
/// segment as accepted.
#[inline(always)]
pub fn timestamp_value(header: &TcpHeader) -> Option<u32> {
    let header_len = usize::from(header[12] >> 4) * 4;
    if header_len >= TCP_HEADER_MIN + 10 && header[TCP_HEADER_MIN..TCP_HEADER_MIN + 2] == TIMESTAMP {
        return Some(be32(header, TCP_HEADER_MIN + 2));
    }
    let mut word = TCP_HEADER_MIN;
    // Unrolled: `word` is a constant in each copy.
    while word + 12 <= TCP_HEADER_MAX {
        if word + 12 > header_len {
            return None;
        }
        if header[word..word + 4] == PADDED_TIMESTAMP {
            return Some(be32(header, word + 4));
        }
        word += 4;
    }
    None
}

#[inline(always)]
fn be32(header: &TcpHeader, at: usize) -> u32 {
    u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header of `options` (padded with EOL to whole words).
    fn header(options: &[u8], flags: u8) -> TcpHeader {
        let mut header = [0u8; TCP_HEADER_MAX];
        let words = (TCP_HEADER_MIN + options.len()).div_ceil(4);
        header[12] = (words as u8) << 4;
        header[13] = flags;
        header[TCP_HEADER_MIN..TCP_HEADER_MIN + options.len()].copy_from_slice(options);
        header
    }

    const ACK: u8 = 0x10;

    fn linux_timestamp(tsval: u32) -> [u8; 12] {
        let v = tsval.to_be_bytes();
        [1, 1, 8, 10, v[0], v[1], v[2], v[3], 0, 0, 0, 7]
    }

    #[test]
    fn finds_the_timestamp_where_linux_puts_it() {
        assert_eq!(timestamp_value(&header(&linux_timestamp(0xdead_beef), ACK)), Some(0xdead_beef));
    }

    #[test]
    fn finds_the_timestamp_behind_a_signature_and_before_sack() {
        // Linux with TCP-MD5: NOP, NOP, MD5 (18 bytes), then NOP, NOP, TS.
        let mut options = [0u8; 32];
        options[..4].copy_from_slice(&[1, 1, 19, 18]);
        options[4..20].copy_from_slice(&[0xab; 16]);
        options[20..].copy_from_slice(&linux_timestamp(256));
        assert_eq!(timestamp_value(&header(&options, ACK)), Some(256));
        // TS, then NOP, NOP, SACK of one block.
        let mut options = [0u8; 24];
        options[..12].copy_from_slice(&linux_timestamp(7));
        options[12..].copy_from_slice(&[1, 1, 5, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        assert_eq!(timestamp_value(&header(&options, ACK)), Some(7));
    }

    #[test]
    fn finds_a_bare_timestamp_first() {
        assert_eq!(timestamp_value(&header(&[8, 10, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1], ACK)), Some(256));
    }

    #[test]
    fn no_options_or_no_timestamp_is_none() {
        assert_eq!(timestamp_value(&header(&[], ACK)), None);
        assert_eq!(timestamp_value(&header(&[1, 1, 4, 2], ACK)), None);
        assert_eq!(timestamp_value(&header(&[1; 40], ACK)), None);
    }

    #[test]
    fn a_timestamp_past_the_header_is_none() {
        // The header ends 4 bytes into the option: the rest is payload.
        assert_eq!(timestamp_value(&header(&[1, 1, 8, 10, 0, 0, 0, 1], ACK)), None);
    }

    const NOW_S: u32 = 5_000;

    fn recent(tsval: u32) -> Recent {
        Recent { tsval, stamp_s: (NOW_S - 10) as i32 }
    }

    #[test]
    fn an_older_timestamp_is_rejected() {
        let old = header(&linux_timestamp(1_000), ACK);
        assert!(rejects(&old, recent(1_002), NOW_S, PAWS_WRAP_S));
        // Within the replay window, equal, newer, or across the wrap.
        assert!(!rejects(&old, recent(1_001), NOW_S, PAWS_WRAP_S));
        assert!(!rejects(&old, recent(1_000), NOW_S, PAWS_WRAP_S));
        assert!(!rejects(&old, recent(999), NOW_S, PAWS_WRAP_S));
        assert!(rejects(&header(&linux_timestamp(u32::MAX - 5), ACK), recent(3), NOW_S, PAWS_WRAP_S));
    }

    #[test]
    fn resets_untimed_segments_and_stale_memories_pass() {
        assert!(!rejects(&header(&linux_timestamp(1_000), ACK | RST), recent(5_000), NOW_S, PAWS_WRAP_S));
        assert!(!rejects(&header(&[], ACK), recent(5_000), NOW_S, PAWS_WRAP_S));
        // Nothing remembered yet.
        assert!(!rejects(&header(&linux_timestamp(1_000), ACK), recent(0), NOW_S, PAWS_WRAP_S));
        // Remembered longer ago than the kernel trusts it.
        let idle = Recent { tsval: 5_000, stamp_s: (NOW_S - PAWS_WRAP_S) as i32 };
        assert!(!rejects(&header(&linux_timestamp(1_000), ACK), idle, NOW_S, PAWS_WRAP_S));
        assert!(rejects(&header(&linux_timestamp(1_000), ACK), idle, NOW_S, PAWS_24DAYS_S));
    }
}
