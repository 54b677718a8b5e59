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
//! the kernel's per-CPU counters) reach [`ClosedFlows::threshold`], or
//! when the table refused a flow while closed ones were in it. A sweep
//! that finds fewer than that many old enough to take (a host whose hot
//! addresses hold thousands of closed entries between reuses) doubles
//! the wait before the next, up to [`MAX_WAIT`]: such a table is not
//! walked every second for nothing. A refusal does not wait.
//!
//! How: each entry closed at least [`MIN_AGE_NS`] ago is taken with
//! BPF_MAP_LOOKUP_AND_DELETE_ELEM, which returns the entry as it was when
//! deleted. A new connection at that address may have written its flow
//! over the closed one between our read and the delete (the kernel does
//! that in place, without the bucket lock): the flow taken is then open,
//! and it is put back at once. Its events in those microseconds found no
//! flow, so it is counted with the flows lost.

use std::{
    ops::ControlFlow,
    os::fd::AsFd,
    time::{Duration, Instant},
};

use anyhow::Result;
use aya::maps::{HashMap as BpfHashMap, IterableMap as _, Map, MapData};
use netlens_common::Flow;

use super::tables::visit_flows;
use crate::kernel::map_ops;

/// How often [`ClosedFlows::due`] is asked.
const CHECK_PERIOD: Duration = Duration::from_secs(1);

/// A closed flow younger than this is left: its address is likely hot,
/// about to be taken by the next socket.
pub const MIN_AGE_NS: u64 = 1_000_000_000;

/// The most closed flows let accumulate before a sweep, whatever the
/// table's size: `top` reads every entry of the table at each refresh.
const MAX_THRESHOLD: u64 = 4_096;

/// The longest wait between sweeps that took little.
const MAX_WAIT: Duration = Duration::from_secs(64);

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
    /// The table's refusals at the last check.
    refused_at_check: u64,
    /// When the counters were last looked at.
    checked: Instant,
    /// The wait after the last sweep, and the earliest the next may run
    /// (but for a refusal).
    wait: Duration,
    next_sweep: Instant,
}

impl ClosedFlows {
    pub fn new(capacity: u64) -> Self {
        let now = Instant::now();
        Self { capacity, swept: 0, raced: 0, refused_at_check: 0, checked: now, wait: CHECK_PERIOD, next_sweep: now }
    }

    /// The closed flows that call for a sweep: a sixteenth of the table,
    /// at most [`MAX_THRESHOLD`].
    fn threshold(&self) -> u64 {
        (self.capacity / 16).clamp(1, MAX_THRESHOLD)
    }

    /// The closed flows in the table now, from the kernel's counts of
    /// flows kept closed and of closed entries reused.
    pub fn closed_now(&self, kept: u64, reused: u64) -> u64 {
        kept.saturating_sub(reused).saturating_sub(self.swept)
    }

    /// Whether a [`CHECK_PERIOD`] has passed since the counters were
    /// last looked at.
    pub fn check_due(&self) -> bool {
        self.checked.elapsed() >= CHECK_PERIOD
    }

    /// Whether to sweep, given the closed flows in the table now and the
    /// table's refusals so far, at `now`; remembers the refusals.
    pub fn due(&mut self, closed: u64, refused: u64, now: Instant) -> bool {
        self.checked = now;
        let refused_since = refused > std::mem::replace(&mut self.refused_at_check, refused);
        (refused_since && closed > 0) || (closed >= self.threshold() && now >= self.next_sweep)
    }

    /// After a sweep at `now` that took `taken` closed flows: the next may
    /// follow at the next check if this one was worth it, else after
    /// twice the last wait.
    fn swept_at(&mut self, taken: u64, now: Instant) {
        self.swept += taken;
        self.wait = if taken >= self.threshold() { CHECK_PERIOD } else { (self.wait * 2).min(MAX_WAIT) };
        self.next_sweep = now + self.wait;
    }

    /// Takes every flow closed before `before_ns` (CLOCK_MONOTONIC) out of
    /// `table`, putting back any a new connection took meanwhile.
    pub fn sweep(&mut self, table: &mut Map, before_ns: u64) -> Result<()> {
        let mut flows: BpfHashMap<&mut MapData, u64, Flow> = BpfHashMap::try_from(table)?;
        // Collect first, take after: the walk is not made for deletions
        // under it.
        let mut aged = Vec::new();
        visit_flows(&flows, |key, flow| {
            if is_aged(flow, before_ns) {
                aged.push(key);
            }
            ControlFlow::Continue(())
        })?;
        let mut swept = 0;
        for key in aged {
            match map_ops::lookup_and_delete::<u64, Flow>(flows.map().fd().as_fd(), &key)? {
                Some(flow) if flow.closed_ns == 0 => {
                    // A new connection took the entry since the walk: put
                    // its flow back at once. BPF_NOEXIST: where its next
                    // event made a new entry already, that one is newer.
                    let _ = flows.insert(key, flow, 1);
                    self.raced += 1;
                }
                Some(_) => swept += 1,
                // Gone since the walk: nothing taken.
                None => {}
            }
        }
        self.swept_at(swept, Instant::now());
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
    fn enough_closed_flows_call_for_a_sweep() {
        let mut closed = ClosedFlows::new(65_536);
        let start = Instant::now();
        assert_eq!(closed.threshold(), 4_096);
        assert!(!closed.due(4_095, 0, start));
        assert!(closed.due(4_096, 0, start));
    }

    #[test]
    fn sweeps_that_take_little_wait_longer_each_time() {
        let start = Instant::now();
        let mut closed = ClosedFlows::new(256);
        let threshold = closed.threshold();
        assert_eq!(threshold, 16);
        // Hot addresses: 1,000 closed flows, all too young to take.
        closed.swept_at(0, start);
        assert!(!closed.due(1_000, 0, start + Duration::from_millis(1_999)));
        assert!(closed.due(1_000, 0, start + Duration::from_secs(2)));
        closed.swept_at(0, start + Duration::from_secs(2));
        assert!(!closed.due(1_000, 0, start + Duration::from_millis(5_999)));
        assert!(closed.due(1_000, 0, start + Duration::from_secs(6)));
        for _ in 0..10 {
            closed.swept_at(0, start);
        }
        assert_eq!(closed.wait, MAX_WAIT);
        // A sweep worth it: the next may follow at the next check.
        closed.swept_at(threshold, start);
        assert!(closed.due(1_000, 0, start + CHECK_PERIOD));
        assert_eq!(closed.swept, threshold);
    }

    #[test]
    fn a_refusal_calls_for_a_sweep_when_closed_flows_hold_room() {
        let start = Instant::now();
        let mut closed = ClosedFlows::new(64);
        closed.swept_at(0, start);
        assert!(closed.due(1, 1, start), "refused while one closed flow held an entry, without waiting");
        assert!(!closed.due(1, 1, start), "no new refusal");
        assert!(!closed.due(0, 2, start), "refused, but nothing closed to take");
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
