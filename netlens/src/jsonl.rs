//! `--json` output: one JSON object per line. The field names are part of
//! netlens's interface (documented in README.md); scripts and tests outside
//! this repository read them.

use std::{
    io::{self, Write},
    net::IpAddr,
};

use serde::{Serialize, Serializer};

use crate::event::{state_name, ConnEvent, Detail};

/// An address serialized as text without allocating a String per event.
/// IPv4, nearly every event, is written octet by octet: through
/// `core::fmt`, `Ipv4Addr`'s Display was about an eighth of `trace
/// --json`'s time under churn (perf).
struct IpText(IpAddr);

impl Serialize for IpText {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut buffer = [0u8; 48];
        let len = match self.0 {
            IpAddr::V4(v4) => ipv4_text(v4.octets(), &mut buffer),
            IpAddr::V6(v6) => {
                let mut cursor = io::Cursor::new(&mut buffer[..]);
                // An IPv6 address is at most 45 characters: this cannot fail.
                let _ = write!(cursor, "{v6}");
                cursor.position() as usize
            }
        };
        serializer.serialize_str(std::str::from_utf8(&buffer[..len]).unwrap_or(""))
    }
}

/// Writes `octets` in dotted-decimal (at most 15 bytes) at the start of
/// `out`; returns the length.
fn ipv4_text(octets: [u8; 4], out: &mut [u8; 48]) -> usize {
    let mut len = 0;
    for (i, octet) in octets.into_iter().enumerate() {
        if i > 0 {
            out[len] = b'.';
            len += 1;
        }
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(octet).as_bytes();
        out[len..len + digits.len()].copy_from_slice(digits);
        len += digits.len();
    }
    len
}

