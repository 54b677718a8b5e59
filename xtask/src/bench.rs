//! Benchmarks: the same workload with and without netlens, alternating, in
//! one invocation; results as ratios, never as timed assertions.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::workspace_root;

/// `cargo xtask bench churn`: connection churn in a private namespace,
/// alternating no netlens and `netlens trace --json > /dev/null`.
pub fn churn(netlens: &Path, pairs: u32, seconds: u32) -> Result<()> {
    let load = workspace_root().join("target/release/netlens-load");
    let mut without = Vec::new();
    let mut with = Vec::new();
    let mut attach_ms = Vec::new();
    let mut lost = 0;
    for pair in 1..=pairs {
        let base = run_load(&load, seconds)?;
        println!("pair {pair}: without netlens {base:>8.0} conn/s");
        let (tracer, attached) = start_tracer(netlens)?;
        let traced = run_load(&load, seconds)?;
        let stderr = stop_tracer(tracer)?;
        lost += stderr
            .iter()
            .filter_map(|l| l.strip_prefix("netlens: ")?.split(' ').next()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        println!("pair {pair}: with netlens    {traced:>8.0} conn/s (attached in {:.1} ms)", attached.as_secs_f64() * 1e3);
        without.push(base);
        with.push(traced);
        attach_ms.push(attached.as_secs_f64() * 1e3);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!("churn: without {:.0} conn/s, with {:.0} conn/s, ratio {:.3} (goal >= 0.97)", mean(&without), mean(&with), mean(&with) / mean(&without));
    println!("churn: lost events {lost} (goal 0); start to `netlens: attached` {:.1} ms mean, {:.1} ms max (goal <= 50 ms)", mean(&attach_ms), attach_ms.iter().cloned().fold(0.0, f64::max));
    Ok(())
}

/// `cargo xtask bench bulk`: a pinned bulk loopback transfer, alternating
/// no netlens and every program attached; with kernel.bpf_stats_enabled on
/// during the traced runs for each program's cost per run.
pub fn bulk(netlens: &Path, pairs: u32, seconds: u32) -> Result<()> {
    let load = workspace_root().join("target/release/netlens-load");
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let mut costs: Vec<String> = Vec::new();
    for pair in 1..=pairs {
        let base = run_workload(&load, "bulk", seconds)?;
        println!("pair {pair}: without netlens {base:>7.2} Gbit/s");
        std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").context("enabling kernel.bpf_stats_enabled")?;
        let (tracer, _) = start_tracer(netlens)?;
        let traced = run_workload(&load, "bulk", seconds);
        let stderr = stop_tracer(tracer);
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
        let (traced, stderr) = (traced?, stderr?);
        println!("pair {pair}: with netlens    {traced:>7.2} Gbit/s");
        costs = stderr.into_iter().filter(|l| l.starts_with("netlens: program ")).collect();
        without.push(base);
        with.push(traced);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!("bulk: without {:.2} Gbit/s, with {:.2} Gbit/s, ratio {:.3} (goal >= 0.97)", mean(&without), mean(&with), mean(&with) / mean(&without));
    println!("bulk: cost per run in the last traced run (kernel BPF stats; goal tcp_probe <= 100 ns):");
    for line in costs {
        println!("  {}", line.trim_start_matches("netlens: program "));
    }
    Ok(())
}

/// Runs `netlens-load churn SECONDS`; returns connections per second.
fn run_load(load: &Path, seconds: u32) -> Result<f64> {
    run_workload(load, "churn", seconds)
}

/// Runs `netlens-load WORKLOAD SECONDS`; returns the rate it printed.
fn run_workload(load: &Path, workload: &str, seconds: u32) -> Result<f64> {
    let output = Command::new(load).args([workload, &seconds.to_string()]).output().context("running netlens-load")?;
    if !output.status.success() {
        bail!("netlens-load failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("rate="))
        .and_then(|r| r.parse().ok())
        .with_context(|| format!("netlens-load printed no rate: {stdout}"))
}

/// Starts `netlens trace --json > /dev/null`; returns it and the time from
/// spawn to its `netlens: attached` line.
fn start_tracer(netlens: &Path) -> Result<(Child, Duration)> {
    let started = Instant::now();
    let mut child = Command::new(netlens)
        .args(["trace", "--json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting netlens")?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(30)).context("netlens did not attach")?;
    let attached = started.elapsed();
    if !first.starts_with("netlens: attached") {
        bail!("netlens: {first}");
    }
    // Keep the receiver alive inside a thread so later lines are collected.
    STDERR.with(|cell| *cell.borrow_mut() = Some(rx));
    Ok((child, attached))
}

thread_local! {
    static STDERR: std::cell::RefCell<Option<mpsc::Receiver<String>>> = const { std::cell::RefCell::new(None) };
}

fn stop_tracer(mut child: Child) -> Result<Vec<String>> {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait()?;
    if !status.success() {
        bail!("netlens exited with {status}");
    }
    let lines = STDERR.with(|cell| cell.borrow_mut().take().map(|rx| rx.try_iter().collect()).unwrap_or_default());
    Ok(lines)
}
