//! Accept-queue wait: for each connection accept() returns, the time from
//! ESTABLISHED (the child's `established_ns` in the flow table) until then,
//! the listener's queue length and backlog at that moment, and the
//! accepting process, which from then on owns the flow (its later events
//! and its close carry that pid and comm).
//!
//! Three ways to see accept() return, the loader takes the first that
//! attaches: fexit on `inet_csk_accept` (listener in, child out), a
//! kprobe/kretprobe pair on it, or the `syscalls` tracepoints: the exit
//! resolves the listening fd and the returned one to their sockets (fd →
//! `current->files->fdt->fd[fd]` → `file->private_data` → `socket->sk`),
//! the listening fd read back from the saved registers where it can be
//! (`sys_exit_accept_regs`), else saved per thread by the enter hooks.
//! Limits: connections established before netlens attached are not
//! reported (no `established_ns`).

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns, generated},
    macros::{fexit, kprobe, kretprobe, map, tracepoint},
    maps::LruHashMap,
    programs::{FExitContext, ProbeContext, RetProbeContext, TracePointContext},
};
use netlens_common::{direction, kind, program, Flow, ListenerKey, ACCEPT_WAIT_UNKNOWN, LISTENER_TABLE_ENTRIES};

use crate::{
    config::cfg_field,
    events::{counted, emit, stamp},
    flows,
    kernel::{cast, current_comm, fexit_return, listener_key, member, record_u64, slot, sock_tuple_in, task_comm, typed_member, Tuple},
    overflow, owners,
    sock::Probed,
};

const IPPROTO_TCP: u16 = 6;
const TCP_LISTEN: u8 = 10;

/// The listening socket of each thread inside accept(), by pid_tgid (the
/// kprobe → kretprobe).
#[map]
static ACCEPTING: LruHashMap<u64, u64> = LruHashMap::with_max_entries(LISTENER_TABLE_ENTRIES, 0);

/// accept() returned `child` from `listener`, in the calling thread
/// (`pid_tgid`, which the caller has read already, and its name, which
/// `comm` reads only for a connection that gets reported).
/// `TYPED`: the listener's queue by plain loads where the kernel has the
/// cast kfunc.
#[inline(always)]
fn accepted<const TYPED: bool>(listener: u64, child: u64, pid_tgid: u64, comm: impl FnOnce() -> [u8; 16]) -> Result<(), i32> {
    let now = unsafe { bpf_ktime_get_ns() };
    if flows::in_storage() {
        return accepted_unjoined::<TYPED>(listener, child, pid_tgid, comm, now);
    }
    let flow = flows::lookup_mut(Probed(child));
    // The child's namespace and local port are the listener's, and its
    // flow holds them: three reads of the listener fewer.
    let key = match flow.as_deref() {
        Some(flow) if flow.family != 0 => Ok(ListenerKey { netns: flow.netns, port: flow.sport, _pad: 0 }),
        _ => listener_key(listener),
    };
    if let Ok(key) = key {
        let _ = overflow::known_listener(listener, &key);
        // Claimed at ESTABLISHED: the listener's owner is known already.
        if !flow.as_deref().is_some_and(|flow| flow.owner_claimed != 0) {
            owners::accepting(listener, &key);
        }
    }
    // No entry or not established yet: a connection from before we
    // attached.
    let Some(flow) = flow else { return Ok(()) };
    if flow.established_ns == 0 {
        return Ok(());
    }
    let queue = overflow::accept_queue::<TYPED>(listener).unwrap_or((0, 0));
    let wait_ns = now.saturating_sub(flow.established_ns);
    // From now on the connection is the accepting process's.
    flow.pid = (pid_tgid >> 32) as u32;
    flow.comm = comm();
    let tuple = Tuple::of(flow).ok_or(-1)?;
    report_accepted(now, &tuple, flow, wait_ns, queue);
    Ok(())
}

/// The `accepted` event: the wait since ESTABLISHED ([`ACCEPT_WAIT_UNKNOWN`]
/// where userspace times it), and the listener's (queue length, backlog).
#[inline(always)]
fn report_accepted(now: u64, tuple: &Tuple, flow: &Flow, wait_ns: u64, (queue_len, backlog): (u32, u32)) {
    emit(|event| {
        stamp(event, kind::ACCEPTED, now, tuple, flow);
        event.duration_ns = wait_ns;
        event.queue_len = queue_len;
        event.backlog = backlog;
    });
}

