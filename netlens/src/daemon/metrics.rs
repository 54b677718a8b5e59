//! The Prometheus exposition: plain aggregator values turned into metric
//! families at scrape time, so the series are exactly the tracked endpoints
//! plus `other`, never more (README, "Metrics" has the bound).

use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType};

use super::proto::{counter, family, gauge, histogram, label, log2_histogram, summary};

use crate::features::{FeatureStatus, Level};
use crate::{
    aggregate::{
        recent,
        stats::{ConnStats, DIRECTIONS, FAIL_REASONS, PASSIVE, RESET_DIRECTIONS, RETRANSMIT_KINDS, WINDOW_SIDES},
        Aggregator,
    },
    census::Census,
    doctor::rules::Finding,
    kernel::progstats::ProgramStats,
    loader::KernelCounters,
};
use netlens_common::PacketHistograms;

/// Everything one scrape renders.
pub struct Inputs<'a> {
    pub aggregator: &'a Aggregator,
    pub census: Option<&'a Census>,
    pub counters: KernelCounters,
    pub flow_table_evictions: u64,
    pub programs: &'a [(&'static str, ProgramStats)],
    pub bpf_stats_enabled: bool,
    pub packets: Option<PacketHistograms>,
    /// Destinations shown in the ports ratio.
    pub top_k: usize,
    pub now_ns: u64,
    /// How each feature is served on this kernel.
    pub features: &'a [FeatureStatus],
    /// Failures inside each eBPF program, by program.
    pub program_errors: &'a [(&'static str, u64)],
    /// TCP packets the kernel dropped, by reason.
    pub drops: &'a [(String, u64)],
    /// Kernel map reads that failed (their last good value was exported).
    pub map_read_failures: u64,
    /// The doctor's findings holding now (at most top_k per kind).
    pub findings: &'a [Finding],
}

/// The tracked endpoints and `other`, with the label to put on each; just
/// the host total when there is no endpoint dimension.
fn endpoint_rows(aggregator: &Aggregator) -> Vec<(Vec<LabelPair>, ConnStats)> {
    if aggregator.endpoint_by() == crate::aggregate::endpoint::EndpointBy::None {
        return vec![(Vec::new(), aggregator.host.clone())];
    }
    let mut rows: Vec<(Vec<LabelPair>, ConnStats)> = aggregator
        .endpoints
        .iter()
        .map(|(key, stats)| (vec![label("endpoint", &key.to_string())], stats.clone()))
        .collect();
    rows.sort_by(|a, b| a.0[0].value().cmp(b.0[0].value()));
    rows.push((vec![label("endpoint", "other")], aggregator.other()));
    rows
}

fn with(mut labels: Vec<LabelPair>, extra: &[(&str, &str)]) -> Vec<LabelPair> {
    labels.splice(0..0, extra.iter().map(|(name, value)| label(name, value)));
    labels
}

