//! Builds the [`Config`] handed to the eBPF programs: tracepoint record
//! offsets from tracefs, kernel struct offsets from BTF. Nothing about the
//! kernel's layout is hard-coded.

use std::path::Path;

use anyhow::{Context as _, Result};
use netlens_common::{
    code_range, paws, CongStateFields, Config, KernelOffsets, ProbeOffsets, TcpSockMembers, ReceiveResetFields, RetransmitFields, SendResetFields,
    SockTupleOffsets, SynackFields, TupleFields, Window, FIELD_ABSENT, PROBE_WINDOWS, RECORD_MAX,
};

use super::{btf::KernelBtf, tracefs::Format};

mod accept_queue;
pub use accept_queue::{reads_overflow_counter, AcceptQueueSupport};

fn tuple(format: &Format) -> Result<TupleFields> {
    Ok(TupleFields {
        // 5.10's records have no family: the programs read the socket's.
        family: format.optional_offset("family", 2)?.unwrap_or(FIELD_ABSENT),
        sport: format.offset("sport", 2)?,
        dport: format.offset("dport", 2)?,
        saddr: format.offset("saddr", 4)?,
        daddr: format.offset("daddr", 4)?,
        saddr_v6: format.offset("saddr_v6", 16)?,
        daddr_v6: format.offset("daddr_v6", 16)?,
        _pad: 0,
    })
}

/// The offsets, and the programs whose offsets this kernel cannot give
/// (a missing tracepoint, a changed layout): those programs stay unloaded
/// and only the features they serve are lost.
pub struct Resolved {
    pub config: Config,
    pub unavailable: Vec<(&'static str, String)>,
    /// The accept-queue tracepoints' code ranges, still being read.
    pub code_ranges: CodeRanges,
}

/// `[start, end)` of each function in `code_range::FUNCTIONS`, read from
/// /proc/kallsyms (~40 ms of kernel time; the first run after boot only,
/// see `kallsyms`) on a thread of its own: the programs that need them load
/// last, and [`CodeRanges::get`] waits then.
pub struct CodeRanges {
    reading: std::sync::Mutex<Option<std::thread::JoinHandle<Result<Ranges>>>>,
    read: std::sync::OnceLock<Ranges>,
}

pub type Ranges = [(u64, u64); code_range::COUNT as usize];

impl CodeRanges {
    fn start() -> Self {
        let reading = std::thread::spawn(|| super::kallsyms::function_ranges_cached(&code_range::FUNCTIONS));
        Self { reading: std::sync::Mutex::new(Some(reading)), read: std::sync::OnceLock::new() }
    }

