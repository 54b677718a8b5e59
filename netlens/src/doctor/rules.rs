//! The doctor's rules: each a pure function from one endpoint's evidence
//! (and the length of the watch) to at most one finding. Thresholds are
//! named, with the reason for each number; README "netlens doctor" lists
//! them too.

use serde_json::{Map, Value};

use super::evidence::{Evidence, RTO_MIN_NS, SMALL_BYTES};
use crate::aggregate::{endpoint::EndpointKey, stats::{ACTIVE, PASSIVE}};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub finding: &'static str,
    pub severity: Severity,
    /// As top and the metrics spell it: `ip:port` or `*:port`.
    pub endpoint: String,
    pub summary: String,
    /// Measured numbers, units in the names.
    pub evidence: Map<String, Value>,
    pub advice: &'static str,
    /// Within one severity, larger first (each rule's own measure of how
    /// bad it is, normalised to its threshold).
    pub weight: f64,
}

/// Every finding kind, in the order the README documents them.
pub const KINDS: [&str; 9] = [
    "connection_churn",
    "syn_loss",
    "port_exhaustion",
    "hol_blocking",
    "pmtu_blackhole",
    "retry_storm",
    "slow_reader",
    "accept_overflow",
    "retransmit_loss",
];

// ---- connection_churn ----
/// At least this many new connections: a handful of short connections is
/// normal for any client.
pub const CHURN_MIN_CONNECTIONS: u64 = 100;
/// And at least this rate (connections per second to one endpoint): below
/// it the handshake cost is noise next to the work done.
pub const CHURN_MIN_PER_S: f64 = 10.0;
/// Share of closed connections short (< 1 s) and small (< 64 KiB): a pool
/// or keep-alive reuses connections, so nearly all short and small means
/// none is reused.
pub const CHURN_SHORT_SMALL_SHARE: f64 = 0.9;
/// Critical above this rate: each connection keeps its local port in
/// TIME_WAIT for 60 s, and the default range has 28,232 ports, so
/// 28,232 / 60 ≈ 470 new connections per second to one destination
/// exhaust it within a minute.
pub const CHURN_CRITICAL_PER_S: f64 = 28_232.0 / 60.0;

// ---- syn_loss ----
/// Handshakes in a SYN-retransmit band (≥ 0.9 s: the initial SYN RTO is
/// 1 s): at least this many …
pub const SYN_LOSS_MIN_SLOW: u64 = 3;
/// … and this share of the endpoint's connects (including those that timed
/// out). 5 %: one connect in twenty waiting a whole second is user-visible.
pub const SYN_LOSS_SHARE: f64 = 0.05;
/// Critical from here: one in five connects waits ≥ 1 s.
pub const SYN_LOSS_CRITICAL_SHARE: f64 = 0.2;

// ---- port_exhaustion ----
/// Share of ip_local_port_range held toward one destination (TIME_WAIT
/// included) from which connect() is at risk of EADDRNOTAVAIL: the kernel
/// searches the range from a hashed offset, and as it fills, connects slow
/// down and then fail.
pub const PORTS_WARNING_SHARE: f64 = 0.7;
pub const PORTS_CRITICAL_SHARE: f64 = 0.9;

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

// ---- retry_storm ----
/// Failed connects (reset or timeout) to one endpoint in the watch.
pub const RETRY_MIN_FAILURES: u64 = 20;
/// At this rate or more (failures per second).
pub const RETRY_MIN_PER_S: f64 = 1.0;
/// Without backoff: one process's median interval between attempts below
/// the initial SYN RTO (1 s) — it retries faster than TCP itself would
/// retransmit a SYN — and its later intervals not growing by this factor.
pub const RETRY_MAX_INTERVAL_NS: u64 = 1_000_000_000;
pub const RETRY_BACKOFF_FACTOR: f64 = 1.5;
/// Critical from here (failures per second).
pub const RETRY_CRITICAL_PER_S: f64 = 10.0;

// ---- slow_reader ----
/// A zero-window episode at least as long as the minimum RTO, and this
/// much zero-window time in all: flow control that briefly closes the
/// window while a reader catches up is healthy and far shorter.
pub const ZERO_WINDOW_MIN_LONGEST_NS: u64 = RTO_MIN_NS;
pub const ZERO_WINDOW_MIN_TOTAL_NS: u64 = 500_000_000;
/// Critical from this share of the watch.
pub const ZERO_WINDOW_CRITICAL_SHARE: f64 = 0.5;