/// [`accepted`] where flows live in socket storage, which these programs
/// cannot reach (flows.rs): the event names the connection by its 4-tuple
/// and the accepting process, and userspace joins it to the passive
/// handshake it saw (the wait, and the process the connection's later
/// events carry; netlens/src/known_connections.rs).
#[inline(always)]
fn accepted_unjoined<const TYPED: bool>(listener: u64, child: u64, pid_tgid: u64, comm: impl FnOnce() -> [u8; 16], now: u64) -> Result<(), i32> {
    let key = listener_key(listener)?;
    let _ = overflow::known_listener(listener, &key);
    owners::accepting(listener, &key);
    let queue = overflow::accept_queue::<TYPED>(listener).unwrap_or((0, 0));
    let tuple = sock_tuple_in(child, slot::ACCEPT)?;
    // The child's namespace is its listener's; userspace fills the rest.
    let flow = flows::blank(slot::ACCEPT).ok_or(-1)?;
    flow.netns = key.netns;
    flow.direction = direction::PASSIVE;
    flow.pid = (pid_tgid >> 32) as u32;
    flow.comm = comm();
    report_accepted(now, &tuple, flow, ACCEPT_WAIT_UNKNOWN, queue);
    Ok(())
}

/// A pointer the kernel returned: not NULL, not an ERR_PTR.
#[inline(always)]
fn is_pointer(value: u64) -> bool {
    value != 0 && value < (-4095i64) as u64
}

// fexit: listener and child in one program.

#[fexit(function = "inet_csk_accept")]
pub fn fexit_inet_csk_accept(ctx: FExitContext) -> i32 {
    let listener: u64 = ctx.arg(0);
    // The return value follows the parameters (4 before 6.10, 2 since).
    let child = fexit_return::<4>(&ctx, cfg_field!(accept_queue.inet_csk_accept_args)).unwrap_or(0);
    if is_pointer(child) {
        counted(program::FEXIT_INET_CSK_ACCEPT, accepted::<true>(listener, child, bpf_get_current_pid_tgid(), || current_comm(false)));
    }
    0
}

// kprobe + kretprobe.

#[kprobe]
pub fn kprobe_inet_csk_accept(ctx: ProbeContext) -> u32 {
    if let Some(listener) = ctx.arg::<u64>(0) {
        counted(program::KPROBE_INET_CSK_ACCEPT, ACCEPTING.insert(&bpf_get_current_pid_tgid(), &listener, 0));
    }
    0
}

#[kretprobe]
pub fn kretprobe_inet_csk_accept(ctx: RetProbeContext) -> u32 {
    let thread = bpf_get_current_pid_tgid();
    // SAFETY: copied out before the entry is removed.
    let Some(listener) = (unsafe { ACCEPTING.get(&thread).copied() }) else { return 0 };
    let _ = ACCEPTING.remove(&thread);
    let child: u64 = ctx.ret();
    if is_pointer(child) {
        counted(program::KRETPROBE_INET_CSK_ACCEPT, accepted::<false>(listener, child, thread, || current_comm(false)));
    }
    0
}

// syscalls tracepoints (accept and accept4 share their record layouts).
//
// Enter keeps only the listening fd (one read), exit resolves both fds in
// one walk of the open-file table: the table is looked up once instead of
// twice, and an accept() that fails or blocks forever costs no walk.

/// The listening file descriptor of each thread inside accept(), by
/// pid_tgid (the syscall tracepoints' enter → exit); `NO_FD` between calls.
#[map]
static ACCEPTING_FD: LruHashMap<u64, u64> = LruHashMap::with_max_entries(LISTENER_TABLE_ENTRIES, 0);

/// The current process's open-file table: its `fd` array and size.
#[derive(Clone, Copy)]
struct FdTable {
    fds: u64,
    max_fds: u32,
    /// The task typed by BTF, where the table was found through one; else 0.
    task: u64,
}

impl FdTable {
    /// `current->files->fdt`: where `TYPED`, through the BTF-typed task
    /// of `bpf_get_current_task_btf()` (5.11+), four plain loads; else four
    /// `bpf_probe_read_kernel` calls.
    #[inline(always)]
    fn current<const TYPED: bool>() -> Result<Self, i32> {
        if TYPED {
            // SAFETY: the helper returns the current task typed by BTF.
            return Ok(Self::of_task(unsafe { generated::bpf_get_current_task_btf() } as u64));
        }
        // SAFETY: plain helper call without arguments.
        let task = unsafe { bpf_get_current_task() };
        let files: u64 = member(task, cfg_field!(accept_queue.task_files))?;
        let fdt: u64 = member(files, cfg_field!(accept_queue.files_fdt))?;
        Ok(Self {
            max_fds: member(fdt, cfg_field!(accept_queue.fdt_max_fds))?,
            fds: member(fdt, cfg_field!(accept_queue.fdt_fd))?,
            task: 0,
        })
    }

