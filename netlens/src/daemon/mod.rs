//! `netlens daemon`: attaches everything, aggregates events, and serves
//! Prometheus metrics and a health check over HTTP. Logs go to stderr
//! (journald adds the timestamps), never to stdout.
//!
//! One task owns the kernel side and the aggregator; the HTTP handlers ask
//! it for an exposition over a channel, so nothing is shared or locked.

pub mod config;
pub mod http;
pub mod metrics;
mod proto;

use std::{
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot},
};

use crate::{
    aggregate::Aggregator,
    census::CensusCache,
    doctor::live::{self, LiveFindings},
    filter::Filter,
    lastgood::LastGood,
    loader::KernelCounters,
    source::{monotonic_ns, Delivery, EventSource, FlowTableUse},
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
    let mut source = EventSource::start(&filter, Delivery::Batched, FlowTableUse::Service)?;
    let (scrapes, mut scrape_requests) = mpsc::channel::<Scrape>(16);
    let last_drain = Arc::new(http::LastDrain::now());
    let server = tokio::spawn(http::serve(listener, scrapes, last_drain.clone()));
    eprintln!("netlens: serving http://{}/metrics", config.listen);

    let mut aggregator = Aggregator::new(config.by, config.top_k);
    let mut exporter = Exporter::new(&config);
    let mut findings = LiveFindings::new(live::WINDOW, filter.port);
    let mut epoch = tokio::time::interval_at(tokio::time::Instant::now() + config.endpoint_epoch, config.endpoint_epoch);
    loop {
        let scrape = tokio::select! {
            ready = source.ready() => { ready?; None }
            Some(reply) = scrape_requests.recv() => Some(reply),
            _ = epoch.tick() => { aggregator.end_epoch(); None }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        };
        // Whatever woke us, take what the kernel sent so far: a scrape
        // includes everything up to its arrival.
        source.drain(&filter, |event| {
            aggregator.record(event);
            findings.record(event);
        });
        last_drain.0.store(monotonic_ns(), Ordering::Relaxed);
        if let Some(reply) = scrape {
            let _ = reply.send(exporter.render(&source, &aggregator, &mut findings));
        }
    }
    // Stop serving, then detach (dropping the source detaches every program).
    server.abort();
    drop(source);
    eprintln!("netlens: stopped");
    Ok(())
}

/// What a scrape needs besides the aggregator: the census, the flows the
/// table lost, exported as `netlens_flow_table_evictions_total` (a walk of
/// every key, so at most every FLOW_TABLE_INTERVAL) and
/// the process's own metrics.
struct Exporter {
    census: CensusCache,
    evictions: LastGood<u64>,
    evictions_read: Option<Instant>,
    /// Kernel map reads: a failed read exports the last good value (a 0
    /// would be a counter reset to Prometheus) and is counted.
    counters: LastGood<KernelCounters>,
    packets: LastGood<Option<netlens_common::PacketHistograms>>,
    program_errors: LastGood<Vec<(&'static str, u64)>>,
    drops: LastGood<Vec<(String, u64)>>,
    process: prometheus::process_collector::ProcessCollector,
    top_k: usize,
}

impl Exporter {
    fn new(config: &DaemonConfig) -> Self {
        Self {
            census: CensusCache::new(config.census_interval),
            evictions: LastGood::default(),
            evictions_read: None,
            counters: LastGood::default(),
            packets: LastGood::default(),
            program_errors: LastGood::default(),
            drops: LastGood::default(),
            process: prometheus::process_collector::ProcessCollector::for_self(),
            top_k: config.top_k,
        }
    }

    /// The text exposition of everything, now.
    fn render(&mut self, source: &EventSource, aggregator: &Aggregator, findings: &mut LiveFindings) -> String {
        if self.evictions_read.is_none_or(|read| read.elapsed() >= FLOW_TABLE_INTERVAL) {
            // A `_total` never goes down: the walk's bound can run ahead
            // of a later one's while connections churn (see flow_table).
            let reported = *self.evictions.value();
            self.evictions.update(source.flow_table().map(|table| table.lost.max(reported)));
            self.evictions_read = Some(Instant::now());
        }
        self.census.refresh();
        if let Some(failure) = self.census.take_failure() {
            eprintln!("netlens: {failure}; socket gauges are left out");
        }
        if let Some(census) = self.census.latest() {
            findings.record_census(census);
        }
        // Bounded: at most top_k endpoints per kind.
        let active = findings.active(self.top_k);
        let programs = source.program_stats();
        self.counters.update(source.counters_given(&programs));
        self.packets.update(source.packet_histograms().map(Some));
        self.program_errors.update(source.program_errors());
        self.drops.update(source.drop_reasons());
        let map_read_failures = self.counters.failures()
            + self.packets.failures()
            + self.program_errors.failures()
            + self.drops.failures()
            + self.evictions.failures();
        let inputs = metrics::Inputs {
            findings: &active,
            aggregator,
            census: self.census.latest(),
            counters: *self.counters.value(),
            flow_table_evictions: *self.evictions.value(),
            programs: &programs,
            bpf_stats_enabled: bpf_stats_enabled(),
            packets: *self.packets.value(),
            top_k: self.top_k,
            now_ns: monotonic_ns(),
            features: source.features(),
            program_errors: self.program_errors.value(),
            drops: self.drops.value(),
            map_read_failures,
        };
        let mut families = metrics::families(&inputs);
        // process_cpu_seconds_total, process_resident_memory_bytes, …: what
        // netlens itself costs, named as every exporter names it.
        families.extend(prometheus::core::Collector::collect(&self.process));
        prometheus::TextEncoder::new().encode_to_string(&families).unwrap_or_else(|err| {
            eprintln!("netlens: encoding the metrics failed: {err}");
            String::new()
        })
    }
}

fn bpf_stats_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|text| text.trim() == "1")
}
