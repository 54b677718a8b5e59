//! `netlens daemon` settings: flags over an optional TOML file over
//! defaults, validated before anything is loaded.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{bail, Context as _, Result};
use serde::Deserialize;

use crate::aggregate::endpoint::EndpointBy;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:9977";
pub const DEFAULT_TOP_K: usize = 50;
pub const DEFAULT_CENSUS_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_EPOCH: Duration = Duration::from_secs(60);

/// The TOML file's shape. Every key optional; unknown keys are errors.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub by: Option<EndpointBy>,
    pub top_k: Option<usize>,
    /// Seconds between socket censuses.
    pub census_interval: Option<f64>,
    /// Seconds an endpoint may stay idle before its slot is given away.
    pub endpoint_epoch: Option<f64>,
}

/// What the daemon runs with.
#[derive(Clone, Debug, PartialEq)]
pub struct DaemonConfig {
    pub listen: SocketAddr,
    pub by: EndpointBy,
    pub top_k: usize,
    pub census_interval: Duration,
    pub endpoint_epoch: Duration,
}

impl FileConfig {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("config {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|err| {
            // toml's message spans several lines with a source excerpt;
            // users get one: what is wrong, and on which line.
            let line = err.span().map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
            let message = err.message().lines().next().unwrap_or("invalid TOML").to_string();
            match line {
                Some(line) => anyhow::anyhow!("line {line}: {message}"),
                None => anyhow::anyhow!("{message}"),
            }
        })
    }

    /// Flags (`overrides`) win over the file, the file over defaults.
    pub fn merge(self, overrides: FileConfig) -> Result<DaemonConfig> {
        let listen_text = overrides.listen.or(self.listen).unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen: SocketAddr = listen_text
            .parse()
            .map_err(|_| anyhow::anyhow!("listen address `{listen_text}` is not IP:PORT (e.g. 127.0.0.1:9977 or [::1]:9977)"))?;
        let by = overrides.by.or(self.by).unwrap_or_default();
        let top_k = overrides.top_k.or(self.top_k).unwrap_or(DEFAULT_TOP_K);
        if top_k == 0 && by != EndpointBy::None {
            bail!("top_k must be at least 1 (to drop the endpoint dimension, use `by = \"none\"`)");
        }
        let seconds = |name: &str, value: Option<f64>, default: Duration| -> Result<Duration> {
            match value {
                None => Ok(default),
                Some(secs) if secs > 0.0 && secs.is_finite() && secs <= 86_400.0 => Ok(Duration::from_secs_f64(secs)),
                Some(secs) => bail!("{name} must be a positive number of seconds up to 86400, not {secs}"),
            }
        };
        Ok(DaemonConfig {
            listen,
            by,
            top_k,
            census_interval: seconds(
                "census_interval",
                overrides.census_interval.or(self.census_interval),
                DEFAULT_CENSUS_INTERVAL,
            )?,
            endpoint_epoch: seconds("endpoint_epoch", overrides.endpoint_epoch.or(self.endpoint_epoch), DEFAULT_EPOCH)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_then_file_then_flags() {
        let file = FileConfig::parse("listen = \"0.0.0.0:9100\"\ntop_k = 10\nby = \"local-port\"\n").unwrap();
        let flags = FileConfig { top_k: Some(20), ..FileConfig::default() };
        let config = file.merge(flags).unwrap();
        assert_eq!(config.listen, "0.0.0.0:9100".parse().unwrap());
        assert_eq!(config.top_k, 20);
        assert_eq!(config.by, EndpointBy::LocalPort);
        assert_eq!(config.census_interval, DEFAULT_CENSUS_INTERVAL);
        let defaults = FileConfig::default().merge(FileConfig::default()).unwrap();
        assert_eq!(defaults.listen, DEFAULT_LISTEN.parse().unwrap());
    }

    #[test]
    fn bad_files_say_what_and_where_in_one_line() {
        let unknown = FileConfig::parse("listen = \"127.0.0.1:1\"\nbogus = 1\n").unwrap_err().to_string();
        assert!(unknown.starts_with("line 2: unknown field `bogus`"), "{unknown}");
        assert!(!unknown.contains('\n'));
        let service = FileConfig::parse("by = \"service\"").unwrap().merge(FileConfig::default()).unwrap();
        assert_eq!(service.by, EndpointBy::Service);
        let bad_by = FileConfig::parse("by = \"everything\"").unwrap_err().to_string();
        assert!(bad_by.contains("unknown variant"), "{bad_by}");
    }

    #[test]
    fn bad_values_are_refused() {
        let address = FileConfig { listen: Some("localhost".into()), ..Default::default() };
        assert!(address.merge(FileConfig::default()).unwrap_err().to_string().contains("not IP:PORT"));
        let zero = FileConfig { census_interval: Some(0.0), ..Default::default() };
        assert!(zero.merge(FileConfig::default()).unwrap_err().to_string().contains("census_interval must be a positive"));
        let no_slots = FileConfig { top_k: Some(0), ..Default::default() };
        assert!(no_slots.merge(FileConfig::default()).is_err());
    }
}
