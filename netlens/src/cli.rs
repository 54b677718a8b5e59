//! Command-line interface.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::filter::Filter;

#[derive(Parser, Debug)]
#[command(name = "netlens", version, about = "eBPF TCP observability: handshakes, retransmits, resets and connection lifetimes, from the kernel")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print one line per connection event (handshake, retransmit, reset, close).
    Trace(TraceArgs),
    /// Live, top-like view of endpoints, connections and processes.
    Top(TopArgs),
    /// Serve Prometheus metrics (handshakes, retransmits, stalls, sockets) over HTTP.
    Daemon(DaemonArgs),
    /// Watch for a while, then report what is wrong (churn, SYN loss, port
    /// exhaustion, HOL blocking, path MTU black holes, retry storms, slow
    /// readers, accept-queue overflows, data loss), per endpoint, with
    /// evidence and advice.
    Doctor(DoctorArgs),
    /// Check that this kernel and these privileges can run netlens, and
    /// which features each hook serves here.
    Check(CheckArgs),
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Show the kernel's whole verifier log for a program it rejects.
    #[arg(short, long)]
    pub verbose: bool,
}

#[derive(Args, Debug)]
pub struct TopArgs {
    /// Seconds between refreshes.
    #[arg(short = 'd', long = "delay", value_name = "SECS", default_value = "1", value_parser = parse_duration, allow_negative_numbers = true)]
    pub delay: Duration,
    /// Print plain-text snapshots instead of the full-screen view (like `top -b`).
    #[arg(short = 'b', long)]
    pub batch: bool,
    /// Stop after N snapshots (batch mode).
    #[arg(short = 'n', long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub iterations: Option<u64>,
    /// Print each snapshot as one JSON object per line (implies --batch).
    #[arg(long)]
    pub json: bool,
    /// The view to start in.
    #[arg(long, value_parser = ["endpoints", "connections", "processes", "findings"], default_value = "endpoints")]
    pub view: String,
    /// Column to sort the view by (its title, e.g. "HS P99").
    #[arg(long, value_name = "COLUMN")]
    pub sort: Option<String>,
    #[command(flatten)]
    pub filter: FilterArgs,
}

impl TopArgs {
    pub fn resolve(&self) -> anyhow::Result<crate::top::run::TopOptions> {
        use crate::top::view::{View, ViewSettings};
        let mut settings = ViewSettings::default();
        settings.view = View::from_name(&self.view).ok_or_else(|| anyhow::anyhow!("unknown view `{}`", self.view))?;
        if let Some(column) = &self.sort {
            settings.sort_by_title(column).map_err(|err| anyhow::anyhow!("--sort: {err}"))?;
        }
        Ok(crate::top::run::TopOptions {
            delay: self.delay,
            batch: self.batch,
            json: self.json,
            iterations: self.iterations,
            settings,
            filter: self.filter.to_filter(),
        })
    }
}

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Address to serve /metrics and /healthz on [default: 127.0.0.1:9977]. A
    /// non-loopback address exposes the metrics to other hosts.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<String>,
    /// TOML file with the same settings (flags win over it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// The endpoint dimension of per-endpoint metrics [default: auto].
    #[arg(long, value_enum)]
    pub by: Option<crate::aggregate::endpoint::EndpointBy>,
    /// Endpoints with their own series; the rest is summed under `other` [default: 50].
    #[arg(long, value_name = "N")]
    pub top_k: Option<usize>,
    /// Seconds between socket censuses (TIME_WAIT, ephemeral ports) [default: 5].
    #[arg(long, value_name = "SECS", allow_negative_numbers = true)]
    pub census_interval: Option<f64>,
    /// Seconds an endpoint may stay idle before its series is folded into `other` [default: 60].
    #[arg(long, value_name = "SECS", allow_negative_numbers = true)]
    pub endpoint_epoch: Option<f64>,
    #[command(flatten)]
    pub filter: FilterArgs,
}

