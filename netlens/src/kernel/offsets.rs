//! Builds the [`Config`] handed to the eBPF programs: tracepoint record
//! offsets from tracefs, kernel struct offsets from BTF. Nothing about the
//! kernel's layout is hard-coded.

use std::path::Path;

use anyhow::{Context as _, Result};
use netlens_common::{
    CongStateFields, Config, KernelOffsets, ProbeOffsets, ReceiveResetFields, RetransmitFields, SendResetFields, SockTupleOffsets,
    SynackFields, TupleFields, FIELD_ABSENT, RECORD_MAX,
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

pub fn resolve(tracefs: &Path, btf: &KernelBtf) -> Result<Config> {
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
    })
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
