//! Every TCP connection the kernel holds in the namespaces netlens
//! watches, as `ss -ti` lists them: one sock_diag dump per namespace and
//! family with INET_DIAG_INFO (`tcp_info`), so a connection opened long
//! before netlens shows with its state and byte counts.
//!
//! States as `ss` lists by default (`ss -t`): not listeners, not TIME-WAIT
//! (the header counts those), not request sockets (SYN-RECV), not CLOSE.
//! The kernel filters by state, so a pile of TIME-WAIT sockets costs the
//! dump nothing.

use std::net::SocketAddr;

use anyhow::Result;
use netlens_common::tcp_state;
use netlink_packet_core::{NlaBuffer, NlasIterator};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, INET_DIAG_INFO},
    inet::{
        nlas::{TcpInfo, TcpInfoBuffer},
        ExtensionFlags, StateFlags,
    },
};

use super::{
    netns::Namespace,
    sockdiag::{DumpRequest, SockDiag},
};

/// `tcp_info` up to `tcpi_bytes_retrans` (Linux 4.19): older kernels send
/// a shorter one, without the sent-bytes counters.
const TCP_INFO_WITH_BYTES_SENT: usize = 216;

/// One connection as the kernel lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelConnection {
    pub netns: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Kernel TCP state value (`tcp_state`).
    pub state: u8,
    /// The socket's inode: `/proc/PID/fd` names the process holding it.
    pub inode: u32,
    /// From `tcp_info`; None when the kernel sent none.
    pub tcp: Option<TcpFigures>,
}

/// What `tcp_info` says of a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpFigures {
    pub srtt_us: u32,
    pub cwnd: u32,
    /// Retransmitted segments over the connection's life.
    pub total_retrans: u32,
    /// Payload bytes sent, each once (`bytes_sent - bytes_retrans`); None
    /// before Linux 4.19.
    pub bytes_sent: Option<u64>,
    /// Payload bytes received in order (`bytes_received`, less the peer's
    /// FIN once it arrived: the kernel counts its sequence number).
    pub bytes_received: u64,
}

/// Connections of the watched namespaces, at most `cap` of them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConnectionList {
    pub connections: Vec<KernelConnection>,
    /// How many the kernel listed: more than `connections.len()` when capped.
    pub total: u64,
}

/// How `ss` spells a TCP state (`ESTAB`, `FIN-WAIT-1`, …).
pub fn ss_state_name(state: u8) -> &'static str {
    match state {
        tcp_state::ESTABLISHED => "ESTAB",
        tcp_state::SYN_SENT => "SYN-SENT",
        tcp_state::SYN_RECV | tcp_state::NEW_SYN_RECV => "SYN-RECV",
        tcp_state::FIN_WAIT1 => "FIN-WAIT-1",
        tcp_state::FIN_WAIT2 => "FIN-WAIT-2",
        tcp_state::TIME_WAIT => "TIME-WAIT",
        tcp_state::CLOSE => "CLOSE",
        tcp_state::CLOSE_WAIT => "CLOSE-WAIT",
        tcp_state::LAST_ACK => "LAST-ACK",
        tcp_state::LISTEN => "LISTEN",
        tcp_state::CLOSING => "CLOSING",
        _ => "UNKNOWN",
    }
}

/// States in which the peer's FIN has arrived (and is counted in
/// `bytes_received`).
fn fin_received(state: u8) -> bool {
    matches!(state, tcp_state::CLOSE_WAIT | tcp_state::LAST_ACK | tcp_state::CLOSING | tcp_state::TIME_WAIT)
}

/// The states `ss -t` lists by default.
fn listed_states() -> StateFlags {
    StateFlags::ESTABLISHED
        | StateFlags::SYN_SENT
        | StateFlags::FIN_WAIT1
        | StateFlags::FIN_WAIT2
        | StateFlags::CLOSE_WAIT
        | StateFlags::LAST_ACK
        | StateFlags::CLOSING
}

