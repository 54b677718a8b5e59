//! Per-packet work, in the kernel: `tcp:tcp_probe` runs for every segment
//! an established socket receives. It updates the flow's congestion window
//! and RTTs (on the sender, from ACKs), its zero-window episodes, its
//! congestion state where the kernel has no tracepoint for it, and its
//! head-of-line stalls (on the receiver). Only episode events leave.
//!
//! Head-of-line stall, receiver side. tcp_probe fires before the segment
//! is processed, so `rcv_nxt` is the next byte the application can read and
//! `TCP_SKB_CB(skb)->seq` where this segment starts. A segment starting
//! after `rcv_nxt` is exactly one the kernel queues out of order (it counts
//! it in TcpExtTCPOFOQueue): data received but undeliverable. The first one
//! starts a stall; the stall ends when `rcv_nxt` passes the highest
//! out-of-order end seen. Where the stall ends is found, best first:
//! - `sock:sk_data_ready` (raw; 6.6+), or an fentry/kprobe on
//!   `tcp_data_ready` (older kernels): the kernel calls it right after it
//!   moved in-order data, the drained queue included, to the application;
//! - without either, here: an in-order data segment during a stall may be
//!   the one that fills the hole, so its arrival time is kept; when the next
//!   segment (or the close) shows `rcv_nxt` past the held data, the stall
//!   ended at that arrival. Same durations, reported one segment later.
//! Limits: a stall that began before netlens attached starts at the first
//! out-of-order segment we see; one still undrained at close is not reported
//! as a `hol_stall` (its segments are in the close's `ooo_segments`);
//! tcp_probe sees a segment before the kernel validates it. One after
//! `rcv_nxt` with an old timestamp, which the kernel will drop by PAWS
//! (TcpExtPAWSEstab), is recognised and left out (`rejected_by_paws`); one
//! it drops for another reason (beyond the receive window, no memory for
//! it: TcpExtTCPOFODrop) is counted anyway.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel_buf},
    macros::{btf_tracepoint, fentry, kprobe, map, raw_tracepoint},
    maps::PerCpuArray,
    programs::{BtfTracePointContext, FEntryContext, ProbeContext, RawTracePointContext},
};
use netlens_common::{
    kind, log2_bucket_from,
    paws::{self, Recent, TcpHeader, TCP_HEADER_MAX},
    program, Flow, PacketHistograms, NEVER,
};

use crate::{
    config::cfg_field,
    dynamics::{ca_state_changes, ca_state_of, ca_state_seen, exit_slow_start, socket_clock_ns, zero_windows},
    events::{counted, emit, stamp},
    flows,
    kernel::{member, typed_member, window_slot, Clock, Tuple},
    sock::{Handed, Probed, Sock, SockRef, Typed},
};

/// `a` comes after `b` in sequence space (the kernel's after()).
#[inline(always)]
fn after(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) < 0
}

/// Per-segment srtt and cwnd distributions (one slot, per CPU: no atomics).
#[map]
static PACKET_HISTOGRAMS: PerCpuArray<PacketHistograms> = PerCpuArray::with_max_entries(1, 0);

/// Counts one segment in this CPU's distributions. Each value's bucket is
/// checked against the flow's last one first (it rarely moves). Each is
/// found right before its count: the verifier walks each of the 32 ways
/// through `log2_bucket` to its count, and two buckets found first made
/// it walk their 32 × 32 combinations (tcp_probe verified in 25-35 ms,
/// 50-80 with the cached buckets, instead of 4-6).
#[inline(always)]
fn count_segment(flow: &mut Flow, srtt_us: u32, cwnd: u32) {
    if let Some(histograms) = PACKET_HISTOGRAMS.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; nothing else writes it while we run.
        let histograms = unsafe { &mut *histograms };
        if let Some(bucket) = histograms.srtt_us.get_mut(log2_bucket_from(srtt_us, &mut flow.srtt_bucket)) {
            *bucket += 1;
        }
        if let Some(bucket) = histograms.cwnd.get_mut(log2_bucket_from(cwnd, &mut flow.cwnd_bucket)) {
            *bucket += 1;
        }
    }
}

/// The socket of the last segment tcp_probe saw on this CPU, and whether
/// its flow had a stall open once the segment was looked at. The kernel
/// calls the data-ready hook for a segment right after tcp_probe for it,
/// on the same CPU: a socket found here with no stall open has none to
/// end, and the data-ready program skips its flow lookup (nearly every
/// call; a stall begins only in tcp_probe, which rewrites this first).
/// Anything else here (another socket's segment in between, the rare
/// migration of a process-context receive between the two hooks) only
/// costs the lookup, or at worst leaves the stall to end at the next
/// segment, as without a data-ready hook.
#[repr(C)]
#[derive(Clone, Copy)]
struct LastSegment {
    sk: u64,
    stall_open: u64,
}

