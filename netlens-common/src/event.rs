//! Records that cross from the kernel to userspace, and per-flow state.

/// What a [`RawEvent`] reports.
pub mod kind {
    pub const HANDSHAKE: u8 = 1;
    pub const HANDSHAKE_FAILED: u8 = 2;
    pub const RETRANSMIT: u8 = 3;
    pub const SYNACK_RETRANSMIT: u8 = 4;
    pub const RESET_SENT: u8 = 5;
    pub const RESET_RECEIVED: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const HOL_STALL: u8 = 8;
    pub const ZERO_WINDOW: u8 = 9;
    pub const SLOW_START_EXIT: u8 = 10;
    /// accept() returned a connection (accept.rs): `duration_ns` is its
    /// wait in the accept queue, `queue_len`/`backlog` the listener's.
    pub const ACCEPTED: u8 = 11;
}

/// Which end's window was zero in a `ZERO_WINDOW` event.
pub mod side {
    /// The peer advertised zero: our sender waits on a slow reader there.
    pub const PEER: u8 = 1;
    /// We advertised zero: our own application is not reading.
    pub const LOCAL: u8 = 2;
}

/// Linux congestion-avoidance states (`enum tcp_ca_state`).
pub mod ca_state {
    pub const OPEN: u8 = 0;
    pub const DISORDER: u8 = 1;
    pub const CWR: u8 = 2;
    pub const RECOVERY: u8 = 3;
    pub const LOSS: u8 = 4;
}

/// `slow_start_exit_ns` of a connection that never left slow start.
pub const NEVER: u64 = u64::MAX;

/// An `ACCEPTED` event's `duration_ns` where the kernel side could not
/// time the wait (flows in socket storage: userspace does).
pub const ACCEPT_WAIT_UNKNOWN: u64 = u64::MAX;

/// Which end opened the connection.
pub mod direction {
    pub const UNKNOWN: u8 = 0;
    pub const ACTIVE: u8 = 1;
    pub const PASSIVE: u8 = 2;
}

/// Why a connect() failed, from `sk_err` at the SYN_SENT → CLOSE transition.
pub mod reason {
    pub const NONE: u8 = 0;
    /// The peer answered the SYN with a reset (ECONNREFUSED).
    pub const RESET: u8 = 1;
    /// SYN retransmissions ran out (ETIMEDOUT).
    pub const TIMEOUT: u8 = 2;
    /// An ICMP error said the peer cannot be reached (EHOSTUNREACH, ENETUNREACH).
    pub const UNREACHABLE: u8 = 3;
    /// The application closed the socket before the handshake finished.
    pub const ABORTED: u8 = 4;
    /// Any other socket error.
    pub const ERROR: u8 = 5;
    /// connect() found no free local port (EADDRNOTAVAIL): the socket went
    /// back to CLOSE from SYN_SENT without a source port.
    pub const NO_LOCAL_PORT: u8 = 6;
}

/// One event from the ring buffer: all most kinds carry. Which fields mean
/// something depends on `kind`; the rest are zero. A `CLOSE` carries more:
/// it is a [`RawClose`], this and then the connection's dynamics.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawEvent {
    /// CLOCK_MONOTONIC (bpf_ktime_get_ns) when the event happened.
    pub ts_ns: u64,
    pub cgroup: u64,
    /// `HANDSHAKE`: SYN (or first SYN-ACK) to ESTABLISHED; `HANDSHAKE_FAILED`:
    /// SYN to CLOSE; `CLOSE`: the connection's lifetime (0 if not seen open).
    pub duration_ns: u64,
    /// `CLOSE`: payload bytes sent, each counted once (retransmissions not
    /// counted again). `RETRANSMIT`: the retransmitted skb's sequence span
    /// (end_seq − seq: its payload, plus one for a SYN or FIN).
    pub bytes_sent: u64,
    /// `CLOSE`: payload bytes received in order. `RETRANSMIT`: the skb's
    /// first sequence number (same number again: the same segment again).
    /// `HOL_STALL`: the bytes held, the highest out-of-order end minus
    /// rcv_nxt at the start.
    pub bytes_received: u64,
    /// Local address: 4 bytes for IPv4 (rest zero), 16 for IPv6.
    pub saddr: [u8; 16],
    /// Remote address.
    pub daddr: [u8; 16],
    pub comm: [u8; 16],
    pub pid: u32,
    pub netns: u32,
    /// `RETRANSMIT`: segments in the retransmitted skb; `CLOSE`: total
    /// retransmitted segments of the connection; `HOL_STALL`: segments
    /// queued out of order meanwhile; `SLOW_START_EXIT`: cwnd at the exit.
    pub segs: u32,
    /// `CLOSE`: retransmitted segments the peer reported as duplicates (DSACK).
    pub spurious_retransmits: u32,
    /// Local port, host byte order.
    pub sport: u16,
    /// Remote port, host byte order.
    pub dport: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub kind: u8,
    pub direction: u8,
    /// TCP state at the event (`RETRANSMIT`, `RESET_*`).
    pub state: u8,
    /// `HANDSHAKE_FAILED`: one of [`reason`]; `ZERO_WINDOW`: one of [`side`].
    pub reason: u8,
    pub _pad: [u8; 6],
    /// `ACCEPTED`: the listener's accept queue length (`sk_ack_backlog`)
    /// right after accept() took this connection, and its limit
    /// (`sk_max_ack_backlog`).
    pub queue_len: u32,
    pub backlog: u32,
}

