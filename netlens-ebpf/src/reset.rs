//! Resets: `tcp:tcp_send_reset` and `tcp:tcp_receive_reset`.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use netlens_common::{kind, program, tcp_state, AF_INET, FIELD_ABSENT};

use crate::{
    config::cfg_field,
    events::{counted, emit, stamp},
    flows,
    kernel::{packet_ends, skb_netns, slot, tuple, typed_member, Record, Tuple},
    sock::{Probed, Sock, Typed},
};

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let result = Record::read(&ctx, cfg_field!(send_reset.len), slot::SEND_RESET).and_then(|record| on_send_reset(&record));
    counted(program::TCP_SEND_RESET, result);
    0
}

/// Without a socket (a SYN to a closed port, traced since 6.10), the state
/// is 0.
#[inline(always)]
fn on_send_reset(record: &Record) -> Result<(), i32> {
    let sk: u64 = record.get(cfg_field!(send_reset.skaddr))?;
    let state = record.get::<i32>(cfg_field!(send_reset.state))? as u8;
    let local = cfg_field!(send_reset.saddr);
    let tuple = if local == FIELD_ABSENT {
        // Before 6.10: the 4-tuple fields of the other tcp records.
        tuple(record, &cfg_field!(send_reset.tuple), sk)?
    } else {
        sockaddr_tuple(record, local, cfg_field!(send_reset.daddr))?
    };
    let flow = match flows::lookup(Probed(sk)) {
        Some(flow) => flow,
        None if sk != 0 => flows::unknown_of(Probed(sk), slot::SEND_RESET).ok_or(-1)?,
        None => {
            // No socket (a SYN to a closed port): the namespace is the one
            // of the device the offending packet arrived on.
            let unknown = flows::blank(slot::SEND_RESET).ok_or(-1)?;
            let skb: u64 = record.get(cfg_field!(send_reset.skbaddr))?;
            unknown.netns = skb_netns(skb);
            unknown
        }
    };
    emit(|event| {
        stamp(event, kind::RESET_SENT, unsafe { bpf_ktime_get_ns() }, &tuple, flow);
        event.state = state;
    });
    Ok(())
}

/// The same tracepoint with its arguments typed by BTF: no record to
/// format (451 against 488 ns per reset on 6.18, BPF stats, 3,000 refused
/// connects and 3,000 aborts), the flow found by a typed pointer (so in
/// socket storage too, where it outlives the close that comes before an
/// abort's reset), and never skipped uncounted before 6.7 (see
/// `tcp_receive_reset_btf`). The 4-tuple as the record has it: from a full
/// socket, else (6.10+: a TIME_WAIT or request socket, or none) from the
/// offending segment, reversed; `tcp_send_active_reset` passes no segment.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset_btf(ctx: BtfTracePointContext) -> i32 {
    counted(program::TCP_SEND_RESET_BTF, on_send_reset_typed(ctx.arg(0), ctx.arg(1)));
    0
}

#[inline(always)]
fn on_send_reset_typed(sk: u64, skb: u64) -> Result<(), i32> {
    let now = unsafe { bpf_ktime_get_ns() };
    let state_at = cfg_field!(accept_queue.sock_state);
    // SAFETY: `sk` is the tracepoint's BTF-typed `struct sock *`, and
    // `skc_state` a u8 of the `sock_common` every kind of socket starts with.
    let state = if sk != 0 && state_at != u32::MAX { unsafe { typed_member::<u8>(sk, state_at) } } else { 0 };
    let (tuple, flow) = if sk != 0 && state != tcp_state::TIME_WAIT && state != tcp_state::NEW_SYN_RECV {
        // A full socket: the tracepoint passes only TCP ones.
        let tp = Typed::of_tcp(sk).ok_or(-1)?;
        (tp.tuple()?, flows::known_or_unknown(tp, slot::SEND_RESET).ok_or(-1)?)
    } else if skb != 0 {
        // The namespace of the socket, or of the device the segment came in on.
        let unknown = flows::blank(slot::SEND_RESET).ok_or(-1)?;
        unknown.netns = if sk != 0 { Probed(sk).netns() } else { skb_netns(skb) };
        (packet_ends(skb)?.tuple(), &*unknown)
    } else {
        return Ok(());
    };
    emit(|event| {
        stamp(event, kind::RESET_SENT, now, &tuple, flow);
        event.state = state;
    });
    Ok(())
}

/// Since 6.10 the record holds the local end in `saddr` and the remote in
/// `daddr`, as `sockaddr_in`/`sockaddr_in6` (family, port in network order,
/// address).
#[inline(always)]
fn sockaddr_tuple(record: &Record, local: u16, remote: u16) -> Result<Tuple, i32> {
    let mut tuple = Tuple {
        family: record.get(local)?,
        sport: u16::from_be(record.get(local + 2)?),
        dport: u16::from_be(record.get(remote + 2)?),
        ..Tuple::default()
    };
    if tuple.family == AF_INET {
        let saddr: [u8; 4] = record.get(local + 4)?;
        let daddr: [u8; 4] = record.get(remote + 4)?;
        tuple.saddr[..4].copy_from_slice(&saddr);
        tuple.daddr[..4].copy_from_slice(&daddr);
    } else {
        tuple.saddr = record.get(local + 8)?;
        tuple.daddr = record.get(remote + 8)?;
    }
    Ok(tuple)
}

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let result = Record::read(&ctx, cfg_field!(receive_reset.len), slot::RECEIVE_RESET).and_then(|record| on_receive_reset(&record));
    counted(program::TCP_RECEIVE_RESET, result);
    0
}

#[inline(always)]
fn on_receive_reset(record: &Record) -> Result<(), i32> {
    let sk: u64 = record.get(cfg_field!(receive_reset.skaddr))?;
    let tuple = tuple(record, &cfg_field!(receive_reset.tuple), sk)?;
    // The tracepoint has no state field; the socket's state is in
    // sock_common, but the lifecycle events already say it.
    let flow = flows::known_or_unknown(Probed(sk), slot::RECEIVE_RESET).ok_or(-1)?;
    emit(|event| stamp(event, kind::RESET_RECEIVED, unsafe { bpf_ktime_get_ns() }, &tuple, flow));
    Ok(())
}

/// The same tracepoint with its socket typed by BTF: no record to format,
/// the 4-tuple read from the socket, and the flow found in socket storage
/// too (the record build holds only the socket's address, which storage
/// cannot take, so there a reset received on a connect() had no process).
/// And a BTF-typed program is never skipped uncounted: before 6.7 the
/// kernel skips a classic tracepoint's program while another runs on that
/// CPU without a count (`check`'s `skipped runs`).
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset_btf(ctx: BtfTracePointContext) -> i32 {
    let Some(sk) = Typed::of(ctx.arg(0)) else { return 0 };
    counted(program::TCP_RECEIVE_RESET_BTF, on_receive_reset_typed(sk));
    0
}

#[inline(always)]
fn on_receive_reset_typed(sk: Typed) -> Result<(), i32> {
    let tuple = sk.tuple()?;
    let flow = flows::known_or_unknown(sk, slot::RECEIVE_RESET).ok_or(-1)?;
    emit(|event| stamp(event, kind::RESET_RECEIVED, unsafe { bpf_ktime_get_ns() }, &tuple, flow));
    Ok(())
}
