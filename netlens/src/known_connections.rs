//! Connections seen established, by namespace and endpoints, for the
//! events the kernel side could not tie to their connection's state.
//!
//! Where flows live in socket storage (loader/flow_home.rs), only tracing
//! programs reach a connection's flow. The others report what they see
//! without it: accept() (the syscall tracepoints on kernels without
//! fentry) names the connection by its 4-tuple and the accepting process,
//! but cannot time the wait or make that process the connection's; the
//! resets' record tracepoints carry no process. This joins them here: the
//! accept wait is the time from the passive handshake's event to accept()'s,
//! and from accept() on, the connection's events carry the accepting
//! process, as the kernel side does with its flow table. Bounded: a table
//! at [`MAX_CONNECTIONS`] takes no more, and counts what it refused.

use std::net::{IpAddr, SocketAddr};

// Looked up per event: foldhash, not std's SipHash.
use foldhash::HashMap;

use crate::{
    event::{ConnEvent, Detail, Direction, ShortName},
    loader::LiveFlow,
};

/// As many as the kernel's flow table holds by default.
pub const MAX_CONNECTIONS: usize = netlens_common::FLOW_TABLE_ENTRIES as usize;

/// A connection's namespace and endpoints, packed: SocketAddr's derived
/// Hash feeds the hasher field by field (its variant, each octet run,
/// port, flow info), 6 % of `top`'s time under churn as the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    local_ip: u128,
    remote_ip: u128,
    /// Namespace, local port, remote port.
    netns_ports: u64,
    /// IPv4 addresses are kept mapped into IPv6's.
    v4: bool,
}

impl Key {
    fn of(netns: u32, local: SocketAddr, remote: SocketAddr) -> Self {
        let ip = |addr: SocketAddr| match addr.ip() {
            IpAddr::V4(ip) => u128::from(ip.to_ipv6_mapped()),
            IpAddr::V6(ip) => u128::from(ip),
        };
        let netns_ports = u64::from(netns) << 32 | u64::from(local.port()) << 16 | u64::from(remote.port());
        Self { local_ip: ip(local), remote_ip: ip(remote), netns_ports, v4: local.is_ipv4() }
    }

    fn endpoints(&self) -> (u32, SocketAddr, SocketAddr) {
        let addr = |ip: u128, port: u64| {
            let ip = std::net::Ipv6Addr::from(ip);
            let ip = match ip.to_ipv4_mapped() {
                Some(v4) if self.v4 => IpAddr::V4(v4),
                _ => IpAddr::V6(ip),
            };
            SocketAddr::new(ip, port as u16)
        };
        ((self.netns_ports >> 32) as u32, addr(self.local_ip, self.netns_ports >> 16 & 0xffff), addr(self.remote_ip, self.netns_ports & 0xffff))
    }
}

#[derive(Clone, Copy, Debug)]
struct Known {
    direction: Direction,
    /// The opener, the listener's process, or once accepted, the
    /// accepting one.
    pid: Option<u32>,
    comm: Option<ShortName>,
    cgroup: u64,
    handshake_ns: u64,
    established_ns: u64,
    accepted: bool,
}

#[derive(Default)]
pub struct KnownConnections {
    by_endpoints: HashMap<Key, Known>,
    /// Connections not kept because the table was full.
    pub refused: u64,
}

impl KnownConnections {
    /// Joins `event` to its connection, in place (an event is 280 bytes,
    /// and this runs for each one); `false` for an event to drop: an
    /// accept() of a connection established before netlens attached (its
    /// wait is unknown; the flow table's programs skip those too).
    pub fn join(&mut self, event: &mut ConnEvent) -> bool {
        let key = Key::of(event.netns, event.local, event.remote);
        match &mut event.detail {
            Detail::Handshake { direction, handshake_ns } => {
                let known = Known {
                    direction: *direction,
                    pid: event.pid,
                    comm: event.comm.clone(),
                    cgroup: event.cgroup,
                    handshake_ns: *handshake_ns,
                    established_ns: event.ts_ns,
                    accepted: false,
                };
                if self.by_endpoints.len() < MAX_CONNECTIONS || self.by_endpoints.contains_key(&key) {
                    self.by_endpoints.insert(key, known);
                } else {
                    self.refused += 1;
                }
                return true;
            }
            Detail::Accepted { wait_ns, .. } if *wait_ns == netlens_common::ACCEPT_WAIT_UNKNOWN => {
                let Some(known) = self.by_endpoints.get_mut(&key) else { return false };
                *wait_ns = event.ts_ns.saturating_sub(known.established_ns);
                known.pid = event.pid;
                known.comm = event.comm.clone();
                known.accepted = true;
                event.cgroup = known.cgroup;
                return true;
            }
            _ => {}
        }
        let closed = matches!(event.detail, Detail::Close { .. });
        let known = if closed { self.by_endpoints.remove(&key) } else { self.by_endpoints.get(&key).copied() };
        if let Some(known) = known {
            if known.accepted || event.pid.is_none() {
                event.pid = known.pid;
                event.comm = known.comm;
            }
            event.direction = event.direction.or(Some(known.direction));
            if event.cgroup == 0 {
                event.cgroup = known.cgroup;
            }
        }
        true
    }