/// Fields that exist only for some events are skipped elsewhere; `close`
/// always carries `direction` and `lifetime_us`, `null` when unknown (hence
/// the nested options).
#[derive(Serialize)]
struct JsonEvent<'a> {
    ts_ns: u64,
    event: &'static str,
    family: u8,
    saddr: IpText,
    sport: u16,
    daddr: IpText,
    dport: u16,
    pid: Option<u32>,
    comm: Option<&'a str>,
    netns: u32,
    cgroup: u64,
    /// The cgroup v2 path and the unit or container id in it; `null` when
    /// unknown (`service` also when the path names neither).
    cgroup_path: Option<&'a str>,
    service: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    direction: Option<Option<&'static str>>,
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
    /// `retransmit`: the skb's sequence span and first sequence number.
    #[serde(skip_serializing_if = "Option::is_none")]
    seq_span: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lifetime_us: Option<Option<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_sent: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_received: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retransmits: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spurious_retransmits: Option<u32>,
    // hol_stall, zero_window
    #[serde(skip_serializing_if = "Option::is_none")]
    stall_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_held: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    side: Option<&'static str>,
    // slow_start_exit, close
    #[serde(skip_serializing_if = "Option::is_none")]
    cwnd: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    congestion: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_cwnd: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    slow_start_exit_us: Option<Option<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    srtt_us: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    min_rtt_us: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovery_episodes: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovery_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    loss_episodes: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    loss_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hol_stalls: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hol_stall_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ooo_segments: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    zero_window_us: Option<f64>,
    // accepted, listen_overflow
    #[serde(skip_serializing_if = "Option::is_none")]
    accept_wait_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    queue_len: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backlog: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dropped: Option<u64>,
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
        saddr: IpText(event.local.ip()),
        sport: event.local.port(),
        daddr: IpText(event.remote.ip()),
        dport: event.remote.port(),
        pid: event.pid,
        comm: event.comm.as_deref(),
        netns: event.netns,
        cgroup: event.cgroup,
        cgroup_path: event.service.as_deref().map(|s| s.cgroup_path.as_str()),
        service: event.service.as_deref().and_then(|s| s.name.as_deref()),
        direction: None,
        handshake_us: None,
        reason: None,
        after_us: None,
        state: None,
        segs: None,
        seq_span: None,
        seq: None,
        lifetime_us: None,
        bytes_sent: None,
        bytes_received: None,
        retransmits: None,
        spurious_retransmits: None,
        stall_us: None,
        bytes_held: None,
        side: None,
        cwnd: None,
        congestion: None,
        max_cwnd: None,
        slow_start_exit_us: None,
        srtt_us: None,
        min_rtt_us: None,
        recovery_episodes: None,
        recovery_us: None,
        loss_episodes: None,
        loss_us: None,
        hol_stalls: None,
        hol_stall_us: None,
        ooo_segments: None,
        zero_window_us: None,
        accept_wait_us: None,
        queue_len: None,
        backlog: None,
        dropped: None,
    };
    match &event.detail {
        Detail::Handshake { direction, handshake_ns } => {
            json.direction = Some(Some(direction.as_str()));
            json.handshake_us = Some(micros(*handshake_ns));
        }
        Detail::HandshakeFailed { reason, after_ns } => {
            json.reason = Some(reason.as_str());
            json.after_us = Some(micros(*after_ns));
        }
        Detail::Retransmit { state, segs, bytes, seq } => {
            json.state = Some(state_name(*state));
            json.segs = Some(*segs);
            json.seq_span = Some(*bytes);
            json.seq = Some(*seq);
        }
        Detail::ResetSent { state } if *state != 0 => json.state = Some(state_name(*state)),
        Detail::SynackRetransmit | Detail::ResetSent { .. } | Detail::ResetReceived => {}
        Detail::HolStall { stall_ns, bytes_held, ooo_segments } => {
            json.stall_us = Some(micros(*stall_ns));
            json.bytes_held = Some(*bytes_held);
            json.ooo_segments = Some(*ooo_segments);
        }
        Detail::ZeroWindow { side, stall_ns } => {
            json.side = Some(side.as_str());
            json.stall_us = Some(micros(*stall_ns));
        }
        Detail::SlowStartExit { after_ns, cwnd } => {
            json.after_us = Some(micros(*after_ns));
            json.cwnd = Some(*cwnd);
        }
        Detail::Accepted { wait_ns, queue_len, backlog } => {
            json.accept_wait_us = Some(micros(*wait_ns));
            json.queue_len = Some(*queue_len);
            json.backlog = Some(*backlog);
        }
        Detail::ListenOverflow { dropped, backlog } => {
            json.dropped = Some(*dropped);
            json.backlog = Some(*backlog);
        }
        Detail::Close {
            direction,
            lifetime_ns,
            bytes_sent,
            bytes_received,
            retransmits,
            spurious_retransmits,
            transport,
        } => {
            json.direction = Some(direction.map(|d| d.as_str()));
            json.lifetime_us = Some(lifetime_ns.map(micros));
            json.bytes_sent = Some(*bytes_sent);
            json.bytes_received = Some(*bytes_received);
            json.retransmits = Some(*retransmits);
            json.spurious_retransmits = Some(*spurious_retransmits);
            json.congestion = transport.congestion.as_deref();
            json.cwnd = Some(transport.cwnd);
            json.max_cwnd = Some(transport.max_cwnd);
            json.slow_start_exit_us = Some(transport.slow_start_exit_ns.map(micros));
            json.srtt_us = Some(transport.srtt_us);
            json.min_rtt_us = Some(transport.min_rtt_us);
            json.recovery_episodes = Some(transport.recovery_episodes);
            json.recovery_us = Some(micros(transport.recovery_ns));
            json.loss_episodes = Some(transport.loss_episodes);
            json.loss_us = Some(micros(transport.loss_ns));
            json.hol_stalls = Some(transport.hol_stalls);
            json.hol_stall_us = Some(micros(transport.hol_stall_ns));
            json.ooo_segments = Some(transport.ooo_segments);
            json.zero_window_us = Some(micros(transport.zero_window_ns));
        }
    }
    json
}

