//! The service behind a connection: its cgroup id turned into the cgroup
//! v2 path and, from that, the systemd unit or container id
//! ([`name::service_name`]).
//!
//! Resolution is lazy and off the event path: the first event of a cgroup
//! asks the resolver thread (which alone touches the filesystem), and that
//! event, with every event behind it so that order is kept, waits in a
//! small queue until the answer arrives: normally by the next drain, at
//! most [`MAX_WAIT`], after which it goes out unattributed. Answers are
//! kept in a bounded cache; a cgroup id is never reused, so an answer
//! (even "gone") stays true.

pub mod cgroupfs;
pub mod name;

use std::{
    collections::VecDeque,
    fmt,
    sync::{
        mpsc::{self, Receiver, SyncSender, TrySendError},
        Arc,
    },
    time::{Duration, Instant},
};

// Looked up per event: foldhash, not std's SipHash.
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

use crate::event::ConnEvent;

/// Cgroups remembered; the oldest answer leaves first.
const CACHE_ENTRIES: usize = 4_096;
/// Lookups waiting for the resolver thread at most.
const PENDING_REQUESTS: usize = 1_024;
/// Events held for an answer at most (whatever the wait).
const HELD_EVENTS: usize = 65_536;
/// How long an event waits for its cgroup's answer.
pub const MAX_WAIT: Duration = Duration::from_millis(200);

/// Where a connection's process lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service {
    /// The cgroup v2 path, below the hierarchy's root (`/system.slice/nginx.service`).
    pub cgroup_path: String,
    /// The systemd unit or container id; `None` when the path names neither.
    pub name: Option<String>,
}

impl Service {
    pub fn from_path(cgroup_path: String) -> Self {
        let name = name::service_name(&cgroup_path);
        Self { cgroup_path, name }
    }
}

impl fmt::Display for Service {
    /// The name, else the cgroup path: what a person recognises.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name.as_deref().unwrap_or(&self.cgroup_path))
    }
}

/// Resolves `id` on the calling thread (the resolver thread's work).
pub type Resolve = Box<dyn FnMut(u64) -> Option<String> + Send>;

/// Gives events their [`Service`]: cache, resolver thread, held events.
pub struct Attribution {
    cache: HashMap<u64, Option<Arc<Service>>>,
    /// Cache insertion order, for eviction.
    order: VecDeque<u64>,
    requested: HashSet<u64>,
    requests: Option<SyncSender<u64>>,
    answers: Receiver<(u64, Option<String>)>,
    held: VecDeque<(Instant, ConnEvent)>,
    /// Events that went out unattributed because their answer was late.
    pub late: u64,
}

impl Attribution {
    /// With the resolver thread reading the cgroup v2 hierarchy; without
    /// one (no cgroup2 mount visible), every event goes out unattributed
    /// at once, and it says so on stderr.
    pub fn start() -> Self {
        match cgroupfs::CgroupFs::find() {
            Some(fs) => Self::with_resolver(Box::new(move |id| fs.path_of(id))),
            None => {
                eprintln!(
                    "netlens: no cgroup v2 hierarchy visible (`ip netns exec` hides it; `nsenter --net` does not): services are not resolved"
                );
                let mut attribution = Self::with_resolver(Box::new(|_| None));
                attribution.requests = None;
                attribution
            }
        }
    }

    /// With `resolve` running on its own thread (tests pass their own).
    pub fn with_resolver(mut resolve: Resolve) -> Self {
        let (requests, inbox) = mpsc::sync_channel::<u64>(PENDING_REQUESTS);
        let (outbox, answers) = mpsc::channel();
        let spawned = std::thread::Builder::new().name("netlens-cgroups".into()).spawn(move || {
            for id in inbox {
                if outbox.send((id, resolve(id))).is_err() {
                    break;
                }
            }
        });
        Self {
            cache: HashMap::new(),
            order: VecDeque::new(),
            requested: HashSet::new(),
            requests: spawned.is_ok().then_some(requests),
            answers,
            held: VecDeque::new(),
            late: 0,
        }
    }

    /// Hands `event` to `sink` with its service, now when its cgroup is
    /// known and nothing waits before it, else later (see [`Self::release`]):
    /// by reference, and copied only to be held (an event is 280 bytes;
    /// the common case passes it on where it was decoded).
    pub fn push(&mut self, event: &mut ConnEvent, sink: &mut impl FnMut(&ConnEvent)) {
        self.take_answers();
        if self.held.is_empty() {
            if let Some(known) = self.known(event.cgroup) {
                event.service = known;
                sink(event);
                return;
            }
        }
        self.request(event.cgroup);
        if self.held.len() >= HELD_EVENTS {
            self.release_front(sink);
        }
        self.held.push_back((Instant::now(), event.clone()));
    }

    /// Hands on the held events whose answer came, or that waited
    /// [`MAX_WAIT`], in order.
    pub fn release(&mut self, sink: &mut impl FnMut(&ConnEvent)) {
        self.take_answers();
        while let Some((since, event)) = self.held.front() {
            let ready = self.known(event.cgroup).is_some() || since.elapsed() >= MAX_WAIT || self.requests.is_none();
            if !ready {
                break;
            }
            self.release_front(sink);
        }
    }

