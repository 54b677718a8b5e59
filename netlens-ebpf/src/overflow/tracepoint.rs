//! Listen overflows and drop reasons where only tracepoints exist (this
//! host's kind: no kprobes, fentry refused): `skb:kfree_skb` for the final
//! ACK and for every TCP packet's drop reason, `skb:consume_skb` for the
//! SYN. The top of `overflow/mod.rs` has how, and the limits.

use aya_ebpf::{
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::{Array, PerCpuArray},
    programs::{BtfTracePointContext, RawTracePointContext},
    EbpfContext,
};
use netlens_common::{code_range, mode, program, ListenerKey, DROP_REASONS};

use super::{accept_queue, accept_queue_full, drops_accounted, mib, overflowed, syn_dropped, ETH_P_IP, LISTENERS};
use crate::{
    config::cfg_field,
    events::counted,
    kernel::{cast, member, slot, typed_member},
};

const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_LISTEN: u8 = 10;
const TCP_FLAG_SYN: u8 = 0x02;

/// Packets freed by `kfree_skb`, per CPU, by `enum skb_drop_reason` value.
#[map]
static DROP_REASON_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_REASONS, 0);

/// Bits of `netlens_common::mode`, written by userspace as it attaches.
#[map]
static MODES: Array<u32> = Array::with_max_entries(1, 0);

/// Whether userspace set `bit` of `netlens_common::mode`.
#[inline(always)]
pub fn mode_on(bit: u32) -> bool {
    MODES.get(0).copied().unwrap_or(0) & bit != 0
}

/// `[start, end)` of the functions in `netlens_common::code_range`, written
/// by userspace before these programs attach.
#[map]
static CODE_RANGES: Array<[u64; 2]> = Array::with_max_entries(code_range::COUNT, 0);

/// Whether `location` is inside function `index` of `code_range`.
#[inline(always)]
fn called_from(index: u32, location: u64) -> bool {
    match CODE_RANGES.get(index) {
        Some(&[start, end]) => location >= start && location < end,
        None => false,
    }
}

/// A raw tracepoint argument at a position known only at load time. Read
/// through the helper, not as a context access: the verifier wants those
/// at constant offsets, and the kernel refuses to attach a program that
/// reads past the tracepoint's last argument (fewer on older kernels).
#[inline(always)]
fn raw_arg(ctx: &RawTracePointContext, position: u8) -> Option<u64> {
    if position > 4 {
        return None;
    }
    member::<u64>(ctx.as_ptr() as u64, position as u32 * 8).ok()
}

/// Whether `skb` carries TCP over IPv4, or over IPv6 without extension
/// headers (the protocol byte of its IP header).
#[inline(always)]
fn is_tcp_skb(skb: u64) -> bool {
    let (Ok(head), Ok(network), Ok(protocol)) = (
        member::<u64>(skb, cfg_field!(accept_queue.skb_head)),
        member::<u16>(skb, cfg_field!(accept_queue.skb_network_header)),
        member::<u16>(skb, cfg_field!(accept_queue.skb_protocol)),
    ) else {
        return false;
    };
    let ip = head + network as u64;
    let next = if protocol == ETH_P_IP.to_be() {
        member::<u8>(ip, 9)
    } else if protocol == ETH_P_IPV6.to_be() {
        member::<u8>(ip, 6)
    } else {
        return false;
    };
    next == Ok(IPPROTO_TCP)
}

/// Every freed packet passes here: count its reason, and leave unless it
/// is a listen overflow.
#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn kfree_skb(ctx: RawTracePointContext) -> i32 {
    let Some(reason) = raw_arg(&ctx, cfg_field!(accept_queue.kfree_skb_reason_arg)) else { return 0 };
    let reason = reason as u32;
    // Counted as TCP drops (netlens_tcp_drops_total): other protocols'
    // drops pass this tracepoint too.
    if reason < DROP_REASONS && is_tcp_skb(ctx.arg(0)) {
        if let Some(count) = DROP_REASON_COUNTS.get_ptr_mut(reason) {
            // SAFETY: this CPU's slot; nothing else writes it while we run.
            unsafe { *count += 1 };
        }
    }
    if reason == cfg_field!(accept_queue.listen_overflow_reason) {
        counted(program::KFREE_SKB, final_ack_overflow(&ctx, false));
    } else if reason == cfg_field!(accept_queue.no_socket_reason) {
        let Some(location) = raw_arg(&ctx, cfg_field!(accept_queue.kfree_skb_location_arg)) else { return 0 };
        let in_cookie_check = called_from(code_range::COOKIE_V4, location) || called_from(code_range::COOKIE_V6, location);
        if in_cookie_check {
            counted(program::KFREE_SKB, final_ack_overflow(&ctx, true));
        }
    }
    0
}

