//! The doctor's rules: each a pure function from one endpoint's evidence
//! (and the length of the watch) to at most one finding. Thresholds are
//! named, with the reason for each number; README "netlens doctor" lists
//! them too. `connect` holds the rules about opening connections,
//! `transfer` those about moving data on open ones; here is what they
//! share and [`evaluate`], which runs them all.

use serde_json::{Map, Value};

mod connect;
#[cfg(test)]
mod fixtures;
mod transfer;

pub use connect::*;
pub use transfer::*;

use super::evidence::Evidence;
use crate::aggregate::endpoint::EndpointKey;

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

pub(super) fn round(value: f64, places: i32) -> Value {
    let scale = 10f64.powi(places);
    let rounded = (value * scale).round() / scale;
    if places == 0 || rounded.fract() == 0.0 {
        Value::from(rounded as i64)
    } else {
        Value::from(rounded)
    }
}

pub(super) fn evidence(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

pub(super) fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { part as f64 * 100.0 / whole as f64 }
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
    use crate::doctor::rules::fixtures::*;

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
