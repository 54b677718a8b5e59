//! When a passive open's SYN arrived, where fentry or kprobes see
//! `tcp_conn_request()` (overflow.rs calls [`syn_arrived`]): lifecycle.rs
//! then times the passive handshake from the SYN itself, including the
//! listener's own processing and any SYN it dropped on a full queue before
//! (the first SYN seen for a 4-tuple is kept). Without those hooks the
//! table stays empty and lifecycle.rs times from the first SYN-ACK.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns, macros::map, maps::LruHashMap};
use netlens_common::{mode, TupleKey, AF_INET, SYNACK_TABLE_ENTRIES};

use crate::{
    config::cfg_field,
    kernel::{member, EEXIST},
    overflow,
    sock::{Probed, Sock},
};

/// SYN arrival (ns) of pending passive opens, by 4-tuple as the child
/// socket will name it. LRU: handshakes that never finish age out.
#[map]
static SYN_STARTS: LruHashMap<TupleKey, u64> = LruHashMap::with_max_entries(SYNACK_TABLE_ENTRIES, 0);

const ETH_P_IP: u16 = 0x0800;

/// Removes and returns the SYN arrival recorded for `key`. Without a
/// program that records them (tracepoints only) the table is empty, and
/// a lookup of a 48-byte key in a cold bucket per passive open is skipped.
#[inline(always)]
pub fn take(key: &TupleKey) -> Option<u64> {
    if !overflow::mode_on(mode::SYN_STARTS_RECORDED) {
        return None;
    }
    // SAFETY: the value is copied out before the entry is removed.
    let start_ns = unsafe { SYN_STARTS.get(key).copied() }?;
    let _ = SYN_STARTS.remove(key);
    Some(start_ns)
}

/// `listener` is about to handle the SYN in `skb`. Its own BPF function,
/// returning 0 or a negative error in a register: a `Result` comes back
/// through the caller's stack, and 5.10's verifier refuses the read of its
/// unwritten error half on the `Ok` path ("invalid read from stack").
#[inline(never)]
pub fn syn_arrived(listener: u64, skb: u64) -> i32 {
    match record_syn(listener, skb) {
        Ok(()) => 0,
        Err(err) => err.min(-1),
    }
}

#[inline(always)]
fn record_syn(listener: u64, skb: u64) -> Result<(), i32> {
    let now = unsafe { bpf_ktime_get_ns() };
    let head: u64 = member(skb, cfg_field!(accept_queue.skb_head))?;
    let ip = head + member::<u16>(skb, cfg_field!(accept_queue.skb_network_header))? as u64;
    let tcp = head + member::<u16>(skb, cfg_field!(accept_queue.skb_transport_header))? as u64;
    // The child's family is the listener's: an IPv4 SYN to a dual-stack
    // IPv6 listener makes an AF_INET6 child with v4-mapped addresses.
    let family: u16 = member(listener, cfg_field!(kernel.sock_tuple.family) as u32)?;
    let mut key = TupleKey {
        saddr: [0; 16],
        daddr: [0; 16],
        netns: Probed(listener).netns(),
        sport: u16::from_be(member(tcp, 2)?),
        dport: u16::from_be(member(tcp, 0)?),
        family,
        _pad: [0; 6],
    };
    if member::<u16>(skb, cfg_field!(accept_queue.skb_protocol))? == ETH_P_IP.to_be() {
        // struct iphdr: saddr at 12, daddr at 16.
        let remote: [u8; 4] = member(ip, 12)?;
        let local: [u8; 4] = member(ip, 16)?;
        let at = if family == AF_INET { 0 } else { 12 };
        if family != AF_INET {
            key.saddr[10..12].copy_from_slice(&[0xff, 0xff]);
            key.daddr[10..12].copy_from_slice(&[0xff, 0xff]);
        }
        key.saddr[at..at + 4].copy_from_slice(&local);
        key.daddr[at..at + 4].copy_from_slice(&remote);
    } else {
        // struct ipv6hdr: saddr at 8, daddr at 24.
        key.daddr = member(ip, 8)?;
        key.saddr = member(ip, 24)?;
    }
    // EEXIST: a retransmitted SYN; the first one's arrival is kept.
    match SYN_STARTS.insert(&key, &now, BPF_NOEXIST as u64) {
        Err(err) if err != -EEXIST => Err(err),
        _ => Ok(()),
    }
}

