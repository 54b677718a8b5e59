//! The host-wide summary lines, as labelled fields so the TUI can style
//! labels and values separately and batch text can print them plainly.

use super::columns::{bad_above, warn_if_positive, HANDSHAKE_P99_BAD_US, HOL_P99_BAD_US};
use super::format::{self, NONE};
use super::columns::severity_rank;
use super::model::{FindingRow, Header, Quantiles};
use super::table::Severity;

#[derive(Clone, Debug, PartialEq)]
pub struct Field {
    pub label: &'static str,
    pub value: String,
    pub severity: Severity,
}

/// One summary line: a bold topic ("Conns") and its fields.
#[derive(Clone, Debug, PartialEq)]
pub struct HeaderLine {
    pub topic: &'static str,
    pub fields: Vec<Field>,
}

fn field(label: &'static str, value: String) -> Field {
    Field { label, value, severity: Severity::Normal }
}

fn flagged(label: &'static str, value: String, severity: Severity) -> Field {
    Field { label, value, severity }
}

fn handshake_fields(fields: &mut Vec<Field>, side: &'static str, q: Quantiles) {
    fields.push(field(side, format::micros_opt(q.p50_us)));
    fields.push(flagged("p99", format::micros_opt(q.p99_us), bad_above(q.p99_us, HANDSHAKE_P99_BAD_US)));
}

pub fn header_lines(h: &Header) -> Vec<HeaderLine> {
    let lost_severity = if h.events_lost > 0 { Severity::Bad } else { Severity::Normal };
    let mut handshake = Vec::new();
    handshake_fields(&mut handshake, "active p50", h.handshake_active);
    handshake_fields(&mut handshake, "passive p50", h.handshake_passive);
    let mut conns = vec![
        field("opened", format!("{}/s", format::rate(h.opened_per_s))),
        field("closed", format!("{}/s", format::rate(h.closed_per_s))),
        field("TIME_WAIT", h.time_wait.map_or_else(|| NONE.to_string(), |n| n.to_string())),
        // netlens's own blind spot: if this is non-zero, every rate
        // on screen is an undercount.
        flagged("lost events", h.events_lost.to_string(), lost_severity),
    ];
    // The same kind of blind spot, rare enough to show only when it happens.
    if h.bpf_errors > 0 {
        conns.push(flagged("bpf errors", h.bpf_errors.to_string(), Severity::Bad));
    }
    vec![
        HeaderLine { topic: "Conns", fields: conns },
        HeaderLine { topic: "Handshake", fields: handshake },
        HeaderLine {
            topic: "Stalls",
            fields: vec![
                flagged(
                    "retrans",
                    format!("{}/s", format::rate(h.retransmits_per_s)),
                    warn_if_positive(h.retransmits_per_s),
                ),
                field("HOL", format!("{}/s", format::rate(h.hol_stalls_per_s))),
                flagged("p99", format::micros_opt(h.hol_stall_p99_us), bad_above(h.hol_stall_p99_us, HOL_P99_BAD_US)),
                flagged(
                    "zero-window",
                    format!("{}/s", format::rate(h.zero_window_stalls_per_s)),
                    warn_if_positive(h.zero_window_stalls_per_s),
                ),
            ]
            .into_iter()
            .chain(drop_fields(h))
            .collect(),
        },
    ]
}

/// TCP drops per second and the reasons that dropped most, where the
/// kernel gives reasons: "drops 12.0/s  tcp_zerowindow 10.0/s, …".
fn drop_fields(h: &Header) -> Vec<Field> {
    let Some(per_s) = h.drops_per_s else { return Vec::new() };
    let mut fields = vec![flagged("drops", format!("{}/s", format::rate(per_s)), warn_if_positive(per_s))];
    if !h.top_drop_reasons.is_empty() {
        let reasons: Vec<String> = h.top_drop_reasons.iter().map(|r| format!("{} {}/s", r.reason, format::rate(r.per_s))).collect();
        fields.push(field("top", reasons.join(", ")));
    }
    fields
}

/// The line under the header: the doctor's findings holding now, most
/// severe first (`f` shows them in full), or "none".
pub fn findings_line(findings: &[FindingRow]) -> HeaderLine {
    let mut fields: Vec<Field> = findings
        .iter()
        .map(|f| {
            let severity = match severity_rank(&f.severity) as u8 {
                2 => Severity::Bad,
                1 => Severity::Warn,
                _ => Severity::Normal,
            };
            flagged("", format!("{} {}", f.finding, f.endpoint), severity)
        })
        .collect();
    if fields.is_empty() {
        fields.push(field("", "none".to_string()));
    }
    HeaderLine { topic: "Findings", fields }
}

/// Width of the topic column so the fields of all lines start aligned.
pub const TOPIC_WIDTH: usize = 10;

/// A header line as plain text, wrapped onto indented continuation lines so
/// no line exceeds `width` (0 = unlimited).
pub fn plain_lines(line: &HeaderLine, width: usize) -> Vec<String> {
    let mut out = vec![format!("{:<TOPIC_WIDTH$}", line.topic)];
    let mut first_on_line = true;
    for f in &line.fields {
        let piece = if f.label.is_empty() { f.value.clone() } else { format!("{} {}", f.label, f.value) };
        let sep = if first_on_line { "" } else { "  " };
        let current = out.len() - 1;
        let fits = width == 0 || out[current].chars().count() + sep.len() + piece.chars().count() <= width;
        if fits || first_on_line {
            out[current].push_str(sep);
            out[current].push_str(&piece);
        } else {
            out.push(format!("{:<TOPIC_WIDTH$}{piece}", ""));
        }
        first_on_line = false;
    }
    out.iter_mut().for_each(|l| *l = l.trim_end().to_string());
    out
}
