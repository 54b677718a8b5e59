//! The kernel's copy of a running netlens's flows: the entries of its flow
//! table (a hash of socket addresses to `Flow`s) or the used slots of its
//! array (buckets of owners, `FLOW_OWNERS`, beside the flows,
//! `FLOW_SLOTS`), as bpftool dumps them. The maps are found among the ones
//! the process holds by their shape and name; of the table and the array,
//! the one with more than one entry (the other is a placeholder).

use std::{mem::offset_of, process::Command};

use anyhow::{bail, Context as _, Result};
use netlens_common::{Flow, OwnerBucket, SLOT_WAYS};
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

/// A map the process holds: its id, type, key and value sizes, entries.
struct Held {
    id: u64,
    shape: (u64, u64, u64),
    entries: u64,
}

fn held_maps(pid: u32) -> Result<Vec<Held>> {
    let mut maps = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(info) = std::fs::read_to_string(fd?.path()) else { continue };
        let field = |name: &str| info.lines().find_map(|line| line.strip_prefix(name)?.trim().parse::<u64>().ok());
        if let (Some(id), Some(kind), Some(key), Some(value)) = (field("map_id:"), field("map_type:"), field("key_size:"), field("value_size:")) {
            maps.push(Held { id, shape: (kind, key, value), entries: field("max_entries:").unwrap_or(0) });
        }
    }
    Ok(maps)
}

fn map_name(id: u64) -> Result<String> {
    let output = Command::new("bpftool").args(["map", "show", "id", &id.to_string(), "-j"]).output().context("running bpftool")?;
    let shown: Value = serde_json::from_slice(&output.stdout).context("bpftool's map show")?;
    Ok(shown["name"].as_str().unwrap_or_default().to_string())
}

/// Where the netlens running as `pid` keeps its flows, and the ids of the
/// table, or of the array's owners and flows.
fn flows_maps(pid: u32) -> Result<(Home, u64, u64)> {
    let maps = held_maps(pid)?;
    let flow_size = size_of::<Flow>() as u64;
    if let Some(table) = maps.iter().find(|m| m.shape == (HASH, 8, flow_size) && m.entries > 1) {
        return Ok((Home::Table, table.id, 0));
    }
    let named = |shape: (u64, u64, u64), name: &str| -> Result<Option<u64>> {
        for map in maps.iter().filter(|m| m.shape == shape && m.entries > 1) {
            if map_name(map.id)? == name {
                return Ok(Some(map.id));
            }
        }
        Ok(None)
    };
    let owners = named((ARRAY, 4, size_of::<OwnerBucket>() as u64), "FLOW_OWNERS")?;
    let slots = named((ARRAY, 4, flow_size), "FLOW_SLOTS")?;
    match (owners, slots) {
        (Some(owners), Some(slots)) => Ok((Home::Array, owners, slots)),
        _ => bail!("netlens (pid {pid}) holds no flow table or array"),
    }
}

/// Where the netlens running as `pid` keeps its flows.
pub fn home(pid: u32) -> Result<Home> {
    Ok(flows_maps(pid)?.0)
}

fn dump(id: u64) -> Result<Vec<u8>> {
    let output = Command::new("bpftool").args(["map", "dump", "id", &id.to_string(), "-j"]).output().context("running bpftool")?;
    if !output.status.success() {
        bail!("bpftool map dump: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(output.stdout)
}

/// Every entry of the flow table of the netlens running as `pid`, or
/// every used slot of its array.
pub fn entries(pid: u32) -> Result<Vec<Entry>> {
    match flows_maps(pid)? {
        (Home::Table, table, _) => entries_of(&dump(table)?),
        (Home::Array, owners, slots) => slots_of(&dump(owners)?, &dump(slots)?),
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

/// The used slots (owner not 0) of bpftool's JSON dumps of the array's
/// owners and flows, keyed by owner without its closed bit. (Dumped one
/// after the other: a slot that changed between them may pair an owner
/// with its previous flow.)
fn slots_of(owners: &[u8], slots: &[u8]) -> Result<Vec<Entry>> {
    let owners: Vec<Value> = serde_json::from_slice(owners).context("bpftool's dump of the owners")?;
    let slots: Vec<Value> = serde_json::from_slice(slots).context("bpftool's dump of the flows")?;
    let mut used = Vec::new();
    for (bucket, entry) in owners.iter().enumerate() {
        let value = bytes_of(&entry["value"])?;
        if value.len() != size_of::<OwnerBucket>() {
            bail!("a bucket of {} bytes, not an OwnerBucket's {}", value.len(), size_of::<OwnerBucket>());
        }
        for way in 0..SLOT_WAYS {
            let owner = little_endian(&value[way * 8..][..8]);
            if owner == 0 {
                continue;
            }
            let flow = bytes_of(&slots.get(bucket * SLOT_WAYS + way).context("fewer flows than slots")?["value"])?;
            if flow.len() != size_of::<Flow>() {
                bail!("a flow of {} bytes, not a Flow's {}", flow.len(), size_of::<Flow>());
            }
            used.push(flow_entry(owner & !1, &flow));
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
