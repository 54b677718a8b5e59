//! Where the programs keep per-connection state (flows.rs in the eBPF
//! crate): in an array of slots found by the socket's hashed address
//! (slots.rs), in socket-local storage, which the kernel frees with the
//! socket (no table to fill, nothing lost), or in a hash table. The array
//! and the table are sized at start.
//!
//! The array is the default where the kernel allows it (see
//! [`DEFAULT_WHY`]), else the table; [`FLOW_STATE_ENV`] asks for one.
//! Both are chosen only where every hook that keeps flows is a BTF
//! tracepoint or fentry. Socket storage's helpers take only the BTF-typed
//! socket a tracing program was handed: hooks that only report (the
//! resets' and accept()'s tracepoints) find no flow there, and userspace
//! joins them to their connection (known_connections.rs). The array's
//! hash takes a typed socket with no call, and an address with a map
//! lookup more (slots.rs): every hook finds its flow, but tcp_probe's
//! raw build would pay that per segment. The choice is made before the
//! programs load (it is frozen into their config): a kernel that then
//! refuses a typed build, so that a raw one keeps flows, gets everything
//! loaded again with the table.

use anyhow::{anyhow, Result};
use aya::Ebpf;

use super::{
    attach_features,
    sizing::{self, FlowTableUse, FLOW_TABLE_ENV},
    Attach, Hook, KernelFacts,
};
use crate::{features::FeatureStatus, kernel::probe};

/// Chooses where flows live: `array` (the default where the kernel
/// allows it), `table` or `storage`.
pub const FLOW_STATE_ENV: &str = "NETLENS_FLOW_STATE";

/// Why the array is the default: tcp_probe finds a flow there with a few
/// inlined loads for every segment, where the table's lookup is two
/// calls (docs/benchmarks.md). Socket storage is not: measured on 6.18
/// (docs/benchmarks.md, "Where the time went", 2026-12-02 15:10), it made
/// each connection cost more kernel time (two storage allocations per
/// connection, ~650 ns each), and connection churn is the common load of
/// the hosts the daemon runs on.
const DEFAULT_WHY: &str = "the default; NETLENS_FLOW_STATE=table or storage chooses another";

/// The array's claims are BPF compare-and-exchanges, from this release on.
const CMPXCHG_FROM: (u32, u32) = (5, 12);

/// Tracing programs may use socket storage from this release on.
const STORAGE_FOR_TRACING: (u32, u32) = (5, 11);

/// The table keeps closed flows for reuse from this release on: userspace
/// sweeps the ones left with BPF_MAP_LOOKUP_AND_DELETE_ELEM, which hash
/// maps have since 5.14, and which tells it whether a new connection
/// took the entry meanwhile (closed_flows.rs). Before, each close removes
/// its entry.
const KEEP_CLOSED_FROM: (u32, u32) = (5, 14);

