use std::process::ExitCode;

use clap::{error::ErrorKind, Parser};
use netlens::{
    cli::{Cli, Command},
    kernel::probe,
    trace::{self, TraceOptions},
};

fn main() -> ExitCode {
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
    match cli.command {
        Command::Check => Ok(if netlens::check::run() { ExitCode::SUCCESS } else { ExitCode::FAILURE }),
        Command::Trace(args) => {
            if let Some(problem) = probe::preflight() {
                anyhow::bail!(problem);
            }
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(trace::run(TraceOptions {
                json: args.json,
                duration: args.duration,
                filter: args.filter.to_filter(),
            }))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Top(args) => {
            let options = args.resolve()?;
            if let Some(problem) = probe::preflight() {
                anyhow::bail!(problem);
            }
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(netlens::top::run::run(options))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Daemon(args) => {
            // Settings first: a bad file or flag is reported before any
            // privilege or kernel check.
            let config = args.resolve()?;
            if let Some(problem) = probe::preflight() {
                anyhow::bail!(problem);
            }
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(netlens::daemon::run(config, args.filter.to_filter()))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
