//! `netlens trace`: one line per connection event, as text or JSON lines.

use std::{
    io::{self, BufWriter, Write},
    time::Duration,
};

use anyhow::Result;
use serde::Serialize;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    event::{state_name, ConnEvent, Detail},
    filter::Filter,
    source::EventSource,
};

pub struct TraceOptions {
    pub json: bool,
    pub duration: Option<Duration>,
    pub filter: Filter,
}

pub async fn run(options: TraceOptions) -> Result<()> {
    let mut source = EventSource::start()?;
    let clock = WallClock::now();
    let mut out = BufWriter::with_capacity(64 * 1024, io::stdout().lock());
    if !options.json {
        writeln!(out, "{}", text_header())?;
    }
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let deadline = tokio::time::sleep(options.duration.unwrap_or(Duration::MAX));
    tokio::pin!(deadline);
    let mut lost_reported = 0;
    let mut lost_check = tokio::time::interval(Duration::from_secs(1));
    let mut write_error = None;
    loop {
        let stop = tokio::select! {
            ready = source.ready() => { ready?; false }
            _ = sigint.recv() => true,
            _ = sigterm.recv() => true,
            _ = &mut deadline, if options.duration.is_some() => true,
            _ = lost_check.tick() => {
                lost_reported = report_lost(&source, lost_reported);
                false
            }
        };
        // Drain after a stop signal too: what was seen gets printed.
        source.drain(|event| {
            if write_error.is_none() && options.filter.matches(&event) {
                let written = if options.json {
                    write_json(&mut out, &event)
                } else {
                    writeln!(out, "{}", text_line(&event, &clock))
                };
                write_error = written.err();
            }
        });
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
    report_lost(&source, lost_reported);
    if source.undecodable > 0 {
        eprintln!("netlens: {} events could not be decoded (kernel side newer than this netlens?)", source.undecodable);
    }
    Ok(())
}

/// Says on stderr when the ring buffer overflowed since the last report:
/// lost events are never hidden.
fn report_lost(source: &EventSource, reported: u64) -> u64 {
    match source.counters() {
        Ok(counters) if counters.events_lost > reported => {
            eprintln!(
                "netlens: {} events lost so far: the ring buffer was full (reader too slow)",
                counters.events_lost
            );
            counters.events_lost
        }
        _ => reported,
    }
}

/// One JSON line. Field names are part of netlens's interface.
#[derive(Serialize)]
struct JsonEvent<'a> {
    ts_ns: u64,
    event: &'static str,
    family: u8,
    saddr: String,
    sport: u16,
    daddr: String,
    dport: u16,
    pid: Option<u32>,
    comm: Option<&'a str>,
    netns: u32,
    cgroup: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    direction: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    handshake_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    after_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    segs: Option<u32>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    close: Option<JsonClose>,
}

#[derive(Serialize)]
struct JsonClose {
    direction: Option<&'static str>,
    lifetime_us: Option<f64>,
    bytes_sent: u64,
    bytes_received: u64,
    retransmits: u32,
    spurious_retransmits: u32,
}

