//! Per-connection transport dynamics kept in the flow table: slow start,
//! congestion-state episodes and zero-window episodes, shared by the
//! per-packet program (probe.rs), the congestion-state program
//! (congestion.rs) and the lifecycle (lifecycle.rs).

use netlens_common::{ca_state, kind, side, Flow, Transport, NEVER};

use crate::{
    config::cfg_field,
    events::{emit, stamp},
    kernel::{window_slot, Clock, Tuple},
    sock::Sock,
};

/// A flow became established: its dynamics start now.
#[inline(always)]
pub fn established(flow: &mut Flow, now: u64) {
    flow.established_ns = now;
    flow.ca_state = ca_state::OPEN;
    flow.ca_since_ns = now;
    flow.transport.slow_start_exit_ns = NEVER;
}

/// Leaves slow start (once): cwnd reached ssthresh, or the first loss or
/// recovery began. Reports a `slow_start_exit` event. Its own BPF function,
/// as are the other episode edges below: they run once in many segments,
/// and inlined they made the per-segment program 7 KB of machine code.
#[inline(never)]
pub fn exit_slow_start(flow: &mut Flow, now: u64, cwnd: u32) {
    if flow.transport.slow_start_exit_ns != NEVER || flow.established_ns == 0 {
        return;
    }
    let after_ns = now.saturating_sub(flow.established_ns);
    flow.transport.slow_start_exit_ns = after_ns;
    let Some(tuple) = Tuple::of(flow) else { return };
    emit(|event| {
        stamp(event, kind::SLOW_START_EXIT, now, &tuple, flow);
        event.duration_ns = after_ns;
        event.segs = cwnd;
    });
}

/// Writes into `transport` the flow's time in its current congestion
/// state's totals, the time so far in that state added. Reads only `flow`:
/// at close `transport` is the record in the ring buffer, where a read
/// back waits for a cache line the consumer holds.
#[inline(always)]
fn add_ca_time(flow: &Flow, transport: &mut Transport, now: u64) {
    let spent = now.saturating_sub(flow.ca_since_ns);
    let totals = &flow.transport;
    match flow.ca_state {
        ca_state::RECOVERY => transport.recovery_ns = totals.recovery_ns + spent,
        ca_state::LOSS => transport.loss_ns = totals.loss_ns + spent,
        ca_state::CWR => transport.cwr_ns = totals.cwr_ns + spent,
        _ => {}
    }
}

/// Adds the time spent in the congestion state now ending.
#[inline(always)]
fn end_ca_episode(flow: &mut Flow, now: u64) {
    let mut transport = flow.transport;
    add_ca_time(flow, &mut transport, now);
    flow.transport = transport;
}

/// The socket's congestion state is `state` as of `now`: when it changed,
/// the episode in force ends and a new one begins. Called by the
/// congestion-state tracepoint where the kernel has it (exact times), and
/// for every segment and retransmission from the state read off the socket
/// (kernels before 6.3: a change is seen at the next ACK or RTO
/// retransmission after it happened).
#[inline(never)]
pub fn ca_state_seen<S: Sock>(flow: &mut Flow, sk: S, state: u8, now: u64) {
    if !ca_state_changes(flow, state) {
        return;
    }
    end_ca_episode(flow, now);
    match state {
        ca_state::RECOVERY => flow.transport.recovery_episodes += 1,
        ca_state::LOSS => flow.transport.loss_episodes += 1,
        ca_state::CWR => flow.transport.cwr_episodes += 1,
        _ => {}
    }
    flow.ca_state = state;
    flow.ca_since_ns = now;
    if state == ca_state::RECOVERY || state == ca_state::LOSS {
        // The window as of the last ACK: entering Loss already cut it to 1.
        let cwnd = match flow.transport.cwnd {
            0 => sk.get(cfg_field!(kernel.tcp_snd_cwnd)).unwrap_or(0),
            cwnd => cwnd,
        };
        exit_slow_start(flow, now, cwnd);
    }
}

/// Whether the socket's congestion state `state` ends the flow's episode
/// in force (checked before the clock is read for [`ca_state_seen`]).
#[inline(always)]
pub fn ca_state_changes(flow: &Flow, state: u8) -> bool {
    state != flow.ca_state && flow.established_ns != 0
}

/// The congestion state in a byte read from the socket (`icsk_ca_state`
/// is a bitfield); `None` when its place is unknown on this kernel.
#[inline(always)]
pub fn ca_state_of(byte: u8) -> Option<u8> {
    let mask = cfg_field!(probe.ca_state_mask);
    (mask != 0).then_some((byte >> (cfg_field!(probe.ca_state_shift) & 7)) & mask)
}

