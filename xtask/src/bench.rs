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

use crate::{capture, stats::mean, workspace_root};

/// `cargo xtask bench churn`: connection churn in a private namespace,
/// alternating no netlens and `netlens trace --json > /dev/null`.
pub fn churn(netlens: &Path, pairs: u32, seconds: u32) -> Result<()> {
    let load = workspace_root().join("target/release/netlens-load");
    let mut without = Vec::new();
    let mut with = Vec::new();
    let mut attach_ms = Vec::new();
    let (mut lost, mut missed) = (0, 0);
    for pair in 1..=pairs {
        let base = run_load(&load, seconds)?;
        println!("pair {pair}: without netlens {base:>8.0} conn/s");
        let (tracer, attached) = start_tracer(netlens)?;
        let traced = run_load(&load, seconds)?;
        let stderr = stop_netlens(tracer)?;
        // `netlens: N events lost so far: ...` (ring buffer full) and `...
        // missed so far: ...` (the kernel skipped a nested program run).
        let last_count = |what: &str| {
            stderr
                .iter()
                .filter_map(|l| l.strip_prefix("netlens: ")?.split_once(what).map(|(count, _)| count)?.parse::<u64>().ok())
                .max()
                .unwrap_or(0)
        };
        lost += last_count(" events lost so far");
        missed += last_count(" events missed so far");
        println!("pair {pair}: with netlens    {traced:>8.0} conn/s (attached in {:.1} ms)", attached.as_secs_f64() * 1e3);
        without.push(base);
        with.push(traced);
        attach_ms.push(attached.as_secs_f64() * 1e3);
    }
    println!("churn: without {:.0} conn/s, with {:.0} conn/s, ratio {:.3} (goal >= 0.97)", mean(&without), mean(&with), mean(&with) / mean(&without));
    println!(
        "churn: events lost (ring buffer full) {lost} (goal 0), missed (kernel skipped a nested run) {missed}; start to `netlens: attached` {:.1} ms mean, {:.1} ms max (goal <= 50 ms)",
        mean(&attach_ms),
        attach_ms.iter().cloned().fold(0.0, f64::max)
    );
    Ok(())
}

/// `cargo xtask bench bulk`: a pinned bulk loopback transfer, alternating
/// no netlens and every program attached (kernel.bpf_stats_enabled off, as
/// users run), then, for each program's cost per run, one more traced run
/// with stats on whose rate is not kept (stats slow every program run).
pub fn bulk(netlens: &Path, pairs: u32, seconds: u32) -> Result<()> {
    let load = workspace_root().join("target/release/netlens-load");
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for pair in 1..=pairs {
        let base = run_workload(&load, "bulk", seconds)?;
        println!("pair {pair}: without netlens {base:>7.2} Gbit/s");
        let (tracer, _) = start_tracer(netlens)?;
        let traced = run_workload(&load, "bulk", seconds);
        stop_netlens(tracer)?;
        let traced = traced?;
        println!("pair {pair}: with netlens    {traced:>7.2} Gbit/s");
        without.push(base);
        with.push(traced);
    }
    let stats = crate::bpfstats::StatsOn::new()?;
    let (tracer, _) = start_tracer(netlens)?;
    let measured = run_workload(&load, "bulk", seconds);
    let stderr = stop_netlens(tracer);
    drop(stats);
    measured?;
    let costs: Vec<String> = stderr?.into_iter().filter(|l| l.starts_with("netlens: program ")).collect();
    println!("bulk: without {:.2} Gbit/s, with {:.2} Gbit/s, ratio {:.3} (goal >= 0.97)", mean(&without), mean(&with), mean(&with) / mean(&without));
    println!("bulk: cost per run in a traced run with BPF stats on (goal tcp_probe <= 100 ns):");
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
pub(crate) fn start_tracer(netlens: &Path) -> Result<(Child, Duration)> {
    start_netlens(netlens, &["trace", "--json"], "netlens: attached")
}

/// Starts `netlens ARGS` with stdout to /dev/null; returns it once stderr
/// shows a line starting with `ready`, and how long that took. Later stderr
/// lines are kept for [`stop_netlens`].
pub(crate) fn start_netlens(netlens: &Path, args: &[&str], ready: &str) -> Result<(Child, Duration)> {
    start_netlens_with(netlens, args, ready, &[])
}

/// [`start_netlens`] with `env` added to its environment.
pub(crate) fn start_netlens_with(netlens: &Path, args: &[&str], ready: &str, env: &[(&str, &str)]) -> Result<(Child, Duration)> {
    let started = Instant::now();
    let mut child = Command::new(netlens)
        .args(args)
        .envs(env.iter().copied())
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
    let deadline = started + Duration::from_secs(30);
    let mut said = Vec::new();
    loop {
        let line = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => line,
            // Its stderr closed: it exited (what it said is why), or it
            // is still silent at the deadline.
            Err(_) => bail!("netlens {} did not start: {}", args.join(" "), said.join(" | ")),
        };
        if line.starts_with(ready) {
            break;
        }
        // Other lines are start-up notes (a hook this kernel lacks, owners
        // it could not read): shown, not fatal.
        eprintln!("xtask: {line}");
        said.push(line);
    }
    let ready_after = started.elapsed();
    // Keep the receiver so later lines are collected.
    STDERR.with(|cell| *cell.borrow_mut() = Some(rx));
    Ok((child, ready_after))
}

