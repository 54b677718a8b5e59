//! The doctor's output: text for people, JSON lines for programs.

use std::io::{self, Write};

use serde_json::{json, Value};

use super::rules::Finding;

/// What the doctor watched, for the report's opening (or only) line.
#[derive(Clone, Debug, PartialEq)]
pub struct Watched {
    pub seconds: f64,
    pub connections: u64,
    pub bytes: u64,
    pub endpoints: usize,
}

impl Watched {
    pub fn describe(&self) -> String {
        format!(
            "{} connections, {} over {} endpoints in {:.1} s",
            self.connections,
            human_bytes(self.bytes),
            self.endpoints,
            self.seconds
        )
    }
}

/// "1.2 MB", "512 B".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// One JSON object of a finding.
pub fn to_json(finding: &Finding) -> Value {
    json!({
        "finding": finding.finding,
        "severity": finding.severity.as_str(),
        "endpoint": finding.endpoint,
        "summary": finding.summary,
        "evidence": finding.evidence,
        "advice": finding.advice,
    })
}

/// JSON lines: one object per finding, nothing when there is none (the
/// caller says so on stderr).
pub fn write_json(out: &mut impl Write, findings: &[Finding]) -> io::Result<()> {
    for finding in findings {
        serde_json::to_writer(&mut *out, &to_json(finding))?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Text: a line saying what was watched, then each finding as a block.
pub fn write_text(out: &mut impl Write, findings: &[Finding], watched: &Watched) -> io::Result<()> {
    if findings.is_empty() {
        return writeln!(out, "No findings: watched {}.", watched.describe());
    }
    writeln!(
        out,
        "{} finding{}: watched {}.",
        findings.len(),
        if findings.len() == 1 { "" } else { "s" },
        watched.describe()
    )?;
    for finding in findings {
        writeln!(out)?;
        writeln!(out, "{:<8} {} on {}", finding.severity.as_str().to_uppercase(), finding.finding, finding.endpoint)?;
        writeln!(out, "  {}", finding.summary)?;
        let evidence: Vec<String> = finding
            .evidence
            .iter()
            .map(|(name, value)| match value {
                Value::String(text) => format!("{name}={text}"),
                other => format!("{name}={other}"),
            })
            .collect();
        writeln!(out, "  evidence: {}", evidence.join(" "))?;
        writeln!(out, "  advice: {}", finding.advice)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::rules::Severity;

    fn finding() -> Finding {
        Finding {
            finding: "syn_loss",
            severity: Severity::Critical,
            endpoint: "10.0.0.1:443".into(),
            summary: "13 of 60 connects waited".into(),
            evidence: [("handshakes_1s".to_string(), Value::from(10))].into_iter().collect(),
            advice: "check the firewall",
            weight: 1.0,
        }
    }

    fn watched() -> Watched {
        Watched { seconds: 5.0, connections: 60, bytes: 1_234_567, endpoints: 2 }
    }

    #[test]
    fn json_lines_carry_every_field() {
        let mut out = Vec::new();
        write_json(&mut out, &[finding(), finding()]).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 2);
        let value: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(value["finding"], "syn_loss");
        assert_eq!(value["severity"], "critical");
        assert_eq!(value["endpoint"], "10.0.0.1:443");
        assert_eq!(value["evidence"]["handshakes_1s"], 10);
        assert_eq!(value["advice"], "check the firewall");
    }

    #[test]
    fn text_says_what_was_watched() {
        let mut out = Vec::new();
        write_text(&mut out, &[], &watched()).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "No findings: watched 60 connections, 1.2 MB over 2 endpoints in 5.0 s.\n");
        let mut out = Vec::new();
        write_text(&mut out, &[finding()], &watched()).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("CRITICAL syn_loss on 10.0.0.1:443"), "{text}");
        assert!(text.contains("evidence: handshakes_1s=10"), "{text}");
    }
}
