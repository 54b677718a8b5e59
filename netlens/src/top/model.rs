//! What `top` shows: plain values the aggregator fills in once per refresh.
//! The TUI and batch output render these; they never see events or maps.

use std::net::SocketAddr;

use serde::Serialize;

/// p50 and p99 of a distribution, in microseconds; `None` without samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Quantiles {
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
}

/// One bar of a distribution drawn in the detail pane: samples at or below
/// `le_us` (and above the previous bar's bound).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Bar {
    pub le_us: u64,
    pub count: u64,
}

/// The host-wide line at the top of the screen, rates over the last refresh.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Header {
    pub opened_per_s: f64,
    pub closed_per_s: f64,
    pub handshake_active: Quantiles,
    pub handshake_passive: Quantiles,
    pub retransmits_per_s: f64,
    pub hol_stalls_per_s: f64,
    pub hol_stall_p99_us: Option<f64>,
    pub zero_window_stalls_per_s: f64,
    /// From the socket census; `None` when it could not be taken.
    pub time_wait: Option<u64>,
    /// Ring-buffer drops plus kernel-skipped runs since start.
    pub events_lost: u64,
    /// Failures inside netlens's eBPF programs since start (shown when
    /// non-zero: some figures then miss what those runs saw).
    pub bpf_errors: u64,
    /// TCP packets the kernel dropped per second, host-wide (`None` where
    /// the kernel gives no drop reasons), and the reasons that dropped
    /// most, most first (at most [`TOP_DROP_REASONS`]).
    pub drops_per_s: Option<f64>,
    pub top_drop_reasons: Vec<DropRate>,
}

/// How many drop reasons the header names.
pub const TOP_DROP_REASONS: usize = 2;

/// One `enum skb_drop_reason` (lower case, no prefix) and its rate.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DropRate {
    pub reason: String,
    pub per_s: f64,
}

/// Remote endpoints (clients' view) or local listening ports (servers').
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointKind {
    Remote,
    Listener,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EndpointRow {
    /// `10.0.0.7:443` for a remote endpoint, `*:8080` for a listener.
    pub endpoint: String,
    pub kind: EndpointKind,
    /// Connections opened since netlens started.
    pub connections: u64,
    pub conn_per_s: f64,
    /// Share of closed connections that lived under 1 s, 0–100.
    pub short_lived_pct: f64,
    pub handshake: Quantiles,
    pub retransmits_per_s: f64,
    /// `None` until segment counts are known (first close).
    pub retransmits_per_1k_segs: Option<f64>,
    pub hol_stall_p99_us: Option<f64>,
    pub hol_stall_total_us: u64,
    pub zero_window_total_us: u64,
    /// Listeners: p99 of the accept-queue wait, and connections dropped on
    /// a full accept queue since netlens started.
    pub accept_wait_p99_us: Option<f64>,
    pub listen_overflows: u64,
    /// For the detail pane.
    pub handshake_bars: Vec<Bar>,
    pub hol_stall_bars: Vec<Bar>,
}

/// One TCP connection: every one the kernel lists in the watched
/// namespaces (sock_diag), with what netlens saw of it merged in.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConnectionRow {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Network namespace inode.
    pub netns: u32,
    /// The opener, the accepting process, the listener's process until
    /// accept(), or for a connection older than netlens the process
    /// holding its socket (`/proc/PID/fd`, as `ss -p`).
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// `None` for a connection opened before netlens attached.
    pub age_us: Option<u64>,
    /// `ESTAB`, `SYN-SENT`, `FIN-WAIT-2`, `CLOSE-WAIT`, … as `ss` spells them.
    pub state: String,
    /// From `tcp_info`, else the flow table; `None` when neither has them
    /// (a FIN-WAIT-2 socket its process closed keeps no `tcp_info`).
    pub srtt_us: Option<u32>,
    pub cwnd: Option<u32>,
    /// Retransmitted segments over the connection's life.
    pub retransmits: Option<u32>,
    /// Head-of-line stall time netlens saw; `None` for a connection older
    /// than netlens.
    pub hol_stall_us: Option<u64>,
    /// Payload bytes, from the kernel's `tcp_info`; `None` until the next
    /// listing for a connection opened since the last one.
    pub bytes_sent: Option<u64>,
    pub bytes_received: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProcessRow {
    pub pid: u32,
    pub comm: String,
    /// The systemd unit or container id, else the cgroup path; `None`
    /// while unknown.
    pub service: Option<String>,
    pub connections: u64,
    pub conn_per_s: f64,
    pub handshake: Quantiles,
    pub retransmits_per_s: f64,
    pub hol_stall_total_us: u64,
}

/// One of the doctor's findings holding now (`netlens doctor`'s rules over
/// 60 s windows).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FindingRow {
    /// `critical`, `warning` or `info`.
    pub severity: String,
    pub finding: String,
    pub endpoint: String,
    pub summary: String,
    /// `name=value` pairs, units in the names.
    pub evidence: String,
    pub advice: String,
}

/// Everything one frame shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Snapshot {
    pub header: Header,
    /// Most severe first.
    pub findings: Vec<FindingRow>,
    pub endpoints: Vec<EndpointRow>,
    pub connections: Vec<ConnectionRow>,
    /// Connections the kernel holds in all: more than `connections.len()`
    /// when the list was capped.
    pub connections_total: u64,
    pub processes: Vec<ProcessRow>,
}