thread_local! {
    static STDERR: std::cell::RefCell<Option<mpsc::Receiver<String>>> = const { std::cell::RefCell::new(None) };
}

pub(crate) fn stop_netlens(mut child: Child) -> Result<Vec<String>> {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait()?;
    if !status.success() {
        bail!("netlens exited with {status}");
    }
    let lines = STDERR.with(|cell| cell.borrow_mut().take().map(|rx| rx.try_iter().collect()).unwrap_or_default());
    Ok(lines)
}

/// `cargo xtask bench daemon`: `netlens daemon` under sustained churn while
/// scraped every second; its RSS at start and end, its CPU per 10,000
/// connections, and the churn ratio against a run without netlens.
pub fn daemon(netlens: &Path, pairs: u32, seconds: u32) -> Result<()> {
    let load = workspace_root().join("target/release/netlens-load");
    const LISTEN: &str = "127.0.0.1:9979";
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for pair in 1..=pairs {
        let base = run_load(&load, seconds)?;
        println!("pair {pair}: without netlens {base:>8.0} conn/s");
        let (daemon, _) = start_netlens(netlens, &["daemon", "--listen", LISTEN], "netlens: serving")?;
        let pid = daemon.id();
        let (rss_start, cpu_start) = (rss_kib(pid)?, cpu_seconds(pid)?);
        let scraping = Instant::now();
        let scraper = thread::spawn(move || {
            let mut scrapes = 0u32;
            let mut bytes = 0usize;
            // RSS after each scrape: shows whether memory levels off.
            let mut rss_trace = Vec::new();
            while scraping.elapsed() < Duration::from_secs(u64::from(seconds) + 1) {
                if let Ok(output) = Command::new("curl").args(["-sf", &format!("http://{LISTEN}/metrics")]).output() {
                    scrapes += u32::from(output.status.success());
                    bytes = output.stdout.len();
                }
                rss_trace.push(rss_kib(pid).unwrap_or(0));
                thread::sleep(Duration::from_secs(1));
            }
            (scrapes, bytes, rss_trace)
        });
        let output = Command::new(&load).args(["churn", &seconds.to_string()]).output().context("running netlens-load")?;
        let (rss_end, cpu_end) = (rss_kib(pid)?, cpu_seconds(pid)?);
        let (scrapes, exposition_bytes, rss_trace) = scraper.join().map_err(|_| anyhow::anyhow!("scraper panicked"))?;
        let every_5s: Vec<String> = rss_trace.iter().step_by(5).map(|kib| format!("{:.1}", *kib as f64 / 1024.0)).collect();
        println!("pair {pair}: daemon RSS every 5 s (MiB): {}", every_5s.join(", "));
        stop_netlens(daemon)?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let field = |name: &str| -> Option<f64> { stdout.split_whitespace().find_map(|w| w.strip_prefix(name)?.parse().ok()) };
        let (connections, rate) = (field("connections=").context("no count")?, field("rate=").context("no rate")?);
        let per_10k = |cpu: (f64, f64)| cpu.0 / connections * 10_000.0;
        let (user, system) = ((cpu_end.0 - cpu_start.0), (cpu_end.1 - cpu_start.1));
        println!("pair {pair}: with netlens    {rate:>8.0} conn/s ({connections:.0} connections, {scrapes} scrapes of {exposition_bytes} bytes)");
        println!(
            "pair {pair}: daemon RSS {:.1} MiB at start, {:.1} MiB at end ({:+.1} %); CPU {:.3} s user + {:.3} s system = {:.4} user-s per 10,000 connections (goal <= 0.05)",
            rss_start as f64 / 1024.0,
            rss_end as f64 / 1024.0,
            (rss_end as f64 / rss_start as f64 - 1.0) * 100.0,
            user,
            system,
            per_10k((user, system)),
        );
        without.push(base);
        with.push(rate);
    }
    println!("daemon: churn without {:.0} conn/s, with {:.0} conn/s, ratio {:.3} (goal >= 0.97)", mean(&without), mean(&with), mean(&with) / mean(&without));
    Ok(())
}

