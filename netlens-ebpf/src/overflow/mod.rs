//! Listen overflows: connections the kernel dropped because a listener's
//! accept queue was full (what it counts as TcpExtListenOverflows), per
//! listener, and the kernel's packet drop reasons.
//!
//! The kernel drops on a full accept queue in two places, both checking
//! `sk_acceptq_is_full()` (`sk_ack_backlog > sk_max_ack_backlog`):
//! - SYN time, `tcp_conn_request()`: the SYN is *consumed* (`consume_skb`
//!   from `tcp_rcv_state_process()`), not freed with a drop reason;
//! - final-ACK time, `tcp_v4/v6_syn_recv_sock()`: the ACK is freed with
//!   reason `TCP_LISTEN_OVERFLOW` (6.x) by `tcp_v4/v6_rcv()`, or, when it
//!   carried a SYN cookie, with reason `NO_SOCKET` by `cookie_v4/v6_check()`
//!   (measured on 6.18 with backlog 0); `rx_sk` (6.11+) is the listener.
//! Where fentry/fexit exist: a `tcp_conn_request` during which the
//! kernel's own count of overflows on this CPU grew dropped its SYN
//! (fentry and fexit; mib.rs), and a `tcp_v4/v6_syn_recv_sock` that
//! returns no child, with that count grown while it ran, dropped a final
//! ACK for a full queue (fentry and fexit; its other failures, no memory
//! for the child, no route, a port it cannot inherit, a SYN-cookie ACK
//! whose connection exists already, are not overflows). Where the count
//! cannot be read: the listener's `sk_drops` grew meanwhile with its
//! queue full, and every failure to make a child (fentry.rs). Testing the
//! queue at either function's entry missed drops: with two CPUs completing handshakes, the queue
//! could fill between our test and the kernel's (9 counted of 10 in the
//! 6.1 guest).
//! With kprobes only, both tests run at function entry (a kretprobe has no
//! arguments, and softirqs nest on a CPU). With tracepoints only:
//! `kfree_skb` (raw) for the final ACK, and `consume_skb` (raw) filtered to
//! SYNs consumed by `tcp_rcv_state_process()`: the SYN's port and the
//! device's namespace name the listener (the table below, filled at
//! listen()). Whether that packet overflowed: the kernel's own count of
//! overflows on this CPU, in that namespace, grew since the last packet
//! we looked at (mib.rs). Where BTF lacks what that needs, or for the
//! first packet of a namespace on a CPU, the listener's queue is tested
//! as the kernel just did, and its `sk_drops` must have grown.
//! Limits (tracepoints only): a listener that was listening before netlens
//! attached is unknown until it accepts or overflows at final-ACK time;
//! several listeners on one port (SO_REUSEPORT) count as the last one
//! seen; two listeners of one namespace overflowing on one CPU at the same
//! moment (one handling its backlog in process context, the other
//! interrupting it) can swap a count. The queue tests run microseconds
//! after the kernel's: an accept() in between can hide a drop, and drops
//! other than overflows while the queue is full (syncookies off with the
//! SYN queue full too) count as overflows. With those tests, about one
//! run in 25 of the accept test's 51 overflows miscounted with both CPUs
//! busy (2026-12-02): a `kfree_skb` with reason TCP_LISTEN_OVERFLOW with
//! no overflow counted by the kernel, or a wave of SYN drops missed.
//!
//! Counts are cumulative per listener; userspace reads the table once a
//! second and reports what grew (one `listen_overflow` per listener per
//! second while it drops), and once more at exit: totals are exact.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    macros::{kprobe, map},
    maps::{LruHashMap, LruPerCpuHashMap, PerCpuArray},
    programs::ProbeContext,
};
use netlens_common::{program, ListenOverflow, ListenerEndpoint, ListenerKey, LISTENER_TABLE_ENTRIES, LISTEN_OVERFLOW_ENTRIES};

mod fentry;
mod mib;
mod tracepoint;

pub use tracepoint::mode_on;

use crate::{
    config::cfg_field,
    events::{count_error, counted},
    kernel::{cast, listener_key, member, slot, sock_tuple_in, typed_member},
    sock::{Probed, Sock},
    synstart,
};

