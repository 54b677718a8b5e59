//! What the loaded programs produce, read out of their maps as plain
//! values for the views: the event ring buffer, counters, program
//! statistics and errors, the flow table, listen overflows, drop reasons.

use std::{borrow::Borrow, ops::ControlFlow, os::fd::AsFd};

use anyhow::{anyhow, Result};
use aya::maps::{Array, HashMap as BpfHashMap, IterableMap as _, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use netlens_common::{counter, program, owner_is_open, Flow, ListenOverflow, ListenerEndpoint, ListenerKey, ListenerOwner, OwnerBucket, PacketHistograms, DROP_REASONS, LOG2_BUCKETS, SLOT_WAYS};

use super::{closed_flows, Probes};
use crate::kernel::{
    map_ops,
    progstats::{self, ProgramStats},
};

/// Flow table entries read a syscall (their values ~280 bytes each).
const FLOWS_A_SYSCALL: usize = 128;

/// Visits the flow table's entries until `visit` says `Break`: a chunk a
/// syscall (`map_ops::for_each_entry`), or, where the kernel refuses that
/// (a security module, say) before anything was read, aya's walk, two
/// syscalls an entry, bounded by twice the table's entries: a key deleted
/// under that walk sends it back to the start.
pub(super) fn visit_flows<T: Borrow<MapData>>(
    flows: &BpfHashMap<T, u64, Flow>,
    mut visit: impl FnMut(u64, &Flow) -> ControlFlow<()>,
) -> Result<()> {
    let mut visited = false;
    let batched = map_ops::for_each_entry::<u64, Flow>(flows.map().fd().as_fd(), FLOWS_A_SYSCALL, |&key, flow| {
        visited = true;
        visit(key, flow)
    });
    match batched {
        Ok(()) => Ok(()),
        Err(err) if visited => Err(err.into()),
        Err(_) => {
            let bound = 2 * flows.map().info().map_or(u32::MAX, |info| info.max_entries()) as usize;
            for (key, flow) in flows.iter().take(bound).filter_map(Result::ok) {
                if visit(key, &flow).is_break() {
                    break;
                }
            }
            Ok(())
        }
    }
}

/// The flow table right now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowTable {
    /// Flows tracked right now.
    pub live: u64,
    /// Flows lost to the table: refused when it was full, or whose close
    /// went unseen (flows.rs in the eBPF crate).
    pub lost: u64,
    /// Closed flows swept out of the table: their addresses went unused
    /// (closed_flows.rs).
    pub swept: u64,
}

/// One live connection from the kernel's flow table, as plain values.
#[derive(Clone, Debug, PartialEq)]
pub struct LiveFlow {
    pub local: std::net::SocketAddr,
    pub remote: std::net::SocketAddr,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub netns: u32,
    pub direction: Option<crate::event::Direction>,
    /// CLOCK_MONOTONIC ns when the handshake started / completed (0: not yet).
    pub start_ns: u64,
    pub established_ns: u64,
    pub srtt_us: u32,
    pub cwnd: u32,
    pub retransmits: u32,
    pub hol_stall_ns: u64,
}

impl LiveFlow {
    /// `None` for a closed flow the table keeps, or one whose endpoints
    /// are not known yet.
    fn from_flow(flow: &Flow) -> Option<Self> {
        if flow.closed_ns != 0 {
            return None;
        }
        let (local_ip, remote_ip) = crate::event::addresses(flow.family, &flow.saddr, &flow.daddr)?;
        let comm_len = flow.comm.iter().position(|&b| b == 0).unwrap_or(flow.comm.len());
        Some(Self {
            local: std::net::SocketAddr::new(local_ip, flow.sport),
            remote: std::net::SocketAddr::new(remote_ip, flow.dport),
            pid: (flow.pid != 0).then_some(flow.pid),
            comm: (comm_len > 0).then(|| String::from_utf8_lossy(&flow.comm[..comm_len]).into_owned()),
            netns: flow.netns,
            direction: crate::event::Direction::decode(flow.direction),
            start_ns: flow.start_ns,
            established_ns: flow.established_ns,
            srtt_us: flow.transport.srtt_us,
            cwnd: flow.transport.cwnd,
            retransmits: flow.total_retrans,
            hol_stall_ns: flow.transport.hol_stall_ns,
        })
    }
}

