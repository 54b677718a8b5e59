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

/// Two passes over the table: the starts, then the nearest symbol above
/// each.
fn ranges_in<const N: usize>(text: &str, names: &[&str; N]) -> [(u64, u64); N] {
    let symbols = || {
        text.lines().filter_map(|line| {
            let mut words = line.split_whitespace();
            let address = u64::from_str_radix(words.next()?, 16).ok()?;
            let kind = words.next()?;
            Some((address, kind, words.next()?))
        })
    };
    let mut ranges = [(0u64, u64::MAX); N];
    for (address, kind, symbol) in symbols() {
        if let Some(at) = names.iter().position(|name| *name == symbol) {
            if matches!(kind, "T" | "t") && ranges[at].0 == 0 {
                ranges[at].0 = address;
            }
        }
    }
    for (address, _, _) in symbols() {
        for (start, end) in ranges.iter_mut() {
            if *start != 0 && address > *start && address < *end {
                *end = address;
            }
        }
    }
    ranges.map(|(start, end)| if start == 0 || end == u64::MAX { (0, 0) } else { (start, end) })
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
