//! Which process owns each listening port, so that a passive connection
//! names its server from the first event on.
//!
//! A passive connection is born in softirq context, where the current task
//! is whoever the packet interrupted: its handshake (and, until accept(),
//! everything else) has no process of its own. The listener does: listen()
//! runs in the server's process, and so does accept(). The table below maps
//! a listening port to that process; `passive_established` copies it into
//! the new flow, and accept.rs later replaces it with the exact accepting
//! process. Userspace fills it for listeners that existed before netlens
//! attached (sock_diag's inode → `/proc/PID/fd`, as `ss -p` does), without
//! overwriting what the kernel side recorded.
//! Limits: keyed like overflow.rs's table by namespace and port, so several
//! listeners on one port from different processes (SO_REUSEPORT, or one
//! IPv4 and one IPv6-only socket) name the last one that listened.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::map,
    maps::LruHashMap,
};
use netlens_common::{Flow, ListenerKey, ListenerOwner, LISTENER_TABLE_ENTRIES};

use crate::kernel::listener_key;

/// The owning process of each listening port.
#[map]
static LISTENER_OWNERS: LruHashMap<ListenerKey, ListenerOwner> =
    LruHashMap::with_max_entries(LISTENER_TABLE_ENTRIES, 0);

#[inline(always)]
fn current(sk: u64) -> ListenerOwner {
    ListenerOwner {
        sk,
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or_default(),
    }
}

/// `sk` entered LISTEN: listen() runs in the server's process.
#[inline(always)]
pub fn listening(sk: u64) -> Result<(), i32> {
    LISTENER_OWNERS.insert(&listener_key(sk)?, &current(sk), 0).map_err(|e| e as i32)
}

/// accept() on `listener` (under `key`), in the calling process: names the
/// owner of a listener older than netlens if nothing did yet.
#[inline(always)]
pub fn accepting(listener: u64, key: &ListenerKey) {
    // Looked up first: already known is the common case, and an LRU insert
    // takes a free node (and its lock) before it finds the key exists.
    if LISTENER_OWNERS.get_ptr(key).is_none() {
        let _ = LISTENER_OWNERS.insert(key, &current(listener), BPF_NOEXIST as u64);
    }
}

/// `sk` stopped listening: forget its owner, unless another socket (a
/// later listen() on the same port) took the entry over.
#[inline(always)]
pub fn unlistening(sk: u64) -> Result<(), i32> {
    let key = listener_key(sk)?;
    // SAFETY: copied out at once.
    let owner_sk = unsafe { LISTENER_OWNERS.get(&key).map(|owner| owner.sk) };
    // 0: filled by userspace, which cannot tell its listeners apart.
    if matches!(owner_sk, Some(owner) if owner == sk || owner == 0) {
        let _ = LISTENER_OWNERS.remove(&key);
    }
    Ok(())
}

/// A passive connection of `flow.netns` on local `port` was just
/// established: it belongs to the listener's process for now. Its own BPF
/// function: inlined into passive_established, the program was rejected
/// by the 6.18 verifier ("R3 !read_ok", a spilled register read back on a
/// path that never wrote it).
#[inline(never)]
pub fn claim(flow: &mut Flow, port: u16) {
    let key = ListenerKey { netns: flow.netns, port, _pad: 0 };
    // SAFETY: copied out at once.
    if let Some(owner) = unsafe { LISTENER_OWNERS.get(&key).copied() } {
        flow.pid = owner.pid;
        flow.comm = owner.comm;
        flow.owner_claimed = 1;
    }
}
