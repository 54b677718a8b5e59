//! `netlens trace`: one line per connection event, as text or JSON lines.

use std::{
    io::{self, BufWriter, Write},
    time::Duration,
};

use anyhow::Result;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    event::{state_name, ConnEvent, Detail},
    filter::Filter,
    jsonl,
    source::{monotonic_ns, Delivery, EventSource, FlowTableUse},
    trace_drops::{self, DropWatch},
};

pub struct TraceOptions {
    pub json: bool,
    pub duration: Option<Duration>,
    /// Print `drop` lines (see trace_drops.rs).
    pub drops: bool,
    pub filter: Filter,
}

pub async fn run(options: TraceOptions) -> Result<()> {
    // Signals first, as the other commands do: a Ctrl-C right after the
    // `attached` line (or during start-up) then stops the trace cleanly,
    // with what was seen printed and the losses reported, instead of
    // killing the process.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut source = EventSource::start(&options.filter, Delivery::Prompt, FlowTableUse::Session)?;
    let clock = WallClock::now();
    let mut out = BufWriter::with_capacity(64 * 1024, io::stdout().lock());
    let mut json_line = Vec::with_capacity(1024);
    if !options.json {
        writeln!(out, "{}", text_header())?;
    }
    let deadline = tokio::time::sleep(options.duration.unwrap_or(Duration::MAX));
    tokio::pin!(deadline);
    let mut reported = Reported::default();
    let mut drops = options.drops.then(|| drop_watch(&source)).flatten();
    let mut lost_check = tokio::time::interval(Duration::from_secs(1));
    let mut write_error = None;
    loop {
        let stop = tokio::select! {
            ready = source.ready() => { ready?; false }
            _ = sigint.recv() => true,
            _ = sigterm.recv() => true,
            _ = &mut deadline, if options.duration.is_some() => true,
            _ = lost_check.tick() => {
                report_losses(&source, &mut reported);
                if let Some(watch) = drops.as_mut() {
                    write_error = write_error.or(write_drops(&mut out, &source, watch, options.json, &clock).err());
                }
                false
            }
        };
        // Drain after a stop signal too: what was seen gets printed, and
        // the listen overflows of the last second.
        let mut print = |event: &ConnEvent| {
            if write_error.is_none() {
                let written = if options.json {
                    jsonl::write(&mut out, &mut json_line, event)
                } else {
                    writeln!(out, "{}", text_line(event, &clock))
                };
                write_error = written.err();
            }
        };
        source.drain(&options.filter, &mut print);
        if stop {
            source.flush(&mut print);
            source.read_overflows(&options.filter, &mut print);
            if let Some(watch) = drops.as_mut() {
                write_error = write_error.or(write_drops(&mut out, &source, watch, options.json, &clock).err());
            }
        }
        if let Some(err) = write_error.take() {
            // `netlens trace | head`: the reader left; that is a normal end.
            if err.kind() == io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(err.into());
        }
        if let Err(err) = out.flush() {
            if err.kind() == io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(err.into());
        }
        if stop {
            break;
        }
    }
    report_losses(&source, &mut reported);
    report_costs(&source);
    if source.unattributed() > 0 {
        eprintln!("netlens: {} events went out without their service: resolving their cgroup took too long", source.unattributed());
    }
    if source.undecodable > 0 {
        eprintln!("netlens: {} events could not be decoded (kernel side newer than this netlens?)", source.undecodable);
    }
    Ok(())
}

/// `--drops` where the kernel counts drops by reason; else one line says why not.
fn drop_watch(source: &EventSource) -> Option<DropWatch> {
    let feature = source.features().iter().find(|f| f.feature.name == "drop_reasons");
    match feature {
        Some(f) if f.level != crate::features::Level::Missing => Some(DropWatch::default()),
        Some(f) => {
            eprintln!("netlens: --drops: no drop lines on this kernel: {}", f.why);
            None
        }
        None => None,
    }
}

