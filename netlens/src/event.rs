//! Decoding kernel records into typed connection events.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub use crate::short_name::ShortName;
use netlens_common::{direction, kind, reason, side, tcp_state, RawClose, RawEvent, Transport, AF_INET, AF_INET6, NEVER};

/// A plain-old-data record of type T at the start of `bytes`, if they hold
/// one.
fn read_record<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    // SAFETY: T is plain old data (any bytes are a valid value) and the
    // slice holds at least one; read_unaligned copes with any alignment.
    (bytes.len() >= size_of::<T>()).then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Active,
    Passive,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Active => "active",
            Direction::Passive => "passive",
        }
    }
    pub fn decode(raw: u8) -> Option<Self> {
        match raw {
            direction::ACTIVE => Some(Direction::Active),
            direction::PASSIVE => Some(Direction::Passive),
            _ => None,
        }
    }
}

/// Why a connect() failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailReason {
    Reset,
    Timeout,
    Unreachable,
    Aborted,
    Error,
    /// No free local port (connect()'s EADDRNOTAVAIL).
    NoLocalPort,
}

impl FailReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::Reset => "reset",
            FailReason::Timeout => "timeout",
            FailReason::Unreachable => "unreachable",
            FailReason::Aborted => "aborted",
            FailReason::Error => "error",
            FailReason::NoLocalPort => "no_local_port",
        }
    }
    fn decode(raw: u8) -> Self {
        match raw {
            reason::RESET => FailReason::Reset,
            reason::TIMEOUT => FailReason::Timeout,
            reason::UNREACHABLE => FailReason::Unreachable,
            reason::ABORTED => FailReason::Aborted,
            reason::NO_LOCAL_PORT => FailReason::NoLocalPort,
            _ => FailReason::Error,
        }
    }
}

/// What happened, with the values that belong to it.
#[derive(Clone, Debug, PartialEq)]
pub enum Detail {
    Handshake { direction: Direction, handshake_ns: u64 },
    HandshakeFailed { reason: FailReason, after_ns: u64 },
    Retransmit {
        state: u8,
        segs: u32,
        /// The retransmitted skb: its sequence span (payload, +1 for SYN or
        /// FIN) and first sequence number; 0 when the kernel side could not
        /// read them.
        bytes: u32,
        seq: u32,
    },
    SynackRetransmit,
    ResetSent { state: u8 },
    ResetReceived,
    HolStall {
        stall_ns: u64,
        bytes_held: u32,
        ooo_segments: u32,
    },
    ZeroWindow {
        side: WindowSide,
        stall_ns: u64,
    },
    SlowStartExit {
        /// Time since the connection was established.
        after_ns: u64,
        cwnd: u32,
    },
    /// accept() returned this connection (pid/comm: the accepting process).
    Accepted {
        /// ESTABLISHED until accept() returned it.
        wait_ns: u64,
        /// The listener's queue right after, and its limit.
        queue_len: u32,
        backlog: u32,
    },
    /// A listener (`local`) dropped connections on a full accept queue;
    /// one event per listener per second while it does.
    ListenOverflow { dropped: u64, backlog: u32 },
    Close {
        direction: Option<Direction>,
        /// None when netlens did not see the connection open.
        lifetime_ns: Option<u64>,
        bytes_sent: u64,
        bytes_received: u64,
        retransmits: u32,
        spurious_retransmits: u32,
        transport: Dynamics,
    },
}

/// Which end advertised a zero window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WindowSide {
    /// The peer: our sender waits on a slow reader there.
    Peer,
    /// Us: our own application is not reading.
    Local,
}

impl WindowSide {
    pub fn as_str(self) -> &'static str {
        match self {
            WindowSide::Peer => "peer",
            WindowSide::Local => "local",
        }
    }
}

/// A connection's transport dynamics, as reported at close.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dynamics {
    pub congestion: Option<ShortName>,
    pub cwnd: u32,
    pub max_cwnd: u32,
    /// None: still in slow start at close.
    pub slow_start_exit_ns: Option<u64>,
    pub srtt_us: u32,
    pub min_rtt_us: u32,
    pub recovery_episodes: u32,
    pub recovery_ns: u64,
    pub loss_episodes: u32,
    pub loss_ns: u64,
    pub cwr_episodes: u32,
    pub hol_stalls: u32,
    pub hol_stall_ns: u64,
    pub ooo_segments: u32,
    pub zero_window_ns: u64,
    /// Segments sent, retransmissions included.
    pub segs_out: u32,
}

