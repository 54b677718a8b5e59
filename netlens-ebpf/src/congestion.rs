//! Congestion-state episodes from `tcp:tcp_cong_state_set` (Recovery, Loss
//! after an RTO, CWR). It fires per episode, not per packet, so it uses the
//! formatted record. Kernels without the congestion tracepoint (before
//! 6.3) get the same episodes from the state read per segment in probe.rs
//! (see `dynamics::ca_state_seen`). Built twice (see sock.rs): as a BTF
//! tracepoint, and on the formatted record where the kernel refuses that.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use netlens_common::program;

use crate::{
    config::cfg_field,
    dynamics::{ca_state_changes, ca_state_of, ca_state_seen},
    events::counted,
    flows,
    kernel::{slot, Record},
    sock::{Probed, Sock, Typed},
};

#[btf_tracepoint(function = "tcp_cong_state_set")]
pub fn tcp_cong_state_set_btf(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let state = ctx.arg::<u8>(1);
    let Some(tp) = Typed::of(sk) else { return 0 };
    if !kernel_state_changes(tp, state) {
        return 0;
    }
    let Some(flow) = flows::lookup_mut(tp) else { return 0 };
    if !ca_state_changes(flow, state) {
        return 0;
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    ca_state_seen(flow, tp, state, unsafe { bpf_ktime_get_ns() });
    0
}

/// Whether the socket leaves its congestion state for `state`. The
/// tracepoint fires before the kernel stores the new state, so the socket
/// still holds the old one: every connection is set to Open, the state it
/// starts in, once as it is established, and that call costs one load
/// instead of a flow lookup (a cache miss in a large table).
#[inline(always)]
fn kernel_state_changes<S: Sock>(sk: S, state: u8) -> bool {
    match sk.get::<u8>(cfg_field!(kernel.icsk_ca_state)).ok().and_then(ca_state_of) {
        Some(old) => old != state,
        None => true,
    }
}

#[tracepoint]
pub fn tcp_cong_state_set(ctx: TracePointContext) -> u32 {
    counted(program::TCP_CONG_STATE_SET, Record::read(&ctx, cfg_field!(cong_state.len), slot::CONG_STATE).and_then(on_cong_state));
    0
}

#[inline(always)]
fn on_cong_state(record: &Record) -> Result<(), i32> {
    let sk: u64 = record.get(cfg_field!(cong_state.skaddr))?;
    let state: u8 = record.get(cfg_field!(cong_state.cong_state))?;
    if !kernel_state_changes(Probed(sk), state) {
        return Ok(());
    }
    let Some(flow) = flows::lookup_mut(Probed(sk)) else { return Ok(()) };
    if !ca_state_changes(flow, state) {
        return Ok(());
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    ca_state_seen(flow, Probed(sk), state, unsafe { bpf_ktime_get_ns() });
    Ok(())
}
