//! Offsets resolved in userspace at start-up and handed to the programs.
//!
//! Rust eBPF has no CO-RE, so nothing about the running kernel's layout is
//! compiled in: tracepoint record offsets come from tracefs `format` files,
//! kernel struct offsets from BTF. Userspace fills a [`Config`] and writes it
//! into the programs' read-only `CONFIG` global before loading.

/// Byte offsets of the 4-tuple fields in a tracepoint record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TupleFields {
    /// [`FIELD_ABSENT`] on kernels whose record has no `family` (5.10): the
    /// programs then read it from the record's socket.
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub saddr: u16,
    pub daddr: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
    pub _pad: u16,
}

/// `tcp:tcp_retransmit_skb`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetransmitFields {
    pub skbaddr: u16,
    pub skaddr: u16,
    pub state: u16,
    /// Offset of `err`, or [`FIELD_ABSENT`] on kernels that trace only
    /// successful retransmissions (before 6.10).
    pub err: u16,
    pub tuple: TupleFields,
    pub len: u16,
    pub _pad: u16,
}

/// `tcp:tcp_retransmit_synack`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynackFields {
    pub skaddr: u16,
    pub req: u16,
    pub len: u16,
    pub _pad: u16,
    pub tuple: TupleFields,
}

/// `tcp:tcp_send_reset`, in one of two layouts: since 6.10 the addresses
/// are `sockaddr_in6`-sized buffers (`saddr`, `daddr`) and the socket may be
/// NULL; before, the record has the usual 4-tuple fields (`tuple`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendResetFields {
    pub skbaddr: u16,
    pub skaddr: u16,
    pub state: u16,
    /// Offsets of the sockaddr buffers, or [`FIELD_ABSENT`] in the older
    /// layout (then `tuple` holds the endpoints).
    pub saddr: u16,
    pub daddr: u16,
    pub len: u16,
    pub tuple: TupleFields,
}

/// `tcp:tcp_receive_reset`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiveResetFields {
    pub skaddr: u16,
    pub len: u16,
    pub _pad: [u16; 2],
    pub tuple: TupleFields,
}

/// `tcp:tcp_cong_state_set`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CongStateFields {
    pub skaddr: u16,
    pub cong_state: u16,
    pub len: u16,
    pub _pad: u16,
}

/// How many windows of `tcp_sock` the per-packet program copies at most.
pub const PROBE_WINDOWS: usize = 3;

/// One contiguous stretch of a kernel struct, copied in one read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Window {
    /// Offset in the struct; `len` 0: unused window.
    pub start: u32,
    pub len: u32,
}

/// The `tcp_sock` members the per-packet program needs. Where they lie
/// differs across kernels (they span 560 bytes on 5.10 and 6.1, under 300
/// on 6.12+), so userspace groups them into up to [`PROBE_WINDOWS`]
/// windows, split at the largest gaps. Window `i` is copied to bytes
/// `i * RECORD_MAX ..` of a scratch buffer; each field below is its offset
/// in that buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeOffsets {
    pub windows: [Window; PROBE_WINDOWS],
    /// The same members' offsets in `tcp_sock` itself, for programs that
    /// read a BTF-typed socket directly: one load each, no window to place.
    pub at: TcpSockMembers,
    /// `snd_wnd` (u32): the window the peer advertised.
    pub snd_wnd: u16,
    /// `snd_cwnd` (u32), `snd_ssthresh` (u32).
    pub snd_cwnd: u16,
    pub snd_ssthresh: u16,
    /// `rtt_min.s[0].v` (u32, µs).
    pub min_rtt: u16,
    /// `rcv_nxt` (u32), `srtt_us` (u32, << 3), `rcv_wnd` (u32).
    pub rcv_nxt: u16,
    pub srtt_us: u16,
    pub rcv_wnd: u16,
    /// The byte holding the `icsk_ca_state` bitfield, its shift and mask:
    /// the congestion state, read per segment on kernels without
    /// `tcp:tcp_cong_state_set`.
    pub ca_state: u16,
    pub ca_state_shift: u8,
    pub ca_state_mask: u8,
    pub _pad: [u8; 6],
}

/// Offsets in `struct tcp_sock` of what the per-packet program reads
/// (see [`ProbeOffsets`] for each member's meaning).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpSockMembers {
    pub snd_wnd: u32,
    pub snd_cwnd: u32,
    pub snd_ssthresh: u32,
    pub min_rtt: u32,
    pub rcv_nxt: u32,
    pub srtt_us: u32,
    pub rcv_wnd: u32,
    /// The byte holding the `icsk_ca_state` bitfield.
    pub ca_state: u32,
}

/// Marks an optional field the running kernel does not have.
pub const FIELD_ABSENT: u16 = u16::MAX;