/// Counters the kernel side keeps, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// Events dropped because the ring buffer was full.
    pub events_lost: u64,
    /// Hook firings the kernel skipped because the program was already
    /// running on that CPU (see [`progstats::ProgramStats`]), in programs
    /// that send or feed events: events that may be missing.
    pub events_missed: u64,
    /// The same in programs that only count (`program::COUNT_ONLY`): drop
    /// and listen-overflow counts that may be short.
    pub counts_missed: u64,
    /// Retransmissions that only a close's total showed, no `retransmit`
    /// event (see `counter::RETRANSMITS_UNSEEN`).
    pub retransmits_unseen: u64,
}

impl Probes {
    /// The event ring buffer; can be taken once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map("EVENTS").ok_or_else(|| anyhow!("EVENTS map missing"))?;
        Ok(RingBuf::try_from(map)?)
    }

    /// The kernel's statistics for each attached program, by program name.
    pub fn program_stats(&self) -> Vec<(&'static str, ProgramStats)> {
        let mut programs: Vec<&'static str> =
            self.attached.iter().copied().chain(self.optional_hooks()).map(|hook| hook.program).collect();
        programs.dedup();
        programs
            .into_iter()
            .filter_map(|program| {
                let fd = self.ebpf.program(program)?.fd().ok()?;
                Some((program, progstats::read(fd.as_fd()).ok()?))
            })
            .collect()
    }

    /// One per-CPU counter (`netlens_common::counter`), summed over CPUs.
    fn counter(&self, index: u32) -> Result<u64> {
        let per_cpu: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("COUNTERS").ok_or_else(|| anyhow!("COUNTERS map missing"))?)?;
        Ok(per_cpu.get(&index, 0)?.iter().copied().fold(0u64, u64::wrapping_add))
    }

    /// The counters; `programs` is [`Self::program_stats`], read by the
    /// caller (the kernel-skipped count is their recursion misses).
    pub fn counters(&self, programs: &[(&'static str, ProgramStats)]) -> Result<KernelCounters> {
        let missed = |count_only: bool| {
            programs
                .iter()
                .filter(|(name, _)| program::COUNT_ONLY.contains(name) == count_only)
                .map(|(_, stats)| stats.recursion_misses)
                .sum()
        };
        Ok(KernelCounters {
            events_lost: self.counter(counter::EVENTS_LOST)?,
            events_missed: missed(false),
            counts_missed: missed(true),
            retransmits_unseen: self.counter(counter::RETRANSMITS_UNSEEN)?,
        })
    }

    /// Up to `limit` connections from the flow table (those whose endpoints
    /// are known) that `wanted` keeps, read a chunk of entries a syscall.
    pub fn live_flows(&self, limit: usize, wanted: &dyn Fn(&LiveFlow) -> bool) -> Result<Vec<LiveFlow>> {
        let mut live = Vec::new();
        let mut visit = |flow: &Flow| {
            live.extend(LiveFlow::from_flow(flow).filter(wanted));
            if live.len() < limit { ControlFlow::Continue(()) } else { ControlFlow::Break(()) }
        };
        if self.flow_home.in_slots() {
            let owners: Array<&MapData, OwnerBucket> =
                Array::try_from(self.ebpf.map("FLOW_OWNERS").ok_or_else(|| anyhow!("FLOW_OWNERS map missing"))?)?;
            let slots: Array<&MapData, Flow> =
                Array::try_from(self.ebpf.map("FLOW_SLOTS").ok_or_else(|| anyhow!("FLOW_SLOTS map missing"))?)?;
            // The owners first (64 bytes a bucket), then the flows of the
            // open slots, one lookup each.
            let mut open = Vec::new();
            map_ops::for_each_entry::<u32, OwnerBucket>(owners.map().fd().as_fd(), FLOWS_A_SYSCALL, |&bucket, owners| {
                let ways = owners.owners.iter().enumerate().filter(|(_, &owner)| owner_is_open(owner));
                open.extend(ways.map(|(way, _)| bucket * SLOT_WAYS as u32 + way as u32));
                ControlFlow::Continue(())
            })?;
            for index in open {
                let Ok(flow) = slots.get(&index, 0) else { continue };
                if visit(&flow).is_break() {
                    break;
                }
            }
            return Ok(live);
        }
        let flows: BpfHashMap<&MapData, u64, Flow> =
            BpfHashMap::try_from(self.ebpf.map("FLOWS").ok_or_else(|| anyhow!("FLOWS map missing"))?)?;
        visit_flows(&flows, |_, flow| visit(flow))?;
        Ok(live)
    }

    /// The per-segment log2 histograms, summed over CPUs.
    pub fn packet_histograms(&self) -> Result<PacketHistograms> {
        let per_cpu: PerCpuArray<&MapData, PacketHistograms> = PerCpuArray::try_from(
            self.ebpf.map("PACKET_HISTOGRAMS").ok_or_else(|| anyhow!("PACKET_HISTOGRAMS map missing"))?,
        )?;
        let mut total = PacketHistograms::default();
        for cpu in per_cpu.get(&0, 0)?.iter() {
            for bucket in 0..LOG2_BUCKETS {
                total.srtt_us[bucket] += cpu.srtt_us[bucket];
                total.cwnd[bucket] += cpu.cwnd[bucket];
            }
        }
        Ok(total)
    }

    /// Cumulative listen overflows by listening endpoint (LISTEN_OVERFLOWS),
    /// summed over CPUs; the backlog is the latest drop's. A few syscalls
    /// per listener that ever overflowed: once a second is fine.
    pub fn listen_overflows(&self) -> Result<Vec<(ListenerEndpoint, ListenOverflow)>> {
        let Some(map) = self.ebpf.map("LISTEN_OVERFLOWS") else { return Ok(Vec::new()) };
        let table: PerCpuHashMap<&MapData, ListenerEndpoint, ListenOverflow> = PerCpuHashMap::try_from(map)?;
        let mut listeners = Vec::new();
        for entry in table.iter() {
            let (endpoint, per_cpu) = entry?;
            let mut total = ListenOverflow::default();
            for cpu in per_cpu.iter() {
                if cpu.last_ns > total.last_ns {
                    total.last_ns = cpu.last_ns;
                    total.backlog = cpu.backlog;
                }
                total.dropped += cpu.dropped;
            }
            listeners.push((endpoint, total));
        }
        Ok(listeners)
    }

    /// Failures inside each attached program (`netlens_common::program`),
    /// summed over CPUs, by program name.
    pub fn program_errors(&self) -> Result<Vec<(&'static str, u64)>> {
        let map = self.ebpf.map("PROGRAM_ERRORS").ok_or_else(|| anyhow!("PROGRAM_ERRORS map missing"))?;
        let per_cpu: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        let mut names: Vec<&'static str> =
            self.attached.iter().copied().chain(self.optional_hooks()).map(|hook| hook.program).collect();
        names.dedup();
        let mut errors = Vec::with_capacity(names.len());
        for name in names {
            let Some(id) = program::id(name) else { continue };
            errors.push((name, per_cpu.get(&id, 0)?.iter().copied().fold(0u64, u64::wrapping_add)));
        }
        Ok(errors)
    }

    /// TCP packets the kernel dropped, by reason (`enum skb_drop_reason`,
    /// named as [`drop_reason_names`] does), summed over CPUs; empty
    /// without the hook.
    pub fn drop_reasons(&self) -> Result<Vec<(String, u64)>> {
        if !self.optional.iter().any(|s| s.feature == "drop_reasons" && s.served_by.is_some()) {
            return Ok(Vec::new());
        }
        let map = self.ebpf.map("DROP_REASON_COUNTS").ok_or_else(|| anyhow!("DROP_REASON_COUNTS map missing"))?;
        let per_cpu: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        let mut counts = Vec::new();
        for reason in 0..DROP_REASONS {
            let total = per_cpu.get(&reason, 0)?.iter().copied().fold(0u64, u64::wrapping_add);
            if total > 0 {
                let name = self.drop_reason_names.iter().find(|(value, _)| *value == reason).map(|(_, name)| name.clone());
                counts.push((name.unwrap_or_else(|| format!("reason_{reason}")), total));
            }
        }
        Ok(counts)
    }

    /// Names the processes of listeners older than netlens in the kernel's
    /// LISTENER_OWNERS table (see owners.rs in netlens-ebpf), never over an
    /// entry the kernel side made. Returns how many were new.
    pub fn seed_listener_owners(&mut self, listeners: &[crate::census::listeners::ListenerProcess]) -> Result<usize> {
        let map = self.ebpf.map_mut("LISTENER_OWNERS").ok_or_else(|| anyhow!("LISTENER_OWNERS map missing"))?;
        let mut owners: BpfHashMap<&mut MapData, ListenerKey, ListenerOwner> = BpfHashMap::try_from(map)?;
        let mut seeded = 0;
        for listener in listeners {
            let key = ListenerKey { netns: listener.netns, port: listener.port, _pad: 0 };
            let mut owner = ListenerOwner { pid: listener.process.pid, ..ListenerOwner::default() };
            let comm = listener.process.comm.as_bytes();
            // The kernel's comm: 15 bytes and a NUL.
            let len = comm.len().min(owner.comm.len() - 1);
            owner.comm[..len].copy_from_slice(&comm[..len]);
            // BPF_NOEXIST (1): EEXIST means the kernel side saw this
            // listener listen or accept, which is exact.
            if owners.insert(key, owner, 1).is_ok() {
                seeded += 1;
            }
        }
        Ok(seeded)
    }

    /// The flows the table tracks and the flows it lost, from the
    /// kernel's per-CPU counts (flows.rs in the eBPF crate): the refused,
    /// the stale (their close unseen), and those a sweep of closed flows
    /// took open (closed_flows.rs).
    pub fn flow_table(&self) -> Result<FlowTable> {
        let removed = self.counter(counter::FLOW_REMOVES)?;
        let stale = self.counter(counter::FLOW_STALE)?;
        let refused = self.counter(counter::FLOW_INSERT_FAILURES)?;
        // Last: a flow inserted meanwhile is no loss.
        let inserted = self.counter(counter::FLOW_INSERTS)?;
        let (swept, raced) = self.closed_flows.as_ref().map_or((0, 0), |closed| (closed.swept, closed.raced));
        let live = inserted.saturating_sub(removed).saturating_sub(stale);
        Ok(FlowTable { live, lost: refused + stale + raced, swept })
    }

    /// Sweeps the closed flows the table keeps, when they call for it
    /// (closed_flows.rs); at most once per `CHECK_PERIOD`.
    pub fn sweep_closed_flows(&mut self) -> Result<()> {
        if !self.closed_flows.as_ref().is_some_and(|closed| closed.check_due()) {
            return Ok(());
        }
        let kept = self.counter(counter::FLOW_KEPT_CLOSED)?;
        let reused = self.counter(counter::FLOW_REUSED)?;
        let refused = self.counter(counter::FLOW_INSERT_FAILURES)?;
        let Some(closed) = self.closed_flows.as_mut() else { return Ok(()) };
        if !closed.due(closed.closed_now(kept, reused), refused, std::time::Instant::now()) {
            return Ok(());
        }
        let table = self.ebpf.map_mut("FLOWS").ok_or_else(|| anyhow!("FLOWS map missing"))?;
        let before_ns = crate::source::monotonic_ns().saturating_sub(closed_flows::MIN_AGE_NS);
        closed.sweep(table, before_ns)
    }
}

