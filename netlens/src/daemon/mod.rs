//! `netlens daemon`: attaches everything, aggregates events, and serves
//! Prometheus metrics and a health check over HTTP. Logs go to stderr
//! (journald adds the timestamps), never to stdout.
//!
//! One task owns the kernel side and the aggregator; the HTTP handlers ask
//! it for an exposition over a channel, so nothing is shared or locked.

pub mod config;
pub mod http;
pub mod metrics;

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot},
};

use crate::{
    aggregate::Aggregator,
    census::Census,
    filter::Filter,
    source::{monotonic_ns, EventSource},
};
use config::DaemonConfig;

/// The flow-table walk (for evictions) reads every key: not every scrape.
const FLOW_TABLE_INTERVAL: Duration = Duration::from_secs(30);

/// A scrape waiting for its exposition text.
pub type Scrape = oneshot::Sender<String>;

pub async fn run(config: DaemonConfig, filter: Filter) -> Result<()> {
    // Signals first: a SIGTERM during start-up still means a clean exit.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    // Bind first: a taken port is a configuration error, found before the
    // programs are loaded.
    let listener = tokio::net::TcpListener::bind(config.listen).await.with_context(|| {
        format!("cannot listen on {}; pick another address with --listen", config.listen)
    })?;
    if !config.listen.ip().is_loopback() {
        eprintln!("netlens: serving metrics on {}, reachable from other hosts (--listen)", config.listen);
    }
    let mut source = EventSource::start()?;
    let (scrapes, mut scrape_requests) = mpsc::channel::<Scrape>(16);
    let server = tokio::spawn(http::serve(listener, scrapes));
    eprintln!("netlens: serving http://{}/metrics", config.listen);

    let mut aggregator = Aggregator::new(config.by, config.top_k);
    let process = prometheus::process_collector::ProcessCollector::for_self();
    let mut census = CensusCache::new(config.census_interval);
    let mut evictions = (0u64, Instant::now() - FLOW_TABLE_INTERVAL);
    let mut epoch = tokio::time::interval_at(tokio::time::Instant::now() + config.endpoint_epoch, config.endpoint_epoch);
    loop {
        tokio::select! {
            ready = source.ready() => ready?,
            Some(reply) = scrape_requests.recv() => {
                // What the kernel sent up to now is in the scrape.
                source.drain(|event| if filter.matches(&event) { aggregator.record(&event) });
                if evictions.1.elapsed() >= FLOW_TABLE_INTERVAL {
                    evictions = (source.flow_table().map(|table| table.evictions).unwrap_or(evictions.0), Instant::now());
                }
                let programs = source.program_stats();
                let inputs = metrics::Inputs {
                    aggregator: &aggregator,
                    census: census.get(),
                    counters: source.counters().unwrap_or_default(),
                    flow_table_evictions: evictions.0,
                    programs: &programs,
                    bpf_stats_enabled: bpf_stats_enabled(),
                    packets: source.packet_histograms().ok(),
                    top_k: config.top_k,
                    now_ns: monotonic_ns(),
                };
                let mut families = metrics::families(&inputs);
                // process_cpu_seconds_total, process_resident_memory_bytes, …:
                // what netlens itself costs, named as every exporter names it.
                families.extend(prometheus::core::Collector::collect(&process));
                let text = prometheus::TextEncoder::new().encode_to_string(&families);
                let _ = reply.send(text.unwrap_or_else(|err| {
                    eprintln!("netlens: encoding the metrics failed: {err}");
                    String::new()
                }));
                continue;
            }
            _ = epoch.tick() => aggregator.end_epoch(),
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
        source.drain(|event| {
            if filter.matches(&event) {
                aggregator.record(&event);
            }
        });
    }
    // Stop serving, then detach (dropping the source detaches every program).
    server.abort();
    drop(source);
    eprintln!("netlens: stopped");
    Ok(())
}

/// The last socket census, retaken when older than the interval.
struct CensusCache {
    interval: Duration,
    last: Option<(Instant, Census)>,
    warned: bool,
}

impl CensusCache {
    fn new(interval: Duration) -> Self {
        Self { interval, last: None, warned: false }
    }

    fn get(&mut self) -> Option<&Census> {
        let stale = self.last.as_ref().is_none_or(|(taken, _)| taken.elapsed() >= self.interval);
        if stale {
            match Census::take() {
                Ok(census) => self.last = Some((Instant::now(), census)),
                Err(err) if !self.warned => {
                    eprintln!("netlens: {err:#}; socket gauges are left out");
                    self.warned = true;
                }
                Err(_) => {}
            }
        }
        self.last.as_ref().map(|(_, census)| census)
    }
}

fn bpf_stats_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|text| text.trim() == "1")
}
