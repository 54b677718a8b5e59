//! Congestion-state episodes from `tcp:tcp_cong_state_set` (Recovery, Loss
//! after an RTO, CWR), and receive-queue-full drops from
//! `sock:sock_rcvqueue_full`. Both fire per episode or per drop, not per
//! packet, so they use the formatted records.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext};
use netlens_common::{ca_state, counter};

use crate::{
    config::cfg_field,
    dynamics::{end_ca_episode, exit_slow_start},
    events::count,
    flows,
    kernel::{member, slot, Record},
};

#[tracepoint]
pub fn tcp_cong_state_set(ctx: TracePointContext) -> u32 {
    let _ = Record::read(&ctx, cfg_field!(cong_state.len), slot::CONG_STATE).and_then(on_cong_state);
    0
}

#[inline(always)]
fn on_cong_state(record: &Record) -> Result<(), i32> {
    let sk: u64 = record.get(cfg_field!(cong_state.skaddr))?;
    let state: u8 = record.get(cfg_field!(cong_state.cong_state))?;
    let Some(flow) = flows::lookup_mut(sk) else { return Ok(()) };
    if state == flow.ca_state || flow.established_ns == 0 {
        return Ok(());
    }
    let now = unsafe { bpf_ktime_get_ns() };
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
        let probe = cfg_field!(probe);
        let current: u32 = member(sk, probe.start + probe.snd_cwnd as u32).unwrap_or(0);
        let cwnd = if flow.transport.cwnd != 0 { flow.transport.cwnd } else { current };
        exit_slow_start(flow, now, cwnd);
    }
    Ok(())
}

#[tracepoint]
pub fn sock_rcvqueue_full(_ctx: TracePointContext) -> u32 {
    count(counter::RCVQUEUE_FULL, 1);
    0
}
