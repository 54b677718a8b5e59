//! Retransmissions: `tcp:tcp_retransmit_skb` (data and SYN; built twice,
//! see sock.rs) and `tcp:tcp_retransmit_synack` (the listener's SYN-ACK).

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    macros::{btf_tracepoint, map, tracepoint},
    maps::LruHashMap,
    programs::{BtfTracePointContext, TracePointContext},
};
use netlens_common::{counter, direction, kind, program, tcp_state, Flow, TupleKey, FIELD_ABSENT, SYNACK_TABLE_ENTRIES};

use crate::{
    config::cfg_field,
    dynamics::{ca_state_of, ca_state_seen},
    events::{count, counted, emit, stamp},
    flows,
    kernel::{member, slot, tuple, typed_member, Record, Tuple},
    probe::segment_seqs_typed,
    sock::{common_tuple, Probed, Sock, Typed},
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

/// The fallback where the kernel refuses the BTF tracepoint below.
#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let result = Record::read(&ctx, cfg_field!(retransmit.len), slot::RETRANSMIT).and_then(|record| {
        let sk: u64 = record.get(cfg_field!(retransmit.skaddr))?;
        on_retransmit(Probed(sk), &FromRecord { record: &record, sk })
    });
    counted(program::TCP_RETRANSMIT_SKB, result);
    0
}

/// The same tracepoint with BTF-typed arguments: plain loads from the
/// socket and the skb instead of a copy of the formatted record and probe
/// reads (the tracepoint runs for every retransmitted segment).
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb_btf(ctx: BtfTracePointContext) -> i32 {
    let Some(sk) = Typed::of(ctx.arg(0)) else { return 0 };
    // `err` follows (sk, skb) since 6.10, where the record has it too. The
    // frozen config removes the read where it is absent.
    let err = if cfg_field!(retransmit.err) != FIELD_ABSENT { ctx.arg::<i32>(2) } else { 0 };
    counted(program::TCP_RETRANSMIT_SKB_BTF, on_retransmit(sk, &FromArgs { sk, skb: ctx.arg(1), err }));
    0
}

/// What a retransmission hook knows beyond the socket, read its own way.
trait Retransmission {
    /// Whether the attempt failed (traced too since 6.10).
    fn failed(&self) -> Result<bool, i32>;
    /// The skb's segment count (`tcp_skb_pcount`), at least 1.
    fn segs(&self) -> u32;
    /// The skb's `seq` and `end_seq`, zeros when unreadable.
    fn seqs(&self) -> (u32, u32);
    /// The socket's TCP state.
    fn state(&self) -> Result<u8, i32>;
    fn tuple(&self) -> Result<Tuple, i32>;
}

/// The formatted record (and probe reads of the skb).
struct FromRecord<'a> {
    record: &'a Record,
    sk: u64,
}

impl Retransmission for FromRecord<'_> {
    #[inline(always)]
    fn failed(&self) -> Result<bool, i32> {
        let err_offset = cfg_field!(retransmit.err);
        Ok(err_offset != FIELD_ABSENT && self.record.get::<i32>(err_offset)? != 0)
    }

    #[inline(always)]
    fn segs(&self) -> u32 {
        let segs_offset = cfg_field!(kernel.skb_cb) + cfg_field!(kernel.tcb_gso_segs);
        let segs = self.record.get::<u64>(cfg_field!(retransmit.skbaddr)).and_then(|skb| member::<u16>(skb, segs_offset));
        segs.unwrap_or(1).max(1) as u32
    }

    #[inline(always)]
    fn seqs(&self) -> (u32, u32) {
        let Ok(skb) = self.record.get::<u64>(cfg_field!(retransmit.skbaddr)) else { return (0, 0) };
        let offset = cfg_field!(kernel.skb_cb) + cfg_field!(kernel.tcb_seq);
        let seq: u32 = member(skb, offset).unwrap_or(0);
        (seq, member(skb, offset + 4).unwrap_or(seq))
    }

    #[inline(always)]
    fn state(&self) -> Result<u8, i32> {
        Ok(self.record.get::<i32>(cfg_field!(retransmit.state))? as u8)
    }

    #[inline(always)]
    fn tuple(&self) -> Result<Tuple, i32> {
        tuple(self.record, &cfg_field!(retransmit.tuple), self.sk)
    }
}

/// The BTF-typed arguments.
struct FromArgs {
    sk: Typed,
    /// A BTF-typed `struct sk_buff *`.
    skb: u64,
    err: i32,
}

impl Retransmission for FromArgs {
    #[inline(always)]
    fn failed(&self) -> Result<bool, i32> {
        Ok(self.err != 0)
    }

    #[inline(always)]
    fn segs(&self) -> u32 {
        let at = cfg_field!(kernel.skb_cb) + cfg_field!(kernel.tcb_gso_segs);
        // SAFETY: a BTF-typed skb; the load lies inside `sk_buff.cb`, which
        // the verifier lets programs read as scratch space.
        unsafe { typed_member::<u16>(self.skb, at) }.max(1) as u32
    }

    #[inline(always)]
    fn seqs(&self) -> (u32, u32) {
        let seqs = segment_seqs_typed(self.skb);
        (seqs as u32, (seqs >> 32) as u32)
    }

    #[inline(always)]
    fn state(&self) -> Result<u8, i32> {
        self.sk.get(cfg_field!(accept_queue.sock_state))
    }

    #[inline(always)]
    fn tuple(&self) -> Result<Tuple, i32> {
        self.sk.tuple()
    }
}

