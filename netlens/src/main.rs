use std::process::ExitCode;

use clap::{error::ErrorKind, Parser};
use netlens::{
    cli::{Cli, Command},
    kernel::probe,
    trace::{self, TraceOptions},
};

fn main() -> ExitCode {
    // One malloc arena: start-up parses the kernel's BTF (megabytes of small
    // allocations) on helper threads, and what a thread's arena held stayed
    // in the RSS after it was freed and trimmed (a daemon started at 40 MB
    // instead of 28 MB in 2 starts of 8). netlens's threads allocate little
    // after start-up, so they do not contend for it.
    // SAFETY: plain libc call, before any thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if matches!(err.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) if err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            return ExitCode::from(2);
        }
        Err(err) => {
            // One line, not clap's usage block: say what is wrong and where
            // to look.
            let message = err.to_string();
            let first = message.lines().next().unwrap_or("invalid arguments");
            eprintln!("netlens: {}; see `netlens --help`", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("netlens: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // Settings are validated first: a bad flag or file is reported before
    // any privilege or kernel check.
    match cli.command {
        Command::Check(args) => {
            netlens::loader::FULL_ERRORS.store(args.verbose, std::sync::atomic::Ordering::Relaxed);
            Ok(if netlens::check::run(args.json) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Trace(args) => attached(trace::run(TraceOptions {
            json: args.json,
            duration: args.duration,
            drops: args.drops,
            filter: args.filter.to_filter(),
        })),
        Command::Top(args) => {
            let options = args.resolve()?;
            netlens::top::run::require_terminal(&options)?;
            attached(netlens::top::run::run(options))
        }
        Command::Doctor(args) => attached(netlens::doctor::run(netlens::doctor::DoctorOptions {
            duration: args.duration,
            json: args.json,
            filter: args.filter.to_filter(),
        })),
        Command::Daemon(args) => {
            let config = args.resolve()?;
            attached(netlens::daemon::run(config, args.filter.to_filter()))
        }
    }
}

/// Runs a command that attaches the programs: the preflight check first
/// (one clear line when privileges or the kernel fall short), then the
/// command on a single-threaded runtime.
fn attached(command: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<ExitCode> {
    if let Some(problem) = probe::preflight() {
        anyhow::bail!(problem);
    }
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(command)?;
    Ok(ExitCode::SUCCESS)
}