/// Lists the connections of `namespaces` that `keep` (namespace inode,
/// socket inode, local end, remote end) keeps, the first `cap` of them;
/// `total` counts every one kept. A namespace that cannot be dumped (gone
/// since it was found) is skipped; fails only when none could be.
pub fn list(namespaces: &[Namespace], cap: usize, keep: &dyn Fn(u32, u32, &SocketAddr, &SocketAddr) -> bool) -> Result<ConnectionList> {
    let mut list = ConnectionList::default();
    let mut first_error = None;
    let mut dumped = 0;
    for namespace in namespaces {
        match dump_namespace(namespace, cap, keep, &mut list) {
            Ok(()) => dumped += 1,
            Err(err) => {
                first_error.get_or_insert(err);
            }
        }
    }
    match first_error {
        Some(err) if dumped == 0 => Err(err),
        _ => Ok(list),
    }
}

fn dump_namespace(
    namespace: &Namespace,
    cap: usize,
    keep: &dyn Fn(u32, u32, &SocketAddr, &SocketAddr) -> bool,
    list: &mut ConnectionList,
) -> Result<()> {
    let mut sock_diag = namespace.enter(SockDiag::open)??;
    for (sequence, family) in [(1, AF_INET), (2, AF_INET6)] {
        let request = DumpRequest { family, states: listed_states(), extensions: ExtensionFlags::INFO };
        sock_diag.dump_tcp(&request, sequence, |socket, attributes| {
            let id = &socket.socket_id;
            let local = SocketAddr::new(id.source_address, id.source_port);
            let remote = SocketAddr::new(id.destination_address, id.destination_port);
            if !keep(namespace.inode, socket.inode, &local, &remote) {
                return;
            }
            list.total += 1;
            if list.connections.len() >= cap {
                return;
            }
            list.connections.push(KernelConnection {
                netns: namespace.inode,
                local,
                remote,
                state: socket.state,
                inode: socket.inode,
                tcp: tcp_info(attributes).map(|(info, len)| figures(&info, len, socket.state)),
            });
        })?;
    }
    Ok(())
}

/// The INET_DIAG_INFO attribute, parsed, and its length as the kernel sent
/// it. A shorter one (older kernel) is zero-filled to the crate's layout;
/// the length tells which fields are real.
fn tcp_info(attributes: &[u8]) -> Option<(TcpInfo, usize)> {
    let attribute = NlasIterator::new(attributes)
        .filter_map(Result::ok)
        .find(|attribute: &NlaBuffer<&[u8]>| attribute.kind() == INET_DIAG_INFO)?;
    let value = attribute.value();
    let mut padded = vec![0u8; size_of::<TcpInfoBuffer>().max(value.len())];
    padded[..value.len()].copy_from_slice(value);
    Some((TcpInfo::parse(&padded).ok()?, value.len()))
}

