//! Small, checked reads of tracepoint records and kernel structs.
//!
//! A tracepoint record is copied to the stack in one `bpf_probe_read_kernel`
//! and its fields picked from the copy: one helper call per event instead
//! of one per field. Kernel struct members are read one by one through the
//! same helper, which fails cleanly on a bad address: a wrong offset costs a
//! missing field, never a crash. Offsets come from [`crate::config`].

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, generated},
    macros::map,
    maps::PerCpuArray,
    programs::{FExitContext, TracePointContext},
    EbpfContext,
};
use netlens_common::{ListenerKey, CAST_CALL, TupleFields, Window, AF_INET, AF_INET6, FIELD_ABSENT, PROBE_WINDOWS, RECORD_MAX};

use crate::{
    config::cfg_field,
    sock::{Probed, Sock},
};

/// The time of this program run, read from the clock at most once and only
/// when something needs it: on most segments nothing does, and a call to
/// `bpf_ktime_get_ns` was a fifth of `tcp_probe`'s time on this host.
#[derive(Clone, Copy, Default)]
pub struct Clock(u64);

impl Clock {
    #[inline(always)]
    pub fn now(&mut self) -> u64 {
        if self.0 == 0 {
            // SAFETY: bpf_ktime_get_ns has no preconditions.
            self.0 = unsafe { generated::bpf_ktime_get_ns() };
        }
        self.0
    }
}

/// A copy of one tracepoint record.
#[repr(C, align(8))]
pub struct Record {
    bytes: [u8; RECORD_MAX],
}

/// Which scratch slot a program copies its record into. One per program:
/// a program never nests in itself (the kernel's recursion guard), but a
/// softirq can run another one on the same CPU in the middle of it.
pub mod slot {
    pub const SET_STATE: u32 = 0;
    pub const RETRANSMIT: u32 = 1;
    pub const SYNACK: u32 = 2;
    pub const SEND_RESET: u32 = 3;
    pub const RECEIVE_RESET: u32 = 4;
    pub const CONG_STATE: u32 = 5;
    /// overflow.rs: `kfree_skb`, and the SYN-path hooks.
    pub const DROP: u32 = 6;
    pub const SYN: u32 = 7;
    /// accept.rs, where flows live in socket storage.
    pub const ACCEPT: u32 = 8;
    pub const COUNT: u32 = 9;
}

/// Per-CPU scratch space for records: the 512-byte BPF stack has no room
/// for a record next to an event under construction.
#[map]
static RECORDS: PerCpuArray<Record> = PerCpuArray::with_max_entries(slot::COUNT, 0);

impl Record {
    /// Copies the first `len` bytes (the record length from its format
    /// file) of the tracepoint record into this CPU's `slot`.
    #[inline(always)]
    pub fn read(ctx: &TracePointContext, len: u16, slot: u32) -> Result<&'static Self, i32> {
        Self::copy(ctx.as_ptr() as u64, len, slot)
    }

    /// Copies `len` bytes of kernel memory at `src` into this CPU's `slot`.
    #[inline(always)]
    pub fn copy(src: u64, len: u16, slot: u32) -> Result<&'static Self, i32> {
        let record = RECORDS.get_ptr_mut(slot).ok_or(-1)?;
        // SAFETY: a per-CPU map value, used only by this program on this CPU.
        let record = unsafe { &mut *record };
        let len = (len as u32).min(RECORD_MAX as u32);
        // SAFETY: the destination holds RECORD_MAX >= len bytes; the helper
        // validates the source.
        let ret = unsafe {
            generated::bpf_probe_read_kernel(record.bytes.as_mut_ptr() as *mut c_void, len, src as *const c_void)
        };
        if ret < 0 {
            return Err(ret as i32);
        }
        Ok(&*record)
    }

    /// The field at `offset`.
    #[inline(always)]
    pub fn get<T: Copy>(&self, offset: u16) -> Result<T, i32> {
        let at = offset as usize;
        if at + size_of::<T>() > RECORD_MAX {
            return Err(-1);
        }
        // SAFETY: in bounds (checked above); read_unaligned for any offset.
        Ok(unsafe { core::ptr::read_unaligned(self.bytes.as_ptr().add(at) as *const T) })
    }
}

/// Copies of up to [`PROBE_WINDOWS`] stretches of one kernel struct:
/// window `i` at `i * RECORD_MAX` (see `netlens_common::ProbeOffsets`).
#[repr(C, align(8))]
pub struct Windows {
    bytes: [u8; PROBE_WINDOWS * RECORD_MAX],
}

/// Which scratch slot of [`WINDOWS`] a program uses.
pub mod window_slot {
    pub const PROBE: u32 = 0;
    pub const SET_STATE: u32 = 1;
    pub const COUNT: u32 = 2;
}