    /// The ranges (waiting for the read); unreadable ones are `(0, 0)`.
    pub fn get(&self) -> Ranges {
        *self.read.get_or_init(|| {
            let reading = self.reading.lock().ok().and_then(|mut reading| reading.take());
            reading.and_then(|thread| thread.join().ok()).and_then(Result::ok).unwrap_or_default()
        })
    }
}

impl Resolved {
    /// Why `program` cannot run here, if it cannot.
    pub fn unavailable(&self, program: &str) -> Option<&str> {
        self.unavailable.iter().find(|(name, _)| *name == program).map(|(_, why)| why.as_str())
    }
}

/// Resolves everything. Only the offsets every program relies on (the
/// socket's identity and counters) are required; each tracepoint's record
/// is resolved on its own.
pub fn resolve(tracefs: &Path, btf: &KernelBtf) -> Result<Resolved> {
    // Reading /proc/kallsyms costs ~40 ms of kernel time (once a boot): on
    // its own thread, while the rest resolves and the other programs load.
    let code_ranges = CodeRanges::start();
    let mut config = Config {
        kernel: kernel_offsets(btf).context("resolving kernel struct offsets from BTF")?,
        wakeup_bytes: netlens_common::DEFAULT_WAKEUP_BYTES,
        ..Config::default()
    };
    let mut unavailable = Vec::new();
    let mut optional = |program: &'static str, result: Result<()>| {
        if let Err(err) = result {
            unavailable.push((program, format!("{err:#}")));
        }
    };
    let format = |name: &str| Format::read(tracefs, "tcp", name);
    optional("tcp_retransmit_skb", format("tcp_retransmit_skb").and_then(|f| {
        config.retransmit = RetransmitFields {
            skbaddr: f.offset("skbaddr", 8)?,
            skaddr: f.offset("skaddr", 8)?,
            state: f.offset("state", 4)?,
            err: f.optional_offset("err", 4)?.unwrap_or(FIELD_ABSENT),
            tuple: tuple(&f)?,
            len: f.record_len()?,
            _pad: 0,
        };
        Ok(())
    }));
    optional("tcp_retransmit_synack", format("tcp_retransmit_synack").and_then(|f| {
        config.synack = SynackFields {
            skaddr: f.offset("skaddr", 8)?,
            req: f.offset("req", 8)?,
            len: f.record_len()?,
            _pad: 0,
            tuple: tuple(&f)?,
        };
        Ok(())
    }));
    optional("tcp_send_reset", format("tcp_send_reset").and_then(|f| {
        config.send_reset = send_reset(&f)?;
        Ok(())
    }));
    optional("tcp_receive_reset", format("tcp_receive_reset").and_then(|f| {
        config.receive_reset = ReceiveResetFields {
            skaddr: f.offset("skaddr", 8)?,
            len: f.record_len()?,
            _pad: [0; 2],
            tuple: tuple(&f)?,
        };
        Ok(())
    }));
    optional("tcp_cong_state_set", format("tcp_cong_state_set").and_then(|f| {
        config.cong_state = CongStateFields {
            skaddr: f.offset("skaddr", 8)?,
            cong_state: f.offset("cong_state", 1)?,
            len: f.record_len()?,
            _pad: 0,
        };
        Ok(())
    }));
    optional("tcp_probe", probe_offsets(btf).context("resolving tcp_sock members for tcp_probe").map(|probe| {
        config.probe = probe;
    }));
    config.accept_queue = accept_queue::config(tracefs, btf);
    Ok(Resolved { config, unavailable, code_ranges })
}


/// `tcp:tcp_send_reset` has had two layouts: sockaddr buffers (6.10+) and
/// the 4-tuple fields of its siblings (before).
fn send_reset(f: &Format) -> Result<SendResetFields> {
    let mut fields = SendResetFields {
        skbaddr: f.offset("skbaddr", 8)?,
        skaddr: f.offset("skaddr", 8)?,
        state: f.offset("state", 4)?,
        saddr: FIELD_ABSENT,
        daddr: FIELD_ABSENT,
        len: f.record_len()?,
        tuple: TupleFields::default(),
    };
    match f.optional_offset("sport", 2)? {
        Some(_) => fields.tuple = tuple(f)?,
        None => {
            fields.saddr = f.offset("saddr", 28)?;
            fields.daddr = f.offset("daddr", 28)?;
        }
    }
    Ok(fields)
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
        tcp_srtt_us: btf.sized_offset("tcp_sock", "srtt_us", 4)?,
        tcp_snd_cwnd: btf.sized_offset("tcp_sock", "snd_cwnd", 4)?,
        tcp_rcv_nxt: btf.sized_offset("tcp_sock", "rcv_nxt", 4)?,
        tcp_rcv_ooopack: btf.sized_offset("tcp_sock", "rcv_ooopack", 4).unwrap_or(0),
        tcp_clock_cache: btf.sized_offset("tcp_sock", "tcp_clock_cache", 8).unwrap_or(0),
        icsk_ca_state: btf.bitfield("tcp_sock", "inet_conn.icsk_ca_state")?.0,
        tcp_total_retrans: btf.sized_offset("tcp_sock", "total_retrans", 4)?,
        tcp_segs_out: btf.sized_offset("tcp_sock", "segs_out", 4)?,
        tcp_bytes_sent: btf.sized_offset("tcp_sock", "bytes_sent", 8)?,
        tcp_bytes_retrans: btf.sized_offset("tcp_sock", "bytes_retrans", 8)?,
        tcp_bytes_received: btf.sized_offset("tcp_sock", "bytes_received", 8)?,
        tcp_dsack_dups: btf.sized_offset("tcp_sock", "dsack_dups", 4)?,
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
        skb_data: btf.offset("sk_buff", "data")?,
        tcp_ts_recent_stamp: ts_recent_stamp(btf),
        paws_wrap_s: if btf.bitfield("tcp_sock", "tcp_usec_ts").is_ok() { paws::PAWS_WRAP_S } else { paws::PAWS_24DAYS_S },
        tcp_sock_btf_id: btf.function_id(RDONLY_CAST).and(btf.struct_id("tcp_sock")).unwrap_or(0),
    })
}

