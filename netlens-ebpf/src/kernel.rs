//! Small, checked reads of tracepoint records and kernel structs.
//!
//! Every read goes through `bpf_probe_read_kernel`, which fails cleanly on a
//! bad address instead of faulting, so a wrong offset costs a missing field,
//! never a crash. Offsets come from [`crate::config`].

use aya_ebpf::{helpers::bpf_probe_read_kernel, programs::TracePointContext};
use netlens_common::{TupleFields, AF_INET};

use crate::config::cfg_field;

/// Reads the tracepoint record field at `offset` (from its format file).
#[inline(always)]
pub fn field<T>(ctx: &TracePointContext, offset: u16) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel validates the address; the record is at
    // least as long as the format file says.
    unsafe { ctx.read_at::<T>(offset as usize) }
}

/// Reads the kernel struct member at `base + offset` (offset from BTF).
#[inline(always)]
pub fn member<T>(base: u64, offset: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel validates the address.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }
}

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

/// Reads the 4-tuple fields that most `tcp:*` and `sock:*` records share.
#[inline(always)]
pub fn tuple(ctx: &TracePointContext, fields: &TupleFields) -> Result<Tuple, i32> {
    let mut tuple = Tuple {
        family: field(ctx, fields.family)?,
        sport: field(ctx, fields.sport)?,
        dport: field(ctx, fields.dport)?,
        ..Tuple::default()
    };
    if tuple.family == AF_INET {
        let saddr: [u8; 4] = field(ctx, fields.saddr)?;
        let daddr: [u8; 4] = field(ctx, fields.daddr)?;
        tuple.saddr[..4].copy_from_slice(&saddr);
        tuple.daddr[..4].copy_from_slice(&daddr);
    } else {
        tuple.saddr = field(ctx, fields.saddr_v6)?;
        tuple.daddr = field(ctx, fields.daddr_v6)?;
    }
    Ok(tuple)
}

/// The inode number of the socket's network namespace (what `ip netns
/// identify` and `/proc/PID/ns/net` show).
#[inline(always)]
pub fn sock_netns(sk: u64) -> u32 {
    let net: u64 = member(sk, cfg_field!(kernel.sock_net)).unwrap_or(0);
    if net == 0 {
        return 0;
    }
    member(net, cfg_field!(kernel.net_inum)).unwrap_or(0)
}

/// The id of the cgroup the socket was created in (the same id
/// `bpf_get_current_cgroup_id` returns for that process), or 0.
#[inline(always)]
pub fn sock_cgroup(sk: u64) -> u64 {
    let offset = cfg_field!(kernel.sock_cgroup);
    if offset == 0 {
        return 0;
    }
    let cgroup: u64 = member(sk, offset).unwrap_or(0);
    if cgroup == 0 {
        return 0;
    }
    let kn: u64 = member(cgroup, cfg_field!(kernel.cgroup_kn)).unwrap_or(0);
    if kn == 0 {
        return 0;
    }
    member(kn, cfg_field!(kernel.kernfs_node_id)).unwrap_or(0)
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
