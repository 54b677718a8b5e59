//! What netlens counts per endpoint (and for the whole host): plain sums
//! and histograms that can be subtracted, so "other" = host − tracked.

use hdrhistogram::Histogram;

use super::buckets::{Buckets, ACCEPT_WAIT_SECONDS, HANDSHAKE_SECONDS, HELD_BYTES, LIFETIME_SECONDS, SRTT_SECONDS, STALL_SECONDS};
use crate::event::{ConnEvent, Detail, Direction, FailReason, WindowSide};

/// Slots of the `[_; 3]` arrays indexed by direction.
pub const ACTIVE: usize = 0;
pub const PASSIVE: usize = 1;
/// Connections netlens did not see open (started before it, or lost by the flow table).
pub const UNKNOWN: usize = 2;
pub const DIRECTIONS: [&str; 3] = ["active", "passive", "unknown"];

pub const RETRANSMIT_KINDS: [&str; 3] = ["data", "syn", "synack"];
pub const RESET_DIRECTIONS: [&str; 2] = ["sent", "received"];
pub const FAIL_REASONS: [FailReason; 6] = [
    FailReason::Reset,
    FailReason::Timeout,
    FailReason::Unreachable,
    FailReason::Aborted,
    FailReason::NoLocalPort,
    // Last: where a reason this table lacks would go.
    FailReason::Error,
];
pub const WINDOW_SIDES: [WindowSide; 2] = [WindowSide::Peer, WindowSide::Local];

/// A lifetime under this is churn ("short-lived").
const SHORT_LIVED_NS: u64 = 1_000_000_000;

fn direction_slot(direction: Option<Direction>) -> usize {
    match direction {
        Some(Direction::Active) => ACTIVE,
        Some(Direction::Passive) => PASSIVE,
        None => UNKNOWN,
    }
}

/// Exact quantiles of per-connection values, in microseconds, 1 µs to 100 s
/// at 2 significant digits (1 % error, ~20 KB).
fn quantile_histogram() -> Box<Histogram<u64>> {
    Box::new(Histogram::new_with_bounds(1, 100_000_000, 2).expect("static bounds are valid"))
}

fn record_us(histogram: &mut Option<Box<Histogram<u64>>>, ns: u64) {
    let us = (ns / 1_000).clamp(1, 100_000_000);
    histogram.get_or_insert_with(quantile_histogram).saturating_record(us);
}

#[derive(Clone, Debug)]
pub struct ConnStats {
    pub opened: [u64; 3],
    pub closed: [u64; 3],
    /// Closed connections with a known lifetime, and those under 1 s.
    pub closed_with_lifetime: u64,
    pub short_lived: u64,
    pub handshake: [Buckets; 2],
    pub handshake_failures: [[u64; FAIL_REASONS.len()]; 3],
    /// Segments, by RETRANSMIT_KINDS.
    pub retransmits: [u64; 3],
    pub resets: [u64; 2],
    pub lifetime: [Buckets; 3],
    pub hol_stall: Buckets,
    pub hol_held_bytes: Buckets,
    pub hol_stall_ns: u64,
    pub zero_window: [Buckets; 2],
    pub zero_window_ns: u64,
    pub srtt: Buckets,
    pub slow_start_exits: u64,
    /// Segments sent, and retransmitted, by closed connections: the same
    /// connections on both sides of retransmits per 1,000 (the live
    /// retransmit events also count connections still open, or opened
    /// before netlens, whose segments are not known yet).
    pub segs_out: u64,
    pub retransmits_closed: u64,
    /// Closed while still in slow start.
    pub closed_in_slow_start: u64,
    /// Time accepted connections waited in the accept queue.
    pub accept_wait: Buckets,
    /// Connections dropped on a full accept queue (listen overflows).
    pub listen_overflows: u64,
    /// For exact quantiles (top's p50/p99); not subtracted into "other".
    pub handshake_us: Option<Box<Histogram<u64>>>,
    pub hol_stall_us: Option<Box<Histogram<u64>>>,
    pub accept_wait_us: Option<Box<Histogram<u64>>>,
}

