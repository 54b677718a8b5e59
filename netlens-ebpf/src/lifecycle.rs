//! Connection lifecycle from `sock:inet_sock_set_state`: handshakes (active
//! and passive), failed connects and closes.
//!
//! Passive handshake timing, tracepoints only: the kernel creates the child
//! socket when the handshake's final ACK arrives, so the child's own state
//! changes are microseconds apart and say nothing about the handshake. The
//! start comes from the request socket instead:
//! - no SYN-ACK retransmission: `tcp_check_req` has just fed the child the
//!   RTT from the first SYN-ACK to this ACK (`tcp_synack_rtt_meas`, using
//!   `req->snt_synack`), so `srtt_us >> 3` *is* that time, in µs;
//! - retransmitted SYN-ACK: `tcp:tcp_retransmit_synack` hands us the request
//!   socket, and `snt_synack` there is the first SYN-ACK's time; retransmit.rs
//!   stores it by 4-tuple and the child picks it up here.
//! Where fentry or kprobes exist, synstart.rs records the SYN's arrival
//! in `tcp_conn_request()` and the handshake is timed from there instead.
//! Limits (tracepoints): the time from the SYN's arrival to the first SYN-ACK (the
//! listener's own processing, normally microseconds) is not included, nor is
//! a SYN the client retransmitted before this one arrived (the server never
//! saw the lost one; the client's active handshake shows it). SYN cookies
//! have no request socket that lives on: those handshakes show one RTT.

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use netlens_common::{direction, kind, program, reason, tcp_state, Flow, RawClose, TupleKey};

use crate::{
    config::cfg_field,
    events::{counted, emit, stamp},
    dynamics, flows, owners, probe,
    kernel::{current_comm, slot, Tuple},
    overflow,
    retransmit::{self, take_synack_start},
    sock::{Probed, Sock, Typed},
    synstart,
};

const ECONNREFUSED: i32 = 111;
const ETIMEDOUT: i32 = 110;
const EHOSTUNREACH: i32 = 113;
const ENETUNREACH: i32 = 101;

/// A raw tracepoint: every TCP state change of every socket passes here, so
/// we take the arguments (sk, oldstate, newstate) as they are instead of
/// having the kernel format a record, and leave at once on the transitions
/// we do not need (the FIN dance, listeners). The fallback where the
/// kernel refuses the BTF tracepoint below.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: RawTracePointContext) -> i32 {
    let Some(change) = Change::of(ctx.arg::<i32>(1) as u8, ctx.arg::<i32>(2) as u8) else { return 0 };
    counted(program::INET_SOCK_SET_STATE, set_state(Probed(ctx.arg(0)), change));
    0
}

/// The same tracepoint with its arguments typed by BTF: the socket's
/// members are plain loads (see sock.rs). Sockets that are not TCP leave
/// at the first check, made only for the transitions we handle.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> i32 {
    let Some(change) = Change::of(ctx.arg::<i32>(1) as u8, ctx.arg::<i32>(2) as u8) else { return 0 };
    let Some(sk) = Typed::of(ctx.arg(0)) else { return 0 };
    counted(program::INET_SOCK_SET_STATE_BTF, set_state(sk, change));
    0
}

/// The state changes we act on; the rest (the FIN dance, a listener's
/// request sockets) leave before the socket is looked at.
#[derive(Clone, Copy)]
enum Change {
    /// Into LISTEN: remembered by port for overflow.rs (not flows).
    Listen,
    Unlisten,
    ActiveOpen,
    ActiveEstablished,
    PassiveEstablished,
    ConnectFailed,
    Closed,
}

