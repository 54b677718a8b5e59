//! Retransmissions: `tcp:tcp_retransmit_skb` (data and SYN) and
//! `tcp:tcp_retransmit_synack` (the listener's SYN-ACK).

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    macros::{map, tracepoint},
    maps::LruHashMap,
    programs::TracePointContext,
};
use netlens_common::{direction, kind, program, tcp_state, TupleKey, FIELD_ABSENT, SYNACK_TABLE_ENTRIES};

use crate::{
    config::cfg_field,
    dynamics::{ca_state_of, ca_state_seen},
    events::{counted, emit, stamp},
    flows,
    kernel::{member, slot, tuple, Record},
    sock::{Probed, Sock},
};

/// First SYN-ACK time (ns) of pending passive opens whose SYN-ACK was
/// retransmitted, by 4-tuple; lifecycle.rs takes it when the child socket
/// is established. LRU: handshakes that never finish age out.
#[map]
static SYNACK_STARTS: LruHashMap<TupleKey, u64> =
    LruHashMap::with_max_entries(SYNACK_TABLE_ENTRIES, 0);

/// Removes and returns the first SYN-ACK time recorded for `key`.
#[inline(always)]
pub fn take_synack_start(key: &TupleKey) -> Option<u64> {
    // SAFETY: the value is copied out before the entry is removed.
    let start_ns = unsafe { SYNACK_STARTS.get(key).copied() }?;
    let _ = SYNACK_STARTS.remove(key);
    Some(start_ns)
}

#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let result = Record::read(&ctx, cfg_field!(retransmit.len), slot::RETRANSMIT).and_then(|record| on_retransmit(&record));
    counted(program::TCP_RETRANSMIT_SKB, result);
    0
}

#[inline(always)]
fn on_retransmit(record: &Record) -> Result<(), i32> {
    let now = unsafe { bpf_ktime_get_ns() };
    let sk: u64 = record.get(cfg_field!(retransmit.skaddr))?;
    // Count segments exactly as the kernel does (TcpRetransSegs and
    // tcp_sock.total_retrans move together). Since 6.10 the tracepoint
    // also fires for failed attempts, and the kernel counts a failure when
    // it happened after the counters moved (in the transmit itself) but not
    // when it happened before (-EBUSY, -EAGAIN, ...). The err value cannot
    // tell those apart; the socket's own total can: report how far it moved.
    let total_retrans: u32 = member(sk, cfg_field!(kernel.tcp_total_retrans))?;
    let segs = match flows::advance_retrans(sk, total_retrans) {
        Some(0) => return Ok(()),
        Some(grown) => grown,
        // A connection from before we attached: the skb's segment count
        // (tcp_skb_pcount), for attempts that did not fail.
        None => {
            let err_offset = cfg_field!(retransmit.err);
            if err_offset != FIELD_ABSENT && record.get::<i32>(err_offset)? != 0 {
                return Ok(());
            }
            let skb: u64 = record.get(cfg_field!(retransmit.skbaddr))?;
            let segs_offset = cfg_field!(kernel.skb_cb) + cfg_field!(kernel.tcb_gso_segs);
            member::<u16>(skb, segs_offset).unwrap_or(1).max(1) as u32
        }
    };
    // An RTO retransmission follows the switch to Loss at once: on kernels
    // without tcp:tcp_cong_state_set this is where that episode starts.
    if let (Some(flow), Ok(byte)) = (flows::lookup_mut(sk), member::<u8>(sk, cfg_field!(kernel.icsk_ca_state))) {
        if let Some(ca) = ca_state_of(byte) {
            ca_state_seen(flow, Probed(sk), ca, now);
        }
    }
    // Which segment, and how large: the same sequence number retransmitted
    // again and again is a segment that never gets through (a path MTU
    // black hole drops only the large ones). 0 when unreadable.
    let (seq, span) = match record.get::<u64>(cfg_field!(retransmit.skbaddr)) {
        Ok(skb) => {
            let offset = cfg_field!(kernel.skb_cb) + cfg_field!(kernel.tcb_seq);
            let seq: u32 = member(skb, offset).unwrap_or(0);
            let end_seq: u32 = member(skb, offset + 4).unwrap_or(seq);
            (seq, end_seq.wrapping_sub(seq))
        }
        Err(_) => (0, 0),
    };
    let state = record.get::<i32>(cfg_field!(retransmit.state))? as u8;
    let tuple = tuple(record, &cfg_field!(retransmit.tuple), sk)?;
    let flow = flows::known_or_unknown(sk, slot::RETRANSMIT).ok_or(-1)?;
    emit(|event| {
        stamp(event, kind::RETRANSMIT, now, &tuple, flow);
        event.state = state;
        event.segs = segs;
        event.bytes_sent = u64::from(span);
        event.bytes_received = u64::from(seq);
    });
    Ok(())
}

#[tracepoint]
pub fn tcp_retransmit_synack(ctx: TracePointContext) -> u32 {
    let result = Record::read(&ctx, cfg_field!(synack.len), slot::SYNACK).and_then(|record| on_synack_retransmit(&record));
    counted(program::TCP_RETRANSMIT_SYNACK, result);
    0
}

#[inline(always)]
fn on_synack_retransmit(record: &Record) -> Result<(), i32> {
    let now = unsafe { bpf_ktime_get_ns() };
    let listener: u64 = record.get(cfg_field!(synack.skaddr))?;
    let req: u64 = record.get(cfg_field!(synack.req))?;
    let tuple = tuple(record, &cfg_field!(synack.tuple), req)?;
    let netns = Probed(listener).netns();
    let key = TupleKey {
        saddr: tuple.saddr,
        daddr: tuple.daddr,
        netns,
        sport: tuple.sport,
        dport: tuple.dport,
        family: tuple.family,
        _pad: [0; 6],
    };
    // snt_synack: the first SYN-ACK's tcp_clock_us(), the same monotonic
    // clock as bpf_ktime_get_ns(). Keep the first one we see per handshake.
    let snt_synack_us: u64 = member(req, cfg_field!(kernel.treq_snt_synack)).unwrap_or(0);
    let first_ns = if snt_synack_us != 0 { snt_synack_us * 1000 } else { now };
    let _ = SYNACK_STARTS.insert(&key, &first_ns, BPF_NOEXIST as u64);
    let listener_flow = flows::unknown_of(Probed(listener), slot::SYNACK).ok_or(-1)?;
    listener_flow.direction = direction::PASSIVE;
    emit(|event| {
        stamp(event, kind::SYNACK_RETRANSMIT, now, &tuple, listener_flow);
        event.state = tcp_state::SYN_RECV;
        event.segs = 1;
    });
    Ok(())
}
