//! Builds the [`Config`] handed to the eBPF programs: tracepoint record
//! offsets from tracefs, kernel struct offsets from BTF. Nothing about the
//! kernel's layout is hard-coded.

use std::path::Path;

use anyhow::{Context as _, Result};
use netlens_common::{
    AcceptQueueConfig, CongStateFields, Config, KernelOffsets, ProbeOffsets, ReceiveResetFields, RetransmitFields, SendResetFields, SockTupleOffsets,
    SynackFields, TupleFields, FIELD_ABSENT, NO_ARG, RECORD_MAX,
};

use super::{btf::KernelBtf, tracefs::Format};

fn tuple(format: &Format) -> Result<TupleFields> {
    Ok(TupleFields {
        family: format.offset("family", 2)?,
        sport: format.offset("sport", 2)?,
        dport: format.offset("dport", 2)?,
        saddr: format.offset("saddr", 4)?,
        daddr: format.offset("daddr", 4)?,
        saddr_v6: format.offset("saddr_v6", 16)?,
        daddr_v6: format.offset("daddr_v6", 16)?,
        _pad: 0,
    })
}

/// The kernel functions whose code ranges the accept-queue programs test
/// (see overflow.rs in netlens-ebpf).
const CODE_RANGES: [&str; 3] = ["tcp_rcv_state_process", "cookie_v4_check", "cookie_v6_check"];

pub fn resolve(tracefs: &Path, btf: &KernelBtf) -> Result<Config> {
    // Reading /proc/kallsyms costs ~50 ms of kernel time: on its own
    // thread, while the rest resolves.
    let code_ranges = std::thread::spawn(|| super::kallsyms::function_ranges(&CODE_RANGES));
    let retransmit = Format::read(tracefs, "tcp", "tcp_retransmit_skb")?;
    let synack = Format::read(tracefs, "tcp", "tcp_retransmit_synack")?;
    let send_reset = Format::read(tracefs, "tcp", "tcp_send_reset")?;
    let receive_reset = Format::read(tracefs, "tcp", "tcp_receive_reset")?;
    let cong_state = Format::read(tracefs, "tcp", "tcp_cong_state_set")?;
    Ok(Config {
        probe: probe_offsets(btf).context("resolving tcp_sock members for tcp_probe")?,
        cong_state: CongStateFields {
            skaddr: cong_state.offset("skaddr", 8)?,
            cong_state: cong_state.offset("cong_state", 1)?,
            len: cong_state.record_len()?,
            _pad: 0,
        },
        retransmit: RetransmitFields {
            skbaddr: retransmit.offset("skbaddr", 8)?,
            skaddr: retransmit.offset("skaddr", 8)?,
            state: retransmit.offset("state", 4)?,
            err: retransmit.optional_offset("err", 4)?.unwrap_or(FIELD_ABSENT),
            tuple: tuple(&retransmit)?,
            len: retransmit.record_len()?,
            _pad: 0,
        },
        synack: SynackFields {
            skaddr: synack.offset("skaddr", 8)?,
            req: synack.offset("req", 8)?,
            len: synack.record_len()?,
            _pad: 0,
            tuple: tuple(&synack)?,
        },
        send_reset: SendResetFields {
            skbaddr: send_reset.offset("skbaddr", 8)?,
            skaddr: send_reset.offset("skaddr", 8)?,
            state: send_reset.offset("state", 4)?,
            saddr: send_reset.offset("saddr", 28)?,
            daddr: send_reset.offset("daddr", 28)?,
            len: send_reset.record_len()?,
        },
        receive_reset: ReceiveResetFields {
            skaddr: receive_reset.offset("skaddr", 8)?,
            len: receive_reset.record_len()?,
            _pad: [0; 2],
            tuple: tuple(&receive_reset)?,
        },
        kernel: kernel_offsets(btf).context("resolving kernel struct offsets from BTF")?,
        accept_queue: accept_queue(tracefs, btf, code_ranges.join().ok().and_then(Result::ok).unwrap_or_default()),
    })
}