/// Cumulative overflows by listening endpoint, per CPU (several CPUs drop
/// for one listener, and BPF has no portable atomic add): userspace sums
/// `dropped` over CPUs.
#[map]
static LISTEN_OVERFLOWS: LruPerCpuHashMap<ListenerEndpoint, ListenOverflow> =
    LruPerCpuHashMap::with_max_entries(LISTEN_OVERFLOW_ENTRIES, 0);

/// Listening sockets by (namespace, port), for the SYN tracepoint path.
#[map]
static LISTENERS: LruHashMap<ListenerKey, u64> = LruHashMap::with_max_entries(LISTENER_TABLE_ENTRIES, 0);

/// How much of each listener's `sk_drops` the tracepoint path has
/// accounted for (see [`syn_dropped`]).
#[map]
static LISTENER_DROPS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(LISTENER_TABLE_ENTRIES, 0);

const ETH_P_IP: u16 = 0x0800;

/// A socket entered LISTEN (lifecycle.rs): remember it by port.
#[inline(always)]
pub fn listening(sk: u64) -> Result<(), i32> {
    let key = listener_key(sk)?;
    LISTENERS.insert(&key, &sk, 0).map_err(|e| e as i32)?;
    all_drops_accounted(sk);
    Ok(())
}

/// `listener`'s `sk_drops`, when this kernel has the member.
#[inline(always)]
fn sk_drops(listener: u64) -> Option<u32> {
    let offset = cfg_field!(accept_queue.sock_drops);
    if offset == u32::MAX {
        return None;
    }
    member(listener, offset).ok()
}

/// Takes every drop of `listener` so far as accounted for.
#[inline(always)]
fn all_drops_accounted(listener: u64) {
    if let Some(drops) = sk_drops(listener) {
        let _ = LISTENER_DROPS.insert(&listener, &drops, 0);
    }
}

/// The final-ACK path just dropped for `listener`, adding `count` to its
/// `sk_drops`: account for exactly those. Not "all drops so far": a SYN
/// dropped on another CPU in between would be taken as accounted too, and
/// its own check would then find nothing left (the host counted 13 of 15
/// that way). A listener seen first now: everything so far.
#[inline(always)]
fn drops_accounted(listener: u64, count: u32) {
    match LISTENER_DROPS.get_ptr_mut(&listener) {
        // SAFETY: a live map value; see `take_one` for the race.
        Some(accounted) => unsafe { add_to(accounted, count) },
        None => all_drops_accounted(listener),
    }
}

/// Adds `count` to `*accounted` atomically (BPF's `lock xadd`, on every
/// kernel): both CPUs take drops of one listener at once. A plain read
/// and write lost one of two simultaneous takes (seen: 49 accounted of a
/// listener's 51 drops), and the count left behind was later taken by a
/// SYN the kernel had not dropped (netlens 56 overflows, nstat 55).
///
/// # Safety
/// `accounted` points to a live map value.
#[inline(always)]
unsafe fn add_to(accounted: *mut u32, count: u32) {
    // Rust has no atomic add for this target (no compare-and-swap), and
    // the fetching forms need 5.12+: the instruction itself.
    core::arch::asm!("lock *(u32 *)({ptr} + 0) += {value}", ptr = in(reg) accounted, value = in(reg) u64::from(count), options(nostack));
}

/// Whether the SYN `listener` just handled, with its accept queue full,
/// was dropped: `tcp_listendrop()` counted it in `sk_drops`, beyond what
/// was accounted for. Our test of the queue runs microseconds after the
/// kernel's, and a handshake completing on another CPU in between fills
/// the queue without this SYN being dropped: `sk_drops` tells. One drop
/// is taken per SYN, so that two CPUs dropping at once count two.
/// Without `sk_drops` (or a listener seen first now), the queue decides.
#[inline(always)]
fn syn_dropped(listener: u64) -> bool {
    match LISTENER_DROPS.get_ptr_mut(&listener) {
        // SAFETY: a live map value.
        Some(accounted) => unsafe { take_one(accounted, listener) },
        None => {
            all_drops_accounted(listener);
            true
        }
    }
}