/// Where a socket's endpoints live in `struct sock` (its `sock_common`
/// head), resolved from BTF. The raw `inet_sock_set_state` program copies
/// the first `len` bytes in one read and picks these out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockTupleOffsets {
    /// `skc_family` (u16).
    pub family: u16,
    /// `skc_num`: local port, host byte order (u16). Only a request
    /// socket's is read: a full socket's local port is read from
    /// `inet_sock.inet_sport` (see `KernelOffsets::inet_sport`).
    pub num: u16,
    /// `skc_dport`: remote port, network byte order (u16).
    pub dport: u16,
    /// `skc_rcv_saddr`: local IPv4 address.
    pub rcv_saddr: u16,
    /// `skc_daddr`: remote IPv4 address.
    pub daddr: u16,
    /// `skc_v6_rcv_saddr`: local IPv6 address.
    pub v6_rcv_saddr: u16,
    /// `skc_v6_daddr`: remote IPv6 address.
    pub v6_daddr: u16,
    /// Bytes to copy: the end of the last of these fields.
    pub len: u16,
}

/// Kernel struct member offsets, in bytes, resolved from BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub sock_tuple: SockTupleOffsets,
    /// `struct sock` → `sk_protocol` (u16).
    pub sock_protocol: u32,
    /// `struct inet_sock` → `inet_sport`: local port, network byte order.
    /// Not `skc_num`: tcp_set_state() releases the port (zeroing skc_num)
    /// before it announces CLOSE.
    pub inet_sport: u32,
    /// `struct sock` → `sk_err` (int).
    pub sock_sk_err: u32,
    /// `struct sock` → `__sk_common.skc_net.net` (struct net *).
    pub sock_net: u32,
    /// `struct net` → `ns.inum` (unsigned int).
    pub net_inum: u32,
    /// `struct sock` → `sk_cgrp_data.cgroup` (struct cgroup *), or 0 when the
    /// kernel has no socket cgroup data.
    pub sock_cgroup: u32,
    /// `struct cgroup` → `kn` (struct kernfs_node *).
    pub cgroup_kn: u32,
    /// `struct kernfs_node` → `id` (u64): the cgroup id userspace sees.
    pub kernfs_node_id: u32,
    /// `struct tcp_sock` → `srtt_us` (u32, smoothed RTT << 3).
    pub tcp_srtt_us: u32,
    /// `struct tcp_sock` → `snd_cwnd` (u32), `rcv_nxt` (u32): for single
    /// reads outside the per-packet program.
    pub tcp_snd_cwnd: u32,
    pub tcp_rcv_nxt: u32,
    /// `struct tcp_sock` → `rcv_ooopack` (u32, segments ever queued out of
    /// order; 5.4+), or 0 where the kernel lacks it.
    pub tcp_rcv_ooopack: u32,
    /// `struct tcp_sock` → `tcp_clock_cache` (u64, ns: when the socket last
    /// read the clock; 4.20+), or 0 where the kernel lacks it.
    pub tcp_clock_cache: u32,
    /// The byte of `struct tcp_sock` holding the `icsk_ca_state` bitfield
    /// (shift and mask in [`ProbeOffsets`]).
    pub icsk_ca_state: u32,
    /// `struct tcp_sock` → `total_retrans` (u32, segments).
    pub tcp_total_retrans: u32,
    /// `struct tcp_sock` → `segs_out` (u32, segments sent, retransmissions included).
    pub tcp_segs_out: u32,
    /// `struct tcp_sock` → `bytes_sent` (u64, payload incl. retransmissions).
    pub tcp_bytes_sent: u32,
    /// `struct tcp_sock` → `bytes_retrans` (u64, retransmitted payload).
    pub tcp_bytes_retrans: u32,
    /// `struct tcp_sock` → `bytes_received` (u64).
    pub tcp_bytes_received: u32,
    /// `struct tcp_sock` → `dsack_dups` (u32, segments reported as duplicates).
    pub tcp_dsack_dups: u32,
    /// `struct sock` → `__sk_common.skc_flags` (sk_flags, unsigned long).
    pub sock_flags: u32,
    /// Bit of SOCK_DONE in `sk_flags`: set by tcp_fin(), i.e. the peer's FIN
    /// arrived (and took one sequence number into bytes_received).
    pub sock_done_bit: u32,
    /// `struct sk_buff` → `dev` (struct net_device *).
    pub skb_dev: u32,
    /// `struct net_device` → `nd_net.net` (struct net *).
    pub netdev_net: u32,
    /// `struct tcp_request_sock` → `snt_synack` (u64, µs, tcp_clock_us()).
    pub treq_snt_synack: u32,
    /// `struct sk_buff` → `cb` (the TCP control block lives there).
    pub skb_cb: u32,
    /// `struct tcp_skb_cb` → `tcp_gso_segs` (u16).
    pub tcb_gso_segs: u32,
    /// `struct tcp_skb_cb` → `seq` (u32); `end_seq` follows it.
    pub tcb_seq: u32,
    /// `struct inet_connection_sock` → `icsk_ca_ops` (pointer).
    pub icsk_ca_ops: u32,
    /// `struct tcp_congestion_ops` → `name` (char[16]).
    pub ca_ops_name: u32,
    /// `struct sk_buff` → `data` (unsigned char *): where tcp_probe's
    /// segment starts, at its TCP header.
    pub skb_data: u32,
    /// `struct tcp_sock` → `rx_opt.ts_recent_stamp` (int, seconds), with
    /// `rx_opt.ts_recent` (u32) right after it: the last in-order
    /// timestamp, for the PAWS test (`paws::rejects`); 0 where the kernel
    /// lays them out otherwise, and segments are taken as accepted.
    pub tcp_ts_recent_stamp: u32,
    /// The kernel's `TCP_PAWS_WRAP` or `TCP_PAWS_24DAYS` (`paws::PAWS_WRAP_S`).
    pub paws_wrap_s: u32,
    /// The BTF id of `struct tcp_sock`, where the typed programs reach it
    /// through the `bpf_rdonly_cast` kfunc; 0 where they call the
    /// `bpf_skc_to_tcp_sock` helper (see `CAST_CALL`).
    pub tcp_sock_btf_id: u32,
}