/// Ends a zero-window episode of `which` side that began at `since`.
#[inline(never)]
pub fn end_zero_window(flow: &mut Flow, which: u8, since: u64, until: u64) {
    let stall_ns = until.saturating_sub(since);
    flow.transport.zero_window_ns += stall_ns;
    let Some(tuple) = Tuple::of(flow) else { return };
    emit(|event| {
        stamp(event, kind::ZERO_WINDOW, until, &tuple, flow);
        event.duration_ns = stall_ns;
        event.reason = which;
    });
}

/// The connection's dynamics as it closes, written into `transport` (the
/// close event's, in place in the ring buffer: a copy would not fit the
/// stack of older verifiers, which round every frame up): episodes still
/// open count up to now; cwnd, RTTs and the algorithm are read from the
/// socket one last time. Each field is written, never read back: the
/// record's cache lines are the consumer's, and each read back waited for
/// one (most of `report_close`'s time in a perf profile of churn).
#[inline(always)]
pub fn at_close<S: Sock>(sk: S, flow: &Flow, now: u64, transport: &mut Transport) {
    *transport = flow.transport;
    if flow.established_ns == 0 {
        return;
    }
    add_ca_time(flow, transport, now);
    let open_zero_windows: u64 = [flow.peer_zero_since_ns, flow.local_zero_since_ns]
        .iter()
        .map(|&since| if since != 0 { now.saturating_sub(since) } else { 0 })
        .sum();
    if open_zero_windows != 0 {
        transport.zero_window_ns = flow.transport.zero_window_ns + open_zero_windows;
    }
    if let Ok(tp) = sk.tcp_now(window_slot::SET_STATE) {
        transport.cwnd = tp.snd_cwnd;
        transport.max_cwnd = flow.transport.max_cwnd.max(tp.snd_cwnd);
        transport.srtt_us = tp.srtt_us >> 3;
        transport.min_rtt_us = tp.min_rtt_us;
    }
    transport.congestion = sk.congestion();
}

/// One side's zero-window episode, given that side's window now: starts it
/// at `seen_ns` when the window is zero, and returns its start when a
/// nonzero window ends it.
#[inline(always)]
fn track_zero(window: u32, since_ns: &mut u64, seen_ns: u64) -> Option<u64> {
    if window == 0 {
        if *since_ns == 0 {
            *since_ns = seen_ns;
        }
        None
    } else if *since_ns != 0 {
        Some(core::mem::take(since_ns))
    } else {
        None
    }
}

/// Zero-window bookkeeping for one arriving segment. `snd_wnd` and
/// `rcv_wnd` are as they were before this segment was processed, so a
/// change seen now happened at the previous segment. Its time, without a
/// clock read per segment, from the socket's own clock (`tcp_clock_cache`,
/// refreshed right after tcp_probe as each segment is processed, and as
/// the socket sends or its timers fire): `socket_clock_ns` is that clock
/// now, the socket's last activity; the flow keeps its value at the
/// previous segment, the last activity before that one.
/// - The peer's window closed at the previous segment: the episode starts
///   at the activity before it (the sender was sending into the shrinking
///   window, microseconds earlier while it has data). Not at
///   `socket_clock_ns`: a zero-window probe sent since would make it late
///   by the probe timer (≥ 200 ms).
/// - It reopened at the previous segment: the episode ends at
///   `socket_clock_ns`, that segment, or what the sender sent at once in
///   the reopened window.
/// - We advertised zero in our answer to the previous segment: the episode
///   starts at `socket_clock_ns`, that answer. We learn that it reopened
///   when the peer sends again (about one RTT late), read from the clock.
#[inline(always)]
pub fn zero_windows(flow: &mut Flow, snd_wnd: u32, rcv_wnd: u32, socket_clock_ns: u64, clock: &mut Clock) {
    let before_previous = match core::mem::replace(&mut flow.clock_before_last_segment_ns, socket_clock_ns) {
        0 => socket_clock_ns,
        ns => ns,
    };
    if let Some(since) = track_zero(snd_wnd, &mut flow.peer_zero_since_ns, before_previous) {
        end_zero_window(flow, side::PEER, since, socket_clock_ns);
    }
    if let Some(since) = track_zero(rcv_wnd, &mut flow.local_zero_since_ns, socket_clock_ns) {
        end_zero_window(flow, side::LOCAL, since, clock.now());
    }
}

/// The socket's clock (`tcp_clock_cache`, ns, the clock of
/// `bpf_ktime_get_ns`): when it last read it. A load where the socket is
/// typed, against a call to the clock; the clock where the kernel lacks it.
#[inline(always)]
pub fn socket_clock_ns<S: Sock>(sk: S, clock: &mut Clock) -> u64 {
    let at = cfg_field!(kernel.tcp_clock_cache);
    match if at != 0 { sk.get::<u64>(at) } else { Err(-1) } {
        Ok(ns) if ns != 0 => ns,
        _ => clock.now(),
    }
}