/// Takes one of `listener`'s drops not yet accounted for, if there is one.
///
/// What was accounted is read *before* `sk_drops`. Read after, it can
/// include a take made meanwhile on another CPU for a drop newer than the
/// `sk_drops` read here: CPU 0 reads 36 drops (its own SYN's included),
/// CPU 1's SYN makes 37 and takes one (35 → 36), CPU 0 then finds 36
/// accounted of 36 and counts nothing. That lost one SYN in about ten
/// runs of a 51-overflow test with both CPUs busy (tracepoint hooks, both
/// builds). Read first, the accounted count can only be behind `sk_drops`.
/// The take itself re-reads it (another CPU's take in between is kept);
/// two takes of one drop at the very same instant remain possible, and
/// count one SYN twice.
///
/// # Safety
/// `accounted` points to a live map value.
#[inline(always)]
unsafe fn take_one(accounted: *mut u32, listener: u64) -> bool {
    let before = core::ptr::read_volatile(accounted);
    let Some(drops) = sk_drops(listener) else { return true };
    if (drops.wrapping_sub(before) as i32) <= 0 {
        return false;
    }
    add_to(accounted, 1);
    true
}

/// A listening socket closed.
#[inline(always)]
pub fn unlistening(sk: u64) -> Result<(), i32> {
    let key = listener_key(sk)?;
    // SAFETY: the value is copied out before the entry may be removed.
    if unsafe { LISTENERS.get(&key).copied() } == Some(sk) {
        let _ = LISTENERS.remove(&key);
    }
    Ok(())
}

/// The listener this CPU's last accept() found in [`LISTENERS`], and its
/// key. A server accepts on one listener nearly every time,
/// and the next accept on it skips the table lookup (about 70 ns per
/// connection in a perf profile of churn). Stale only where the table
/// evicted that listener (more than LISTENER_TABLE_ENTRIES listening);
/// it is put back once another listener's accept on this CPU replaces
/// this entry.
#[repr(C)]
#[derive(Clone, Copy)]
struct LastListener {
    /// Where the listener's address becomes a plain number: the accept
    /// paths hold it as a typed pointer, which BPF may not compare by
    /// arithmetic (see `mib::address_of`).
    scratch: u64,
    sk: u64,
    key: ListenerKey,
}

#[map]
static LAST_KNOWN_LISTENER: PerCpuArray<LastListener> = PerCpuArray::with_max_entries(1, 0);

/// Remembers a listener seen elsewhere (accept()), under `key`, if it is
/// new.
#[inline(always)]
pub fn known_listener(sk: u64, key: &ListenerKey) -> Result<(), i32> {
    let Some(last) = LAST_KNOWN_LISTENER.get_ptr_mut(0) else { return remember_listener(sk, key) };
    // SAFETY: this CPU's slot of a live map value; nothing else writes it
    // while we run.
    unsafe {
        let sk_number = mib::address_of(core::ptr::addr_of_mut!((*last).scratch), sk);
        if (*last).sk == sk_number && (*last).key == *key {
            return Ok(());
        }
        remember_listener(sk, key)?;
        (*last).sk = sk_number;
        (*last).key = *key;
    }
    Ok(())
}

#[inline(always)]
fn remember_listener(sk: u64, key: &ListenerKey) -> Result<(), i32> {
    // SAFETY: copied out at once.
    if unsafe { LISTENERS.get(key).copied() } != Some(sk) {
        LISTENERS.insert(key, &sk, 0).map_err(|e| e as i32)?;
        all_drops_accounted(sk);
    }
    Ok(())
}

/// The listener's accept queue: (connections queued, backlog). `TYPED`,
/// where the kernel has the cast kfunc: two plain loads (see
/// `kernel::cast`); else one probe read where the two counters are
/// adjacent (every kernel in the matrix).
#[inline(always)]
pub fn accept_queue<const TYPED: bool>(listener: u64) -> Result<(u32, u32), i32> {
    let (queued_at, backlog_at) = (cfg_field!(accept_queue.sock_ack_backlog), cfg_field!(accept_queue.sock_max_ack_backlog));
    let sock_type = cfg_field!(kernel.tcp_sock_btf_id);
    if TYPED && sock_type != 0 {
        // SAFETY: a listening TCP socket's address (a `struct tcp_sock`);
        // both are members of its `struct sock`. A load through a cast
        // pointer cannot fault: a bad one reads as zero.
        return Ok(unsafe {
            let sk = cast(listener, sock_type);
            (typed_member(sk, queued_at), typed_member(sk, backlog_at))
        });
    }
    if backlog_at == queued_at + 4 {
        let both: u64 = member(listener, cfg_field!(accept_queue.sock_ack_backlog))?;
        return Ok((both as u32, (both >> 32) as u32));
    }
    Ok((member(listener, cfg_field!(accept_queue.sock_ack_backlog))?, member(listener, cfg_field!(accept_queue.sock_max_ack_backlog))?))
}

