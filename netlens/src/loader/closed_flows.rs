//! The closed flows the table keeps (flows.rs in the eBPF crate): a close
//! marks its flow closed, and the next socket at that address writes its
//! own over it. The kernel hands a freed socket's memory to the next
//! socket at once, so nearly every closed entry is taken again within
//! milliseconds. The entries of addresses it does not reuse (a burst of
//! connections is over, the socket cache shrank) would fill the table
//! over days; userspace sweeps them here.
//!
//! When: checked once a second from the event source's drain. A sweep
//! runs when the closed flows in the table (kept - reused - swept, from
//! the kernel's per-CPU counters) grew by [`ClosedFlows::threshold`] since
//! the last sweep, or when the table refused a flow while closed ones
//! were in it. Growth, not a level: a host whose hot addresses hold
//! thousands of closed entries between reuses would otherwise be walked
//! every second for nothing.
//!
//! How: each entry closed at least [`MIN_AGE_NS`] ago is taken with
//! BPF_MAP_LOOKUP_AND_DELETE_ELEM, which returns the entry as it was when
//! deleted. A new connection at that address may have written its flow
//! over the closed one between our read and the delete (the kernel does
//! that in place, without the bucket lock): the flow taken is then open,
//! and it is put back at once. Its events in those microseconds found no
//! flow, so it is counted with the flows lost.

use std::{os::fd::AsFd, time::{Duration, Instant}};

use anyhow::{anyhow, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use netlens_common::Flow;

use crate::kernel::map_ops;

/// How often [`ClosedFlows::due`] is asked.
pub const CHECK_PERIOD: Duration = Duration::from_secs(1);

/// A closed flow younger than this is left: its address is likely hot,
/// about to be taken by the next socket.
pub const MIN_AGE_NS: u64 = 1_000_000_000;

/// The most closed flows let accumulate between sweeps, whatever the
/// table's size: `top` reads every entry of the table at each refresh.
const MAX_GROWTH: u64 = 4_096;

/// What the sweeps did, and when the next one is due.
#[derive(Debug)]
pub struct ClosedFlows {
    /// The table's entries.
    capacity: u64,
    /// Closed flows taken out of the table, in all.
    pub swept: u64,
    /// Open flows a sweep took (a new connection reused the entry between
    /// the walk and the delete) and put back: counted as lost.
    pub raced: u64,
    /// Closed flows in the table right after the last sweep.
    closed_after_sweep: u64,
    /// The table's refusals at the last check.
    refused_at_check: u64,
    /// When the counters were last looked at.
    pub checked: Instant,
}

impl ClosedFlows {
    pub fn new(capacity: u64) -> Self {
        Self { capacity, swept: 0, raced: 0, closed_after_sweep: 0, refused_at_check: 0, checked: Instant::now() }
    }

    /// The growth in closed flows that calls for a sweep: a sixteenth of
    /// the table, at most [`MAX_GROWTH`].
    fn threshold(&self) -> u64 {
        (self.capacity / 16).clamp(1, MAX_GROWTH)
    }

    /// The closed flows in the table now, from the kernel's counts of
    /// flows kept closed and of closed entries reused.
    pub fn closed_now(&self, kept: u64, reused: u64) -> u64 {
        kept.saturating_sub(reused).saturating_sub(self.swept)
    }

    /// Whether to sweep, given the closed flows in the table now and the
    /// table's refusals so far; remembers the refusals.
    pub fn due(&mut self, closed: u64, refused: u64) -> bool {
        self.checked = Instant::now();
        let refused_since = refused > std::mem::replace(&mut self.refused_at_check, refused);
        closed >= self.closed_after_sweep + self.threshold() || (refused_since && closed > 0)
    }

    /// Takes every flow closed before `before_ns` (CLOCK_MONOTONIC) out of
    /// `table`, putting back any a new connection took meanwhile.
    pub fn sweep(&mut self, table: &mut Map, before_ns: u64, closed: u64) -> Result<()> {
        let aged: Vec<u64> = {
            let flows: BpfHashMap<&MapData, u64, Flow> = BpfHashMap::try_from(&*table)?;
            // A key deleted under a walk sends it back to the first key:
            // collect first, take after.
            let walk = flows.iter().take(self.capacity as usize * 2).filter_map(Result::ok);
            walk.filter(|(_, flow)| is_aged(flow, before_ns)).map(|(key, _)| key).collect()
        };
        let Map::HashMap(data) = &*table else { return Err(anyhow!("FLOWS is not a hash map")) };
        let mut taken_open = Vec::new();
        let mut swept = 0;
        for key in aged {
            match map_ops::lookup_and_delete::<u64, Flow>(data.fd().as_fd(), &key)? {
                Some(flow) if flow.closed_ns == 0 => taken_open.push((key, flow)),
                Some(_) => swept += 1,
                // Gone since the walk: nothing taken.
                None => {}
            }
        }
        self.swept += swept;
        let mut flows: BpfHashMap<&mut MapData, u64, Flow> = BpfHashMap::try_from(table)?;
        for (key, flow) in taken_open {
            self.raced += 1;
            // BPF_NOEXIST: where the connection's next event made a new
            // entry already, that one is newer.
            let _ = flows.insert(key, flow, 1);
        }
        self.closed_after_sweep = closed.saturating_sub(swept);
        Ok(())
    }
}

/// A closed flow, closed before `before_ns`.
fn is_aged(flow: &Flow, before_ns: u64) -> bool {
    flow.closed_ns != 0 && flow.closed_ns < before_ns
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_since_the_last_sweep_calls_for_one() {
        let mut closed = ClosedFlows::new(65_536);
        assert_eq!(closed.threshold(), 4_096);
        assert!(!closed.due(4_095, 0));
        assert!(closed.due(4_096, 0));
        // After a sweep that left 10,000 (hot ones, too young to take), the
        // same level is no reason to walk again.
        closed.closed_after_sweep = 10_000;
        assert!(!closed.due(10_000, 0));
        assert!(!closed.due(14_095, 0));
        assert!(closed.due(14_096, 0));
    }

    #[test]
    fn a_refusal_calls_for_a_sweep_when_closed_flows_hold_room() {
        let mut closed = ClosedFlows::new(64);
        assert_eq!(closed.threshold(), 4);
        assert!(closed.due(1, 1), "refused while one closed flow held an entry");
        assert!(!closed.due(1, 1), "no new refusal");
        assert!(!closed.due(0, 2), "refused, but nothing closed to take");
    }

    #[test]
    fn closed_flows_are_kept_less_reused_less_swept() {
        let mut closed = ClosedFlows::new(1_024);
        closed.swept = 5;
        assert_eq!(closed.closed_now(100, 90), 5);
        assert_eq!(closed.closed_now(10, 90), 0, "counters read at different moments never go negative");
    }

    #[test]
    fn only_flows_closed_long_enough_are_taken() {
        let open = Flow::default();
        let closed_at = |ns| Flow { closed_ns: ns, ..Flow::default() };
        assert!(!is_aged(&open, u64::MAX));
        assert!(is_aged(&closed_at(5), 6));
        assert!(!is_aged(&closed_at(6), 6));
    }
}
