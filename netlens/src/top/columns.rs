//! The columns of the three views and the thresholds that colour trouble.

use std::net::SocketAddr;

use super::format::{self, NONE};
use super::model::{ConnectionRow, EndpointKind, EndpointRow, FindingRow, ProcessRow};
use super::table::{contains_ci, Column, Severity, SortKey, TableRow};

/// A head-of-line stall p99 above this hurts request latency visibly.
pub const HOL_P99_BAD_US: f64 = 10_000.0;
/// A handshake p99 at or above the initial SYN RTO (1 s) means SYNs are
/// being retransmitted: lost SYNs or a full accept/SYN queue.
pub const HANDSHAKE_P99_BAD_US: f64 = 1_000_000.0;
/// An accept-queue wait p99 above this: the server takes connections
/// late (a full event loop, too few workers).
pub const ACCEPT_P99_BAD_US: f64 = 100_000.0;
/// 1% of segments retransmitted is serious loss.
pub const RETRANS_PER_1K_BAD: f64 = 10.0;

pub fn warn_if_positive(value: f64) -> Severity {
    if value > 0.0 {
        Severity::Warn
    } else {
        Severity::Normal
    }
}

pub fn bad_above(value: Option<f64>, threshold: f64) -> Severity {
    match value {
        Some(v) if v >= threshold => Severity::Bad,
        _ => Severity::Normal,
    }
}

// Aliases so chained `.trouble(..)` calls know the row type.
type EndpointColumn = Column<EndpointRow>;
type ConnectionColumn = Column<ConnectionRow>;
type ProcessColumn = Column<ProcessRow>;

fn num(value: f64) -> Option<SortKey> {
    Some(SortKey::Num(value))
}

fn text(value: &str) -> Option<SortKey> {
    Some(SortKey::Text(value.to_lowercase()))
}

pub fn kind_name(kind: EndpointKind) -> &'static str {
    match kind {
        EndpointKind::Remote => "remote",
        EndpointKind::Listener => "listen",
    }
}

/// Numeric address order; listeners ("*:8080") sort as 0.0.0.0:port, so
/// they come first and in port order.
fn endpoint_key(r: &EndpointRow) -> Option<SortKey> {
    let wildcard_port = r.endpoint.strip_prefix("*:").and_then(|port| port.parse::<u16>().ok());
    match (r.endpoint.parse(), wildcard_port) {
        (Ok(addr), _) => Some(SortKey::Addr(addr)),
        (Err(_), Some(port)) => Some(SortKey::Addr(SocketAddr::from(([0, 0, 0, 0], port)))),
        _ => text(&r.endpoint),
    }
}

static ENDPOINT_COLUMNS: [Column<EndpointRow>; 14] = [
    EndpointColumn::text("ENDPOINT", 22, |r| r.endpoint.clone(), endpoint_key),
    EndpointColumn::text("KIND", 6, |r| kind_name(r.kind).to_string(), |r| text(kind_name(r.kind))),
    EndpointColumn::num("CONNS", 7, |r| r.connections.to_string(), |r| num(r.connections as f64)),
    EndpointColumn::num("CONN/S", 7, |r| format::rate(r.conn_per_s), |r| num(r.conn_per_s)),
    EndpointColumn::num("SHORT%", 7, |r| format::percent(r.short_lived_pct), |r| num(r.short_lived_pct)),
    EndpointColumn::num("HS P50", 8, |r| format::micros_opt(r.handshake.p50_us), |r| SortKey::num(r.handshake.p50_us)),
    EndpointColumn::num("HS P99", 8, |r| format::micros_opt(r.handshake.p99_us), |r| SortKey::num(r.handshake.p99_us))
        .trouble(|r| bad_above(r.handshake.p99_us, HANDSHAKE_P99_BAD_US)),
    EndpointColumn::num("RETR/S", 7, |r| format::rate(r.retransmits_per_s), |r| num(r.retransmits_per_s))
        .trouble(|r| warn_if_positive(r.retransmits_per_s)),
    EndpointColumn::num(
        "RETR/1K",
        8,
        |r| format::rate_opt(r.retransmits_per_1k_segs),
        |r| SortKey::num(r.retransmits_per_1k_segs),
    )
    .trouble(|r| match r.retransmits_per_1k_segs {
        Some(v) if v >= RETRANS_PER_1K_BAD => Severity::Bad,
        Some(v) => warn_if_positive(v),
        None => Severity::Normal,
    }),
    EndpointColumn::num("HOL P99", 8, |r| format::micros_opt(r.hol_stall_p99_us), |r| SortKey::num(r.hol_stall_p99_us))
        .trouble(|r| bad_above(r.hol_stall_p99_us, HOL_P99_BAD_US)),
    EndpointColumn::num("HOL TOT", 8, |r| format::micros(r.hol_stall_total_us), |r| num(r.hol_stall_total_us as f64)),
    EndpointColumn::num(
        "ZWIN TOT",
        9,
        |r| format::micros(r.zero_window_total_us),
        |r| num(r.zero_window_total_us as f64),
    )
    .trouble(|r| warn_if_positive(r.zero_window_total_us as f64)),
    EndpointColumn::num("ACCEPT", 8, |r| format::micros_opt(r.accept_wait_p99_us), |r| SortKey::num(r.accept_wait_p99_us))
        .trouble(|r| bad_above(r.accept_wait_p99_us, ACCEPT_P99_BAD_US)),
    EndpointColumn::num("OVFL", 6, |r| r.listen_overflows.to_string(), |r| num(r.listen_overflows as f64))
        .trouble(|r| match r.listen_overflows {
            0 => Severity::Normal,
            _ => Severity::Bad,
        }),
];