/// The kernel's `sk_acceptq_is_full()`: `Some(backlog)` when full.
#[inline(always)]
fn accept_queue_full<const TYPED: bool>(listener: u64) -> Option<u32> {
    let (queued, backlog) = accept_queue::<TYPED>(listener).ok()?;
    (queued > backlog).then_some(backlog)
}

/// Counts one overflow of `listener`. Keyed by what the listener is, read
/// now (a few reads, on drops only), not by its address: a listener
/// opened where a closed one was must not inherit its entry.
#[inline(always)]
fn overflowed(listener: u64, backlog: u32, slot: u32) -> Result<(), i32> {
    let tuple = sock_tuple_in(listener, slot)?;
    let endpoint = ListenerEndpoint { netns: Probed(listener).netns(), family: tuple.family, port: tuple.sport, addr: tuple.saddr };
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(entry) = LISTEN_OVERFLOWS.get_ptr_mut(&endpoint) {
        // SAFETY: this CPU's slot of a live map value; nothing else writes
        // it while we run.
        let entry = unsafe { &mut *entry };
        entry.dropped += 1;
        entry.last_ns = now;
        entry.backlog = backlog;
        return Ok(());
    }
    let entry = ListenOverflow { dropped: 1, last_ns: now, backlog, _pad: 0 };
    if LISTEN_OVERFLOWS.insert(&endpoint, &entry, BPF_NOEXIST as u64).is_err() {
        // Another CPU created the entry meanwhile (our slot zeroed): count
        // in our slot.
        let slot = LISTEN_OVERFLOWS.get_ptr_mut(&endpoint).ok_or(-1)?;
        // SAFETY: this CPU's slot, as above.
        unsafe { *slot = entry };
    }
    Ok(())
}

/// Applies the kernel's test at the entry of a function that starts with
/// it (`tcp_conn_request`, `tcp_v4/v6_syn_recv_sock`).
#[inline(always)]
fn check_listener(listener: u64, program: u32) {
    if let Some(backlog) = accept_queue_full::<false>(listener) {
        counted(program, overflowed(listener, backlog, slot::SYN));
    }
}

/// [`synstart::syn_arrived`], its failure counted against `program`.
#[inline(always)]
fn syn_arrived(listener: u64, skb: u64, program: u32) {
    if synstart::syn_arrived(listener, skb) < 0 {
        count_error(program);
    }
}

/// `tcp_v6_syn_recv_sock` hands IPv4 (mapped) packets to
/// `tcp_v4_syn_recv_sock`, which does the test: count those once, there.
#[inline(always)]
fn is_ipv4(skb: u64) -> bool {
    member::<u16>(skb, cfg_field!(accept_queue.skb_protocol)) == Ok(ETH_P_IP.to_be())
}

// kprobes: the same, where fentry is not available.

#[kprobe]
pub fn kprobe_tcp_conn_request(ctx: ProbeContext) -> u32 {
    if let (Some(listener), Some(skb)) = (ctx.arg::<u64>(2), ctx.arg::<u64>(3)) {
        syn_arrived(listener, skb, program::KPROBE_TCP_CONN_REQUEST);
        check_listener(listener, program::KPROBE_TCP_CONN_REQUEST);
    }
    0
}

#[kprobe]
pub fn kprobe_tcp_v4_syn_recv_sock(ctx: ProbeContext) -> u32 {
    if let Some(listener) = ctx.arg(0) {
        check_listener(listener, program::KPROBE_TCP_V4_SYN_RECV_SOCK);
    }
    0
}

#[kprobe]
pub fn kprobe_tcp_v6_syn_recv_sock(ctx: ProbeContext) -> u32 {
    if let (Some(listener), Some(skb)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        if !is_ipv4(skb) {
            check_listener(listener, program::KPROBE_TCP_V6_SYN_RECV_SOCK);
        }
    }
    0
}
