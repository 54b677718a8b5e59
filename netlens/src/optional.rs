//! Optional hooks: features netlens can run without (the accept queue),
//! each served by the first family of hooks that loads and attaches on
//! this kernel, in order of preference (fentry/fexit, kprobes,
//! tracepoints). A feature no family serves is off, said in one line.

use aya::{maps::{Array, MapData}, Ebpf};
use netlens_common::mode;

use crate::{
    kernel::offsets::AcceptQueueSupport,
    features::{self, Level},
    loader::{self, load_and_attach, Attach, Hook, KernelFacts, SKIP_HOOKS_ENV},
};

/// `NETLENS_SKIP_HOOKS` names this hook's program (as if the kernel lacked
/// it), or the hook is a kprobe on a kernel without kprobes: then it is not
/// loaded at all (verifying a program that cannot attach costs start-up).
fn skipped(hook: &Hook) -> Result<(), String> {
    let skip = std::env::var(SKIP_HOOKS_ENV).unwrap_or_default();
    if skip.split(',').any(|name| name.trim() == hook.program) {
        return Err(format!("{}: left out by {SKIP_HOOKS_ENV}", hook.describe()));
    }
    if matches!(hook.attach, Attach::KProbe | Attach::KRetProbe) && !loader::kprobes_exist() {
        return Err(format!("{}: {}", hook.describe(), loader::NO_KPROBES));
    }
    Ok(())
}

/// One way to serve an optional feature: hooks that must all attach.
pub struct Family {
    pub name: &'static str,
    pub hooks: &'static [Hook],
    /// What this kernel must have for the family to work; `attached` names
    /// the features already served.
    ready: fn(&AcceptQueueSupport, attached: &[&str]) -> Result<(), String>,
}

/// An optional feature: served by the first family that attaches, in
/// order of preference; when none does, netlens runs without it.
pub struct Feature {
    pub name: &'static str,
    pub families: &'static [Family],
}

fn listener_checks(support: &AcceptQueueSupport, _: &[&str]) -> Result<(), String> {
    support.queue.clone()
}

/// Listen overflows from `skb:consume_skb` (the SYN) and `skb:kfree_skb`
/// (the final ACK, through drop_reasons).
fn overflow_tracepoints(support: &AcceptQueueSupport, attached: &[&str]) -> Result<(), String> {
    support.overflow_tracepoints.clone()?;
    if !attached.contains(&"drop_reasons") {
        return Err("needs skb:kfree_skb (drop_reasons)".into());
    }
    Ok(())
}

/// accept() and accept4() through the syscall tracepoints (they share
/// their record layouts), with the exit served by program `exit`. The exit
/// first: it is the program a kernel may refuse (the typed build before
/// 5.11), and a family that fails after attaching some hooks detaches them,
/// which costs a grace period per hook (~75 ms each here).
const fn accept_syscalls(exit: &'static str) -> [Hook; 4] {
    [
        Hook::on(exit, "syscalls", "sys_exit_accept4", Attach::Record),
        Hook::on(exit, "syscalls", "sys_exit_accept", Attach::Record),
        Hook::on("sys_enter_accept", "syscalls", "sys_enter_accept4", Attach::Record),
        Hook::on("sys_enter_accept", "syscalls", "sys_enter_accept", Attach::Record),
    ]
}

