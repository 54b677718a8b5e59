//! The event source every long-running command reads: attaches the
//! programs, then drains the ring buffer into typed [`ConnEvent`]s.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, time::Interval};

pub use crate::loader::FlowTableUse;

use crate::{
    census,
    event::ConnEvent,
    known_connections::KnownConnections,
    kernel::progstats::ProgramStats,
    filter::Filter,
    loader::{KernelCounters, Probes},
    service::Attribution,
};

/// How promptly events reach userspace, against the wake-ups that costs:
/// the kernel wakes us once per `wakeup_bytes` of events (see events.rs in
/// netlens-ebpf), and below that we drain on a timer, so an event is never
/// later than its `drain_interval`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// `trace`: each event shown within 20 ms.
    Prompt,
    /// `top`, `daemon`, `doctor`: events aggregated, read at a refresh, a
    /// scrape or the end (each drains first). Drained every 250 ms or per
    /// 1 MiB of events: about 10 wake-ups a second at 10,000 connections a
    /// second instead of ~150. Their ring buffer is 4 MiB, half of trace's:
    /// userspace maps the ring's pages twice and touches them all as it
    /// wraps, so it is most of a daemon's resident memory. 3 MiB left after
    /// a wake-up still hold about 300 ms of events at 10,000 connections a
    /// second.
    Batched,
}

impl Delivery {
    pub fn ring_bytes(self) -> u32 {
        match self {
            Delivery::Prompt => netlens_common::RING_BYTES,
            Delivery::Batched => 4 << 20,
        }
    }

    pub fn wakeup_bytes(self) -> u32 {
        match self {
            Delivery::Prompt => netlens_common::DEFAULT_WAKEUP_BYTES,
            Delivery::Batched => 1 << 20,
        }
    }

    fn drain_interval(self) -> Duration {
        match self {
            Delivery::Prompt => Duration::from_millis(20),
            Delivery::Batched => Duration::from_millis(250),
        }
    }
}

pub struct EventSource {
    probes: Probes,
    ring: AsyncFd<RingBuf<MapData>>,
    tick: Interval,
    /// Records this userspace could not decode (newer kernel side).
    pub undecodable: u64,
    /// Listen overflows already reported, by listener; when they were
    /// last read.
    overflows_reported: HashMap<netlens_common::ListenerEndpoint, u64>,
    overflows_read: Instant,
    /// Whether a failed read of the listen-overflow table was said.
    overflows_unreadable_said: bool,
    /// Whether a failed sweep of the flow table's closed flows was said.
    sweep_failure_said: bool,
    /// Each event's service, resolved off the event path.
    attribution: Attribution,
    /// Where flows live in socket storage: the connections seen, for the
    /// events that could not reach their flow (see known_connections.rs).
    known: Option<KnownConnections>,
}

/// The processes of the listeners of the namespaces `only_netns` watches,
/// but those whose inode is in `known`. Run it on a thread of its own: the
/// dump enters each namespace (setns), and the caller's namespace is the
/// one the daemon serves metrics in.
fn listener_census(only_netns: Option<u32>, known: &HashSet<u32>) -> Result<census::listeners::Found> {
    census::listeners::listener_processes(&census::netns::watched(only_netns)?, known)
}

/// A census thread's answer; a panic is a failed census.
fn census_joined(thread: std::thread::Result<Result<census::listeners::Found>>) -> Result<census::listeners::Found> {
    thread.unwrap_or_else(|_| Err(anyhow::anyhow!("the listener census panicked")))
}

