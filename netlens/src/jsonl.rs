//! `--json` output: one JSON object per line. The field names are part of
//! netlens's interface (documented in README.md); scripts and tests outside
//! this repository read them.

use std::{
    io::{self, Write},
    net::IpAddr,
};

use serde::Serialize;

use crate::event::{state_name, ConnEvent, Detail};

/// One event's JSON object, written into a buffer the caller reuses. Keys
/// are this module's own identifiers (ASCII letters and `_`, nothing to
/// escape) and go out as they are, as do netlens's own names (event kinds,
/// states); strings from outside (a process's comm, a cgroup path) go
/// through serde_json, which escapes them; integers through itoa.
/// Under churn, a derived `Serialize` of the whole event spent about 0.9 µs
/// an event (perf: its key escaping and small writes into the `BufWriter`
/// were three quarters of `trace --json`'s time).
struct Object<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> Object<'a> {
    fn start(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Self { out, empty: true }
    }

    /// `"key":`, after a comma unless it is the first field. Inlined, as
    /// are the writers below: each key's length is then a constant at its
    /// call site, and its copy a few stores instead of a call to memcpy.
    #[inline(always)]
    fn key(&mut self, key: &str) {
        if !std::mem::take(&mut self.empty) {
            self.out.push(b',');
        }
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    /// A field whose value serde_json writes: numbers, strings, `null` for
    /// `None`.
    #[inline(always)]
    fn field<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) {
        self.key(key);
        // Writing into a Vec cannot fail, nor can serializing numbers,
        // strings and options of them.
        let _ = serde_json::to_writer(&mut *self.out, value);
    }

    /// An integer, through itoa (what serde_json would call, without its
    /// serializer around it).
    #[inline(always)]
    fn integer<I: itoa::Integer>(&mut self, key: &str, value: I) {
        self.key(key);
        self.out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    /// `"key":null`.
    #[inline(always)]
    fn null(&mut self, key: &str) {
        self.key(key);
        self.out.extend_from_slice(b"null");
    }

    /// [`Self::micros`], or `null`.
    #[inline(always)]
    fn optional_micros(&mut self, key: &str, ns: Option<u64>) {
        match ns {
            Some(ns) => self.micros(key, ns),
            None => self.null(key),
        }
    }

    /// [`Self::name`], or `null`.
    #[inline(always)]
    fn optional_name(&mut self, key: &str, name: Option<&'static str>) {
        match name {
            Some(name) => self.name(key, name),
            None => self.null(key),
        }
    }

    /// A string from netlens's own vocabulary (an event kind, a direction,
    /// a TCP state): ASCII letters, digits and `_`, nothing to escape,
    /// so it goes out as it is, without serde_json's escaping pass.
    #[inline(always)]
    fn name(&mut self, key: &str, name: &'static str) {
        debug_assert!(is_plain_name(name), "{name:?} needs escaping");
        self.key(key);
        self.out.push(b'"');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'"');
    }

    /// Microseconds from nanoseconds, keeping sub-µs precision: the same
    /// text serde_json writes for `ns as f64 / 1000.0` (see [`micros_text`]).
    #[inline(always)]
    fn micros(&mut self, key: &str, ns: u64) {
        self.key(key);
        micros_text(ns, self.out);
    }

    /// An address as text. IPv4, nearly every event, is written octet by
    /// octet: through `core::fmt`, `Ipv4Addr`'s Display was about an
    /// eighth of `trace --json`'s time under churn (perf).
    #[inline(always)]
    fn ip(&mut self, key: &str, ip: IpAddr) {
        self.key(key);
        self.out.push(b'"');
        match ip {
            IpAddr::V4(v4) => ipv4_text(v4.octets(), self.out),
            // Writing into a Vec cannot fail.
            IpAddr::V6(v6) => drop(write!(self.out, "{v6}")),
        }
        self.out.push(b'"');
    }

    fn end(self) {
        self.out.extend_from_slice(b"}\n");
    }
}