/// The drops that grew since the last call, a line per reason.
fn write_drops(out: &mut impl Write, source: &EventSource, watch: &mut DropWatch, json: bool, clock: &WallClock) -> io::Result<()> {
    // A failed read is retried at the next tick: the counts are cumulative.
    let Ok(counts) = source.drop_reasons() else { return Ok(()) };
    for line in watch.grown(&counts, monotonic_ns()) {
        if json {
            trace_drops::write_json(out, &line)?;
        } else {
            writeln!(
                out,
                "{:<15} {:<17} {:>7} {:<15} {:<40} {:<40} {} packets={}",
                clock.format(line.ts_ns),
                line.event,
                "-",
                "-",
                "-",
                "-",
                line.reason,
                line.packets
            )?;
        }
    }
    Ok(())
}

/// At exit: failures inside the programs, flows the table lost, and, when
/// `kernel.bpf_stats_enabled` is on, what each program cost per run.
fn report_costs(source: &EventSource) {
    match source.program_errors() {
        Ok(errors) => {
            for (program, count) in errors.into_iter().filter(|(_, count)| *count > 0) {
                eprintln!("netlens: program {program}: {count} runs failed part way (what they saw is missing)");
            }
        }
        Err(err) => eprintln!("netlens: reading the programs' error counts failed: {err}"),
    }
    if let Ok(table) = source.flow_table() {
        if table.lost > 0 {
            eprintln!("netlens: the flow table lost {} connections (refused when full, or their close unseen): their close events lack lifetime and direction", table.lost);
        }
        if table.swept > 0 {
            eprintln!("netlens: {} closed flows swept out of the flow table (no new socket took their addresses)", table.swept);
        }
    }
    for (program, stats) in source.program_stats() {
        if stats.run_count > 0 && stats.run_time_ns > 0 {
            eprintln!(
                "netlens: program {program}: {} runs, {:.0} ns/run",
                stats.run_count,
                stats.run_time_ns as f64 / stats.run_count as f64
            );
        }
    }
}

/// What has been said on stderr about losses so far.
#[derive(Default)]
struct Reported {
    lost: u64,
    missed: u64,
    counts_missed: u64,
    retransmits_unseen: u64,
}

/// Says on stderr when events were lost since the last report: lost events
/// are never hidden.
fn report_losses(source: &EventSource, reported: &mut Reported) {
    let Ok(counters) = source.counters() else { return };
    if counters.events_lost > reported.lost {
        eprintln!("netlens: {} events lost so far: the ring buffer was full (reader too slow)", counters.events_lost);
        reported.lost = counters.events_lost;
    }
    if counters.events_missed > reported.missed {
        eprintln!(
            "netlens: {} events missed so far: the kernel skipped a program already running on that CPU",
            counters.events_missed
        );
        reported.missed = counters.events_missed;
    }
    if counters.counts_missed > reported.counts_missed {
        eprintln!(
            "netlens: {} runs of counting programs skipped so far (already running on that CPU): drop and listen-overflow counts may be short",
            counters.counts_missed
        );
        reported.counts_missed = counters.counts_missed;
    }
    if counters.retransmits_unseen > reported.retransmits_unseen {
        eprintln!(
            "netlens: {} retransmissions so far had no retransmit event, only their connection's total at close: the kernel skipped the hook or failed to send them",
            counters.retransmits_unseen
        );
        reported.retransmits_unseen = counters.retransmits_unseen;
    }
}

fn text_header() -> String {
    format!(
        "{:<15} {:<17} {:>7} {:<15} {:<40} {:<40} {}",
        "TIME", "EVENT", "PID", "COMM", "LOCAL", "REMOTE", "DETAIL"
    )
}

