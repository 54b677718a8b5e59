//! `netlens doctor`: watches for a while, then says what is wrong, on
//! which endpoint, with the numbers it rests on and what to do about it.
//!
//! evidence (per endpoint, from the events and the socket census) →
//! rules (pure functions, one per finding) → report (text or JSON lines).

pub mod evidence;
pub mod live;
pub mod report;
pub mod rules;

use std::{
    io::{self, Write},
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    census::Census,
    filter::Filter,
    source::{Delivery, EventSource, FlowTableUse},
};
use evidence::Watch;
use report::Watched;

/// `--duration` when none is given.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(30);
/// A socket census this often: TIME_WAIT and ephemeral ports are stock,
/// not events, and their peak is what matters.
const CENSUS_INTERVAL: Duration = Duration::from_secs(2);

pub struct DoctorOptions {
    pub duration: Duration,
    pub json: bool,
    pub filter: Filter,
}

pub async fn run(options: DoctorOptions) -> Result<()> {
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut source = EventSource::start(&options.filter, Delivery::Batched, FlowTableUse::Session)?;
    let started = Instant::now();
    if !options.json {
        eprintln!("netlens: watching for {:.0} s (Ctrl-C ends early)…", options.duration.as_secs_f64());
    }
    let mut watch = Watch::default();
    let deadline = tokio::time::sleep(options.duration);
    tokio::pin!(deadline);
    let mut census = tokio::time::interval(CENSUS_INTERVAL);
    census.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut census_failed = false;
    let mut take_census = |watch: &mut Watch| {
        // Only the census of this process's network namespace; a census
        // failure costs port_exhaustion, said once, not the whole run.
        match Census::take() {
            Ok(census) => watch.record_census(&census, options.filter.port),
            Err(err) if !census_failed => {
                census_failed = true;
                eprintln!("netlens: {err:#}; port_exhaustion rests on failed connects alone (no port census)");
            }
            Err(_) => {}
        }
    };
    loop {
        let stop = tokio::select! {
            ready = source.ready() => { ready?; false }
            _ = census.tick() => { take_census(&mut watch); false }
            _ = sigint.recv() => true,
            _ = sigterm.recv() => true,
            _ = &mut deadline => true,
        };
        source.drain(&options.filter, |event| watch.record(event));
        if stop {
            // Events still waiting for their service, the last second's
            // listen overflows, and a last census.
            source.flush(|event| watch.record(event));
            source.read_overflows(&options.filter, |event| watch.record(event));
            take_census(&mut watch);
            break;
        }
    }
    watch.finish();
    let counters = source.counters().ok();
    drop(source);

    // The watch's own length, not the events' span: a rate is per second
    // watched.
    let window_s = started.elapsed().as_secs_f64().max(0.1);
    let findings = rules::evaluate(watch.endpoints.iter(), window_s, watch.time_wait_peak);
    let watched = Watched {
        seconds: window_s,
        connections: watch.connections,
        bytes: watch.bytes,
        endpoints: watch.endpoints.len(),
    };
    if let Some(counters) = counters {
        if counters.events_lost > 0 || counters.events_missed > 0 {
            eprintln!(
                "netlens: {} events lost and {} missed while watching: the findings rest on fewer events than happened",
                counters.events_lost, counters.events_missed
            );
        }
    }
    if watch.untracked_events > 0 {
        eprintln!(
            "netlens: {} events of endpoints beyond the first {} were not examined",
            watch.untracked_events,
            evidence::MAX_ENDPOINTS
        );
    }
    let mut out = io::stdout().lock();
    let written = if options.json {
        if findings.is_empty() {
            eprintln!("netlens: no findings: watched {}", watched.describe());
        }
        report::write_json(&mut out, &findings)
    } else {
        report::write_text(&mut out, &findings, &watched)
    };
    match written.and_then(|()| out.flush()) {
        // `netlens doctor | head`: the reader left; that is a normal end.
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