impl Change {
    #[inline(always)]
    fn of(old: u8, new: u8) -> Option<Self> {
        Some(match (old, new) {
            (_, tcp_state::LISTEN) => Change::Listen,
            (tcp_state::LISTEN, tcp_state::CLOSE) => Change::Unlisten,
            (tcp_state::LISTEN, _) => return None,
            (tcp_state::CLOSE, tcp_state::SYN_SENT) => Change::ActiveOpen,
            (tcp_state::SYN_SENT, tcp_state::ESTABLISHED) => Change::ActiveEstablished,
            (tcp_state::SYN_RECV, tcp_state::ESTABLISHED) => Change::PassiveEstablished,
            (tcp_state::SYN_SENT, tcp_state::CLOSE) => Change::ConnectFailed,
            (_, tcp_state::CLOSE) => Change::Closed,
            _ => return None,
        })
    }
}

/// Sockets we track are TCP; the others are checked where they first
/// appear (a typed socket is TCP already). Each handler is its own BPF
/// function (inline(never)), so each gets the 512-byte stack to itself.
#[inline(always)]
fn set_state<S: Sock>(sk: S, change: Change) -> Result<(), i32> {
    match change {
        Change::Listen if sk.is_tcp() => listening(sk.addr()),
        Change::Unlisten => unlistening(sk.addr()),
        Change::ActiveOpen if sk.is_tcp() => active_open(sk),
        Change::ActiveEstablished => active_established(sk),
        Change::PassiveEstablished if sk.is_tcp() => passive_established(sk),
        Change::ConnectFailed => connect_failed(sk),
        Change::Closed => closed(sk),
        _ => Ok(()),
    }
}

/// listen(), in the server's process: remembered by port for overflow.rs
/// and for the process passive connections carry (owners.rs).
#[inline(never)]
fn listening(sk: u64) -> Result<(), i32> {
    let remembered = overflow::listening(sk);
    owners::listening(sk).and(remembered)
}

#[inline(never)]
fn unlistening(sk: u64) -> Result<(), i32> {
    let forgotten = overflow::unlistening(sk);
    owners::unlistening(sk).and(forgotten)
}

/// connect(): runs in the calling process, so pid and comm are the opener's.
/// The cgroup is the socket's (its creator's at socket(), as the passive
/// side and sock_diag have it): three plain loads where the socket is
/// typed and holds a cgroup pointer (5.15+), else the caller's by helper.
#[inline(never)]
fn active_open<S: Sock>(sk: S) -> Result<(), i32> {
    let cgroup = if S::TYPED && cfg_field!(kernel.sock_cgroup) != 0 {
        sk.cgroup()
    } else {
        // SAFETY: plain helper call without arguments.
        unsafe { bpf_get_current_cgroup_id() }
    };
    let flow = Flow {
        start_ns: unsafe { bpf_ktime_get_ns() },
        cgroup,
        comm: current_comm(S::TYPED),
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        netns: sk.netns(),
        direction: direction::ACTIVE,
        ..Flow::default()
    };
    flows::insert(sk, &flow);
    Ok(())
}

#[inline(never)]
fn active_established<S: Sock>(sk: S) -> Result<(), i32> {
    let now = unsafe { bpf_ktime_get_ns() };
    // No entry: the connect() began before netlens attached.
    let Some(flow) = flows::lookup_mut(sk) else { return Ok(()) };
    // connect() put an active flow without endpoints here. Anything else
    // is an earlier socket's, at the same address, whose close we missed
    // (see `closed`): not this connection.
    if flow.direction != direction::ACTIVE || flow.family != 0 {
        flows::discard_stale(sk, flow, now);
        return Ok(());
    }
    let tuple = sk.tuple()?;
    tuple.store(flow);
    dynamics::established(flow, now);
    emit(|event| {
        stamp(event, kind::HANDSHAKE, now, &tuple, flow);
        event.duration_ns = now.saturating_sub(flow.start_ns);
    });
    Ok(())
}

