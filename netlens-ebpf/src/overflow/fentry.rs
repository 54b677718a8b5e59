//! Listen overflows where fentry/fexit exist (see the top of mod.rs): the
//! kernel's own count of overflows on this CPU, read as `tcp_conn_request`
//! and `tcp_v4/v6_syn_recv_sock` start and again as they return. The
//! functions' arguments are typed by BTF.

use aya_ebpf::{
    macros::{fentry, fexit, map},
    maps::PerCpuArray,
    programs::{FEntryContext, FExitContext},
};
use netlens_common::program;

use super::{accept_queue_full, is_ipv4, mib, overflowed, sk_drops, syn_arrived};
use crate::{
    config::cfg_field,
    events::counted,
    kernel::{fexit_return, member, slot, typed_member},
};

/// What `fentry_tcp_conn_request` saw, for its fexit on the same CPU.
#[repr(C)]
#[derive(Clone, Copy)]
struct SynAtEntry {
    skb: u64,
    /// The kernel's count of listen overflows on this CPU in the
    /// listener's namespace (mib.rs; [`mib::UNKNOWN`] where unreadable).
    overflows: u64,
    /// The listener's `sk_drops` (0 on kernels without it, where the fexit
    /// does not read it either).
    drops: u32,
    /// Whether the accept queue was full.
    full: u8,
    _pad: [u8; 3],
}

/// One slot per CPU: `tcp_conn_request` runs in softirq, or in process
/// context (a listener's backlog) where a softirq can nest on the same CPU
/// or the task migrate; the fexit checks the slot is its SYN's.
#[map]
static SYN_AT_ENTRY: PerCpuArray<SynAtEntry> = PerCpuArray::with_max_entries(1, 0);

#[fentry(function = "tcp_conn_request")]
pub fn fentry_tcp_conn_request(ctx: FEntryContext) -> i32 {
    let (listener, skb) = (ctx.arg(2), ctx.arg(3));
    syn_arrived(listener, skb, program::FENTRY_TCP_CONN_REQUEST);
    if let Some(seen) = SYN_AT_ENTRY.get_ptr_mut(0) {
        let entry = SynAtEntry {
            skb,
            overflows: mib::listen_overflows_now::<true>(typed_namespace(listener).0),
            drops: sk_drops(listener).unwrap_or(0),
            full: accept_queue_full::<false>(listener).is_some() as u8,
            _pad: [0; 3],
        };
        // SAFETY: this CPU's slot; nothing else writes it while we run.
        unsafe { *seen = entry };
    }
    0
}

/// Whether `tcp_conn_request` dropped its SYN for a full accept queue:
/// the kernel's count of overflows on this CPU grew while it ran (mib.rs;
/// the function runs on one CPU, softirqs do not nest, and a slot that
/// is not this SYN's is not compared). Where that count cannot be read:
/// the listener's `sk_drops` grew while the function ran (its drop path,
/// `tcp_listendrop()`, adds one), and the queue was full at entry or is at
/// exit. The kernel tests the queue after our entry: another CPU queueing
/// a child in between fills it (the 6.1 guest counted 15 of 16 when we
/// tested at entry). Without `sk_drops`, or when the slot is not this
/// SYN's (nested or migrated), one test of the queue decides.
#[fexit(function = "tcp_conn_request")]
pub fn fexit_tcp_conn_request(ctx: FExitContext) -> i32 {
    let (listener, skb): (u64, u64) = (ctx.arg(2), ctx.arg(3));
    // SAFETY: copied out at once.
    let seen = SYN_AT_ENTRY.get(0).copied().filter(|seen| seen.skb == skb);
    // Also keeps this CPU's last look current, for the final ACK's fexit.
    let (net, netns) = typed_namespace(listener);
    let now = mib::look::<true>(net, netns).count;
    let dropped = match (seen, sk_drops(listener)) {
        (Some(seen), _) if seen.overflows != mib::UNKNOWN && now != mib::UNKNOWN => now != seen.overflows,
        (Some(seen), Some(drops)) => {
            let full_now = accept_queue_full::<false>(listener).is_some();
            (drops.wrapping_sub(seen.drops) as i32) > 0 && (seen.full != 0 || full_now)
        }
        (Some(seen), _) => seen.full != 0,
        (None, _) => accept_queue_full::<false>(listener).is_some(),
    };
    if dropped {
        dropped_now(listener, program::FEXIT_TCP_CONN_REQUEST);
    }
    0
}

/// The namespace of `sk`, a socket typed by BTF (an fentry or fexit
/// argument): its `struct net` and inode number, by plain loads.
#[inline(always)]
fn typed_namespace(sk: u64) -> (u64, u32) {
    // SAFETY: `sk` is a BTF-typed `struct sock *`; both offsets are
    // members (of it, and of the `struct net` loaded).
    unsafe {
        let net: u64 = typed_member(sk, cfg_field!(kernel.sock_net));
        (net, typed_member(net, cfg_field!(kernel.net_inum)))
    }
}

