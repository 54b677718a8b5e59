//! Loads the embedded eBPF object, hands it the resolved offsets, attaches
//! every program and exposes what the kernel side produces: the event ring
//! buffer and the counters. Views never touch maps; they get plain values.

use std::{os::fd::AsFd, path::PathBuf, time::Instant};

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{FEntry, FExit, KProbe, RawTracePoint, TracePoint},
    Btf, Ebpf, EbpfLoader,
};
use netlens_common::{counter, Config, Flow, ListenOverflow, PacketHistograms, DROP_REASONS, LOG2_BUCKETS};

use crate::{
    kernel::{
        btf::KernelBtf,
        offsets, probe,
        progstats::{self, ProgramStats},
        tracefs,
    },
    optional::{attach_optional, FeatureStatus},
};

/// The eBPF object, built by build.rs and embedded: one file to deploy.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netlens"));

/// How a program attaches to its tracepoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// A classic tracepoint: the kernel formats a record (layout from its
    /// tracefs `format` file). For rare events.
    Record,
    /// A raw tracepoint: the tracepoint's arguments as they are, no record.
    /// For hot events, where formatting a record would cost every call.
    Raw,
    /// fentry / fexit on a kernel function (`tracepoint` names it): BPF
    /// trampolines, typed arguments. Optional hooks only.
    FEntry,
    FExit,
    /// kprobe / kretprobe on a kernel function. Optional hooks only.
    KProbe,
    KRetProbe,
}

/// A tracepoint netlens attaches to, and the program that handles it.
#[derive(Clone, Copy, Debug)]
pub struct Hook {
    pub program: &'static str,
    pub category: &'static str,
    pub tracepoint: &'static str,
    pub attach: Attach,
}

impl Hook {
    pub(crate) const fn new(program: &'static str, category: &'static str, attach: Attach) -> Self {
        Self { program, category, tracepoint: program, attach }
    }

    /// A program attached to `target` (a tracepoint of `category`, or a
    /// kernel function when `category` is empty).
    pub(crate) const fn on(program: &'static str, category: &'static str, target: &'static str, attach: Attach) -> Self {
        Self { program, category, tracepoint: target, attach }
    }

    /// `category:tracepoint`, or the function for fentry/kprobe hooks.
    pub fn target(&self) -> String {
        match self.category {
            "" => self.tracepoint.to_string(),
            category => format!("{category}:{}", self.tracepoint),
        }
    }
}

pub const HOOKS: &[Hook] = &[
    Hook::new("inet_sock_set_state", "sock", Attach::Raw),
    Hook::new("tcp_retransmit_skb", "tcp", Attach::Record),
    Hook::new("tcp_retransmit_synack", "tcp", Attach::Record),
    Hook::new("tcp_send_reset", "tcp", Attach::Record),
    Hook::new("tcp_receive_reset", "tcp", Attach::Record),
    Hook::new("tcp_probe", "tcp", Attach::Raw),
    Hook::new("sk_data_ready", "sock", Attach::Raw),
    Hook::new("tcp_cong_state_set", "tcp", Attach::Record),
    Hook::new("sock_rcvqueue_full", "sock", Attach::Record),
];

/// The kernel's BTF for fentry/fexit, parsed once (aya's own parser).
pub(crate) fn kernel_btf() -> Result<&'static Btf, HookError> {
    static BTF: std::sync::OnceLock<Option<Btf>> = std::sync::OnceLock::new();
    BTF.get_or_init(|| Btf::from_sys_fs().ok())
        .as_ref()
        .ok_or_else(|| HookError::Load(anyhow!("kernel BTF unreadable for fentry")))
}

/// Resolves this kernel's offsets (tracefs + BTF).
pub fn resolve_config() -> Result<(PathBuf, Config)> {
    let tracefs = tracefs::ensure_mounted()?;
    let btf = KernelBtf::load()?;
    let config = offsets::resolve(&tracefs, &btf)?;
    Ok((tracefs, config))
}

/// Parses the object and fills in `CONFIG`; nothing is loaded yet.
pub fn open(config: &Config) -> Result<Ebpf> {
    open_with(EbpfLoader::new(), config)
}

fn open_with<'a>(mut loader: EbpfLoader<'a>, config: &'a Config) -> Result<Ebpf> {
    raise_memlock();
    loader
        .override_global("CONFIG", config, true)
        .load(EBPF_OBJECT)
        .context("loading the eBPF object")
}