#[inline(never)]
fn passive_established<S: Sock>(sk: S) -> Result<(), i32> {
    let now = unsafe { bpf_ktime_get_ns() };
    let tuple = sk.tuple()?;
    // Built in per-CPU scratch (a flow is too big for the BPF stack), with
    // the socket's namespace and cgroup, then copied into the table.
    let flow = flows::unknown_of(sk, slot::SET_STATE).ok_or(-1)?;
    let key = TupleKey {
        saddr: tuple.saddr,
        daddr: tuple.daddr,
        netns: flow.netns,
        sport: tuple.sport,
        dport: tuple.dport,
        family: tuple.family,
        _pad: [0; 6],
    };
    // The child starts with the SYN-ACK retransmissions in its total
    // (`req->num_retrans`): without any, retransmit.rs recorded no first
    // SYN-ACK for it, and the lookup of a 48-byte key is skipped.
    let total_retrans: u32 = sk.get(cfg_field!(kernel.tcp_total_retrans)).unwrap_or(0);
    // The SYN's arrival where fentry/kprobes saw it, else the first SYN-ACK.
    let syn_ns = synstart::take(&key);
    let first_synack_ns = if total_retrans != 0 { take_synack_start(&key) } else { None };
    let start_ns = match syn_ns.or(first_synack_ns) {
        Some(start_ns) => start_ns,
        None => {
            let srtt_us: u32 = sk.get(cfg_field!(kernel.tcp_srtt_us)).unwrap_or(0);
            now.saturating_sub((srtt_us as u64 >> 3) * 1000)
        }
    };
    flow.start_ns = start_ns;
    flow.total_retrans = total_retrans;
    flow.direction = direction::PASSIVE;
    // The listener's process until accept() names the accepting one.
    owners::claim(flow, tuple.sport);
    tuple.store(flow);
    dynamics::established(flow, now);
    flows::insert(sk, flow);
    emit(|event| {
        stamp(event, kind::HANDSHAKE, now, &tuple, flow);
        event.duration_ns = now.saturating_sub(start_ns);
    });
    Ok(())
}

/// SYN_SENT → CLOSE. `tcp_reset` and `tcp_write_err` set `sk_err` before
/// `tcp_done` moves the socket to CLOSE, so it names the cause. connect()
/// enters SYN_SENT before it searches for a local port; when the search
/// fails (EADDRNOTAVAIL, returned to the caller, not set in `sk_err`) it
/// goes back to CLOSE with no source port, the destination still set.
#[inline(never)]
fn connect_failed<S: Sock>(sk: S) -> Result<(), i32> {
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(flow) = flows::lookup_mut(sk) else { return Ok(()) };
    // Not connect()'s flow: an earlier socket's (see `active_established`).
    if flow.direction != direction::ACTIVE || flow.family != 0 {
        flows::discard_stale(sk, flow, now);
        return Ok(());
    }
    let reported = report_connect_failure(sk, flow, now);
    // Only after the report: a removed table entry can be handed to another
    // CPU's insert at once, and `flow` would then read a new connection.
    flows::remove(sk, flow, now);
    reported
}

#[inline(always)]
fn report_connect_failure<S: Sock>(sk: S, flow: &Flow, now: u64) -> Result<(), i32> {
    let tuple = Tuple::of(flow).map_or_else(|| sk.tuple(), Ok)?;
    let sk_err: i32 = sk.get(cfg_field!(kernel.sock_sk_err)).unwrap_or(0);
    emit(|event| {
        stamp(event, kind::HANDSHAKE_FAILED, now, &tuple, flow);
        event.duration_ns = now.saturating_sub(flow.start_ns);
        event.reason = match sk_err {
            0 if tuple.sport == 0 => reason::NO_LOCAL_PORT,
            0 => reason::ABORTED,
            ECONNREFUSED => reason::RESET,
            ETIMEDOUT => reason::TIMEOUT,
            EHOSTUNREACH | ENETUNREACH => reason::UNREACHABLE,
            _ => reason::ERROR,
        };
    });
    Ok(())
}