    /// Waits (at most [`MAX_WAIT`]) for the answers held events need, then
    /// hands them all on: at exit.
    pub fn flush(&mut self, sink: &mut impl FnMut(&ConnEvent)) {
        let deadline = Instant::now() + MAX_WAIT;
        while self.held.iter().any(|(_, e)| self.known(e.cgroup).is_none()) {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
            match self.answers.recv_timeout(left) {
                Ok((id, path)) => self.remember(id, path),
                Err(_) => break,
            }
        }
        while !self.held.is_empty() {
            self.release_front(sink);
        }
    }

    fn release_front(&mut self, sink: &mut impl FnMut(&ConnEvent)) {
        let Some((_, mut event)) = self.held.pop_front() else { return };
        match self.known(event.cgroup) {
            Some(known) => event.service = known,
            None => self.late += 1,
        }
        sink(&event);
    }

    /// `Some(answer)` when the cgroup's answer is known (id 0: no cgroup).
    fn known(&self, id: u64) -> Option<Option<Arc<Service>>> {
        if id == 0 {
            return Some(None);
        }
        self.cache.get(&id).cloned()
    }

    fn request(&mut self, id: u64) {
        if id == 0 || self.cache.contains_key(&id) || self.requested.contains(&id) {
            return;
        }
        let Some(requests) = &self.requests else { return };
        match requests.try_send(id) {
            Ok(()) => {
                self.requested.insert(id);
            }
            // Full: this event waits out MAX_WAIT; a later one asks again.
            Err(TrySendError::Full(_)) => {}
            Err(TrySendError::Disconnected(_)) => self.requests = None,
        }
    }

    fn take_answers(&mut self) {
        // Answers come only to requests: per event, this is the whole cost.
        if self.requested.is_empty() {
            return;
        }
        while let Ok((id, path)) = self.answers.try_recv() {
            self.remember(id, path);
        }
    }

    fn remember(&mut self, id: u64, path: Option<String>) {
        self.requested.remove(&id);
        if self.order.len() >= CACHE_ENTRIES {
            if let Some(oldest) = self.order.pop_front() {
                self.cache.remove(&oldest);
            }
        }
        self.order.push_back(id);
        self.cache.insert(id, path.map(|path| Arc::new(Service::from_path(path))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{sample, Detail};

    fn event(cgroup: u64, ts_ns: u64) -> ConnEvent {
        ConnEvent { cgroup, ts_ns, ..sample(Detail::ResetReceived) }
    }

    fn drain(attribution: &mut Attribution, out: &mut Vec<ConnEvent>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !attribution.held.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
            attribution.release(&mut |e| out.push(e.clone()));
        }
    }

    #[test]
    fn events_keep_their_order_and_get_their_service() {
        let paths: std::collections::HashMap<u64, String> =
            [(7, "/system.slice/nginx.service".to_string()), (8, "/".to_string())].into();
        let mut attribution = Attribution::with_resolver(Box::new(move |id| paths.get(&id).cloned()));
        let mut out = Vec::new();
        for (ts, cgroup) in [(1, 7), (2, 0), (3, 8), (4, 7), (5, 99)] {
            attribution.push(&mut event(cgroup, ts), &mut |e| out.push(e.clone()));
        }
        drain(&mut attribution, &mut out);
        assert_eq!(out.iter().map(|e| e.ts_ns).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        let names: Vec<Option<String>> = out.iter().map(|e| e.service.as_ref().map(|s| s.to_string())).collect();
        assert_eq!(names, [Some("nginx.service".into()), None, Some("/".into()), Some("nginx.service".into()), None]);
        assert_eq!(out[2].service.as_ref().unwrap().name, None, "the root cgroup names no unit");
        assert_eq!(attribution.late, 0);
        // Known now: no wait.
        let mut now = Vec::new();
        attribution.push(&mut event(7, 6), &mut |e| now.push(e.clone()));
        assert_eq!(now.len(), 1);
    }

    #[test]
    fn a_slow_resolver_never_holds_events_past_the_wait() {
        let mut attribution = Attribution::with_resolver(Box::new(|_| {
            std::thread::sleep(Duration::from_secs(2));
            Some("/slow.service".into())
        }));
        let mut out = Vec::new();
        attribution.push(&mut event(5, 1), &mut |e| out.push(e.clone()));
        assert!(out.is_empty());
        std::thread::sleep(MAX_WAIT);
        attribution.release(&mut |e| out.push(e.clone()));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].service, None);
        assert_eq!(attribution.late, 1);
    }

    #[test]
    fn the_cache_is_bounded() {
        let mut attribution = Attribution::with_resolver(Box::new(|id| Some(format!("/c{id}"))));
        for id in 1..=(CACHE_ENTRIES as u64 + 10) {
            attribution.remember(id, Some(format!("/c{id}")));
        }
        assert_eq!(attribution.cache.len(), CACHE_ENTRIES);
        assert!(attribution.known(1).is_none() && attribution.known(CACHE_ENTRIES as u64 + 10).is_some());
    }
}
