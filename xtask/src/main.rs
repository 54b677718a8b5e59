//! `cargo xtask`: build, run, test and benchmark netlens.

mod bench;
mod bench_all;
mod bpfstats;
mod bounded;
mod guest;
mod kernels;
mod matrix;
mod setup;
mod stats;

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing, then build netlens (release, eBPF embedded).
    Build,
    /// Build, then run `netlens ARGS` as root (default: `netlens trace`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then run the unit tests and the privileged integration tests.
    Test {
        /// Kernel(s) to test on: `host` (the default: natively), `5.10`, `6.1`,
        /// `6.12` (Debian's kernels booted under QEMU), or `all`; any
        /// `--kernel` ends with a feature matrix (see README, "Kernel matrix").
        #[arg(long, value_name = "KERNEL")]
        kernel: Option<String>,
        /// Extra arguments for the test binaries (e.g. a test name).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks against a run without netlens: `churn`, `bulk`, `daemon`, `top`, `all` (one table of every goal figure),
    /// `cost` (kernel time per connection of this build against `--against`'s, alternating).
    Bench {
        #[arg(default_value = "churn")]
        which: String,
        /// Pairs of runs (without, with netlens) [default: 3; daemon 1].
        #[arg(long)]
        pairs: Option<u32>,
        /// Seconds per run [default: 5; daemon 30].
        #[arg(long)]
        seconds: Option<u32>,
        /// `cost`: another netlens binary to compare this build with.
        #[arg(long, value_name = "NETLENS")]
        against: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    match run_task(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_task(task: Task) -> Result<()> {
    match task {
        Task::Build => build(false).map(|_| ()),
        Task::Run { args } => {
            let binary = build(false)?;
            let args = if args.is_empty() { vec!["top".to_string()] } else { args };
            let mut command = setup::privileged(binary.to_str().context("non-UTF-8 path")?);
            run(command.args(&args))
        }
        Task::Test { kernel: None, args } => test_host(&args)?.verdict(),
        Task::Test { kernel: Some(kernel), args } => {
            // Refuse a bad name before building anything.
            let selection = matrix::Selection::parse(&kernel)?;
            matrix::run(&selection, &args)
        }
        Task::Bench { which, pairs, seconds, against } => {
            let binary = build(true)?;
            match which.as_str() {
                "churn" => bench::churn(&binary, pairs.unwrap_or(3), seconds.unwrap_or(5)),
                "bulk" => bench::bulk(&binary, pairs.unwrap_or(3), seconds.unwrap_or(5)),
                "daemon" => bench::daemon(&binary, pairs.unwrap_or(1), seconds.unwrap_or(30)),
                "top" => bench::top(&binary, pairs.unwrap_or(3), seconds.unwrap_or(10)),
                "all" => {
                    setup::ensure_bench_tools()?;
                    bench_all::all(&binary, pairs.unwrap_or(3), seconds.unwrap_or(5))
                }
                "cost" => {
                    let against = against.context("`bench cost` needs --against PATH, the netlens binary to compare with")?;
                    bench_all::cost(&binary, &against, pairs.unwrap_or(3), seconds.unwrap_or(5))
                }
                other => bail!("unknown benchmark `{other}`; available: churn, bulk, daemon, top, all, cost"),
            }
        }
    }
}

/// The full host suite, natively: unit tests and every integration test.
fn test_host(args: &[String]) -> Result<TestCounts> {
    let binary = build(true)?;
    let toolchain = setup::ensure(true)?;
    let mut command = cargo();
    toolchain.apply(&mut command);
    command
        // Every test binary runs even after one fails: CI reports them all.
        .args(["test", "--release", "--no-fail-fast", "--workspace", "--exclude", "netlens-ebpf", "--lib", "--bins", "--tests", "--"])
        .args(args)
        .env("NETLENS_BIN", &binary);
    // The integration tests load eBPF programs: they need root.
    if !is_root() {
        bail!("the integration tests need root: run `sudo -E cargo xtask test`");
    }
    let mut counts = run_tests(&mut command)?;
    // The raw-tracepoint builds of the lifecycle, tcp_probe, the
    // congestion state, data-ready and the SYN's consume_skb serve where a
    // kernel refuses their BTF-tracepoint builds (sock.rs); this kernel
    // takes those, so their tests run again without them.
    if args.is_empty() {
        let again = |tests: &[&str], env: (&str, &str), why: &str| -> Result<TestCounts> {
            let mut command = cargo();
            toolchain.apply(&mut command);
            command.args(["test", "--release", "--no-fail-fast", "-p", "netlens-tests"]);
            for test in tests {
                command.args(["--test", test]);
            }
            command.env("NETLENS_BIN", &binary).env(env.0, env.1);
            println!("xtask: the {} tests again, {why}", tests.join(", "));
            run_tests(&mut command)
        };
        counts.merge(again(
            &["lifecycle", "transport", "accept"],
            ("NETLENS_SKIP_HOOKS", RAW_FALLBACK_SKIPS),
            &format!("on the raw-tracepoint builds ({RAW_FALLBACK_SKIPS} left out)"),
        )?);
        // The accept exit with its enter hooks (kernels without
        // bpf_task_pt_regs, or not x86-64), typed.
        counts.merge(again(
            &["accept"],
            ("NETLENS_SKIP_HOOKS", "sys_exit_accept_regs"),
            "with the accept enter hooks (sys_exit_accept_regs left out)",
        )?);
        // Flows in socket storage (5.11+): the tests of what keeps flows
        // and what userspace joins to them.
        counts.merge(again(
            &["lifecycle", "retransmit", "transport", "accept", "daemon", "top"],
            ("NETLENS_FLOW_STATE", "storage"),
            "with flows in socket storage",
        )?);
        // Flows in the hash table, with the typed programs (the array is
        // the default from 5.12; the raw builds above use the table).
        counts.merge(again(
            &["lifecycle", "retransmit", "transport", "losses", "daemon", "top"],
            ("NETLENS_FLOW_STATE", "table"),
            "with flows in the hash table",
        )?);
    }
    Ok(counts)
}

/// The BTF-tracepoint builds, and the accept exit that needs BTF-typed
/// registers, left out to test their raw fallbacks.
const RAW_FALLBACK_SKIPS: &str =
    "inet_sock_set_state_btf,tcp_probe_btf,tcp_cong_state_set_btf,sk_data_ready_btf,consume_skb_btf,tcp_retransmit_skb_btf,tcp_receive_reset_btf,tcp_send_reset_btf,tcp_retransmit_synack_btf,sys_exit_accept_typed,sys_exit_accept_regs";

/// Installs what is missing and builds; returns the netlens binary.
fn build(with_test_tools: bool) -> Result<PathBuf> {
    let toolchain = setup::ensure(with_test_tools)?;
    let mut command = cargo();
    toolchain.apply(&mut command);
    run(command.args(["build", "--release", "-p", "netlens", "-p", "netlens-tests", "--bins"]))?;
    Ok(workspace_root().join("target/release/netlens"))
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap_or_default()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a command, failing with its name if it fails.
pub fn run(command: &mut Command) -> Result<()> {
    let status = command.status().with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{:?} failed ({status})", command.get_program());
    }
    Ok(())
}

/// Runs cargo test, passing its output through, and closes with one
/// summary line over every test binary.
fn run_tests(command: &mut Command) -> Result<TestCounts> {
    use std::io::{BufRead, BufReader};
    let mut child = command.stdout(std::process::Stdio::piped()).spawn().context("running cargo test")?;
    let mut counts = TestCounts::default();
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        println!("{line}");
        counts.add_line(&line);
    }
    let status = child.wait()?;
    counts.all_exited_ok = status.success();
    println!("{} passed, {} failed", counts.passed, counts.failed);
    Ok(counts)
}

/// What libtest reported, summed over test binaries.
#[derive(Clone, Debug)]
pub struct TestCounts {
    pub passed: u64,
    pub failed: u64,
    /// Every test process exited 0 (one that crashed prints no result line).
    pub all_exited_ok: bool,
    /// `(test, message)` for each failed test: its panic message (with an
    /// assertion's left and right values, and where it panicked) or its
    /// `Error:` line.
    pub failures: Vec<(String, String)>,
    block: FailureBlock,
    /// The test libtest last said it runs (`test NAME ... `), for output
    /// printed as it happens (--nocapture).
    running: Option<String>,
}

/// Where we are in libtest's report of a failed test.
#[derive(Clone, Debug)]
enum FailureBlock {
    Outside,
    /// After `---- NAME stdout ----`.
    Reading(String),
    /// After `thread '...' panicked at LOCATION:`: the message is next.
    PanicAt { test: String, location: String },
    /// After the message: `left:` / `right:` lines still belong to it.
    Message,
}

impl Default for TestCounts {
    fn default() -> Self {
        Self { passed: 0, failed: 0, all_exited_ok: true, failures: Vec::new(), block: FailureBlock::Outside, running: None }
    }
}

impl TestCounts {
    /// Reads one line of libtest output: `test result: ...` lines add to the
    /// counts; a failed test's block gives its first panic message or error.
    pub fn add_line(&mut self, line: &str) {
        let line = line.trim_end();
        if let Some(result) = line.trim_start().strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                result.split(';').find_map(|part| part.trim().strip_suffix(word)?.trim().rsplit(' ').next()?.parse().ok()).unwrap_or(0)
            };
            self.passed += count("passed");
            self.failed += count("failed");
            self.block = FailureBlock::Outside;
            return;
        }
        if let Some((name, _)) = line.strip_prefix("test ").and_then(|l| l.split_once(" ... ")) {
            self.running = Some(name.to_string());
        }
        if let Some(name) = line.strip_prefix("---- ").and_then(|l| l.strip_suffix(" stdout ----")) {
            self.block = FailureBlock::Reading(name.to_string());
            return;
        }
        self.block = match std::mem::replace(&mut self.block, FailureBlock::Outside) {
            // With --nocapture (the guests) a test's panic is printed where
            // it happens, named by its thread: the test's name.
            FailureBlock::Outside => match line.strip_prefix("thread '").and_then(|l| l.split_once(" panicked at ")) {
                Some((thread, at)) => FailureBlock::PanicAt {
                    test: thread.split('\'').next().unwrap_or(thread).to_string(),
                    location: at.trim_end_matches(':').to_string(),
                },
                None => {
                    if let (Some(error), Some(test)) = (line.find("Error: "), &self.running) {
                        // After `test NAME ... ` on the same line, or alone.
                        if error == 0 || line.starts_with("test ") {
                            self.failures.push((test.clone(), line[error..].to_string()));
                        }
                    }
                    FailureBlock::Outside
                }
            },
            FailureBlock::Reading(test) => {
                if let Some((_, at)) = line.strip_prefix("thread '").and_then(|l| l.split_once(" panicked at ")) {
                    FailureBlock::PanicAt { test, location: at.trim_end_matches(':').to_string() }
                } else if line.starts_with("Error: ") {
                    self.failures.push((test, line.to_string()));
                    FailureBlock::Outside
                } else {
                    FailureBlock::Reading(test)
                }
            }
            FailureBlock::PanicAt { test, location } => {
                self.failures.push((test, format!("{} (at {location})", line.trim())));
                FailureBlock::Message
            }
            FailureBlock::Message => {
                let value = line.trim_start();
                match self.failures.last_mut() {
                    Some((_, message)) if value.starts_with("left:") || value.starts_with("right:") => {
                        // Before the location, which stays last.
                        let at = message.rfind(" (at ").unwrap_or(message.len());
                        message.insert_str(at, &format!("; {value}"));
                        FailureBlock::Message
                    }
                    _ => FailureBlock::Outside,
                }
            }
        };
    }

    pub fn ok(&self) -> bool {
        self.all_exited_ok && self.failed == 0 && self.passed > 0
    }

    /// `cargo xtask test`'s verdict: an error unless everything ran and passed.
    /// Adds another cargo test run's counts.
    pub fn merge(&mut self, other: TestCounts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.all_exited_ok &= other.all_exited_ok;
        self.failures.extend(other.failures);
    }

    pub fn verdict(&self) -> Result<()> {
        if self.failed > 0 {
            bail!("tests failed ({} failed)", self.failed);
        }
        if !self.all_exited_ok {
            bail!("tests failed (a test process exited non-zero)");
        }
        if self.passed == 0 {
            bail!("no test ran");
        }
        Ok(())
    }
}