    /// Up to `limit` connections that `wanted` keeps, for views that list
    /// live ones (`top`).
    pub fn live(&self, limit: usize, wanted: &dyn Fn(&LiveFlow) -> bool) -> Vec<LiveFlow> {
        self.by_endpoints
            .iter()
            .map(|(key, known)| (key.endpoints(), known))
            .map(|((netns, local, remote), known)| LiveFlow {
                local,
                remote,
                pid: known.pid,
                comm: known.comm.as_ref().map(|comm| comm.to_string()),
                netns,
                direction: Some(known.direction),
                start_ns: known.established_ns.saturating_sub(known.handshake_ns),
                established_ns: known.established_ns,
                srtt_us: 0,
                cwnd: 0,
                retransmits: 0,
                hol_stall_ns: 0,
            })
            .filter(wanted)
            .take(limit)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.by_endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_endpoints.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use netlens_common::{direction, kind, RawEvent, Transport, ACCEPT_WAIT_UNKNOWN, AF_INET};

    use super::*;

    /// A record of `kind` on 127.0.0.1:80 ← 127.0.0.1:5000 in namespace 7,
    /// as the kernel side writes it.
    fn event(kind: u8, ts_ns: u64, pid: u32, comm: &[u8]) -> ConnEvent {
        let mut raw = RawEvent { kind, ts_ns, family: AF_INET, sport: 80, dport: 5000, netns: 7, pid, ..Default::default() };
        raw.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        raw.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        raw.comm[..comm.len()].copy_from_slice(comm);
        if kind == kind::HANDSHAKE {
            raw.direction = direction::PASSIVE;
            raw.duration_ns = 40_000;
            raw.cgroup = 9;
        }
        if kind == kind::ACCEPTED {
            raw.duration_ns = ACCEPT_WAIT_UNKNOWN;
        }
        ConnEvent::decode(&raw, (kind == kind::CLOSE).then_some(&Transport::default())).unwrap()
    }

    /// `join` for a test: the joined event, `None` where it is dropped.
    fn joined(known: &mut KnownConnections, mut event: ConnEvent) -> Option<ConnEvent> {
        known.join(&mut event).then_some(event)
    }

    #[test]
    fn keys_give_back_their_endpoints() {
        let v4 = ("127.0.0.1:80".parse().unwrap(), "10.0.0.2:5000".parse().unwrap());
        let v6 = ("[::1]:443".parse().unwrap(), "[::ffff:10.0.0.2]:5001".parse().unwrap());
        for (local, remote) in [v4, v6] {
            assert_eq!(Key::of(7, local, remote).endpoints(), (7, local, remote));
        }
        assert_ne!(Key::of(7, v4.0, v4.1), Key::of(8, v4.0, v4.1));
    }

    #[test]
    fn accept_is_timed_from_the_handshake_and_names_the_connections_process() {
        let mut known = KnownConnections::default();
        let handshake = joined(&mut known, event(kind::HANDSHAKE, 1_000, 10, b"listener")).unwrap();
        assert_eq!(handshake.pid, Some(10));
        let accepted = joined(&mut known, event(kind::ACCEPTED, 251_000, 20, b"worker")).unwrap();
        assert!(matches!(accepted.detail, Detail::Accepted { wait_ns: 250_000, .. }), "{:?}", accepted.detail);
        assert_eq!(accepted.cgroup, 9);
        // Later events carry the accepting process, also where the kernel
        // side named the listener's.
        let retransmit = joined(&mut known, event(kind::RETRANSMIT, 300_000, 10, b"listener")).unwrap();
        assert_eq!((retransmit.pid, retransmit.comm.as_deref()), (Some(20), Some("worker")));
        let close = joined(&mut known, event(kind::CLOSE, 400_000, 10, b"listener")).unwrap();
        assert_eq!((close.pid, close.direction), (Some(20), Some(Direction::Passive)));
        assert!(known.is_empty(), "a close forgets its connection");
    }

    #[test]
    fn events_without_a_process_get_the_connections() {
        let mut known = KnownConnections::default();
        joined(&mut known, event(kind::HANDSHAKE, 1_000, 10, b"server"));
        let reset = joined(&mut known, event(kind::RESET_SENT, 2_000, 0, b"")).unwrap();
        assert_eq!((reset.pid, reset.comm.as_deref(), reset.direction, reset.cgroup), (Some(10), Some("server"), Some(Direction::Passive), 9));
    }

    /// As the flow table's programs do: a connection established before
    /// netlens attached has no wait to report.
    #[test]
    fn an_accept_of_an_unseen_handshake_is_dropped() {
        let mut known = KnownConnections::default();
        assert!(joined(&mut known, event(kind::ACCEPTED, 5_000, 20, b"worker")).is_none());
        let reset = joined(&mut known, event(kind::RESET_SENT, 6_000, 0, b"")).unwrap();
        assert_eq!(reset.pid, None);
    }

    #[test]
    fn a_full_table_refuses_and_counts() {
        let mut known = KnownConnections::default();
        // MAX_CONNECTIONS is one per remote port.
        assert_eq!(MAX_CONNECTIONS, usize::from(u16::MAX) + 1);
        for port in 0..=u16::MAX {
            let mut handshake = event(kind::HANDSHAKE, 1, 1, b"x");
            handshake.remote.set_port(port);
            joined(&mut known, handshake);
        }
        assert_eq!((known.len(), known.refused), (MAX_CONNECTIONS, 0));
        let mut one_more = event(kind::HANDSHAKE, 1, 1, b"x");
        one_more.local.set_port(81);
        joined(&mut known, one_more);
        assert_eq!((known.len(), known.refused), (MAX_CONNECTIONS, 1));
        assert_eq!(known.live(10, &|_| true).len(), 10);
    }
}
