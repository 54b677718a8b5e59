//! Flows in an array of slots (`Config::flows_in_slots`), found by open
//! addressing: a socket's flow sits in one of [`PROBES`] slots from its
//! home slot, a hash of its address. tcp_probe finds its flow for every
//! segment: here that is a few inlined loads and compares, where the hash
//! table's lookup is two calls (`__htab_map_lookup_elem`, `htab_map_hash`),
//! each returning through this CPU's return thunk. Measured with throwaway
//! builds: 63 ns a tcp_probe run that only finds its flow, against 87
//! through the table (docs/benchmarks.md).
//!
//! A slot's `owner` says whose flow it holds: the socket's distance from
//! the array's first slot in kernel memory, which every program computes
//! to the same number. From a BTF-typed pointer: that pointer minus the
//! first slot's (the verifier lets a typed pointer be subtracted from
//! another pointer, and nothing else: no shift, no mask), with no call on
//! tcp_probe's path. From an address (a record tracepoint's, or a socket
//! accept() found through the open files, which the verifier may know as
//! either): the address as a plain number, minus the first slot's
//! address as a number. A number comes back from a map as one: the
//! address goes through this CPU's cell ([`NUMBER`]), and the first
//! slot's is stored in [`FIRST_SLOT`] by the first insert (where pointers
//! may leak, as netlens's CAP_PERFMON allows). Sockets are aligned, so
//! the distance is even; a close sets its lowest bit, which frees the
//! slot for any socket. A new flow claims a
//! free slot with a compare-and-exchange on `owner` (two CPUs may open
//! sockets with the same home slot at once; 5.12+), then writes the flow:
//! until then the slot is no open socket's. Only the owner writes an
//! open slot, under its socket's lock, as with the table.
//!
//! The loader puts flows here only where every program that keeps them is
//! typed (loader/flow_home.rs): per segment, the address's way costs a
//! map lookup more. Closed flows need no sweep: a closed slot is free. A close never seen leaves its slot until the socket's address
//! opens again (counted then as stale), as in the table.

use core::ptr;

use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray},
};
use netlens_common::{counter, Flow, FlowSlot, FLOW_TABLE_ENTRIES};

use crate::{config::cfg_field, events::count, sock::SockRef};

#[map]
static FLOW_SLOTS: Array<FlowSlot> = Array::with_max_entries(FLOW_TABLE_ENTRIES, 0);

/// Slots a flow may sit in, from its home slot on: a miss (a socket opened
/// before netlens) costs this many compares. With 4, 40 flows in 64 slots
/// found no room for 4-5 of them; with 8, a quarter full, none.
const PROBES: u32 = 8;

/// Fibonacci hashing: the distance times 2^64 / φ, whose top bits are the
/// home slot: well mixed even where addresses differ only in a few bits.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The first slot's address, as a number (0: no flow inserted yet).
#[map]
static FIRST_SLOT: Array<u64> = Array::with_max_entries(1, 0);

/// This CPU's cell that turns an address into a plain number.
#[map]
static NUMBER: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn in_use() -> bool {
    cfg_field!(flows_in_slots) != 0
}

/// `sk`'s owner value (see the top of this file); `None` before the first
/// insert, for a socket held by address.
#[inline(always)]
fn owner_of<S: SockRef>(sk: S) -> Option<u64> {
    if S::TYPED {
        let first = FLOW_SLOTS.get_ptr(0)? as u64;
        // The volatile read keeps the pointer a pointer to the verifier (and
        // the subtraction one of two pointers, giving a number).
        let handed = unsafe { ptr::read_volatile(&sk.handed()) };
        return Some(handed.wrapping_sub(first));
    }
    let first = *FIRST_SLOT.get(0)?;
    if first == 0 {
        return None;
    }
    Some(as_number(sk.addr())?.wrapping_sub(first))
}

/// `value` as a plain number to the verifier, whatever it knew it as.
#[inline(always)]
fn as_number(value: u64) -> Option<u64> {
    let cell = NUMBER.get_ptr_mut(0)?;
    // SAFETY: this CPU's cell; nothing else runs on it meanwhile (a
    // program does not nest in itself, and a nested one writes before it
    // reads).
    unsafe {
        ptr::write_volatile(cell, value);
        Some(ptr::read_volatile(cell))
    }
}

