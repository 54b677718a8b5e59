//! Builds the [`Config`] handed to the eBPF programs: tracepoint record
//! offsets from tracefs, kernel struct offsets from BTF. Nothing about the
//! kernel's layout is hard-coded.

use std::path::Path;

use anyhow::{Context as _, Result};
use netlens_common::{
    Config, KernelOffsets, ReceiveResetFields, RetransmitFields, SendResetFields, SockTupleOffsets,
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
    Ok(Config {
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