/// What the accept-queue programs (accept.rs, overflow.rs) need: struct
/// members from BTF, tracepoint fields from tracefs, raw tracepoint
/// argument positions from BTF (`btf_trace_*` prototypes) and one code
/// range from /proc/kallsyms. A hook whose facts are missing is not loaded
/// (the loader checks `Available`), so zeros here are never used.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AcceptQueueConfig {
    /// `struct sock` → `sk_ack_backlog`, `sk_max_ack_backlog` (u32 each).
    pub sock_ack_backlog: u32,
    pub sock_max_ack_backlog: u32,
    /// `struct sock` → `__sk_common.skc_state` (u8).
    pub sock_state: u32,
    /// `struct sock` → `sk_drops` (atomic_t): every listen drop counts
    /// there (`tcp_listendrop`).
    pub sock_drops: u32,
    /// current → `files` → `fdt` → `fd[]` / `max_fds`; `file` →
    /// `private_data` (struct socket *); `socket` → `sk`.
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_fd: u32,
    pub fdt_max_fds: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    /// The BTF ids of `struct file` and `struct socket`, where the typed
    /// accept program walks them with plain loads (the `bpf_rdonly_cast`
    /// kfunc, see `CAST_CALL`); 0 where it copies them by probe reads.
    pub file_btf_id: u32,
    pub socket_btf_id: u32,
    /// The BTF id of `struct dst_entry`, where the typed SYN program
    /// follows an skb's route to its namespace by plain loads; else 0.
    pub dst_entry_btf_id: u32,
    /// `struct sk_buff` → `head`, `transport_header` and `network_header`
    /// (u16), `protocol` (__be16), `_skb_refdst`; `struct dst_entry` → `dev`.
    pub skb_head: u32,
    pub skb_transport_header: u32,
    pub skb_network_header: u32,
    pub skb_protocol: u32,
    pub skb_refdst: u32,
    pub dst_dev: u32,
    /// `SKB_DROP_REASON_TCP_LISTEN_OVERFLOW` and `SKB_DROP_REASON_NO_SOCKET`,
    /// from BTF.
    pub listen_overflow_reason: u32,
    pub no_socket_reason: u32,
    /// Raw `kfree_skb` arguments: the drop reason and the receiving socket
    /// (`rx_sk`, [`NO_ARG`] before 6.11).
    pub kfree_skb_reason_arg: u8,
    pub kfree_skb_rx_sk_arg: u8,
    /// Raw `consume_skb` argument: `location` (the caller).
    pub consume_skb_location_arg: u8,
    /// Parameters of `inet_csk_accept` (4 before 6.10, 2 since): fexit
    /// finds the return value after them.
    pub inet_csk_accept_args: u8,
    /// Raw `kfree_skb` argument: `location` (the caller).
    pub kfree_skb_location_arg: u8,
    /// Parameters of `tcp_v4_syn_recv_sock` and `tcp_v6_syn_recv_sock`
    /// (6, or 7 with `opt_child_init`; 0 when they differ): fexit finds
    /// the return value after them.
    pub syn_recv_sock_args: u8,
    pub _pad: [u8; 2],
    /// `syscalls:sys_enter_accept4`/`sys_enter_accept`: `fd`;
    /// `sys_exit_accept4`/`sys_exit_accept`: `ret` (same offsets in both).
    pub accept_enter_fd: u16,
    pub accept_enter_len: u16,
    pub accept_exit_ret: u16,
    pub accept_exit_len: u16,
    /// `struct pt_regs` → `di`: the first argument of a syscall as the task
    /// made it, still saved at its exit on x86-64 (where the return value
    /// goes to `ax`). Lets the accept exit find the listening fd without
    /// an enter hook; absent elsewhere.
    pub regs_first_arg: u32,
    /// The BTF id of `struct tcphdr`, where the typed SYN program reads a
    /// consumed skb's TCP header by plain loads; else 0.
    pub tcphdr_btf_id: u32,
    /// The BTF id of `struct list_head` (a pointer first), where the typed
    /// accept exit loads an fd-table slot, at an index known only at run
    /// time, through a cast of the slot's address; else 0 (a probe read).
    pub pointer_btf_id: u32,
    /// `struct task_struct` → `comm`: the accepting task's name by two
    /// plain loads where the exit has the task typed by BTF.
    pub task_comm: u32,
    /// The kernel's per-CPU count of listen overflows, which the
    /// tracepoint path reads on this CPU (see overflow/mib.rs):
    /// `struct bpf_array` → `pptrs` (a per-CPU map's per-CPU pointers),
    /// `struct net` → `mib.net_statistics`, and where
    /// `LINUX_MIB_LISTENOVERFLOWS` lies in `struct linux_mib` (its index
    /// × 8). `u32::MAX` where BTF lacks one.
    pub bpf_array_pptrs: u32,
    pub net_mib_statistics: u32,
    pub mib_listen_overflows: u32,
    /// The BTF id of `struct linux_mib`, where the typed SYN program reads
    /// the counter by a plain load through a cast; else 0 (probe reads).
    pub linux_mib_btf_id: u32,
}