impl Dynamics {
    fn decode(raw: &netlens_common::Transport) -> Self {
        Self {
            congestion: ShortName::from_bytes(&raw.congestion),
            cwnd: raw.cwnd,
            max_cwnd: raw.max_cwnd,
            slow_start_exit_ns: (raw.slow_start_exit_ns != NEVER).then_some(raw.slow_start_exit_ns),
            srtt_us: raw.srtt_us,
            min_rtt_us: raw.min_rtt_us,
            recovery_episodes: raw.recovery_episodes,
            recovery_ns: raw.recovery_ns,
            loss_episodes: raw.loss_episodes,
            loss_ns: raw.loss_ns,
            cwr_episodes: raw.cwr_episodes,
            hol_stalls: raw.hol_stalls,
            hol_stall_ns: raw.hol_stall_ns,
            ooo_segments: raw.ooo_segments,
            zero_window_ns: raw.zero_window_ns,
            segs_out: raw.segs_out,
        }
    }
}

impl Detail {
    /// The `event` name used in every output.
    pub fn name(&self) -> &'static str {
        match self {
            Detail::Handshake { .. } => "handshake",
            Detail::HandshakeFailed { .. } => "handshake_failed",
            Detail::Retransmit { .. } => "retransmit",
            Detail::SynackRetransmit => "synack_retransmit",
            Detail::ResetSent { .. } => "reset_sent",
            Detail::ResetReceived => "reset_received",
            Detail::HolStall { .. } => "hol_stall",
            Detail::ZeroWindow { .. } => "zero_window",
            Detail::SlowStartExit { .. } => "slow_start_exit",
            Detail::Accepted { .. } => "accepted",
            Detail::ListenOverflow { .. } => "listen_overflow",
            Detail::Close { .. } => "close",
        }
    }
}

/// One connection event, decoded.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnEvent {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// The local end.
    pub local: SocketAddr,
    /// The remote end.
    pub remote: SocketAddr,
    /// The process that opened the connection (active opens only).
    pub pid: Option<u32>,
    pub comm: Option<ShortName>,
    pub netns: u32,
    /// The cgroup id (its cgroup v2 directory's inode); 0 when unknown.
    pub cgroup: u64,
    /// The cgroup's path and unit or container, once resolved (see
    /// `service`); `None` until then or when the cgroup is gone.
    pub service: Option<std::sync::Arc<crate::service::Service>>,
    /// Who opened the connection, when netlens saw it open.
    pub direction: Option<Direction>,
    pub detail: Detail,
}

impl ConnEvent {
    /// 4 or 6.
    pub fn family(&self) -> u8 {
        if self.local.is_ipv4() { 4 } else { 6 }
    }

    /// Decodes one ring-buffer record: a `RawEvent`, or for a close a
    /// `RawClose`; `None` for one too short for its kind.
    pub fn from_record(record: &[u8]) -> Option<Self> {
        let raw: RawEvent = read_record(record)?;
        let transport = match raw.kind {
            kind::CLOSE => Some(read_record::<RawClose>(record)?.transport),
            _ => None,
        };
        Self::decode(&raw, transport.as_ref())
    }

