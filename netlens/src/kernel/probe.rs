//! Facts about the running kernel and our privileges, checked before
//! anything loads (`netlens check` prints them all).

use std::{fs, path::Path};

use super::btf::VMLINUX;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The kernel release, as `uname -r` prints it.
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

pub fn has_btf() -> bool {
    Path::new(VMLINUX).is_file()
}

/// The kernel lockdown mode (`none`, `integrity`, `confidentiality`), if the
/// lockdown LSM is active and securityfs is mounted.
pub fn lockdown() -> Option<String> {
    let text = fs::read_to_string("/sys/kernel/security/lockdown").ok()?;
    // "none [integrity] confidentiality": the bracketed word is in force.
    let start = text.find('[')? + 1;
    let end = text[start..].find(']')? + start;
    Some(text[start..end].to_string())
}

fn effective_caps() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Whether this process may load BPF programs and attach them to
/// tracepoints: CAP_BPF + CAP_PERFMON, or CAP_SYS_ADMIN (root has all).
pub fn privileged() -> bool {
    let caps = effective_caps();
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

/// The one-line reason netlens cannot start, checked in the order a user
/// should fix things; `None` when the basics are in place.
pub fn preflight() -> Option<String> {
    if !privileged() {
        return Some("netlens needs root (or CAP_BPF and CAP_PERFMON) to load its eBPF programs; run it with sudo".into());
    }
    if !has_btf() {
        return Some(format!(
            "kernel BTF is missing ({VMLINUX}); netlens needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
        ));
    }
    None
}
