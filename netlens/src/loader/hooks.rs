//! The hooks netlens can attach: which program serves which tracepoint
//! or kernel function, and how it attaches.

/// How a program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// A classic tracepoint: the kernel formats a record (layout from its
    /// tracefs `format` file). For rare events.
    Record,
    /// A raw tracepoint: the tracepoint's arguments as they are, no record.
    /// For hot events, where formatting a record would cost every call.
    Raw,
    /// A BTF tracepoint (`tp_btf`): a raw tracepoint whose arguments the
    /// verifier knows by type, so socket members are plain loads (see the
    /// eBPF side's sock.rs). Preferred over `Raw` where the kernel takes it.
    Btf,
    /// fentry / fexit on a kernel function (BPF trampolines, typed
    /// arguments): what older kernels offer where a tracepoint is missing.
    /// Not on every kernel (refused on some, e.g. EPERM).
    FEntry,
    FExit,
    /// kprobe / kretprobe on a kernel function: the fallback where fentry
    /// is refused (CONFIG_KPROBES and lockdown permitting).
    KProbe,
    KRetProbe,
}

impl Attach {
    /// A tracepoint of any kind: its programs load the same on every
    /// kernel that has it (verified ahead, two at a time; see
    /// `loader::preload`).
    pub fn is_tracepoint(self) -> bool {
        matches!(self, Attach::Record | Attach::Raw | Attach::Btf)
    }
}

/// A hook netlens can attach, and the program that handles it.
#[derive(Clone, Copy, Debug)]
pub struct Hook {
    /// The program's name in the eBPF object.
    pub program: &'static str,
    /// Tracepoint category (tracepoints only).
    pub category: &'static str,
    /// The tracepoint or kernel function.
    pub target: &'static str,
    pub attach: Attach,
}

impl Hook {
    pub(crate) const fn tracepoint(program: &'static str, category: &'static str, attach: Attach) -> Self {
        Self { program, category, target: program, attach }
    }

    pub(crate) const fn function(program: &'static str, target: &'static str, attach: Attach) -> Self {
        Self { program, category: "", target, attach }
    }

    /// As `check` and stderr name it: `raw tracepoint sock:sk_data_ready`.
    pub fn describe(&self) -> String {
        match self.attach {
            Attach::Record => format!("tracepoint {}:{}", self.category, self.target),
            Attach::Raw => format!("raw tracepoint {}:{}", self.category, self.target),
            Attach::Btf => format!("tp_btf {}:{}", self.category, self.target),
            Attach::FEntry => format!("fentry {}", self.target),
            Attach::FExit => format!("fexit {}", self.target),
            Attach::KProbe => format!("kprobe {}", self.target),
            Attach::KRetProbe => format!("kretprobe {}", self.target),
        }
    }

    /// A program attached to `target` (a tracepoint of `category`, or a
    /// kernel function when `category` is empty). One program may serve
    /// several targets (accept and accept4).
    pub(crate) const fn on(program: &'static str, category: &'static str, target: &'static str, attach: Attach) -> Self {
        Self { program, category, target, attach }
    }

}

/// Every hook; `features::FEATURES` says which ones serve what.
pub const HOOKS: &[Hook] = &[
    Hook::on("inet_sock_set_state_btf", "sock", "inet_sock_set_state", Attach::Btf),
    Hook::tracepoint("inet_sock_set_state", "sock", Attach::Raw),
    Hook::on("tcp_retransmit_skb_btf", "tcp", "tcp_retransmit_skb", Attach::Btf),
    Hook::tracepoint("tcp_retransmit_skb", "tcp", Attach::Record),
    Hook::on("tcp_retransmit_synack_btf", "tcp", "tcp_retransmit_synack", Attach::Btf),
    Hook::tracepoint("tcp_retransmit_synack", "tcp", Attach::Record),
    Hook::on("tcp_send_reset_btf", "tcp", "tcp_send_reset", Attach::Btf),
    Hook::tracepoint("tcp_send_reset", "tcp", Attach::Record),
    Hook::on("tcp_receive_reset_btf", "tcp", "tcp_receive_reset", Attach::Btf),
    Hook::tracepoint("tcp_receive_reset", "tcp", Attach::Record),
    Hook::on("tcp_probe_btf", "tcp", "tcp_probe", Attach::Btf),
    Hook::tracepoint("tcp_probe", "tcp", Attach::Raw),
    Hook::on("sk_data_ready_btf", "sock", "sk_data_ready", Attach::Btf),
    Hook::tracepoint("sk_data_ready", "sock", Attach::Raw),
    Hook::function("tcp_data_ready_fentry", "tcp_data_ready", Attach::FEntry),
    Hook::function("tcp_data_ready_kprobe", "tcp_data_ready", Attach::KProbe),
    Hook::on("tcp_cong_state_set_btf", "tcp", "tcp_cong_state_set", Attach::Btf),
    Hook::tracepoint("tcp_cong_state_set", "tcp", Attach::Record),
];

/// Programs built twice on the eBPF side (sock.rs): the name features use,
/// and the BTF-tracepoint build tried before it.
pub(super) const TYPED_BUILDS: &[(&str, &str)] = &[
    ("inet_sock_set_state", "inet_sock_set_state_btf"),
    ("tcp_retransmit_skb", "tcp_retransmit_skb_btf"),
    ("tcp_receive_reset", "tcp_receive_reset_btf"),
    ("tcp_send_reset", "tcp_send_reset_btf"),
    ("tcp_retransmit_synack", "tcp_retransmit_synack_btf"),
    ("tcp_probe", "tcp_probe_btf"),
    ("tcp_cong_state_set", "tcp_cong_state_set_btf"),
    ("sk_data_ready", "sk_data_ready_btf"),
];

/// The programs that can serve `program`, best first.
pub(super) fn builds_of(program: &'static str) -> impl Iterator<Item = &'static str> {
    let typed = TYPED_BUILDS.iter().find(|(name, _)| *name == program).map(|(_, typed)| *typed);
    typed.into_iter().chain(std::iter::once(program))
}
