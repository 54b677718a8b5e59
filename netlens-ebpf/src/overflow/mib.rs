//! The kernel's own count of listen overflows, `LINUX_MIB_LISTENOVERFLOWS`
//! (what nstat shows as TcpExtListenOverflows), as this CPU holds it for
//! one namespace. Where only tracepoints exist, the SYN and the final ACK
//! are seen after the kernel decided; whether that counter grew on this
//! CPU since our last look says whether the packet just handled here
//! overflowed: the kernel handles each packet on one CPU, in one softirq
//! (or under the listener's lock), from its queue test to the consume or
//! free we see. Our own tests of the queue, microseconds later, were wrong
//! now and then (an accept() on the other CPU in between).
//!
//! The counter is per CPU (`net->mib.net_statistics`, a per-CPU pointer).
//! BPF reaches this CPU's copy of a per-CPU variable through ksyms (which
//! need it in /proc/kallsyms: not with CONFIG_KALLSYMS_ALL off, as on this
//! project's development host) or through per-CPU pointers typed by BTF
//! (type tags, which GCC-built kernels' BTF lacks). So this CPU's per-CPU
//! offset comes from a per-CPU map of our own, which has both: the address
//! of its value on this CPU, and the per-CPU pointer behind it in the map
//! (`struct bpf_array` → `pptrs[0]`). Their difference is the offset the
//! kernel adds to every per-CPU pointer on this CPU; computed once per CPU.

use aya_ebpf::{macros::map, maps::PerCpuArray};

use crate::{
    config::cfg_field,
    kernel::{cast, member, typed_member},
};

/// Namespaces remembered per CPU, by inode number modulo this: a host
/// with more namespaces overflowing on one CPU at once falls back to
/// testing the queue for a packet whose slot another namespace took.
const NAMESPACE_SLOTS: usize = 64;

/// A struct member this kernel lacks (as in netlens_common's config).
const MISSING: u32 = u32::MAX;

