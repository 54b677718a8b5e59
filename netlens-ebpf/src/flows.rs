//! The flow table: per-connection state keyed by socket address.
//!
//! An LRU hash, so a close we never saw (netlens attached mid-connection,
//! a missed event) cannot fill it forever. LRU evictions are silent in the
//! kernel (and the BPF target has no fetch-and-add to keep a shared live
//! count), so we count inserts and removals per CPU; userspace derives
//! evictions as inserts - removals - entries still in the table.

use aya_ebpf::{bindings::BPF_NOEXIST, macros::map, maps::LruHashMap};
use netlens_common::{counter, Flow, FLOW_TABLE_ENTRIES};

use crate::events::count;

#[map]
static FLOWS: LruHashMap<u64, Flow> = LruHashMap::with_max_entries(FLOW_TABLE_ENTRIES, 0);

/// Starts tracking the connection of socket `sk`.
#[inline(always)]
pub fn insert(sk: u64, flow: &Flow) {
    if FLOWS.insert(sk, flow, BPF_NOEXIST as u64).is_ok() {
        count(counter::FLOW_INSERTS, 1);
    } else {
        // The socket address was reused without a close we saw: replace.
        let _ = FLOWS.insert(sk, flow, 0);
    }
}

#[inline(always)]
pub fn get(sk: u64) -> Option<Flow> {
    // SAFETY: the value is copied out before any other map operation.
    unsafe { FLOWS.get(sk).copied() }
}

/// Records the socket's new `total_retrans`; returns by how much it grew
/// since the last call (or the flow's start), `None` for an unknown flow.
#[inline(always)]
pub fn advance_retrans(sk: u64, total_retrans: u32) -> Option<u32> {
    let flow = FLOWS.get_ptr_mut(sk)?;
    // SAFETY: a valid map value; retransmissions of one socket run under its
    // lock, so no other program writes this field concurrently.
    unsafe {
        let grown = total_retrans.wrapping_sub((*flow).total_retrans);
        (*flow).total_retrans = total_retrans;
        Some(grown)
    }
}

/// Stops tracking `sk`, returning what was known about it.
#[inline(always)]
pub fn take(sk: u64) -> Option<Flow> {
    let flow = get(sk)?;
    if FLOWS.remove(sk).is_ok() {
        count(counter::FLOW_REMOVES, 1);
    }
    Some(flow)
}