    /// Decodes an event, with a close's dynamics; `None` for a record of
    /// unknown kind or family (a newer kernel side than this userspace), or
    /// a close without its dynamics.
    pub fn decode(raw: &RawEvent, transport: Option<&Transport>) -> Option<Self> {
        let (local_ip, remote_ip) = addresses(raw.family, &raw.saddr, &raw.daddr)?;
        let detail = match raw.kind {
            kind::HANDSHAKE => Detail::Handshake {
                direction: Direction::decode(raw.direction)?,
                handshake_ns: raw.duration_ns,
            },
            kind::HANDSHAKE_FAILED => Detail::HandshakeFailed {
                reason: FailReason::decode(raw.reason),
                after_ns: raw.duration_ns,
            },
            kind::RETRANSMIT => Detail::Retransmit {
                state: raw.state,
                segs: raw.segs,
                bytes: raw.bytes_sent as u32,
                seq: raw.bytes_received as u32,
            },
            kind::SYNACK_RETRANSMIT => Detail::SynackRetransmit,
            kind::RESET_SENT => Detail::ResetSent { state: raw.state },
            kind::RESET_RECEIVED => Detail::ResetReceived,
            kind::CLOSE => Detail::Close {
                direction: Direction::decode(raw.direction),
                lifetime_ns: (raw.duration_ns != 0).then_some(raw.duration_ns),
                bytes_sent: raw.bytes_sent,
                bytes_received: raw.bytes_received,
                retransmits: raw.segs,
                spurious_retransmits: raw.spurious_retransmits,
                transport: Dynamics::decode(transport?),
            },
            kind::HOL_STALL => Detail::HolStall {
                stall_ns: raw.duration_ns,
                bytes_held: raw.bytes_received as u32,
                ooo_segments: raw.segs,
            },
            kind::ZERO_WINDOW => Detail::ZeroWindow {
                side: match raw.reason {
                    side::PEER => WindowSide::Peer,
                    side::LOCAL => WindowSide::Local,
                    _ => return None,
                },
                stall_ns: raw.duration_ns,
            },
            kind::SLOW_START_EXIT => Detail::SlowStartExit { after_ns: raw.duration_ns, cwnd: raw.segs },
            kind::ACCEPTED => Detail::Accepted { wait_ns: raw.duration_ns, queue_len: raw.queue_len, backlog: raw.backlog },
            _ => return None,
        };
        Some(Self {
            ts_ns: raw.ts_ns,
            local: SocketAddr::new(local_ip, raw.sport),
            remote: SocketAddr::new(remote_ip, raw.dport),
            pid: (raw.pid != 0).then_some(raw.pid),
            comm: ShortName::from_bytes(&raw.comm),
            netns: raw.netns,
            cgroup: raw.cgroup,
            service: None,
            direction: Direction::decode(raw.direction),
            detail,
        })
    }
}

impl ConnEvent {
    /// The `listen_overflow` event of a listener whose count grew by
    /// `dropped` since the last one, the latest at `last_ns` with `backlog`.
    pub fn listen_overflow(
        endpoint: &netlens_common::ListenerEndpoint,
        last_ns: u64,
        backlog: u32,
        dropped: u64,
    ) -> Option<Self> {
        let (local_ip, _) = addresses(endpoint.family, &endpoint.addr, &[0; 16])?;
        let any = if local_ip.is_ipv4() { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { IpAddr::V6(Ipv6Addr::UNSPECIFIED) };
        Some(Self {
            ts_ns: last_ns,
            local: SocketAddr::new(local_ip, endpoint.port),
            remote: SocketAddr::new(any, 0),
            pid: None,
            comm: None,
            netns: endpoint.netns,
            cgroup: 0,
            service: None,
            direction: Some(Direction::Passive),
            detail: Detail::ListenOverflow { dropped, backlog },
        })
    }
}

/// The local and remote addresses of a kernel record; `None` for a family
/// other than IPv4/IPv6 (or endpoints not known yet).
pub fn addresses(family: u16, local: &[u8; 16], remote: &[u8; 16]) -> Option<(IpAddr, IpAddr)> {
    match family {
        AF_INET => Some((ipv4(local), ipv4(remote))),
        AF_INET6 => Some((ipv6(local), ipv6(remote))),
        _ => None,
    }
}

fn ipv4(bytes: &[u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
}

fn ipv6(bytes: &[u8; 16]) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(*bytes))
}

/// The kernel's name for a TCP state.
pub fn state_name(state: u8) -> &'static str {
    tcp_state::name(state)
}

