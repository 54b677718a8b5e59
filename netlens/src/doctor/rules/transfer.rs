//! Rules about moving data on open connections: head-of-line blocking,
//! PMTU black holes, slow readers, sustained loss.

use super::{evidence, round, Finding, Severity};
use crate::{aggregate::endpoint::EndpointKey, doctor::evidence::{Evidence, RTO_MIN_NS}};

// ---- hol_blocking ----
/// RTO-sized stalls (≥ 200 ms, the minimum RTO) on long-lived or large
/// connections of one endpoint: one may be bad luck, three is a pattern.
pub const HOL_MIN_RTO_STALLS: u64 = 3;
/// Critical when stalls add up to this share of the watch: the
/// application spent that long waiting for data already received.
pub const HOL_CRITICAL_SHARE: f64 = 0.1;

// ---- pmtu_blackhole ----
/// A stuck segment (the same sequence number retransmitted ≥ 4 times in a
/// row, evidence::STUCK_REPEATS) at least this large: 1,200 bytes fit in
/// the smallest MTU IPv6 guarantees (1,280) with headers and options, so
/// only larger segments can fall into a path MTU black hole.
pub const PMTU_LARGE_BYTES: u32 = 1_200;

// ---- slow_reader ----
/// A zero-window episode at least as long as the minimum RTO, and this
/// much zero-window time in all: flow control that briefly closes the
/// window while a reader catches up is healthy and far shorter.
pub const ZERO_WINDOW_MIN_LONGEST_NS: u64 = RTO_MIN_NS;
pub const ZERO_WINDOW_MIN_TOTAL_NS: u64 = 500_000_000;
/// Critical from this share of the watch.
pub const ZERO_WINDOW_CRITICAL_SHARE: f64 = 0.5;

// ---- retransmit_loss ----
/// Segments sent by closed connections of the endpoint, at least: below,
/// one lost segment is a large ratio of nothing.
pub const LOSS_MIN_SEGMENTS: u64 = 1_000;
/// Retransmits per 1,000 segments (spurious DSACK-reported ones and SYN
/// retransmits excluded). 1 %: by the Mathis bound a flow's throughput
/// falls as 1/√loss, to ~1.2 MSS/RTT × 10 at 1 %; healthy paths lose far
/// under 0.1 %.
pub const LOSS_PER_1000: f64 = 10.0;
/// Critical at 5 %.
pub const LOSS_CRITICAL_PER_1000: f64 = 50.0;


/// Head-of-line stalls of RTO size on long-lived, large connections.
pub fn hol_blocking(endpoint: &EndpointKey, e: &Evidence, window_s: f64) -> Option<Finding> {
    if e.rto_stalls < HOL_MIN_RTO_STALLS {
        return None;
    }
    let stalled_s = e.rto_stall_ns as f64 / 1e9;
    let share = stalled_s / window_s;
    let severity = if share >= HOL_CRITICAL_SHARE { Severity::Critical } else { Severity::Warning };
    let p99_us = e.stats.hol_stall_us.as_ref().map_or(0, |h| h.value_at_quantile(0.99));
    Some(Finding {
        finding: "hol_blocking",
        severity,
        endpoint: endpoint.to_string(),
        summary: format!(
            "{} head-of-line stalls of RTO size (≥ 200 ms) on long-lived connections, {stalled_s:.1} s in all, longest {:.0} ms: received data waited for a retransmission timeout",
            e.rto_stalls,
            e.longest_stall_ns as f64 / 1e6
        ),
        evidence: evidence(&[
            ("rto_stalls", e.rto_stalls.into()),
            ("hol_stalls", e.stats.hol_stalls().into()),
            ("stalled_ms", round(stalled_s * 1e3, 0)),
            ("longest_stall_us", (e.longest_stall_ns / 1_000).into()),
            ("stall_p99_us", p99_us.into()),
            ("stalled_pct_of_watch", round(share * 100.0, 1)),
        ]),
        advice: "Lost segments here are recovered only by the retransmission timeout, not fast retransmit: look for tail or burst loss on the path (`nstat TcpExtTCPTimeouts`), make sure SACK and RACK/TLP are on (net.ipv4.tcp_sack, tcp_recovery), and consider multiplexing fewer streams per connection (HTTP/2 over one TCP connection stalls every stream).",
        weight: share.max(e.rto_stalls as f64 / HOL_MIN_RTO_STALLS as f64 / 100.0),
    })
}


