//! Loads the embedded eBPF object, hands it the resolved offsets, attaches
//! every program and exposes what the kernel side produces: the event ring
//! buffer and the counters. Views never touch maps; they get plain values.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{anyhow, Context as _, Result};
use aya::{
    programs::{BtfTracePoint, FEntry, FExit, KProbe, RawTracePoint, TracePoint},
    Btf, Ebpf, EbpfLoader,
};

use crate::{
    features::{self, FeatureStatus},
    kernel::{btf::KernelBtf, offsets, probe, tracefs},
    optional::{self, attach_optional},
};

mod attach_btf;
mod casts;
mod ebpf_loader;
mod closed_flows;
mod flow_home;
mod hook_error;
mod hooks;
mod sizing;
mod tables;
pub use casts::Cast;
pub use flow_home::{choose as choose_flow_home, place_flows, FlowHome, Tried};
pub use hook_error::{HookError, FULL_ERRORS};
use hooks::{builds_of, TYPED_BUILDS};
pub use hooks::{Attach, Hook, HOOKS};
pub use sizing::FlowTableUse;
pub use tables::{FlowTable, KernelCounters, LiveFlow};

/// The eBPF object, built by build.rs and embedded: one file to deploy.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netlens"));

/// Set to a comma-separated list of program names to leave those hooks
/// out, as if the kernel lacked them: how the tests exercise the fallbacks
/// of older kernels on a new one.
pub const SKIP_HOOKS_ENV: &str = "NETLENS_SKIP_HOOKS";

/// This kernel's facts, resolved once: where tracefs is, its BTF, and the
/// offsets handed to the programs. Dropped once everything is attached:
/// the parsed BTF is most of netlens's memory while it lives.
pub struct KernelFacts {
    pub tracefs: PathBuf,
    pub btf: KernelBtf,
    pub offsets: offsets::Resolved,
    /// The BTF aya looks the BTF-typed programs' targets up in: a stand-in
    /// for the kernel's (see attach_btf.rs), made on first use.
    fentry_btf: std::sync::OnceLock<Option<Btf>>,
}

impl KernelFacts {
    /// How the typed programs make a `struct tcp_sock *` here (casts.rs).
    pub fn tcp_sock_cast(&self) -> Cast {
        Cast::choose(self.btf.function_id(offsets::RDONLY_CAST), self.offsets.config.kernel.tcp_sock_btf_id)
    }

    /// How the listen-overflow hooks know that a packet overflowed
    /// (overflow/mib.rs in the eBPF crate), as `check` says it.
    pub fn overflow_evidence(&self) -> &'static str {
        if offsets::reads_overflow_counter(&self.offsets.config.accept_queue) {
            "the kernel's per-CPU TcpExtListenOverflows, read around each SYN and at each failed final ACK (fentry/fexit and tracepoint hooks)"
        } else {
            "tests of the accept queue and the listener's drops (BTF lacks bpf_array.pptrs, net.mib.net_statistics or LINUX_MIB_LISTENOVERFLOWS)"
        }
    }

    /// The kernel's BTF as aya parses it, for fentry/fexit.
    pub(crate) fn fentry_btf(&self) -> Result<&Btf, HookError> {
        self.fentry_btf
            .get_or_init(|| {
                let started = Instant::now();
                let stand_in = attach_btf::for_hooks(&self.btf, HOOKS.iter().chain(optional::all_hooks()));
                timing(started, "stand-in BTF for typed loads made");
                stand_in
            })
            .as_ref()
            .ok_or_else(|| HookError::Load(anyhow!("kernel BTF unreadable for fentry")))
    }
}

/// Resolves this kernel's offsets (tracefs + BTF).
pub fn resolve_config() -> Result<KernelFacts> {
    let started = Instant::now();
    let tracefs = tracefs::ensure_mounted()?;
    let btf = KernelBtf::load()?;
    timing(started, "kernel BTF indexed");
    let offsets = offsets::resolve(&tracefs, &btf)?;
    timing(started, "offsets resolved");
    Ok(KernelFacts { tracefs, btf, offsets, fentry_btf: std::sync::OnceLock::new() })
}

/// Parses the object and fills in `CONFIG`; nothing is loaded yet.
pub fn open(facts: &KernelFacts) -> Result<Ebpf> {
    open_with(ebpf_loader::without_kernel_btf(), facts, netlens_common::RING_BYTES, FlowTableUse::Session)
}