/// A `CLOSE` event: the event, then the connection's dynamics. The other
/// kinds leave the dynamics out of the ring buffer (about half the bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawClose {
    pub event: RawEvent,
    pub transport: Transport,
}

/// A connection's transport dynamics, kept per flow and reported at close.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transport {
    /// Time from established to leaving slow start, or [`NEVER`].
    pub slow_start_exit_ns: u64,
    /// Total time in head-of-line stalls.
    pub hol_stall_ns: u64,
    /// Total time either side advertised a zero window.
    pub zero_window_ns: u64,
    /// Total time in Recovery, Loss (RTO) and CWR.
    pub recovery_ns: u64,
    pub loss_ns: u64,
    pub cwr_ns: u64,
    /// Congestion window in segments: the latest / the largest seen
    /// (`SLOW_START_EXIT`: at the exit).
    pub cwnd: u32,
    pub max_cwnd: u32,
    pub ssthresh: u32,
    /// Smoothed and minimum RTT, µs.
    pub srtt_us: u32,
    pub min_rtt_us: u32,
    pub recovery_episodes: u32,
    pub loss_episodes: u32,
    pub cwr_episodes: u32,
    pub hol_stalls: u32,
    /// Data segments that arrived beyond rcv_nxt, less those PAWS drops
    /// (`paws`): those the kernel queued out of order, and the rare one it
    /// then dropped (no memory, beyond the window).
    pub ooo_segments: u32,
    /// Segments sent (`tcp_sock.segs_out`), at close: the denominator of
    /// retransmits per 1,000 segments.
    pub segs_out: u32,
    /// The congestion control algorithm's name ("cubic", "bbr", ...).
    pub congestion: [u8; 16],
    pub _pad: u32,
}

/// Per-connection state kept in the kernel's flow table, keyed by socket
/// address. Created when a connection starts (SYN_SENT or SYN_RECV), removed
/// when it closes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// When the handshake started: connect() for active opens, the first
    /// SYN-ACK for passive ones.
    pub start_ns: u64,
    pub cgroup: u64,
    /// The endpoints, known once established (an active open has no local
    /// port before connect() picks one); kept so that later events need no
    /// reads from the socket.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// 0 until the endpoints are known.
    pub family: u16,
    pub _pad_tuple: u16,
    /// When the connection became established (0: not yet).
    pub established_ns: u64,
    /// The socket's clock (`tcp_clock_cache`) as the last segment arrived:
    /// its last activity before that segment (0: no segment yet).
    pub clock_before_last_segment_ns: u64,
    /// Head-of-line stall in progress: its start (0: none), rcv_nxt then,
    /// the highest out-of-order end seen, and the segments queued meanwhile.
    pub hol_start_ns: u64,
    /// When the latest in-order data segment arrived during the stall: on
    /// kernels without a data-ready hook, the stall is found over at the
    /// next segment and ended at this time (the segment that filled the hole).
    pub hol_inorder_ns: u64,
    pub hol_rcv_nxt: u32,
    pub hol_max_end: u32,
    pub hol_ooo_segments: u32,
    /// Congestion state in force and since when.
    pub ca_state: u8,
    /// The log2 buckets of srtt and cwnd at the last segment
    /// (`histogram::log2_bucket_from`).
    pub srtt_bucket: u8,
    pub cwnd_bucket: u8,
    pub _pad_ca: u8,
    pub ca_since_ns: u64,
    /// Zero-window episodes in progress (0: none).
    pub peer_zero_since_ns: u64,
    pub local_zero_since_ns: u64,
    pub transport: Transport,
    pub comm: [u8; 16],
    pub pid: u32,
    pub netns: u32,
    /// `tcp_sock.total_retrans` when we last looked: each retransmit event
    /// reports how far the kernel's own count moved since.
    pub total_retrans: u32,
    pub direction: u8,
    /// 1 when a passive flow found its listener's owner (owners.rs) as it
    /// was established: accept() then has no owner to record.
    pub owner_claimed: u8,
    pub _pad: [u8; 2],
    /// When the connection closed, where the table keeps closed flows for
    /// the next socket at their address (the eBPF crate's flows.rs); 0
    /// while it is open. A closed flow is no connection's: lookups skip it.
    pub closed_ns: u64,
}