/// The accept-queue facts this kernel has; what it lacks stays zero (or
/// [`NO_ARG`]) and [`AcceptQueueSupport`] tells which hooks can work.
fn accept_queue(tracefs: &Path, btf: &KernelBtf, code_ranges: [(u64, u64); CODE_RANGES.len()]) -> AcceptQueueConfig {
    let member = |name: &str, path: &str| btf.optional_offset(name, path).unwrap_or(MISSING);
    let position = |args: &[String], wanted: &str| {
        args.iter().position(|arg| arg == wanted).map_or(NO_ARG, |at| at as u8)
    };
    let kfree_skb = btf.raw_tracepoint_args("kfree_skb").unwrap_or_default();
    let consume_skb = btf.raw_tracepoint_args("consume_skb").unwrap_or_default();
    // `location` is the second `void *` (after the skb) of consume_skb.
    let location = match consume_skb.as_slice() {
        [_, location, ..] if location == "void *" => 1,
        _ => NO_ARG,
    };
    let [(syn_consumer_start, syn_consumer_end), (cookie_v4_start, cookie_v4_end), (cookie_v6_start, cookie_v6_end)] =
        code_ranges;
    let accept_args = btf.function_params("inet_csk_accept").map_or(0, |params| params.len() as u8);
    let mut config = AcceptQueueConfig {
        sock_ack_backlog: member("sock", "sk_ack_backlog"),
        sock_max_ack_backlog: member("sock", "sk_max_ack_backlog"),
        sock_state: member("sock", "__sk_common.skc_state"),
        task_files: member("task_struct", "files"),
        files_fdt: member("files_struct", "fdt"),
        fdt_fd: member("fdtable", "fd"),
        fdt_max_fds: member("fdtable", "max_fds"),
        file_private_data: member("file", "private_data"),
        socket_sk: member("socket", "sk"),
        skb_head: member("sk_buff", "head"),
        skb_transport_header: member("sk_buff", "transport_header"),
        skb_network_header: member("sk_buff", "network_header"),
        skb_protocol: member("sk_buff", "protocol"),
        skb_refdst: member("sk_buff", "_skb_refdst"),
        dst_dev: member("dst_entry", "dev"),
        listen_overflow_reason: btf
            .enum_value("skb_drop_reason", "SKB_DROP_REASON_TCP_LISTEN_OVERFLOW")
            .unwrap_or(u32::MAX),
        no_socket_reason: btf.enum_value("skb_drop_reason", "SKB_DROP_REASON_NO_SOCKET").unwrap_or(u32::MAX),
        kfree_skb_reason_arg: position(&kfree_skb, "enum skb_drop_reason"),
        kfree_skb_location_arg: position(&kfree_skb, "void *"),
        kfree_skb_rx_sk_arg: position(&kfree_skb, "struct sock *"),
        consume_skb_location_arg: location,
        inet_csk_accept_args: accept_args,
        syn_consumer_start,
        syn_consumer_end,
        cookie_v4_start,
        cookie_v4_end,
        cookie_v6_start,
        cookie_v6_end,
        ..AcceptQueueConfig::default()
    };
    // accept and accept4 must agree: one program serves both.
    let fields = |name: &str, field: &str| -> Option<(u16, u16)> {
        let format = Format::read(tracefs, "syscalls", name).ok()?;
        Some((format.offset(field, 8).ok()?, format.record_len().ok()?))
    };
    if let (Some(enter), Some(enter4), Some(exit), Some(exit4)) = (
        fields("sys_enter_accept", "fd"),
        fields("sys_enter_accept4", "fd"),
        fields("sys_exit_accept", "ret"),
        fields("sys_exit_accept4", "ret"),
    ) {
        if enter.0 == enter4.0 && exit.0 == exit4.0 {
            (config.accept_enter_fd, config.accept_enter_len) = (enter.0, enter.1.max(enter4.1));
            (config.accept_exit_ret, config.accept_exit_len) = (exit.0, exit.1.max(exit4.1));
        }
    }
    config
}

/// A struct member this kernel lacks (0 is a real offset).
const MISSING: u32 = u32::MAX;