#[repr(C)]
#[derive(Clone, Copy)]
struct Seen {
    /// The namespace's inode number, 0 for a free slot, and its `struct
    /// net`'s address: a namespace made after one was destroyed can have
    /// either again, and its counter starts over.
    netns: u32,
    _pad: u32,
    net: u64,
    /// Its counter on this CPU at our last look.
    count: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct CpuWatch {
    /// Where a pointer is written and read back as a number (see
    /// [`address_of`]).
    scratch: u64,
    /// This CPU's per-CPU offset, 0 until computed.
    cpu_offset: u64,
    seen: [Seen; NAMESPACE_SLOTS],
}

#[map]
static MIB_WATCH: PerCpuArray<CpuWatch> = PerCpuArray::with_max_entries(1, 0);

/// Whether this kernel's BTF gave every member this needs.
#[inline(always)]
fn available() -> bool {
    cfg_field!(accept_queue.bpf_array_pptrs) != MISSING
        && cfg_field!(accept_queue.net_mib_statistics) != MISSING
        && cfg_field!(accept_queue.mib_listen_overflows) != MISSING
}

/// `pointer` as a plain number, one BPF can do arithmetic with: stored in
/// map memory and loaded back. (Privileged programs may store pointers in
/// maps; what they load back is a number.) Volatile: the compiler must not
/// hand the register itself on.
///
/// # Safety
/// `scratch` points into a live map value.
#[inline(always)]
pub(super) unsafe fn address_of(scratch: *mut u64, pointer: u64) -> u64 {
    core::ptr::write_volatile(scratch, pointer);
    core::ptr::read_volatile(scratch)
}

/// This CPU's per-CPU offset (see the top of this file).
#[inline(always)]
fn cpu_offset(watch: *mut CpuWatch) -> Option<u64> {
    // SAFETY: this CPU's slot of a live map value; nothing else writes it
    // while we run.
    unsafe {
        if (*watch).cpu_offset != 0 {
            return Some((*watch).cpu_offset);
        }
        let scratch = core::ptr::addr_of_mut!((*watch).scratch);
        let map = address_of(scratch, core::ptr::addr_of!(MIB_WATCH) as u64);
        let percpu: u64 = member(map, cfg_field!(accept_queue.bpf_array_pptrs)).ok()?;
        let here = address_of(scratch, watch as u64);
        let offset = here.wrapping_sub(percpu);
        (*watch).cpu_offset = offset;
        Some(offset)
    }
}

/// What [`overflows_since_last_look`] returns when it cannot tell: a
/// number, not `None`, because with `Option<u64>` the compiler left the
/// payload's register unset on the `None` path and then spilled it, which
/// the verifier refuses.
pub const UNKNOWN: u64 = u64::MAX;

/// The kernel's count of listen overflows on this CPU in namespace `net`
/// (a `struct net *`), [`UNKNOWN`] where it cannot be read. `TYPED`:
/// `net` is typed by BTF and the kernel has the cast kfunc: plain loads,
/// not two probe reads.
#[inline(always)]
fn count_here<const TYPED: bool>(watch: *mut CpuWatch, net: u64) -> u64 {
    let Some(offset) = cpu_offset(watch) else { return UNKNOWN };
    let (statistics_at, counter_at) = (cfg_field!(accept_queue.net_mib_statistics), cfg_field!(accept_queue.mib_listen_overflows));
    let mib_type = cfg_field!(accept_queue.linux_mib_btf_id);
    if TYPED && mib_type != 0 {
        // SAFETY: `net` is typed and `statistics_at` its member; the
        // counter's address, a number, is cast to the struct it lies in
        // (a load through a cast pointer cannot fault).
        return unsafe {
            let statistics: u64 = typed_member(net, statistics_at);
            let here = address_of(core::ptr::addr_of_mut!((*watch).scratch), statistics).wrapping_add(offset);
            typed_member::<u64>(cast(here, mib_type), counter_at)
        };
    }
    let Ok(statistics) = member::<u64>(net, statistics_at) else { return UNKNOWN };
    member::<u64>(statistics.wrapping_add(offset), counter_at).unwrap_or(UNKNOWN)
}

/// The kernel's count of listen overflows on this CPU in namespace `net`
/// now, [`UNKNOWN`] where it cannot be read: for a before and after around
/// one kernel function (fentry and fexit).
#[inline(always)]
pub fn listen_overflows_now<const TYPED: bool>(net: u64) -> u64 {
    if !available() {
        return UNKNOWN;
    }
    let Some(watch) = MIB_WATCH.get_ptr_mut(0) else { return UNKNOWN };
    count_here::<TYPED>(watch, net)
}

/// The kernel's count of listen overflows on this CPU in a namespace, and
/// by how much it grew since the last look at that namespace on this CPU.
#[derive(Clone, Copy)]
pub struct Look {
    /// [`UNKNOWN`] where it cannot be read.
    pub count: u64,
    /// [`UNKNOWN`] also the first time, or when another namespace took its
    /// slot meanwhile.
    pub grown: u64,
}

/// Looks at the count of namespace `net` (a `struct net *`, its inode
/// number `netns`) on this CPU. `TYPED` as for [`count_here`].
#[inline(always)]
pub fn look<const TYPED: bool>(net: u64, netns: u32) -> Look {
    let unknown = Look { count: UNKNOWN, grown: UNKNOWN };
    if !available() {
        return unknown;
    }
    let Some(watch) = MIB_WATCH.get_ptr_mut(0) else { return unknown };
    let count = count_here::<TYPED>(watch, net);
    if count == UNKNOWN {
        return unknown;
    }
    // SAFETY: this CPU's slot, as above; `net` may be a typed pointer,
    // made a number to compare and keep.
    let (slot, net) = unsafe {
        let Some(slot) = (*watch).seen.get_mut(netns as usize % NAMESPACE_SLOTS) else { return unknown };
        (slot, address_of(core::ptr::addr_of_mut!((*watch).scratch), net))
    };
    let same = slot.netns == netns && slot.net == net && count >= slot.count;
    let grown = if same { (count - slot.count).min(UNKNOWN - 1) } else { UNKNOWN };
    *slot = Seen { netns, _pad: 0, net, count };
    Look { count, grown }
}

/// How many listen overflows the kernel counted on this CPU in namespace
/// `net` since the last look at it here ([`Look::grown`]).
#[inline(always)]
pub fn overflows_since_last_look<const TYPED: bool>(net: u64, netns: u32) -> u64 {
    look::<TYPED>(net, netns).grown
}