impl Default for ConnStats {
    fn default() -> Self {
        Self {
            opened: [0; 3],
            closed: [0; 3],
            closed_with_lifetime: 0,
            short_lived: 0,
            handshake: [Buckets::new(HANDSHAKE_SECONDS), Buckets::new(HANDSHAKE_SECONDS)],
            handshake_failures: [[0; FAIL_REASONS.len()]; 3],
            retransmits: [0; 3],
            resets: [0; 2],
            lifetime: std::array::from_fn(|_| Buckets::new(LIFETIME_SECONDS)),
            hol_stall: Buckets::new(STALL_SECONDS),
            hol_held_bytes: Buckets::new(HELD_BYTES),
            hol_stall_ns: 0,
            zero_window: [Buckets::new(STALL_SECONDS), Buckets::new(STALL_SECONDS)],
            zero_window_ns: 0,
            srtt: Buckets::new(SRTT_SECONDS),
            slow_start_exits: 0,
            segs_out: 0,
            retransmits_closed: 0,
            closed_in_slow_start: 0,
            accept_wait: Buckets::new(ACCEPT_WAIT_SECONDS),
            listen_overflows: 0,
            handshake_us: None,
            hol_stall_us: None,
            accept_wait_us: None,
        }
    }
}

impl ConnStats {
    pub fn record(&mut self, event: &ConnEvent) {
        let direction = direction_slot(event.direction);
        match &event.detail {
            Detail::Handshake { direction: opened, handshake_ns } => {
                let slot = direction_slot(Some(*opened));
                self.opened[slot] += 1;
                self.handshake[slot].observe(*handshake_ns as f64 / 1e9);
                record_us(&mut self.handshake_us, *handshake_ns);
            }
            Detail::HandshakeFailed { reason, .. } => {
                let reason_slot = FAIL_REASONS.iter().position(|r| r == reason).unwrap_or(FAIL_REASONS.len() - 1);
                self.handshake_failures[direction][reason_slot] += 1;
            }
            Detail::Retransmit { state, segs, .. } => {
                let kind = if *state == netlens_common::tcp_state::SYN_SENT { 1 } else { 0 };
                self.retransmits[kind] += u64::from(*segs);
            }
            Detail::SynackRetransmit => self.retransmits[2] += 1,
            Detail::ResetSent { .. } => self.resets[0] += 1,
            Detail::ResetReceived => self.resets[1] += 1,
            Detail::HolStall { stall_ns, bytes_held, .. } => {
                self.hol_stall.observe(*stall_ns as f64 / 1e9);
                self.hol_held_bytes.observe(f64::from(*bytes_held));
                self.hol_stall_ns += stall_ns;
                record_us(&mut self.hol_stall_us, *stall_ns);
            }
            Detail::ZeroWindow { side, stall_ns } => {
                let slot = WINDOW_SIDES.iter().position(|s| s == side).unwrap_or(0);
                self.zero_window[slot].observe(*stall_ns as f64 / 1e9);
                self.zero_window_ns += stall_ns;
            }
            Detail::SlowStartExit { .. } => self.slow_start_exits += 1,
            Detail::Accepted { wait_ns, .. } => {
                self.accept_wait.observe(*wait_ns as f64 / 1e9);
                record_us(&mut self.accept_wait_us, *wait_ns);
            }
            Detail::ListenOverflow { dropped, .. } => self.listen_overflows += dropped,
            Detail::Close { direction: opened, lifetime_ns, transport, retransmits, .. } => {
                let slot = direction_slot(*opened);
                self.closed[slot] += 1;
                if let Some(lifetime_ns) = lifetime_ns {
                    self.lifetime[slot].observe(*lifetime_ns as f64 / 1e9);
                    self.closed_with_lifetime += 1;
                    self.short_lived += u64::from(*lifetime_ns < SHORT_LIVED_NS);
                }
                self.segs_out += u64::from(transport.segs_out);
                self.retransmits_closed += u64::from(*retransmits);
                if transport.srtt_us > 0 {
                    self.srtt.observe(f64::from(transport.srtt_us) / 1e6);
                }
                if transport.slow_start_exit_ns.is_none() && opened.is_some() {
                    self.closed_in_slow_start += 1;
                }
            }
        }
    }