/// Which accept-queue hooks can work on this kernel, from the resolved
/// facts; `Err` says what is missing.
pub struct AcceptQueueSupport {
    /// The listener's queue members (every variant reads them), and
    /// `sk_buff.protocol` (the IPv6 variants check it).
    pub queue: Result<(), String>,
    /// fexit on inet_csk_accept: the return value's position.
    pub fexit_accept: Result<(), String>,
    /// syscalls:sys_{enter,exit}_accept{,4} and the fd → socket walk.
    pub accept_syscalls: Result<(), String>,
    /// kfree_skb with a reason (drop-reason counts).
    pub drop_reasons: Result<(), String>,
    /// kfree_skb's TCP_LISTEN_OVERFLOW with rx_sk, and consume_skb's caller
    /// for the SYN path.
    pub overflow_tracepoints: Result<(), String>,
}

fn need(ok: bool, missing: &str) -> Result<(), String> {
    if ok { Ok(()) } else { Err(missing.to_string()) }
}

impl AcceptQueueSupport {
    pub fn of(config: &AcceptQueueConfig) -> Self {
        let c = config;
        let has = |members: &[u32]| members.iter().all(|&m| m != MISSING);
        let queue = need(
            has(&[c.sock_ack_backlog, c.sock_max_ack_backlog, c.sock_state, c.skb_protocol, c.skb_head, c.skb_network_header, c.skb_transport_header]),
            "struct sock has no sk_ack_backlog/sk_max_ack_backlog, or sk_buff lacks its header members",
        );
        let with_queue = |result: Result<(), String>| queue.clone().and(result);
        Self {
            fexit_accept: with_queue(need(matches!(c.inet_csk_accept_args, 2 | 4), "inet_csk_accept has neither 2 nor 4 parameters in BTF")),
            accept_syscalls: with_queue(need(
                c.accept_exit_len != 0 && has(&[c.task_files, c.files_fdt, c.fdt_fd, c.fdt_max_fds, c.file_private_data, c.socket_sk]),
                "no syscalls:sys_*_accept{,4} tracepoints with matching layouts, or no fd table members in BTF",
            )),
            drop_reasons: need(c.kfree_skb_reason_arg != NO_ARG, "kfree_skb has no drop reason (before 5.17)"),
            overflow_tracepoints: with_queue(
                need(c.kfree_skb_reason_arg != NO_ARG && c.kfree_skb_rx_sk_arg != NO_ARG, "kfree_skb has no reason or no rx_sk (before 6.11)")
                    .and(need(c.listen_overflow_reason != u32::MAX, "enum skb_drop_reason has no SKB_DROP_REASON_TCP_LISTEN_OVERFLOW"))
                    .and(need(c.consume_skb_location_arg != NO_ARG, "consume_skb has no location argument"))
                    .and(need(c.syn_consumer_start != 0 && c.syn_consumer_end > c.syn_consumer_start, "tcp_rcv_state_process not in /proc/kallsyms"))
                    .and(need(has(&[c.skb_head, c.skb_transport_header, c.skb_refdst, c.dst_dev]), "sk_buff/dst_entry members missing from BTF")),
            ),
            queue,
        }
    }
}

fn kernel_offsets(btf: &KernelBtf) -> Result<KernelOffsets> {
    // Socket cgroup data is optional (CONFIG_SOCK_CGROUP_DATA); without it,
    // passive connections carry no cgroup.
    let (sock_cgroup, cgroup_kn, kernfs_node_id) = match (
        btf.optional_offset("sock", "sk_cgrp_data.cgroup"),
        btf.optional_offset("cgroup", "kn"),
        btf.optional_offset("kernfs_node", "id"),
    ) {
        (Some(a), Some(b), Some(c)) => (a, b, c),
        _ => (0, 0, 0),
    };
    Ok(KernelOffsets {
        sock_tuple: sock_tuple(btf)?,
        sock_protocol: btf.offset("sock", "sk_protocol")?,
        inet_sport: btf.offset("inet_sock", "inet_sport")?,
        sock_sk_err: btf.offset("sock", "sk_err")?,
        sock_net: btf.offset("sock", "__sk_common.skc_net.net")?,
        net_inum: btf.offset("net", "ns.inum")?,
        sock_cgroup,
        cgroup_kn,
        kernfs_node_id,
        tcp_srtt_us: btf.offset("tcp_sock", "srtt_us")?,
        tcp_total_retrans: btf.offset("tcp_sock", "total_retrans")?,
        tcp_segs_out: btf.offset("tcp_sock", "segs_out")?,
        tcp_bytes_sent: btf.offset("tcp_sock", "bytes_sent")?,
        tcp_bytes_retrans: btf.offset("tcp_sock", "bytes_retrans")?,
        tcp_bytes_received: btf.offset("tcp_sock", "bytes_received")?,
        tcp_dsack_dups: btf.offset("tcp_sock", "dsack_dups")?,
        sock_flags: btf.offset("sock", "__sk_common.skc_flags")?,
        sock_done_bit: btf.enum_value("sock_flags", "SOCK_DONE")?,
        skb_dev: btf.offset("sk_buff", "dev")?,
        netdev_net: btf.offset("net_device", "nd_net.net")?,
        treq_snt_synack: btf.offset("tcp_request_sock", "snt_synack")?,
        skb_cb: btf.offset("sk_buff", "cb")?,
        tcb_gso_segs: btf.offset("tcp_skb_cb", "tcp_gso_segs")?,
        tcb_seq: tcb_seq(btf)?,
        icsk_ca_ops: btf.offset("inet_connection_sock", "icsk_ca_ops")?,
        ca_ops_name: btf.offset("tcp_congestion_ops", "name")?,
    })
}

