//! `netlens trace --drops`: TCP packets the kernel dropped, by its reason,
//! as one line per reason per second while it drops. The kernel counts
//! drops per CPU in a map (one per packet would flood the ring buffer on
//! a host that drops thousands a second); this reads what grew.

use std::{collections::HashMap, io::Write};

use serde::Serialize;

/// One reason's drops over the last period.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DropLine {
    /// CLOCK_MONOTONIC, like every event's `ts_ns`.
    pub ts_ns: u64,
    pub event: &'static str,
    /// `enum skb_drop_reason`, lower case without its prefix.
    pub reason: String,
    /// Packets dropped for it since the previous line.
    pub packets: u64,
}

/// Cumulative counts at the previous read.
#[derive(Default)]
pub struct DropWatch {
    previous: HashMap<String, u64>,
}

impl DropWatch {
    /// The reasons whose count grew since the last call, largest first.
    pub fn grown(&mut self, counts: &[(String, u64)], now_ns: u64) -> Vec<DropLine> {
        let mut lines: Vec<DropLine> = counts
            .iter()
            .filter_map(|(reason, count)| {
                let before = self.previous.insert(reason.clone(), *count).unwrap_or(0);
                (*count > before).then(|| DropLine { ts_ns: now_ns, event: "drop", reason: reason.clone(), packets: count - before })
            })
            .collect();
        lines.sort_by(|a, b| b.packets.cmp(&a.packets).then_with(|| a.reason.cmp(&b.reason)));
        lines
    }
}

/// As a JSON line.
pub fn write_json(out: &mut impl Write, line: &DropLine) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, line)?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reasons_that_grew_are_printed_with_their_growth() {
        let mut watch = DropWatch::default();
        let first = watch.grown(&[("tcp_zerowindow".into(), 3), ("proto_mem".into(), 0)], 1);
        assert_eq!(first.len(), 1);
        assert_eq!((first[0].reason.as_str(), first[0].packets), ("tcp_zerowindow", 3));
        let second = watch.grown(&[("tcp_zerowindow".into(), 3), ("proto_mem".into(), 7), ("tcp_ofo_drop".into(), 9)], 2);
        let got: Vec<(&str, u64)> = second.iter().map(|l| (l.reason.as_str(), l.packets)).collect();
        assert_eq!(got, vec![("tcp_ofo_drop", 9), ("proto_mem", 7)]);
        let json = serde_json::to_value(&second[0]).unwrap();
        assert_eq!(json, serde_json::json!({"ts_ns": 2, "event": "drop", "reason": "tcp_ofo_drop", "packets": 9}));
    }
}