/// `ring_bytes`: the size of the event ring buffer (a power of two, at
/// least a page); the flow table is sized for `flows` (see sizing.rs).
fn open_with<'a>(mut loader: EbpfLoader<'a>, facts: &'a KernelFacts, ring_bytes: u32, flows: FlowTableUse) -> Result<Ebpf> {
    let started = Instant::now();
    raise_memlock();
    let config = &facts.offsets.config;
    let in_slots = config.flows_in_slots != 0;
    let object = casts::rewrite(EBPF_OBJECT, facts.tcp_sock_cast(), in_slots)?;
    timing(started, "object rewritten");
    // The table unused where flows live in socket storage or the array,
    // the array where they do not (one entry: the maps must exist for the
    // programs that reference them).
    let table_entries = if config.flows_in_storage != 0 || in_slots { 1 } else { sizing::flow_table_entries(flows)? };
    loader.map_max_entries("FLOWS", table_entries);
    let buckets = if in_slots { config.flow_slot_mask + 1 } else { 1 };
    loader.map_max_entries("FLOW_OWNERS", buckets);
    loader.map_max_entries("FLOW_SLOTS", buckets * netlens_common::SLOT_WAYS as u32);
    loader.map_max_entries("EVENTS", ring_bytes);
    let ebpf = loader
        .override_global("CONFIG", &facts.offsets.config, true)
        .load(object.bytes())
        .context("loading the eBPF object");
    timing(started, "object parsed, maps created");
    ebpf
}

/// The flow table's entries, as created.
fn table_capacity(ebpf: &Ebpf) -> Result<u64> {
    match ebpf.map("FLOWS") {
        Some(aya::maps::Map::HashMap(data)) => Ok(u64::from(data.info()?.max_entries())),
        _ => Err(anyhow!("FLOWS map missing")),
    }
}

/// Loads and attaches one hook's program, after checking that this kernel
/// has what it needs.
pub fn attach(ebpf: &mut Ebpf, facts: &KernelFacts, hook: &Hook) -> Result<(), HookError> {
    if let Some(why) = unavailable(facts, hook) {
        return Err(HookError::Unavailable(why));
    }
    load_and_attach(ebpf, facts, hook)
}

/// Loads (once) and attaches one hook's program.
pub(crate) fn load_and_attach(ebpf: &mut Ebpf, facts: &KernelFacts, hook: &Hook) -> Result<(), HookError> {
    let started = Instant::now();
    let result = load_and_attach_inner(ebpf, facts, hook);
    timing(started, &format!("{} {}", hook.describe(), if result.is_ok() { "attached" } else { "failed" }));
    result
}

/// `NETLENS_ATTACH_TIMINGS=1`: where start-up time goes, on stderr.
fn timing(since: Instant, what: &str) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("NETLENS_ATTACH_TIMINGS").is_some()) {
        eprintln!("netlens: timing: {what}: {:.1} ms", since.elapsed().as_secs_f64() * 1e3);
    }
}

fn load_and_attach_inner(ebpf: &mut Ebpf, facts: &KernelFacts, hook: &Hook) -> Result<(), HookError> {
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
            program.attach(hook.category, hook.target).map_err(attach)?;
        }
        Attach::Raw => {
            let program: &mut RawTracePoint = program.try_into().map_err(load)?;
            if !loaded {
                program.load().map_err(load)?;
            }
            program.attach(hook.target).map_err(attach)?;
        }
        Attach::Btf => {
            let program: &mut BtfTracePoint = program.try_into().map_err(load)?;
            if !loaded {
                program.load(hook.target, facts.fentry_btf()?).map_err(load)?;
            }
            program.attach().map_err(attach)?;
        }
        Attach::FEntry => {
            let program: &mut FEntry = program.try_into().map_err(load)?;
            program.load(hook.target, facts.fentry_btf()?).map_err(load)?;
            program.attach().map_err(attach)?;
        }
        Attach::FExit => {
            let program: &mut FExit = program.try_into().map_err(load)?;
            program.load(hook.target, facts.fentry_btf()?).map_err(load)?;
            program.attach().map_err(attach)?;
        }
        Attach::KProbe | Attach::KRetProbe => {
            let program: &mut KProbe = program.try_into().map_err(load)?;
            if !loaded {
                program.load().map_err(load)?;
            }
            program.attach(hook.target, 0).map_err(attach)?;
        }
    }
    Ok(())
}