fn text_line(event: &ConnEvent, clock: &WallClock) -> String {
    let detail = match &event.detail {
        Detail::Handshake { direction, handshake_ns } => {
            format!("{} {}", direction.as_str(), human_duration(*handshake_ns))
        }
        Detail::HandshakeFailed { reason, after_ns } => {
            format!("{} after {}", reason.as_str(), human_duration(*after_ns))
        }
        Detail::Retransmit { state, segs, bytes, .. } => format!("{} segs={segs} bytes={bytes}", state_name(*state)),
        Detail::SynackRetransmit => String::new(),
        Detail::ResetSent { state } if *state != 0 => state_name(*state).to_string(),
        Detail::ResetSent { .. } | Detail::ResetReceived => String::new(),
        Detail::HolStall { stall_ns, bytes_held, ooo_segments } => {
            format!("{} held={bytes_held}B ooo_segs={ooo_segments}", human_duration(*stall_ns))
        }
        Detail::ZeroWindow { side, stall_ns } => format!("{} {}", side.as_str(), human_duration(*stall_ns)),
        Detail::SlowStartExit { after_ns, cwnd } => format!("after {} cwnd={cwnd}", human_duration(*after_ns)),
        Detail::Accepted { wait_ns, queue_len, backlog } => {
            format!("waited {} queue={queue_len}/{backlog}", human_duration(*wait_ns))
        }
        Detail::ListenOverflow { dropped, backlog } => format!("dropped={dropped} backlog={backlog}"),
        Detail::Close {
            direction,
            lifetime_ns,
            bytes_sent,
            bytes_received,
            retransmits,
            spurious_retransmits,
            transport,
        } => {
            format!(
                "{} lifetime={} sent={bytes_sent} received={bytes_received} retrans={retransmits} spurious={spurious_retransmits} {} max_cwnd={} ss_exit={} srtt={}µs hol={}x/{}",
                direction.map_or("-", |d| d.as_str()),
                lifetime_ns.map_or("-".to_string(), human_duration),
                transport.congestion.as_deref().unwrap_or("-"),
                transport.max_cwnd,
                transport.slow_start_exit_ns.map_or("never".to_string(), human_duration),
                transport.srtt_us,
                transport.hol_stalls,
                human_duration(transport.hol_stall_ns),
            )
        }
    };
    format!(
        "{:<15} {:<17} {:>7} {:<15} {:<40} {:<40} {}",
        clock.format(event.ts_ns),
        event.detail.name(),
        event.pid.map_or("-".to_string(), |p| p.to_string()),
        event.comm.as_deref().unwrap_or("-"),
        event.local.to_string(),
        event.remote.to_string(),
        detail
    )
}

/// "812µs", "12.3ms", "1.02s".
pub fn human_duration(ns: u64) -> String {
    match ns {
        0..=999_999 => format!("{:.0}µs", ns as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.2}ms", ns as f64 / 1e6),
        _ => format!("{:.3}s", ns as f64 / 1e9),
    }
}

/// Turns CLOCK_MONOTONIC stamps into local wall-clock time of day.
struct WallClock {
    realtime_minus_monotonic_ns: i128,
}

impl WallClock {
    fn now() -> Self {
        let read = |clock| {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: valid pointer to a timespec.
            unsafe { libc::clock_gettime(clock, &mut ts) };
            ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
        };
        Self { realtime_minus_monotonic_ns: read(libc::CLOCK_REALTIME) - read(libc::CLOCK_MONOTONIC) }
    }

    fn format(&self, monotonic_ns: u64) -> String {
        let wall_ns = monotonic_ns as i128 + self.realtime_minus_monotonic_ns;
        let secs = (wall_ns / 1_000_000_000) as libc::time_t;
        let micros = (wall_ns % 1_000_000_000) / 1000;
        // SAFETY: localtime_r writes into our zeroed struct.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        unsafe { libc::localtime_r(&secs, &mut tm) };
        format!("{:02}:{:02}:{:02}.{:06}", tm.tm_hour, tm.tm_min, tm.tm_sec, micros)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{sample as event, FailReason};


    #[test]
    fn failed_handshake_names_its_reason() {
        let e = event(Detail::HandshakeFailed { reason: FailReason::Timeout, after_ns: 3_000_000_000 });
        let line = crate::jsonl::to_value(&e);
        assert_eq!(line["reason"], "timeout");
        assert!(text_line(&e, &WallClock::now()).contains("timeout after 3.000s"));
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(812_000), "812µs");
        assert_eq!(human_duration(12_300_000), "12.30ms");
        assert_eq!(human_duration(1_020_000_000), "1.020s");
    }
}