/// Why a hook could not be set up.
#[derive(Debug)]
pub enum HookError {
    Load(anyhow::Error),
    Attach(anyhow::Error),
}

/// Loads and attaches one hook's program.
pub fn attach(ebpf: &mut Ebpf, hook: &Hook) -> Result<(), HookError> {
    let program = ebpf
        .program_mut(hook.program)
        .ok_or_else(|| HookError::Load(anyhow!("program {} missing from the eBPF object", hook.program)))?;
    let load = |err: aya::programs::ProgramError| HookError::Load(anyhow::Error::new(err));
    let attach = |err: aya::programs::ProgramError| HookError::Attach(anyhow::Error::new(err));
    // One program may serve several hooks (accept and accept4): load once.
    let loaded = program.fd().is_ok();
    match hook.attach {
        Attach::Record => {
            let program: &mut TracePoint = program.try_into().map_err(load)?;
            if !loaded {
                program.load().map_err(load)?;
            }
            program.attach(hook.category, hook.tracepoint).map_err(attach)?;
        }
        Attach::Raw => {
            let program: &mut RawTracePoint = program.try_into().map_err(load)?;
            program.load().map_err(load)?;
            program.attach(hook.tracepoint).map_err(attach)?;
        }
        Attach::FEntry => {
            let program: &mut FEntry = program.try_into().map_err(load)?;
            program.load(hook.tracepoint, kernel_btf()?).map_err(load)?;
            program.attach().map_err(attach)?;
        }
        Attach::FExit => {
            let program: &mut FExit = program.try_into().map_err(load)?;
            program.load(hook.tracepoint, kernel_btf()?).map_err(load)?;
            program.attach().map_err(attach)?;
        }
        Attach::KProbe | Attach::KRetProbe => {
            let program: &mut KProbe = program.try_into().map_err(load)?;
            program.load().map_err(load)?;
            program.attach(hook.tracepoint, 0).map_err(attach)?;
        }
    }
    Ok(())
}

impl std::fmt::Display for HookError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HookError::Load(err) => write!(f, "the kernel rejected the program: {err:#}"),
            HookError::Attach(err) => write!(f, "attaching failed: {err:#}"),
        }
    }
}

impl std::error::Error for HookError {}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
fn raise_memlock() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid pointer; failure is harmless on
    // kernels that account BPF memory to the cgroup instead.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

/// The attached programs. Dropping this detaches them all.
pub struct Probes {
    ebpf: Ebpf,
    /// How long loading and attaching took.
    pub attach_time: std::time::Duration,
    /// The optional features and what serves them.
    pub optional: Vec<FeatureStatus>,
}

/// The flow table right now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowTable {
    /// Flows tracked right now.
    pub live: u64,
    /// Flows the LRU pushed out to make room.
    pub evictions: u64,
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
    fn from_flow(flow: &Flow) -> Option<Self> {
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
    /// running on that CPU (see [`progstats::ProgramStats`]).
    pub events_missed: u64,
    /// Segments the kernel dropped because a receive queue was full.
    pub rcvqueue_full: u64,
}

impl Probes {
    /// Checks privileges, resolves offsets, loads and attaches everything.
    pub fn attach_all() -> Result<Self> {
        let started = Instant::now();
        if let Some(problem) = probe::preflight() {
            return Err(anyhow!(problem));
        }
        // aya parses the kernel's BTF when its loader is created (~25 ms);
        // do that while we resolve our own offsets.
        let loader = std::thread::spawn(EbpfLoader::new);
        let (_tracefs, config) = resolve_config()?;
        let loader = loader.join().map_err(|_| anyhow!("creating the eBPF loader failed"))?;
        let mut ebpf = open_with(loader, &config)?;
        // The fentry variants need aya's own parse of the kernel's BTF
        // (~20 ms): while the required hooks load.
        let btf = std::thread::spawn(|| kernel_btf().is_ok());
        for hook in HOOKS {
            attach(&mut ebpf, hook).map_err(|err| anyhow!("{}:{}: {err}", hook.category, hook.tracepoint))?;
        }
        let _ = btf.join();
        let optional = attach_optional(&mut ebpf, &config);
        Ok(Self { ebpf, attach_time: started.elapsed(), optional })
    }

