//! Per-connection transport dynamics kept in the flow table: slow start,
//! congestion-state episodes and zero-window episodes, shared by the
//! per-packet program (probe.rs), the congestion-state program
//! (congestion.rs) and the lifecycle (lifecycle.rs).

use netlens_common::{ca_state, kind, side, Flow, Transport, NEVER};

use crate::{
    config::cfg_field,
    events::{emit, stamp},
    kernel::{member, slot, Record, Tuple},
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
/// recovery began. Reports a `slow_start_exit` event.
#[inline(always)]
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
        event.transport.cwnd = cwnd;
    });
}

/// Adds the time a flow has spent in its current congestion state so far.
#[inline(always)]
fn add_ca_time(flow: &Flow, transport: &mut Transport, now: u64) {
    let spent = now.saturating_sub(flow.ca_since_ns);
    match flow.ca_state {
        ca_state::RECOVERY => transport.recovery_ns += spent,
        ca_state::LOSS => transport.loss_ns += spent,
        ca_state::CWR => transport.cwr_ns += spent,
        _ => {}
    }
}

/// Adds the time spent in the congestion state now ending.
#[inline(always)]
pub fn end_ca_episode(flow: &mut Flow, now: u64) {
    let mut transport = flow.transport;
    add_ca_time(flow, &mut transport, now);
    flow.transport = transport;
}

/// Ends a zero-window episode of `which` side that began at `since`.
#[inline(always)]
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

/// Writes the connection's dynamics as it closes into `transport` (the
/// close event's, in the ring buffer: not 128 more bytes of stack):
/// episodes still open count up to now; cwnd, RTTs and the algorithm are
/// read from the socket one last time.
#[inline(always)]
pub fn at_close(sk: u64, flow: &Flow, now: u64, transport: &mut Transport) {
    *transport = flow.transport;
    if flow.established_ns == 0 {
        return;
    }
    add_ca_time(flow, transport, now);
    for since in [flow.peer_zero_since_ns, flow.local_zero_since_ns] {
        if since != 0 {
            transport.zero_window_ns += now.saturating_sub(since);
        }
    }
    let probe = cfg_field!(probe);
    if let Ok(tp) = Record::copy(sk + probe.start as u64, probe.len, slot::SET_STATE) {
        let cwnd: u32 = tp.get(probe.snd_cwnd).unwrap_or(0);
        transport.cwnd = cwnd;
        transport.max_cwnd = transport.max_cwnd.max(cwnd);
        transport.srtt_us = tp.get::<u32>(probe.srtt_us).unwrap_or(0) >> 3;
        transport.min_rtt_us = tp.get(probe.min_rtt).unwrap_or(0);
    }
    let ops: u64 = member(sk, cfg_field!(kernel.icsk_ca_ops)).unwrap_or(0);
    if ops != 0 {
        transport.congestion = member(ops, cfg_field!(kernel.ca_ops_name)).unwrap_or([0; 16]);
    }
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
/// change seen now happened on the previous segment (`flow.last_rx_ns`).
#[inline(always)]
pub fn zero_windows(flow: &mut Flow, snd_wnd: u32, rcv_wnd: u32, now: u64) {
    let previous = flow.last_rx_ns;
    if previous == 0 {
        return;
    }
    // The peer advertised zero on the previous segment; it reopened the
    // window on the previous segment too.
    if let Some(since) = track_zero(snd_wnd, &mut flow.peer_zero_since_ns, previous) {
        end_zero_window(flow, side::PEER, since, previous);
    }
    // We advertised zero in our answer to the previous segment; we learn
    // that it reopened when the peer sends again (about one RTT late).
    if let Some(since) = track_zero(rcv_wnd, &mut flow.local_zero_since_ns, previous) {
        end_zero_window(flow, side::LOCAL, since, now);
    }
}