/// Every metric family, in a stable order.
pub fn families(inputs: &Inputs) -> Vec<MetricFamily> {
    let aggregator = inputs.aggregator;
    let host = &aggregator.host;
    let rows = endpoint_rows(aggregator);
    let mut families = Vec::new();
    let mut per_endpoint = |name: &str, help: &str, kind: MetricType, build: &dyn Fn(&Vec<LabelPair>, &ConnStats) -> Vec<Metric>| {
        let metrics = rows.iter().flat_map(|(labels, stats)| build(labels, stats)).collect();
        families.push(family(name, help, kind, metrics));
    };

    per_endpoint(
        "netlens_tcp_handshake_duration_seconds",
        "TCP handshake time: connect() to established (active), first SYN-ACK to established (passive).",
        MetricType::HISTOGRAM,
        &|labels, stats| {
            (0..2)
                .filter(|&d| stats.handshake[d].count() > 0)
                .map(|d| histogram(with(labels.clone(), &[("direction", DIRECTIONS[d])]), &stats.handshake[d]))
                .collect()
        },
    );
    per_endpoint(
        "netlens_tcp_handshake_failures_total",
        "Connection attempts that never became established, by reason.",
        MetricType::COUNTER,
        &|labels, stats| {
            let mut metrics = Vec::new();
            for (d, by_reason) in stats.handshake_failures.iter().enumerate() {
                for (r, count) in by_reason.iter().enumerate().filter(|(_, count)| **count > 0) {
                    let extra = [("direction", DIRECTIONS[d]), ("reason", FAIL_REASONS[r].as_str())];
                    metrics.push(counter(with(labels.clone(), &extra), *count as f64));
                }
            }
            metrics
        },
    );
    per_endpoint(
        "netlens_tcp_retransmits_total",
        "Retransmitted segments: data, SYN (connect() waits ≥1 s) and SYN-ACK.",
        MetricType::COUNTER,
        &|labels, stats| {
            (0..3).map(|k| counter(with(labels.clone(), &[("kind", RETRANSMIT_KINDS[k])]), stats.retransmits[k] as f64)).collect()
        },
    );
    per_endpoint("netlens_tcp_resets_total", "TCP resets sent and received.", MetricType::COUNTER, &|labels, stats| {
        (0..2).map(|d| counter(with(labels.clone(), &[("direction", RESET_DIRECTIONS[d])]), stats.resets[d] as f64)).collect()
    });
    per_endpoint(
        "netlens_tcp_connections_opened_total",
        "Connections established, by who opened them.",
        MetricType::COUNTER,
        &|labels, stats| {
            (0..2).map(|d| counter(with(labels.clone(), &[("direction", DIRECTIONS[d])]), stats.opened[d] as f64)).collect()
        },
    );
    per_endpoint(
        "netlens_tcp_connections_closed_total",
        "Connections closed; direction unknown when netlens did not see them open.",
        MetricType::COUNTER,
        &|labels, stats| {
            (0..3)
                .filter(|&d| d < 2 || stats.closed[d] > 0)
                .map(|d| counter(with(labels.clone(), &[("direction", DIRECTIONS[d])]), stats.closed[d] as f64))
                .collect()
        },
    );
    per_endpoint(
        "netlens_tcp_hol_stall_duration_seconds",
        "Head-of-line stalls: data received out of order, held until the gap was filled.",
        MetricType::HISTOGRAM,
        &|labels, stats| vec![histogram(labels.clone(), &stats.hol_stall)],
    );

    per_endpoint(
        "netlens_tcp_accept_queue_wait_seconds",
        "Time accepted connections waited in the listener's accept queue: established to accept().",
        MetricType::HISTOGRAM,
        &|labels, stats| {
            if stats.accept_wait.count() == 0 && stats.opened[PASSIVE] == 0 {
                return Vec::new();
            }
            vec![histogram(labels.clone(), &stats.accept_wait)]
        },
    );
    per_endpoint(
        "netlens_tcp_listen_overflows_total",
        "Connections a listener dropped because its accept queue was full (TcpExtListenOverflows).",
        MetricType::COUNTER,
        &|labels, stats| {
            if stats.listen_overflows == 0 && stats.opened[PASSIVE] == 0 {
                return Vec::new();
            }
            vec![counter(labels.clone(), stats.listen_overflows as f64)]
        },
    );

    // Host-wide distributions.
    families.push(family(
        "netlens_tcp_handshake_duration_recent_seconds",
        &format!("Exact handshake-time quantiles over the last {} s (HdrHistogram).", recent::WINDOW_SECONDS),
        MetricType::SUMMARY,
        (0..2).map(|d| summary(vec![label("direction", DIRECTIONS[d])], &aggregator.recent_handshake[d], inputs.now_ns)).collect(),
    ));
    families.push(family(
        "netlens_tcp_hol_stall_duration_recent_seconds",
        &format!("Exact head-of-line stall quantiles over the last {} s (HdrHistogram).", recent::WINDOW_SECONDS),
        MetricType::SUMMARY,
        vec![summary(Vec::new(), &aggregator.recent_hol_stall, inputs.now_ns)],
    ));
    families.push(family(
        "netlens_tcp_connection_lifetime_seconds",
        "Connection lifetimes, established to closed.",
        MetricType::HISTOGRAM,
        (0..3)
            .filter(|&d| d < 2 || host.lifetime[d].count() > 0)
            .map(|d| histogram(vec![label("direction", DIRECTIONS[d])], &host.lifetime[d]))
            .collect(),
    ));
    families.push(family(
        "netlens_tcp_hol_stalled_bytes",
        "Bytes held in the out-of-order queue per head-of-line stall.",
        MetricType::HISTOGRAM,
        vec![histogram(Vec::new(), &host.hol_held_bytes)],
    ));
    families.push(family(
        "netlens_tcp_zero_window_duration_seconds",
        "Zero-window stalls: peer = the far end's reader is slow, local = our application is not reading.",
        MetricType::HISTOGRAM,
        (0..2).map(|s| histogram(vec![label("side", WINDOW_SIDES[s].as_str())], &host.zero_window[s])).collect(),
    ));
    families.push(family(
        "netlens_tcp_srtt_seconds",
        "Smoothed RTT per connection, at close.",
        MetricType::HISTOGRAM,
        vec![histogram(Vec::new(), &host.srtt)],
    ));
    if let Some(packets) = &inputs.packets {
        families.push(family(
            "netlens_tcp_segment_srtt_seconds",
            "Smoothed RTT as of each received segment of a tracked connection, host-wide (every network namespace: --netns does not narrow it; in-kernel log2 histogram, sum approximated from bucket middles).",
            MetricType::HISTOGRAM,
            vec![log2_histogram(&packets.srtt_us, 1e-6)],
        ));
        families.push(family(
            "netlens_tcp_segment_cwnd_segments",
            "Congestion window (in segments) as of each received segment of a tracked connection, host-wide (every network namespace: --netns does not narrow it; in-kernel log2 histogram, sum approximated from bucket middles).",
            MetricType::HISTOGRAM,
            vec![log2_histogram(&packets.cwnd, 1.0)],
        ));
    }
    families.push(family(
        "netlens_tcp_slow_start_exits_total",
        "Connections that left slow start (cwnd reached ssthresh, or the first loss or recovery).",
        MetricType::COUNTER,
        vec![counter(Vec::new(), host.slow_start_exits as f64)],
    ));
    families.push(family(
        "netlens_tcp_closed_in_slow_start_total",
        "Connections that closed without ever leaving slow start.",
        MetricType::COUNTER,
        vec![counter(Vec::new(), host.closed_in_slow_start as f64)],
    ));
    families.push(family(
        "netlens_tcp_drops_total",
        "TCP packets the kernel dropped (skb:kfree_skb), host-wide, by enum skb_drop_reason (lower case, no SKB_DROP_REASON_ prefix).",
        MetricType::COUNTER,
        inputs.drops.iter().map(|(reason, count)| counter(vec![label("reason", reason)], *count as f64)).collect(),
    ));

    if let Some(census) = inputs.census {
        families.push(family(
            "netlens_tcp_sockets",
            "TCP sockets in this network namespace by state (netlink sock_diag census).",
            MetricType::GAUGE,
            census.sockets_by_state.iter().map(|(state, count)| gauge(vec![label("state", state)], *count as f64)).collect(),
        ));
        families.push(family(
            "netlens_tcp_ephemeral_ports_used_ratio",
            "Sockets on a local ephemeral port (TIME_WAIT included) toward one destination, over the size of ip_local_port_range; top destinations only.",
            MetricType::GAUGE,
            census
                .ephemeral_by_destination
                .iter()
                .take(inputs.top_k)
                .map(|(destination, used)| gauge(vec![label("destination", &destination.to_string())], census.ephemeral_ratio(*used)))
                .collect(),
        ));
    }

    // netlens's own health and cost.
    families.push(family(
        "netlens_events_lost_total",
        "Events that never reached netlens: ring_buffer_full (reader too slow), kernel_skipped (program already running on that CPU), retransmit_seen_at_close (retransmissions only a close's total showed).",
        MetricType::COUNTER,
        vec![
            counter(vec![label("cause", "ring_buffer_full")], inputs.counters.events_lost as f64),
            counter(vec![label("cause", "kernel_skipped")], inputs.counters.events_missed as f64),
            counter(vec![label("cause", "retransmit_seen_at_close")], inputs.counters.retransmits_unseen as f64),
        ],
    ));
    families.push(family(
        "netlens_bpf_errors_total",
        "Runs of each netlens eBPF program that failed part way (a kernel read refused, a map full): what they saw is missing.",
        MetricType::COUNTER,
        inputs.program_errors.iter().map(|(name, count)| counter(vec![label("program", name)], *count as f64)).collect(),
    ));
    families.push(family(
        "netlens_map_read_failures_total",
        "Reads of netlens's kernel maps that failed; the previous value was exported instead.",
        MetricType::COUNTER,
        vec![counter(Vec::new(), inputs.map_read_failures as f64)],
    ));
    families.push(family(
        "netlens_flow_table_evictions_total",
        "Connections the kernel flow table lost: refused when it was full, or whose close went unseen (their close lacks lifetime and direction).",
        MetricType::COUNTER,
        vec![counter(Vec::new(), inputs.flow_table_evictions as f64)],
    ));
    families.push(family(
        "netlens_endpoints_tracked",
        "Endpoints with their own series (at most --top-k; the rest is endpoint=\"other\").",
        MetricType::GAUGE,
        vec![gauge(Vec::new(), aggregator.endpoints.len() as f64)],
    ));
    families.push(family(
        "netlens_build_info",
        "netlens version.",
        MetricType::GAUGE,
        vec![gauge(vec![label("version", env!("CARGO_PKG_VERSION"))], 1.0)],
    ));
    families.push(family(
        "netlens_feature_enabled",
        "1 when this kernel serves the feature (fully or degraded, see `netlens check`), 0 when it lacks the hooks it needs.",
        MetricType::GAUGE,
        inputs
            .features
            .iter()
            .map(|f| gauge(vec![label("feature", f.feature.name)], f64::from(u8::from(f.level != Level::Missing))))
            .collect(),
    ));
    families.push(family(
        "netlens_bpf_stats_enabled",
        "1 when kernel.bpf_stats_enabled is on; program run time and count are 0 otherwise.",
        MetricType::GAUGE,
        vec![gauge(Vec::new(), f64::from(u8::from(inputs.bpf_stats_enabled)))],
    ));
    families.push(family(
        "netlens_bpf_program_run_seconds_total",
        "Time the kernel spent in each netlens eBPF program (kernel BPF stats).",
        MetricType::COUNTER,
        inputs.programs.iter().map(|(name, stats)| counter(vec![label("program", name)], stats.run_time_ns as f64 / 1e9)).collect(),
    ));
    families.push(family(
        "netlens_bpf_program_runs_total",
        "Times each netlens eBPF program ran (kernel BPF stats).",
        MetricType::COUNTER,
        inputs.programs.iter().map(|(name, stats)| counter(vec![label("program", name)], stats.run_count as f64)).collect(),
    ));
    families.push(family(
        "netlens_bpf_program_skipped_runs_total",
        "Times the kernel skipped each netlens eBPF program because it was already running on that CPU (events or counts missed).",
        MetricType::COUNTER,
        inputs.programs.iter().map(|(name, stats)| counter(vec![label("program", name)], stats.recursion_misses as f64)).collect(),
    ));
    families.push(family(
        "netlens_finding_active",
        "1 while the doctor's finding holds for the endpoint (the rules of `netlens doctor` over 60 s windows); absent otherwise.",
        MetricType::GAUGE,
        inputs
            .findings
            .iter()
            .map(|f| gauge(vec![label("finding", f.finding), label("endpoint", &f.endpoint)], 1.0))
            .collect(),
    ));
    // The encoder refuses a family without samples (no census destination
    // yet, no programs): leave those out.
    families.retain(|family| !family.get_metric().is_empty());
    families
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        aggregate::endpoint::EndpointBy,
        event::{sample, Detail, Direction},
    };

    fn render(aggregator: &Aggregator) -> String {
        let inputs = Inputs {
            aggregator,
            census: None,
            counters: KernelCounters::default(),
            flow_table_evictions: 0,
            programs: &[],
            bpf_stats_enabled: false,
            packets: Some(PacketHistograms::default()),
            top_k: 50,
            now_ns: 0,
            features: &[],
            program_errors: &[("tcp_probe", 2)],
            drops: &[("tcp_rcvqdrop".to_string(), 3)],
            map_read_failures: 1,
            findings: &[],
        };
        prometheus::TextEncoder::new().encode_to_string(&families(&inputs)).unwrap()
    }

    fn series(text: &str) -> usize {
        text.lines().filter(|line| !line.starts_with('#') && !line.is_empty()).count()
    }

    #[test]
    fn series_are_bounded_whatever_the_endpoints() {
        let run = |endpoints: u16| {
            let mut aggregator = Aggregator::new(EndpointBy::Auto, 50);
            for port in 0..endpoints {
                let mut event = sample(Detail::Handshake { direction: Direction::Active, handshake_ns: 40_000 });
                event.direction = Some(Direction::Active);
                event.remote.set_port(1_000 + port);
                aggregator.record(&event);
                event.detail = Detail::Retransmit { state: 1, segs: 1, bytes: 1448, seq: 0 };
                aggregator.record(&event);
            }
            series(&render(&aggregator))
        };
        let (few, many) = (run(60), run(5_000));
        assert_eq!(few, many, "5,000 endpoints make no more series than 60");
    }

    #[test]
    fn exposition_names_follow_prometheus_conventions() {
        let mut aggregator = Aggregator::new(EndpointBy::Auto, 50);
        aggregator.record(&sample(Detail::Handshake { direction: Direction::Passive, handshake_ns: 40_000 }));
        let text = render(&aggregator);
        assert!(text.contains("netlens_tcp_handshake_duration_seconds_bucket{direction=\"passive\",endpoint=\"*:8080\",le=\"0.00005\"} 1"), "{text}");
        assert!(text.contains("netlens_tcp_connections_opened_total{direction=\"passive\",endpoint=\"*:8080\"} 1"));
        assert!(text.contains("netlens_tcp_connections_opened_total{direction=\"passive\",endpoint=\"other\"} 0"));
        assert!(text.contains("# TYPE netlens_tcp_retransmits_total counter"));
        assert!(text.contains("netlens_tcp_segment_srtt_seconds_bucket{le=\"0.000002\"} 0"));
        assert!(text.contains("netlens_tcp_segment_cwnd_segments_bucket{le=\"16\"} 0"), "{text}");
        assert!(text.contains("netlens_bpf_errors_total{program=\"tcp_probe\"} 2"), "{text}");
        assert!(text.contains("netlens_tcp_drops_total{reason=\"tcp_rcvqdrop\"} 3"), "{text}");
        assert!(text.contains("netlens_map_read_failures_total 1"), "{text}");
        aggregator.record(&sample(Detail::ListenOverflow { dropped: 3, backlog: 2 }));
        aggregator.record(&sample(Detail::Accepted { wait_ns: 2_000_000, queue_len: 0, backlog: 2 }));
        let text = render(&aggregator);
        assert!(text.contains("netlens_tcp_listen_overflows_total{endpoint=\"*:8080\"} 3"), "{text}");
        assert!(text.contains("netlens_tcp_accept_queue_wait_seconds_bucket{endpoint=\"*:8080\",le=\"0.0025\"} 1"), "{text}");
    }

    #[test]
    fn findings_are_one_series_each() {
        let aggregator = Aggregator::new(EndpointBy::Auto, 50);
        let finding = crate::doctor::rules::Finding {
            finding: "accept_overflow",
            severity: crate::doctor::rules::Severity::Critical,
            endpoint: "*:8080".into(),
            summary: String::new(),
            evidence: Default::default(),
            advice: "",
            weight: 1.0,
        };
        let findings = [finding];
        let inputs = Inputs {
            aggregator: &aggregator,
            census: None,
            counters: KernelCounters::default(),
            flow_table_evictions: 0,
            programs: &[],
            bpf_stats_enabled: false,
            packets: None,
            top_k: 50,
            now_ns: 0,
            features: &[],
            program_errors: &[],
            drops: &[],
            map_read_failures: 0,
            findings: &findings,
        };
        let text = prometheus::TextEncoder::new().encode_to_string(&families(&inputs)).unwrap();
        assert!(text.contains("netlens_finding_active{finding=\"accept_overflow\",endpoint=\"*:8080\"} 1"), "{text}");
        assert!(!render(&aggregator).contains("netlens_finding_active"), "no finding, no series");
    }
}