#[map]
static LAST_SEGMENT: PerCpuArray<LastSegment> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn remember_segment(sk: u64, flow: Option<&Flow>) {
    if let Some(last) = LAST_SEGMENT.get_ptr_mut(0) {
        let stall_open = flow.is_some_and(|flow| flow.hol_start_ns != 0);
        // SAFETY: this CPU's slot; nothing else writes it while we run.
        unsafe { *last = LastSegment { sk, stall_open: u64::from(stall_open) } };
    }
}

/// Whether tcp_probe saw `sk`'s latest segment on this CPU and left no
/// stall open (see [`LAST_SEGMENT`]).
#[inline(always)]
fn no_stall_open(sk: u64) -> bool {
    LAST_SEGMENT.get(0).is_some_and(|last| last.sk == sk && last.stall_open == 0)
}

/// The fallback where the kernel refuses the BTF tracepoint below.
#[raw_tracepoint(tracepoint = "tcp_probe")]
pub fn tcp_probe(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    // Connections we do not track (opened before we attached) cost one
    // lookup and nothing else.
    let mut flow = flows::lookup_mut(Probed(sk));
    if let Some(flow) = flow.as_deref_mut() {
        let skb: u64 = ctx.arg(1);
        let result = segment_seqs(skb).and_then(|seqs| on_segment(flow, Probed(sk), skb, seqs));
        counted(program::TCP_PROBE, result);
    }
    remember_segment(sk, flow.as_deref());
    0
}

/// The same tracepoint with BTF-typed arguments: the socket's members are
/// plain loads (see sock.rs) instead of copies of its windows.
#[btf_tracepoint(function = "tcp_probe")]
pub fn tcp_probe_btf(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    // The flow by the socket as handed; the cast only for tracked ones.
    let mut flow = flows::lookup_mut(Handed(sk));
    if let Some(flow) = flow.as_deref_mut() {
        let skb: u64 = ctx.arg(1);
        let result = Typed::of_tcp(sk).ok_or(-1).and_then(|tp| on_segment(flow, tp, skb, segment_seqs_typed(skb)));
        counted(program::TCP_PROBE_BTF, result);
    }
    remember_segment(sk, flow.as_deref());
    0
}

/// The segment's `seq` and `end_seq` (adjacent in its control block,
/// `TCP_SKB_CB(skb)`), as one number: seq in the low half.
#[inline(always)]
fn segment_seqs(skb: u64) -> Result<u64, i32> {
    member(skb, cfg_field!(kernel.skb_cb) + cfg_field!(kernel.tcb_seq))
}

/// The same from a BTF-typed `struct sk_buff *`: a plain load instead of a
/// helper call, once per segment.
#[inline(always)]
pub fn segment_seqs_typed(skb: u64) -> u64 {
    let at = cfg_field!(kernel.skb_cb) + cfg_field!(kernel.tcb_seq);
    // SAFETY: a BTF tracepoint's skb argument; the load lies inside
    // `sk_buff.cb`, a char array the verifier lets programs read as
    // scratch space.
    unsafe { typed_member(skb, at) }
}

