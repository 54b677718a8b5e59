//! Turns the event stream into the [`Snapshot`] each refresh shows: the
//! aggregator's cumulative statistics, differenced against the previous
//! refresh for per-second rates, plus the connections and the socket census.

use std::{collections::HashMap, time::Instant};

use hdrhistogram::Histogram;

use super::model::{
    Bar, ConnectionRow, DropRate, EndpointKind, EndpointRow, FindingRow, Header, ProcessRow, Quantiles, Snapshot,
    TOP_DROP_REASONS,
};
use crate::{
    aggregate::{buckets::Buckets, endpoint::EndpointBy, stats::ConnStats, topk::TopK, Aggregator},
    doctor::live::{self, LiveFindings},
    event::ConnEvent,
};

/// Endpoints and processes top keeps (the rest is not shown).
const TRACKED: usize = 500;
/// Findings shown at most per kind.
const FINDINGS_PER_KIND: usize = 50;

/// What a refresh needs besides the events.
pub struct Extras {
    /// The Connections view's rows (see connections.rs), and how many
    /// connections there are in all.
    pub connections: Vec<ConnectionRow>,
    pub connections_total: u64,
    pub time_wait: Option<u64>,
    pub events_lost: u64,
    pub bpf_errors: u64,
    /// Cumulative TCP drops by reason; `None` where the kernel has none.
    pub drops: Option<Vec<(String, u64)>>,
    pub now_ns: u64,
}

/// Drops per second over the last refresh: the total, and the reasons that
/// grew most (ties by name, so the line does not flicker).
fn drop_rates(now: &[(String, u64)], before: &HashMap<String, u64>, seconds: f64) -> (f64, Vec<DropRate>) {
    let mut rates: Vec<DropRate> = now
        .iter()
        .map(|(reason, count)| DropRate { reason: reason.clone(), per_s: rate(*count, before.get(reason).copied().unwrap_or(0), seconds) })
        .filter(|r| r.per_s > 0.0)
        .collect();
    let total = rates.iter().map(|r| r.per_s).sum();
    rates.sort_by(|a, b| b.per_s.total_cmp(&a.per_s).then_with(|| a.reason.cmp(&b.reason)));
    rates.truncate(TOP_DROP_REASONS);
    (total, rates)
}

/// Cumulative values at the previous refresh, for rates.
#[derive(Clone, Copy, Default)]
struct Totals {
    opened: u64,
    closed: u64,
    retransmits: u64,
    hol_stalls: u64,
    zero_windows: u64,
}

impl Totals {
    fn of(stats: &ConnStats) -> Self {
        Self {
            opened: stats.opened_total(),
            closed: stats.closed.iter().sum(),
            retransmits: stats.retransmits_total(),
            hol_stalls: stats.hol_stalls(),
            zero_windows: stats.zero_windows(),
        }
    }
}

/// One process's row before it is shown.
#[derive(Default)]
struct ProcessStats {
    comm: String,
    /// Its unit or container (else cgroup path), from its latest event.
    service: Option<std::sync::Arc<crate::service::Service>>,
    stats: ConnStats,
}

pub struct Feed {
    aggregator: Aggregator,
    /// By pid: the command name and service are kept with the statistics
    /// (no key allocation per event).
    processes: TopK<u32, ProcessStats>,
    previous: HashMap<String, Totals>,
    previous_processes: HashMap<u32, Totals>,
    previous_host: Totals,
    /// Cumulative drops by reason at the previous refresh.
    previous_drops: HashMap<String, u64>,
    last_refresh: Instant,
    /// The doctor's rules over 60 s windows (the line under the header and
    /// the Findings view).
    pub findings: LiveFindings,
}

impl Default for Feed {
    fn default() -> Self {
        Self::new()
    }
}

fn quantiles(histogram: &Option<Box<Histogram<u64>>>) -> Quantiles {
    match histogram {
        Some(histogram) if !histogram.is_empty() => Quantiles {
            p50_us: Some(histogram.value_at_quantile(0.5) as f64),
            p99_us: Some(histogram.value_at_quantile(0.99) as f64),
        },
        _ => Quantiles::default(),
    }
}

fn p99_us(histogram: &Option<Box<Histogram<u64>>>) -> Option<f64> {
    quantiles(histogram).p99_us
}

fn bars(buckets: &[&Buckets]) -> Vec<Bar> {
    let Some(first) = buckets.first() else { return Vec::new() };
    first
        .bounds
        .iter()
        .enumerate()
        .map(|(slot, bound)| Bar {
            le_us: (bound * 1e6).round() as u64,
            count: buckets.iter().map(|b| b.counts[slot]).sum(),
        })
        .collect()
}

fn rate(now: u64, before: u64, seconds: f64) -> f64 {
    now.saturating_sub(before) as f64 / seconds
}

