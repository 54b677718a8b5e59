//! The kernel's copy of a running netlens's flows: the entries of its flow
//! table (a hash of socket addresses to `Flow`s) or the used slots of its
//! array (`FlowSlot`s), as bpftool dumps them. The map is found among the
//! ones the process holds by its shape; of the two, the one with more than
//! one entry (the other is a placeholder).

use std::{mem::offset_of, process::Command};

use anyhow::{bail, Context as _, Result};
use netlens_common::{Flow, FlowSlot};
use serde_json::Value;

/// One entry: its key (the socket's address in the table, its owner in
/// the array), the flow's network namespace and when it closed (0: open).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: u64,
    pub netns: u32,
    pub closed_ns: u64,
}

/// Where a netlens keeps its flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Home {
    Table,
    Array,
}

/// BPF_MAP_TYPE_HASH and _ARRAY in fdinfo's `map_type`.
const HASH: u64 = 1;
const ARRAY: u64 = 2;

/// The id of the map `pid` keeps its flows in, and which it is.
fn flows_map(pid: u32) -> Result<(u64, Home)> {
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(info) = std::fs::read_to_string(fd?.path()) else { continue };
        let field = |name: &str| {
            info.lines().find_map(|line| line.strip_prefix(name)?.trim().parse::<u64>().ok())
        };
        let shape = (field("map_type:"), field("key_size:"), field("value_size:"));
        let home = match shape {
            (Some(HASH), Some(8), Some(size)) if size == size_of::<Flow>() as u64 => Home::Table,
            (Some(ARRAY), Some(4), Some(size)) if size == size_of::<FlowSlot>() as u64 => Home::Array,
            _ => continue,
        };
        if field("max_entries:").unwrap_or(0) > 1 {
            return Ok((field("map_id:").context("fdinfo without map_id")?, home));
        }
    }
    bail!("netlens (pid {pid}) holds no flow table or array")
}

/// Where the netlens running as `pid` keeps its flows.
pub fn home(pid: u32) -> Result<Home> {
    Ok(flows_map(pid)?.1)
}

/// Every entry of the flow table of the netlens running as `pid`, or
/// every used slot of its array.
pub fn entries(pid: u32) -> Result<Vec<Entry>> {
    let (id, home) = flows_map(pid)?;
    let output = Command::new("bpftool").args(["map", "dump", "id", &id.to_string(), "-j"]).output().context("running bpftool")?;
    if !output.status.success() {
        bail!("bpftool map dump: {}", String::from_utf8_lossy(&output.stderr));
    }
    match home {
        Home::Table => entries_of(&output.stdout),
        Home::Array => slots_of(&output.stdout),
    }
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
    Ok(flow_entry(little_endian(&key), &value))
}

fn flow_entry(key: u64, flow: &[u8]) -> Entry {
    Entry {
        key,
        netns: little_endian(&flow[offset_of!(Flow, netns)..][..4]) as u32,
        closed_ns: little_endian(&flow[offset_of!(Flow, closed_ns)..][..8]),
    }
}

/// The used slots (owner not 0) of bpftool's JSON dump of the array, keyed
/// by owner without its closed bit.
fn slots_of(dump: &[u8]) -> Result<Vec<Entry>> {
    let dump: Vec<Value> = serde_json::from_slice(dump).context("bpftool's dump")?;
    let mut used = Vec::new();
    for slot in &dump {
        let value = bytes_of(&slot["value"])?;
        if value.len() != size_of::<FlowSlot>() {
            bail!("a slot of {} bytes, not a FlowSlot's {}", value.len(), size_of::<FlowSlot>());
        }
        let owner = little_endian(&value[offset_of!(FlowSlot, owner)..][..8]);
        if owner != 0 {
            used.push(flow_entry(owner & !1, &value[offset_of!(FlowSlot, flow)..]));
        }
    }
    Ok(used)
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