/// `skb` is typed where `S` is.
#[inline(always)]
fn on_segment<S: Sock>(flow: &mut Flow, sk: S, skb: u64, seqs: u64) -> Result<(), i32> {
    // Read only for a segment that starts or ends an episode.
    let mut clock = Clock::default();
    let tp = sk.tcp_now(window_slot::PROBE)?;
    let (seq, end_seq) = (seqs as u32, (seqs >> 32) as u32);

    // Sender side: the window and RTTs as of this ACK.
    let cwnd = tp.snd_cwnd;
    let ssthresh = tp.snd_ssthresh;
    let transport = &mut flow.transport;
    transport.cwnd = cwnd;
    transport.max_cwnd = transport.max_cwnd.max(cwnd);
    transport.ssthresh = ssthresh;
    transport.srtt_us = tp.srtt_us >> 3;
    transport.min_rtt_us = tp.min_rtt_us;
    count_segment(flow, tp.srtt_us >> 3, cwnd);
    // BBR keeps ssthresh infinite: it leaves slow start on loss only.
    if cwnd >= ssthresh && flow.transport.slow_start_exit_ns == NEVER {
        exit_slow_start(flow, clock.now(), cwnd);
    }
    // A no-op where tcp:tcp_cong_state_set already reported the change.
    if let Some(state) = ca_state_of(tp.ca_state_byte) {
        if ca_state_changes(flow, state) {
            ca_state_seen(flow, sk, state, clock.now());
        }
    }

    let socket_clock = socket_clock_ns(sk, &mut clock);
    zero_windows(flow, tp.snd_wnd, tp.rcv_wnd, socket_clock, &mut clock);

    // Receiver side: data beyond rcv_nxt is held out of order.
    let rcv_nxt = tp.rcv_nxt;
    let has_data = end_seq != seq;
    if flow.hol_start_ns != 0 {
        if !after(flow.hol_max_end, rcv_nxt) {
            // Drained since the last segment, and no data-ready hook ended it.
            end_stall(flow, drained_by(flow, clock.now()));
        } else if has_data && !after(seq, rcv_nxt) {
            flow.hol_inorder_ns = clock.now();
        }
    }
    if has_data && after(seq, rcv_nxt) && !rejected_by_paws(sk, skb, clock.now()) {
        flow.transport.ooo_segments += 1;
        if flow.hol_start_ns == 0 {
            let now = clock.now();
            flow.hol_start_ns = now;
            flow.hol_inorder_ns = now;
            flow.hol_rcv_nxt = rcv_nxt;
            flow.hol_max_end = end_seq;
            flow.hol_ooo_segments = 1;
        } else {
            flow.hol_ooo_segments += 1;
            if after(end_seq, flow.hol_max_end) {
                flow.hol_max_end = end_seq;
            }
        }
    }
    Ok(())
}

/// This CPU's copy of the TCP header of the segment [`rejected_by_paws`]
/// looks at (more than the programs' stack can spare).
#[map]
static TCP_HEADER: PerCpuArray<TcpHeader> = PerCpuArray::with_max_entries(1, 0);

/// Whether the kernel will drop this data segment by PAWS instead of
/// queuing it (see `netlens_common::paws`): its timestamp is older than the
/// socket's last in-order one. Only a segment beyond `rcv_nxt` asks (the
/// rare path), and its own BPF function: two loads from the socket and,
/// once the socket has a timestamp to compare with, one copy of the
/// header. `skb` is typed where `S` is.
#[inline(never)]
fn rejected_by_paws<S: Sock>(sk: S, skb: u64, now_ns: u64) -> bool {
    let stamp_at = cfg_field!(kernel.tcp_ts_recent_stamp);
    if stamp_at == 0 {
        return false;
    }
    let (Ok(stamp_s), Ok(tsval)) = (sk.get::<i32>(stamp_at), sk.get::<u32>(stamp_at + 4)) else { return false };
    if tsval == 0 {
        return false;
    }
    // `data`, a pointer member (loaded as a number), is the TCP header in
    // tcp_rcv_established. The skb is read as the socket is: probed, or
    // by a plain load where both are BTF-typed.
    let Ok(header_at) = sk.follow::<u64>(skb, cfg_field!(kernel.skb_data)) else { return false };
    let Some(header) = TCP_HEADER.get_ptr_mut(0) else { return false };
    // SAFETY: this CPU's slot, nothing else writes it while we run; the
    // helper validates the source. 60 bytes from the TCP header stay in
    // the skb's head buffer (its shared info follows the data).
    let header = unsafe { &mut *header };
    if unsafe { bpf_probe_read_kernel_buf(header_at as *const u8, &mut header[..TCP_HEADER_MAX]) }.is_err() {
        return false;
    }
    let now_s = (now_ns / 1_000_000_000) as u32;
    paws::rejects(header, Recent { tsval, stamp_s }, now_s, cfg_field!(kernel.paws_wrap_s))
}

/// When a stall found drained at `seen_ns` ended, without a data-ready
/// hook: at the last in-order data segment's arrival, which filled the
/// hole. Where no such segment was seen since the stall began (the kernel
/// skipped the program run for it, counted as `events missed`), at
/// `seen_ns`: one segment late, instead of a stall of zero.
#[inline(always)]
fn drained_by(flow: &Flow, seen_ns: u64) -> u64 {
    if flow.hol_inorder_ns > flow.hol_start_ns { flow.hol_inorder_ns } else { seen_ns }
}

