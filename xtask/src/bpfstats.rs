//! The kernel's own accounting of every loaded BPF program (run count and
//! run time while `kernel.bpf_stats_enabled` is 1), read the way bpftool
//! does: walk program ids, open each, ask for its info. The same numbers
//! for netlens's programs, bpftrace's and the empty reference program.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context as _, Result};
use aya_obj::generated::{
    bpf_prog_info, bpf_prog_type, perf_event_attr, perf_event_sample_format, perf_type_id, PERF_EVENT_IOC_ENABLE, PERF_EVENT_IOC_SET_BPF, PERF_FLAG_FD_CLOEXEC,
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_TRACEPOINT: u32 = bpf_prog_type::BPF_PROG_TYPE_TRACEPOINT as u32;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = bpf_prog_type::BPF_PROG_TYPE_RAW_TRACEPOINT as u32;

fn bpf<T>(command: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: `attr` is a live, zero-padded `union bpf_attr` prefix of the
    // size we pass, as the command expects.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, command, attr as *mut T, size_of::<T>()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// One program's counters at one moment.
#[derive(Clone, Debug)]
pub struct Program {
    pub id: u32,
    pub name: String,
    pub runs: u64,
    pub run_ns: u64,
}

/// Every loaded program, by id.
pub fn snapshot() -> Result<Vec<Program>> {
    let mut programs = Vec::new();
    let mut id = 0u32;
    loop {
        let mut next = [id, 0u32, 0u32];
        match bpf(BPF_PROG_GET_NEXT_ID, &mut next) {
            Ok(_) => id = next[1],
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => break,
            Err(err) => return Err(err).context("BPF_PROG_GET_NEXT_ID"),
        }
        let mut by_id = [id, 0u32, 0u32];
        // A program can go away between the two calls.
        let Ok(fd) = bpf(BPF_PROG_GET_FD_BY_ID, &mut by_id) else { continue };
        // SAFETY: a new fd the kernel just returned to us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: bpf_prog_info is plain old data; zero is a valid value.
        let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
        #[repr(C)]
        struct InfoAttr {
            fd: u32,
            len: u32,
            info: u64,
        }
        let mut attr =
            InfoAttr { fd: fd.as_raw_fd() as u32, len: size_of::<bpf_prog_info>() as u32, info: &mut info as *mut _ as u64 };
        if bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).is_err() {
            continue;
        }
        let name: Vec<u8> = info.name.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
        programs.push(Program { id, name: String::from_utf8_lossy(&name).into_owned(), runs: info.run_cnt, run_ns: info.run_time_ns });
    }
    Ok(programs)
}

/// What programs loaded after `before` (ids above its highest) ran between
/// the two snapshots: (runs, ns) per program name.
pub fn ran_since(before: &[Program], after: &[Program], newer_than: u32) -> Vec<(String, u64, u64)> {
    after
        .iter()
        .filter(|p| p.id > newer_than)
        .map(|p| {
            let base = before.iter().find(|b| b.id == p.id);
            let (runs, ns) = base.map_or((0, 0), |b| (b.runs, b.run_ns));
            (p.name.clone(), p.runs - runs, p.run_ns - ns)
        })
        .collect()
}

pub fn highest_id() -> Result<u32> {
    Ok(snapshot()?.iter().map(|p| p.id).max().unwrap_or(0))
}

/// Turns `kernel.bpf_stats_enabled` on while alive.
pub struct StatsOn;

impl StatsOn {
    pub fn new() -> Result<Self> {
        std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(Self)
    }
}

impl Drop for StatsOn {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
    }
}

/// An empty program (`return 0`) on raw tracepoint `name`: the floor any
/// program on that hook pays (the kernel's dispatch, plus the accounting
/// when stats are on). Detached when dropped.
pub struct EmptyProgram {
    _program: OwnedFd,
    _link: OwnedFd,
    pub id: u32,
}

impl EmptyProgram {
    /// On raw tracepoint `name` (the dispatch of netlens's BTF and raw
    /// tracepoint programs).
    pub fn attach(tracepoint: &str) -> Result<Self> {
        let program = load_empty(BPF_PROG_TYPE_RAW_TRACEPOINT)?;
        let tracepoint = std::ffi::CString::new(tracepoint)?;
        #[repr(C)]
        struct OpenAttr {
            name: u64,
            prog_fd: u32,
            _pad: u32,
        }
        let mut open = OpenAttr { name: tracepoint.as_ptr() as u64, prog_fd: program.as_raw_fd() as u32, _pad: 0 };
        let link = bpf(BPF_RAW_TRACEPOINT_OPEN, &mut open).context("attaching the empty reference program")?;
        // SAFETY: a new fd the kernel just returned to us.
        let link = unsafe { OwnedFd::from_raw_fd(link as i32) };
        Self::attached(program, link)
    }