#[map]
static WINDOWS: PerCpuArray<Windows> = PerCpuArray::with_max_entries(window_slot::COUNT, 0);

impl Windows {
    /// Copies each used window of the struct at `base` into this CPU's
    /// `slot`: one read per window.
    #[inline(always)]
    pub fn copy(base: u64, windows: &[Window; PROBE_WINDOWS], slot: u32) -> Result<&'static Self, i32> {
        let copy = WINDOWS.get_ptr_mut(slot).ok_or(-1)?;
        // SAFETY: a per-CPU map value, used only by this program on this CPU.
        let copy = unsafe { &mut *copy };
        for (index, window) in windows.iter().enumerate() {
            if window.len == 0 {
                if index == 0 {
                    return Err(-1);
                }
                break;
            }
            let len = window.len.min(RECORD_MAX as u32);
            let dst = copy.bytes[index * RECORD_MAX..].as_mut_ptr() as *mut c_void;
            // SAFETY: RECORD_MAX >= len bytes remain from `dst` in this
            // window's part of the buffer; the helper validates the source.
            let ret = unsafe { generated::bpf_probe_read_kernel(dst, len, (base + window.start as u64) as *const c_void) };
            if ret < 0 {
                return Err(ret as i32);
            }
        }
        Ok(&*copy)
    }

    /// The field at `offset` in the copied buffer.
    #[inline(always)]
    pub fn get<T: Copy>(&self, offset: u16) -> Result<T, i32> {
        let at = offset as usize;
        if at + size_of::<T>() > PROBE_WINDOWS * RECORD_MAX {
            return Err(-1);
        }
        // SAFETY: in bounds (checked above); read_unaligned for any offset.
        Ok(unsafe { core::ptr::read_unaligned(self.bytes.as_ptr().add(at) as *const T) })
    }
}

/// Where a syscall tracepoint's record has its first argument (enter) or
/// its return value (exit): after the common fields and `__syscall_nr`.
const SYSCALL_RECORD_FIRST: usize = 16;

/// The 8-byte field at `offset` (from the tracepoint's format file) of a
/// classic tracepoint's record. The verifier lets a program load from its
/// context only at an offset written in the load instruction itself: at
/// the offset syscall records use (every kernel's), a plain load, the one
/// path the verifier follows since it knows `offset` (a frozen config
/// value); anywhere else, a copy by the helper. (One constant only: LLVM
/// turns a match over several into arithmetic on the context pointer,
/// which the verifier refuses.)
#[inline(always)]
pub fn record_u64(ctx: &TracePointContext, offset: usize) -> Result<u64, i32> {
    if offset == SYSCALL_RECORD_FIRST {
        // SAFETY: an 8-byte load at an 8-aligned offset inside the record
        // (the format file says so); the verifier checks it against the
        // context's bounds at load time.
        return Ok(unsafe { *((ctx.as_ptr() as *const u8).add(SYSCALL_RECORD_FIRST) as *const u64) });
    }
    // SAFETY: a checked copy from the record.
    unsafe { ctx.read_at::<u64>(offset) }.map_err(|e| e as i32)
}

/// Reads the kernel struct member at `base + offset` (offset from BTF).
#[inline(always)]
pub fn member<T>(base: u64, offset: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel validates the address.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }
}

/// The member of type `T` (at most 8 bytes) at `base + offset`, by a plain
/// load instead of a `bpf_probe_read_kernel` call.
///
/// # Safety
/// `base` must be a BTF-typed pointer (a BTF program's argument, a helper's
/// typed result, or a pointer member loaded from one of those): the
/// verifier knows its type and checks at load time that `offset` (a
/// constant from the frozen CONFIG) lies inside a member wide enough for
/// T; a fault reads as zero.
#[inline(always)]
pub unsafe fn typed_member<T: Copy>(base: u64, offset: u32) -> T {
    unsafe { core::ptr::read_volatile((base + offset as u64) as *const T) }
}

/// `pointer` as a pointer to the struct of BTF id `btf_id`, whose members
/// then read with [`typed_member`]: the `bpf_rdonly_cast` kfunc, no call
/// once verified (see `netlens_common::CAST_CALL`). Where the kernel lacks
/// it, the loader makes this `bpf_skc_to_tcp_sock(pointer)`: call it with
/// any other type only where `btf_id` is not 0 (the kernel has the kfunc).
#[inline(always)]
pub fn cast(pointer: u64, btf_id: u32) -> u64 {
    // SAFETY: how aya-ebpf calls helpers: the id as a function pointer,
    // which the BPF backend emits as `call <id>`; both calls the loader
    // makes of it take these arguments and return a pointer or NULL.
    unsafe {
        let call: unsafe extern "C" fn(u64, u32) -> u64 = core::mem::transmute(CAST_CALL as usize);
        call(pointer, btf_id)
    }
}

