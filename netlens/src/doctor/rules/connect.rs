//! Rules about opening connections: churn, SYN loss, ephemeral ports,
//! retry storms, accept-queue overflows.

use super::{evidence, pct, round, Finding, Severity};
use crate::{aggregate::{endpoint::EndpointKey, stats::{ACTIVE, PASSIVE}}, doctor::evidence::{Evidence, SMALL_BYTES}};

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

// ---- accept_overflow ----
/// Any connection dropped on a full accept queue is a finding: healthy
/// listeners never drop, and each drop costs its client at least the 1 s
/// SYN RTO. Critical from this many drops per second.
pub const ACCEPT_MIN_DROPPED: u64 = 1;
pub const ACCEPT_CRITICAL_PER_S: f64 = 1.0;


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


fn median(values: &mut [u64]) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    values[values.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::rules::fixtures::*;

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

    /// Connects reset at these times (ms into the watch).
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
}