fn sock_tuple(btf: &KernelBtf) -> Result<SockTupleOffsets> {
    let at = |member: &str, size: u32| -> Result<(u16, u32)> {
        let offset = btf.offset("sock", &format!("__sk_common.{member}"))?;
        Ok((offset as u16, offset + size))
    };
    let fields = [
        at("skc_family", 2)?,
        at("skc_dport", 2)?,
        at("skc_rcv_saddr", 4)?,
        at("skc_daddr", 4)?,
        at("skc_v6_rcv_saddr", 16)?,
        at("skc_v6_daddr", 16)?,
    ];
    let len = fields.iter().map(|(_, end)| *end).max().unwrap_or(0);
    if len as usize > RECORD_MAX {
        anyhow::bail!("struct sock_common's endpoints span {len} bytes, more than the {RECORD_MAX} netlens copies");
    }
    Ok(SockTupleOffsets {
        family: fields[0].0,
        _num: 0,
        dport: fields[1].0,
        rcv_saddr: fields[2].0,
        daddr: fields[3].0,
        v6_rcv_saddr: fields[4].0,
        v6_daddr: fields[5].0,
        len: len as u16,
    })
}

/// `seq` and `end_seq` must be adjacent: the per-packet program reads both
/// in one u64.
fn tcb_seq(btf: &KernelBtf) -> Result<u32> {
    let seq = btf.offset("tcp_skb_cb", "seq")?;
    if btf.offset("tcp_skb_cb", "end_seq")? != seq + 4 {
        anyhow::bail!("struct tcp_skb_cb: end_seq does not follow seq");
    }
    Ok(seq)
}

/// The window of `tcp_sock` the per-packet program copies: from the first
/// to the end of the last member it reads.
fn probe_offsets(btf: &KernelBtf) -> Result<ProbeOffsets> {
    let members = [
        ("snd_wnd", 4),
        ("snd_cwnd", 4),
        ("snd_ssthresh", 4),
        // struct minmax: s[0] is the current minimum, {u32 t; u32 v}.
        ("rtt_min", 8),
        ("out_of_order_queue", 8),
        ("rcv_nxt", 4),
        ("srtt_us", 4),
        ("rcv_wnd", 4),
    ];
    let mut offsets = [0u32; 8];
    for (slot, (name, _)) in offsets.iter_mut().zip(members) {
        *slot = btf.offset("tcp_sock", name)?;
    }
    let start = *offsets.iter().min().unwrap_or(&0);
    let end = offsets.iter().zip(members).map(|(o, (_, size))| o + size).max().unwrap_or(0);
    let len = end - start;
    if len as usize > RECORD_MAX {
        anyhow::bail!("tcp_sock's per-packet members span {len} bytes, more than the {RECORD_MAX} netlens copies");
    }
    let rel = |i: usize| (offsets[i] - start) as u16;
    Ok(ProbeOffsets {
        start,
        len: len as u16,
        snd_wnd: rel(0),
        snd_cwnd: rel(1),
        snd_ssthresh: rel(2),
        min_rtt: rel(3) + 4,
        ooo_queue: rel(4),
        rcv_nxt: rel(5),
        srtt_us: rel(6),
        rcv_wnd: rel(7),
        _pad: 0,
    })
}