/// Why a kprobe cannot work here.
pub(crate) const NO_KPROBES: &str = "this kernel has no kprobes (CONFIG_KPROBES off)";

/// Whether the kernel has the kprobe PMU that kprobes attach through.
pub(crate) fn kprobes_exist() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe").exists()
}

/// Why `hook` cannot work on this kernel, found without loading anything.
fn unavailable(facts: &KernelFacts, hook: &Hook) -> Option<String> {
    let skipped = std::env::var(SKIP_HOOKS_ENV).unwrap_or_default();
    if skipped.split(',').any(|name| name.trim() == hook.program) {
        return Some(format!("left out by {SKIP_HOOKS_ENV}"));
    }
    match hook.attach {
        Attach::Record | Attach::Raw | Attach::Btf => {
            let dir = facts.tracefs.join("events").join(hook.category).join(hook.target);
            if !dir.is_dir() {
                return Some(format!("this kernel has no tracepoint {}:{}", hook.category, hook.target));
            }
        }
        Attach::KProbe | Attach::KRetProbe if !kprobes_exist() => return Some(NO_KPROBES.into()),
        Attach::FEntry | Attach::FExit | Attach::KProbe | Attach::KRetProbe => {
            if !facts.btf.has_function(hook.target) {
                return Some(format!("this kernel has no function {} (inlined or renamed)", hook.target));
            }
        }
    }
    // A typed build needs what its raw twin does.
    let served = TYPED_BUILDS.iter().find(|(_, typed)| *typed == hook.program).map_or(hook.program, |(name, _)| *name);
    facts.offsets.unavailable(served).map(str::to_string)
}

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
    /// The hooks attached, in `HOOKS` order.
    attached: Vec<&'static Hook>,
    /// How each feature is served here.
    pub features: Vec<FeatureStatus>,
    /// How long loading and attaching took.
    pub attach_time: std::time::Duration,
    /// The accept-queue features and the hook families serving them.
    optional: Vec<optional::FeatureStatus>,
    /// `enum skb_drop_reason` from BTF: the metric's name of each value.
    drop_reason_names: Vec<(u32, String)>,
    /// The start-up's facts, the BTF parses most of their memory: freed by
    /// [`Probes::settle`].
    start_up: Option<KernelFacts>,
    /// Where the programs keep flows.
    pub flow_home: FlowHome,
    /// Where the table keeps closed flows: what sweeping them did.
    closed_flows: Option<closed_flows::ClosedFlows>,
}

/// Verifies, two at a time, the tracepoint programs of each feature's best
/// way this kernel has (each program's best build: the BTF one where it
/// has one), then those of the optional features (see
/// `optional::preferred_tracepoint_hooks`): verification is most of the time attaching takes, the kernel
/// verifies programs independently, and `load_and_attach` then finds them
/// loaded. A program that fails here is left for `load_and_attach` to load
/// again and report.
fn preload(ebpf: &mut Ebpf, facts: &KernelFacts) {
    // The first build this kernel has (the raw one where the typed one is
    // left out); a typed build the verifier refuses is not foreseen here,
    // and its raw twin is then verified alone, at attach.
    let best_hook = |program: &'static str| {
        builds_of(program).find_map(|build| {
            HOOKS.iter().find(|hook| {
                hook.program == build
                    && hook.attach.is_tracepoint()
                    && unavailable(facts, hook).is_none()
            })
        })
    };
    let mut best: Vec<&'static Hook> = features::FEATURES
        .iter()
        .filter_map(|feature| feature.ways.iter().find(|way| way.programs.iter().all(|program| best_hook(program).is_some())))
        .flat_map(|way| way.programs.iter().filter_map(|program| best_hook(program)))
        .collect();
    best.extend(optional::preferred_tracepoint_hooks(|hook| unavailable(facts, hook).is_none()));
    // In the order of `best` (the costliest, lifecycle, first), taken from
    // one queue by two threads: each takes the next program when it is
    // done with its last, so neither waits long on the other. (Dealt
    // alternately, one thread's share ran 3-4 ms past the other's.)
    let mut programs: Vec<(usize, &'static Hook, &mut aya::programs::Program)> = ebpf
        .programs_mut()
        .filter(|(_, program)| program.fd().is_err())
        .filter_map(|(name, program)| {
            let rank = best.iter().position(|hook| hook.program == name)?;
            Some((rank, best[rank], program))
        })
        .collect();
    programs.sort_by_key(|(rank, _, _)| *rank);
    let queue = std::sync::Mutex::new(programs.into_iter().map(|(_, hook, program)| (hook, program)));
    let load_queued = || loop {
        // The lock is held only to take the next program, not to load it.
        let next = queue.lock().map(|mut queue| queue.next()).unwrap_or(None);
        let Some((hook, program)) = next else { break };
        let started = Instant::now();
        let _ = match program {
            aya::programs::Program::TracePoint(p) => p.load().map_err(drop),
            aya::programs::Program::RawTracePoint(p) => p.load().map_err(drop),
            // Waits for the stand-in BTF, made meanwhile on a thread of
            // its own (see `Probes::attach_all`).
            aya::programs::Program::BtfTracePoint(p) => match facts.fentry_btf() {
                Ok(btf) => p.load(hook.target, btf).map_err(drop),
                Err(_) => Ok(()),
            },
            _ => Ok(()),
        };
        timing(started, &format!("{} verified", hook.describe()));
    };
    std::thread::scope(|scope| {
        scope.spawn(load_queued);
        load_queued();
    });
}