/// Reports the flow's stall as over at `end_ns`; returns its length.
#[inline(always)]
fn report_stall(flow: &Flow, end_ns: u64) -> u64 {
    let stall_ns = end_ns.saturating_sub(flow.hol_start_ns);
    let bytes_held = flow.hol_max_end.wrapping_sub(flow.hol_rcv_nxt);
    let ooo_segments = flow.hol_ooo_segments;
    if let Some(tuple) = Tuple::of(flow) {
        emit(|event| {
            stamp(event, kind::HOL_STALL, end_ns, &tuple, flow);
            event.duration_ns = stall_ns;
            event.bytes_received = u64::from(bytes_held);
            event.segs = ooo_segments;
        });
    }
    stall_ns
}

/// Its own BPF function: a stall's end is rare beside the segments.
#[inline(never)]
fn end_stall(flow: &mut Flow, end_ns: u64) {
    let stall_ns = report_stall(flow, end_ns);
    flow.hol_start_ns = 0;
    flow.transport.hol_stalls += 1;
    flow.transport.hol_stall_ns += stall_ns;
}

/// At close: a stall whose hole was filled by the last data segment, with
/// no segment after it to notice (kernels without a data-ready hook), ends
/// then, before the close reports the flow's totals. Its own BPF function:
/// the close report next to it needs the stack.
#[inline(never)]
pub fn end_stall_drained_at_close<S: Sock>(flow: &mut Flow, sk: S, now: u64) {
    if flow.hol_start_ns == 0 {
        return;
    }
    if let Ok(rcv_nxt) = sk.get::<u32>(cfg_field!(kernel.tcp_rcv_nxt)) {
        if !after(flow.hol_max_end, rcv_nxt) {
            end_stall(flow, drained_by(flow, now));
        }
    }
}

/// In-order data (the drained out-of-order queue included) was handed to
/// the application: a stall whose held data is now readable is over.
#[raw_tracepoint(tracepoint = "sk_data_ready")]
pub fn sk_data_ready(ctx: RawTracePointContext) -> i32 {
    data_ready(Probed(ctx.arg(0)), Probed(ctx.arg(0)), program::SK_DATA_READY);
    0
}

/// The same tracepoint with a BTF-typed socket. It fires for every socket
/// that gets data; a TCP socket that never queued a segment out of order
/// (`rcv_ooopack`, one plain load) has no stall to end and skips the flow
/// lookup, which is nearly every call. (A stall begun by segments beyond
/// the window, which the kernel drops uncounted, then ends at the next
/// segment instead, as without a data-ready hook.)
#[btf_tracepoint(function = "sk_data_ready")]
pub fn sk_data_ready_btf(ctx: BtfTracePointContext) -> i32 {
    let Some(tp) = Typed::of(ctx.arg(0)) else { return 0 };
    let ooopack_at = cfg_field!(kernel.tcp_rcv_ooopack);
    if ooopack_at != 0 && tp.get::<u32>(ooopack_at) == Ok(0) {
        return 0;
    }
    data_ready(tp, tp, program::SK_DATA_READY_BTF);
    0
}

/// The same on kernels without `sock:sk_data_ready` (before 6.6): TCP calls
/// `tcp_data_ready(sk)` at the same place, which is what that tracepoint
/// fires from (through `sk->sk_data_ready`).
#[fentry(function = "tcp_data_ready")]
pub fn tcp_data_ready_fentry(ctx: FEntryContext) -> i32 {
    data_ready(Probed(ctx.arg(0)), Handed(ctx.arg(0)), program::TCP_DATA_READY_FENTRY);
    0
}

/// The same where fentry is unavailable but kprobes work.
#[kprobe]
pub fn tcp_data_ready_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(sk) = ctx.arg::<u64>(0) {
        data_ready(Probed(sk), Probed(sk), program::TCP_DATA_READY_KPROBE);
    }
    0
}

/// `sk` as the program reads it, `handle` as it finds its flow (an
/// fentry reads by probe but holds a typed pointer).
#[inline(always)]
fn data_ready<S: Sock, H: SockRef>(sk: S, handle: H, program: u32) {
    if no_stall_open(sk.addr()) {
        return;
    }
    if let Some(flow) = flows::lookup_mut(handle) {
        if flow.hol_start_ns != 0 {
            counted(program, end_stall_if_drained(flow, sk));
        }
    }
}

#[inline(always)]
fn end_stall_if_drained<S: Sock>(flow: &mut Flow, sk: S) -> Result<(), i32> {
    let rcv_nxt: u32 = sk.get(cfg_field!(kernel.tcp_rcv_nxt))?;
    if after(flow.hol_max_end, rcv_nxt) {
        return Ok(());
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    end_stall(flow, unsafe { bpf_ktime_get_ns() });
    Ok(())
}
