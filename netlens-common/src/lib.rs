//! Types shared by the eBPF programs and userspace.
//!
//! Everything here is `#[repr(C)]` and plain old data: the kernel side writes
//! these bytes, userspace reads them back. `aya::Pod` impls live behind the
//! `user` feature so the eBPF build stays `no_std` and dependency-free.
#![no_std]

pub mod config;
pub mod event;
pub mod histogram;
pub mod paws;

pub use config::*;
pub use event::*;
pub use histogram::*;

/// Linux TCP states (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;

    /// The kernel's name for a state, without the `TCP_` prefix.
    pub fn name(state: u8) -> &'static str {
        match state {
            ESTABLISHED => "ESTABLISHED",
            SYN_SENT => "SYN_SENT",
            SYN_RECV => "SYN_RECV",
            FIN_WAIT1 => "FIN_WAIT1",
            FIN_WAIT2 => "FIN_WAIT2",
            TIME_WAIT => "TIME_WAIT",
            CLOSE => "CLOSE",
            CLOSE_WAIT => "CLOSE_WAIT",
            LAST_ACK => "LAST_ACK",
            LISTEN => "LISTEN",
            CLOSING => "CLOSING",
            NEW_SYN_RECV => "NEW_SYN_RECV",
            _ => "UNKNOWN",
        }
    }
}

/// The helper id programs call to cast a pointer to a struct by its BTF id
/// (for plain loads of its members): no helper has it. The loader rewrites
/// each such call before the object is parsed (netlens/src/loader/casts.rs)
/// into a call of the `bpf_rdonly_cast` kfunc (6.2+; the verifier turns it
/// into a register move), or, where the kernel lacks it, of the
/// `bpf_skc_to_tcp_sock` helper (id 137): the one cast with a helper. So
/// the programs cast to anything but `struct tcp_sock` only on paths the
/// configuration turns off without the kfunc (a BTF id of 0), which the
/// verifier never visits and removes.
pub const CAST_CALL: u32 = 0x4e4c_0001;

/// Address families as the kernel reports them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Counters kept per CPU in the `COUNTERS` map, indexed by these constants.
pub mod counter {
    /// Events dropped because the ring buffer was full.
    pub const EVENTS_LOST: u32 = 0;
    /// Flows the table took: in a new entry, or in a closed flow's.
    pub const FLOW_INSERTS: u32 = 1;
    /// Flows that ended at a close we saw (removed, or kept closed).
    pub const FLOW_REMOVES: u32 = 2;
    /// Connections the flow table could not take: it was full (`-E2BIG`).
    /// Their closes lack lifetime and direction; userspace counts them
    /// with the flows lost.
    pub const FLOW_INSERT_FAILURES: u32 = 3;
    /// Retransmissions no `retransmit` event reported: at close, how far
    /// the socket's total is ahead of the last one seen. The kernel skips
    /// a tracepoint program while another runs on that CPU (a map read
    /// from userspace counts too), uncounted before 6.7; and before 6.10
    /// the tracepoint does not fire for a retransmission that failed to
    /// send. An earlier gap shows in the connection's next event (`segs`
    /// 2 or more); this counts the ones after a connection's last.
    pub const RETRANSMITS_UNSEEN: u32 = 4;
    /// Flows whose close went unseen (the kernel skipped the program, as
    /// `events missed` counts), found when the next socket at the address
    /// opened: replaced or discarded. Flows lost, with the refused.
    pub const FLOW_STALE: u32 = 5;
    /// Flows kept in the table, closed, for the next socket at their
    /// address (`Config::flows_kept_closed`).
    pub const FLOW_KEPT_CLOSED: u32 = 6;
    /// Closed flows whose entry a new connection took. Kept - reused -
    /// what userspace swept = closed flows in the table now.
    pub const FLOW_REUSED: u32 = 7;
    pub const COUNT: u32 = 8;
}

