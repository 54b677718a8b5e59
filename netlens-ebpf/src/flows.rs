//! Per-connection state (a [`Flow`]), kept in one of three places, chosen
//! by the loader at start-up (`Config::flows_in_storage` and
//! `flows_in_slots`, frozen, so each program is verified with one):
//! - an array of slots (`FLOW_OWNERS`, `FLOW_SLOTS`, 5.12+, the default where every
//!   program that keeps flows is BTF-typed): see slots.rs. Its lookup is
//!   a few inlined loads, where the table's is two calls (tcp_probe runs
//!   it for every segment).
//! - socket-local storage (`BPF_MAP_TYPE_SK_STORAGE`), when asked for
//!   (`NETLENS_FLOW_STATE=storage`): the flow lives with its socket and
//!   the kernel frees it with the socket, so there is no table to fill,
//!   nothing to evict, and no entry of an earlier socket at a reused
//!   address. A lookup is cheaper than the table's (tcp_probe -18 %), a
//!   connection dearer (two allocations; see the README). Its helpers
//!   take only the BTF-typed socket a tracing program was handed (5.11+),
//!   so the loader uses it only where every program that keeps flows is
//!   one (BTF tracepoints, fentry). The others (the resets' and accept()'s
//!   record tracepoints) find no flow there: userspace joins what they
//!   report to the connection by its 4-tuple
//!   (netlens/src/known_connections.rs).
//! - a preallocated hash keyed by socket address, the default. Not an
//!   LRU: its lookups write the entry's reference bit and its inserts and
//!   removals take the LRU lists' locks, and the plain table cost 9.5 %
//!   less per connection and per segment (`bench cost`, 4 of 4 pairs). What
//!   an LRU would evict for room, this table refuses (FLOW_INSERT_FAILURES):
//!   either way the connection's close lacks its direction and lifetime,
//!   and is counted. A close we never saw (the kernel skips a program that
//!   would nest in itself on a CPU, counted as `events missed`: 5 in 3.4
//!   million state changes under churn here) leaves its entry until the
//!   kernel gives the address to another socket, whose open replaces it.
//!   Both are counted as flows lost, per CPU: the refused
//!   (FLOW_INSERT_FAILURES) and the stale entries found (FLOW_STALE).
//!
//! Closed flows kept (`Config::flows_kept_closed`, 5.14+): a close marks
//! its flow closed (`closed_ns`) instead of removing it, and the next open
//! at that address writes its flow over it in place. The kernel hands a
//! freed socket's memory to the next socket at once, so nearly every open
//! finds its address's entry (a 10 s churn of 200,000 connections here
//! left 25 entries): neither takes the bucket lock, and each connection
//! costs 7-20 % less kernel time (`bench cost`, three runs, lower in 13
//! of 14 pairs; docs/benchmarks.md). Lookups skip
//! a closed flow, as if it were gone. The entries of addresses the kernel
//! does not reuse are swept by userspace (netlens/src/loader/closed_flows.rs).

use core::ptr;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE},
    btf_maps::SkStorage,
    cty::c_void,
    helpers::generated::{bpf_sk_storage_delete, bpf_sk_storage_get},
    macros::{btf_map, map},
    maps::{HashMap, PerCpuArray},
};
use netlens_common::{counter, Flow, FLOW_TABLE_ENTRIES};

use crate::{
    config::cfg_field,
    events::count,
    kernel::{slot, EEXIST},
    slots,
    sock::{Sock, SockRef},
};

#[map]
static FLOWS: HashMap<u64, Flow> = HashMap::with_max_entries(FLOW_TABLE_ENTRIES, 0);

#[btf_map]
static FLOW_STORAGE: SkStorage<Flow> = SkStorage::new();

/// Whether flows live in socket storage (see the top of this file).
#[inline(always)]
pub fn in_storage() -> bool {
    cfg_field!(flows_in_storage) != 0
}

/// Whether the table keeps closed flows for reuse (see the top of this file).
#[inline(always)]
fn keeps_closed() -> bool {
    cfg_field!(flows_kept_closed) != 0
}

/// The flow in `sk`'s storage, made (zeroed) if `create`. `None` for a
/// socket the program holds only by address: it cannot reach the storage.
#[inline(always)]
fn stored<S: SockRef>(sk: S, create: bool) -> Option<&'static mut Flow> {
    if !S::TYPED {
        return None;
    }
    let flags = if create { u64::from(BPF_SK_STORAGE_GET_F_CREATE) } else { 0 };
    // SAFETY: `handed()` is the BTF-typed socket the kernel handed this
    // program (checked by the verifier); no initial value is passed.
    let flow = unsafe { bpf_sk_storage_get(storage_map(), sk.handed() as *mut c_void, ptr::null_mut(), flags) }.cast::<Flow>();
    // SAFETY: a live storage value, valid while the program runs (RCU);
    // one socket's state changes and segments are handled under its lock.
    (!flow.is_null()).then(|| unsafe { &mut *flow })
}

/// Drops `sk`'s storage, if the program can reach it.
#[inline(always)]
fn unstore<S: SockRef>(sk: S) {
    if S::TYPED {
        // SAFETY: as in `stored`.
        let _ = unsafe { bpf_sk_storage_delete(storage_map(), sk.handed() as *mut c_void) };
    }
}