/// An IPv6 loopback event with no process, for view tests.
#[cfg(test)]
pub fn sample(detail: Detail) -> ConnEvent {
    ConnEvent {
        ts_ns: 5,
        local: "[::1]:8080".parse().unwrap(),
        remote: "[::1]:40000".parse().unwrap(),
        pid: None,
        comm: None,
        netns: 7,
        cgroup: 9,
        service: None,
        direction: None,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(kind: u8) -> RawEvent {
        let mut raw = RawEvent { kind, family: AF_INET, sport: 8080, dport: 40000, ..Default::default() };
        raw.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        raw.daddr[..4].copy_from_slice(&[127, 0, 0, 2]);
        raw
    }

    #[test]
    fn decodes_a_passive_handshake_without_process() {
        let mut record = raw(kind::HANDSHAKE);
        record.direction = direction::PASSIVE;
        record.duration_ns = 1_500_000;
        let event = ConnEvent::decode(&record, None).unwrap();
        assert_eq!(event.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(event.remote, "127.0.0.2:40000".parse().unwrap());
        assert_eq!(event.pid, None);
        assert_eq!(event.comm, None);
        assert_eq!(event.family(), 4);
        assert_eq!(event.detail, Detail::Handshake { direction: Direction::Passive, handshake_ns: 1_500_000 });
    }

    #[test]
    fn decodes_ipv6_and_comm() {
        let mut record = raw(kind::RETRANSMIT);
        record.family = AF_INET6;
        record.saddr = Ipv6Addr::LOCALHOST.octets();
        record.daddr = Ipv6Addr::LOCALHOST.octets();
        record.comm[..4].copy_from_slice(b"curl");
        record.pid = 42;
        record.state = tcp_state::SYN_SENT;
        record.segs = 1;
        let event = ConnEvent::decode(&record, None).unwrap();
        assert_eq!(event.family(), 6);
        assert_eq!(event.comm.as_deref(), Some("curl"));
        assert_eq!(event.pid, Some(42));
        assert_eq!(event.detail, Detail::Retransmit { state: tcp_state::SYN_SENT, segs: 1, bytes: 0, seq: 0 });
    }

    #[test]
    fn decodes_accepted_and_builds_listen_overflows() {
        let mut record = raw(kind::ACCEPTED);
        record.duration_ns = 300_000_000;
        record.queue_len = 1;
        record.backlog = 128;
        let event = ConnEvent::decode(&record, None).unwrap();
        assert_eq!(event.detail, Detail::Accepted { wait_ns: 300_000_000, queue_len: 1, backlog: 128 });
        let mut endpoint = netlens_common::ListenerEndpoint { family: AF_INET, port: 8080, ..Default::default() };
        endpoint.addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let overflow = ConnEvent::listen_overflow(&endpoint, 7, 2, 5).unwrap();
        assert_eq!(overflow.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(overflow.remote, "0.0.0.0:0".parse().unwrap());
        assert_eq!(overflow.detail, Detail::ListenOverflow { dropped: 5, backlog: 2 });
        assert_eq!(overflow.detail.name(), "listen_overflow");
    }

    #[test]
    fn close_without_open_has_no_lifetime_and_unknown_kind_is_dropped() {
        let event = ConnEvent::decode(&raw(kind::CLOSE), Some(&Transport::default())).unwrap();
        assert!(matches!(event.detail, Detail::Close { lifetime_ns: None, direction: None, .. }));
        assert!(ConnEvent::decode(&raw(200), None).is_none());
        let mut bad_family = raw(kind::CLOSE);
        bad_family.family = 99;
        assert!(ConnEvent::decode(&bad_family, Some(&Transport::default())).is_none());
    }

    /// Records as the ring buffer holds them: a close is a RawClose, the
    /// rest a RawEvent alone; a close cut short is not decoded.
    #[test]
    fn records_carry_dynamics_only_for_closes() {
        let mut handshake = raw(kind::HANDSHAKE);
        handshake.direction = direction::ACTIVE;
        let bytes = unsafe { std::slice::from_raw_parts((&handshake as *const RawEvent).cast::<u8>(), size_of::<RawEvent>()) };
        assert!(matches!(ConnEvent::from_record(bytes).map(|e| e.detail), Some(Detail::Handshake { .. })));
        let mut close = RawClose { event: raw(kind::CLOSE), ..Default::default() };
        close.transport.segs_out = 42;
        let bytes = unsafe { std::slice::from_raw_parts((&close as *const RawClose).cast::<u8>(), size_of::<RawClose>()) };
        let Some(Detail::Close { transport, .. }) = ConnEvent::from_record(bytes).map(|e| e.detail) else { panic!("no close") };
        assert_eq!(transport.segs_out, 42);
        assert!(ConnEvent::from_record(&bytes[..size_of::<RawEvent>()]).is_none());
    }
}