/// An argument position a kernel does not have.
pub const NO_ARG: u8 = u8::MAX;

/// Kernel functions whose code the accept-queue tracepoint programs test a
/// caller address against, by index in the `CODE_RANGES` map (`[start,
/// end)`, from /proc/kallsyms). A map, not `Config`: reading kallsyms takes
/// ~40 ms of kernel time, so userspace reads it while the other programs
/// load and fills the map before these programs attach.
pub mod code_range {
    /// `tcp_rcv_state_process`: a SYN it consumes went through the
    /// listener's `conn_request`.
    pub const SYN_CONSUMER: u32 = 0;
    /// `cookie_v4_check` and `cookie_v6_check`: an ACK carrying a SYN
    /// cookie whose child could not be queued is freed there (reason
    /// `NO_SOCKET`, `rx_sk` the listener).
    pub const COOKIE_V4: u32 = 1;
    pub const COOKIE_V6: u32 = 2;
    pub const COUNT: u32 = 3;
    /// Their names in /proc/kallsyms, by index.
    pub const FUNCTIONS: [&str; COUNT as usize] = ["tcp_rcv_state_process", "cookie_v4_check", "cookie_v6_check"];
}

/// Everything the programs need to know about the running kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub probe: ProbeOffsets,
    pub cong_state: CongStateFields,
    pub retransmit: RetransmitFields,
    pub synack: SynackFields,
    pub send_reset: SendResetFields,
    pub receive_reset: ReceiveResetFields,
    pub kernel: KernelOffsets,
    pub accept_queue: AcceptQueueConfig,
    /// The kernel wakes userspace once this many event bytes are pending;
    /// below that, userspace drains on its own timer. Set per command: a
    /// wake-up costs a context switch, and only `trace` shows events as
    /// they come.
    pub wakeup_bytes: u32,
    /// 1: flows live in socket storage, else in the hash table (the
    /// eBPF crate's flows.rs; the loader chooses).
    pub flows_in_storage: u32,
    /// 1: the table keeps a closed flow's entry for the next socket at its
    /// address, and userspace sweeps the ones left (loader/closed_flows.rs);
    /// 0: a close removes its entry.
    pub flows_kept_closed: u32,
    /// 1: flows live in the array of slots (`FLOW_OWNERS`, `FLOW_SLOTS`),
    /// found by their socket's hashed address.
    pub flows_in_slots: u32,
    /// The array's buckets less one (a power of two less one): a hash's
    /// mask.
    pub flow_slot_mask: u32,
    pub _pad_flows: u32,
}

/// [`Config::wakeup_bytes`] where nothing else is asked for.
pub const DEFAULT_WAKEUP_BYTES: u32 = 64 * 1024;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)] with only integer fields and
    // explicit padding, so any bit pattern is valid.
    unsafe impl aya::Pod for super::Config {}
}