/// The kfunc that makes the typed programs' `struct tcp_sock *` without a
/// call at run time, where the kernel has it (6.2+; see
/// `netlens_common::CAST_CALL`).
pub const RDONLY_CAST: &str = "bpf_rdonly_cast";

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
        at("skc_num", 2)?,
    ];
    let len = fields.iter().map(|(_, end)| *end).max().unwrap_or(0);
    if len as usize > RECORD_MAX {
        anyhow::bail!("struct sock_common's endpoints span {len} bytes, more than the {RECORD_MAX} netlens copies");
    }
    Ok(SockTupleOffsets {
        family: fields[0].0,
        num: fields[6].0,
        dport: fields[1].0,
        rcv_saddr: fields[2].0,
        daddr: fields[3].0,
        v6_rcv_saddr: fields[4].0,
        v6_daddr: fields[5].0,
        len: len as u16,
    })
}

/// `rx_opt.ts_recent_stamp`, where `ts_recent` follows it (one offset
/// for both), else 0: no PAWS test.
fn ts_recent_stamp(btf: &KernelBtf) -> u32 {
    let stamp = btf.sized_offset("tcp_sock", "rx_opt.ts_recent_stamp", 4);
    let recent = btf.sized_offset("tcp_sock", "rx_opt.ts_recent", 4);
    match (stamp, recent) {
        (Ok(stamp), Ok(recent)) if recent == stamp + 4 => stamp,
        _ => 0,
    }
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

/// The `tcp_sock` members the per-packet program reads, grouped into
/// windows (see [`ProbeOffsets`]).
fn probe_offsets(btf: &KernelBtf) -> Result<ProbeOffsets> {
    let at = |name: &str, size: u32| btf.sized_offset("tcp_sock", name, size);
    let (ca_byte, ca_state_shift, ca_bits) = btf.bitfield("tcp_sock", "inet_conn.icsk_ca_state")?;
    // struct minmax: s[0] is the current minimum, {u32 t; u32 v}.
    let rtt_min = btf.offset("tcp_sock", "rtt_min")?;
    let members: [(u32, u32); 8] = [
        (at("snd_wnd", 4)?, 4),
        (at("snd_cwnd", 4)?, 4),
        (at("snd_ssthresh", 4)?, 4),
        (rtt_min + 4, 4),
        (at("rcv_nxt", 4)?, 4),
        (at("srtt_us", 4)?, 4),
        (at("rcv_wnd", 4)?, 4),
        (ca_byte, 1),
    ];
    let (windows, placed) = group_windows(&members)?;
    let in_socket = |index: usize| members[index].0;
    Ok(ProbeOffsets {
        windows,
        at: TcpSockMembers {
            snd_wnd: in_socket(0),
            snd_cwnd: in_socket(1),
            snd_ssthresh: in_socket(2),
            min_rtt: in_socket(3),
            rcv_nxt: in_socket(4),
            srtt_us: in_socket(5),
            rcv_wnd: in_socket(6),
            ca_state: in_socket(7),
        },
        snd_wnd: placed[0],
        snd_cwnd: placed[1],
        snd_ssthresh: placed[2],
        min_rtt: placed[3],
        rcv_nxt: placed[4],
        srtt_us: placed[5],
        rcv_wnd: placed[6],
        ca_state: placed[7],
        ca_state_shift,
        ca_state_mask: ((1u16 << ca_bits) - 1) as u8,
        _pad: [0; 6],
    })
}

/// Gaps between members wider than this start a new window: one more read
/// costs less than copying this many unused bytes.
const WINDOW_GAP: u32 = 64;

/// Groups `(offset, size)` members into at most [`PROBE_WINDOWS`] windows,
/// splitting at the widest gaps (those over [`WINDOW_GAP`]); returns the
/// windows and each member's offset in the copied buffer (window `i` lands
/// at `i * RECORD_MAX`).
fn group_windows<const N: usize>(members: &[(u32, u32); N]) -> Result<([Window; PROBE_WINDOWS], [u16; N])> {
    let mut sorted: Vec<(u32, u32)> = members.to_vec();
    sorted.sort_unstable();
    // The widest gaps between neighbours become window boundaries.
    let mut gaps: Vec<(u32, usize)> = sorted
        .windows(2)
        .enumerate()
        .map(|(i, pair)| (pair[1].0.saturating_sub(pair[0].0 + pair[0].1), i + 1))
        .filter(|(gap, _)| *gap > WINDOW_GAP)
        .collect();
    gaps.sort_unstable_by(|a, b| b.cmp(a));
    let mut cuts: Vec<usize> = gaps.iter().take(PROBE_WINDOWS - 1).map(|(_, at)| *at).collect();
    cuts.sort_unstable();
    let mut windows = [Window::default(); PROBE_WINDOWS];
    let bounds = std::iter::once(0).chain(cuts.iter().copied()).chain(std::iter::once(sorted.len()));
    let bounds: Vec<usize> = bounds.collect();
    for (window, range) in windows.iter_mut().zip(bounds.windows(2)) {
        let group = &sorted[range[0]..range[1]];
        let start = group.first().map_or(0, |m| m.0);
        let end = group.iter().map(|m| m.0 + m.1).max().unwrap_or(start);
        if (end - start) as usize > RECORD_MAX {
            anyhow::bail!("tcp_sock's per-packet members need a {}-byte read, more than the {RECORD_MAX} netlens copies at once", end - start);
        }
        *window = Window { start, len: end - start };
    }
    let mut placed = [0u16; N];
    for (slot, (offset, _)) in placed.iter_mut().zip(members) {
        let (index, window) = windows
            .iter()
            .enumerate()
            .find(|(_, w)| w.len > 0 && *offset >= w.start && *offset < w.start + w.len)
            .ok_or_else(|| anyhow::anyhow!("internal: member at {offset} outside every window"))?;
        *slot = (index * RECORD_MAX) as u16 + (offset - window.start) as u16;
    }
    Ok((windows, placed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_members_share_one_window() {
        let (windows, placed) = group_windows(&[(100, 4), (120, 4), (104, 8)]).unwrap();
        assert_eq!(windows[0], Window { start: 100, len: 24 });
        assert_eq!(windows[1].len, 0);
        assert_eq!(placed, [0, 20, 4]);
    }

    #[test]
    fn wide_gaps_split_into_windows_at_the_widest() {
        // 5.10-like: members spread over 560 bytes with two wide gaps.
        let members = [(1000, 4), (1004, 4), (1300, 4), (1556, 4), (1560, 1), (1010, 4)];
        let (windows, placed) = group_windows(&members).unwrap();
        assert_eq!(windows[0], Window { start: 1000, len: 14 });
        assert_eq!(windows[1], Window { start: 1300, len: 4 });
        assert_eq!(windows[2], Window { start: 1556, len: 5 });
        assert_eq!(placed, [0, 4, RECORD_MAX as u16, 2 * RECORD_MAX as u16, 2 * RECORD_MAX as u16 + 4, 10]);
    }

    #[test]
    fn a_window_too_wide_is_refused() {
        // Four clusters with wide gaps fit in three windows when the last
        // two are close enough; when they are not, the last window would
        // need 704 bytes, which is refused.
        let members = [(0, 4), (200, 4), (400, 4), (1100, 4)];
        assert!(group_windows(&members).is_ok());
        let members = [(0, 4), (2000, 4), (4000, 4), (4600, 4), (4700, 4)];
        let err = group_windows(&members).unwrap_err().to_string();
        assert!(err.contains("more than the 512"), "{err}");
    }
}
