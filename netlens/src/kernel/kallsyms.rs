//! Kernel code addresses from /proc/kallsyms (root sees real addresses).

use std::fs;

use anyhow::{Context as _, Result};

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
}
