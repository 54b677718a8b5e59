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

/// The oldest kernel netlens runs on: the BPF ring buffer came in 5.8.
pub const MIN_KERNEL: (u32, u32) = (5, 8);

/// `(major, minor)` of a release string such as `6.1.0-50-amd64`.
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Why this kernel is too old, if it is.
pub fn too_old() -> Option<String> {
    let release = kernel_release();
    let version = parse_release(&release)?;
    (version < MIN_KERNEL).then(|| {
        format!(
            "netlens needs Linux {}.{} or newer (BPF ring buffer); this kernel is {release}",
            MIN_KERNEL.0, MIN_KERNEL.1
        )
    })
}

/// The one-line reason netlens cannot start, checked in the order a user
/// should fix things; `None` when the basics are in place.
pub fn preflight() -> Option<String> {
    if let Some(problem) = too_old() {
        return Some(problem);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse_to_major_minor() {
        assert_eq!(parse_release("6.1.0-50-amd64"), Some((6, 1)));
        assert_eq!(parse_release("6.12.117+deb13-amd64"), Some((6, 12)));
        assert_eq!(parse_release("5.10.0-32-amd64"), Some((5, 10)));
        assert_eq!(parse_release("4.19.0"), Some((4, 19)));
        assert!(parse_release("4.19.0").unwrap() < MIN_KERNEL);
        assert_eq!(parse_release("unknown"), None);
    }
}