/// Names the processes of listeners that were listening before netlens
/// attached, so their passive connections carry them from the first event
/// on (listen() and accept() name the others in the kernel). `census` ran
/// while the programs were loaded; a second, short look names the
/// listeners opened since it dumped (those it knew are not looked up
/// again). A failure costs only that: one line says so.
fn seed_listener_owners(probes: &mut Probes, only_netns: Option<u32>, census: Result<census::listeners::Found>) {
    let consequence = "connections to listeners older than netlens carry no process until accept()";
    let found = census.and_then(|mut found| {
        let known = &found.inodes;
        let since = census_joined(std::thread::scope(|scope| scope.spawn(|| listener_census(only_netns, known)).join()))?;
        found.listeners.extend(since.listeners);
        found.unnamed += since.unnamed;
        found.unreadable = found.unreadable.max(since.unreadable);
        Ok(found)
    });
    let found = match found.and_then(|found| probes.seed_listener_owners(&found.listeners).map(|_| found)) {
        Ok(found) => found,
        Err(err) => return eprintln!("netlens: {consequence}: {err:#}"),
    };
    if let Some((skipped, err)) = found.skipped {
        eprintln!("netlens: in {skipped} network namespaces, {consequence}: {err}");
    }
    // A listener closed meanwhile is no concern; one whose holder could
    // not be read is.
    if found.unnamed > 0 && found.unreadable > 0 {
        eprintln!(
            "netlens: for {} listeners, {consequence}: the file descriptors of {} processes could not be read (that needs CAP_SYS_PTRACE, and every capability the process holds)",
            found.unnamed, found.unreadable
        );
    }
}

/// Listen overflows are read from the kernel this often: one
/// `listen_overflow` event per listener per period while it drops.
const OVERFLOW_PERIOD: Duration = Duration::from_secs(1);

impl EventSource {
    /// Attaches everything and announces it on stderr, like bpftrace's
    /// "Attaching N probes". Listeners of the namespaces `filter` watches
    /// that are older than netlens get their processes named first. The
    /// flow table is sized for `flows` (a session or the daemon).
    pub fn start(filter: &Filter, delivery: Delivery, flows: FlowTableUse) -> Result<Self> {
        // The census of older listeners (sock_diag, then every process's
        // descriptors) runs while the programs load: on a host with many
        // processes it is the longer of the two.
        let only_netns = filter.netns;
        let census = std::thread::spawn(move || listener_census(only_netns, &HashSet::new()));
        let mut probes = Probes::attach_all(delivery.ring_bytes(), delivery.wakeup_bytes(), flows)?;
        let census = census_joined(census.join());
        seed_listener_owners(&mut probes, only_netns, census);
        // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd, so
        // the fd stays open for as long as it is registered.
        let ring = unsafe { AsyncFd::register(probes.take_events()?) }
            .map_err(|err| anyhow::anyhow!("watching the event ring buffer: {}", std::io::Error::from(err)))?;
        eprintln!(
            "netlens: attached {} programs in {:.1} ms",
            probes.program_count(),
            probes.attach_time.as_secs_f64() * 1e3
        );
        probes.settle();
        // One line per feature this kernel degrades or lacks.
        for notice in probes.features.iter().filter_map(|f| f.notice()) {
            eprintln!("{notice}");
        }
        let mut tick = tokio::time::interval(delivery.drain_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let known = probes.flow_home.in_storage().then(KnownConnections::default);
        Ok(Self {
            probes,
            ring,
            tick,
            undecodable: 0,
            overflows_reported: HashMap::new(),
            overflows_read: Instant::now(),
            overflows_unreadable_said: false,
            sweep_failure_said: false,
            attribution: Attribution::start(),
            known,
        })
    }

    /// Waits until events may be pending: a wake-up from the kernel or the
    /// drain timer.
    pub async fn ready(&mut self) -> Result<()> {
        tokio::select! {
            guard = self.ring.readable_mut() => guard?.clear_ready(),
            _ = self.tick.tick() => {}
        }
        Ok(())
    }

    /// Hands every pending event that `filter` matches to `sink`.
    pub fn drain(&mut self, filter: &Filter, mut sink: impl FnMut(&ConnEvent)) {
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            let Some(mut event) = ConnEvent::from_record(&item) else {
                self.undecodable += 1;
                continue;
            };
            // Joined before filtering: a filter may name the process.
            let kept = self.known.as_mut().is_none_or(|known| known.join(&mut event));
            if kept && filter.matches(&event) {
                self.attribution.push(&mut event, &mut sink);
            }
        }
        self.attribution.release(&mut sink);
        if self.overflows_read.elapsed() >= OVERFLOW_PERIOD {
            self.read_overflows(filter, &mut sink);
        }
        if let Err(err) = self.probes.sweep_closed_flows() {
            // Said once: an unswept table fills, and its refusals count.
            if !std::mem::replace(&mut self.sweep_failure_said, true) {
                eprintln!("netlens: sweeping closed flows out of the flow table failed: {err:#}");
            }
        }
    }