// ---- accept_overflow ----
/// Any connection dropped on a full accept queue is a finding: healthy
/// listeners never drop, and each drop costs its client at least the 1 s
/// SYN RTO. Critical from this many drops per second.
pub const ACCEPT_MIN_DROPPED: u64 = 1;
pub const ACCEPT_CRITICAL_PER_S: f64 = 1.0;

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

fn round(value: f64, places: i32) -> Value {
    let scale = 10f64.powi(places);
    let rounded = (value * scale).round() / scale;
    if places == 0 || rounded.fract() == 0.0 {
        Value::from(rounded as i64)
    } else {
        Value::from(rounded)
    }
}

fn evidence(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { part as f64 * 100.0 / whole as f64 }
}

/// Many new connections to one endpoint, nearly all short and small, each
/// paying a handshake and slow start.
pub fn connection_churn(endpoint: &EndpointKey, e: &Evidence, window_s: f64) -> Option<Finding> {
    let opened = e.stats.opened_total();
    let per_s = opened as f64 / window_s;
    let closed = e.closed_known;
    if opened < CHURN_MIN_CONNECTIONS || per_s < CHURN_MIN_PER_S || closed == 0 {
        return None;
    }
    let short_small = e.closed_short_small as f64 / closed as f64;
    if short_small < CHURN_SHORT_SMALL_SHARE {
        return None;
    }
    let slot = if endpoint.is_listener() { PASSIVE } else { ACTIVE };
    let handshakes = &e.stats.handshake[slot];
    let lifetimes = &e.stats.lifetime[slot];
    let mean = |sum: f64, count: u64| if count == 0 { 0.0 } else { sum / count as f64 };
    let handshake_mean_s = mean(handshakes.sum, handshakes.count());
    let lifetime_mean_s = mean(lifetimes.sum, lifetimes.count());
    let handshake_share = if lifetime_mean_s > 0.0 { (handshake_mean_s / lifetime_mean_s).min(1.0) * 100.0 } else { 0.0 };
    let slow_start = pct(e.stats.closed_in_slow_start, closed);
    let severity = if per_s >= CHURN_CRITICAL_PER_S { Severity::Critical } else { Severity::Warning };
    Some(Finding {
        finding: "connection_churn",
        severity,
        endpoint: endpoint.to_string(),
        summary: format!(
            "{opened} new connections in {window_s:.0} s ({per_s:.0}/s), {:.0} % short-lived and under {} KiB; {slow_start:.0} % closed still in slow start, the handshake {handshake_share:.1} % of each lifetime",
            short_small * 100.0,
            SMALL_BYTES / 1024
        ),
        evidence: evidence(&[
            ("connections", opened.into()),
            ("conn_per_s", round(per_s, 1)),
            ("short_small_pct", round(short_small * 100.0, 1)),
            ("closed_in_slow_start_pct", round(slow_start, 1)),
            ("handshake_share_of_lifetime_pct", round(handshake_share, 2)),
            ("handshake_mean_us", round(handshake_mean_s * 1e6, 0)),
            ("lifetime_mean_us", round(lifetime_mean_s * 1e6, 0)),
        ]),
        advice: "Reuse connections: a connection pool or HTTP keep-alive on the client (and keep-alive allowed by the server); each new connection pays a handshake round trip, slow start from a 10-segment window, and 60 s of TIME_WAIT holding a local port.",
        weight: per_s / CHURN_MIN_PER_S,
    })
}

