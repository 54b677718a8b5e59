//! Per-endpoint evidence for the doctor's rules, accumulated from the
//! event stream. The counts `aggregate::stats::ConnStats` already keeps
//! (opened, short-lived, closed in slow start, handshake and HOL-stall
//! quantiles, SYN retransmits, listen overflows) are reused as they are;
//! this adds only what the rules need beyond them: bytes per closed
//! connection, slow handshakes by SYN-retransmit band, RTO-sized stalls per
//! connection, zero windows per side, per-process connect failures and
//! retransmits per segment net of spurious ones.

use std::{collections::hash_map::Entry, net::SocketAddr};

// Hashed per event: foldhash, not std's SipHash.
use foldhash::{HashMap, HashMapExt};

use crate::{
    aggregate::{
        endpoint::{EndpointBy, EndpointKey},
        stats::ConnStats,
    },
    census::Census,
    event::{ConnEvent, Detail, FailReason, WindowSide},
};
use netlens_common::tcp_state;

/// Endpoints tracked at most; beyond, new endpoints are counted as
/// untracked (said in the report) so memory stays bounded on any host.
pub const MAX_ENDPOINTS: usize = 4_096;
/// Connections with RTO-sized stalls remembered until their close.
const MAX_STALLED_FLOWS: usize = 16_384;
/// Connect-failure timestamps kept per endpoint (enough for any rate the
/// rules test; more only repeats the pattern).
const MAX_FAILURES: usize = 4_096;

/// A lifetime under this is short-lived (the same bound as
/// `aggregate::stats`).
pub const SHORT_LIVED_NS: u64 = 1_000_000_000;
/// Payload under this (both directions) is "small": with an initial
/// window of 10 segments (~14 KB) a connection this size is done within a
/// few round trips of slow start and never reaches a full window.
pub const SMALL_BYTES: u64 = 64 * 1024;
/// A stall at least this long waited for a retransmission timeout: Linux's
/// minimum RTO is 200 ms (TCP_RTO_MIN); fast retransmit and tail-loss
/// probes recover within a few RTTs, far below it on any sane path.
pub const RTO_MIN_NS: u64 = 200_000_000;
/// The same segment retransmitted this many times in a row is stuck: with
/// RTO backoff (200 ms, 400 ms, 800 ms, 1.6 s) that is ≥ 3 s without
/// progress. Random loss loses one segment four times in a row with
/// probability p⁴ (1e-8 at 1 %), and recovery from a burst needs one or two
/// timeouts; a black hole never recovers.
pub const STUCK_REPEATS: u32 = 4;
/// And at least this long between its first and last retransmission: RTO
/// backoff spreads four of them over ≥ 2.8 s (0.2 + 0.4 + 0.8 + 1.6 s from
/// the first send), whereas recovery can retransmit one segment many times
/// within a few hundred milliseconds (measured: 15 times in 635 ms under a
/// 300 ms drop of that segment) and then get through.
pub const STUCK_MIN_NS: u64 = 2_000_000_000;
/// A connection that lived this long or moved this much is "long-lived,
/// many bytes" for head-of-line blocking.
const LONG_LIVED_NS: u64 = 1_000_000_000;
const MANY_BYTES: u64 = 1 << 20;

/// Zero-window time and episodes on one side.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WindowStalls {
    pub episodes: u64,
    pub total_ns: u64,
    pub longest_ns: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Evidence {
    /// What the aggregator counts for an endpoint.
    pub stats: ConnStats,
    /// Closed connections short-lived (< 1 s) and small (< 64 KiB).
    pub closed_short_small: u64,
    /// Closed connections with a known lifetime and direction.
    pub closed_known: u64,
    /// Payload bytes of closed connections, both directions.
    pub bytes: u64,
    /// Handshakes by SYN-retransmit band: ~1 s (one retransmit), ~3 s
    /// (two), ≥ 7 s (three or more).
    pub slow_handshakes: [u64; 3],
    /// Connect attempts that timed out (the SYN was never answered).
    pub syn_timeouts: u64,
    /// connect() calls that found no free local port (EADDRNOTAVAIL).
    pub no_local_port: u64,
    /// RTO-sized HOL stalls on long-lived or large connections (and on
    /// connections still open at the end), their total and the longest.
    pub rto_stalls: u64,
    pub rto_stall_ns: u64,
    pub longest_stall_ns: u64,
    /// Zero windows by side (WINDOW_SIDES order: peer, local).
    pub zero_window: [WindowStalls; 2],
    /// Of closed connections: retransmitted segments, those the peer
    /// reported spurious (DSACK), and segments sent.
    pub closed_retransmits: u64,
    pub closed_spurious: u64,
    pub closed_segs_out: u64,
    /// Failed connects (reset or timeout): (timestamp ns, pid).
    pub failures: Vec<(u64, Option<u32>)>,
    /// Connections with a segment retransmitted STUCK_REPEATS times or more
    /// in a row without progress; of those, the largest stuck segment
    /// (bytes), the most repeats and the longest time stuck.
    pub stuck_connections: u64,
    pub stuck_segment_bytes: u32,
    pub stuck_segment_min_bytes: u32,
    pub stuck_repeats: u32,
    pub stuck_ns: u64,
    /// The listener's accept-queue limit, from its overflow events.
    pub backlog: Option<u32>,
    /// Census peak: sockets toward this destination holding an ephemeral
    /// port, and the port range's size.
    pub ephemeral_ports: u64,
    pub port_range_size: u64,
}

