//! Flows in an array of slots (`Config::flows_in_slots`), found by a hash
//! of their socket's address: a socket's flow sits in one of the
//! [`SLOT_WAYS`] slots of its bucket. The owners of a bucket's slots are
//! one 64-byte value (`FLOW_OWNERS`), so finding a flow reads one cache
//! line of owners, then the flow (`FLOW_SLOTS`, the same index). tcp_probe
//! finds its flow for every segment: here that is a few inlined loads and
//! compares, where the hash table's lookup is two calls
//! (`__htab_map_lookup_elem`, `htab_map_hash`), each returning through
//! this CPU's return thunk. A first layout kept each owner beside its
//! flow and probed 8 slots in a row: an insert read 8 flows' lines, and a
//! connection cost 6 % more kernel time than with the table.
//!
//! An owner says whose flow a slot holds: the socket's distance from the
//! first bucket in kernel memory, which every program computes to the
//! same number. From a BTF-typed pointer: that pointer minus the first
//! bucket's (the verifier lets a typed pointer be subtracted from another
//! pointer, and nothing else: no shift, no mask), with no call on
//! tcp_probe's path. From an address (a record tracepoint's, or a socket
//! accept() found through the open files, which the verifier may know as
//! either): the address as a plain number, minus the first bucket's
//! address as a number. A number comes back from a map as one: the
//! address goes through this CPU's cell ([`NUMBER`]), and the first
//! bucket's is stored in [`FIRST_BUCKET`] by the first insert (where
//! pointers may leak, as netlens's CAP_PERFMON allows). Sockets are
//! aligned, so the distance is even; a close sets its lowest bit, which
//! frees the slot for any socket.
//!
//! A new flow claims a free slot with a compare-and-exchange on its owner
//! (two CPUs may open sockets of one bucket at once; 5.12+), then writes
//! the flow: until then the slot is no open socket's. Only the owner
//! writes an open slot, under its socket's lock, as with the table. A
//! bucket with no free slot refuses the flow (counted, as a full
//! table's).
//!
//! The loader puts flows here only where every program that keeps them is
//! typed (loader/flow_home.rs): per segment, the address's way costs a
//! map lookup more. Closed flows need no sweep: a closed slot is free. A
//! close never seen leaves its slot until the socket's address opens
//! again (counted then as stale), as in the table.

use core::ptr;

use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray},
};
use netlens_common::{counter, Flow, OwnerBucket, FLOW_TABLE_ENTRIES, SLOT_WAYS};

use crate::{config::cfg_field, events::count, sock::SockRef};

/// The owners of each bucket's slots (the loader sizes both arrays).
#[map]
static FLOW_OWNERS: Array<OwnerBucket> = Array::with_max_entries(FLOW_TABLE_ENTRIES / SLOT_WAYS as u32, 0);

/// The flows, slot `way` of bucket `b` at `b * SLOT_WAYS + way`.
#[map]
static FLOW_SLOTS: Array<Flow> = Array::with_max_entries(FLOW_TABLE_ENTRIES, 0);

/// The first bucket's address, as a number (0: no flow inserted yet).
#[map]
static FIRST_BUCKET: Array<u64> = Array::with_max_entries(1, 0);

/// This CPU's cell that turns an address into a plain number.
#[map]
static NUMBER: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// MurmurHash3's 64-bit finalizer: every bit of the distance moves every
/// bit of the hash. Fibonacci hashing (the distance times 2^64 / φ, top
/// bits) put the sockets of one slab, 2,368 bytes apart, into 2 buckets of 8.
#[inline(always)]
fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[inline(always)]
pub fn in_use() -> bool {
    cfg_field!(flows_in_slots) != 0
}