/// The same large segment retransmitted on RTO with no progress, while the
/// handshakes (small segments) to the same endpoint got through: a router
/// on the path drops packets above its MTU without the ICMP "fragmentation
/// needed" that would tell the sender.
pub fn pmtu_blackhole(endpoint: &EndpointKey, e: &Evidence, _window_s: f64) -> Option<Finding> {
    // Every stuck segment large (a small one stuck too is a dead peer or
    // total loss, not MTU), and handshakes completed without timeouts.
    if e.stuck_connections == 0 || e.stuck_segment_min_bytes < PMTU_LARGE_BYTES {
        return None;
    }
    if e.stats.opened_total() == 0 || e.syn_timeouts > 0 {
        return None;
    }
    Some(Finding {
        finding: "pmtu_blackhole",
        severity: Severity::Critical,
        endpoint: endpoint.to_string(),
        summary: format!(
            "{} connection(s) hang on a {}-byte segment retransmitted {} times over {:.1} s without progress, while {} handshakes (small segments) got through: large packets toward this endpoint are dropped",
            e.stuck_connections,
            e.stuck_segment_bytes,
            e.stuck_repeats,
            e.stuck_ns as f64 / 1e9,
            e.stats.opened_total()
        ),
        evidence: evidence(&[
            ("stuck_connections", e.stuck_connections.into()),
            ("stuck_segment_bytes", e.stuck_segment_bytes.into()),
            ("stuck_retransmits", e.stuck_repeats.into()),
            ("stuck_ms", round(e.stuck_ns as f64 / 1e6, 0)),
            ("handshakes_completed", e.stats.opened_total().into()),
        ]),
        advice: "A path MTU black hole: something on the path drops large packets and filters the ICMP \"fragmentation needed\" / \"packet too big\" replies. Allow those ICMP messages through firewalls, clamp the MSS on the tunnel or VPN (`iptables … TCPMSS --clamp-mss-to-pmtu`), or enable net.ipv4.tcp_mtu_probing=1.",
        weight: e.stuck_connections as f64,
    })
}


/// Zero-window stalls: a reader that does not keep up.
pub fn slow_reader(endpoint: &EndpointKey, e: &Evidence, window_s: f64) -> Option<Finding> {
    // The side with the most zero-window time.
    let (slot, window) = e.zero_window.iter().enumerate().max_by_key(|(_, w)| w.total_ns)?;
    if window.longest_ns < ZERO_WINDOW_MIN_LONGEST_NS || window.total_ns < ZERO_WINDOW_MIN_TOTAL_NS {
        return None;
    }
    let total_s = window.total_ns as f64 / 1e9;
    let share = total_s / window_s;
    let severity = if share >= ZERO_WINDOW_CRITICAL_SHARE { Severity::Critical } else { Severity::Warning };
    let (side, who) = if slot == 0 {
        ("peer", "the remote application is not reading: it advertised a zero window and our sender waited")
    } else {
        ("local", "our own application is not reading: we advertised a zero window and the peer waited")
    };
    Some(Finding {
        finding: "slow_reader",
        severity,
        endpoint: endpoint.to_string(),
        summary: format!(
            "{} zero-window stalls, {total_s:.1} s in all, longest {:.0} ms: {who}",
            window.episodes,
            window.longest_ns as f64 / 1e6
        ),
        evidence: evidence(&[
            ("side", side.into()),
            ("zero_window_stalls", window.episodes.into()),
            ("zero_window_ms", round(total_s * 1e3, 0)),
            ("longest_zero_window_us", (window.longest_ns / 1_000).into()),
            ("zero_window_pct_of_watch", round(share * 100.0, 1)),
        ]),
        advice: if slot == 0 {
            "The receiving application reads too slowly (blocked, overloaded or paused): profile it or give it more workers; larger receive buffers only delay the stall."
        } else {
            "This host's application does not drain its socket: look for a blocked event loop, a slow consumer or back-pressure it does not handle; larger receive buffers only delay the stall."
        },
        weight: share / 0.01,
    })
}