/// The final ACK found the queue full: `syn_recv_sock` failed in
/// `tcp_check_req` (reason TCP_LISTEN_OVERFLOW), or in `cookie_v4/v6_check`
/// for an ACK carrying a SYN cookie (reason NO_SOCKET, which other
/// failures there share). Whether it overflowed: the kernel's own counter
/// (mib.rs), else the reason alone, and for a cookie (`test_queue`) the
/// kernel's test of the queue applied again. `rx_sk` is the listener.
/// Counted only when the tracepoint hooks serve listen overflows (else
/// fentry/kprobes do).
#[inline(never)]
fn final_ack_overflow(ctx: &RawTracePointContext, test_queue: bool) -> Result<(), i32> {
    if !mode_on(mode::OVERFLOWS_FROM_TRACEPOINTS) {
        return Ok(());
    }
    let listener = raw_arg(ctx, cfg_field!(accept_queue.kfree_skb_rx_sk_arg)).ok_or(-1)?;
    // No receiving socket: a drop for another reason, not one to count.
    if listener == 0 {
        return Ok(());
    }
    let net: u64 = member(listener, cfg_field!(kernel.sock_net))?;
    let netns: u32 = member(net, cfg_field!(kernel.net_inum))?;
    let backlog = match mib::overflows_since_last_look::<false>(net, netns) {
        // The kernel counted no overflow on this CPU since the last packet
        // we looked at: the child could not be made for another reason (a
        // TCP_LISTEN_OVERFLOW free without an overflow behind it was seen
        // about once in 25 runs of a 51-overflow test), or the cookie
        // check failed otherwise.
        0 => return Ok(()),
        // Its counter unknown here. The cookie check's NO_SOCKET has other
        // causes: the kernel's test of the queue, applied again.
        mib::UNKNOWN if test_queue => {
            let Some(backlog) = accept_queue_full::<false>(listener) else { return Ok(()) };
            backlog
        }
        _ => member(listener, cfg_field!(accept_queue.sock_max_ack_backlog))?,
    };
    // This path adds to `sk_drops` too: tcp_listendrop() when
    // syn_recv_sock fails, and, from tcp_v4/v6_rcv, the discard of the
    // segment (one; a GRO-merged final ACK would add more, then counted
    // as drops not yet accounted). The cookie check frees it itself.
    drops_accounted(listener, if test_queue { 1 } else { 2 });
    overflowed(listener, backlog, slot::DROP)
}

/// Every consumed packet passes here; only SYNs consumed by
/// `tcp_rcv_state_process()` (the listener's `conn_request` has run) go on.
#[raw_tracepoint(tracepoint = "consume_skb")]
pub fn consume_skb(ctx: RawTracePointContext) -> i32 {
    let Some(location) = raw_arg(&ctx, cfg_field!(accept_queue.consume_skb_location_arg)) else { return 0 };
    if !called_from(code_range::SYN_CONSUMER, location) {
        return 0;
    }
    let skb: u64 = ctx.arg(0);
    let headers = member(skb, cfg_field!(accept_queue.skb_head)).and_then(|head| {
        Ok(SkbHeaders {
            head,
            transport: member(skb, cfg_field!(accept_queue.skb_transport_header))?,
            refdst: member(skb, cfg_field!(accept_queue.skb_refdst))?,
        })
    });
    counted(program::CONSUME_SKB, headers.and_then(syn_consumed::<false>));
    0
}

/// The same tracepoint with BTF-typed arguments: its location is a plain
/// context load instead of a helper call on each of the many packets that
/// pass, and the skb's members are plain loads. Offered only where the
/// location follows the skb (6.2+; see optional.rs), the only place this
/// build reads it.
#[btf_tracepoint(function = "consume_skb")]
pub fn consume_skb_btf(ctx: BtfTracePointContext) -> i32 {
    let location: u64 = ctx.arg(1);
    if !called_from(code_range::SYN_CONSUMER, location) {
        return 0;
    }
    let skb: u64 = ctx.arg(0);
    let (head_at, transport_at) = (cfg_field!(accept_queue.skb_head), cfg_field!(accept_queue.skb_transport_header));
    let refdst_at = cfg_field!(accept_queue.skb_refdst);
    // SAFETY: a BTF tracepoint's `struct sk_buff *` argument; the offsets
    // are its members' (checked at load time).
    let headers = unsafe {
        SkbHeaders {
            head: typed_member(skb, head_at),
            transport: typed_member(skb, transport_at),
            refdst: typed_member(skb, refdst_at),
        }
    };
    counted(program::CONSUME_SKB_BTF, syn_consumed::<true>(headers));
    0
}