impl Feed {
    /// With `--port`: census destinations on other ports are not the
    /// doctor's business either.
    pub fn for_port(port: Option<u16>) -> Self {
        Self { findings: LiveFindings::new(live::WINDOW, port), ..Self::new() }
    }

    pub fn new() -> Self {
        Self {
            aggregator: Aggregator::new(EndpointBy::Auto, TRACKED),
            processes: TopK::new(TRACKED),
            previous: HashMap::new(),
            previous_processes: HashMap::new(),
            previous_host: Totals::default(),
            previous_drops: HashMap::new(),
            last_refresh: Instant::now(),
            findings: LiveFindings::new(live::WINDOW, None),
        }
    }

    pub fn record(&mut self, event: &ConnEvent) {
        self.aggregator.record(event);
        self.findings.record(event);
        if let (Some(pid), Some(comm)) = (event.pid, &event.comm) {
            let weight = u64::from(matches!(event.detail, crate::event::Detail::Handshake { .. }));
            if let Some(process) = self.processes.get_or_admit(&pid, weight) {
                if process.comm != **comm {
                    process.comm.replace_range(.., comm);
                }
                if event.service.is_some() && process.service != event.service {
                    process.service.clone_from(&event.service);
                }
                process.stats.record(event);
            }
        }
    }

    /// The frame for now; rates are over the time since the last call.
    pub fn snapshot(&mut self, extras: Extras) -> Snapshot {
        let seconds = self.last_refresh.elapsed().as_secs_f64().max(0.001);
        self.last_refresh = Instant::now();
        let host = Totals::of(&self.aggregator.host);
        let before = std::mem::replace(&mut self.previous_host, host);
        let window = |recent: &crate::aggregate::recent::Recent| {
            let window = recent.window(extras.now_ns, &[0.5, 0.99]);
            (window.count > 0).then(|| (window.quantiles[0].1 * 1e6, window.quantiles[1].1 * 1e6))
        };
        let handshake = |slot: usize| {
            window(&self.aggregator.recent_handshake[slot])
                .map_or(Quantiles::default(), |(p50, p99)| Quantiles { p50_us: Some(p50), p99_us: Some(p99) })
        };
        let header = Header {
            opened_per_s: rate(host.opened, before.opened, seconds),
            closed_per_s: rate(host.closed, before.closed, seconds),
            handshake_active: handshake(0),
            handshake_passive: handshake(1),
            retransmits_per_s: rate(host.retransmits, before.retransmits, seconds),
            hol_stalls_per_s: rate(host.hol_stalls, before.hol_stalls, seconds),
            hol_stall_p99_us: window(&self.aggregator.recent_hol_stall).map(|(_, p99)| p99),
            zero_window_stalls_per_s: rate(host.zero_windows, before.zero_windows, seconds),
            time_wait: extras.time_wait,
            events_lost: extras.events_lost,
            bpf_errors: extras.bpf_errors,
            drops_per_s: None,
            top_drop_reasons: Vec::new(),
        };
        let mut header = header;
        if let Some(drops) = &extras.drops {
            let (total, top) = drop_rates(drops, &self.previous_drops, seconds);
            header.drops_per_s = Some(total);
            header.top_drop_reasons = top;
            self.previous_drops = drops.iter().cloned().collect();
        }

        let mut previous = HashMap::with_capacity(self.aggregator.endpoints.len());
        let endpoints = self
            .aggregator
            .endpoints
            .iter()
            .map(|(key, stats)| {
                let name = key.to_string();
                let now = Totals::of(stats);
                let before = self.previous.get(&name).copied().unwrap_or_default();
                previous.insert(name.clone(), now);
                EndpointRow {
                    kind: if key.is_listener() { EndpointKind::Listener } else { EndpointKind::Remote },
                    endpoint: name,
                    connections: now.opened,
                    conn_per_s: rate(now.opened, before.opened, seconds),
                    short_lived_pct: if stats.closed_with_lifetime > 0 {
                        stats.short_lived as f64 * 100.0 / stats.closed_with_lifetime as f64
                    } else {
                        0.0
                    },
                    handshake: quantiles(&stats.handshake_us),
                    retransmits_per_s: rate(now.retransmits, before.retransmits, seconds),
                    // Both from close events: the same connections above and below.
                    retransmits_per_1k_segs: stats.retransmits_per_1k_segs(),
                    hol_stall_p99_us: p99_us(&stats.hol_stall_us),
                    hol_stall_total_us: stats.hol_stall_ns / 1_000,
                    zero_window_total_us: stats.zero_window_ns / 1_000,
                    accept_wait_p99_us: p99_us(&stats.accept_wait_us),
                    listen_overflows: stats.listen_overflows,
                    handshake_bars: bars(&[&stats.handshake[0], &stats.handshake[1]]),
                    hol_stall_bars: bars(&[&stats.hol_stall]),
                }
            })
            .collect();
        self.previous = previous;

        let mut previous_processes = HashMap::with_capacity(self.processes.len());
        let processes = self
            .processes
            .iter()
            .map(|(pid, ProcessStats { comm, service, stats })| {
                let now = Totals::of(stats);
                let before = self.previous_processes.get(pid).copied().unwrap_or_default();
                previous_processes.insert(*pid, now);
                ProcessRow {
                    pid: *pid,
                    comm: comm.clone(),
                    service: service.as_ref().map(|s| s.to_string()),
                    connections: now.opened,
                    conn_per_s: rate(now.opened, before.opened, seconds),
                    handshake: quantiles(&stats.handshake_us),
                    retransmits_per_s: rate(now.retransmits, before.retransmits, seconds),
                    hol_stall_total_us: stats.hol_stall_ns / 1_000,
                }
            })
            .collect();
        self.previous_processes = previous_processes;

        let findings = self
            .findings
            .active(FINDINGS_PER_KIND)
            .into_iter()
            .map(|f| FindingRow {
                severity: f.severity.as_str().to_string(),
                finding: f.finding.to_string(),
                endpoint: f.endpoint,
                summary: f.summary,
                evidence: f.evidence.iter().map(|(k, v)| match v {
                    serde_json::Value::String(text) => format!("{k}={text}"),
                    other => format!("{k}={other}"),
                }).collect::<Vec<_>>().join(" "),
                advice: f.advice.to_string(),
            })
            .collect();

        Snapshot {
            header,
            findings,
            endpoints,
            connections: extras.connections,
            connections_total: extras.connections_total,
            processes,
        }
    }