/// `sk`'s owner value (see the top of this file); `None` before the first
/// insert, for a socket held by address.
#[inline(always)]
fn owner_of<S: SockRef>(sk: S) -> Option<u64> {
    if S::TYPED {
        let first = FLOW_OWNERS.get_ptr(0)? as u64;
        // The volatile read keeps the pointer a pointer to the verifier (and
        // the subtraction one of two pointers, giving a number).
        let handed = unsafe { ptr::read_volatile(&sk.handed()) };
        return Some(handed.wrapping_sub(first));
    }
    let first = *FIRST_BUCKET.get(0)?;
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

/// Keeps the first bucket's address for the programs that hold sockets
/// by address (see the top of this file).
#[inline(always)]
fn remember_first_bucket() {
    let (Some(first), Some(kept)) = (FLOW_OWNERS.get_ptr(0), FIRST_BUCKET.get_ptr_mut(0)) else { return };
    // SAFETY: a live map value; every writer writes the same number.
    unsafe {
        if ptr::read_volatile(kept) == 0 {
            ptr::write_volatile(kept, first as u64);
        }
    }
}

/// The bucket of `owner`, and its index.
#[inline(always)]
fn bucket_of(owner: u64) -> Option<(&'static mut OwnerBucket, u32)> {
    let index = mix(owner) as u32 & cfg_field!(flow_slot_mask);
    let bucket = FLOW_OWNERS.get_ptr_mut(index)?;
    // SAFETY: a live map value (arrays are never freed while a program
    // runs); see the top of this file for who writes it.
    Some((unsafe { &mut *bucket }, index))
}

/// The flow of slot `way` of bucket `index`.
#[inline(always)]
fn flow_at(index: u32, way: usize) -> Option<&'static mut Flow> {
    let flow = FLOW_SLOTS.get_ptr_mut(index * SLOT_WAYS as u32 + way as u32)?;
    // SAFETY: as in `bucket_of`.
    Some(unsafe { &mut *flow })
}

/// `sk`'s open flow.
#[inline(always)]
pub fn find<S: SockRef>(sk: S) -> Option<&'static mut Flow> {
    let owner = owner_of(sk)?;
    let (bucket, index) = bucket_of(owner)?;
    for way in 0..SLOT_WAYS {
        if bucket.owners[way] == owner {
            return flow_at(index, way);
        }
    }
    None
}

/// Marks `sk`'s flow closed: its slot is free.
#[inline(always)]
pub fn close<S: SockRef>(sk: S) {
    let Some(owner) = owner_of(sk) else { return };
    let Some((bucket, _)) = bucket_of(owner) else { return };
    for way in 0..SLOT_WAYS {
        if bucket.owners[way] == owner {
            // A plain store: claims only exchange odd or zero owners.
            bucket.owners[way] = owner | 1;
            return;
        }
    }
}

/// Starts tracking `sk`'s connection with `flow`: over its own open slot
/// (a close at its address we never saw: stale), else in the first free
/// slot of its bucket it claims. Refused (counted, as a full table's) when
/// none is free.
#[inline(always)]
pub fn insert<S: SockRef>(sk: S, flow: &Flow) {
    remember_first_bucket();
    let Some((owner, (bucket, index))) = owner_of(sk).and_then(|owner| Some((owner, bucket_of(owner)?))) else {
        count(counter::FLOW_INSERT_FAILURES, 1);
        return;
    };
    for way in 0..SLOT_WAYS {
        if bucket.owners[way] == owner {
            if let Some(slot) = flow_at(index, way) {
                count(counter::FLOW_STALE, 1);
                *slot = *flow;
                count(counter::FLOW_INSERTS, 1);
            }
            return;
        }
    }
    for way in 0..SLOT_WAYS {
        // SAFETY: a member of a live map value.
        let seen = unsafe { ptr::read_volatile(&bucket.owners[way]) };
        if seen & 1 == 1 || seen == 0 {
            // SAFETY: as above; the exchange is atomic.
            if unsafe { compare_exchange(&mut bucket.owners[way], seen, owner) } == seen {
                if let Some(slot) = flow_at(index, way) {
                    *slot = *flow;
                }
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