/// The eBPF programs, each with a slot in the per-CPU `PROGRAM_ERRORS` map:
/// failures inside a program (a kernel read refused, a map full, a record
/// shorter than expected) are counted there, not thrown away.
pub mod program {
    pub const INET_SOCK_SET_STATE: u32 = 0;
    pub const TCP_RETRANSMIT_SKB: u32 = 1;
    pub const TCP_RETRANSMIT_SYNACK: u32 = 2;
    pub const TCP_SEND_RESET: u32 = 3;
    pub const TCP_RECEIVE_RESET: u32 = 4;
    pub const TCP_PROBE: u32 = 5;
    pub const SK_DATA_READY: u32 = 6;
    pub const TCP_DATA_READY_FENTRY: u32 = 7;
    pub const TCP_DATA_READY_KPROBE: u32 = 8;
    pub const TCP_CONG_STATE_SET: u32 = 9;
    pub const KFREE_SKB: u32 = 10;
    pub const CONSUME_SKB: u32 = 11;
    pub const FENTRY_TCP_CONN_REQUEST: u32 = 12;
    pub const FEXIT_TCP_V4_SYN_RECV_SOCK: u32 = 13;
    pub const FEXIT_TCP_V6_SYN_RECV_SOCK: u32 = 14;
    pub const KPROBE_TCP_CONN_REQUEST: u32 = 15;
    pub const KPROBE_TCP_V4_SYN_RECV_SOCK: u32 = 16;
    pub const KPROBE_TCP_V6_SYN_RECV_SOCK: u32 = 17;
    pub const FEXIT_INET_CSK_ACCEPT: u32 = 18;
    pub const KPROBE_INET_CSK_ACCEPT: u32 = 19;
    pub const KRETPROBE_INET_CSK_ACCEPT: u32 = 20;
    pub const SYS_ENTER_ACCEPT: u32 = 21;
    pub const SYS_EXIT_ACCEPT: u32 = 22;
    pub const FEXIT_TCP_CONN_REQUEST: u32 = 23;
    /// BTF-tracepoint builds of the lifecycle and tcp_probe (sock.rs).
    pub const INET_SOCK_SET_STATE_BTF: u32 = 24;
    pub const TCP_PROBE_BTF: u32 = 25;
    pub const TCP_CONG_STATE_SET_BTF: u32 = 26;
    pub const SK_DATA_READY_BTF: u32 = 27;
    pub const CONSUME_SKB_BTF: u32 = 28;
    pub const SYS_EXIT_ACCEPT_TYPED: u32 = 29;
    /// The accept exit that needs no enter hook (accept.rs).
    pub const SYS_EXIT_ACCEPT_REGS: u32 = 30;
    /// The overflow count before a final ACK makes its child (overflow).
    pub const FENTRY_TCP_V4_SYN_RECV_SOCK: u32 = 31;
    pub const FENTRY_TCP_V6_SYN_RECV_SOCK: u32 = 32;
    pub const TCP_RETRANSMIT_SKB_BTF: u32 = 33;
    pub const TCP_RECEIVE_RESET_BTF: u32 = 34;
    pub const TCP_SEND_RESET_BTF: u32 = 35;
    pub const TCP_RETRANSMIT_SYNACK_BTF: u32 = 36;
    pub const COUNT: u32 = 37;