pub(crate) fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok())
        .context("no VmRSS")
}

/// (user, system) CPU seconds of a process so far.
pub(crate) fn cpu_seconds(pid: u32) -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised comm; utime and stime are 14th and 15th.
    let rest = stat.rsplit_once(')').context("bad stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let parse = |i: usize| -> Result<f64> { Ok(fields.get(i).context("short stat")?.parse::<f64>()? / ticks) };
    Ok((parse(11)?, parse(12)?))
}

/// `cargo xtask bench top`: `netlens top` in a real terminal (tmux): time
/// from start to the first full frame, then its own CPU while connections
/// churn as fast as the machine allows.
/// `netlens top -d 1` in a detached 200×50 tmux session, once its first
/// full frame is drawn: the session, how long that frame took, and the
/// pid of netlens inside.
pub(crate) struct TopSession {
    name: String,
    pub first_frame: Duration,
    pub pid: u32,
}

fn tmux(args: &[&str]) -> Result<String> {
    capture(Command::new("tmux").args(args))
}

impl TopSession {
    pub(crate) fn start(netlens: &Path, name: String) -> Result<Self> {
        let started = Instant::now();
        tmux(&["new-session", "-d", "-s", &name, "-x", "200", "-y", "50", &format!("exec {} top -d 1", netlens.display())])?;
        let first_frame = loop {
            let screen = tmux(&["capture-pane", "-p", "-t", &name]).unwrap_or_default();
            if screen.contains("ENDPOINT") && screen.contains("Quit") {
                break started.elapsed();
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = tmux(&["kill-session", "-t", &name]);
                bail!("top drew no frame within 30 s:\n{screen}");
            }
            thread::sleep(Duration::from_millis(5));
        };
        // From here on, dropping the session quits top.
        let mut session = Self { name, first_frame, pid: 0 };
        session.pid = tmux(&["display-message", "-p", "-t", &session.name, "#{pane_pid}"])?.trim().parse().context("pane pid")?;
        Ok(session)
    }
}

impl Drop for TopSession {
    /// Quits top as a user would (`q`), then removes the session.
    fn drop(&mut self) {
        let _ = tmux(&["send-keys", "-t", &self.name, "q"]);
        thread::sleep(Duration::from_millis(200));
        let _ = tmux(&["kill-session", "-t", &self.name]);
    }
}

pub fn top(netlens: &Path, pairs: u32, seconds: u32) -> Result<()> {
    let load = workspace_root().join("target/release/netlens-load");
    for run in 1..=pairs {
        let top = TopSession::start(netlens, format!("netlens-bench-{}-{run}", std::process::id()))?;
        let cpu_before = cpu_seconds(top.pid)?;
        let churn_started = Instant::now();
        let rate = run_load(&load, seconds);
        let cpu_after = cpu_seconds(top.pid);
        let elapsed = churn_started.elapsed().as_secs_f64();
        let first_frame = top.first_frame;
        drop(top);
        let (rate, cpu_after) = (rate?, cpu_after?);
        let (user, system) = (cpu_after.0 - cpu_before.0, cpu_after.1 - cpu_before.1);
        println!(
            "run {run}: first full frame after {:.0} ms (goal <= 300 ms); under {rate:.0} conn/s churn top used {:.2} % of one core ({:.2} % user, {:.2} % system; goal <= 2 %)",
            first_frame.as_secs_f64() * 1e3,
            (user + system) / elapsed * 100.0,
            user / elapsed * 100.0,
            system / elapsed * 100.0,
        );
    }
    Ok(())
}
