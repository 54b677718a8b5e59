//! Resets: `tcp:tcp_send_reset` and `tcp:tcp_receive_reset`.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use netlens_common::{kind, program, AF_INET, FIELD_ABSENT};

use crate::{
    config::cfg_field,
    events::{counted, emit, stamp},
    flows,
    kernel::{skb_netns, slot, tuple, Record, Tuple},
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