/// Handshakes that waited for SYN (or SYN-ACK) retransmissions: ~1 s, 3 s,
/// 7 s.
pub fn syn_loss(endpoint: &EndpointKey, e: &Evidence, _window_s: f64) -> Option<Finding> {
    let slow: u64 = e.slow_handshakes.iter().sum::<u64>() + e.syn_timeouts;
    let attempts = e.stats.opened_total() + e.syn_timeouts;
    if slow < SYN_LOSS_MIN_SLOW || attempts == 0 {
        return None;
    }
    let share = slow as f64 / attempts as f64;
    if share < SYN_LOSS_SHARE {
        return None;
    }
    let severity = if share >= SYN_LOSS_CRITICAL_SHARE { Severity::Critical } else { Severity::Warning };
    let p99_us = e.stats.handshake_us.as_ref().map_or(0, |h| h.value_at_quantile(0.99));
    let (what, retransmits) = if endpoint.is_listener() {
        ("SYN-ACK", e.stats.retransmits[2])
    } else {
        ("SYN", e.stats.retransmits[1])
    };
    Some(Finding {
        finding: "syn_loss",
        severity,
        endpoint: endpoint.to_string(),
        summary: format!(
            "{slow} of {attempts} connects ({:.0} %) waited for {what} retransmissions: {} took ~1 s, {} ~3 s, {} ≥ 7 s, {} timed out; handshake p99 {:.2} s",
            share * 100.0,
            e.slow_handshakes[0],
            e.slow_handshakes[1],
            e.slow_handshakes[2],
            e.syn_timeouts,
            p99_us as f64 / 1e6
        ),
        evidence: evidence(&[
            ("connects", attempts.into()),
            ("slow_handshakes_pct", round(share * 100.0, 1)),
            ("handshakes_1s", e.slow_handshakes[0].into()),
            ("handshakes_3s", e.slow_handshakes[1].into()),
            ("handshakes_7s_plus", e.slow_handshakes[2].into()),
            ("syn_timeouts", e.syn_timeouts.into()),
            ("syn_retransmits", retransmits.into()),
            ("handshake_p99_us", p99_us.into()),
        ]),
        advice: "SYNs or SYN-ACKs are being lost: check firewalls and rate limits (SYN policers, conntrack table full: `conntrack -S`), the listener's SYN backlog (`nstat TcpExtListenDrops`), and packet loss on the path; a lost SYN costs the 1 s initial RTO, doubling each time.",
        weight: share / SYN_LOSS_SHARE,
    })
}

/// Ephemeral ports toward one destination near the size of
/// ip_local_port_range (census), or connect() already failing there for
/// want of a local port (EADDRNOTAVAIL, seen in the kernel: the census
/// alone misses a range that fills and drains between two of its samples).
pub fn port_exhaustion(endpoint: &EndpointKey, e: &Evidence, window_s: f64, time_wait: u64) -> Option<Finding> {
    let share = match e.port_range_size {
        0 => 0.0,
        size => e.ephemeral_ports as f64 / size as f64,
    };
    if share < PORTS_WARNING_SHARE && e.no_local_port == 0 {
        return None;
    }
    let severity = if share >= PORTS_CRITICAL_SHARE || e.no_local_port > 0 { Severity::Critical } else { Severity::Warning };
    let failing = match e.no_local_port {
        0 => "connect() fails with EADDRNOTAVAIL once the range is full".to_string(),
        n => format!("{n} connect() calls here already failed with EADDRNOTAVAIL (no free local port)"),
    };
    let summary = match e.port_range_size {
        0 => format!("{failing}; {time_wait} sockets in TIME_WAIT on the host"),
        size => format!(
            "{} local ports of {size} in ip_local_port_range ({:.0} %) held toward this destination; {time_wait} sockets in TIME_WAIT on the host; {failing}",
            e.ephemeral_ports,
            share * 100.0
        ),
    };
    let failing_weight = if e.no_local_port > 0 { PORTS_CRITICAL_SHARE / PORTS_WARNING_SHARE } else { 0.0 };
    Some(Finding {
        finding: "port_exhaustion",
        severity,
        endpoint: endpoint.to_string(),
        summary,
        evidence: evidence(&[
            ("ephemeral_ports", e.ephemeral_ports.into()),
            ("port_range_ports", e.port_range_size.into()),
            ("ports_used_pct", round(share * 100.0, 1)),
            ("time_wait_sockets", time_wait.into()),
            ("eaddrnotavail_connects", e.no_local_port.into()),
            ("conn_per_s", round(e.stats.opened_total() as f64 / window_s, 1)),
        ]),
        advice: "Reuse connections (pooling, keep-alive) so fewer enter TIME_WAIT; widen net.ipv4.ip_local_port_range; enable net.ipv4.tcp_tw_reuse=1 for outgoing connections; spread load over more destination addresses or ports.",
        weight: (share / PORTS_WARNING_SHARE).max(failing_weight),
    })
}

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