/// What a `tcp_v4/v6_syn_recv_sock` fentry saw, for its fexit.
#[repr(C)]
#[derive(Clone, Copy)]
struct AckAtEntry {
    skb: u64,
    /// The kernel's count of listen overflows on this CPU in the
    /// listener's namespace ([`mib::UNKNOWN`] where unreadable).
    overflows: u64,
}

/// One slot per CPU, as [`SYN_AT_ENTRY`]: the fexit checks it is its
/// packet's (an IPv4-mapped ACK passes the v6 fentry, then the v4 one,
/// with the same packet: the v4 pair compares).
#[map]
static ACK_AT_ENTRY: PerCpuArray<AckAtEntry> = PerCpuArray::with_max_entries(1, 0);

/// Keeps the count as a final ACK starts making its child.
#[inline(always)]
fn final_ack_arrived(listener: u64, skb: u64) {
    if let Some(seen) = ACK_AT_ENTRY.get_ptr_mut(0) {
        let entry = AckAtEntry { skb, overflows: mib::listen_overflows_now::<true>(typed_namespace(listener).0) };
        // SAFETY: this CPU's slot; nothing else writes it while we run.
        unsafe { *seen = entry };
    }
}

/// Whether a `tcp_v4/v6_syn_recv_sock` that returned no child overflowed:
/// the kernel's count on this CPU grew while it ran. Its other failures
/// (no memory for the child, no route, a port it cannot inherit, and a
/// SYN-cookie ACK whose connection exists already) do not count. Without
/// the fentry's count (nested, or unreadable): the count grew since the
/// last look at the namespace on this CPU, and where that is unknown too
/// (no SYN of the namespace seen on this CPU yet), every failure counts.
/// That last fallback, then the only test, counted one failure too many
/// in about one run in seven of the 6.1 guest's final-ACK test (24 for
/// nstat's 23, with a failed SYN cookie).
#[inline(always)]
fn final_ack_overflowed(listener: u64, skb: u64) -> bool {
    // SAFETY: copied out at once.
    let seen = ACK_AT_ENTRY.get(0).copied().filter(|seen| seen.skb == skb);
    let (net, netns) = typed_namespace(listener);
    // Also keeps this CPU's last look current.
    let look = mib::look::<true>(net, netns);
    match seen {
        Some(seen) if seen.overflows != mib::UNKNOWN && look.count != mib::UNKNOWN => look.count != seen.overflows,
        _ => look.grown != 0,
    }
}

/// An fexit found that `listener` dropped a connection (a SYN, or a
/// completed handshake when `tcp_v4/v6_syn_recv_sock` returned no child).
/// The backlog reported is the listener's, read now.
#[inline(always)]
fn dropped_now(listener: u64, program: u32) {
    let backlog: u32 = member(listener, cfg_field!(accept_queue.sock_max_ack_backlog)).unwrap_or(0);
    counted(program, overflowed(listener, backlog, slot::SYN));
}

/// The child socket `tcp_v4/v6_syn_recv_sock` returned (after 6
/// parameters, or 7 with `opt_child_init`: see [`fexit_return`]).
#[inline(always)]
fn returned_child(ctx: &FExitContext) -> Option<u64> {
    fexit_return::<6>(ctx, cfg_field!(accept_queue.syn_recv_sock_args))
}

#[fentry(function = "tcp_v4_syn_recv_sock")]
pub fn fentry_tcp_v4_syn_recv_sock(ctx: FEntryContext) -> i32 {
    final_ack_arrived(ctx.arg(0), ctx.arg(1));
    0
}

#[fentry(function = "tcp_v6_syn_recv_sock")]
pub fn fentry_tcp_v6_syn_recv_sock(ctx: FEntryContext) -> i32 {
    final_ack_arrived(ctx.arg(0), ctx.arg(1));
    0
}

#[fexit(function = "tcp_v4_syn_recv_sock")]
pub fn fexit_tcp_v4_syn_recv_sock(ctx: FExitContext) -> i32 {
    if returned_child(&ctx) == Some(0) && final_ack_overflowed(ctx.arg(0), ctx.arg(1)) {
        dropped_now(ctx.arg(0), program::FEXIT_TCP_V4_SYN_RECV_SOCK);
    }
    0
}

#[fexit(function = "tcp_v6_syn_recv_sock")]
pub fn fexit_tcp_v6_syn_recv_sock(ctx: FExitContext) -> i32 {
    if returned_child(&ctx) == Some(0) && !is_ipv4(ctx.arg(1)) && final_ack_overflowed(ctx.arg(0), ctx.arg(1)) {
        dropped_now(ctx.arg(0), program::FEXIT_TCP_V6_SYN_RECV_SOCK);
    }
    0
}