/// Programs that keep flows (both builds of each; see hooks.rs).
const FLOW_KEEPERS: &[&str] =
    &["inet_sock_set_state", "tcp_probe", "sk_data_ready", "tcp_data_ready", "tcp_cong_state_set", "tcp_retransmit_skb"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowHome {
    /// The array of slots, and why.
    Slots(String),
    Storage,
    /// The hash table, and why not the array or socket storage.
    Table(String),
}

/// Whether this kernel's table keeps closed flows (see [`KEEP_CLOSED_FROM`]).
fn table_keeps_closed() -> bool {
    probe::parse_release(&probe::kernel_release()).is_some_and(|version| version >= KEEP_CLOSED_FROM)
}

impl FlowHome {
    /// What to load with: [`FLOW_STATE_ENV`] (`array`, the default,
    /// `table` or `storage`), unless this kernel or the environment rules
    /// it out. An unknown value is an error.
    pub fn first_choice() -> Result<Self, String> {
        let asked = std::env::var(FLOW_STATE_ENV).unwrap_or_default();
        let version = probe::parse_release(&probe::kernel_release());
        match asked.trim() {
            "" => Ok(Self::slots_on(version, DEFAULT_WHY)),
            "array" => Ok(Self::slots_on(version, &format!("{FLOW_STATE_ENV}=array"))),
            "table" => Ok(Self::Table(format!("{FLOW_STATE_ENV}=table"))),
            "storage" if std::env::var_os(FLOW_TABLE_ENV).is_some() => {
                Ok(Self::Table(format!("{FLOW_TABLE_ENV} sizes the table")))
            }
            "storage" => Ok(match version {
                Some(version) if version >= STORAGE_FOR_TRACING => Self::Storage,
                _ => Self::Table(format!(
                    "socket storage needs Linux {}.{}+ for tracing programs",
                    STORAGE_FOR_TRACING.0, STORAGE_FOR_TRACING.1
                )),
            }),
            other => Err(format!("{FLOW_STATE_ENV}=`{other}` must be `array`, `table` or `storage`")),
        }
    }

    /// The array where this kernel has BPF's compare-and-exchange.
    fn slots_on(version: Option<(u32, u32)>, why: &str) -> Self {
        match version {
            Some(version) if version >= CMPXCHG_FROM => Self::Slots(why.into()),
            _ => Self::Table(format!("the array of flows needs Linux {}.{}+ (BPF compare-and-exchange)", CMPXCHG_FROM.0, CMPXCHG_FROM.1)),
        }
    }

    /// This choice, given the hooks that attached; the table where a hook
    /// that keeps flows cannot reach socket storage (load again).
    pub fn given(self, attached: &[&Hook]) -> Self {
        match (self, unreachable_by(attached)) {
            (Self::Storage, Some(hook)) => Self::Table(format!("{} keeps flows and cannot reach socket storage", hook.describe())),
            (Self::Slots(_), Some(hook)) => Self::Table(format!("{} keeps flows and holds no typed socket to hash at no cost", hook.describe())),
            (home, _) => home,
        }
    }

    pub fn in_storage(&self) -> bool {
        *self == Self::Storage
    }

    pub fn in_slots(&self) -> bool {
        matches!(self, Self::Slots(_))
    }

    /// `check`'s line, given the config the programs loaded with.
    pub fn describe(&self, config: &netlens_common::Config) -> String {
        let closed = match config.flows_kept_closed {
            0 => format!("a close removes its entry (Linux {}.{}+ keeps it for reuse)", KEEP_CLOSED_FROM.0, KEEP_CLOSED_FROM.1),
            _ => "closed flows kept for the next socket at their address, swept by userspace".into(),
        };
        match self {
            Self::Slots(why) => format!(
                "array of {} slots in buckets of {} found by hashed socket address (a close frees its slot), flows lost counted ({why})",
                (u64::from(config.flow_slot_mask) + 1) * netlens_common::SLOT_WAYS as u64,
                netlens_common::SLOT_WAYS
            ),
            Self::Storage => "socket storage (freed with each socket; nothing to evict)".into(),
            Self::Table(why) => format!("hash table, flows lost counted, {closed} ({why})"),
        }
    }
}

/// Writes `home` into the programs' config, before they load; the array
/// gets `entries` slots, rounded up to a power of two of buckets (its
/// hash's mask) of `SLOT_WAYS` slots.
fn configure(facts: &mut KernelFacts, home: &FlowHome, entries: u32) {
    let config = &mut facts.offsets.config;
    config.flows_in_storage = u32::from(home.in_storage());
    config.flows_in_slots = u32::from(home.in_slots());
    let buckets = if home.in_slots() { entries.div_ceil(netlens_common::SLOT_WAYS as u32).next_power_of_two() } else { 1 };
    config.flow_slot_mask = buckets - 1;
    config.flows_kept_closed = u32::from(matches!(home, FlowHome::Table(_)) && table_keeps_closed());
}

/// Chooses where flows live ([`FlowHome::first_choice`]), for `table_use`
/// (see sizing.rs), and writes the choice into the programs' config,
/// before they load.
pub fn choose(facts: &mut KernelFacts, table_use: FlowTableUse) -> Result<FlowHome> {
    let home = FlowHome::first_choice().map_err(|err| anyhow!(err))?;
    configure(facts, &home, sizing::flow_table_entries(table_use)?);
    Ok(home)
}

/// The features' hooks, attached, and where flows live: `home` as loaded
/// in `attached`, or where a hook that keeps flows cannot reach socket
/// storage, everything loaded again by `reopen` with the table.
pub fn place_flows(
    home: FlowHome,
    attached: (Ebpf, Vec<FeatureStatus>, Tried),
    facts: &mut KernelFacts,
    reopen: impl FnOnce(&KernelFacts) -> Result<Ebpf>,
) -> Result<(Ebpf, Vec<FeatureStatus>, Tried, FlowHome)> {
    let (ebpf, features, tried) = attached;
    let hooks: Vec<&Hook> = tried.iter().filter(|(_, outcome)| outcome.is_ok()).map(|(hook, _)| *hook).collect();
    let placed = home.clone().given(&hooks);
    if placed == home {
        return Ok((ebpf, features, tried, home));
    }
    // Detached with the object, before the same hooks attach again.
    drop(ebpf);
    configure(facts, &placed, 0);
    let mut ebpf = reopen(facts)?;
    let (features, tried) = attach_features(&mut ebpf, facts);
    Ok((ebpf, features, tried, placed))
}

/// Every hook tried, with its outcome.
pub type Tried = Vec<(&'static Hook, Result<(), String>)>;

fn keeps_flows(program: &str) -> bool {
    FLOW_KEEPERS.iter().any(|keeper| program.starts_with(keeper))
}

/// The first hook in `attached` that keeps flows from a program that
/// holds no typed socket (for socket storage's helpers, or the array's
/// hash without a lookup).
fn unreachable_by<'a>(attached: &[&'a Hook]) -> Option<&'a Hook> {
    attached.iter().copied().find(|hook| keeps_flows(hook.program) && !matches!(hook.attach, Attach::Btf | Attach::FEntry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_build_keeping_flows_sends_them_to_the_table() {
        let typed = Hook::on("tcp_probe_btf", "tcp", "tcp_probe", Attach::Btf);
        let raw = Hook::tracepoint("tcp_probe", "tcp", Attach::Raw);
        let reset = Hook::tracepoint("tcp_send_reset", "tcp", Attach::Record);
        let fentry = Hook::function("tcp_data_ready_fentry", "tcp_data_ready", Attach::FEntry);
        let kprobe = Hook::function("tcp_data_ready_kprobe", "tcp_data_ready", Attach::KProbe);
        assert_eq!(FlowHome::Storage.given(&[&typed, &reset, &fentry]), FlowHome::Storage, "resets only report");
        assert!(matches!(FlowHome::Storage.given(&[&typed, &raw]), FlowHome::Table(why) if why.contains("tcp_probe")));
        assert!(matches!(FlowHome::Storage.given(&[&kprobe]), FlowHome::Table(_)));
        let table = FlowHome::Table("5.10".into());
        assert_eq!(table.clone().given(&[&typed]), table);
        let slots = FlowHome::Slots("default".into());
        assert_eq!(slots.clone().given(&[&typed, &reset, &fentry]), slots);
        assert!(matches!(slots.given(&[&typed, &raw]), FlowHome::Table(why) if why.contains("tcp_probe")));
    }
}