/// RTO-sized stalls of one connection not yet closed.
#[derive(Clone, Copy, Debug, Default)]
struct PendingStalls {
    count: u64,
    ns: u64,
    longest_ns: u64,
}

/// The segment a connection last retransmitted, and how often in a row.
#[derive(Clone, Copy, Debug, Default)]
struct LastRetransmit {
    seq: u32,
    bytes: u32,
    repeats: u32,
    first_ns: u64,
    last_ns: u64,
}

/// Everything the doctor watched.
pub struct Watch {
    pub endpoints: HashMap<EndpointKey, Evidence>,
    /// Events of endpoints past MAX_ENDPOINTS.
    pub untracked_events: u64,
    pub connections: u64,
    pub bytes: u64,
    pub first_ns: Option<u64>,
    pub last_ns: u64,
    /// Census: the most TIME_WAIT sockets seen at once.
    pub time_wait_peak: u64,
    stalled_flows: HashMap<(SocketAddr, SocketAddr), (EndpointKey, PendingStalls)>,
    retransmitting_flows: HashMap<(SocketAddr, SocketAddr), (EndpointKey, LastRetransmit)>,
}

impl Default for Watch {
    fn default() -> Self {
        Self {
            endpoints: HashMap::new(),
            untracked_events: 0,
            connections: 0,
            bytes: 0,
            first_ns: None,
            last_ns: 0,
            time_wait_peak: 0,
            stalled_flows: HashMap::new(),
            retransmitting_flows: HashMap::new(),
        }
    }
}