    /// Takes `part` out of this total (the `other` endpoint).
    pub fn subtract(&mut self, part: &ConnStats) {
        fn sub<const N: usize>(mine: &mut [u64; N], theirs: &[u64; N]) {
            for (m, t) in mine.iter_mut().zip(theirs) {
                *m = m.saturating_sub(*t);
            }
        }
        sub(&mut self.opened, &part.opened);
        sub(&mut self.closed, &part.closed);
        self.closed_with_lifetime = self.closed_with_lifetime.saturating_sub(part.closed_with_lifetime);
        self.short_lived = self.short_lived.saturating_sub(part.short_lived);
        for (mine, theirs) in self.handshake.iter_mut().zip(&part.handshake) {
            mine.subtract(theirs);
        }
        for (mine, theirs) in self.handshake_failures.iter_mut().zip(&part.handshake_failures) {
            sub(mine, theirs);
        }
        sub(&mut self.retransmits, &part.retransmits);
        sub(&mut self.resets, &part.resets);
        for (mine, theirs) in self.lifetime.iter_mut().zip(&part.lifetime) {
            mine.subtract(theirs);
        }
        self.hol_stall.subtract(&part.hol_stall);
        self.hol_held_bytes.subtract(&part.hol_held_bytes);
        self.hol_stall_ns = self.hol_stall_ns.saturating_sub(part.hol_stall_ns);
        for (mine, theirs) in self.zero_window.iter_mut().zip(&part.zero_window) {
            mine.subtract(theirs);
        }
        self.zero_window_ns = self.zero_window_ns.saturating_sub(part.zero_window_ns);
        self.srtt.subtract(&part.srtt);
        self.slow_start_exits = self.slow_start_exits.saturating_sub(part.slow_start_exits);
        self.segs_out = self.segs_out.saturating_sub(part.segs_out);
        self.retransmits_closed = self.retransmits_closed.saturating_sub(part.retransmits_closed);
        self.closed_in_slow_start = self.closed_in_slow_start.saturating_sub(part.closed_in_slow_start);
        self.accept_wait.subtract(&part.accept_wait);
        self.listen_overflows = self.listen_overflows.saturating_sub(part.listen_overflows);
        self.handshake_us = None;
        self.hol_stall_us = None;
        self.accept_wait_us = None;
    }

    /// Retransmitted segments per 1,000 sent, over closed connections
    /// (`None` before the first close that sent anything).
    pub fn retransmits_per_1k_segs(&self) -> Option<f64> {
        (self.segs_out > 0).then(|| self.retransmits_closed as f64 * 1_000.0 / self.segs_out as f64)
    }

    pub fn opened_total(&self) -> u64 {
        self.opened.iter().sum()
    }

    pub fn retransmits_total(&self) -> u64 {
        self.retransmits.iter().sum()
    }

    pub fn hol_stalls(&self) -> u64 {
        self.hol_stall.count()
    }

    pub fn zero_windows(&self) -> u64 {
        self.zero_window.iter().map(Buckets::count).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{sample, Dynamics};

    #[test]
    fn counts_each_event_where_it_belongs() {
        let mut stats = ConnStats::default();
        stats.record(&sample(Detail::Handshake { direction: Direction::Passive, handshake_ns: 300_000 }));
        stats.record(&sample(Detail::Retransmit { state: netlens_common::tcp_state::SYN_SENT, segs: 1, bytes: 1, seq: 0 }));
        stats.record(&sample(Detail::Retransmit { state: netlens_common::tcp_state::ESTABLISHED, segs: 3, bytes: 4344, seq: 0 }));
        stats.record(&sample(Detail::SynackRetransmit));
        stats.record(&sample(Detail::HolStall { stall_ns: 2_000_000, bytes_held: 3000, ooo_segments: 2 }));
        stats.record(&sample(Detail::Close {
            direction: Some(Direction::Passive),
            lifetime_ns: Some(5_000_000),
            bytes_sent: 1,
            bytes_received: 1,
            retransmits: 3,
            spurious_retransmits: 0,
            transport: Dynamics { srtt_us: 40, ..Dynamics::default() },
        }));
        assert_eq!(stats.opened, [0, 1, 0]);
        assert_eq!(stats.handshake[PASSIVE].count(), 1);
        assert_eq!(stats.retransmits, [3, 1, 1]);
        assert_eq!(stats.hol_stalls(), 1);
        assert_eq!(stats.hol_stall_ns, 2_000_000);
        assert_eq!(stats.closed, [0, 1, 0]);
        assert_eq!(stats.short_lived, 1);
        assert_eq!(stats.closed_in_slow_start, 1);
        assert_eq!(stats.srtt.count(), 1);
        stats.record(&sample(Detail::Accepted { wait_ns: 300_000_000, queue_len: 0, backlog: 128 }));
        stats.record(&sample(Detail::ListenOverflow { dropped: 4, backlog: 2 }));
        assert_eq!(stats.accept_wait.count(), 1);
        assert_eq!(stats.listen_overflows, 4);
        let p50 = stats.handshake_us.as_ref().unwrap().value_at_quantile(0.5);
        assert!((297..=303).contains(&p50), "{p50}");
    }

    #[test]
    fn other_is_total_minus_parts() {
        let mut host = ConnStats::default();
        let mut tracked = ConnStats::default();
        let handshake = sample(Detail::Handshake { direction: Direction::Active, handshake_ns: 1_000 });
        host.record(&handshake);
        host.record(&handshake);
        tracked.record(&handshake);
        host.subtract(&tracked);
        assert_eq!(host.opened, [1, 0, 0]);
        assert_eq!(host.handshake[ACTIVE].count(), 1);
    }
}