impl DaemonArgs {
    /// The settings, validated: flags over the file over defaults.
    pub fn resolve(&self) -> anyhow::Result<crate::daemon::config::DaemonConfig> {
        use crate::daemon::config::FileConfig;
        let file = match &self.config {
            Some(path) => FileConfig::read(path)?,
            None => FileConfig::default(),
        };
        file.merge(FileConfig {
            listen: self.listen.clone(),
            by: self.by,
            top_k: self.top_k,
            census_interval: self.census_interval,
            endpoint_epoch: self.endpoint_epoch,
        })
    }
}

#[derive(Args, Debug)]
pub struct TraceArgs {
    /// Print JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = parse_duration, allow_negative_numbers = true)]
    pub duration: Option<Duration>,
    /// Also print TCP packets the kernel dropped, by its reason: one `drop`
    /// line per reason per second while it drops (host-wide: filters do
    /// not apply; kernels 5.17+).
    #[arg(long)]
    pub drops: bool,
    #[command(flatten)]
    pub filter: FilterArgs,
}

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Seconds to watch before reporting (Ctrl-C ends early).
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_duration, allow_negative_numbers = true)]
    pub duration: Duration,
    /// One JSON object per finding, one per line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub filter: FilterArgs,
}

/// Filters shared by every command that shows connections.
#[derive(Args, Debug, Default)]
pub struct FilterArgs {
    /// Only connections with this port at either end.
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Only connections opened by this process.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Only connections opened by a process with this command name.
    #[arg(long)]
    pub comm: Option<String>,
    /// Only connections in this network namespace (its inode number).
    #[arg(long, value_name = "INODE")]
    pub netns: Option<u32>,
    /// Only IPv4.
    #[arg(short = '4', conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// Only IPv6.
    #[arg(short = '6')]
    pub ipv6: bool,
}

impl FilterArgs {
    pub fn to_filter(&self) -> Filter {
        Filter {
            port: self.port,
            pid: self.pid,
            comm: self.comm.clone(),
            netns: self.netns,
            family: match (self.ipv4, self.ipv6) {
                (true, _) => Some(4),
                (_, true) => Some(6),
                _ => None,
            },
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let secs: f64 = text.parse().map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("`{text}` must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_flags_parse() {
        let cli = Cli::try_parse_from(["netlens", "trace", "--json", "--port", "8080", "-6", "--duration", "1.5"]).unwrap();
        let Command::Trace(args) = cli.command else { panic!("not trace") };
        assert!(args.json);
        assert_eq!(args.duration, Some(Duration::from_millis(1500)));
        assert_eq!(args.filter.to_filter(), Filter { port: Some(8080), family: Some(6), ..Filter::default() });
    }

    #[test]
    fn doctor_flags_parse() {
        let cli = Cli::try_parse_from(["netlens", "doctor"]).unwrap();
        let Command::Doctor(args) = cli.command else { panic!("not doctor") };
        assert_eq!(args.duration, Duration::from_secs(30));
        assert!(!args.json);
        let cli = Cli::try_parse_from(["netlens", "doctor", "--duration", "5", "--json", "--port", "443"]).unwrap();
        let Command::Doctor(args) = cli.command else { panic!("not doctor") };
        assert_eq!(args.duration, Duration::from_secs(5));
        assert_eq!(args.filter.to_filter().port, Some(443));
        assert!(Cli::try_parse_from(["netlens", "doctor", "--duration", "-1"]).is_err());
        assert!(Cli::try_parse_from(["netlens", "doctor", "--duration", "abc"]).is_err());
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(Cli::try_parse_from(["netlens", "trace", "--port", "70000"]).is_err());
        assert!(Cli::try_parse_from(["netlens", "trace", "--duration", "0"]).is_err());
        assert!(Cli::try_parse_from(["netlens", "trace", "-4", "-6"]).is_err());
        assert!(Cli::try_parse_from(["netlens", "trace", "--bogus"]).is_err());
    }
}
