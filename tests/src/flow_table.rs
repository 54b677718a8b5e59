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
    let dump: Vec<Value> = serde_json::from_slice(&output.stdout).context("bpftool's dump")?;
    dump.iter().map(entry_of).collect()
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
        .context("not a byte list")?
        .iter()
        .map(|byte| byte.as_str().and_then(|hex| u8::from_str_radix(hex.trim_start_matches("0x"), 16).ok()))
        .collect::<Option<_>>()
        .context("a byte that is not hex")
}

fn little_endian(bytes: &[u8]) -> u64 {
    bytes.iter().rev().fold(0, |n, &b| n << 8 | u64::from(b))
}
