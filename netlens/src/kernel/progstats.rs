//! Per-program statistics the kernel keeps: run time and count (when
//! `kernel.bpf_stats_enabled` is 1) and recursion misses (always). aya
//! exposes the first two but not the misses, so this asks the kernel
//! directly (BPF_OBJ_GET_INFO_BY_FD).

use std::os::fd::{AsRawFd, BorrowedFd};

use aya_obj::generated::bpf_prog_info;

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// What the kernel counted for one program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramStats {
    /// Nanoseconds spent in the program (0 unless bpf_stats_enabled).
    pub run_time_ns: u64,
    pub run_count: u64,
    /// Times the hook fired while the program was already running on that
    /// CPU (a softirq interrupting it): the kernel skipped the program, so
    /// those events were missed.
    pub recursion_misses: u64,
}

/// `union bpf_attr` as BPF_OBJ_GET_INFO_BY_FD reads it.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

pub fn read(program: BorrowedFd<'_>) -> std::io::Result<ProgramStats> {
    // SAFETY: bpf_prog_info is plain old data; zero is a valid value.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let attr = InfoAttr {
        bpf_fd: program.as_raw_fd() as u32,
        info_len: size_of::<bpf_prog_info>() as u32,
        info: &mut info as *mut bpf_prog_info as u64,
    };
    // SAFETY: attr points at a live bpf_prog_info of the size we say.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &attr, size_of::<InfoAttr>()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ProgramStats {
        run_time_ns: info.run_time_ns,
        run_count: info.run_cnt,
        recursion_misses: info.recursion_misses,
    })
}