fn figures(info: &TcpInfo, len: usize, state: u8) -> TcpFigures {
    TcpFigures {
        srtt_us: info.rtt,
        cwnd: info.snd_cwnd,
        total_retrans: info.total_retrans,
        bytes_sent: (len >= TCP_INFO_WITH_BYTES_SENT).then(|| info.bytes_sent.saturating_sub(info.bytes_retrans)),
        bytes_received: info.bytes_received.saturating_sub(u64::from(fin_received(state))),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{TcpListener, TcpStream},
        os::unix::fs::MetadataExt,
        time::Instant,
    };

    use super::*;
    use crate::census::netns;

    /// `pairs` connected pairs on loopback, both ends kept open.
    fn connected_pairs(pairs: usize) -> (SocketAddr, Vec<(TcpStream, TcpStream)>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let pairs = (0..pairs).map(|_| (TcpStream::connect(address).unwrap(), listener.accept().unwrap().0)).collect();
        (address, pairs)
    }

    fn own_namespace() -> Vec<Namespace> {
        let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino() as u32;
        netns::watched(Some(own)).unwrap()
    }

    #[test]
    fn kernel_list_is_capped_but_counts_every_connection() {
        let (address, pairs) = connected_pairs(30);
        let full = list(&own_namespace(), usize::MAX, &|_, _, _, _| true).unwrap();
        let ours = full.connections.iter().filter(|c| c.local == address || c.remote == address).count();
        assert_eq!(ours, 60, "both ends of 30 connections");
        assert!(full.connections.iter().all(|c| c.tcp.is_some() || c.state == tcp_state::FIN_WAIT2));
        let capped = list(&own_namespace(), 10, &|_, _, _, _| true).unwrap();
        assert_eq!(capped.connections.len(), 10);
        assert!(capped.total >= 60, "the total counts past the cap: {}", capped.total);
        // Kept before the cap, counted only if kept.
        let port = address.port();
        let kept = list(&own_namespace(), 10, &|_, _, local, remote| local.port() == port || remote.port() == port).unwrap();
        assert_eq!(kept.total, 60);
        assert!(kept.connections.iter().all(|c| c.local == address || c.remote == address));
        drop(pairs);
    }

    /// Scale check, not run by default: `cargo test ... connections --
    /// --ignored --nocapture`.
    #[test]
    #[ignore]
    fn kernel_list_of_4000_sockets() {
        let (_, pairs) = connected_pairs(2_000);
        let namespaces = own_namespace();
        let mut durations: Vec<_> = (0..20)
            .map(|_| {
                let started = Instant::now();
                let listed = list(&namespaces, 2_000, &|_, _, _, _| true).unwrap();
                assert!(listed.total >= 4_000);
                started.elapsed()
            })
            .collect();
        durations.sort();
        eprintln!("list() of 4000 sockets, capped at 2000: min {:?}, median {:?}, max {:?}", durations[0], durations[10], durations[19]);
        drop(pairs);
    }

    #[test]
    fn states_are_spelled_as_ss_does() {
        let names: Vec<_> = (1..=12).map(ss_state_name).collect();
        assert_eq!(
            names,
            [
                "ESTAB", "SYN-SENT", "SYN-RECV", "FIN-WAIT-1", "FIN-WAIT-2", "TIME-WAIT", "CLOSE", "CLOSE-WAIT",
                "LAST-ACK", "LISTEN", "CLOSING", "SYN-RECV"
            ]
        );
        assert_eq!(ss_state_name(0), "UNKNOWN");
        assert_eq!(ss_state_name(13), "UNKNOWN");
    }

    #[test]
    fn listed_states_are_ss_defaults() {
        let listed: Vec<_> = (1..=12u8).filter(|s| listed_states().bits() & (1 << s) != 0).map(ss_state_name).collect();
        assert_eq!(listed, ["ESTAB", "SYN-SENT", "FIN-WAIT-1", "FIN-WAIT-2", "CLOSE-WAIT", "LAST-ACK", "CLOSING"]);
    }

    /// A tcp_info attribute of `len` bytes with the byte counters set.
    fn attribute(len: usize) -> Vec<u8> {
        let mut value = vec![0u8; len];
        let mut put = |offset: usize, bytes: &[u8]| {
            if offset + bytes.len() <= len {
                value[offset..offset + bytes.len()].copy_from_slice(bytes);
            }
        };
        put(68, &250u32.to_ne_bytes()); // rtt
        put(80, &10u32.to_ne_bytes()); // snd_cwnd
        put(100, &3u32.to_ne_bytes()); // total_retrans
        put(128, &5001u64.to_ne_bytes()); // bytes_received
        put(200, &7000u64.to_ne_bytes()); // bytes_sent
        put(208, &1000u64.to_ne_bytes()); // bytes_retrans
        let mut nla = Vec::new();
        nla.extend_from_slice(&((4 + len) as u16).to_ne_bytes());
        nla.extend_from_slice(&INET_DIAG_INFO.to_ne_bytes());
        nla.extend_from_slice(&value);
        nla.resize(nla.len().next_multiple_of(4), 0);
        nla
    }

    #[test]
    fn figures_come_from_tcp_info() {
        let (info, len) = tcp_info(&attribute(232)).expect("parsed");
        let figures = figures(&info, len, tcp_state::CLOSE_WAIT);
        assert_eq!(
            figures,
            TcpFigures { srtt_us: 250, cwnd: 10, total_retrans: 3, bytes_sent: Some(6000), bytes_received: 5000 }
        );
        let established = super::figures(&info, len, tcp_state::ESTABLISHED);
        assert_eq!(established.bytes_received, 5001, "no FIN yet: every byte is payload");
    }

    #[test]
    fn an_old_kernels_short_tcp_info_has_no_bytes_sent() {
        let (info, len) = tcp_info(&attribute(192)).expect("parsed though short");
        let figures = figures(&info, len, tcp_state::ESTABLISHED);
        assert_eq!(figures.bytes_sent, None);
        assert_eq!(figures.bytes_received, 5001);
        assert!(tcp_info(&[]).is_none());
    }
}
