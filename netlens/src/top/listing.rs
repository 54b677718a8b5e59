//! Keeps the kernel's list of connections fresh for the Connections view,
//! on a thread of its own: the dump enters each watched namespace (setns
//! changes the calling thread) and, on a host with many sockets, takes
//! longer than a frame should wait. The UI loop only takes the newest
//! listing. Only while that view is shown: the kernel walks every socket
//! of the host (TIME_WAIT ones too) for each dump, which was 11–15 % of
//! top's CPU under 10,000 connections a second.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use super::connections::Listing;
use crate::{
    census::{connections, netns, owners},
    filter::Filter,
    source::monotonic_ns,
};

/// How often the dump is retaken.
pub const LISTING_INTERVAL: Duration = Duration::from_secs(2);
/// The walk of /proc/PID/fd for the processes of sockets not seen before is
/// retaken at most this often (it reads every process's descriptors).
const HOLDERS_INTERVAL: Duration = Duration::from_secs(5);
/// How long start-up waits for the first listing, so the first frame has it.
const FIRST_LISTING_WAIT: Duration = Duration::from_secs(2);

/// The newest listing, and the first failure to take one (top shows it
/// in place of rows it cannot list; it cannot print over its screen).
#[derive(Default)]
struct Latest {
    listing: Option<Arc<Listing>>,
    failure: Option<String>,
}

/// The lister thread; it stops when this is dropped.
pub struct Lister {
    latest: Arc<Mutex<Latest>>,
    /// Whether the Connections view is shown: the thread lists only then.
    wanted: Arc<AtomicBool>,
    /// Wakes the thread for a listing now; dropped, it stops the thread.
    wake: mpsc::Sender<()>,
}

impl Lister {
    /// Starts listing the connections that `filter` keeps (`--port`,
    /// `-4`/`-6`, `--netns`, else every namespace; `--pid`/`--comm`: the
    /// sockets their processes hold), at most `cap` of them, while
    /// `wanted` (see [`Self::want`]); waits briefly for the first.
    /// Filtered in the dump, before the cap: on a host with more
    /// connections than the cap, `--port 443` would else show those of the
    /// first `cap` that happen to match. The rows are tested again once
    /// their holders are known (a socket two processes share is the lowest
    /// pid's).
    pub fn start(filter: Filter, cap: usize, wanted: bool) -> Self {
        let latest = Arc::new(Mutex::new(Latest::default()));
        let wanted = Arc::new(AtomicBool::new(wanted));
        let (wake, woken) = mpsc::channel::<()>();
        let (first_tx, first) = mpsc::channel::<()>();
        let (shared, wanted_there) = (latest.clone(), wanted.clone());
        thread::Builder::new()
            .name("netlens-listing".into())
            .spawn(move || run(&filter, cap, &shared, &wanted_there, &woken, first_tx))
            .map(|_| ())
            .unwrap_or_else(|err| latest.lock().unwrap_or_else(|p| p.into_inner()).failure = Some(err.to_string()));
        if wanted.load(Ordering::Relaxed) {
            let _ = first.recv_timeout(FIRST_LISTING_WAIT);
        }
        Self { latest, wanted, wake }
    }

    /// Lists while `wanted`; becoming wanted lists at once.
    pub fn want(&self, wanted: bool) {
        if self.wanted.swap(wanted, Ordering::Relaxed) != wanted && wanted {
            let _ = self.wake.send(());
        }
    }

    /// The newest listing, if one was taken.
    pub fn latest(&self) -> Option<Arc<Listing>> {
        self.latest.lock().unwrap_or_else(|p| p.into_inner()).listing.clone()
    }

    /// The first failure to list connections, once taken.
    pub fn take_failure(&self) -> Option<String> {
        self.latest.lock().unwrap_or_else(|p| p.into_inner()).failure.take()
    }
}

fn run(
    filter: &Filter,
    cap: usize,
    latest: &Mutex<Latest>,
    wanted: &AtomicBool,
    woken: &mpsc::Receiver<()>,
    first: mpsc::Sender<()>,
) {
    let mut holders = Holders::default();
    let mut failed_before = false;
    loop {
        // Disconnected: the Lister was dropped.
        let wait = |timeout| !matches!(woken.recv_timeout(timeout), Err(mpsc::RecvTimeoutError::Disconnected));
        if !wanted.load(Ordering::Relaxed) {
            if !wait(LISTING_INTERVAL) {
                return;
            }
            continue;
        }
        let taken_ns = monotonic_ns();
        // Taken with each dump: the processes' sockets change as they do.
        let held = (filter.pid.is_some() || filter.comm.is_some()).then(|| owners::sockets_held_by(filter.pid, filter.comm.as_deref()));
        let keep = |netns: u32, inode: u32, local: &SocketAddr, remote: &SocketAddr| {
            filter.matches_endpoints(local, remote, netns) && held.as_ref().is_none_or(|held| held.contains(&inode))
        };
        let result = netns::watched(filter.netns).and_then(|namespaces| connections::list(&namespaces, cap, &keep));
        match result {
            Ok(list) => {
                let inodes = list.connections.iter().map(|c| c.inode).filter(|&inode| inode != 0).collect();
                let listing = Listing { list, holders: holders.of(inodes), taken_ns };
                latest.lock().unwrap_or_else(|p| p.into_inner()).listing = Some(Arc::new(listing));
            }
            Err(err) if !failed_before => {
                failed_before = true;
                latest.lock().unwrap_or_else(|p| p.into_inner()).failure = Some(format!("{err:#}"));
            }
            Err(_) => {}
        }
        let _ = first.send(());
        if !wait(LISTING_INTERVAL) {
            return;
        }
    }
}

/// Socket inode → holding process, remembered between listings (a
/// socket's holder rarely changes), looked up for new inodes at most
/// every [`HOLDERS_INTERVAL`].
#[derive(Default)]
struct Holders {
    known: HashMap<u32, Option<owners::Process>>,
    last_walk: Option<Instant>,
}

impl Holders {
    fn of(&mut self, inodes: HashSet<u32>) -> HashMap<u32, owners::Process> {
        // Forget sockets that are gone: inodes are reused.
        self.known.retain(|inode, _| inodes.contains(inode));
        let unknown: HashSet<u32> = inodes.iter().copied().filter(|inode| !self.known.contains_key(inode)).collect();
        let due = self.last_walk.is_none_or(|walked| walked.elapsed() >= HOLDERS_INTERVAL);
        if !unknown.is_empty() && due {
            self.last_walk = Some(Instant::now());
            let mut found = owners::holders(&unknown).found;
            // Held by no process (not yet accepted, or closed by it): not
            // looked for again until the socket is gone.
            for inode in unknown {
                self.known.insert(inode, found.remove(&inode));
            }
        }
        self.known.iter().filter_map(|(inode, holder)| Some((*inode, holder.clone()?))).collect()
    }
}
