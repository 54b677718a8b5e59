//! The ring buffer that carries per-connection events to userspace, and the
//! per-CPU counters that say what could not be carried.

use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_PROD_POS},
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use netlens_common::{counter, program, Flow, RawEvent, RING_BYTES};

use crate::{config::cfg_field, kernel::Tuple};

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Failures inside each program, by `netlens_common::program` slot.
#[map]
static PROGRAM_ERRORS: PerCpuArray<u64> = PerCpuArray::with_max_entries(program::COUNT, 0);


/// Adds `delta` to this CPU's counter `index`.
#[inline(always)]
pub fn count(index: u32, delta: u64) {
    if let Some(value) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *value += delta };
    }
}

/// Counts one failure inside `program` (a `netlens_common::program` slot):
/// what an entry point would otherwise drop with `let _ =`.
#[inline(always)]
pub fn count_error(program: u32) {
    if let Some(value) = PROGRAM_ERRORS.get_ptr_mut(program) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *value += 1 };
    }
}

/// Counts `result`'s failure, if any, against `program`.
#[inline(always)]
pub fn counted<T, E>(program: u32, result: Result<T, E>) {
    if result.is_err() {
        count_error(program);
    }
}

/// Sends one event, built by `fill` in place in the ring buffer (no copy
/// on the 512-byte stack), or counts it as lost when the ring buffer is
/// full. `fill` must start with [`stamp`], which writes every field of a
/// [`RawEvent`]; a `RawClose`'s dynamics are the caller's to write.
#[inline(always)]
pub fn emit<T: Copy + 'static>(fill: impl FnOnce(&mut T)) {
    let Some(mut entry) = EVENTS.reserve::<T>(0) else {
        count(counter::EVENTS_LOST, 1);
        return;
    };
    // SAFETY: the reserved slot holds one T, a plain-old-data record: any
    // bytes are a valid value, and `fill` writes them all. (Not zeroed
    // first: that costs a memset call per event.)
    fill(unsafe { &mut *entry.as_mut_ptr() });
    let flags = if crosses_wakeup(EVENTS.query(BPF_RB_PROD_POS as u64), record_bytes::<T>()) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags as u64);
}

/// What one record of `T` takes in the ring: an 8-byte header, rounded up
/// to 8 bytes.
#[inline(always)]
const fn record_bytes<T>() -> u64 {
    ((size_of::<T>() + 8 + 7) & !7) as u64
}

/// Whether the record just reserved (its `len` bytes the last of the
/// `produced` bytes the ring has taken since it was made) takes the total
/// across a multiple of `wakeup_bytes`: userspace is woken once per
/// `wakeup_bytes` of events, and below that drains on its own timer.
/// Waking on every event would cost a context switch per connection on a
/// churning host. The producer position, not the bytes pending: reading
/// how far userspace got touches a cache line userspace writes, and cost
/// about 35 ns per event (bench cost: 4,976 → 4,851 ns per connection);
/// while userspace keeps up the two wake alike, and while it does not,
/// each `wakeup_bytes` produced still wakes it. Records from other CPUs
/// can make one crossing wake twice or none; the timer bounds a missed one.
#[inline(always)]
fn crosses_wakeup(produced: u64, len: u64) -> bool {
    let wakeup_bytes = u64::from(cfg_field!(wakeup_bytes)).max(1);
    produced / wakeup_bytes != produced.saturating_sub(len) / wakeup_bytes
}

/// Stamps an event with its kind, time, 4-tuple and the flow's identity,
/// and zeroes the kind-specific fields.
#[inline(always)]
pub fn stamp(event: &mut RawEvent, kind: u8, now: u64, tuple: &Tuple, flow: &Flow) {
    event.duration_ns = 0;
    event.bytes_sent = 0;
    event.bytes_received = 0;
    event.segs = 0;
    event.spurious_retransmits = 0;
    event.state = 0;
    event.reason = 0;
    event._pad = [0; 6];
    event.queue_len = 0;
    event.backlog = 0;
    event.ts_ns = now;
    event.kind = kind;
    event.direction = flow.direction;
    event.family = tuple.family;
    event.sport = tuple.sport;
    event.dport = tuple.dport;
    event.saddr = tuple.saddr;
    event.daddr = tuple.daddr;
    event.pid = flow.pid;
    event.comm = flow.comm;
    event.netns = flow.netns;
    event.cgroup = flow.cgroup;
}