/// The namespace of `dst`'s device (`dst->dev->nd_net`): its `struct net`
/// and inode number.
#[inline(always)]
fn route_net<const TYPED: bool>(dst: u64) -> Result<(u64, u32), i32> {
    let (dev_at, net_at, inum_at) = (cfg_field!(accept_queue.dst_dev), cfg_field!(kernel.netdev_net), cfg_field!(kernel.net_inum));
    let dst_type = cfg_field!(accept_queue.dst_entry_btf_id);
    if TYPED && dst_type != 0 {
        // SAFETY: the skb's input route; each pointer loaded is typed by
        // BTF after it, and each offset a member of its struct.
        return Ok(unsafe {
            let dev: u64 = typed_member(cast(dst, dst_type), dev_at);
            let net: u64 = typed_member(dev, net_at);
            (net, typed_member(net, inum_at))
        });
    }
    let dev: u64 = member(dst, dev_at)?;
    let net: u64 = member(dev, net_at)?;
    Ok((net, member(net, inum_at)?))
}

/// What the SYN path reads of a consumed skb.
#[derive(Clone, Copy)]
struct SkbHeaders {
    head: u64,
    transport: u16,
    /// `_skb_refdst`: the input route, tagged in bit 0.
    refdst: u64,
}

/// The destination port of the TCP header at `th`, `None` when it is not
/// a SYN. `TYPED`, where the kernel has the cast kfunc: two plain loads
/// through a `struct tcphdr` cast (the flags byte, 13, is whole bitfields:
/// fin to cwr); else one copy of the header's first 16 bytes.
#[inline(always)]
fn syn_dport<const TYPED: bool>(th: u64) -> Result<Option<u16>, i32> {
    let tcphdr_type = cfg_field!(accept_queue.tcphdr_btf_id);
    let (flags, dport) = if TYPED && tcphdr_type != 0 {
        // SAFETY: the skb's transport header; a load through a cast
        // pointer cannot fault (a bad one reads as zero).
        unsafe {
            let th = cast(th, tcphdr_type);
            (typed_member::<u8>(th, 13), typed_member::<u16>(th, 2))
        }
    } else {
        // struct tcphdr: ports at 0 and 2, flags in byte 13; one copy.
        let bytes: [u8; 16] = member(th, 0)?;
        (bytes[13], u16::from_le_bytes([bytes[2], bytes[3]]))
    };
    Ok((flags & TCP_FLAG_SYN != 0).then(|| u16::from_be(dport)))
}

/// `TYPED`: where the kernel has the cast kfunc, the route's device and
/// namespace and the listener's state are plain loads through casts (see
/// `kernel::cast`), not probe reads.
#[inline(never)]
fn syn_consumed<const TYPED: bool>(skb: SkbHeaders) -> Result<(), i32> {
    let Some(dport) = syn_dport::<TYPED>(skb.head + skb.transport as u64)? else { return Ok(()) };
    // tcp_v4_rcv() cleared skb->dev; the input route still names it.
    let (net, netns) = route_net::<TYPED>(skb.refdst & !1)?;
    // Looked at for every SYN, the listener known or not, so that the
    // growth found at the next packet is that packet's own.
    let overflows = mib::overflows_since_last_look::<TYPED>(net, netns);
    // No overflow on this CPU since the last packet (nearly every SYN):
    // no listener to find, a table lookup (~70 ns) fewer per connection.
    if overflows == 0 {
        return Ok(());
    }
    let key = ListenerKey { netns, port: dport, _pad: 0 };
    // SAFETY: copied out at once.
    let Some(listener) = (unsafe { LISTENERS.get(&key).copied() }) else { return Ok(()) };
    let (sock_type, state_at) = (cfg_field!(kernel.tcp_sock_btf_id), cfg_field!(accept_queue.sock_state));
    let state: u8 = if TYPED && sock_type != 0 {
        // SAFETY: a listening TCP socket's address (overflow.rs's table;
        // one closed since reads what its memory holds, never faults).
        unsafe { typed_member(cast(listener, sock_type), state_at) }
    } else {
        member(listener, state_at)?
    };
    if state != TCP_LISTEN {
        return Ok(());
    }
    match overflows {
        // Its counter unknown here: the queue, and the listener's drops.
        mib::UNKNOWN => {
            if let Some(backlog) = accept_queue_full::<TYPED>(listener) {
                if syn_dropped(listener) {
                    overflowed(listener, backlog, slot::SYN)?;
                }
            }
            Ok(())
        }
        // The kernel counted an overflow on this CPU since the last packet
        // we looked at: this SYN's (one per SYN, even if the count grew by
        // more, which only a packet we did not see can add).
        _ => {
            drops_accounted(listener, 1);
            let (_, backlog) = accept_queue::<TYPED>(listener)?;
            overflowed(listener, backlog, slot::SYN)
        }
    }
}
