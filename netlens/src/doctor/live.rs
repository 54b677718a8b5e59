//! The doctor's findings for views that run indefinitely (the daemon's
//! `netlens_finding_active`, top's findings line): the rules over windows
//! of fixed length. A finding holds while the current window (so far) or
//! the last complete one shows it, so it neither flickers at a window's
//! start nor outlives its cause by more than one window.

use std::time::{Duration, Instant};

use super::{
    evidence::Watch,
    rules::{self, Finding},
};
use crate::{census::Census, event::ConnEvent};

/// The window: long enough for the rates to mean something (churn needs
/// 100 connections, a retry storm 20 failures), short enough to clear a
/// minute after the cause is gone.
pub const WINDOW: Duration = Duration::from_secs(60);

pub struct LiveFindings {
    window: Duration,
    current: Watch,
    started: Instant,
    previous: Vec<Finding>,
    port: Option<u16>,
}

impl LiveFindings {
    /// `port`: the `--port` filter, applied to census destinations too.
    pub fn new(window: Duration, port: Option<u16>) -> Self {
        Self { window, current: Watch::default(), started: Instant::now(), previous: Vec::new(), port }
    }

    pub fn record(&mut self, event: &ConnEvent) {
        self.current.record(event);
    }

    pub fn record_census(&mut self, census: &Census) {
        self.current.record_census(census, self.port);
    }

    /// The findings holding now, most severe first, at most `per_kind` of
    /// each kind (the most severe): kinds × per_kind series at most.
    pub fn active(&mut self, per_kind: usize) -> Vec<Finding> {
        let elapsed = self.started.elapsed();
        if elapsed >= self.window {
            let mut done = std::mem::take(&mut self.current);
            done.finish();
            self.previous = rules::evaluate(done.endpoints.iter(), elapsed.as_secs_f64(), done.time_wait_peak);
            self.started = Instant::now();
        }
        // The window so far, at least a second long so that a rate over
        // its first moments is not inflated.
        let so_far = self.started.elapsed().as_secs_f64().max(1.0);
        let current = rules::evaluate(self.current.endpoints.iter(), so_far, self.current.time_wait_peak);
        merge(current, &self.previous, per_kind)
    }
}

/// `current` and `previous` together: one finding per (kind, endpoint), the
/// more severe (the current on a tie), most severe first, at most
/// `per_kind` per kind.
fn merge(current: Vec<Finding>, previous: &[Finding], per_kind: usize) -> Vec<Finding> {
    let mut all: Vec<Finding> = current;
    for old in previous {
        match all.iter_mut().find(|f| f.finding == old.finding && f.endpoint == old.endpoint) {
            Some(now) if old.severity > now.severity => *now = old.clone(),
            Some(_) => {}
            None => all.push(old.clone()),
        }
    }
    all.sort_by(|a, b| b.severity.cmp(&a.severity).then(b.weight.total_cmp(&a.weight)).then_with(|| a.endpoint.cmp(&b.endpoint)));
    let mut kept: Vec<Finding> = Vec::with_capacity(all.len());
    for finding in all {
        if kept.iter().filter(|f| f.finding == finding.finding).count() < per_kind {
            kept.push(finding);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{sample, Detail, Direction};

    fn overflow(port: u16) -> ConnEvent {
        let mut event = sample(Detail::ListenOverflow { dropped: 3, backlog: 2 });
        event.direction = Some(Direction::Passive);
        event.local.set_port(port);
        event
    }

    #[test]
    fn findings_hold_for_a_window_and_stay_bounded() {
        let mut live = LiveFindings::new(Duration::from_millis(50), None);
        for port in 1..=10 {
            live.record(&overflow(port));
        }
        let now = live.active(4);
        assert_eq!(now.len(), 4, "at most 4 per kind");
        assert!(now.iter().all(|f| f.finding == "accept_overflow"));
        std::thread::sleep(Duration::from_millis(60));
        // The window closed: its findings still hold, for one more window.
        assert_eq!(live.active(4).len(), 4);
        std::thread::sleep(Duration::from_millis(60));
        assert!(live.active(4).is_empty(), "gone a window after the cause");
    }
}