    /// Ends an epoch of the endpoint and process tables: idle rows leave,
    /// busy newcomers get their slots.
    pub fn end_epoch(&mut self) {
        self.aggregator.end_epoch();
        self.processes.end_epoch();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{sample, Detail, Direction, Dynamics};

    fn from_client(detail: Detail) -> ConnEvent {
        let mut event = sample(detail);
        event.direction = Some(Direction::Active);
        event
    }

    /// RETR/1K: retransmits and segments of the same (closed) connections.
    /// A live connection retransmitting, or one opened before netlens,
    /// moves the retransmit rate but not the ratio until it closes.
    #[test]
    fn retransmits_per_1k_cover_the_connections_their_segments_cover() {
        let mut feed = Feed::new();
        feed.record(&from_client(Detail::Handshake { direction: Direction::Active, handshake_ns: 40_000 }));
        // A live connection retransmits 5 segments; it has not closed.
        feed.record(&from_client(Detail::Retransmit { state: netlens_common::tcp_state::ESTABLISHED, segs: 5, bytes: 7240, seq: 0 }));
        // Another closes: 2 retransmitted of 1,000 sent.
        feed.record(&from_client(Detail::Close {
            direction: Some(Direction::Active),
            lifetime_ns: Some(1_000_000),
            bytes_sent: 1_000_000,
            bytes_received: 0,
            retransmits: 2,
            spurious_retransmits: 0,
            transport: Dynamics { segs_out: 1_000, ..Dynamics::default() },
        }));
        let snapshot = feed.snapshot(Extras { connections: Vec::new(), connections_total: 0, time_wait: None, events_lost: 0, bpf_errors: 0, drops: None, now_ns: 10 });
        let row = snapshot.endpoints.iter().find(|row| row.endpoint == "[::1]:40000").expect("the endpoint's row");
        assert_eq!(row.retransmits_per_1k_segs, Some(2.0), "5 live retransmits are not over the closed one's segments");
        assert!(row.retransmits_per_s > 0.0, "the live retransmits still show in RETR/S");
    }

    /// The header's drops: what grew since the last refresh, the two
    /// reasons that grew most first, ties by name.
    #[test]
    fn drop_rates_name_what_grew_most() {
        let before: HashMap<String, u64> = [("tcp_ofo_drop".to_string(), 10), ("tcp_zerowindow".to_string(), 5)].into();
        let now = vec![
            ("tcp_ofo_drop".to_string(), 10),
            ("tcp_zerowindow".to_string(), 25),
            ("socket_backlog".to_string(), 4),
            ("proto_mem".to_string(), 4),
        ];
        let (total, top) = drop_rates(&now, &before, 2.0);
        assert_eq!(total, 14.0);
        assert_eq!(top, vec![
            DropRate { reason: "tcp_zerowindow".into(), per_s: 10.0 },
            DropRate { reason: "proto_mem".into(), per_s: 2.0 },
        ]);
    }
}