    /// The programs' names in the eBPF object, by slot.
    pub const NAMES: [&str; COUNT as usize] = [
        "inet_sock_set_state",
        "tcp_retransmit_skb",
        "tcp_retransmit_synack",
        "tcp_send_reset",
        "tcp_receive_reset",
        "tcp_probe",
        "sk_data_ready",
        "tcp_data_ready_fentry",
        "tcp_data_ready_kprobe",
        "tcp_cong_state_set",
        "kfree_skb",
        "consume_skb",
        "fentry_tcp_conn_request",
        "fexit_tcp_v4_syn_recv_sock",
        "fexit_tcp_v6_syn_recv_sock",
        "kprobe_tcp_conn_request",
        "kprobe_tcp_v4_syn_recv_sock",
        "kprobe_tcp_v6_syn_recv_sock",
        "fexit_inet_csk_accept",
        "kprobe_inet_csk_accept",
        "kretprobe_inet_csk_accept",
        "sys_enter_accept",
        "sys_exit_accept",
        "fexit_tcp_conn_request",
        "inet_sock_set_state_btf",
        "tcp_probe_btf",
        "tcp_cong_state_set_btf",
        "sk_data_ready_btf",
        "consume_skb_btf",
        "sys_exit_accept_typed",
        "sys_exit_accept_regs",
        "fentry_tcp_v4_syn_recv_sock",
        "fentry_tcp_v6_syn_recv_sock",
        "tcp_retransmit_skb_btf",
        "tcp_receive_reset_btf",
        "tcp_send_reset_btf",
        "tcp_retransmit_synack_btf",
    ];

    /// Programs that only add to per-CPU counts (packet drop reasons, listen
    /// overflows): a run the kernel skips makes a count short, not an event
    /// go missing. Most of what the first two see is not TCP at all.
    pub const COUNT_ONLY: [&str; 10] = [
        "kfree_skb",
        "consume_skb",
        "consume_skb_btf",
        "fexit_tcp_conn_request",
        "fexit_tcp_v4_syn_recv_sock",
        "fexit_tcp_v6_syn_recv_sock",
        "fentry_tcp_v4_syn_recv_sock",
        "fentry_tcp_v6_syn_recv_sock",
        "kprobe_tcp_v4_syn_recv_sock",
        "kprobe_tcp_v6_syn_recv_sock",
    ];

    /// The slot of the program named `name`.
    pub fn id(name: &str) -> Option<u32> {
        NAMES.iter().position(|n| *n == name).map(|i| i as u32)
    }
}

/// Capacity of the in-kernel flow table (an LRU hash keyed by socket) as
/// compiled, and the least the daemon gives it; userspace sizes it when it
/// loads the object (netlens/src/loader/sizing.rs).
pub const FLOW_TABLE_ENTRIES: u32 = 65_536;
/// Capacity of the SYN-ACK start table (an LRU hash keyed by 4-tuple).
pub const SYNACK_TABLE_ENTRIES: u32 = 8_192;
/// The longest block the programs copy in one read: a tracepoint record,
/// a socket's head or the per-packet window of `tcp_sock`.
pub const RECORD_MAX: usize = 512;

/// Capacity of the listener tables (listeners by port, overflows by
/// listener, accept() calls in progress).
pub const LISTENER_TABLE_ENTRIES: u32 = 4_096;
/// Capacity of the listen-overflow counts (an LRU hash of per-CPU counts,
/// keyed by listening endpoint): listeners that overflowed while netlens
/// ran. Smaller than the listener tables: each entry is a per-CPU
/// allocation when the map is made (4,096 took 3.9 ms of start-up here).
pub const LISTEN_OVERFLOW_ENTRIES: u32 = 1_024;
/// Drop reasons counted per CPU by `skb:kfree_skb` (values of `enum
/// skb_drop_reason` below this; subsystem reasons above are not counted).
pub const DROP_REASONS: u32 = 256;
/// Bits of the `MODES` map (set by userspace once it chose the hooks).
pub mod mode {
    /// Listen overflows come from tracepoints: `kfree_skb` counts the
    /// final-ACK ones (reason TCP_LISTEN_OVERFLOW).
    pub const OVERFLOWS_FROM_TRACEPOINTS: u32 = 1;
    /// A program that records SYN arrivals (fentry or kprobe on
    /// `tcp_conn_request`) may be attached: passive opens look for theirs.
    /// Set before those programs attach, cleared if none did.
    pub const SYN_STARTS_RECORDED: u32 = 2;
}

/// Size of the event ring buffer in bytes (a power of two, page aligned).
pub const RING_BYTES: u32 = 8 << 20;
