//! How big the flow table is made. It is a hash, preallocated in
//! full when netlens starts: 65,536 entries are 22.5 MB of kernel memory
//! and took 4 ms of the start-up here, most of the time spent creating
//! maps. A session (`trace`, `top`, `doctor`, `check`) sizes it to the
//! host as it is: room for four times the TCP sockets allocated now, at
//! least 16,384. The daemon outlives today's load (it may start at boot,
//! before the proxy it watches) and keeps at least 65,536. Either way a
//! table that fills refuses new connections and counts them.

use anyhow::{anyhow, Result};

/// Set to a number of entries to size the flow table yourself: how the
/// tests fill a tiny table, and a way to give a very busy
/// host a larger one.
pub const FLOW_TABLE_ENV: &str = "NETLENS_FLOW_TABLE_ENTRIES";

/// The largest table [`FLOW_TABLE_ENV`] may ask for.
pub const MAX_FLOW_ENTRIES: u32 = 1 << 24;

/// Who the table is for: the least it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowTableUse {
    Session,
    Service,
}

impl FlowTableUse {
    fn floor(self) -> u32 {
        match self {
            FlowTableUse::Session => 16_384,
            FlowTableUse::Service => netlens_common::FLOW_TABLE_ENTRIES,
        }
    }
}

/// The flow table's size: [`FLOW_TABLE_ENV`] when set (an error when not a
/// valid size), else from the host's TCP sockets for `table_use`.
pub fn flow_table_entries(table_use: FlowTableUse) -> Result<u32> {
    if let Some(text) = std::env::var_os(FLOW_TABLE_ENV) {
        let text = text.to_string_lossy();
        return match text.trim().parse::<u32>() {
            Ok(entries) if (1..=MAX_FLOW_ENTRIES).contains(&entries) => Ok(entries),
            _ => Err(anyhow!("{FLOW_TABLE_ENV}=`{text}` must be a number of entries from 1 to {MAX_FLOW_ENTRIES}")),
        };
    }
    // Unreadable: the floor, as on a quiet host.
    let sockets = std::fs::read_to_string("/proc/net/sockstat").ok().and_then(|text| tcp_sockets_allocated(&text)).unwrap_or(0);
    Ok(entries_for(sockets, table_use))
}

fn entries_for(sockets: u32, table_use: FlowTableUse) -> u32 {
    sockets.saturating_mul(4).checked_next_power_of_two().unwrap_or(MAX_FLOW_ENTRIES).clamp(table_use.floor(), MAX_FLOW_ENTRIES)
}

/// `alloc` of the `TCP:` line of /proc/net/sockstat: TCP sockets allocated
/// in every namespace (the `inuse` beside it counts this namespace's only).
fn tcp_sockets_allocated(sockstat: &str) -> Option<u32> {
    let line = sockstat.lines().find_map(|line| line.strip_prefix("TCP:"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    words.chunks(2).find(|pair| pair[0] == "alloc")?.get(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCKSTAT: &str = "sockets: used 8\nTCP: inuse 1 orphan 0 tw 130 alloc 6 mem 268\nUDP: inuse 0 mem 0\n";

    #[test]
    fn reads_the_tcp_sockets_of_every_namespace() {
        assert_eq!(tcp_sockets_allocated(SOCKSTAT), Some(6));
        assert_eq!(tcp_sockets_allocated("TCP: inuse 1\n"), None);
        assert_eq!(tcp_sockets_allocated(""), None);
    }

    #[test]
    fn four_times_the_sockets_above_the_floor() {
        assert_eq!(entries_for(6, FlowTableUse::Session), 16_384);
        assert_eq!(entries_for(6, FlowTableUse::Service), 65_536);
        assert_eq!(entries_for(10_000, FlowTableUse::Session), 65_536);
        assert_eq!(entries_for(100_000, FlowTableUse::Service), 524_288);
        assert_eq!(entries_for(u32::MAX, FlowTableUse::Session), MAX_FLOW_ENTRIES);
    }
}