/// [`FLOW_STORAGE`] as the storage helpers take it.
#[inline(always)]
fn storage_map() -> *mut c_void {
    ptr::addr_of!(FLOW_STORAGE).cast_mut().cast()
}

/// Starts tracking the connection of socket `sk`.
#[inline(always)]
pub fn insert<S: SockRef>(sk: S, flow: &Flow) {
    if slots::in_use() {
        slots::insert(sk, flow);
        return;
    }
    if in_storage() {
        match stored(sk, true) {
            Some(slot) => *slot = *flow,
            None => count(counter::FLOW_INSERT_FAILURES, 1),
        }
        return;
    }
    if keeps_closed() {
        if let Some(entry) = FLOWS.get_ptr_mut(sk.addr()) {
            // SAFETY: a live map value. A closed flow is no socket's, and
            // this socket's own events are handled under its lock: nothing
            // else writes the entry now. (userspace's sweep may take it
            // meanwhile; closed_flows.rs puts back an open flow it took.)
            let entry = unsafe { &mut *entry };
            count(if entry.closed_ns != 0 { counter::FLOW_REUSED } else { counter::FLOW_STALE }, 1);
            *entry = *flow;
            count(counter::FLOW_INSERTS, 1);
            return;
        }
    }
    match FLOWS.insert(sk.addr(), flow, BPF_NOEXIST as u64) {
        Ok(()) => count(counter::FLOW_INSERTS, 1),
        // The socket address was reused without a close we saw: replace.
        Err(err) if err == -EEXIST => {
            if FLOWS.insert(sk.addr(), flow, 0).is_ok() {
                count(counter::FLOW_STALE, 1);
                count(counter::FLOW_INSERTS, 1);
            }
        }
        Err(_) => count(counter::FLOW_INSERT_FAILURES, 1),
    }
}

/// The tracked flow of `sk`, in place (no copy on the small BPF stack). It
/// stays valid for the rest of the program, even after [`remove`].
#[inline(always)]
pub fn lookup<S: SockRef>(sk: S) -> Option<&'static Flow> {
    lookup_mut(sk).map(|flow| &*flow)
}

/// Stops tracking `sk`, whose flow is `flow`, closed at `now`. In socket
/// storage, the flow stays until the kernel frees the socket: a delete
/// here doubled the cost of each connection's close, and nothing reads a
/// closed socket's flow (a new connect() on it makes a new one).
#[inline(always)]
pub fn remove<S: SockRef>(sk: S, flow: &mut Flow, now: u64) {
    if slots::in_use() {
        flow.closed_ns = now | 1;
        slots::close(sk);
        count(counter::FLOW_REMOVES, 1);
    } else if in_storage() {
        // Kept.
    } else if keeps_closed() {
        close_kept(flow, now);
        count(counter::FLOW_REMOVES, 1);
    } else if FLOWS.remove(sk.addr()).is_ok() {
        count(counter::FLOW_REMOVES, 1);
    }
}

/// Marks a table entry's flow closed, kept for the next socket at its
/// address (see the top of this file).
#[inline(always)]
fn close_kept(flow: &mut Flow, now: u64) {
    // Never 0, which means open.
    flow.closed_ns = now | 1;
    count(counter::FLOW_KEPT_CLOSED, 1);
}

/// Drops `flow`, the entry at `sk` that belongs to an earlier socket at
/// the same address (its close was missed): a flow lost, counted as
/// such. (In socket storage, an earlier connection of the same socket: a
/// connect() after a failed one; not a loss.)
#[inline(always)]
pub fn discard_stale<S: SockRef>(sk: S, flow: &mut Flow, now: u64) {
    if in_storage() {
        unstore(sk);
        return;
    }
    count(counter::FLOW_STALE, 1);
    if slots::in_use() {
        flow.closed_ns = now | 1;
        slots::close(sk);
        return;
    }
    if keeps_closed() {
        close_kept(flow, now);
    } else {
        let _ = FLOWS.remove(sk.addr());
    }
}

/// The tracked flow of `sk`, in place, for updates; `None` for a closed
/// flow kept in the table.
#[inline(always)]
pub fn lookup_mut<S: SockRef>(sk: S) -> Option<&'static mut Flow> {
    if slots::in_use() {
        return slots::find(sk);
    }
    if in_storage() {
        return stored(sk, false);
    }
    // SAFETY: map values live until the program ends (RCU); one socket's
    // segments and state changes are handled under its lock, so no other
    // program writes this flow at the same time.
    let flow = unsafe { &mut *FLOWS.get_ptr_mut(sk.addr())? };
    (flow.closed_ns == 0).then_some(flow)
}

/// Per-CPU room for a flow that is not in the table (a connection from
/// before netlens attached): too big for the BPF stack. One slot per
/// program (see `kernel::slot`): a program never nests in itself.
#[map]
static SCRATCH: PerCpuArray<Flow> = PerCpuArray::with_max_entries(slot::COUNT, 0);

/// The tracked flow of `sk`, or a stand-in that knows only its namespace
/// and cgroup (in this program's scratch slot).
#[inline(always)]
pub fn known_or_unknown<S: Sock>(sk: S, slot: u32) -> Option<&'static Flow> {
    if let Some(flow) = lookup(sk) {
        return Some(flow);
    }
    if sk.addr() == 0 {
        return blank(slot).map(|flow| &*flow);
    }
    unknown_of(sk, slot).map(|flow| &*flow)
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