impl TableRow for EndpointRow {
    fn columns() -> &'static [Column<Self>] {
        &ENDPOINT_COLUMNS
    }
    fn matches(&self, needle: &str) -> bool {
        // The endpoint string carries both address and port.
        contains_ci(&self.endpoint, needle)
    }
    fn identity(&self) -> String {
        format!("{}/{}", kind_name(self.kind), self.endpoint)
    }
}

fn count_opt(value: Option<u32>) -> String {
    value.map_or_else(|| NONE.to_string(), |count| count.to_string())
}

fn pid_comm(r: &ConnectionRow) -> String {
    match (r.pid, &r.comm) {
        (Some(pid), Some(comm)) => format!("{pid}/{comm}"),
        (Some(pid), None) => pid.to_string(),
        (None, Some(comm)) => comm.clone(),
        (None, None) => NONE.to_string(),
    }
}

static CONNECTION_COLUMNS: [Column<ConnectionRow>; 11] = [
    ConnectionColumn::text("LOCAL", 21, |r| r.local.to_string(), |r| Some(SortKey::Addr(r.local))),
    ConnectionColumn::text("REMOTE", 21, |r| r.remote.to_string(), |r| Some(SortKey::Addr(r.remote))),
    ConnectionColumn::text("PID/COMM", 16, pid_comm, |r| r.pid.map(|p| SortKey::Num(p as f64))),
    // Unknown age: opened before netlens, so older than every known one.
    ConnectionColumn::num("AGE", 7, |r| r.age_us.map_or_else(|| NONE.to_string(), format::age), |r| {
        num(r.age_us.map_or(f64::INFINITY, |age| age as f64))
    }),
    ConnectionColumn::text("STATE", 11, |r| r.state.clone(), |r| text(&r.state)),
    ConnectionColumn::num(
        "SRTT",
        8,
        |r| format::micros_opt(r.srtt_us.map(f64::from)),
        |r| SortKey::num(r.srtt_us.map(f64::from)),
    ),
    ConnectionColumn::num("CWND", 5, |r| count_opt(r.cwnd), |r| SortKey::num(r.cwnd.map(f64::from))),
    ConnectionColumn::num("RETR", 5, |r| count_opt(r.retransmits), |r| SortKey::num(r.retransmits.map(f64::from)))
        .trouble(|r| warn_if_positive(r.retransmits.map_or(0.0, f64::from))),
    ConnectionColumn::num(
        "HOL",
        8,
        |r| format::micros_opt(r.hol_stall_us.map(|us| us as f64)),
        |r| SortKey::num(r.hol_stall_us.map(|us| us as f64)),
    )
    .trouble(|r| bad_above(r.hol_stall_us.map(|us| us as f64), HOL_P99_BAD_US)),
    ConnectionColumn::num(
        "SENT",
        7,
        |r| format::bytes_opt(r.bytes_sent),
        |r| SortKey::num(r.bytes_sent.map(|b| b as f64)),
    ),
    ConnectionColumn::num(
        "RECV",
        7,
        |r| format::bytes_opt(r.bytes_received),
        |r| SortKey::num(r.bytes_received.map(|b| b as f64)),
    ),
];