impl Watch {
    pub fn record(&mut self, event: &ConnEvent) {
        self.first_ns.get_or_insert(event.ts_ns);
        self.last_ns = self.last_ns.max(event.ts_ns);
        // Endpoints are named as top and the metrics name them.
        let Some(key) = EndpointBy::Auto.key(event) else { return };
        // One lookup per event: this runs for every event `top` and the
        // doctor see.
        let tracked = self.endpoints.len();
        let evidence = match self.endpoints.entry(key.clone()) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(_) if tracked >= MAX_ENDPOINTS => {
                self.untracked_events += 1;
                return;
            }
            Entry::Vacant(entry) => entry.insert(Evidence::default()),
        };
        let flow = (event.local, event.remote);
        evidence.stats.record(event);
        match &event.detail {
            Detail::Handshake { handshake_ns, .. } => {
                self.connections += 1;
                if let Some(band) = syn_band(*handshake_ns) {
                    evidence.slow_handshakes[band] += 1;
                }
            }
            Detail::HandshakeFailed { reason, .. } => {
                match reason {
                    FailReason::Timeout => evidence.syn_timeouts += 1,
                    FailReason::NoLocalPort => evidence.no_local_port += 1,
                    _ => {}
                }
                if matches!(reason, FailReason::Reset | FailReason::Timeout) && evidence.failures.len() < MAX_FAILURES {
                    evidence.failures.push((event.ts_ns, event.pid));
                }
            }
            Detail::HolStall { stall_ns, .. } if *stall_ns >= RTO_MIN_NS => {
                if self.stalled_flows.len() < MAX_STALLED_FLOWS || self.stalled_flows.contains_key(&flow) {
                    let (_, pending) = self.stalled_flows.entry(flow).or_insert_with(|| (key, PendingStalls::default()));
                    pending.count += 1;
                    pending.ns += stall_ns;
                    pending.longest_ns = pending.longest_ns.max(*stall_ns);
                } else {
                    // No room to wait for the close: count it now.
                    add_stalls(evidence, PendingStalls { count: 1, ns: *stall_ns, longest_ns: *stall_ns });
                }
            }
            Detail::Retransmit { state, bytes, seq, .. }
                if !matches!(*state, tcp_state::SYN_SENT | tcp_state::SYN_RECV) && *bytes > 0 =>
            {
                if self.retransmitting_flows.len() < MAX_STALLED_FLOWS || self.retransmitting_flows.contains_key(&flow) {
                    let (_, last) = self.retransmitting_flows.entry(flow).or_insert_with(|| (key, LastRetransmit::default()));
                    if last.repeats > 0 && last.seq == *seq {
                        last.repeats += 1;
                        last.bytes = last.bytes.max(*bytes);
                        last.last_ns = event.ts_ns;
                    } else {
                        // Another segment: the previous one got through.
                        *last = LastRetransmit { seq: *seq, bytes: *bytes, repeats: 1, first_ns: event.ts_ns, last_ns: event.ts_ns };
                    }
                }
            }
            Detail::ZeroWindow { side, stall_ns } => {
                let window = &mut evidence.zero_window[usize::from(*side == WindowSide::Local)];
                window.episodes += 1;
                window.total_ns += stall_ns;
                window.longest_ns = window.longest_ns.max(*stall_ns);
            }
            Detail::ListenOverflow { backlog, .. } => evidence.backlog = Some(*backlog),
            Detail::Close { direction, lifetime_ns, bytes_sent, bytes_received, retransmits, spurious_retransmits, transport } => {
                let bytes = bytes_sent + bytes_received;
                self.bytes += bytes;
                evidence.bytes += bytes;
                evidence.closed_retransmits += u64::from(*retransmits);
                evidence.closed_spurious += u64::from(*spurious_retransmits);
                evidence.closed_segs_out += u64::from(transport.segs_out);
                if let (Some(_), Some(lifetime_ns)) = (direction, lifetime_ns) {
                    evidence.closed_known += 1;
                    if *lifetime_ns < SHORT_LIVED_NS && bytes < SMALL_BYTES {
                        evidence.closed_short_small += 1;
                    }
                }
                if let Some((stuck_key, last)) = self.retransmitting_flows.remove(&flow) {
                    // Closed while stuck (given up, or reset): still a
                    // segment that never got through.
                    if let Some(evidence) = self.endpoints.get_mut(&stuck_key) {
                        add_stuck(evidence, last);
                    }
                }
                if let Some((stall_key, pending)) = self.stalled_flows.remove(&flow) {
                    // Stalls count for head-of-line blocking only on
                    // connections that were long-lived or large: on a short
                    // small one a timeout is churn's or loss's problem.
                    let long = lifetime_ns.is_none_or(|ns| ns >= LONG_LIVED_NS) || bytes >= MANY_BYTES;
                    if long {
                        if let Some(evidence) = self.endpoints.get_mut(&stall_key) {
                            add_stalls(evidence, pending);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// At the end: stalls of connections still open count (they are at
    /// least as long-lived as the watch).
    pub fn finish(&mut self) {
        // Connections hanging now on a segment that does not get through.
        for (_, (key, last)) in self.retransmitting_flows.drain() {
            if let Some(evidence) = self.endpoints.get_mut(&key) {
                add_stuck(evidence, last);
            }
        }
        for (_, (key, pending)) in self.stalled_flows.drain() {
            if let Some(evidence) = self.endpoints.get_mut(&key) {
                add_stalls(evidence, pending);
            }
        }
    }

    /// Folds a socket census in: per destination, the most sockets holding
    /// an ephemeral port seen in any census; the TIME_WAIT peak.
    pub fn record_census(&mut self, census: &Census, port: Option<u16>) {
        self.time_wait_peak = self.time_wait_peak.max(census.count("time_wait"));
        let (low, high) = census.port_range;
        let range = u64::from(high.saturating_sub(low)) + 1;
        for (destination, used) in &census.ephemeral_by_destination {
            if port.is_some_and(|port| port != destination.port()) {
                continue;
            }
            let key = EndpointKey::Remote(*destination);
            if !self.endpoints.contains_key(&key) && self.endpoints.len() >= MAX_ENDPOINTS {
                continue;
            }
            let evidence = self.endpoints.entry(key).or_default();
            evidence.ephemeral_ports = evidence.ephemeral_ports.max(*used);
            evidence.port_range_size = range;
        }
    }

    /// Seconds between the first event and `end_ns`, at least `floor`.
    pub fn window_s(&self, end_ns: u64, floor: f64) -> f64 {
        let from = self.first_ns.unwrap_or(end_ns);
        (end_ns.saturating_sub(from) as f64 / 1e9).max(floor)
    }
}

fn add_stuck(evidence: &mut Evidence, last: LastRetransmit) {
    if last.repeats < STUCK_REPEATS || last.last_ns.saturating_sub(last.first_ns) < STUCK_MIN_NS {
        return;
    }
    evidence.stuck_connections += 1;
    evidence.stuck_segment_bytes = evidence.stuck_segment_bytes.max(last.bytes);
    evidence.stuck_segment_min_bytes =
        if evidence.stuck_connections == 1 { last.bytes } else { evidence.stuck_segment_min_bytes.min(last.bytes) };
    evidence.stuck_repeats = evidence.stuck_repeats.max(last.repeats);
    evidence.stuck_ns = evidence.stuck_ns.max(last.last_ns.saturating_sub(last.first_ns));
}

fn add_stalls(evidence: &mut Evidence, pending: PendingStalls) {
    evidence.rto_stalls += pending.count;
    evidence.rto_stall_ns += pending.ns;
    evidence.longest_stall_ns = evidence.longest_stall_ns.max(pending.longest_ns);
}

/// Which SYN-retransmit band a handshake time falls in: the initial SYN
/// RTO is 1 s and doubles, so one lost SYN costs ~1 s, two ~3 s, three
/// ~7 s. Each band starts 10 % early (a handshake is a little shorter than
/// the sum of RTOs when the first SYN left a moment after the clock
/// started). `None`: faster than any retransmitted SYN.
pub fn syn_band(handshake_ns: u64) -> Option<usize> {
    match handshake_ns {
        0..900_000_000 => None,
        900_000_000..2_700_000_000 => Some(0),
        2_700_000_000..6_300_000_000 => Some(1),
        _ => Some(2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{sample, Direction, Dynamics};

    fn active(detail: Detail) -> ConnEvent {
        let mut event = sample(detail);
        event.direction = Some(Direction::Active);
        event
    }

    #[test]
    fn bands_follow_the_syn_rto() {
        assert_eq!(syn_band(50_000), None);
        assert_eq!(syn_band(1_010_000_000), Some(0));
        assert_eq!(syn_band(3_020_000_000), Some(1));
        assert_eq!(syn_band(7_100_000_000), Some(2));
    }

    #[test]
    fn rto_stalls_count_only_on_long_or_large_connections() {
        let mut watch = Watch::default();
        let stall = Detail::HolStall { stall_ns: 400_000_000, bytes_held: 3000, ooo_segments: 2 };
        watch.record(&active(stall.clone()));
        let close = |lifetime_ns, bytes_received| Detail::Close {
            direction: Some(Direction::Active),
            lifetime_ns: Some(lifetime_ns),
            bytes_sent: 0,
            bytes_received,
            retransmits: 0,
            spurious_retransmits: 0,
            transport: Dynamics::default(),
        };
        watch.record(&active(close(300_000_000, 1000)));
        let key: EndpointKey = EndpointKey::Remote("[::1]:40000".parse().unwrap());
        assert_eq!(watch.endpoints[&key].rto_stalls, 0, "short small connection");
        watch.record(&active(stall.clone()));
        watch.record(&active(close(5_000_000_000, 8 << 20)));
        assert_eq!(watch.endpoints[&key].rto_stalls, 1);
        assert_eq!(watch.endpoints[&key].closed_short_small, 1);
        // Still open at the end: counts.
        watch.record(&active(stall));
        watch.finish();
        assert_eq!(watch.endpoints[&key].rto_stalls, 2);
        assert_eq!(watch.endpoints[&key].longest_stall_ns, 400_000_000);
    }

    #[test]
    fn endpoints_stay_bounded() {
        let mut watch = Watch::default();
        for port in 0..(MAX_ENDPOINTS as u16 + 10) {
            let mut event = active(Detail::Handshake { direction: Direction::Active, handshake_ns: 1 });
            event.remote.set_port(port);
            watch.record(&event);
        }
        assert_eq!(watch.endpoints.len(), MAX_ENDPOINTS);
        assert_eq!(watch.untracked_events, 10);
    }
}