/// Keeps the first slot's address for the programs that hold sockets by
/// address (see the top of this file).
#[inline(always)]
fn remember_first_slot() {
    let (Some(first), Some(kept)) = (FLOW_SLOTS.get_ptr(0), FIRST_SLOT.get_ptr_mut(0)) else { return };
    // SAFETY: a live map value; every writer writes the same number.
    unsafe {
        if ptr::read_volatile(kept) == 0 {
            ptr::write_volatile(kept, first as u64);
        }
    }
}

/// Slot `index` (masked into the array).
#[inline(always)]
fn slot(index: u32) -> Option<&'static mut FlowSlot> {
    let slot = FLOW_SLOTS.get_ptr_mut(index & cfg_field!(flow_slot_mask))?;
    // SAFETY: a live map value (arrays are never freed while a program
    // runs); see the top of this file for who writes it.
    Some(unsafe { &mut *slot })
}

#[inline(always)]
fn home(owner: u64) -> u32 {
    (owner.wrapping_mul(GOLDEN) >> cfg_field!(flow_slot_shift)) as u32
}

/// `sk`'s open flow.
#[inline(always)]
pub fn find<S: SockRef>(sk: S) -> Option<&'static mut FlowSlot> {
    let owner = owner_of(sk)?;
    let home = home(owner);
    for probe in 0..PROBES {
        let slot = slot(home.wrapping_add(probe))?;
        if slot.owner == owner {
            return Some(slot);
        }
    }
    None
}

/// Marks `sk`'s flow closed: its slot is free.
#[inline(always)]
pub fn close<S: SockRef>(sk: S) {
    if let Some(slot) = find(sk) {
        // A plain store: claims only exchange odd or zero owners.
        slot.owner |= 1;
    }
}

/// Starts tracking `sk`'s connection with `flow`: over its own open slot
/// (a close at its address we never saw: stale), else in the first free
/// slot it claims. Refused (counted, as a full table's) when none is free.
#[inline(always)]
pub fn insert<S: SockRef>(sk: S, flow: &Flow) {
    remember_first_slot();
    let Some(owner) = owner_of(sk) else {
        count(counter::FLOW_INSERT_FAILURES, 1);
        return;
    };
    let home = home(owner);
    for probe in 0..PROBES {
        let Some(slot) = slot(home.wrapping_add(probe)) else { break };
        if slot.owner == owner {
            count(counter::FLOW_STALE, 1);
            slot.flow = *flow;
            count(counter::FLOW_INSERTS, 1);
            return;
        }
    }
    for probe in 0..PROBES {
        let Some(slot) = slot(home.wrapping_add(probe)) else { break };
        // SAFETY: `owner` is the first member of a live map value.
        let seen = unsafe { ptr::read_volatile(&slot.owner) };
        if seen & 1 == 1 || seen == 0 {
            // SAFETY: as above; the exchange is atomic.
            if unsafe { compare_exchange(&mut slot.owner, seen, owner) } == seen {
                slot.flow = *flow;
                if seen != 0 {
                    count(counter::FLOW_REUSED, 1);
                }
                count(counter::FLOW_INSERTS, 1);
                return;
            }
        }
    }
    count(counter::FLOW_INSERT_FAILURES, 1);
}

/// Sets `*at` to `new` where it holds `expected`, atomically; returns
/// what it held. Rust has no compare-and-swap for this target: BPF's
/// `cmpxchg` (5.12+), which takes `expected` and returns the old value in
/// r0.
///
/// # Safety
/// `at` points into a live map value.
#[inline(always)]
unsafe fn compare_exchange(at: *mut u64, expected: u64, new: u64) -> u64 {
    let mut previous = expected;
    core::arch::asm!(
        "r0 = cmpxchg_64({at} + 0, r0, {new})",
        at = in(reg) at,
        new = in(reg) new,
        inout("r0") previous,
        options(nostack)
    );
    previous
}