/// Writes one event as a JSON line.
pub fn write(out: &mut impl Write, event: &ConnEvent) -> io::Result<()> {
    serde_json::to_writer(&mut *out, &to_json(event))?;
    out.write_all(b"\n")
}

/// The event as a JSON value (tests, and views that embed events).
pub fn to_value(event: &ConnEvent) -> serde_json::Value {
    serde_json::to_value(to_json(event)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{sample as event, Direction};

    #[test]
    fn ipv4_text_matches_std_display() {
        for octets in [[0, 0, 0, 0], [127, 0, 0, 1], [255, 255, 255, 255], [10, 9, 99, 100], [1, 22, 233, 4]] {
            let mut out = [0u8; 48];
            let len = ipv4_text(octets, &mut out);
            assert_eq!(std::str::from_utf8(&out[..len]).unwrap(), std::net::Ipv4Addr::from(octets).to_string());
        }
    }

    #[test]
    fn json_has_the_documented_fields() {
        let line = to_value(&event(Detail::Handshake {
            direction: Direction::Passive,
            handshake_ns: 1_234_567,
        }));
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
        assert!(line["cgroup_path"].is_null() && line["service"].is_null(), "present, null when unresolved");
        assert!(line.get("reason").is_none());
    }

    #[test]
    fn json_names_the_service() {
        let mut e = event(Detail::ResetReceived);
        e.service = Some(std::sync::Arc::new(crate::service::Service::from_path("/system.slice/nginx.service".into())));
        let line = to_value(&e);
        assert_eq!(line["cgroup_path"], "/system.slice/nginx.service");
        assert_eq!(line["service"], "nginx.service");
        e.service = Some(std::sync::Arc::new(crate::service::Service::from_path("/".into())));
        let line = to_value(&e);
        assert_eq!(line["cgroup_path"], "/");
        assert!(line["service"].is_null());
    }

    #[test]
    fn close_json_carries_totals_and_null_lifetime_when_unknown() {
        let line = to_value(&event(Detail::Close {
            direction: None,
            lifetime_ns: None,
            bytes_sent: 10,
            bytes_received: 20,
            retransmits: 3,
            spurious_retransmits: 1,
            transport: crate::event::Dynamics { congestion: crate::event::ShortName::from_bytes(b"bbr"), max_cwnd: 40, ..Default::default() },
        }));
        assert_eq!(line["event"], "close");
        assert!(line["direction"].is_null() && line["lifetime_us"].is_null());
        assert_eq!(line["bytes_received"], 20);
        assert_eq!(line["retransmits"], 3);
        assert_eq!(line["spurious_retransmits"], 1);
        assert_eq!(line["congestion"], "bbr");
        assert_eq!(line["max_cwnd"], 40);
        // Still in slow start at close: null, not absent.
        assert!(line["slow_start_exit_us"].is_null() && line.get("slow_start_exit_us").is_some());
    }


    #[test]
    fn accept_queue_events_have_their_fields() {
        let accepted = to_value(&event(Detail::Accepted { wait_ns: 300_000_000, queue_len: 1, backlog: 128 }));
        assert_eq!(accepted["event"], "accepted");
        assert_eq!(accepted["accept_wait_us"], 300_000.0);
        assert_eq!(accepted["queue_len"], 1);
        assert_eq!(accepted["backlog"], 128);
        let overflow = to_value(&event(Detail::ListenOverflow { dropped: 17, backlog: 2 }));
        assert_eq!(overflow["event"], "listen_overflow");
        assert_eq!(overflow["dropped"], 17);
        assert_eq!(overflow["backlog"], 2);
        assert!(overflow.get("queue_len").is_none());
    }

    #[test]
    fn lines_are_newline_terminated_json() {
        let mut out = Vec::new();
        write(&mut out, &event(Detail::ResetReceived)).unwrap();
        write(&mut out, &event(Detail::SynackRetransmit)).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 2);
        for line in text.lines() {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(value["daddr"], "::1");
        }
    }
}