/// Nanoseconds as microseconds, keeping sub-µs precision.
fn micros(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn to_json(event: &ConnEvent) -> JsonEvent<'_> {
    let mut json = JsonEvent {
        ts_ns: event.ts_ns,
        event: event.detail.name(),
        family: event.family(),
        saddr: event.local.ip().to_string(),
        sport: event.local.port(),
        daddr: event.remote.ip().to_string(),
        dport: event.remote.port(),
        pid: event.pid,
        comm: event.comm.as_deref(),
        netns: event.netns,
        cgroup: event.cgroup,
        direction: None,
        handshake_us: None,
        reason: None,
        after_us: None,
        state: None,
        segs: None,
        close: None,
    };
    match &event.detail {
        Detail::Handshake { direction, handshake_ns } => {
            json.direction = Some(direction.as_str());
            json.handshake_us = Some(micros(*handshake_ns));
        }
        Detail::HandshakeFailed { reason, after_ns } => {
            json.reason = Some(reason.as_str());
            json.after_us = Some(micros(*after_ns));
        }
        Detail::Retransmit { state, segs } => {
            json.state = Some(state_name(*state));
            json.segs = Some(*segs);
        }
        Detail::ResetSent { state } if *state != 0 => json.state = Some(state_name(*state)),
        Detail::SynackRetransmit | Detail::ResetSent { .. } | Detail::ResetReceived => {}
        Detail::Close { direction, lifetime_ns, bytes_sent, bytes_received, retransmits, spurious_retransmits } => {
            json.close = Some(JsonClose {
                direction: direction.map(|d| d.as_str()),
                lifetime_us: lifetime_ns.map(micros),
                bytes_sent: *bytes_sent,
                bytes_received: *bytes_received,
                retransmits: *retransmits,
                spurious_retransmits: *spurious_retransmits,
            });
        }
    }
    json
}

fn write_json(out: &mut impl Write, event: &ConnEvent) -> io::Result<()> {
    serde_json::to_writer(&mut *out, &to_json(event))?;
    out.write_all(b"\n")
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
        Detail::Retransmit { state, segs } => format!("{} segs={segs}", state_name(*state)),
        Detail::SynackRetransmit => String::new(),
        Detail::ResetSent { state } if *state != 0 => state_name(*state).to_string(),
        Detail::ResetSent { .. } | Detail::ResetReceived => String::new(),
        Detail::Close { direction, lifetime_ns, bytes_sent, bytes_received, retransmits, spurious_retransmits } => {
            format!(
                "{} lifetime={} sent={bytes_sent} received={bytes_received} retrans={retransmits} spurious={spurious_retransmits}",
                direction.map_or("-", |d| d.as_str()),
                lifetime_ns.map_or("-".to_string(), human_duration),
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
    use crate::event::{Direction, FailReason};

    fn event(detail: Detail) -> ConnEvent {
        ConnEvent {
            ts_ns: 5,
            local: "[::1]:8080".parse().unwrap(),
            remote: "[::1]:40000".parse().unwrap(),
            pid: None,
            comm: None,
            netns: 7,
            cgroup: 9,
            detail,
        }
    }

    #[test]
    fn json_has_the_documented_fields() {
        let line = serde_json::to_value(to_json(&event(Detail::Handshake {
            direction: Direction::Passive,
            handshake_ns: 1_234_567,
        })))
        .unwrap();
        assert_eq!(line["event"], "handshake");
        assert_eq!(line["family"], 6);
        assert_eq!(line["saddr"], "::1");
        assert_eq!(line["sport"], 8080);
        assert_eq!(line["dport"], 40000);
        assert_eq!(line["direction"], "passive");
        assert_eq!(line["handshake_us"], 1234.567);
        assert!(line["pid"].is_null() && line["comm"].is_null());
        assert_eq!(line["netns"], 7);
        assert_eq!(line["cgroup"], 9);
        assert!(line.get("reason").is_none());
    }

    #[test]
    fn close_json_carries_totals_and_null_lifetime_when_unknown() {
        let line = serde_json::to_value(to_json(&event(Detail::Close {
            direction: None,
            lifetime_ns: None,
            bytes_sent: 10,
            bytes_received: 20,
            retransmits: 3,
            spurious_retransmits: 1,
        })))
        .unwrap();
        assert_eq!(line["event"], "close");
        assert!(line["direction"].is_null() && line["lifetime_us"].is_null());
        assert_eq!(line["bytes_received"], 20);
        assert_eq!(line["retransmits"], 3);
        assert_eq!(line["spurious_retransmits"], 1);
    }

    #[test]
    fn failed_handshake_names_its_reason() {
        let e = event(Detail::HandshakeFailed { reason: FailReason::Timeout, after_ns: 3_000_000_000 });
        let line = serde_json::to_value(to_json(&e)).unwrap();
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
