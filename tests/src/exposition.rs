//! Scraping a `netlens daemon` and reading its Prometheus exposition.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::Netns;

/// One sample line: `name{label="value",...} number`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// `GET http://ADDR/PATH` with curl, from inside `netns` (where the daemon
/// listens); fails on a non-2xx status.
pub fn get(netns: &Netns, addr: &str, path: &str) -> Result<String> {
    netns.exec(&["curl", "-sS", "--fail", "--max-time", "10", &format!("http://{addr}{path}")])
}

/// Checks the exposition with `promtool check metrics` (format and naming
/// conventions), the reference parser of the Prometheus project.
pub fn promtool_check(text: &str) -> Result<()> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("promtool not found: run the tests through `cargo xtask test`, which installs it (Debian package prometheus)")?;
    child.stdin.take().context("promtool stdin")?.write_all(text.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Parses the sample lines of a text exposition (comments skipped).
pub fn parse(text: &str) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').with_context(|| format!("no value: {line}"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other.parse().with_context(|| format!("bad value: {line}"))?,
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').with_context(|| format!("unclosed labels: {line}"))?)?),
            None => (series, Vec::new()),
        };
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    Ok(samples)
}

fn parse_labels(text: &str) -> Result<Vec<(String, String)>> {
    let mut labels = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"").with_context(|| format!("bad labels: {text}"))?;
        // Values escape `"` and `\`; walk to the closing quote.
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((index, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(if escaped == 'n' { '\n' } else { escaped });
                    }
                }
                '"' => {
                    end = Some(index);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.with_context(|| format!("unterminated label value: {text}"))?;
        labels.push((name.trim_start_matches(',').to_string(), value));
        rest = after[end + 1..].trim_start_matches(',');
    }
    Ok(labels)
}

/// Sum of the samples named `name` whose labels include all of `want`.
pub fn sum(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && want.iter().all(|(n, v)| s.label(n) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_with_escapes() {
        let samples = parse("# HELP x y\nx_total{a=\"1\",b=\"q\\\"z\"} 3\ny 4.5\n").unwrap();
        assert_eq!(samples[0].label("b"), Some("q\"z"));
        assert_eq!(samples[0].value, 3.0);
        assert_eq!(sum(&samples, "x_total", &[("a", "1")]), 3.0);
        assert_eq!(samples[1], Sample { name: "y".into(), labels: vec![], value: 4.5 });
    }
}
