//! A census taken at most once per interval: the daemon's scrapes and
//! top's refreshes both ask more often than the census is worth retaking.

use std::time::{Duration, Instant};

use super::Census;

/// The last socket census, retaken when older than the interval.
pub struct CensusCache {
    interval: Duration,
    last: Option<(Instant, Census)>,
    /// The first failure, until the owner takes it to report (the daemon
    /// logs it; top cannot print over its screen and shows "-").
    failure: Option<String>,
    failed_before: bool,
}

impl CensusCache {
    pub fn new(interval: Duration) -> Self {
        Self { interval, last: None, failure: None, failed_before: false }
    }

    /// Retakes the census if the last one is older than the interval.
    pub fn refresh(&mut self) {
        let stale = self.last.as_ref().is_none_or(|(taken, _)| taken.elapsed() >= self.interval);
        if stale {
            match Census::take() {
                Ok(census) => self.last = Some((Instant::now(), census)),
                Err(err) if !self.failed_before => {
                    self.failure = Some(format!("{err:#}"));
                    self.failed_before = true;
                }
                Err(_) => {}
            }
        }
    }

    /// The newest census taken, if any succeeded.
    pub fn latest(&self) -> Option<&Census> {
        self.last.as_ref().map(|(_, census)| census)
    }

    /// The first failure to take a census, once.
    pub fn take_failure(&mut self) -> Option<String> {
        self.failure.take()
    }
}