/// OPTIONAL hooks (the accept queue). The kprobe/fentry variants compile
/// everywhere and are preferred where the kernel allows them; this host's
/// kind (no kprobes, fentry refused) gets the tracepoint variants (BTF-typed
/// where the kernel takes them).
pub const OPTIONAL: &[Feature] = &[
    // Packet drop reasons (skb:kfree_skb, raw); also the final-ACK listen
    // overflows when they come from tracepoints.
    Feature {
        name: "drop_reasons",
        families: &[Family {
            name: "tracepoint",
            hooks: &[Hook::tracepoint("kfree_skb", "skb", Attach::Raw)],
            ready: |support, _| support.drop_reasons.clone(),
        }],
    },
    Feature {
        name: "listen_overflows",
        families: &[
            Family {
                name: "fentry",
                hooks: &[
                    Hook::on("fentry_tcp_conn_request", "", "tcp_conn_request", Attach::FEntry),
                    Hook::on("fexit_tcp_conn_request", "", "tcp_conn_request", Attach::FExit),
                    Hook::on("fentry_tcp_v4_syn_recv_sock", "", "tcp_v4_syn_recv_sock", Attach::FEntry),
                    Hook::on("fexit_tcp_v4_syn_recv_sock", "", "tcp_v4_syn_recv_sock", Attach::FExit),
                    Hook::on("fentry_tcp_v6_syn_recv_sock", "", "tcp_v6_syn_recv_sock", Attach::FEntry),
                    Hook::on("fexit_tcp_v6_syn_recv_sock", "", "tcp_v6_syn_recv_sock", Attach::FExit),
                ],
                ready: |support, _| support.fexit_syn_recv_sock.clone(),
            },
            Family {
                name: "kprobe",
                hooks: &[
                    Hook::on("kprobe_tcp_conn_request", "", "tcp_conn_request", Attach::KProbe),
                    Hook::on("kprobe_tcp_v4_syn_recv_sock", "", "tcp_v4_syn_recv_sock", Attach::KProbe),
                    Hook::on("kprobe_tcp_v6_syn_recv_sock", "", "tcp_v6_syn_recv_sock", Attach::KProbe),
                ],
                ready: listener_checks,
            },
            // The same program built twice: typed first (fewer helper
            // calls on every consumed packet), raw where the kernel refuses.
            Family {
                name: "tp_btf",
                hooks: &[Hook::on("consume_skb_btf", "skb", "consume_skb", Attach::Btf)],
                ready: overflow_tracepoints,
            },
            Family {
                name: "tracepoint",
                hooks: &[Hook::tracepoint("consume_skb", "skb", Attach::Raw)],
                ready: overflow_tracepoints,
            },
        ],
    },
    Feature {
        name: "accept_queue",
        families: &[
            Family {
                name: "fexit",
                hooks: &[Hook::on("fexit_inet_csk_accept", "", "inet_csk_accept", Attach::FExit)],
                ready: |support, _| support.fexit_accept.clone(),
            },
            Family {
                name: "kprobe",
                hooks: &[
                    Hook::on("kprobe_inet_csk_accept", "", "inet_csk_accept", Attach::KProbe),
                    Hook::on("kretprobe_inet_csk_accept", "", "inet_csk_accept", Attach::KRetProbe),
                ],
                ready: listener_checks,
            },
            // The exits alone, the listening fd from the saved registers
            // (x86-64, 5.15+): every syscall on the host pays less for
            // the tracing (see accept.rs). Then the exit program built
            // twice, with the enter hooks: the fd table through a typed
            // task (5.11+) first, by probe reads where the kernel refuses it.
            Family {
                name: "tracepoint, exits only",
                hooks: &[
                    Hook::on("sys_exit_accept_regs", "syscalls", "sys_exit_accept4", Attach::Record),
                    Hook::on("sys_exit_accept_regs", "syscalls", "sys_exit_accept", Attach::Record),
                ],
                ready: |support, _| support.accept_exits.clone(),
            },
            Family {
                name: "tracepoint",
                hooks: &accept_syscalls("sys_exit_accept_typed"),
                ready: |support, _| support.accept_syscalls.clone(),
            },
            Family {
                name: "tracepoint, probe reads",
                hooks: &accept_syscalls("sys_exit_accept"),
                ready: |support, _| support.accept_syscalls.clone(),
            },
        ],
    },
];

/// Every hook of every optional feature's families.
pub(crate) fn all_hooks() -> impl Iterator<Item = &'static Hook> {
    OPTIONAL.iter().flat_map(|feature| feature.families).flat_map(|family| family.hooks.iter())
}

/// For each optional feature, the hooks of the first family served by
/// tracepoints alone whose hooks are all `available` here: the programs
/// worth verifying ahead, two at a time, with the required ones (see
/// `loader::preload`). The families before it (fentry, kprobes) are left
/// to `attach_optional`: where they load, their programs serve instead and
/// the ones verified here stay unused.
pub(crate) fn preferred_tracepoint_hooks(available: impl Fn(&Hook) -> bool) -> impl Iterator<Item = &'static Hook> {
    // `available` already leaves out the hooks NETLENS_SKIP_HOOKS names.
    let by_tracepoints = |family: &&Family| family.hooks.iter().all(|hook| hook.attach.is_tracepoint());
    OPTIONAL.iter().filter_map(move |feature| {
        feature.families.iter().filter(by_tracepoints).find(|family| family.hooks.iter().all(&available))
    })
    .flat_map(|family| family.hooks.iter())
}

/// How an optional feature fared: the family serving it, and why each
/// family tried before it (or every family) could not.
pub struct FeatureStatus {
    pub feature: &'static str,
    pub served_by: Option<&'static Family>,
    pub failures: Vec<String>,
}

