//! Resets: `tcp:tcp_send_reset` and `tcp:tcp_receive_reset`.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext};
use netlens_common::{kind, Flow, RawEvent, AF_INET};

use crate::{
    config::cfg_field,
    events::emit,
    flows,
    kernel::{field, skb_netns, sock_cgroup, sock_netns, tuple, Tuple},
};

/// Identity of the socket behind a reset, from the flow table when we know
/// the connection, else from the socket itself (if there is one).
#[inline(always)]
fn identity(sk: u64) -> Flow {
    if sk == 0 {
        return Flow::default();
    }
    flows::get(sk).unwrap_or_else(|| Flow {
        netns: sock_netns(sk),
        cgroup: sock_cgroup(sk),
        ..Flow::default()
    })
}

#[inline(always)]
fn reset_event(kind: u8, state: u8, tuple: &Tuple, flow: &Flow) -> RawEvent {
    RawEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        kind,
        state,
        direction: flow.direction,
        family: tuple.family,
        sport: tuple.sport,
        dport: tuple.dport,
        saddr: tuple.saddr,
        daddr: tuple.daddr,
        pid: flow.pid,
        comm: flow.comm,
        netns: flow.netns,
        cgroup: flow.cgroup,
        ..RawEvent::default()
    }
}

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let _ = on_send_reset(&ctx);
    0
}

/// The record holds the local end in `saddr` and the remote in `daddr`, as
/// `sockaddr_in`/`sockaddr_in6` (family, port in network order, address).
/// Without a socket (a SYN to a closed port), the state is 0.
#[inline(always)]
fn on_send_reset(ctx: &TracePointContext) -> Result<(), i32> {
    let sk: u64 = field(ctx, cfg_field!(send_reset.skaddr))?;
    let state = field::<i32>(ctx, cfg_field!(send_reset.state))? as u8;
    let local = cfg_field!(send_reset.saddr);
    let remote = cfg_field!(send_reset.daddr);
    let mut tuple = Tuple {
        family: field(ctx, local)?,
        sport: u16::from_be(field(ctx, local + 2)?),
        dport: u16::from_be(field(ctx, remote + 2)?),
        ..Tuple::default()
    };
    if tuple.family == AF_INET {
        let saddr: [u8; 4] = field(ctx, local + 4)?;
        let daddr: [u8; 4] = field(ctx, remote + 4)?;
        tuple.saddr[..4].copy_from_slice(&saddr);
        tuple.daddr[..4].copy_from_slice(&daddr);
    } else {
        tuple.saddr = field(ctx, local + 8)?;
        tuple.daddr = field(ctx, remote + 8)?;
    }
    let mut flow = identity(sk);
    if sk == 0 {
        // No socket (a SYN to a closed port): the namespace is the one of
        // the device the offending packet arrived on.
        let skb: u64 = field(ctx, cfg_field!(send_reset.skbaddr))?;
        flow.netns = skb_netns(skb);
    }
    emit(&reset_event(kind::RESET_SENT, state, &tuple, &flow));
    Ok(())
}

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let _ = on_receive_reset(&ctx);
    0
}

#[inline(always)]
fn on_receive_reset(ctx: &TracePointContext) -> Result<(), i32> {
    let sk: u64 = field(ctx, cfg_field!(receive_reset.skaddr))?;
    let tuple = tuple(ctx, &cfg_field!(receive_reset.tuple))?;
    // The tracepoint has no state field; the socket's state is in
    // sock_common, but the lifecycle events already say it.
    emit(&reset_event(kind::RESET_RECEIVED, 0, &tuple, &identity(sk)));
    Ok(())
}
