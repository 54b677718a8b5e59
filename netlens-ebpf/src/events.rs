//! The ring buffer that carries per-connection events to userspace, and the
//! per-CPU counters that say what could not be carried.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use netlens_common::{counter, RawEvent, RING_BYTES};

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Userspace is woken once this much is pending; below it, userspace drains
/// on its own short timer. Waking on every event would cost a context switch
/// per connection on a churning host.
const WAKEUP_BYTES: u64 = 64 * 1024;

/// Adds `delta` to this CPU's counter `index`.
#[inline(always)]
pub fn count(index: u32, delta: u64) {
    if let Some(value) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *value += delta };
    }
}

/// Sends one event, or counts it as lost when the ring buffer is full.
#[inline(always)]
pub fn emit(event: &RawEvent) {
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if EVENTS.output::<RawEvent>(event, flags as u64).is_err() {
        count(counter::EVENTS_LOST, 1);
    }
}