/// Sustained data loss toward an endpoint.
pub fn retransmit_loss(endpoint: &EndpointKey, e: &Evidence, _window_s: f64) -> Option<Finding> {
    if e.closed_segs_out < LOSS_MIN_SEGMENTS {
        return None;
    }
    // SYN retransmits are syn_loss's; DSACK-reported ones were not lost.
    let syn = e.stats.retransmits[1];
    let lost = e.closed_retransmits.saturating_sub(e.closed_spurious).saturating_sub(syn);
    let per_1000 = lost as f64 * 1000.0 / e.closed_segs_out as f64;
    if per_1000 < LOSS_PER_1000 {
        return None;
    }
    let severity = if per_1000 >= LOSS_CRITICAL_PER_1000 { Severity::Critical } else { Severity::Warning };
    Some(Finding {
        finding: "retransmit_loss",
        severity,
        endpoint: endpoint.to_string(),
        summary: format!(
            "{per_1000:.1} retransmits per 1,000 segments sent ({lost} of {}; {} spurious ones excluded): sustained loss toward this endpoint",
            e.closed_segs_out, e.closed_spurious
        ),
        evidence: evidence(&[
            ("retransmits_per_1000_segs", round(per_1000, 1)),
            ("retransmitted_segs", lost.into()),
            ("spurious_retransmitted_segs", e.closed_spurious.into()),
            ("segs_out", e.closed_segs_out.into()),
            ("data_retransmits_live", e.stats.retransmits[0].into()),
        ]),
        advice: "Find where packets are lost: interface errors and drops (`ip -s link`, `ethtool -S`), a congested or policed link, a bad cable or NIC on the path (mtr toward the endpoint); at 1 % loss a TCP flow's throughput is a fraction of the link's.",
        weight: per_1000 / LOSS_PER_1000,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::rules::fixtures::*;

    #[test]
    fn hol_blocking_needs_repeated_rto_stalls() {
        let mut e = Evidence { rto_stalls: 2, rto_stall_ns: 900_000_000, longest_stall_ns: 450_000_000, ..Evidence::default() };
        assert!(hol_blocking(&remote(), &e, 10.0).is_none());
        e.rto_stalls = 5;
        e.rto_stall_ns = 2_500_000_000;
        let finding = hol_blocking(&remote(), &e, 10.0).unwrap();
        assert_eq!(finding.severity, Severity::Critical);
        assert_eq!(finding.evidence["stalled_ms"], 2500);
        e.rto_stall_ns = 1_100_000_000;
        assert_eq!(hol_blocking(&remote(), &e, 60.0).unwrap().severity, Severity::Warning);
    }

    #[test]
    fn slow_reader_says_which_side() {
        let mut e = Evidence::default();
        e.zero_window[0] = WindowStalls { episodes: 40, total_ns: 30_000_000, longest_ns: 2_000_000 };
        assert!(slow_reader(&remote(), &e, 5.0).is_none(), "brief flow control is healthy");
        e.zero_window[1] = WindowStalls { episodes: 1, total_ns: 1_000_000_000, longest_ns: 1_000_000_000 };
        let finding = slow_reader(&remote(), &e, 5.0).unwrap();
        assert_eq!(finding.evidence["side"], "local");
        assert_eq!(finding.severity, Severity::Warning);
    }

    #[test]
    fn retransmit_loss_excludes_spurious_and_needs_volume() {
        let mut e = Evidence { closed_segs_out: 20_000, closed_retransmits: 400, closed_spurious: 0, ..Evidence::default() };
        let finding = retransmit_loss(&remote(), &e, 5.0).unwrap();
        assert_eq!(finding.evidence["retransmits_per_1000_segs"], 20);
        assert_eq!(finding.severity, Severity::Warning);
        // Loopback reordering: retransmits the peer reported spurious.
        e.closed_spurious = 350;
        assert!(retransmit_loss(&remote(), &e, 5.0).is_none());
        // Too few segments to say.
        let small = Evidence { closed_segs_out: 200, closed_retransmits: 20, ..Evidence::default() };
        assert!(retransmit_loss(&remote(), &small, 5.0).is_none());
    }

    #[test]
    fn pmtu_blackhole_needs_a_large_stuck_segment_and_working_handshakes() {
        let mut watch = Watch::default();
        watch.record(&active(0, Detail::Handshake { direction: Direction::Active, handshake_ns: 50_000 }));
        // A 200-byte request got through, then a full-size segment is
        // retransmitted at 200, 600, 1400, 3000 ms.
        for ms in [200, 600, 1_400, 3_000] {
            let retransmit = Detail::Retransmit { state: netlens_common::tcp_state::ESTABLISHED, segs: 1, bytes: 1448, seq: 7_000 };
            watch.record(&active(ms * 1_000_000, retransmit));
        }
        watch.finish();
        let e = &watch.endpoints[&remote()];
        let finding = pmtu_blackhole(&remote(), e, 4.0).expect("hanging on a large segment");
        assert_eq!(finding.evidence["stuck_segment_bytes"], 1448);
        assert_eq!(finding.evidence["stuck_retransmits"], 4);
        assert_eq!(finding.evidence["stuck_ms"], 2800);
        // A small segment stuck the same way: the peer is gone, not the MTU.
        let mut small = e.clone();
        small.stuck_segment_min_bytes = 300;
        assert!(pmtu_blackhole(&remote(), &small, 4.0).is_none());
        // The same segment retransmitted again and again within 600 ms, then
        // through: recovery, not a black hole.
        let mut watch = Watch::default();
        watch.record(&active(0, Detail::Handshake { direction: Direction::Active, handshake_ns: 50_000 }));
        for ms in 0..15 {
            let retransmit = Detail::Retransmit { state: netlens_common::tcp_state::ESTABLISHED, segs: 1, bytes: 1448, seq: 7_000 };
            watch.record(&active(200_000_000 + ms * 40_000_000, retransmit));
        }
        watch.finish();
        assert!(pmtu_blackhole(&remote(), &watch.endpoints[&remote()], 4.0).is_none());
        // Retransmits that make progress (a new segment each time) are loss.
        let mut watch = Watch::default();
        watch.record(&active(0, Detail::Handshake { direction: Direction::Active, handshake_ns: 50_000 }));
        for (i, ms) in [200u64, 600, 1_400, 3_000].into_iter().enumerate() {
            let retransmit = Detail::Retransmit { state: netlens_common::tcp_state::ESTABLISHED, segs: 1, bytes: 1448, seq: 7_000 + i as u32 * 1448 };
            watch.record(&active(ms * 1_000_000, retransmit));
        }
        watch.finish();
        assert!(pmtu_blackhole(&remote(), &watch.endpoints[&remote()], 4.0).is_none());
    }
}