/// Failed connects to one endpoint at a high, rising rate, without backoff.
pub fn retry_storm(endpoint: &EndpointKey, e: &Evidence, window_s: f64) -> Option<Finding> {
    let failures = e.failures.len() as u64;
    let per_s = failures as f64 / window_s;
    if failures < RETRY_MIN_FAILURES || per_s < RETRY_MIN_PER_S {
        return None;
    }
    // Rising (or steady): backoff would make the second half quieter.
    let first = e.failures.first()?.0;
    let last = e.failures.last()?.0;
    let middle = first + (last - first) / 2;
    let early = e.failures.iter().filter(|(ts, _)| *ts <= middle).count() as f64;
    let late = failures as f64 - early;
    let half_s = ((last - first) as f64 / 2e9).max(1e-3);
    if late < early * 0.8 {
        return None;
    }
    // The busiest process: its intervals between attempts.
    let mut by_pid: std::collections::HashMap<Option<u32>, Vec<u64>> = Default::default();
    for (ts, pid) in &e.failures {
        by_pid.entry(*pid).or_default().push(*ts);
    }
    let (pid, times) = by_pid.into_iter().max_by_key(|(_, times)| times.len())?;
    let mut intervals: Vec<u64> = times.windows(2).map(|w| w[1].saturating_sub(w[0])).collect();
    if intervals.len() < 4 {
        return None;
    }
    let half = intervals.len() / 2;
    let (early_iv, late_iv) = (median(&mut intervals[..half].to_vec()), median(&mut intervals[half..].to_vec()));
    let interval = median(&mut intervals);
    if interval >= RETRY_MAX_INTERVAL_NS || late_iv as f64 >= early_iv as f64 * RETRY_BACKOFF_FACTOR {
        return None;
    }
    let severity = if per_s >= RETRY_CRITICAL_PER_S { Severity::Critical } else { Severity::Warning };
    let resets = e.stats.handshake_failures[ACTIVE][0] + e.stats.handshake_failures[PASSIVE][0];
    let timeouts = e.syn_timeouts;
    let mut pairs = vec![
        ("failed_connects", failures.into()),
        ("failed_resets", resets.into()),
        ("failed_timeouts", timeouts.into()),
        ("failures_per_s", round(per_s, 1)),
        ("failures_per_s_first_half", round(early / half_s, 1)),
        ("failures_per_s_second_half", round(late / half_s, 1)),
        ("attempt_interval_p50_ms", round(interval as f64 / 1e6, 1)),
    ];
    if let Some(pid) = pid {
        pairs.push(("pid", pid.into()));
    }
    Some(Finding {
        finding: "retry_storm",
        severity,
        endpoint: endpoint.to_string(),
        summary: format!(
            "{failures} failed connects in {window_s:.0} s ({per_s:.1}/s; {resets} reset, {timeouts} timed out), not slowing down: {} retries every {:.0} ms with no backoff",
            pid.map_or("one process".to_string(), |p| format!("pid {p}")),
            interval as f64 / 1e6
        ),
        evidence: evidence(&pairs),
        advice: "Make the client back off: exponential backoff with jitter and a retry budget or circuit breaker; meanwhile find why the endpoint refuses (nothing listening, crashed service, firewall reject) — a storm of retries delays its recovery.",
        weight: per_s / RETRY_MIN_PER_S,
    })
}

fn median(values: &mut [u64]) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    values[values.len() / 2]
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