    /// The optional hooks attached.
    fn optional_hooks(&self) -> impl Iterator<Item = &'static Hook> + '_ {
        self.optional.iter().filter_map(|status| status.served_by).flat_map(|family| family.hooks.iter())
    }

    pub fn program_count(&self) -> usize {
        HOOKS.len() + self.optional_hooks().count()
    }

    /// The event ring buffer; can be taken once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map("EVENTS").ok_or_else(|| anyhow!("EVENTS map missing"))?;
        Ok(RingBuf::try_from(map)?)
    }

    /// The kernel's statistics for each attached program, by program name.
    pub fn program_stats(&self) -> Vec<(&'static str, ProgramStats)> {
        let mut programs: Vec<&'static str> = HOOKS.iter().chain(self.optional_hooks()).map(|hook| hook.program).collect();
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
        let events_missed = programs.iter().map(|(_, stats)| stats.recursion_misses).sum();
        Ok(KernelCounters {
            events_lost: self.counter(counter::EVENTS_LOST)?,
            events_missed,
            rcvqueue_full: self.counter(counter::RCVQUEUE_FULL)?,
        })
    }

    /// Up to `limit` connections from the flow table (those whose endpoints
    /// are known). Two syscalls per entry: for a view's refresh, not a hot
    /// path.
    pub fn live_flows(&self, limit: usize) -> Result<Vec<LiveFlow>> {
        let flows: BpfHashMap<&MapData, u64, Flow> =
            BpfHashMap::try_from(self.ebpf.map("FLOWS").ok_or_else(|| anyhow!("FLOWS map missing"))?)?;
        Ok(flows.iter().filter_map(Result::ok).filter_map(|(_, flow)| LiveFlow::from_flow(&flow)).take(limit).collect())
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

    /// Cumulative listen overflows by listener (LISTEN_OVERFLOWS), keyed by
    /// the listener's socket address, summed over CPUs. A few syscalls per
    /// listener that ever overflowed: once a second is fine.
    pub fn listen_overflows(&self) -> Result<Vec<(u64, ListenOverflow)>> {
        let Some(map) = self.ebpf.map("LISTEN_OVERFLOWS") else { return Ok(Vec::new()) };
        let table: PerCpuHashMap<&MapData, u64, ListenOverflow> = PerCpuHashMap::try_from(map)?;
        let mut listeners = Vec::new();
        for entry in table.iter() {
            let (listener, per_cpu) = entry?;
            let mut total = ListenOverflow::default();
            for cpu in per_cpu.iter() {
                if cpu.family != 0 {
                    total = ListenOverflow { dropped: total.dropped, last_ns: total.last_ns, ..*cpu };
                }
                total.dropped += cpu.dropped;
                total.last_ns = total.last_ns.max(cpu.last_ns);
            }
            listeners.push((listener, total));
        }
        Ok(listeners)
    }

    /// Packets the kernel freed, by drop reason value (`enum
    /// skb_drop_reason`), summed over CPUs; empty without the hook.
    pub fn drop_reasons(&self) -> Result<Vec<(u32, u64)>> {
        if !self.optional.iter().any(|s| s.feature == "drop_reasons" && s.served_by.is_some()) {
            return Ok(Vec::new());
        }
        let map = self.ebpf.map("DROP_REASON_COUNTS").ok_or_else(|| anyhow!("DROP_REASON_COUNTS map missing"))?;
        let per_cpu: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        let mut counts = Vec::new();
        for reason in 0..DROP_REASONS {
            let total = per_cpu.get(&reason, 0)?.iter().copied().fold(0u64, u64::wrapping_add);
            if total > 0 {
                counts.push((reason, total));
            }
        }
        Ok(counts)
    }

    /// The flow table's occupancy and evictions. Walks every key (up to
    /// FLOW_TABLE_ENTRIES syscalls): for occasional use, not per second.
    pub fn flow_table(&self) -> Result<FlowTable> {
        let flows: BpfHashMap<&MapData, u64, Flow> =
            BpfHashMap::try_from(self.ebpf.map("FLOWS").ok_or_else(|| anyhow!("FLOWS map missing"))?)?;
        let live = flows.keys().filter(Result::is_ok).count() as u64;
        let inserted = self.counter(counter::FLOW_INSERTS)?;
        let removed = self.counter(counter::FLOW_REMOVES)?;
        Ok(FlowTable { live, evictions: inserted.saturating_sub(removed).saturating_sub(live) })
    }
}