    /// `task->files->fdt`, `task` typed by BTF: four plain loads.
    #[inline(always)]
    fn of_task(task: u64) -> Self {
        let (files_at, fdt_at) = (cfg_field!(accept_queue.task_files), cfg_field!(accept_queue.files_fdt));
        let (max_fds_at, fd_at) = (cfg_field!(accept_queue.fdt_max_fds), cfg_field!(accept_queue.fdt_fd));
        // SAFETY: `files` and `fdt` are typed pointers loaded from a typed
        // task; each offset is a member's, checked at load time (a NULL
        // pointer reads as zeros, and no fd is below a `max_fds` of 0).
        unsafe {
            let files: u64 = typed_member(task, files_at);
            let fdt: u64 = typed_member(files, fdt_at);
            Self { max_fds: typed_member(fdt, max_fds_at), fds: typed_member(fdt, fd_at), task }
        }
    }

    /// The task's name: two plain loads where the table was found through
    /// a typed task (only the typed builds set `task`), else the helper.
    #[inline(always)]
    fn comm(self) -> [u8; 16] {
        if self.task == 0 || cfg_field!(accept_queue.task_comm) == u32::MAX {
            return current_comm(false);
        }
        // SAFETY: a task typed by BTF, and the config knows its `comm`.
        unsafe { task_comm(self.task) }
    }

    /// The socket behind file descriptor `fd` (`fd[fd]` → `file->private_data`
    /// → `socket->sk`); `None` for a closed descriptor. Where `TYPED` and
    /// the kernel has the cast kfunc, the file and socket are read by plain
    /// loads (see [`typed_walk`]), and so is the slot, at an index known
    /// only at run time, through a cast of its address.
    #[inline(always)]
    fn socket<const TYPED: bool>(self, fd: u64) -> Result<Option<u64>, i32> {
        if fd >= self.max_fds as u64 {
            return Err(-1);
        }
        let slot = self.fds + fd * 8;
        let pointer_type = cfg_field!(accept_queue.pointer_btf_id);
        let file: u64 = if typed_walk::<TYPED>() && pointer_type != 0 {
            // SAFETY: the slot's address, cast to a struct whose first
            // member is a pointer: a plain load of it instead of a probe
            // read (a variable offset into a typed pointer is refused).
            unsafe { typed_member(cast(slot, pointer_type), 0) }
        } else {
            member(slot, 0)?
        };
        if file == 0 {
            return Ok(None);
        }
        if typed_walk::<TYPED>() {
            let (file_type, socket_type) = (cfg_field!(accept_queue.file_btf_id), cfg_field!(accept_queue.socket_btf_id));
            // SAFETY: `file` is the open file at `fd`, and its private data
            // the socket (accept() succeeded on it: both fds are sockets);
            // each offset is a member of the struct cast to. Loads through
            // a cast pointer cannot fault: a bad one reads as zero.
            let socket: u64 = unsafe { typed_member(cast(file, file_type), cfg_field!(accept_queue.file_private_data)) };
            return Ok(Some(unsafe { typed_member(cast(socket, socket_type), cfg_field!(accept_queue.socket_sk)) }));
        }
        let socket: u64 = member(file, cfg_field!(accept_queue.file_private_data))?;
        member(socket, cfg_field!(accept_queue.socket_sk)).map(Some)
    }
}

/// Whether the typed build walks file → socket → sock by plain loads: the
/// kernel has the cast kfunc (6.2+), so the loader gave their BTF ids.
#[inline(always)]
fn typed_walk<const TYPED: bool>() -> bool {
    TYPED && cfg_field!(accept_queue.file_btf_id) != 0
}

/// Whether `listener` is a TCP socket in LISTEN (accept() also serves unix
/// and other sockets); by plain loads where [`FdTable::socket`] made it a
/// typed `struct sock *`.
#[inline(always)]
fn tcp_listener<const TYPED: bool>(listener: u64) -> Result<bool, i32> {
    let (protocol_at, state_at) = (cfg_field!(kernel.sock_protocol), cfg_field!(accept_queue.sock_state));
    let (protocol, state): (u16, u8) = if typed_walk::<TYPED>() {
        // SAFETY: a `struct sock *` loaded from a cast `struct socket`;
        // both are its members.
        unsafe { (typed_member(listener, protocol_at), typed_member(listener, state_at)) }
    } else {
        (member(listener, protocol_at)?, member(listener, state_at)?)
    };
    Ok(protocol == IPPROTO_TCP && state == TCP_LISTEN)
}

/// `ACCEPTING_FD`'s value once exit has taken it.
const NO_FD: u64 = u64::MAX;

