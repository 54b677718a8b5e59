//! The run loops of `netlens top`: the full-screen TUI, and batch mode
//! (`--batch`), which prints snapshots like `top -b`.

use std::{
    io::Write,
    time::{Duration, Instant},
};

use anyhow::Result;
use crossterm::event::{Event, KeyEventKind};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use super::{
    app::{App, Control},
    batch, connections,
    feed::{Extras, Feed},
    listing::Lister,
    terminal::{self, TerminalGuard},
    view::{View, ViewSettings},
};
use crate::{
    census::CensusCache,
    filter::Filter,
    lastgood::LastGood,
    loader::KernelCounters,
    source::{monotonic_ns, Delivery, EventSource, FlowTableUse},
};

/// Connections shown at most (listed from the kernel, and the flow table
/// holds 16,384 or more).
const MAX_CONNECTIONS: usize = 2_000;
/// The TIME_WAIT census is retaken at most this often.
const CENSUS_INTERVAL: Duration = Duration::from_secs(5);
/// Endpoints idle this long give their row to a busier one.
const EPOCH: Duration = Duration::from_secs(30);

pub struct TopOptions {
    pub delay: Duration,
    pub batch: bool,
    pub json: bool,
    pub iterations: Option<u64>,
    pub settings: ViewSettings,
    pub filter: Filter,
}

/// The kernel side plus the feed: one refresh's worth of work.
struct Collector {
    source: EventSource,
    feed: Feed,
    filter: Filter,
    census: CensusCache,
    /// Every connection of the watched namespaces, listed on its own thread.
    listing: Lister,
    last_epoch: Instant,
    /// Kernel counters: the last good read (a failed one is no reset).
    counters: LastGood<KernelCounters>,
    bpf_errors: LastGood<u64>,
    /// TCP drops by reason (empty where the kernel has no reasons).
    drops: LastGood<Option<Vec<(String, u64)>>>,
}

impl Collector {
    fn drain(&mut self) {
        let feed = &mut self.feed;
        self.source.drain(&self.filter, |event| feed.record(event));
    }

    fn snapshot(&mut self) -> super::model::Snapshot {
        self.drain();
        if self.last_epoch.elapsed() >= EPOCH {
            self.feed.end_epoch();
            self.last_epoch = Instant::now();
        }
        self.census.refresh();
        // A failed census shows as "-"; top cannot print over its screen.
        let _ = self.census.take_failure();
        if let Some(census) = self.census.latest() {
            self.feed.findings.record_census(census);
        }
        let listing = self.listing.latest();
        let flows = self.source.live_flows(MAX_CONNECTIONS, &connections::wanted(listing.as_deref(), &self.filter)).unwrap_or_default();
        // A failed listing leaves the flow table's rows; top cannot print
        // over its screen.
        let _ = self.listing.take_failure();
        let now_ns = monotonic_ns();
        let (mut connections, connections_total) = connections::merge(listing.as_deref(), &flows, now_ns, MAX_CONNECTIONS);
        let filter = &self.filter;
        connections.retain(|row| filter.matches_connection(&row.local, &row.remote, row.pid, row.comm.as_deref(), row.netns));
        let counters = self.counters.update(self.source.counters());
        let bpf_errors = self.bpf_errors.update(self.source.program_errors().map(|errors| errors.iter().map(|(_, n)| n).sum()));
        self.feed.snapshot(Extras {
            connections,
            connections_total,
            time_wait: self.census.latest().map(|census| census.count("time_wait")),
            events_lost: counters.events_lost + counters.events_missed,
            bpf_errors,
            drops: self.drops.update(self.source.drop_reasons().map(Some)).filter(|drops| !drops.is_empty()),
            now_ns,
        })
    }
}

/// The full-screen view reads keys from stdin and draws on stdout: both
/// must be a terminal. Checked before anything is attached, so a pipe or a
/// cron job gets one line instead of attached programs and escape codes.
pub fn require_terminal(options: &TopOptions) -> Result<()> {
    use std::io::IsTerminal;
    if options.batch || options.json || (std::io::stdout().is_terminal() && std::io::stdin().is_terminal()) {
        return Ok(());
    }
    anyhow::bail!("top needs a terminal on stdin and stdout; use `netlens top --batch` (or `--json`) to print snapshots")
}

pub async fn run(options: TopOptions) -> Result<()> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let source = EventSource::start(&options.filter, Delivery::Batched, FlowTableUse::Session)?;
    let mut collector = Collector {
        source,
        feed: Feed::for_port(options.filter.port),
        filter: options.filter.clone(),
        census: CensusCache::new(CENSUS_INTERVAL),
        listing: Lister::start(options.filter.clone(), MAX_CONNECTIONS, options.settings.view == View::Connections),
        last_epoch: Instant::now(),
        counters: LastGood::default(),
        bpf_errors: LastGood::default(),
        drops: LastGood::default(),
    };
    if options.batch || options.json {
        return run_batch(&mut collector, &options, &mut sigterm, &mut sigint).await;
    }

    terminal::install_panic_hook();
    let mut screen = TerminalGuard::new()?;
    let mut app = App::new(options.settings);
    // Keys come from a blocking reader thread; it ends with the process.
    let (keys_tx, mut keys) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        while let Ok(event) = crossterm::event::read() {
            if keys_tx.send(event).is_err() {
                break;
            }
        }
    });
    // The first frame at once (empty rates), then every `delay`.
    app.update(collector.snapshot());
    screen.draw(|frame| app.draw(frame))?;
    let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + options.delay, options.delay);
    loop {
        tokio::select! {
            ready = collector.source.ready() => { ready?; collector.drain(); continue; }
            _ = refresh.tick() => app.update(collector.snapshot()),
            Some(event) = keys.recv() => match event {
                Event::Key(key) if key.kind != KeyEventKind::Release => {
                    if app.handle_key(key) == Control::Quit {
                        break;
                    }
                    // Switched to the Connections view: listed by the next frame.
                    collector.listing.want(app.settings.view == View::Connections);
                }
                Event::Resize(..) => {}
                _ => continue,
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
        screen.draw(|frame| app.draw(frame))?;
    }
    drop(screen);
    Ok(())
}

async fn run_batch(
    collector: &mut Collector,
    options: &TopOptions,
    sigterm: &mut tokio::signal::unix::Signal,
    sigint: &mut tokio::signal::unix::Signal,
) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + options.delay, options.delay);
    let mut printed = 0u64;
    while options.iterations.is_none_or(|limit| printed < limit) {
        tokio::select! {
            ready = collector.source.ready() => { ready?; collector.drain(); continue; }
            _ = refresh.tick() => {}
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
        let snapshot = collector.snapshot();
        let text = if options.json {
            batch::batch_json(&options.settings, &snapshot) + "\n"
        } else {
            // A blank line between snapshots, as top -b does.
            let separator = if printed > 0 { "\n" } else { "" };
            format!("{separator}{}", batch::batch_text(&options.settings, &snapshot, 0))
        };
        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(err) => return Err(err.into()),
        }
        printed += 1;
    }
    Ok(())
}