    /// On classic tracepoint `category:name` (the dispatch of netlens's
    /// record tracepoints, such as the syscall exits): through a perf
    /// event, as aya attaches them.
    pub fn attach_classic(category: &str, name: &str) -> Result<Self> {
        let id_path = format!("/sys/kernel/tracing/events/{category}/{name}/id");
        let id: u64 = std::fs::read_to_string(&id_path).with_context(|| format!("reading {id_path}"))?.trim().parse().context("a tracepoint id")?;
        let program = load_empty(BPF_PROG_TYPE_TRACEPOINT)?;
        // SAFETY: perf_event_attr is plain old data; zero is a valid value.
        let mut attr: perf_event_attr = unsafe { std::mem::zeroed() };
        attr.type_ = perf_type_id::PERF_TYPE_TRACEPOINT as u32;
        attr.size = size_of::<perf_event_attr>() as u32;
        attr.config = id;
        attr.__bindgen_anon_1.sample_period = 1;
        attr.sample_type = perf_event_sample_format::PERF_SAMPLE_RAW as u64;
        attr.__bindgen_anon_2.wakeup_events = 1;
        // SAFETY: perf_event_open(2) with a filled attr: any pid, CPU 0
        // (a tracepoint's program runs on every CPU), no group.
        let fd = unsafe {
            libc::syscall(libc::SYS_perf_event_open, &attr as *const perf_event_attr, -1, 0, -1, libc::c_ulong::from(PERF_FLAG_FD_CLOEXEC))
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("opening tracepoint {category}:{name}"));
        }
        // SAFETY: a new fd the kernel just returned to us.
        let event = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: ioctls on our perf event fd; SET_BPF takes a program fd.
        let attached = unsafe {
            libc::ioctl(event.as_raw_fd(), libc::c_ulong::from(PERF_EVENT_IOC_SET_BPF), program.as_raw_fd()) == 0
                && libc::ioctl(event.as_raw_fd(), libc::c_ulong::from(PERF_EVENT_IOC_ENABLE), 0) == 0
        };
        if !attached {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("attaching the empty program to {category}:{name}"));
        }
        Self::attached(program, event)
    }

    fn attached(program: OwnedFd, link: OwnedFd) -> Result<Self> {
        let id = snapshot()?.iter().filter(|p| p.name == EMPTY_NAME).map(|p| p.id).max().unwrap_or(0);
        Ok(Self { _program: program, _link: link, id })
    }
}

/// What every empty reference program is called (bpf_prog_info's name).
pub const EMPTY_NAME: &str = "empty_ref";

/// Loads `r0 = 0; exit` as a program of `prog_type`.
fn load_empty(prog_type: u32) -> Result<OwnedFd> {
    let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
    let license = b"GPL\0";
    #[repr(C)]
    struct LoadAttr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    let mut name = [0u8; 16];
    name[..EMPTY_NAME.len()].copy_from_slice(EMPTY_NAME.as_bytes());
    let mut load = LoadAttr {
        prog_type,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        prog_ifindex: 0,
        expected_attach_type: 0,
    };
    let fd = bpf(BPF_PROG_LOAD, &mut load).context("loading the empty reference program")?;
    // SAFETY: a new fd the kernel just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Empty programs on the hooks `netlens check` reports serving its
/// features here. Kinds an empty program is not made for here (kprobes,
/// fentry) are skipped: their names are in `missing`. Detached when dropped.
pub struct EmptyOnNetlensHooks {
    pub programs: Vec<EmptyProgram>,
    pub attached: usize,
    pub missing: Vec<String>,
}

impl EmptyOnNetlensHooks {
    /// `hooks` as `check` names them: `tp_btf sock:inet_sock_set_state`,
    /// `raw tracepoint skb:kfree_skb`, `tracepoint syscalls:sys_exit_accept4`.
    pub fn attach(hooks: &[String]) -> Result<Self> {
        let mut programs = Vec::new();
        let mut missing = Vec::new();
        for hook in hooks {
            let (kind, target) = hook.rsplit_once(' ').unwrap_or(("", hook));
            let (category, name) = target.split_once(':').unwrap_or(("", target));
            let program = match kind {
                // Raw and BTF tracepoints share the kernel's dispatch.
                "tp_btf" | "raw tracepoint" => EmptyProgram::attach(name),
                "tracepoint" => EmptyProgram::attach_classic(category, name),
                _ => Err(anyhow::anyhow!("no empty program for {kind}")),
            };
            match program {
                Ok(program) => programs.push(program),
                Err(_) => missing.push(hook.clone()),
            }
        }
        Ok(Self { attached: programs.len(), programs, missing })
    }
}