/// Any other state → CLOSE: the connection is over; report what it did.
#[inline(never)]
fn closed<S: Sock>(sk: S) -> Result<(), i32> {
    let now = unsafe { bpf_ktime_get_ns() };
    // A TCP connection opened before netlens attached still reports its
    // totals, with an unknown direction and lifetime.
    match flows::lookup_mut(sk) {
        Some(flow) if !owns(flow, sk) => {
            flows::discard_stale(sk, flow, now);
            report_close(sk, flows::unknown_of(sk, slot::SET_STATE).ok_or(-1)?, now, Tracked::No)
        }
        Some(flow) => {
            probe::end_stall_drained_at_close(flow, sk, now);
            let reported = report_close(sk, flow, now, Tracked::Yes);
            // After the report: see connect_failed().
            flows::remove(sk, flow, now);
            reported
        }
        None if sk.is_tcp() => report_close(sk, flows::unknown_of(sk, slot::SET_STATE).ok_or(-1)?, now, Tracked::No),
        None => Ok(()),
    }
}

/// Whether `flow`, found at the address of `sk`, is this socket's own.
/// The table is keyed by socket address, and the kernel reuses a freed
/// socket's memory at once: when a close goes unseen (the kernel skips a
/// program that would nest in itself on a CPU, as `events missed` counts),
/// that socket's entry stays, and the next socket at the address would find
/// it, with the other socket's direction, endpoints and pid. A flow whose
/// endpoints are known names its local port; the socket still holds its
/// own in `inet_sport` at close (unlike `skc_num`, cleared on unhash).
#[inline(always)]
fn owns<S: Sock>(flow: &Flow, sk: S) -> bool {
    if flow.family == 0 {
        return true;
    }
    match sk.get::<u16>(cfg_field!(kernel.inet_sport)) {
        Ok(sport) => u16::from_be(sport) == flow.sport,
        Err(_) => true,
    }
}

/// Whether a close's flow is the connection's own, tracked since it
/// opened, or a stand-in that knows nothing of what came before.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tracked {
    Yes,
    No,
}

/// Its own BPF function: the close report needs most of the stack.
#[inline(never)]
fn report_close<S: Sock>(sk: S, flow: &Flow, now: u64, tracked: Tracked) -> Result<(), i32> {
    let tuple = Tuple::of(flow).map_or_else(|| sk.tuple(), Ok)?;
    let lifetime_ns = if flow.start_ns != 0 { now.saturating_sub(flow.start_ns) } else { 0 };
    // Payload only: the kernel's byte counters also count SYN and FIN
    // sequence numbers (bytes_acked, bytes_received), or retransmissions
    // (bytes_sent). Sent = bytes_sent - bytes_retrans: each payload byte
    // once. Received = bytes_received - 1 if the peer's FIN arrived.
    let sent: u64 = sk.get(cfg_field!(kernel.tcp_bytes_sent)).unwrap_or(0);
    let retrans: u64 = sk.get(cfg_field!(kernel.tcp_bytes_retrans)).unwrap_or(0);
    let received: u64 = sk.get(cfg_field!(kernel.tcp_bytes_received)).unwrap_or(0);
    let sk_flags: u64 = sk.get(cfg_field!(kernel.sock_flags)).unwrap_or(0);
    let fin_received = (sk_flags >> (cfg_field!(kernel.sock_done_bit) & 63)) & 1;
    let total_retrans: u32 = sk.get(cfg_field!(kernel.tcp_total_retrans)).unwrap_or(0);
    if tracked == Tracked::Yes {
        retransmit::count_unseen_at_close(total_retrans, flow);
    }
    let dsack_dups: u32 = sk.get(cfg_field!(kernel.tcp_dsack_dups)).unwrap_or(0);
    let segs_out: u32 = sk.get(cfg_field!(kernel.tcp_segs_out)).unwrap_or(0);
    emit(|close: &mut RawClose| {
        let event = &mut close.event;
        stamp(event, kind::CLOSE, now, &tuple, flow);
        event.duration_ns = lifetime_ns;
        event.bytes_sent = sent.saturating_sub(retrans);
        event.bytes_received = received.saturating_sub(fin_received);
        event.segs = total_retrans;
        event.spurious_retransmits = dsack_dups;
        dynamics::at_close(sk, flow, now, &mut close.transport);
        close.transport.segs_out = segs_out;
    });
    Ok(())
}