    /// Events handed on without their service because its answer took
    /// longer than `service::MAX_WAIT`.
    pub fn unattributed(&self) -> u64 {
        self.attribution.late
    }

    /// Hands on the events still waiting for their service (at most
    /// `service::MAX_WAIT` more): at exit, after the last [`Self::drain`].
    pub fn flush(&mut self, mut sink: impl FnMut(&ConnEvent)) {
        self.attribution.flush(&mut sink);
    }

    /// Reports the listen overflows counted since the last read: one event
    /// per listener whose count grew. Called once a period by [`drain`],
    /// and by views at exit so that the last second is reported too.
    pub fn read_overflows(&mut self, filter: &Filter, mut sink: impl FnMut(&ConnEvent)) {
        self.overflows_read = Instant::now();
        let listeners = match self.probes.listen_overflows() {
            Ok(listeners) => listeners,
            Err(err) => {
                // Said once: the next read may well succeed, and a count
                // missing from one read shows in the next.
                if !std::mem::replace(&mut self.overflows_unreadable_said, true) {
                    eprintln!("netlens: reading the listen-overflow table failed: {err:#}");
                }
                return;
            }
        };
        for (endpoint, entry) in listeners {
            let reported = self.overflows_reported.entry(endpoint).or_insert(0);
            let dropped = entry.dropped.saturating_sub(*reported);
            *reported = entry.dropped;
            if dropped == 0 {
                continue;
            }
            match ConnEvent::listen_overflow(&endpoint, entry.last_ns, entry.backlog, dropped) {
                Some(event) if filter.matches(&event) => sink(&event),
                Some(_) => {}
                None => self.undecodable += 1,
            }
        }
    }

    /// How each feature is served on this kernel.
    pub fn features(&self) -> &[crate::features::FeatureStatus] {
        &self.probes.features
    }

    pub fn counters(&self) -> Result<KernelCounters> {
        self.probes.counters(&self.probes.program_stats())
    }

    /// The counters, with `programs` already read for other uses (one read
    /// of each program's kernel statistics, not two).
    pub fn counters_given(&self, programs: &[(&'static str, ProgramStats)]) -> Result<KernelCounters> {
        self.probes.counters(programs)
    }

    /// The kernel's flow table; where flows live in socket storage, the
    /// connections this side could not keep count as evicted.
    pub fn flow_table(&self) -> Result<crate::loader::FlowTable> {
        let mut table = self.probes.flow_table()?;
        if let Some(known) = &self.known {
            table.live = known.len() as u64;
            table.lost += known.refused;
        }
        Ok(table)
    }

    /// Up to `limit` live connections that `wanted` keeps.
    pub fn live_flows(&self, limit: usize, wanted: &dyn Fn(&crate::loader::LiveFlow) -> bool) -> Result<Vec<crate::loader::LiveFlow>> {
        match &self.known {
            Some(known) => Ok(known.live(limit, wanted)),
            None => self.probes.live_flows(limit, wanted),
        }
    }

    pub fn packet_histograms(&self) -> Result<netlens_common::PacketHistograms> {
        self.probes.packet_histograms()
    }

    pub fn program_stats(&self) -> Vec<(&'static str, ProgramStats)> {
        self.probes.program_stats()
    }

    pub fn program_errors(&self) -> Result<Vec<(&'static str, u64)>> {
        self.probes.program_errors()
    }

    pub fn drop_reasons(&self) -> Result<Vec<(String, u64)>> {
        self.probes.drop_reasons()
    }
}

/// CLOCK_MONOTONIC, the clock of event timestamps.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