#[tracepoint]
pub fn sys_enter_accept(ctx: TracePointContext) -> u32 {
    let at = cfg_field!(accept_queue.accept_enter_fd) as usize;
    let result = record_u64(&ctx, at).and_then(|fd| {
        let thread = bpf_get_current_pid_tgid();
        // A thread keeps its entry: from its second accept() on, the fd is
        // written in place (an LRU insert costs about four lookups).
        match ACCEPTING_FD.get_ptr_mut(&thread) {
            Some(slot) => {
                // SAFETY: a live map value that only this thread writes.
                unsafe { *slot = fd };
                Ok(())
            }
            None => ACCEPTING_FD.insert(&thread, &fd, 0).map_err(|e| e as i32),
        }
    });
    counted(program::SYS_ENTER_ACCEPT, result);
    0
}

/// Where the kernel refuses the typed build below (before 5.11).
#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    exit_accept::<false>(&ctx, program::SYS_EXIT_ACCEPT)
}

/// The same, with the fd table found through a BTF-typed task.
#[tracepoint]
pub fn sys_exit_accept_typed(ctx: TracePointContext) -> u32 {
    exit_accept::<true>(&ctx, program::SYS_EXIT_ACCEPT_TYPED)
}

#[inline(always)]
fn exit_accept<const TYPED: bool>(ctx: &TracePointContext, program: u32) -> u32 {
    let thread = bpf_get_current_pid_tgid();
    let Some(slot) = ACCEPTING_FD.get_ptr_mut(&thread) else { return 0 };
    // SAFETY: a live map value that only this thread writes; taken, so
    // that an exit whose enter went unseen finds no stale fd.
    let listener_fd = unsafe { core::mem::replace(&mut *slot, NO_FD) };
    if listener_fd != NO_FD {
        counted(program, on_exit_accept::<TYPED>(ctx, listener_fd, thread));
    }
    0
}

/// The fd accept() returned; `None` when it failed (EAGAIN on a
/// non-blocking listener): nothing accepted, not a failure of ours.
#[inline(always)]
fn accepted_fd(ctx: &TracePointContext) -> Result<Option<u64>, i32> {
    let fd = record_u64(ctx, cfg_field!(accept_queue.accept_exit_ret) as usize)? as i64;
    Ok((fd >= 0).then_some(fd as u64))
}

#[inline(always)]
fn on_exit_accept<const TYPED: bool>(ctx: &TracePointContext, listener_fd: u64, thread: u64) -> Result<(), i32> {
    let Some(fd) = accepted_fd(ctx)? else { return Ok(()) };
    accepted_fds::<TYPED>(FdTable::current::<TYPED>()?, listener_fd, fd, thread)
}

/// Where the kernel saves a syscall's arguments in the task's registers
/// and leaves them there (x86-64: the return value goes to `ax`) and has
/// `bpf_task_pt_regs` (5.15+): the exit alone. The listening fd is read
/// back from the saved first argument, so no enter program runs and no
/// per-thread map carries the fd. Every syscall tracepoint attached makes
/// every syscall on the host take the traced path: `getppid` took 154 ns
/// here without netlens, 182 with the exits alone, 210 with enter and exit
/// (`perf bench syscall basic`).
#[tracepoint]
pub fn sys_exit_accept_regs(ctx: TracePointContext) -> u32 {
    let result = accepted_fd(&ctx).and_then(|fd| {
        let Some(fd) = fd else { return Ok(()) };
        // SAFETY: the helpers return the current task and its saved user
        // registers typed by BTF; `regs_first_arg` is a member of
        // `struct pt_regs` (the loader checked). accept()'s fd is an int:
        // the register's upper half is not part of it.
        let (task, listener_fd) = unsafe {
            let task = generated::bpf_get_current_task_btf();
            let regs = generated::bpf_task_pt_regs(task) as u64;
            (task as u64, typed_member::<u64>(regs, cfg_field!(accept_queue.regs_first_arg)) as u32 as u64)
        };
        accepted_fds::<true>(FdTable::of_task(task), listener_fd, fd, bpf_get_current_pid_tgid())
    });
    counted(program::SYS_EXIT_ACCEPT_REGS, result);
    0
}

/// accept() on `listener_fd` returned `fd`, in the calling thread: name
/// both sockets from the open-file table and report the connection.
#[inline(always)]
fn accepted_fds<const TYPED: bool>(table: FdTable, listener_fd: u64, fd: u64, thread: u64) -> Result<(), i32> {
    // Another thread closed the listener meanwhile: nothing to name.
    let Some(listener) = table.socket::<TYPED>(listener_fd)? else { return Ok(()) };
    if !tcp_listener::<TYPED>(listener)? {
        return Ok(());
    }
    match table.socket::<TYPED>(fd)? {
        Some(child) => accepted::<TYPED>(listener, child, thread, || table.comm()),
        None => Ok(()),
    }
}
