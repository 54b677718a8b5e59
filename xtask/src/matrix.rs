//! `cargo xtask test --kernel KERNEL`: the host suite natively and/or
//! netlens on Debian's own kernels under QEMU, ending in one table: the
//! features `netlens check --json` reports per kernel, the test counts and
//! the smoke runs.

use std::{
    fmt::Write as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::{
    bounded,
    guest::{self, GuestInputs, GuestResults, TestBinary},
    kernels::{GuestKernel, KernelCache, GUEST_KERNELS},
    setup, TestCounts,
};

/// The integration test binaries (tests/ targets) that exercise the kernel
/// side and run inside every guest; names not (yet) built are skipped.
pub const GUEST_TEST_BINARIES: [&str; 5] = ["lifecycle", "retransmit", "transport", "accept", "doctor"];

/// Test binaries that run only in some guests, and where. doctor's 15
/// scenarios take 2.5 minutes in the 6.1 guest and over 8 in the 5.10 one
/// (its emulated loopback is several times slower), and CI must stay under
/// 30 minutes: they run in 6.1, whose hooks differ most from the host's
/// (accept queue through kprobes and fentry/fexit, no sk_data_ready);
/// 6.12 has the host's tracepoints.
const ONLY_IN_GUESTS: [(&str, &[&str]); 1] = [("doctor", &["6.1"])];

/// Whether guest `kernel` runs test binary `binary`.
pub fn runs_in(kernel: &str, binary: &str) -> bool {
    ONLY_IN_GUESTS.iter().find(|(name, _)| *name == binary).is_none_or(|(_, kernels)| kernels.contains(&kernel))
}

/// One guest, boot to power-off: 1,080 s. A guard against a hung guest, not
/// a speed goal: without the doctor tests the slowest guest (5.10) took
/// about 360 s on an idle machine and went past 420 s on one busy with
/// builds; the doctor tests add about 250 s (6.12, idle).
/// `NETLENS_GUEST_LIMIT=SECS` raises it on a machine busy with other work.
fn guest_limit() -> Result<Duration> {
    match std::env::var("NETLENS_GUEST_LIMIT") {
        Err(_) => Ok(Duration::from_secs(1_080)),
        Ok(value) => match value.parse::<u64>() {
            Ok(seconds) if seconds > 0 => Ok(Duration::from_secs(seconds)),
            _ => bail!("NETLENS_GUEST_LIMIT={value}: give a number of seconds"),
        },
    }
}

/// `netlens check` on the host.
const HOST_CHECK_LIMIT: Duration = Duration::from_secs(60);

/// Where one column of the matrix runs.
#[derive(Clone, Copy)]
enum Target {
    Host,
    Guest(&'static GuestKernel),
}

/// The kernels `--kernel` selected, in matrix order (host first).
pub struct Selection(Vec<Target>);

impl Selection {
    pub fn parse(value: &str) -> Result<Self> {
        let guests = GUEST_KERNELS.iter().map(Target::Guest);
        let targets = match value {
            "host" => vec![Target::Host],
            "all" => std::iter::once(Target::Host).chain(guests).collect(),
            name => match GUEST_KERNELS.iter().find(|k| k.name == name) {
                Some(kernel) => vec![Target::Guest(kernel)],
                None => {
                    let names: Vec<&str> = GUEST_KERNELS.iter().map(|k| k.name).collect();
                    bail!("unknown kernel `{name}`: choose {}, host or all", names.join(", "));
                }
            },
        };
        Ok(Self(targets))
    }
}

/// One kernel's column.
struct Column {
    kernel: String,
    release: Option<String>,
    check: Option<CheckReport>,
    tests: Option<TestCounts>,
    /// Guest steps (test binaries, smoke runs) that exited non-zero, with
    /// the last line they wrote on stderr when there is one.
    failed_steps: Vec<String>,
    /// Steps that passed: an empty smoke row means "did not run".
    passed_steps: usize,
    /// Anything else that went wrong: timeouts, downloads, crashes.
    problems: Vec<String>,
    elapsed: Duration,
}

impl Column {
    fn new(kernel: &str) -> Self {
        Self {
            kernel: kernel.to_string(),
            release: None,
            check: None,
            tests: None,
            failed_steps: Vec::new(),
            passed_steps: 0,
            problems: Vec::new(),
            elapsed: Duration::ZERO,
        }
    }

    fn failed(&self) -> bool {
        !self.problems.is_empty()
            || !self.failed_steps.is_empty()
            || !self.check.as_ref().is_some_and(|c| c.exit_ok)
            || !self.tests.as_ref().is_some_and(|t| t.ok())
    }
}

pub fn run(selection: &Selection, test_args: &[String]) -> Result<()> {
    if !crate::is_root() {
        bail!("the kernel matrix needs root: run `sudo -E cargo xtask test --kernel ...`");
    }
    let limit = guest_limit()?;
    let started = Instant::now();
    let mut columns = Vec::new();
    // Prepared at the first guest; when that fails, every guest column says
    // why and the host column is still shown.
    let mut guest_inputs: Option<Result<GuestInputs, String>> = None;
    let mut kernels = KernelCache::new();
    for target in &selection.0 {
        let column = match target {
            Target::Host => host_column(test_args),
            Target::Guest(kernel) => {
                let inputs = guest_inputs.get_or_insert_with(|| prepare_guests().map_err(|err| format!("{err:#}")));
                match inputs {
                    Ok(inputs) => guest_column(kernel, &mut kernels, inputs, test_args, limit),
                    Err(err) => {
                        let mut column = Column::new(kernel.name);
                        column.problems.push(format!("guest set-up failed: {err}"));
                        column
                    }
                }
            }
        };
        columns.push(column);
    }
    let table = render(&columns, started.elapsed());
    println!("\n{table}");
    let saved = crate::workspace_root().join("target/matrix/matrix.txt");
    if let Some(parent) = saved.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let _ = std::fs::write(&saved, &table);
    let failed: Vec<&str> = columns.iter().filter(|c| c.failed()).map(|c| c.kernel.as_str()).collect();
    if !failed.is_empty() {
        bail!("kernel matrix failed on {}", failed.join(", "));
    }
    Ok(())
}

/// The host column: today's full suite, then `netlens check --json`.
fn host_column(test_args: &[String]) -> Column {
    let started = Instant::now();
    let mut column = Column::new("host");
    column.release = crate::capture(Command::new("uname").arg("-r")).ok().map(|r| r.trim().to_string());
    match crate::test_host(test_args) {
        Ok(counts) => column.tests = Some(counts),
        Err(err) => column.problems.push(format!("host tests: {err:#}")),
    }
    let netlens = crate::workspace_root().join("target/release/netlens");
    match host_check(&netlens) {
        Ok(check) => column.check = Some(check),
        Err(err) => column.problems.push(format!("netlens check: {err:#}")),
    }
    column.elapsed = started.elapsed();
    column
}

fn host_check(netlens: &Path) -> Result<CheckReport> {
    let json = bounded::run(Command::new(netlens).args(["check", "--json"]), HOST_CHECK_LIMIT, "host")?;
    // Exit 2 with nothing on stdout: a netlens without --json (clap's usage error).
    if json.status.and_then(|s| s.code()) == Some(2) && json.stdout.trim().is_empty() {
        let plain = bounded::run(Command::new(netlens).arg("check"), HOST_CHECK_LIMIT, "host")?;
        return Ok(parse_check(None, Some(&plain.stdout), plain.success(), plain.describe(HOST_CHECK_LIMIT)));
    }
    Ok(parse_check(Some(&json.stdout), None, json.success(), json.describe(HOST_CHECK_LIMIT)))
}

/// What every guest needs from the host: virtme-ng and QEMU, netlens and
/// the test executables.
fn prepare_guests() -> Result<GuestInputs> {
    let vng = setup::ensure_matrix_tools()?;
    let netlens = crate::build(true)?;
    Ok(GuestInputs { vng, netlens, tests: guest_test_binaries()? })
}

/// The test executables for the guests, built on the host (cargo prints
/// each one's path in its JSON messages).
fn guest_test_binaries() -> Result<Vec<TestBinary>> {
    let toolchain = setup::ensure(true)?;
    let mut command = crate::cargo();
    toolchain.apply(&mut command);
    command.args([
        "test",
        "--release",
        "--workspace",
        "--exclude",
        "netlens-ebpf",
        "--no-run",
        // Diagnostics rendered on stderr as usual; stdout keeps the JSON.
        "--message-format=json-render-diagnostics",
    ]);
    let messages = crate::capture(&mut command)?;
    let mut binaries = Vec::new();
    for message in messages.lines().filter_map(|line| serde_json::from_str::<Value>(line).ok()) {
        let target = &message["target"];
        let is_test = target["kind"].as_array().is_some_and(|kinds| kinds.iter().any(|k| k == "test"));
        let (Some(name), Some(executable)) = (target["name"].as_str(), message["executable"].as_str()) else {
            continue;
        };
        if !is_test || !GUEST_TEST_BINARIES.contains(&name) {
            continue;
        }
        let manifest = message["manifest_path"].as_str().context("cargo message without manifest_path")?;
        binaries.push(TestBinary {
            name: name.to_string(),
            executable: executable.into(),
            package_dir: Path::new(manifest).parent().context("manifest_path has no directory")?.to_path_buf(),
        });
    }
    binaries.sort_by_key(|b| GUEST_TEST_BINARIES.iter().position(|n| *n == b.name));
    for name in GUEST_TEST_BINARIES {
        if !binaries.iter().any(|b| b.name == name) {
            println!("xtask: no test binary `{name}` in the workspace: not run in the guests");
        }
    }
    if binaries.is_empty() {
        bail!("none of the guest test binaries ({}) was built", GUEST_TEST_BINARIES.join(", "));
    }
    Ok(binaries)
}

/// One guest column: fetch the kernel, boot it, read what guest.sh left.
fn guest_column(
    kernel: &GuestKernel,
    cache: &mut KernelCache,
    inputs: &GuestInputs,
    test_args: &[String],
    limit: Duration,
) -> Column {
    let started = Instant::now();
    let mut column = Column::new(kernel.name);
    let results = cache.fetch(kernel).and_then(|image| {
        column.release = Some(image.release.clone());
        guest::run(kernel.name, &image, inputs, test_args, limit)
    });
    match results {
        Ok(results) => read_guest_results(&mut column, &results, limit),
        Err(err) => column.problems.push(format!("{err:#}")),
    }
    column.elapsed = started.elapsed();
    println!("xtask: guest {} took {:.0} s", kernel.name, column.elapsed.as_secs_f64());
    column
}

fn read_guest_results(column: &mut Column, results: &GuestResults, limit: Duration) {
    if let Some(release) = results.read("uname") {
        column.release = Some(release.trim().to_string());
    }
    if !results.finished() {
        // CI keeps only the end of the log: the guest's last lines go into
        // the notes below the matrix, where they survive.
        let last_lines: String = results.outcome.tail.iter().map(|line| format!("\n      | {line}")).collect();
        column.problems.push(format!(
            "the guest did not finish ({}); output in {}; its last lines:{last_lines}",
            results.outcome.describe(limit),
            results.dir.display()
        ));
    }
    let steps = results.steps();
    if let Some((_, status)) = steps.iter().find(|(name, _)| name == "check") {
        let exit = if *status == 124 { "timed out".to_string() } else { format!("exit {status}") };
        let json = results.read("check.json");
        let plain = results.read("check.txt");
        column.check = Some(parse_check(json.as_deref().filter(|_| plain.is_none()), plain.as_deref(), *status == 0, exit));
    }
    let mut counts = TestCounts::default();
    for line in results.read("tests.log").unwrap_or_default().lines() {
        counts.add_line(line);
    }
    let mut ran_tests = false;
    for (name, status) in &steps {
        if name.starts_with("test:") {
            ran_tests = true;
            counts.all_exited_ok &= *status == 0;
        }
        let exit = match (name.as_str(), *status) {
            ("check", _) => continue,
            (_, 0) => {
                column.passed_steps += 1;
                continue;
            }
            // libtest's "some tests failed": the failures are listed on their own.
            (step, 101) if step.starts_with("test:") => continue,
            (_, 124) => "timed out".to_string(),
            (_, status) => format!("exit {status}"),
        };
        // trace.err, top.err, daemon.err (for daemon-scrape and daemon-exit).
        let stderr = results.read(&format!("{}.err", name.split('-').next().unwrap_or(name)));
        match stderr.as_deref().and_then(|e| e.lines().rev().find(|l| !l.trim().is_empty())) {
            Some(last) => column.failed_steps.push(format!("{name}: {exit}: {}", last.trim())),
            None => column.failed_steps.push(format!("{name}: {exit}")),
        }
    }
    if ran_tests {
        column.tests = Some(counts);
    }
}

/// The matrix: one row per feature (first-seen order), then check, tests,
/// smoke, time and verdict; below it, why every non-ok cell is so.
fn render(columns: &[Column], total: Duration) -> String {
    let mut features: Vec<&str> = Vec::new();
    for feature in columns.iter().filter_map(|c| c.check.as_ref()).flat_map(|c| &c.features) {
        if !features.contains(&feature.name.as_str()) {
            features.push(&feature.name);
        }
    }
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut header = vec!["feature".to_string()];
    header.extend(columns.iter().map(|c| c.kernel.clone()));
    rows.push(header);
    let row = |label: &str, cell: &dyn Fn(&Column) -> String| -> Vec<String> {
        std::iter::once(label.to_string()).chain(columns.iter().map(cell)).collect()
    };
    rows.push(row("release", &|c| c.release.clone().unwrap_or_else(|| "?".into())));
    for name in &features {
        rows.push(row(name, &|c| match &c.check {
            None => "-".into(),
            Some(check) if !check.json => "?".into(),
            Some(check) => check.features.iter().find(|f| f.name == *name).map_or("-".into(), Feature::cell),
        }));
    }
    rows.push(row("netlens check", &|c| c.check.as_ref().map_or("not run".into(), |check| {
        let json = if check.json { "" } else { " (no --json)" };
        format!("{}{json}", if check.exit_ok { "ok" } else { check.exit.as_str() })
    })));
    rows.push(row("tests passed/failed", &|c| c.tests.as_ref().map_or("not run".into(), |t| format!("{}/{}", t.passed, t.failed))));
    rows.push(row("smoke", &|c| {
        let smoke_failed = c.failed_steps.iter().filter(|s| !s.starts_with("test:")).count();
        match (c.kernel.as_str(), smoke_failed, c.passed_steps) {
            ("host", _, _) => "(host suite)".into(),
            (_, 0, 0) => "not run".into(),
            (_, 0, _) => "ok".into(),
            (_, n, _) => format!("{n} failed"),
        }
    }));
    rows.push(row("time", &|c| format!("{:.0} s", c.elapsed.as_secs_f64())));
    rows.push(row("verdict", &|c| if c.failed() { "FAIL".into() } else { "ok".into() }));

    let widths: Vec<usize> =
        (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::from("Kernel matrix\n");
    for (index, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
        if index == 0 {
            let _ = writeln!(out, "{}", "-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1)));
        }
    }
    let _ = writeln!(out, "total {:.0} s", total.as_secs_f64());

    let mut notes = String::new();
    for column in columns {
        let kernel = &column.kernel;
        if let Some(check) = &column.check {
            for f in check.features.iter().filter(|f| f.status != "ok") {
                let hook = if f.hook.is_empty() { String::new() } else { format!(" [hook: {}]", f.hook) };
                let _ = writeln!(notes, "  {kernel} {} {}: {}{hook}", f.name, f.status, f.why);
            }
            for (detail, names) in grouped(check.failed_checks.iter().map(|(name, detail)| (name, detail))) {
                let _ = writeln!(notes, "  {kernel} check {names} failed: {detail}");
            }
        }
        for step in &column.failed_steps {
            let _ = writeln!(notes, "  {kernel} {step}");
        }
        if let Some(tests) = &column.tests {
            for (message, names) in grouped(tests.failures.iter().map(|(name, message)| (name, message))) {
                let _ = writeln!(notes, "  {kernel} test {names}: {message}");
            }
            if !tests.all_exited_ok && tests.failed == 0 {
                let _ = writeln!(notes, "  {kernel} a test process exited non-zero without a failed test");
            }
        }
        for problem in &column.problems {
            let _ = writeln!(notes, "  {kernel} {problem}");
        }
    }
    if !notes.is_empty() {
        let _ = write!(out, "\nNotes:\n{notes}");
    }
    out
}

/// `(text, names)` for items sharing a text, in first-seen order: one
/// cause behind many failures gets one line. Long name lists are cut.
fn grouped<'a>(items: impl Iterator<Item = (&'a String, &'a String)>) -> Vec<(String, String)> {
    let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
    for (name, text) in items {
        match groups.iter_mut().find(|(t, _)| t == text) {
            Some((_, names)) => names.push(name),
            None => groups.push((text.clone(), vec![name])),
        }
    }
    groups
        .into_iter()
        .map(|(text, names)| {
            let shown = names.iter().take(3).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
            let more = if names.len() > 3 { format!(" and {} more", names.len() - 3) } else { String::new() };
            (text, format!("{shown}{more}"))
        })
        .collect()
}

mod check;
use check::{parse_check, CheckReport, Feature};

#[cfg(test)]
mod tests;