/// A listener whose accept queue overflowed: the kernel dropped connections.
pub fn accept_overflow(endpoint: &EndpointKey, e: &Evidence, window_s: f64) -> Option<Finding> {
    let dropped = e.stats.listen_overflows;
    if dropped < ACCEPT_MIN_DROPPED {
        return None;
    }
    let per_s = dropped as f64 / window_s;
    let severity = if per_s >= ACCEPT_CRITICAL_PER_S { Severity::Critical } else { Severity::Warning };
    let accepted = e.stats.accept_wait.count();
    let wait_p99_us = e.stats.accept_wait_us.as_ref().map_or(0, |h| h.value_at_quantile(0.99));
    let mut pairs = vec![
        ("dropped_connections", dropped.into()),
        ("dropped_per_s", round(per_s, 2)),
        ("accepted", accepted.into()),
        ("accept_wait_p99_us", wait_p99_us.into()),
    ];
    if let Some(backlog) = e.backlog {
        pairs.push(("backlog_connections", backlog.into()));
    }
    Some(Finding {
        finding: "accept_overflow",
        severity,
        endpoint: endpoint.to_string(),
        summary: format!(
            "the accept queue{} was full: the kernel dropped {dropped} connections ({per_s:.1}/s) while {accepted} were accepted; each dropped client waits ≥ 1 s to retry its SYN",
            e.backlog.map_or(String::new(), |b| format!(" (backlog {b})"))
        ),
        evidence: evidence(&pairs),
        advice: "The server does not call accept() fast enough: give the accept loop its own thread or more workers, raise the listen() backlog together with net.core.somaxconn, and check the process is not blocked (`ss -ltn`: Recv-Q at Send-Q means full).",
        weight: per_s.max(1.0),
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

/// Every rule over every endpoint, then the ones another finding explains
/// removed, most severe first.
pub fn evaluate<'a>(
    endpoints: impl IntoIterator<Item = (&'a EndpointKey, &'a Evidence)>,
    window_s: f64,
    time_wait: u64,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (key, e) in endpoints {
        let found = [
            connection_churn(key, e, window_s),
            syn_loss(key, e, window_s),
            port_exhaustion(key, e, window_s, time_wait),
            hol_blocking(key, e, window_s),
            pmtu_blackhole(key, e, window_s),
            retry_storm(key, e, window_s),
            slow_reader(key, e, window_s),
            accept_overflow(key, e, window_s),
            retransmit_loss(key, e, window_s),
        ];
        findings.extend(found.into_iter().flatten());
    }
    explain(&mut findings);
    findings.sort_by(|a, b| {
        b.severity
            .cmp(&a.severity)
            .then(b.weight.total_cmp(&a.weight))
            .then_with(|| a.finding.cmp(b.finding))
            .then_with(|| a.endpoint.cmp(&b.endpoint))
    });
    findings
}

fn port_of(endpoint: &str) -> Option<&str> {
    endpoint.rsplit_once(':').map(|(_, port)| port)
}

/// Symptoms of a finding already made are not findings of their own:
/// clients' SYNs to a port whose local listener overflows its accept queue
/// are dropped by that overflow (syn_loss is its symptom), and churn toward
/// a destination whose ports are exhausted is the cause stated in
/// port_exhaustion's own finding.
fn explain(findings: &mut Vec<Finding>) {
    let overflowing: Vec<String> = findings
        .iter()
        .filter(|f| f.finding == "accept_overflow")
        .filter_map(|f| port_of(&f.endpoint).map(str::to_string))
        .collect();
    let exhausted: Vec<String> = findings.iter().filter(|f| f.finding == "port_exhaustion").map(|f| f.endpoint.clone()).collect();
    findings.retain(|f| match f.finding {
        "syn_loss" => !port_of(&f.endpoint).is_some_and(|port| overflowing.iter().any(|p| p == port)),
        "connection_churn" => !exhausted.contains(&f.endpoint),
        _ => true,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        doctor::evidence::{Watch, WindowStalls},
        event::{sample, ConnEvent, Detail, Direction, Dynamics, FailReason},
    };

    const CLIENT: &str = "[::1]:40000";

    fn remote() -> EndpointKey {
        EndpointKey::Remote(CLIENT.parse().unwrap())
    }

    fn active(ts_ns: u64, detail: Detail) -> ConnEvent {
        let mut event = sample(detail);
        event.direction = Some(Direction::Active);
        event.ts_ns = ts_ns;
        event.pid = Some(42);
        event
    }

    fn close(lifetime_ns: u64, bytes: u64, segs_out: u32, retransmits: u32, spurious: u32) -> Detail {
        Detail::Close {
            direction: Some(Direction::Active),
            lifetime_ns: Some(lifetime_ns),
            bytes_sent: bytes / 2,
            bytes_received: bytes - bytes / 2,
            retransmits,
            spurious_retransmits: spurious,
            transport: Dynamics { segs_out, ..Dynamics::default() },
        }
    }

    /// `n` connections over `window_s`, each with `handshake_ns`, living
    /// `lifetime_ns` and moving `bytes`.
    fn connections(n: u64, window_s: f64, handshake_ns: u64, lifetime_ns: u64, bytes: u64) -> Evidence {
        let mut watch = Watch::default();
        let step = (window_s * 1e9) as u64 / n.max(1);
        for i in 0..n {
            watch.record(&active(i * step, Detail::Handshake { direction: Direction::Active, handshake_ns }));
            watch.record(&active(i * step + lifetime_ns, close(lifetime_ns, bytes, 10, 0, 0)));
        }
        watch.finish();
        watch.endpoints.remove(&remote()).unwrap_or_default()
    }

    #[test]
    fn churn_fires_on_many_short_small_connections_only() {
        let churn = connections(500, 5.0, 60_000, 2_000_000, 200);
        let finding = connection_churn(&remote(), &churn, 5.0).expect("100/s short connections are churn");
        assert_eq!(finding.severity, Severity::Warning);
        assert_eq!(finding.evidence["conn_per_s"], 100);
        assert_eq!(finding.evidence["short_small_pct"], 100);
        assert!(finding.evidence["handshake_share_of_lifetime_pct"].as_f64().unwrap() > 2.0);
        let storm = connections(3_000, 5.0, 60_000, 2_000_000, 200);
        assert_eq!(connection_churn(&remote(), &storm, 5.0).unwrap().severity, Severity::Critical);
        // A handful of short connections, or many long or large ones: fine.
        assert!(connection_churn(&remote(), &connections(8, 5.0, 60_000, 2_000_000, 200), 5.0).is_none());
        assert!(connection_churn(&remote(), &connections(500, 5.0, 60_000, 2_000_000_000, 200), 5.0).is_none());
        assert!(connection_churn(&remote(), &connections(500, 5.0, 60_000, 2_000_000, 1 << 20), 5.0).is_none());
        // Keep-alive: few connections, long-lived.
        assert!(connection_churn(&remote(), &connections(4, 5.0, 60_000, 5_000_000_000, 100_000), 5.0).is_none());
    }

    #[test]
    fn syn_loss_fires_on_second_long_handshakes() {
        let mut e = connections(60, 5.0, 80_000, 2_000_000, 100);
        assert!(syn_loss(&remote(), &e, 5.0).is_none(), "fast handshakes");
        e.slow_handshakes = [10, 3, 0];
        let finding = syn_loss(&remote(), &e, 5.0).expect("13 of 60 connects ≥ 1 s");
        assert_eq!(finding.severity, Severity::Critical);
        assert_eq!(finding.evidence["handshakes_1s"], 10);
        e.slow_handshakes = [2, 0, 0];
        assert!(syn_loss(&remote(), &e, 5.0).is_none(), "two slow handshakes are not a pattern");
        let mut big = connections(1_000, 5.0, 80_000, 2_000_000, 100);
        big.slow_handshakes = [20, 0, 0];
        assert!(syn_loss(&remote(), &big, 5.0).is_none(), "2 % is under the 5 % share");
    }

    #[test]
    fn port_exhaustion_fires_near_the_range() {
        let mut e = Evidence { ephemeral_ports: 90, port_range_size: 100, ..Evidence::default() };
        assert_eq!(port_exhaustion(&remote(), &e, 5.0, 95).unwrap().severity, Severity::Critical);
        e.ephemeral_ports = 75;
        assert_eq!(port_exhaustion(&remote(), &e, 5.0, 80).unwrap().severity, Severity::Warning);
        e.ephemeral_ports = 400;
        e.port_range_size = 28_232;
        assert!(port_exhaustion(&remote(), &e, 5.0, 400).is_none());
        assert!(port_exhaustion(&remote(), &Evidence::default(), 5.0, 0).is_none(), "no census");
        let failed = Evidence { no_local_port: 2, ..Evidence::default() };
        let found = port_exhaustion(&remote(), &failed, 5.0, 0).expect("EADDRNOTAVAIL without a census");
        assert_eq!(found.severity, Severity::Critical);
        assert!(found.summary.contains("2 connect() calls"), "{}", found.summary);
    }

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

    fn failures(times_ms: &[u64]) -> Evidence {
        let mut watch = Watch::default();
        for &ms in times_ms {
            watch.record(&active(ms * 1_000_000, Detail::HandshakeFailed { reason: FailReason::Reset, after_ns: 50_000 }));
        }
        watch.endpoints.remove(&remote()).unwrap()
    }

    #[test]
    fn retry_storm_needs_fast_steady_retries() {
        let steady: Vec<u64> = (0..60).map(|i| i * 100).collect();
        let finding = retry_storm(&remote(), &failures(&steady), 6.0).expect("10 failures/s, every 100 ms");
        assert_eq!(finding.evidence["attempt_interval_p50_ms"], 100);
        assert_eq!(finding.evidence["pid"], 42);
        assert_eq!(finding.severity, Severity::Critical);
        // Exponential backoff: 100 ms doubling.
        let mut t = 0;
        let backoff: Vec<u64> = (0..25).map(|i| { t += 100 * (1u64 << (i / 3).min(8)); t }).collect();
        assert!(retry_storm(&remote(), &failures(&backoff), t as f64 / 1e3).is_none());
        // A few failures: not a storm.
        assert!(retry_storm(&remote(), &failures(&[0, 100, 200, 300, 400]), 5.0).is_none());
        // Retries every 2 s: slower than the SYN RTO.
        let slow: Vec<u64> = (0..25).map(|i| i * 2000).collect();
        assert!(retry_storm(&remote(), &failures(&slow), 2.0).is_none());
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
    fn accept_overflow_fires_on_any_drop() {
        let mut e = Evidence::default();
        assert!(accept_overflow(&EndpointKey::Listener(8080), &e, 5.0).is_none());
        e.stats.listen_overflows = 18;
        e.backlog = Some(2);
        let finding = accept_overflow(&EndpointKey::Listener(8080), &e, 5.0).unwrap();
        assert_eq!(finding.endpoint, "*:8080");
        assert_eq!(finding.severity, Severity::Critical);
        assert_eq!(finding.evidence["backlog_connections"], 2);
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

    #[test]
    fn findings_come_most_severe_first_and_symptoms_are_explained() {
        let overflow = Evidence { stats: { let mut s = crate::aggregate::stats::ConnStats::default(); s.listen_overflows = 2; s }, ..Evidence::default() };
        let mut lossy = connections(40, 10.0, 80_000, 2_000_000, 100);
        lossy.slow_handshakes = [20, 0, 0];
        let client = EndpointKey::Remote("127.0.0.1:8080".parse().unwrap());
        let other = EndpointKey::Remote("127.0.0.1:9090".parse().unwrap());
        let listener = EndpointKey::Listener(8080);
        let findings = evaluate([(&listener, &overflow), (&client, &lossy), (&other, &lossy)], 10.0, 0);
        let names: Vec<(&str, &str)> = findings.iter().map(|f| (f.finding, f.endpoint.as_str())).collect();
        // The SYNs to 8080 were dropped by the full queue: one finding.
        assert_eq!(names, [("syn_loss", "127.0.0.1:9090"), ("accept_overflow", "*:8080")]);
        assert_eq!(findings[0].severity, Severity::Critical);
        assert_eq!(findings[1].severity, Severity::Warning);
    }

    #[test]
    fn healthy_traffic_has_no_finding() {
        // Keep-alive: few long connections with many bytes; bulk with a few
        // spurious retransmits; a handful of short connections.
        let keepalive = connections(4, 10.0, 60_000, 9_000_000_000, 400_000);
        let mut bulk = connections(1, 10.0, 60_000, 9_000_000_000, 512 << 20);
        bulk.closed_segs_out = 360_000;
        bulk.closed_retransmits = 30;
        bulk.closed_spurious = 28;
        let few = connections(6, 10.0, 60_000, 3_000_000, 500);
        for e in [&keepalive, &bulk, &few] {
            assert!(evaluate([(&remote(), e)], 10.0, 6).is_empty());
        }
    }
}
