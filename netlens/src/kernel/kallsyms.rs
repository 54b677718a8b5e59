//! Kernel code addresses from /proc/kallsyms (root sees real addresses).

use std::fs;

use anyhow::{bail, Context as _, Result};

/// `[start, end)` of kernel function `name`: from its address to the next
/// higher symbol's.
pub fn function_range(name: &str) -> Result<(u64, u64)> {
    let text = fs::read_to_string("/proc/kallsyms").context("reading /proc/kallsyms")?;
    range_in(&text, name)
}

fn range_in(text: &str, name: &str) -> Result<(u64, u64)> {
    let symbols = || {
        text.lines().filter_map(|line| {
            let mut words = line.split_whitespace();
            let address = u64::from_str_radix(words.next()?, 16).ok()?;
            let kind = words.next()?;
            Some((address, kind, words.next()?))
        })
    };
    let start = symbols()
        .find(|(_, kind, symbol)| matches!(*kind, "T" | "t") && *symbol == name)
        .map(|(address, _, _)| address)
        .with_context(|| format!("{name} is not in /proc/kallsyms"))?;
    if start == 0 {
        bail!("/proc/kallsyms hides addresses (kernel.kptr_restrict)");
    }
    let end = symbols().map(|(address, _, _)| address).filter(|&address| address > start).min();
    Ok((start, end.with_context(|| format!("no symbol follows {name}"))?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_function_ends_where_the_next_symbol_starts() {
        let text = "ffffffff82024130 T __pfx_next\nffffffff82022bc0 T tcp_rcv_state_process\nffffffff82022000 t before\n";
        assert_eq!(range_in(text, "tcp_rcv_state_process").unwrap(), (0xffffffff82022bc0, 0xffffffff82024130));
        assert!(range_in("0000000000000000 T f\n", "f").is_err());
        assert!(range_in(text, "missing").is_err());
    }
}
