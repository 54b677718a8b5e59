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
    kernel::{member, packet_ends, EEXIST},
    overflow,
    sock::{Probed, Sock},
};

/// SYN arrival (ns) of pending passive opens, by 4-tuple as the child
/// socket will name it. LRU: handshakes that never finish age out.
#[map]
static SYN_STARTS: LruHashMap<TupleKey, u64> = LruHashMap::with_max_entries(SYNACK_TABLE_ENTRIES, 0);

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
    let ends = packet_ends(skb)?;
    // The child's family is the listener's: an IPv4 SYN to a dual-stack
    // IPv6 listener makes an AF_INET6 child with v4-mapped addresses.
    let family: u16 = member(listener, cfg_field!(kernel.sock_tuple.family) as u32)?;
    let mut key = TupleKey {
        saddr: ends.local,
        daddr: ends.remote,
        netns: Probed(listener).netns(),
        sport: ends.local_port,
        dport: ends.remote_port,
        family,
        _pad: [0; 6],
    };
    if ends.v4 && family != AF_INET {
        key.saddr = [0; 16];
        key.daddr = [0; 16];
        key.saddr[10..12].copy_from_slice(&[0xff, 0xff]);
        key.daddr[10..12].copy_from_slice(&[0xff, 0xff]);
        key.saddr[12..].copy_from_slice(&ends.local[..4]);
        key.daddr[12..].copy_from_slice(&ends.remote[..4]);
    }
    // EEXIST: a retransmitted SYN; the first one's arrival is kept.
    match SYN_STARTS.insert(&key, &now, BPF_NOEXIST as u64) {
        Err(err) if err != -EEXIST => Err(err),
        _ => Ok(()),
    }
}