/// Slots a bucket of the flow array holds (the eBPF crate's slots.rs).
pub const SLOT_WAYS: usize = 8;

/// The owners of one bucket of the flow array's slots: a socket's
/// distance from the first bucket in kernel memory (a socket address the
/// programs may hash), even; the lowest bit set marks the flow closed and
/// the slot free for any socket; 0: never used. Slot `way` of bucket `b`
/// holds its flow at `b * SLOT_WAYS + way` of the flows beside. 64 bytes:
/// a socket's lookup reads one cache line of owners.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnerBucket {
    pub owners: [u64; SLOT_WAYS],
}

/// Whether an owner holds a connection's flow (not closed, not unused).
pub fn owner_is_open(owner: u64) -> bool {
    owner != 0 && owner & 1 == 0
}

/// Key of the SYN-ACK start table: the 4-tuple of a pending passive open as
/// the listener sees it, plus its network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TupleKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub netns: u32,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub _pad: [u8; 6],
}

/// A listening endpoint, the key of the kernel's `LISTEN_OVERFLOWS` map:
/// the listener's identity, not its address, which a listener opened
/// after one closed can be given (its drops would be reported as the old
/// one's). Listeners sharing a port (SO_REUSEPORT) share an entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerEndpoint {
    pub netns: u32,
    pub family: u16,
    /// Local port, host byte order.
    pub port: u16,
    /// Local address (IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
}

/// Listen overflows of one [`ListenerEndpoint`], per CPU, read by
/// userspace once a second: `dropped` only grows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenOverflow {
    /// Connections dropped because the accept queue was full (what the
    /// kernel counts as ListenOverflows), since netlens attached.
    pub dropped: u64,
    /// When the latest one was dropped (CLOCK_MONOTONIC ns).
    pub last_ns: u64,
    /// `sk_max_ack_backlog` at the latest drop.
    pub backlog: u32,
    pub _pad: u32,
}

/// Key of the listener table: a listening port in one network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerKey {
    pub netns: u32,
    pub port: u16,
    pub _pad: u16,
}

/// The process that owns a listening port (`LISTENER_OWNERS`, keyed by
/// [`ListenerKey`]): recorded at listen() (process context), by the first
/// accept() seen, or by userspace for listeners older than netlens (from
/// sock_diag's inode and `/proc/PID/fd`). Passive connections carry it
/// until accept() names the exact accepting process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerOwner {
    /// The listening socket when the kernel side recorded it; 0 when
    /// userspace did (it knows the socket's inode, not its address).
    pub sk: u64,
    pub pid: u32,
    pub _pad: u32,
    pub comm: [u8; 16],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], integer and byte-array fields only, explicit padding.
    unsafe impl aya::Pod for super::RawEvent {}
    unsafe impl aya::Pod for super::RawClose {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::OwnerBucket {}
    unsafe impl aya::Pod for super::TupleKey {}
    unsafe impl aya::Pod for super::ListenOverflow {}
    unsafe impl aya::Pod for super::ListenerEndpoint {}
    unsafe impl aya::Pod for super::ListenerKey {}
    unsafe impl aya::Pod for super::ListenerOwner {}
    unsafe impl aya::Pod for crate::histogram::PacketHistograms {}
}
