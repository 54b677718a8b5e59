//! The accept-queue part of the [`Config`](netlens_common::Config): the
//! struct members, tracepoint arguments and function parameters the
//! listen-overflow and accept hooks read, and which of those hooks this
//! kernel can serve ([`AcceptQueueSupport`]).

use std::path::Path;

use netlens_common::{code_range, AcceptQueueConfig, NO_ARG};

use super::super::{btf::KernelBtf, tracefs::Format};
use super::Ranges;

/// The accept-queue facts this kernel has; what it lacks stays zero (or
/// [`NO_ARG`]) and [`AcceptQueueSupport`] tells which hooks can work.
pub(super) fn config(tracefs: &Path, btf: &KernelBtf) -> AcceptQueueConfig {
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
    let accept_args = btf.function_params("inet_csk_accept").map_or(0, |params| params.len() as u8);
    let syn_recv_sock_args = syn_recv_sock_args(
        &btf.function_params("tcp_v4_syn_recv_sock").unwrap_or_default(),
        &btf.function_params("tcp_v6_syn_recv_sock").unwrap_or_default(),
    );
    let mut config = AcceptQueueConfig {
        sock_ack_backlog: member("sock", "sk_ack_backlog"),
        sock_max_ack_backlog: member("sock", "sk_max_ack_backlog"),
        sock_state: member("sock", "__sk_common.skc_state"),
        sock_drops: member("sock", "sk_drops"),
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
        syn_recv_sock_args,
        regs_first_arg: member("pt_regs", "di"),
        task_comm: member("task_struct", "comm"),
        bpf_array_pptrs: member("bpf_array", "pptrs"),
        net_mib_statistics: member("net", "mib.net_statistics"),
        // An enumerator of an anonymous enum: `mibs[]`'s index, × 8.
        mib_listen_overflows: btf.anonymous_enum_value("LINUX_MIB_LISTENOVERFLOWS").map_or(MISSING, |index| index * 8),
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
    // The fd → socket walk and the SYN's route by plain loads, where the
    // kernel has the cast.
    if btf.function_id(super::RDONLY_CAST).is_some() {
        if let (Some(file), Some(socket)) = (btf.struct_id("file"), btf.struct_id("socket")) {
            (config.file_btf_id, config.socket_btf_id) = (file, socket);
        }
        config.dst_entry_btf_id = btf.struct_id("dst_entry").unwrap_or(0);
        config.tcphdr_btf_id = btf.struct_id("tcphdr").unwrap_or(0);
        config.linux_mib_btf_id = btf.struct_id("linux_mib").unwrap_or(0);
        // Its first member is a pointer: a slot of the fd table read as one.
        config.pointer_btf_id = btf.struct_id("list_head").unwrap_or(0);
    }
    config
}

/// A struct member this kernel lacks (0 is a real offset).
const MISSING: u32 = u32::MAX;

/// Whether the listen-overflow hooks can read the kernel's per-CPU count
/// of overflows (overflow/mib.rs in the eBPF crate applies the same test).
pub fn reads_overflow_counter(config: &AcceptQueueConfig) -> bool {
    [config.bpf_array_pptrs, config.net_mib_statistics, config.mib_listen_overflows].iter().all(|&at| at != MISSING)
}

/// Which accept-queue hooks can work on this kernel, from the resolved
/// facts; `Err` says what is missing.
pub struct AcceptQueueSupport {
    /// The listener's queue members (every variant reads them), and
    /// `sk_buff.protocol` (the IPv6 variants check it).
    pub queue: Result<(), String>,
    /// fexit on inet_csk_accept: the return value's position.
    pub fexit_accept: Result<(), String>,
    /// fexit on tcp_v4/v6_syn_recv_sock: the return value's position.
    pub fexit_syn_recv_sock: Result<(), String>,
    /// syscalls:sys_{enter,exit}_accept{,4} and the fd → socket walk.
    pub accept_syscalls: Result<(), String>,
    /// The same with the exits alone: the listening fd from the saved
    /// registers (x86-64; `bpf_task_pt_regs`, 5.15+, checked by loading).
    pub accept_exits: Result<(), String>,
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
    pub fn of(config: &AcceptQueueConfig, code_ranges: &Ranges) -> Self {
        let c = config;
        let (syn_consumer_start, syn_consumer_end) = code_ranges[code_range::SYN_CONSUMER as usize];
        let has = |members: &[u32]| members.iter().all(|&m| m != MISSING);
        let queue = need(
            has(&[c.sock_ack_backlog, c.sock_max_ack_backlog, c.sock_state, c.skb_protocol, c.skb_head, c.skb_network_header, c.skb_transport_header]),
            "struct sock has no sk_ack_backlog/sk_max_ack_backlog, or sk_buff lacks its header members",
        );
        let with_queue = |result: Result<(), String>| queue.clone().and(result);
        let accept_syscalls = with_queue(need(
            c.accept_exit_len != 0 && has(&[c.task_files, c.files_fdt, c.fdt_fd, c.fdt_max_fds, c.file_private_data, c.socket_sk]),
            "no syscalls:sys_*_accept{,4} tracepoints with matching layouts, or no fd table members in BTF",
        ));
        // The exits alone need the same, and the saved first argument.
        let accept_exits = accept_syscalls.clone().and(need(c.regs_first_arg != MISSING, "no pt_regs.di in BTF (x86-64 only)"));
        Self {
            accept_syscalls,
            accept_exits,
            fexit_accept: with_queue(need(matches!(c.inet_csk_accept_args, 2 | 4), "inet_csk_accept has neither 2 nor 4 parameters in BTF")),
            fexit_syn_recv_sock: with_queue(need(
                matches!(c.syn_recv_sock_args, 6 | 7),
                "tcp_v4_syn_recv_sock and tcp_v6_syn_recv_sock do not both take (sock *, sk_buff *, ...) with 6 or 7 parameters in BTF",
            )),
            drop_reasons: need(c.kfree_skb_reason_arg != NO_ARG, "kfree_skb has no drop reason (before 5.17)")
                .and(need(has(&[c.skb_head, c.skb_network_header, c.skb_protocol]), "sk_buff lacks head/network_header/protocol in BTF")),
            overflow_tracepoints: with_queue(
                need(c.kfree_skb_reason_arg != NO_ARG && c.kfree_skb_rx_sk_arg != NO_ARG, "kfree_skb has no reason or no rx_sk (before 6.11)")
                    .and(need(c.listen_overflow_reason != u32::MAX, "enum skb_drop_reason has no SKB_DROP_REASON_TCP_LISTEN_OVERFLOW"))
                    .and(need(c.consume_skb_location_arg != NO_ARG, "consume_skb has no location argument"))
                    .and(need(syn_consumer_start != 0 && syn_consumer_end > syn_consumer_start, "tcp_rcv_state_process not in /proc/kallsyms"))
                    .and(need(has(&[c.skb_head, c.skb_transport_header, c.skb_refdst, c.dst_dev]), "sk_buff/dst_entry members missing from BTF")),
            ),
            queue,
        }
    }
}

/// The parameter count fexit programs find the return value after, when
/// `tcp_v4_syn_recv_sock` and `tcp_v6_syn_recv_sock` take the same
/// parameters, the listener and the packet first (6 until Debian's 6.12
/// stable updates added `opt_child_init`, 7 since); else 0.
fn syn_recv_sock_args(v4: &[String], v6: &[String]) -> u8 {
    let listener_and_packet_first =
        v4.first().is_some_and(|t| t.ends_with("struct sock *")) && v4.get(1).is_some_and(|t| t.ends_with("struct sk_buff *"));
    if v4 == v6 && listener_and_packet_first { v4.len() as u8 } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syn_recv_sock_return_follows_6_or_7_parameters() {
        let types = |list: &[&str]| list.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        let six = types(&["const struct sock *", "struct sk_buff *", "struct request_sock *", "struct dst_entry *", "struct request_sock *", "bool *"]);
        let mut seven = six.clone();
        seven.push("void *".into());
        assert_eq!(syn_recv_sock_args(&six, &six), 6);
        assert_eq!(syn_recv_sock_args(&seven, &seven), 7, "Debian 6.12.117 added opt_child_init");
        assert_eq!(syn_recv_sock_args(&six, &seven), 0, "v4 and v6 differ");
        assert_eq!(syn_recv_sock_args(&six[1..], &six[1..]), 0, "the listener is not first");
        assert_eq!(syn_recv_sock_args(&[], &[]), 0, "not in BTF");
    }
}