/// Runs a command and returns its stdout.
pub fn capture(command: &mut Command) -> Result<String> {
    let output = command.output().with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!("{command:?} failed ({})", output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::TestCounts;

    #[test]
    fn counts_and_failure_messages_from_libtest_output() {
        let output = "running 2 tests\ntest a ... FAILED\ntest b ... FAILED\n\nfailures:\n\n---- a stdout ----\nsome log\n\
                      thread 'a' (884) panicked at tests/x.rs:1:2:\nassertion `left == right` failed\n  left: 0\n right: 1\nnote: run with `RUST_BACKTRACE=1`\n\n\
                      ---- b stdout ----\nError: netlens did not attach\n\nfailures:\n    a\n    b\n\n\
                      test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.0s\n";
        let mut counts = TestCounts::default();
        output.lines().for_each(|line| counts.add_line(line));
        assert_eq!((counts.passed, counts.failed), (3, 2));
        assert_eq!(
            counts.failures,
            vec![
                ("a".into(), "assertion `left == right` failed; left: 0; right: 1 (at tests/x.rs:1:2)".into()),
                ("b".into(), "Error: netlens did not attach".into())
            ]
        );
    }

    /// --nocapture (the guests): output and panics come as they happen.
    #[test]
    fn failure_messages_printed_as_they_happen() {
        let output = "running 3 tests\ntest a ... some log\nthread 'a' (884) panicked at tests/x.rs:1:2:\n\
                      assertion `left == right` failed\n  left: 0\n right: 1\nFAILED\ntest b ... Error: netlens did not attach\nFAILED\n\
                      test c ... ok\n\nfailures:\n    a\n    b\n\n\
                      test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.0s\n";
        let mut counts = TestCounts::default();
        output.lines().for_each(|line| counts.add_line(line));
        assert_eq!((counts.passed, counts.failed), (1, 2));
        assert_eq!(
            counts.failures,
            vec![
                ("a".into(), "assertion `left == right` failed; left: 0; right: 1 (at tests/x.rs:1:2)".into()),
                ("b".into(), "Error: netlens did not attach".into())
            ]
        );
    }
}
