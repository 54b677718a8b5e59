//! The flow table: per-connection state keyed by socket address.
//!
//! An LRU hash, so a close we never saw (netlens attached mid-connection,
//! a missed event) cannot fill it forever. LRU evictions are silent in the
//! kernel (and the BPF target has no fetch-and-add to keep a shared live
//! count), so we count inserts and removals per CPU; userspace derives
//! evictions as inserts - removals - entries still in the table.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use netlens_common::{counter, Flow, FLOW_TABLE_ENTRIES};

use crate::{
    events::count,
    kernel::{slot, EEXIST},
    sock::{Probed, Sock},
};

#[map]
static FLOWS: LruHashMap<u64, Flow> = LruHashMap::with_max_entries(FLOW_TABLE_ENTRIES, 0);

/// Starts tracking the connection of socket `sk`.
#[inline(always)]
pub fn insert(sk: u64, flow: &Flow) {
    match FLOWS.insert(sk, flow, BPF_NOEXIST as u64) {
        Ok(()) => count(counter::FLOW_INSERTS, 1),
        // The socket address was reused without a close we saw: replace.
        Err(err) if err == -EEXIST => {
            let _ = FLOWS.insert(sk, flow, 0);
        }
        Err(_) => count(counter::FLOW_INSERT_FAILURES, 1),
    }
}

/// The tracked flow of `sk`, in place (no copy on the small BPF stack). It
/// stays valid for the rest of the program, even after [`remove`].
#[inline(always)]
pub fn lookup(sk: u64) -> Option<&'static Flow> {
    // SAFETY: map values live until the program ends (RCU).
    FLOWS.get_ptr(sk).map(|flow| unsafe { &*flow })
}

/// Stops tracking `sk`.
#[inline(always)]
pub fn remove(sk: u64) {
    if FLOWS.remove(sk).is_ok() {
        count(counter::FLOW_REMOVES, 1);
    }
}

/// Drops the entry at `sk` that belongs to an earlier socket at the same
/// address (its close was missed). Not counted as a removal: like an LRU
/// eviction, it is a connection whose end we did not see, and it shows in
/// the evictions (inserts - removals - live).
#[inline(always)]
pub fn discard_stale(sk: u64) {
    let _ = FLOWS.remove(sk);
}

/// The tracked flow of `sk`, in place, for updates.
#[inline(always)]
pub fn lookup_mut(sk: u64) -> Option<&'static mut Flow> {
    // SAFETY: map values live until the program ends (RCU); one socket's
    // segments and state changes are handled under its lock, so no other
    // program writes this flow at the same time.
    FLOWS.get_ptr_mut(sk).map(|flow| unsafe { &mut *flow })
}

/// Per-CPU room for a flow that is not in the table (a connection from
/// before netlens attached): too big for the BPF stack. One slot per
/// program (see `kernel::slot`): a program never nests in itself.
#[map]
static SCRATCH: PerCpuArray<Flow> = PerCpuArray::with_max_entries(slot::COUNT, 0);

/// The tracked flow of `sk`, or a stand-in that knows only its namespace
/// and cgroup (in this program's scratch slot).
#[inline(always)]
pub fn known_or_unknown(sk: u64, slot: u32) -> Option<&'static Flow> {
    if let Some(flow) = lookup(sk) {
        return Some(flow);
    }
    if sk == 0 {
        return blank(slot).map(|flow| &*flow);
    }
    unknown_of(Probed(sk), slot).map(|flow| &*flow)
}

/// A stand-in flow for socket `sk`, which we do not track, in scratch
/// `slot`: it knows the socket's namespace and cgroup.
#[inline(always)]
pub fn unknown_of<S: Sock>(sk: S, slot: u32) -> Option<&'static mut Flow> {
    let flow = blank(slot)?;
    flow.netns = sk.netns();
    flow.cgroup = sk.cgroup();
    Some(flow)
}

/// A blank flow in scratch `slot`.
#[inline(always)]
pub fn blank(slot: u32) -> Option<&'static mut Flow> {
    // SAFETY: this CPU's slot for this program.
    let flow = unsafe { &mut *SCRATCH.get_ptr_mut(slot)? };
    *flow = Flow::default();
    Some(flow)
}