impl FeatureStatus {
    /// As a row of the feature table (`features::FeatureStatus`).
    pub fn as_feature(&self) -> Option<features::FeatureStatus> {
        let feature = features::named(self.feature)?;
        Some(match self.served_by {
            Some(family) => features::FeatureStatus {
                feature,
                level: Level::Ok,
                hooks: family.hooks.iter().map(Hook::describe).collect(),
                why: String::new(),
            },
            None => features::FeatureStatus { feature, level: Level::Missing, hooks: Vec::new(), why: self.failures.join("; ") },
        })
    }

    /// One line: `listen_overflows: tracepoint (fentry: ...; kprobe: ...)`.
    pub fn describe(&self) -> String {
        let tried = self.failures.join("; ");
        match (self.served_by, tried.is_empty()) {
            (Some(family), true) => format!("{}: {}", self.feature, family.name),
            (Some(family), false) => format!("{}: {} ({tried})", self.feature, family.name),
            (None, _) => format!("{}: off ({tried})", self.feature),
        }
    }
}

/// Attaches each optional feature with the first family that works, and
/// tells the programs which ones serve (the `MODES` map).
pub fn attach_optional(ebpf: &mut Ebpf, facts: &KernelFacts) -> Vec<FeatureStatus> {
    let (config, code_ranges) = (&facts.offsets.config, facts.offsets.code_ranges.get());
    let support = AcceptQueueSupport::of(&config.accept_queue, &code_ranges);
    // Before any program that tests them attaches.
    if let Some(Ok(mut map)) = ebpf.map_mut("CODE_RANGES").map(Array::<&mut MapData, [u64; 2]>::try_from) {
        for (index, (start, end)) in (0u32..).zip(code_ranges) {
            let _ = map.set(index, [start, end], 0);
        }
    }
    // Before the programs that record SYN arrivals can attach: until
    // then, a passive open would skip an entry one had just recorded.
    set_modes(ebpf, mode::SYN_STARTS_RECORDED);
    let mut statuses: Vec<FeatureStatus> = Vec::new();
    for feature in OPTIONAL {
        let attached: Vec<&str> = statuses.iter().filter(|s| s.served_by.is_some()).map(|s| s.feature).collect();
        let mut status = FeatureStatus { feature: feature.name, served_by: None, failures: Vec::new() };
        for family in feature.families {
            let result = (family.ready)(&support, &attached).map_err(|missing| format!("{}: {missing}", family.name)).and_then(|()| {
                family.hooks.iter().try_for_each(|hook| {
                    skipped(hook)?;
                    load_and_attach(ebpf, facts, hook).map_err(|err| format!("{}: {}: {err}", family.name, hook.describe()))
                })
            });
            match result {
                Ok(()) => {
                    status.served_by = Some(family);
                    break;
                }
                Err(failure) => {
                    // Unloading detaches whatever of the family did attach.
                    for hook in family.hooks {
                        if let Some(program) = ebpf.program_mut(hook.program) {
                            unload(program);
                        }
                    }
                    status.failures.push(failure);
                }
            }
        }
        statuses.push(status);
    }
    // Verified ahead for a family that does not serve (see
    // `preferred_tracepoint_hooks`): not kept loaded.
    let serving: Vec<&str> = statuses.iter().filter_map(|s| s.served_by).flat_map(|family| family.hooks.iter().map(|hook| hook.program)).collect();
    for hook in all_hooks() {
        if let Some(program) = ebpf.program_mut(hook.program).filter(|program| !serving.contains(&hook.program) && program.fd().is_ok()) {
            unload(program);
        }
    }
    let overflows_from = statuses.iter().find(|s| s.feature == "listen_overflows").and_then(|s| s.served_by).map(|family| family.name);
    set_modes(
        ebpf,
        match overflows_from {
            Some("tp_btf" | "tracepoint") => mode::OVERFLOWS_FROM_TRACEPOINTS,
            // Their tcp_conn_request programs record SYN arrivals.
            Some("fentry" | "kprobe") => mode::SYN_STARTS_RECORDED,
            _ => 0,
        },
    );
    statuses
}

/// Tells the programs which ways serve (`netlens_common::mode` bits).
fn set_modes(ebpf: &mut Ebpf, modes: u32) {
    if let Some(Ok(mut map)) = ebpf.map_mut("MODES").map(Array::<&mut MapData, u32>::try_from) {
        let _ = map.set(0, modes, 0);
    }
}

/// Unloads a program (detaching it) so that another family can serve.
fn unload(program: &mut aya::programs::Program) {
    use aya::programs::Program;
    let _ = match program {
        Program::TracePoint(p) => p.unload(),
        Program::RawTracePoint(p) => p.unload(),
        Program::BtfTracePoint(p) => p.unload(),
        Program::FEntry(p) => p.unload(),
        Program::FExit(p) => p.unload(),
        Program::KProbe(p) => p.unload(),
        _ => Ok(()),
    };
}
