//! The kernel's copy of a running netlens's flow table: its entries as
//! bpftool dumps them. The map is found among the ones the process holds
//! by its shape (a hash of socket addresses to `Flow`s).

use std::{mem::offset_of, process::Command};

use anyhow::{bail, Context as _, Result};
use netlens_common::Flow;
use serde_json::Value;

/// One entry: its key (the socket's address), the flow's network
/// namespace and when it closed (0: open).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: u64,
    pub netns: u32,
    pub closed_ns: u64,
}

/// BPF_MAP_TYPE_HASH in fdinfo's `map_type`.
const HASH: u64 = 1;

/// The id of the flow table `pid` holds.
fn table_id(pid: u32) -> Result<u64> {
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(info) = std::fs::read_to_string(fd?.path()) else { continue };
        let field = |name: &str| {
            info.lines().find_map(|line| line.strip_prefix(name)?.trim().parse::<u64>().ok())
        };
        if field("map_type:") == Some(HASH) && field("key_size:") == Some(8) && field("value_size:") == Some(size_of::<Flow>() as u64) {
            return field("map_id:").context("fdinfo without map_id");
        }
    }
    bail!("netlens (pid {pid}) holds no flow table")
}

/// Every entry of the flow table of the netlens running as `pid`.
pub fn entries(pid: u32) -> Result<Vec<Entry>> {
    let id = table_id(pid)?;
    let output = Command::new("bpftool").args(["map", "dump", "id", &id.to_string(), "-j"]).output().context("running bpftool")?;
    if !output.status.success() {
        bail!("bpftool map dump: {}", String::from_utf8_lossy(&output.stderr));
    }
    entries_of(&output.stdout)
}

/// The entries of bpftool's JSON dump of the flow table.
fn entries_of(dump: &[u8]) -> Result<Vec<Entry>> {
    let dump: Vec<Value> = serde_json::from_slice(dump).context("bpftool's dump")?;
    // The dump is not atomic: an entry deleted between bpftool's listing
    // of its key and its lookup (a close, a sweep) comes back as
    // `"value": {"error": "can't lookup element"}`, and is no longer in
    // the table.
    dump.iter().filter(|entry| entry["value"].get("error").is_none()).map(entry_of).collect()
}

/// An entry from bpftool's dump: key and value as lists of "0x.." bytes.
fn entry_of(entry: &Value) -> Result<Entry> {
    let key = bytes_of(&entry["key"])?;
    let value = bytes_of(&entry["value"])?;
    if key.len() != 8 || value.len() != size_of::<Flow>() {
        bail!("an entry of {} + {} bytes, not a socket address and a Flow's {}", key.len(), value.len(), size_of::<Flow>());
    }
    Ok(Entry {
        key: little_endian(&key),
        netns: little_endian(&value[offset_of!(Flow, netns)..][..4]) as u32,
        closed_ns: little_endian(&value[offset_of!(Flow, closed_ns)..][..8]),
    })
}

fn bytes_of(list: &Value) -> Result<Vec<u8>> {
    list.as_array()
        .with_context(|| format!("not a byte list: {list}"))?
        .iter()
        .map(|byte| byte.as_str().and_then(|hex| u8::from_str_radix(hex.trim_start_matches("0x"), 16).ok()))
        .collect::<Option<_>>()
        .context("a byte that is not hex")
}

fn little_endian(bytes: &[u8]) -> u64 {
    bytes.iter().rev().fold(0, |n, &b| n << 8 | u64::from(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        let list: Vec<String> = bytes.iter().map(|b| format!("\"0x{b:02x}\"")).collect();
        format!("[{}]", list.join(","))
    }

    #[test]
    fn entries_deleted_during_the_dump_are_gone() {
        let mut value = vec![0u8; size_of::<Flow>()];
        value[offset_of!(Flow, netns)..][..4].copy_from_slice(&7u32.to_le_bytes());
        value[offset_of!(Flow, closed_ns)..][..8].copy_from_slice(&99u64.to_le_bytes());
        let dump = format!(
            r#"[{{"key":{},"value":{}}},{{"key":{},"value":{{"error":"can't lookup element"}}}}]"#,
            hex(&5u64.to_le_bytes()),
            hex(&value),
            hex(&6u64.to_le_bytes())
        );
        let entries = entries_of(dump.as_bytes()).unwrap();
        assert_eq!(entries, [Entry { key: 5, netns: 7, closed_ns: 99 }]);
    }

    #[test]
    fn a_malformed_value_is_an_error() {
        let dump = format!(r#"[{{"key":{},"value":"zz"}}]"#, hex(&5u64.to_le_bytes()));
        assert!(entries_of(dump.as_bytes()).is_err());
    }
}
