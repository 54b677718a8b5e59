//! Kernel code addresses from /proc/kallsyms (root sees real addresses),
//! kept for the rest of the boot in /run/netlens.
//!
//! Reading the table costs about 40 ms of kernel CPU (it formats ~120,000
//! lines), most of what netlens spends attaching on a kernel that needs
//! them. The kernel's own functions do not move until the next boot, so the
//! first run after boot reads the table and the later ones read a few
//! lines from a file only root can write, tagged with the boot's id.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::Path,
};

use anyhow::{Context as _, Result};

/// Where the ranges of this boot are kept (a tmpfs, emptied at boot).
const CACHE_DIR: &str = "/run/netlens";
const CACHE_FILE: &str = "/run/netlens/code-ranges";

/// `function_ranges`, from this boot's cache when it holds every name, else
/// from the table (then cached; a cache that cannot be written is skipped).
pub fn function_ranges_cached<const N: usize>(names: &[&str; N]) -> Result<[(u64, u64); N]> {
    let Ok(boot_id) = fs::read_to_string("/proc/sys/kernel/random/boot_id") else { return function_ranges(names) };
    let boot_id = boot_id.trim();
    if let Some(ranges) = trusted_cache().and_then(|text| cached_ranges(&text, boot_id, names)) {
        return Ok(ranges);
    }
    let ranges = function_ranges(names)?;
    // Hidden addresses (kptr_restrict) are not worth keeping.
    if ranges.iter().any(|&(start, _)| start != 0) {
        let _ = write_cache(&cache_text(boot_id, names, &ranges));
    }
    Ok(ranges)
}

/// The cache file's text, if this user owns it and nobody else can write it.
fn trusted_cache() -> Option<String> {
    // SAFETY: plain libc call without arguments.
    let euid = unsafe { libc::geteuid() };
    let trusted = |path: &str| fs::symlink_metadata(path).is_ok_and(|m| m.uid() == euid && m.mode() & 0o022 == 0);
    (trusted(CACHE_DIR) && trusted(CACHE_FILE)).then(|| fs::read_to_string(CACHE_FILE).ok()).flatten()
}

/// Written whole under another name, then renamed: a reader never sees
/// half a file.
fn write_cache(text: &str) -> std::io::Result<()> {
    fs::DirBuilder::new().mode(0o700).create(CACHE_DIR).or_else(|err| {
        if err.kind() == std::io::ErrorKind::AlreadyExists { Ok(()) } else { Err(err) }
    })?;
    let partial = Path::new(CACHE_DIR).join(format!(".code-ranges.{}", std::process::id()));
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&partial)?;
    file.write_all(text.as_bytes())?;
    fs::rename(&partial, CACHE_FILE).inspect_err(|_| {
        let _ = fs::remove_file(&partial);
    })
}

/// `BOOT_ID` on the first line, then `NAME START END` (hex) per function.
fn cache_text(boot_id: &str, names: &[&str], ranges: &[(u64, u64)]) -> String {
    let mut text = format!("{boot_id}\n");
    for (name, (start, end)) in names.iter().zip(ranges) {
        text.push_str(&format!("{name} {start:x} {end:x}\n"));
    }
    text
}

/// The ranges of `names` in a cache written during boot `boot_id`; `None`
/// for another boot's, or one that lacks a name.
fn cached_ranges<const N: usize>(text: &str, boot_id: &str, names: &[&str; N]) -> Option<[(u64, u64); N]> {
    let mut lines = text.lines();
    if lines.next()? != boot_id {
        return None;
    }
    let mut ranges = [None; N];
    for line in lines {
        let mut fields = line.split(' ');
        let (Some(name), Some(start), Some(end)) = (fields.next(), fields.next(), fields.next()) else { return None };
        let at = names.iter().position(|wanted| *wanted == name)?;
        ranges[at] = Some((u64::from_str_radix(start, 16).ok()?, u64::from_str_radix(end, 16).ok()?));
    }
    let mut found = [(0, 0); N];
    for (slot, range) in found.iter_mut().zip(ranges) {
        *slot = range?;
    }
    Some(found)
}

/// `[start, end)` of each kernel function in `names`: from its address to
/// the next higher symbol's. A function this kernel lacks (IPv6 built as a
/// module, say), or addresses hidden by kernel.kptr_restrict, give
/// `(0, 0)`; an unreadable table is an error.
pub fn function_ranges<const N: usize>(names: &[&str; N]) -> Result<[(u64, u64); N]> {
    let text = fs::read_to_string("/proc/kallsyms").context("reading /proc/kallsyms")?;
    Ok(ranges_in(&text, names))
}

/// One pass over the table, keeping every address, then the nearest
/// symbol above each start. Lines are `ADDRESS TYPE NAME[\t[MODULE]]`; the
/// table has ~120,000 of them, so they are cut with `split_once` rather
/// than a general whitespace split (which cost more than the kernel's own
/// formatting of the table).
fn ranges_in<const N: usize>(text: &str, names: &[&str; N]) -> [(u64, u64); N] {
    let mut starts = [0u64; N];
    let mut addresses = Vec::with_capacity(text.len() / 32);
    for line in text.lines() {
        let Some((address, rest)) = line.split_once(' ') else { continue };
        let Ok(address) = u64::from_str_radix(address, 16) else { continue };
        addresses.push(address);
        let Some((kind, symbol)) = rest.split_once(' ') else { continue };
        if kind != "T" && kind != "t" {
            continue;
        }
        let symbol = symbol.split_once('\t').map_or(symbol, |(name, _module)| name);
        if let Some(at) = names.iter().position(|name| *name == symbol) {
            if starts[at] == 0 {
                starts[at] = address;
            }
        }
    }
    starts.map(|start| {
        let end = addresses.iter().copied().filter(|&address| address > start).min().unwrap_or(u64::MAX);
        if start == 0 || end == u64::MAX { (0, 0) } else { (start, end) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_function_ends_where_the_next_symbol_starts() {
        let text = "ffffffff82024130 T __pfx_next\nffffffff82022bc0 T tcp_rcv_state_process\nffffffff82022000 t before\n";
        let [found, missing] = ranges_in(text, &["tcp_rcv_state_process", "missing"]);
        assert_eq!(found, (0xffffffff82022bc0, 0xffffffff82024130));
        assert_eq!(missing, (0, 0));
        assert_eq!(ranges_in("0000000000000000 T f\n", &["f"]), [(0, 0)]);
    }

    #[test]
    fn the_cache_serves_only_its_own_boot_and_every_name() {
        let names = ["tcp_rcv_state_process", "cookie_v4_check"];
        let ranges = [(0xffffffff82022bc0, 0xffffffff82024130), (0, 0)];
        let text = cache_text("boot-a", &names, &ranges);
        assert_eq!(cached_ranges(&text, "boot-a", &names), Some(ranges));
        assert_eq!(cached_ranges(&text, "boot-b", &names), None);
        assert_eq!(cached_ranges(&text, "boot-a", &["tcp_rcv_state_process", "cookie_v6_check"]), None);
        assert_eq!(cached_ranges("boot-a\ntcp_rcv_state_process zz 1\n", "boot-a", &["tcp_rcv_state_process"]), None);
    }
}