/// Appends the first `len` bytes of `text`. The whole array is copied, then
/// `out` cut back to length: a copy of a constant length is a few stores,
/// where one of a length known only at run time calls memcpy (perf: those
/// calls for 1 to 4 bytes were a seventh of `trace --json`'s time).
#[inline(always)]
fn append_first<const N: usize>(out: &mut Vec<u8>, text: &[u8; N], len: usize) {
    let end = out.len() + len;
    out.extend_from_slice(text);
    out.truncate(end);
}

/// Appends `octets` in dotted-decimal to `out`, built in a fixed array
/// (see [`append_first`]).
fn ipv4_text(octets: [u8; 4], out: &mut Vec<u8>) {
    let mut text = [0u8; 16];
    let mut len = 0;
    for (i, octet) in octets.into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            text[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            text[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        text[len] = b'0' + octet % 10;
        len += 1;
    }
    append_first(out, &text, len);
}

/// Nanoseconds as microseconds, keeping sub-µs precision.
fn micros(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// Appends `ns` as microseconds, the text serde_json writes for
/// [`micros`]`(ns)`: the whole microseconds, then up to three decimals
/// with trailing zeros dropped (`.0` for none). Below 2^43 µs (101 days)
/// that decimal is the shortest text that reads back as the same f64, which
/// is what serde_json writes: any other with three decimals or fewer is at
/// least 0.001 away, more than the f64's spacing there. Longer times go
/// through the f64. Under churn the f64 formatting was about 6 % of
/// `trace --json`'s time (perf); these are integer divisions.
fn micros_text(ns: u64, out: &mut Vec<u8>) {
    if ns >= (1 << 43) * 1000 {
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &micros(ns));
        return;
    }
    out.extend_from_slice(itoa::Buffer::new().format(ns / 1000).as_bytes());
    let fraction = ns % 1000;
    let decimals = [b'.', b'0' + (fraction / 100) as u8, b'0' + (fraction / 10 % 10) as u8, b'0' + (fraction % 10) as u8];
    let kept = match fraction {
        f if f % 100 == 0 => 1,
        f if f % 10 == 0 => 2,
        _ => 3,
    };
    append_first(out, &decimals, 1 + kept);
}

/// Whether `name` can go into a JSON string as it is (see `Object::name`).
fn is_plain_name(name: &str) -> bool {
    name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Appends one event as a JSON line (newline included) to `out`. The
/// fields every event has come first; each kind's follow in a fixed order.
/// Fields that exist only for some events are left out of the others;
/// `close` always carries `direction` and `lifetime_us`, `null` when
/// unknown.
pub fn append(out: &mut Vec<u8>, event: &ConnEvent) {
    let mut json = Object::start(out);
    json.integer("ts_ns", event.ts_ns);
    json.name("event", event.detail.name());
    json.integer("family", event.family());
    json.ip("saddr", event.local.ip());
    json.integer("sport", event.local.port());
    json.ip("daddr", event.remote.ip());
    json.integer("dport", event.remote.port());
    json.field("pid", &event.pid);
    json.field("comm", &event.comm.as_deref());
    json.integer("netns", event.netns);
    json.integer("cgroup", event.cgroup);
    // The cgroup v2 path and the unit or container id in it; `null` when
    // unknown (`service` also when the path names neither).
    json.field("cgroup_path", &event.service.as_deref().map(|s| s.cgroup_path.as_str()));
    json.field("service", &event.service.as_deref().and_then(|s| s.name.as_deref()));
    match &event.detail {
        Detail::Handshake { direction, handshake_ns } => {
            json.name("direction", direction.as_str());
            json.micros("handshake_us", *handshake_ns);
        }
        Detail::HandshakeFailed { reason, after_ns } => {
            json.name("reason", reason.as_str());
            json.micros("after_us", *after_ns);
        }
        Detail::Retransmit { state, segs, bytes, seq } => {
            json.name("state", state_name(*state));
            json.integer("segs", *segs);
            // The skb's sequence span and first sequence number.
            json.integer("seq_span", *bytes);
            json.integer("seq", *seq);
        }
        Detail::ResetSent { state } if *state != 0 => json.name("state", state_name(*state)),
        Detail::SynackRetransmit | Detail::ResetSent { .. } | Detail::ResetReceived => {}
        Detail::HolStall { stall_ns, bytes_held, ooo_segments } => {
            json.micros("stall_us", *stall_ns);
            json.integer("bytes_held", *bytes_held);
            json.integer("ooo_segments", *ooo_segments);
        }
        Detail::ZeroWindow { side, stall_ns } => {
            json.micros("stall_us", *stall_ns);
            json.name("side", side.as_str());
        }
        Detail::SlowStartExit { after_ns, cwnd } => {
            json.micros("after_us", *after_ns);
            json.integer("cwnd", *cwnd);
        }
        Detail::Accepted { wait_ns, queue_len, backlog } => {
            json.micros("accept_wait_us", *wait_ns);
            json.integer("queue_len", *queue_len);
            json.integer("backlog", *backlog);
        }
        Detail::ListenOverflow { dropped, backlog } => {
            json.integer("backlog", *backlog);
            json.integer("dropped", *dropped);
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
            json.optional_name("direction", direction.map(|d| d.as_str()));
            json.optional_micros("lifetime_us", *lifetime_ns);
            json.integer("bytes_sent", *bytes_sent);
            json.integer("bytes_received", *bytes_received);
            json.integer("retransmits", *retransmits);
            json.integer("spurious_retransmits", *spurious_retransmits);
            json.integer("cwnd", transport.cwnd);
            if let Some(congestion) = transport.congestion.as_deref() {
                json.field("congestion", congestion);
            }
            json.integer("max_cwnd", transport.max_cwnd);
            json.optional_micros("slow_start_exit_us", transport.slow_start_exit_ns);
            json.integer("srtt_us", transport.srtt_us);
            json.integer("min_rtt_us", transport.min_rtt_us);
            json.integer("recovery_episodes", transport.recovery_episodes);
            json.micros("recovery_us", transport.recovery_ns);
            json.integer("loss_episodes", transport.loss_episodes);
            json.micros("loss_us", transport.loss_ns);
            json.integer("hol_stalls", transport.hol_stalls);
            json.micros("hol_stall_us", transport.hol_stall_ns);
            json.integer("ooo_segments", transport.ooo_segments);
            json.micros("zero_window_us", transport.zero_window_ns);
        }
    }
    json.end();
}

/// Writes one event as a JSON line, through `line`, a buffer the caller
/// keeps from one event to the next (no allocation per event).
pub fn write(out: &mut impl Write, line: &mut Vec<u8>, event: &ConnEvent) -> io::Result<()> {
    line.clear();
    append(line, event);
    out.write_all(line)
}

/// The event as a JSON value (tests, and views that embed events).
pub fn to_value(event: &ConnEvent) -> serde_json::Value {
    let mut line = Vec::new();
    append(&mut line, event);
    serde_json::from_slice(&line).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{sample as event, Direction};

    #[test]
    fn micros_text_is_what_serde_json_writes_for_the_f64() {
        let mut values = vec![0, 1, 5, 10, 50, 99, 100, 500, 999, 1_000, 1_001, 1_010, 1_100, 212_604, 71_015, 300_000_000];
        // Every magnitude, each with every kind of decimal tail, up to and
        // past the f64's limit for three decimals (2^43 µs).
        let limit = (1u64 << 43) * 1000;
        let mut magnitude = 1u64;
        while magnitude < u64::MAX / 10 {
            for tail in [0, 1, 7, 10, 70, 100, 700, 123, 999] {
                values.extend([magnitude * 1000 + tail, magnitude * 1000 - 1000 + tail]);
            }
            magnitude *= 10;
        }
        values.extend([limit - 1, limit - 10, limit - 100, limit, limit + 1, u64::MAX]);
        for ns in values {
            let mut ours = Vec::new();
            micros_text(ns, &mut ours);
            assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string(&micros(ns)).unwrap(), "{ns} ns");
        }
    }

    /// What `Object::name` writes without escaping: every state name, and
    /// every direction, reason and side (kinds: the test below).
    #[test]
    fn names_need_no_escaping() {
        use crate::event::{FailReason, WindowSide};
        let mut names: Vec<&str> = (0..=u8::MAX).map(state_name).collect();
        names.extend([Direction::Active, Direction::Passive].map(Direction::as_str));
        names.extend([FailReason::Reset, FailReason::Timeout, FailReason::Unreachable, FailReason::Aborted, FailReason::Error, FailReason::NoLocalPort].map(FailReason::as_str));
        names.extend([WindowSide::Peer, WindowSide::Local].map(WindowSide::as_str));
        for name in names {
            assert!(is_plain_name(name), "{name:?}");
        }
    }

    #[test]
    fn ipv4_text_matches_std_display() {
        for octets in [[0, 0, 0, 0], [127, 0, 0, 1], [255, 255, 255, 255], [10, 9, 99, 100], [1, 22, 233, 4], [100, 109, 190, 200]] {
            let mut out = Vec::new();
            ipv4_text(octets, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), std::net::Ipv4Addr::from(octets).to_string());
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

    /// Every kind's line parses as one JSON object, each key once, the
    /// fields every event has first; IPv4 addresses read as text.
    #[test]
    fn every_kind_is_one_object_with_unique_keys() {
        use crate::event::{Dynamics, FailReason, WindowSide};
        let kinds = [
            Detail::Handshake { direction: Direction::Active, handshake_ns: 1 },
            Detail::HandshakeFailed { reason: FailReason::NoLocalPort, after_ns: 2 },
            Detail::Retransmit { state: 1, segs: 2, bytes: 3, seq: 4 },
            Detail::SynackRetransmit,
            Detail::ResetSent { state: 1 },
            Detail::ResetSent { state: 0 },
            Detail::ResetReceived,
            Detail::HolStall { stall_ns: 5, bytes_held: 6, ooo_segments: 7 },
            Detail::ZeroWindow { side: WindowSide::Peer, stall_ns: 8 },
            Detail::SlowStartExit { after_ns: 9, cwnd: 10 },
            Detail::Accepted { wait_ns: 11, queue_len: 12, backlog: 13 },
            Detail::ListenOverflow { dropped: 14, backlog: 15 },
            Detail::Close {
                direction: Some(Direction::Passive),
                lifetime_ns: Some(16),
                bytes_sent: 17,
                bytes_received: 18,
                retransmits: 19,
                spurious_retransmits: 20,
                transport: Dynamics::default(),
            },
        ];
        for detail in kinds {
            let mut e = event(detail);
            e.local = "10.0.0.1:80".parse().unwrap();
            let mut line = Vec::new();
            append(&mut line, &e);
            let text = String::from_utf8(line).unwrap();
            assert!(text.ends_with("}\n") && text.matches('\n').count() == 1, "{text}");
            let keys: Vec<String> = text.trim_end()[1..].split(",\"").map(|field| field.trim_start_matches('"').split('"').next().unwrap().to_string()).collect();
            let unique: std::collections::HashSet<_> = keys.iter().collect();
            assert_eq!(unique.len(), keys.len(), "a key twice: {text}");
            assert_eq!(keys[..3], ["ts_ns", "event", "family"], "{text}");
            let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|err| panic!("{err}: {text}"));
            assert!(is_plain_name(value["event"].as_str().unwrap()), "{text}");
            assert_eq!(value["saddr"], "10.0.0.1");
            assert_eq!(value.as_object().unwrap().len(), keys.len());
        }
    }

    /// Strings from the kernel and the cgroup tree are escaped.
    #[test]
    fn strings_are_escaped() {
        let mut e = event(Detail::ResetReceived);
        e.comm = crate::event::ShortName::from_bytes(b"a\"b\\c\n");
        e.service = Some(std::sync::Arc::new(crate::service::Service::from_path("/x\"y".into())));
        let line = to_value(&e);
        assert_eq!(line["comm"], "a\"b\\c\n");
        assert_eq!(line["cgroup_path"], "/x\"y");
    }

    #[test]
    fn lines_are_newline_terminated_json() {
        let (mut out, mut line) = (Vec::new(), Vec::new());
        write(&mut out, &mut line, &event(Detail::ResetReceived)).unwrap();
        write(&mut out, &mut line, &event(Detail::SynackRetransmit)).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 2);
        for line in text.lines() {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(value["daddr"], "::1");
        }
    }
}