#[inline(always)]
fn on_retransmit<S: Sock, R: Retransmission>(sk: S, retransmission: &R) -> Result<(), i32> {
    let now = unsafe { bpf_ktime_get_ns() };
    // Count segments exactly as the kernel does (TcpRetransSegs and
    // tcp_sock.total_retrans move together). Since 6.10 the tracepoint
    // also fires for failed attempts, and the kernel counts a failure when
    // it happened after the counters moved (in the transmit itself) but not
    // when it happened before (-EBUSY, -EAGAIN, ...). The err value cannot
    // tell those apart; the socket's own total can: report how far it moved.
    let total_retrans: u32 = sk.get(cfg_field!(kernel.tcp_total_retrans))?;
    // One lookup for all three uses below.
    let mut flow = flows::lookup_mut(sk);
    let segs = match flow.as_deref_mut() {
        // How far the total moved since the last event (or the start).
        Some(flow) => {
            let grown = total_retrans.wrapping_sub(flow.total_retrans);
            if grown == 0 {
                return Ok(());
            }
            flow.total_retrans = total_retrans;
            grown
        }
        // A connection from before we attached: the skb's segment count,
        // for attempts that did not fail.
        None if retransmission.failed()? => return Ok(()),
        None => retransmission.segs(),
    };
    // An RTO retransmission follows the switch to Loss at once: on kernels
    // without tcp:tcp_cong_state_set this is where that episode starts.
    if let (Some(flow), Ok(byte)) = (flow.as_deref_mut(), sk.get::<u8>(cfg_field!(kernel.icsk_ca_state))) {
        if let Some(ca) = ca_state_of(byte) {
            ca_state_seen(flow, sk, ca, now);
        }
    }
    // Which segment, and how large: the same sequence number retransmitted
    // again and again is a segment that never gets through (a path MTU
    // black hole drops only the large ones). 0 when unreadable.
    let (seq, end_seq) = retransmission.seqs();
    let state = retransmission.state()?;
    let tuple = retransmission.tuple()?;
    let flow: &Flow = match flow {
        Some(flow) => flow,
        None => flows::unknown_of(sk, slot::RETRANSMIT).ok_or(-1)?,
    };
    emit(|event| {
        stamp(event, kind::RETRANSMIT, now, &tuple, flow);
        event.state = state;
        event.segs = segs;
        event.bytes_sent = u64::from(end_seq.wrapping_sub(seq));
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
    synack_retransmitted(Probed(listener), req, &tuple, now)
}

/// The same tracepoint with its arguments typed by BTF: no record to
/// format, the request socket's ends read from the `sock_common` it starts
/// with, and never skipped uncounted before 6.7 (`check`'s `skipped runs`).
#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn tcp_retransmit_synack_btf(ctx: BtfTracePointContext) -> i32 {
    let result = Typed::of_tcp(ctx.arg(0)).ok_or(-1).and_then(|listener| {
        let req: u64 = ctx.arg(1);
        synack_retransmitted(listener, req, &request_tuple(req), unsafe { bpf_ktime_get_ns() })
    });
    counted(program::TCP_RETRANSMIT_SYNACK_BTF, result);
    0
}

/// The ends of a BTF-typed `struct request_sock *`: its local port is
/// `skc_num`, in host order.
#[inline(always)]
fn request_tuple(req: u64) -> Tuple {
    // SAFETY: `skc_num` lies in the `sock_common` the request socket
    // starts with (checked at load time).
    common_tuple(req, unsafe { typed_member(req, cfg_field!(kernel.sock_tuple.num) as u32) })
}

/// A SYN-ACK of the pending connection `req` (ends `tuple`) of `listener`
/// was retransmitted: its first one's time is kept for the passive
/// handshake (see lifecycle.rs), and an event reported.
#[inline(always)]
fn synack_retransmitted<S: Sock>(listener: S, req: u64, tuple: &Tuple, now: u64) -> Result<(), i32> {
    let listener_flow = flows::unknown_of(listener, slot::SYNACK).ok_or(-1)?;
    let key = TupleKey {
        saddr: tuple.saddr,
        daddr: tuple.daddr,
        netns: listener_flow.netns,
        sport: tuple.sport,
        dport: tuple.dport,
        family: tuple.family,
        _pad: [0; 6],
    };
    // snt_synack: the first SYN-ACK's tcp_clock_us(), the same monotonic
    // clock as bpf_ktime_get_ns(). Keep the first one we see per handshake.
    // Probed: it lies past `struct request_sock`, in `tcp_request_sock`.
    let snt_synack_us: u64 = member(req, cfg_field!(kernel.treq_snt_synack)).unwrap_or(0);
    let first_ns = if snt_synack_us != 0 { snt_synack_us * 1000 } else { now };
    let _ = SYNACK_STARTS.insert(&key, &first_ns, BPF_NOEXIST as u64);
    listener_flow.direction = direction::PASSIVE;
    emit(|event| {
        stamp(event, kind::SYNACK_RETRANSMIT, now, tuple, listener_flow);
        event.state = tcp_state::SYN_RECV;
        event.segs = 1;
    });
    Ok(())
}

/// Retransmissions after the connection's last `retransmit` event (see
/// `counter::RETRANSMITS_UNSEEN`): the socket's `total_retrans` at close
/// has them, the events do not.
#[inline(always)]
pub fn count_unseen_at_close(total_retrans: u32, flow: &Flow) {
    let unseen = total_retrans.wrapping_sub(flow.total_retrans);
    // The total only grows; a "negative" gap would be a stale entry.
    if unseen != 0 && unseen < 1 << 31 {
        count(counter::RETRANSMITS_UNSEEN, unseen as u64);
    }
}