/// Attaches, for every feature, the first way this kernel allows (see
/// [`features::resolve`]); each program at most once. Returns the hooks
/// attached and every hook tried with its outcome.
pub fn attach_features(
    ebpf: &mut Ebpf,
    facts: &KernelFacts,
) -> (Vec<FeatureStatus>, Vec<(&'static Hook, Result<(), String>)>) {
    let started = Instant::now();
    preload(ebpf, facts);
    timing(started, "best ways' programs verified, two at a time");
    let mut tried: Vec<(&'static Hook, Result<(), String>)> = Vec::new();
    let mut statuses = features::resolve(|program| {
        let mut outcome = Err(format!("no hook {program}"));
        for build in builds_of(program) {
            let Some(hook) = HOOKS.iter().find(|h| h.program == build) else { continue };
            let result = match tried.iter().find(|(h, _)| h.program == build) {
                Some((_, result)) => result.clone(),
                None => {
                    let result = attach(ebpf, facts, hook).map_err(|err| format!("{}: {err}", hook.describe()));
                    tried.push((hook, result.clone()));
                    result
                }
            };
            outcome = result.map(|()| hook.describe());
            if outcome.is_ok() {
                break;
            }
        }
        outcome
    });
    degrade_for_layouts(&mut statuses, facts);
    (statuses, tried)
}

/// Features a hook serves only in part on this kernel because of what its
/// tracepoint reports, not whether it attaches.
fn degrade_for_layouts(statuses: &mut [FeatureStatus], facts: &KernelFacts) {
    for status in statuses.iter_mut().filter(|s| s.level == features::Level::Ok) {
        // Before 6.10 tcp:tcp_send_reset has the 4-tuple layout and fires
        // only for resets sent from a socket: a reset answering a SYN to a
        // closed port (no socket) is not traced.
        if status.feature.name == "resets" && facts.offsets.config.send_reset.saddr == netlens_common::FIELD_ABSENT {
            status.level = features::Level::Degraded;
            status.why = "this kernel's tcp:tcp_send_reset (before 6.10) skips resets sent without a socket, e.g. to a closed port".into();
        }
    }
}

impl Probes {
    /// Gives the start-up's memory back to the system: once the attachment
    /// is announced, before anything measures or serves (~5 ms: the BTF
    /// parses are many small allocations). Freed on a thread while netlens
    /// still started, it took a core from the last steps before the
    /// announcement (the second listener census took 2–6 ms instead of
    /// under 1).
    pub fn settle(&mut self) {
        if let Some(facts) = self.start_up.take() {
            drop(facts);
            // SAFETY: plain libc call.
            unsafe { libc::malloc_trim(0) };
        }
    }

    /// Checks privileges, resolves offsets, loads and attaches what this
    /// kernel allows, with an event ring buffer of `ring_bytes` whose
    /// programs wake userspace once per `wakeup_bytes` of events, and a
    /// flow table sized for `flows`.
    /// Fails only when a required feature cannot be served.
    pub fn attach_all(ring_bytes: u32, wakeup_bytes: u32, flows: FlowTableUse) -> Result<Self> {
        let started = Instant::now();
        if let Some(problem) = probe::preflight() {
            return Err(anyhow!(problem));
        }
        // Made while we resolve our own offsets (see ebpf_loader.rs).
        let loader = std::thread::spawn(ebpf_loader::without_kernel_btf);
        let mut facts = resolve_config()?;
        facts.offsets.config.wakeup_bytes = wakeup_bytes;
        let home = flow_home::choose(&mut facts, flows)?;
        let t = |what: &str| timing(started, &format!("since start, {what}"));
        // The BTF the BTF-tracepoint and fentry programs load with (a
        // stand-in, attach_btf.rs, ~1 ms): made while the object opens.
        let (ebpf, features, tried) = std::thread::scope(|scope| {
            scope.spawn(|| facts.fentry_btf().is_ok());
            let loader = loader.join().map_err(|_| anyhow!("creating the eBPF loader failed"))?;
            t("loader ready");
            let mut ebpf = open_with(loader, &facts, ring_bytes, flows)?;
            t("object opened, maps created");
            let (features, tried) = attach_features(&mut ebpf, &facts);
            anyhow::Ok((ebpf, features, tried))
        })?;
        let (mut ebpf, mut features, tried, flow_home) = place_flows(home, (ebpf, features, tried), &mut facts, |facts| {
            open_with(ebpf_loader::without_kernel_btf(), facts, ring_bytes, flows)
        })?;
        if let Some(missing) = features.iter().find(|f| f.feature.required && f.level == features::Level::Missing) {
            anyhow::bail!("{} cannot be traced on this kernel: {} (run `netlens check`)", missing.feature.name, missing.why);
        }
        t("features attached");
        let optional = attach_optional(&mut ebpf, &facts);
        features.extend(optional.iter().filter_map(optional::FeatureStatus::as_feature));
        let attached = tried.into_iter().filter(|(_, outcome)| outcome.is_ok()).map(|(hook, _)| hook).collect();
        t("optional features attached");
        let drop_reason_names = drop_reason_names(&facts.btf.enum_members("skb_drop_reason").unwrap_or_default());
        let attach_time = started.elapsed();
        let closed_flows = (facts.offsets.config.flows_kept_closed != 0)
            .then(|| table_capacity(&ebpf).map(closed_flows::ClosedFlows::new))
            .transpose()?;
        Ok(Self { ebpf, attached, features, attach_time, optional, drop_reason_names, start_up: Some(facts), flow_home, closed_flows })
    }

    /// The accept-queue hooks attached.
    fn optional_hooks(&self) -> impl Iterator<Item = &'static Hook> + '_ {
        self.optional.iter().filter_map(|status| status.served_by).flat_map(|family| family.hooks.iter())
    }

    pub fn program_count(&self) -> usize {
        self.attached.len() + self.optional_hooks().count()
    }
}

/// The metric's name of each drop reason: BTF's enumerator in lower case,
/// without the `SKB_DROP_REASON_` prefix (`SKB_DROP_REASON_TCP_OFOMERGE` →
/// `tcp_ofomerge`). `SKB_DROP_REASON_MAX` is no reason.
pub fn drop_reason_names(members: &[(String, u32)]) -> Vec<(u32, String)> {
    members
        .iter()
        .filter_map(|(name, value)| {
            let short = name.strip_prefix("SKB_DROP_REASON_")?;
            (short != "MAX").then(|| (*value, short.to_ascii_lowercase()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn drop_reasons_are_named_as_btf_names_them_in_lower_case() {
        let members = [("SKB_DROP_REASON_NOT_SPECIFIED".to_string(), 2), ("SKB_DROP_REASON_TCP_OFOMERGE".to_string(), 9), ("SKB_DROP_REASON_MAX".to_string(), 90)];
        assert_eq!(super::drop_reason_names(&members), [(2, "not_specified".to_string()), (9, "tcp_ofomerge".to_string())]);
    }

    /// Counting programs are programs, and an IPv4 one's IPv6 twin counts
    /// too (kprobe_tcp_v6_syn_recv_sock was once left out, its skipped
    /// runs reported as missed events).
    #[test]
    fn count_only_programs_exist_and_come_in_v4_v6_pairs() {
        use netlens_common::program;
        for name in program::COUNT_ONLY {
            assert!(program::id(name).is_some(), "{name} is not a program");
            if let Some(v6) = name.contains("_v4_").then(|| name.replace("_v4_", "_v6_")) {
                assert!(program::COUNT_ONLY.contains(&v6.as_str()), "{name} counts but {v6} does not");
            }
        }
    }
}