impl TableRow for ConnectionRow {
    fn columns() -> &'static [Column<Self>] {
        &CONNECTION_COLUMNS
    }
    fn matches(&self, needle: &str) -> bool {
        contains_ci(&self.local.to_string(), needle)
            || contains_ci(&self.remote.to_string(), needle)
            || self.comm.as_deref().is_some_and(|comm| contains_ci(comm, needle))
    }
    fn identity(&self) -> String {
        format!("{}-{}", self.local, self.remote)
    }
}

static PROCESS_COLUMNS: [Column<ProcessRow>; 9] = [
    // PIDs are names, not magnitudes: ascending like ps.
    ProcessColumn::num("PID", 7, |r| r.pid.to_string(), |r| num(r.pid as f64)).ascending_first(),
    ProcessColumn::text("COMM", 16, |r| r.comm.clone(), |r| text(&r.comm)),
    ProcessColumn::text("SERVICE", 24, |r| r.service.clone().unwrap_or_else(|| "-".into()), |r| text(r.service.as_deref().unwrap_or(""))),
    ProcessColumn::num("CONNS", 7, |r| r.connections.to_string(), |r| num(r.connections as f64)),
    ProcessColumn::num("CONN/S", 7, |r| format::rate(r.conn_per_s), |r| num(r.conn_per_s)),
    ProcessColumn::num("HS P50", 8, |r| format::micros_opt(r.handshake.p50_us), |r| SortKey::num(r.handshake.p50_us)),
    ProcessColumn::num("HS P99", 8, |r| format::micros_opt(r.handshake.p99_us), |r| SortKey::num(r.handshake.p99_us))
        .trouble(|r| bad_above(r.handshake.p99_us, HANDSHAKE_P99_BAD_US)),
    ProcessColumn::num("RETR/S", 7, |r| format::rate(r.retransmits_per_s), |r| num(r.retransmits_per_s))
        .trouble(|r| warn_if_positive(r.retransmits_per_s)),
    ProcessColumn::num("HOL TOT", 8, |r| format::micros(r.hol_stall_total_us), |r| num(r.hol_stall_total_us as f64)),
];

impl TableRow for ProcessRow {
    fn columns() -> &'static [Column<Self>] {
        &PROCESS_COLUMNS
    }
    fn matches(&self, needle: &str) -> bool {
        contains_ci(&self.comm, needle) || self.service.as_deref().is_some_and(|service| contains_ci(service, needle))
    }
    fn identity(&self) -> String {
        self.pid.to_string()
    }
}

/// Critical above warning above info, for sorting and colour.
pub fn severity_rank(severity: &str) -> f64 {
    match severity {
        "critical" => 2.0,
        "warning" => 1.0,
        _ => 0.0,
    }
}

fn finding_trouble(r: &FindingRow) -> Severity {
    match r.severity.as_str() {
        "critical" => Severity::Bad,
        "warning" => Severity::Warn,
        _ => Severity::Normal,
    }
}

type FindingColumn = Column<FindingRow>;

static FINDING_COLUMNS: [Column<FindingRow>; 4] = [
    FindingColumn::num("SEVERITY", 9, |r| r.severity.clone(), |r| num(severity_rank(&r.severity))).trouble(finding_trouble),
    FindingColumn::text("FINDING", 17, |r| r.finding.clone(), |r| text(&r.finding)),
    FindingColumn::text("ENDPOINT", 22, |r| r.endpoint.clone(), |r| text(&r.endpoint)),
    FindingColumn::text("SUMMARY", 80, |r| r.summary.clone(), |r| text(&r.summary)),
];

impl TableRow for FindingRow {
    fn columns() -> &'static [Column<Self>] {
        &FINDING_COLUMNS
    }
    fn matches(&self, needle: &str) -> bool {
        contains_ci(&self.finding, needle) || contains_ci(&self.endpoint, needle) || contains_ci(&self.summary, needle)
    }
    fn identity(&self) -> String {
        format!("{} {}", self.finding, self.endpoint)
    }
}