/// A kernel `char[16]` name (a task's `comm`, a congestion control's
/// `name`) read as two words, `low` the first: two loads instead of
/// sixteen byte loads.
#[inline(always)]
pub fn name16(low: u64, high: u64) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&low.to_ne_bytes());
    bytes[8..].copy_from_slice(&high.to_ne_bytes());
    bytes
}

/// The current task's name. In a BTF-typed program (`typed`, a constant
/// of the build) on a kernel with the cast kfunc (6.2+), two plain loads
/// from the task that `bpf_get_current_task_btf` (5.11+) returns typed;
/// elsewhere the `bpf_get_current_comm` helper, whose copy (`strscpy`)
/// cost about 100 ns per connection in a perf profile of churn. The
/// kfunc's id stands in for "after 5.10" because it is in the frozen
/// config: on 5.10, whose verifier does not know the task helper, the
/// branch is never explored.
#[inline(always)]
pub fn current_comm(typed: bool) -> [u8; 16] {
    if !typed || cfg_field!(kernel.tcp_sock_btf_id) == 0 || cfg_field!(accept_queue.task_comm) == u32::MAX {
        return aya_ebpf::helpers::bpf_get_current_comm().unwrap_or_default();
    }
    // SAFETY: the helper returns the current task typed by BTF.
    unsafe { task_comm(generated::bpf_get_current_task_btf() as u64) }
}

/// The name of `task`: its 16-byte `comm` member, as two plain loads.
///
/// # Safety
/// `task` is a `struct task_struct *` typed by BTF, and the config knows
/// where `comm` lies in it (`accept_queue.task_comm` is not `u32::MAX`).
#[inline(always)]
pub unsafe fn task_comm(task: u64) -> [u8; 16] {
    let comm_at = cfg_field!(accept_queue.task_comm);
    // SAFETY: see above; the offset is checked at load time.
    let (low, high): (u64, u64) = unsafe { (typed_member(task, comm_at), typed_member(task, comm_at + 8)) };
    name16(low, high)
}

/// `EEXIST`: a map insert with `BPF_NOEXIST` found the key there already.
pub const EEXIST: i32 = 17;

/// A connection's endpoints as a tracepoint reports them: `s*` is the local
/// end, `d*` the remote one, ports in host byte order.
#[derive(Clone, Copy, Default)]
pub struct Tuple {
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

impl Tuple {
    /// The endpoints a flow remembered, if it has them.
    #[inline(always)]
    pub fn of(flow: &netlens_common::Flow) -> Option<Self> {
        (flow.family != 0).then_some(Self {
            family: flow.family,
            sport: flow.sport,
            dport: flow.dport,
            saddr: flow.saddr,
            daddr: flow.daddr,
        })
    }

    /// Stores the endpoints in a flow.
    #[inline(always)]
    pub fn store(&self, flow: &mut netlens_common::Flow) {
        flow.family = self.family;
        flow.sport = self.sport;
        flow.dport = self.dport;
        flow.saddr = self.saddr;
        flow.daddr = self.daddr;
    }
}

/// Reads the 4-tuple fields that most `tcp:*` and `sock:*` records share.
/// Records without a `family` (5.10) take the family of `sk`, the socket
/// (or request socket: it starts with the same `sock_common`) they report.
#[inline(always)]
pub fn tuple(record: &Record, fields: &TupleFields, sk: u64) -> Result<Tuple, i32> {
    let family = if fields.family == FIELD_ABSENT {
        member(sk, cfg_field!(kernel.sock_tuple.family) as u32)?
    } else {
        record.get(fields.family)?
    };
    let mut tuple = Tuple {
        family,
        sport: record.get(fields.sport)?,
        dport: record.get(fields.dport)?,
        ..Tuple::default()
    };
    if tuple.family == AF_INET {
        let saddr: [u8; 4] = record.get(fields.saddr)?;
        let daddr: [u8; 4] = record.get(fields.daddr)?;
        tuple.saddr[..4].copy_from_slice(&saddr);
        tuple.daddr[..4].copy_from_slice(&daddr);
    } else {
        tuple.saddr = record.get(fields.saddr_v6)?;
        tuple.daddr = record.get(fields.daddr_v6)?;
    }
    Ok(tuple)
}

/// A socket's endpoints, from its `sock_common` head (one copy into
/// scratch `slot`).
#[inline(always)]
pub fn sock_tuple_in(sk: u64, slot: u32) -> Result<Tuple, i32> {
    let head = Record::copy(sk, cfg_field!(kernel.sock_tuple.len), slot)?;
    let mut tuple = Tuple {
        family: head.get(cfg_field!(kernel.sock_tuple.family))?,
        sport: u16::from_be(member(sk, cfg_field!(kernel.inet_sport))?),
        dport: u16::from_be(head.get(cfg_field!(kernel.sock_tuple.dport))?),
        ..Tuple::default()
    };
    if tuple.family == AF_INET {
        let saddr: [u8; 4] = head.get(cfg_field!(kernel.sock_tuple.rcv_saddr))?;
        let daddr: [u8; 4] = head.get(cfg_field!(kernel.sock_tuple.daddr))?;
        tuple.saddr[..4].copy_from_slice(&saddr);
        tuple.daddr[..4].copy_from_slice(&daddr);
    } else {
        tuple.saddr = head.get(cfg_field!(kernel.sock_tuple.v6_rcv_saddr))?;
        tuple.daddr = head.get(cfg_field!(kernel.sock_tuple.v6_daddr))?;
    }
    Ok(tuple)
}

/// The key of the listener tables (overflow.rs, owners.rs): the
/// listening socket's namespace and port.
#[inline(always)]
pub fn listener_key(sk: u64) -> Result<ListenerKey, i32> {
    let port: u16 = member(sk, cfg_field!(kernel.inet_sport))?;
    Ok(ListenerKey { netns: Probed(sk).netns(), port: u16::from_be(port), _pad: 0 })
}

/// The ends of the TCP segment in `skb` as its receiver sees them, from
/// its IP and TCP headers: `local` is where it was sent to. IPv4 addresses
/// fill the first 4 bytes.
pub struct PacketEnds {
    pub v4: bool,
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
}

impl PacketEnds {
    /// These ends as a [`Tuple`], local first.
    #[inline(always)]
    pub fn tuple(&self) -> Tuple {
        Tuple {
            family: if self.v4 { AF_INET } else { AF_INET6 },
            sport: self.local_port,
            dport: self.remote_port,
            saddr: self.local,
            daddr: self.remote,
        }
    }
}

const ETH_P_IP: u16 = 0x0800;

/// Reads [`PacketEnds`] from a received `skb` (probed: the headers lie in
/// packet memory that BTF does not type).
#[inline(always)]
pub fn packet_ends(skb: u64) -> Result<PacketEnds, i32> {
    let head: u64 = member(skb, cfg_field!(accept_queue.skb_head))?;
    let ip = head + member::<u16>(skb, cfg_field!(accept_queue.skb_network_header))? as u64;
    let tcp = head + member::<u16>(skb, cfg_field!(accept_queue.skb_transport_header))? as u64;
    let mut ends = PacketEnds {
        v4: member::<u16>(skb, cfg_field!(accept_queue.skb_protocol))? == ETH_P_IP.to_be(),
        local: [0; 16],
        remote: [0; 16],
        local_port: u16::from_be(member(tcp, 2)?),
        remote_port: u16::from_be(member(tcp, 0)?),
    };
    if ends.v4 {
        // struct iphdr: saddr at 12, daddr at 16.
        let remote: [u8; 4] = member(ip, 12)?;
        let local: [u8; 4] = member(ip, 16)?;
        ends.remote[..4].copy_from_slice(&remote);
        ends.local[..4].copy_from_slice(&local);
    } else {
        // struct ipv6hdr: saddr at 8, daddr at 24.
        ends.remote = member(ip, 8)?;
        ends.local = member(ip, 24)?;
    }
    Ok(ends)
}

/// The network namespace of the device an skb arrived on, or 0.
#[inline(always)]
pub fn skb_netns(skb: u64) -> u32 {
    if skb == 0 {
        return 0;
    }
    let dev: u64 = member(skb, cfg_field!(kernel.skb_dev)).unwrap_or(0);
    if dev == 0 {
        return 0;
    }
    let net: u64 = member(dev, cfg_field!(kernel.netdev_net)).unwrap_or(0);
    if net == 0 {
        return 0;
    }
    member(net, cfg_field!(kernel.net_inum)).unwrap_or(0)
}

/// The return value of the function an fexit program traced, which the
/// kernel places after its `params` parameters. Where `params` is `OLD`
/// (the layout of the kernels before `bpf_get_func_ret`, 5.17), read as a
/// context field at a constant offset; else through that helper. Not
/// `ctx.arg(params)`: LLVM turns a choice of positions into one computed
/// offset, and the verifier refuses a context read at a computed offset
/// ("dereference of modified ctx ptr", seen on 6.12). `params` is a
/// constant the verifier knows (CONFIG), so it explores only one path.
#[inline(always)]
pub fn fexit_return<const OLD: usize>(ctx: &FExitContext, params: u8) -> Option<u64> {
    if params as usize == OLD {
        return Some(ctx.arg(OLD));
    }
    let mut value = 0u64;
    // SAFETY: the helper writes one u64 into `value`.
    let ret = unsafe { generated::bpf_get_func_ret(ctx.as_ptr(), &mut value) };
    (ret == 0).then_some(value)
}
