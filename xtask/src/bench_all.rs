//! `cargo xtask bench all`: every goal figure of the per-connection cost
//! work in one table, each beside the same workload with no netlens and
//! with a minimal reference (a bpftrace script timing handshakes on the
//! same tracepoint; an empty program on tcp_probe; empty programs on every
//! hook netlens attaches, the dispatch floor of its design), as ratios
//! within one run, and the kernel costs again with flows in the other
//! homes (socket storage, the hash table). Program costs
//! are the kernel's own accounting (bpf_stats), taken
//! in runs of their own: stats add two clock reads and a counter update to
//! every program run, which users do not pay, so every rate is measured
//! with them off.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    bench::{cpu_seconds, rss_kib, start_netlens, start_netlens_with, start_tracer, stop_netlens, TopSession},
    bpfstats::{self, EmptyOnNetlensHooks, EmptyProgram, StatsOn},
    capture,
    stats::{mean, min_max, pair_ratios, ratio_summary},
    workspace_root,
};

/// The bpftrace reference: handshake times from inet_sock_set_state, what
/// a one-off script on that tracepoint costs.
const BPFTRACE_HANDSHAKES: &str = "tracepoint:sock:inet_sock_set_state /args->newstate == 2/ { @start[args->skaddr] = nsecs; } \
tracepoint:sock:inet_sock_set_state /args->oldstate == 2 && @start[args->skaddr]/ { @us = hist((nsecs - @start[args->skaddr]) / 1000); delete(@start[args->skaddr]); }";

/// One churn run: rate and connections.
struct Churn {
    rate: f64,
    connections: f64,
}

fn churn(seconds: u32, rate: Option<u32>) -> Result<Churn> {
    let load = workspace_root().join("target/release/netlens-load");
    let mut command = Command::new(load);
    command.args(["churn", &seconds.to_string()]);
    if let Some(rate) = rate {
        command.arg(rate.to_string());
    }
    let output = command.output().context("running netlens-load")?;
    if !output.status.success() {
        bail!("netlens-load failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let field = |name: &str| stdout.split_whitespace().find_map(|w| w.strip_prefix(name)?.parse::<f64>().ok());
    Ok(Churn {
        rate: field("rate=").context("netlens-load printed no rate")?,
        connections: field("connections=").context("netlens-load printed no count")?,
    })
}

fn bulk(seconds: u32) -> Result<f64> {
    let load = workspace_root().join("target/release/netlens-load");
    let output = Command::new(load).args(["bulk", &seconds.to_string()]).output().context("running netlens-load")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout.split_whitespace().find_map(|w| w.strip_prefix("rate=")?.parse().ok()).context("netlens-load printed no rate")
}

/// Per program loaded after `newer_than`: (name, runs, ns) over one bulk
/// run with stats on (its rate is not kept: stats slow it).
fn bulk_measured(seconds: u32, newer_than: u32) -> Result<Vec<(String, u64, u64)>> {
    let _stats = StatsOn::new()?;
    let before = bpfstats::snapshot()?;
    bulk(seconds)?;
    Ok(bpfstats::ran_since(&before, &bpfstats::snapshot()?, newer_than))
}

/// ns per run of the `tcp_probe` build that served a bulk run (the other
/// may be loaded, never run).
fn probe_ns_per_run(ran: &[(String, u64, u64)]) -> Option<f64> {
    let (_, runs, ns) = ran.iter().filter(|(name, _, _)| name == "tcp_probe" || name == "tcp_probe_btf").max_by_key(|(_, runs, _)| *runs)?;
    Some(*ns as f64 / (*runs).max(1) as f64)
}

/// Kernel time per connection and per run of the programs loaded after
/// `newer_than`, over one churn run with stats on (its rate is not the
/// one users get: stats slow every program run).
fn churn_measured(seconds: u32, newer_than: u32) -> Result<(Churn, f64, Vec<(String, u64, u64)>)> {
    let _stats = StatsOn::new()?;
    let before = bpfstats::snapshot()?;
    let run = churn(seconds, None)?;
    let ran = bpfstats::ran_since(&before, &bpfstats::snapshot()?, newer_than);
    let ns: u64 = ran.iter().map(|(_, _, ns)| ns).sum();
    let per_connection = ns as f64 / run.connections;
    Ok((run, per_connection, ran))
}

#[derive(Default)]
struct Figures {
    /// No netlens, at the start and at the end of each pair's churn runs.
    none: Vec<f64>,
    trace: Vec<f64>,
    daemon: Vec<f64>,
    reference: Vec<f64>,
    trace_ns_per_conn: Vec<f64>,
    reference_ns_per_conn: Vec<f64>,
    attach_ms: Vec<f64>,
    quiet_attach_ms: Vec<f64>,
    daemon_rss_mib: Vec<(f64, f64)>,
    daemon_user_per_10k: Vec<f64>,
    bulk_none: Vec<f64>,
    bulk_netlens: Vec<f64>,
    bulk_empty: Vec<f64>,
    probe_ns: Vec<f64>,
    empty_ns: Vec<f64>,
    /// The same two costs with flows in socket storage, and in the table.
    storage_ns_per_conn: Vec<f64>,
    storage_probe_ns: Vec<f64>,
    table_ns_per_conn: Vec<f64>,
    table_probe_ns: Vec<f64>,
    top_cpu_pct: Vec<(f64, f64)>,
    /// Empty programs on netlens's hooks (the dispatch floor): churn rate,
    /// kernel ns and program runs per connection, how many hooks.
    floor: Vec<f64>,
    floor_ns_per_conn: Vec<f64>,
    floor_runs_per_conn: Vec<f64>,
    floor_hooks: usize,
}

pub fn all(netlens: &Path, pairs: u32, seconds: u32) -> Result<()> {
    let mut f = Figures::default();
    let hooks = served_hooks(netlens)?;
    for pair in 1..=pairs {
        // Churn: no netlens, trace, daemon, bpftrace.
        let none = churn(seconds, None)?;
        f.none.push(none.rate);

        let newer_than = bpfstats::highest_id()?;
        let (tracer, attached) = start_tracer(netlens)?;
        let kept = churn(seconds, None);
        let measured = churn_measured(seconds, newer_than);
        stop_netlens(tracer)?;
        let (kept, (measured_run, per_connection, programs)) = (kept?, measured?);
        f.trace.push(kept.rate);
        f.trace_ns_per_conn.push(per_connection);
        f.attach_ms.push(attached.as_secs_f64() * 1e3);
        println!(
            "pair {pair}: churn none {:.0}/s, trace {:.0}/s, {per_connection:.0} ns kernel/conn ({}), attached {:.1} ms",
            none.rate,
            kept.rate,
            busiest(&programs, measured_run.connections),
            attached.as_secs_f64() * 1e3
        );

        let (daemon, _) = start_netlens(netlens, &["daemon", "--listen", "127.0.0.1:9979"], "netlens: serving")?;
        let pid = daemon.id();
        let (rss_start, cpu_start) = (rss_kib(pid)?, cpu_seconds(pid)?);
        let run = churn(seconds, None);
        let (rss_end, cpu_end) = (rss_kib(pid)?, cpu_seconds(pid)?);
        stop_netlens(daemon)?;
        let run = run?;
        f.daemon.push(run.rate);
        f.daemon_rss_mib.push((rss_start as f64 / 1024.0, rss_end as f64 / 1024.0));
        f.daemon_user_per_10k.push((cpu_end.0 - cpu_start.0) / run.connections * 10_000.0);
        println!("pair {pair}: churn daemon {:.0}/s, RSS {:.1} → {:.1} MiB", run.rate, rss_start as f64 / 1024.0, rss_end as f64 / 1024.0);

        let newer_than = bpfstats::highest_id()?;
        let mut bpftrace = Command::new("bpftrace")
            .args(["-e", BPFTRACE_HANDSHAKES])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting bpftrace")?;
        let stdout = bpftrace.stdout.take().context("bpftrace stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let started = Instant::now();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.starts_with("Attaching") => break,
                Some(Ok(_)) => {}
                _ => bail!("bpftrace did not attach"),
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("bpftrace did not attach within 30 s");
            }
        }
        let kept = churn(seconds, None);
        let measured = churn_measured(seconds, newer_than);
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(bpftrace.id() as i32, libc::SIGINT) };
        let _ = thread::spawn(move || for _ in lines {});
        let _ = bpftrace.wait();
        let (_, per_connection, _) = measured?;
        let run = kept?;
        f.reference.push(run.rate);
        f.reference_ns_per_conn.push(per_connection);
        println!("pair {pair}: churn bpftrace {:.0}/s, {per_connection:.0} ns kernel/conn", run.rate);

        // Empty programs on the hooks netlens attaches: what any tracer of
        // these hooks pays before its first instruction.
        let newer_than = bpfstats::highest_id()?;
        let empties = EmptyOnNetlensHooks::attach(&hooks)?;
        let kept = churn(seconds, None);
        let measured = churn_measured(seconds, newer_than);
        drop(empties.programs);
        let (run, (_, per_connection, ran)) = (kept?, measured?);
        f.floor.push(run.rate);
        f.floor_ns_per_conn.push(per_connection);
        f.floor_hooks = empties.attached;
        f.floor_runs_per_conn.push(ran.iter().map(|(_, runs, _)| *runs as f64).sum::<f64>() / run.connections.max(1.0));
        if !empties.missing.is_empty() {
            println!("pair {pair}: no empty program on {}", empties.missing.join(", "));
        }
        println!("pair {pair}: churn, empty programs on {} hooks {:.0}/s, {per_connection:.0} ns kernel/conn", empties.attached, run.rate);

        // The baseline again: this VM drifts by 10-20 % within a minute,
        // and with one baseline run at the start of the pair the last runs
        // were compared with a rate the machine no longer had (the empty
        // programs "kept" 1.029 of it). Every churn ratio is to the mean of
        // the runs before and after.
        let none_after = churn(seconds, None)?;
        f.none.push(none_after.rate);
        println!("pair {pair}: churn none again {:.0}/s", none_after.rate);

        // Bulk, pinned: no netlens, netlens, an empty program on tcp_probe.
        f.bulk_none.push(bulk(seconds)?);
        let newer_than = bpfstats::highest_id()?;
        let (tracer, _) = start_tracer(netlens)?;
        let rate = bulk(seconds);
        let ran = bulk_measured(seconds, newer_than);
        stop_netlens(tracer)?;
        let ran = ran?;
        f.bulk_netlens.push(rate?);
        match probe_ns_per_run(&ran) {
            Some(ns) => f.probe_ns.push(ns),
            None => println!("pair {pair}: no tcp_probe program ran during bulk: {ran:?}"),
        }
        // The two kernel costs again with flows in socket storage and in
        // the table (stats on, so no rates): the trade-off between homes.
        let storage = kernel_costs(netlens, &[("NETLENS_FLOW_STATE", "storage")], seconds)?;
        f.storage_ns_per_conn.push(storage.per_connection_ns);
        f.storage_probe_ns.push(storage.probe_ns);
        println!("pair {pair}: flows in socket storage: {:.0} ns kernel/conn, tcp_probe {:.0} ns/run", storage.per_connection_ns, storage.probe_ns);
        let table = kernel_costs(netlens, &[("NETLENS_FLOW_STATE", "table")], seconds)?;
        f.table_ns_per_conn.push(table.per_connection_ns);
        f.table_probe_ns.push(table.probe_ns);
        println!("pair {pair}: flows in the hash table: {:.0} ns kernel/conn, tcp_probe {:.0} ns/run", table.per_connection_ns, table.probe_ns);
        let empty = EmptyProgram::attach("tcp_probe")?;
        let rate = bulk(seconds);
        let ran = bulk_measured(seconds, empty.id - 1)?;
        drop(empty);
        f.bulk_empty.push(rate?);
        if let Some((_, runs, ns)) = ran.iter().find(|(name, _, _)| name == bpfstats::EMPTY_NAME) {
            f.empty_ns.push(*ns as f64 / (*runs).max(1) as f64);
        }
        println!(
            "pair {pair}: bulk none {:.2}, netlens {:.2}, empty program {:.2} Gbit/s; tcp_probe {:.0} ns/run, empty {:.0} ns/run",
            f.bulk_none.last().unwrap_or(&0.0),
            f.bulk_netlens.last().unwrap_or(&0.0),
            f.bulk_empty.last().unwrap_or(&0.0),
            f.probe_ns.last().unwrap_or(&0.0),
            f.empty_ns.last().unwrap_or(&0.0)
        );
    }
    // top at 10,000 connections a second.
    f.top_cpu_pct.push(top_at(netlens, seconds.max(10), 10_000)?);
    f.quiet_attach_ms = quiet_starts(netlens)?;
    print_table(&f, pairs);
    Ok(())
}

/// The hooks serving netlens's features on this kernel, as `netlens check
/// --json` names them (a feature served by two, `a + b`, gives both), each
/// once: where the dispatch floor's empty programs go.
fn served_hooks(netlens: &Path) -> Result<Vec<String>> {
    let output = Command::new(netlens).args(["check", "--json"]).output().context("running netlens check")?;
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).context("reading `netlens check --json`")?;
    let mut hooks: Vec<String> = Vec::new();
    for feature in report["features"].as_array().into_iter().flatten() {
        for hook in feature["hook"].as_str().unwrap_or("").split(" + ").filter(|hook| !hook.is_empty()) {
            if !hooks.iter().any(|known| known == hook) {
                hooks.push(hook.to_string());
            }
        }
    }
    if hooks.is_empty() {
        bail!("`netlens check --json` named no hook: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(hooks)
}

/// Starts of `trace` on a quiet machine: spawn to `netlens: attached`, ms.
/// The starts in the pairs above come right after a churn run, while the
/// kernel still tears that run's namespace down (its sockets, its
/// TIME_WAIT entries: a core busy for tens of ms), which no deployment
/// sees at every start; both are reported.
fn quiet_starts(netlens: &Path) -> Result<Vec<f64>> {
    const STARTS: usize = 10;
    thread::sleep(Duration::from_secs(3));
    let mut starts = Vec::with_capacity(STARTS);
    for _ in 0..STARTS {
        let (tracer, attached) = start_tracer(netlens)?;
        stop_netlens(tracer)?;
        starts.push(attached.as_secs_f64() * 1e3);
        thread::sleep(Duration::from_millis(300));
    }
    Ok(starts)
}

/// `cargo xtask bench cost --against OTHER`: kernel time per connection
/// (churn) and per `tcp_probe` run (pinned bulk), from BPF stats, of
/// `trace --json` from this build and from `other`,
/// alternating, with each run's busiest programs: an A/B of an eBPF change
/// on the same host minutes apart, where the machine's drift is smaller
/// than between two `bench all` runs. Each pair swaps which build runs
/// first (A B, B A, ...): the first run of all starts cold, and with a
/// fixed order "this build" paid for it in every comparison.
pub fn cost(netlens: &Path, other: &Path, pairs: u32, seconds: u32) -> Result<()> {
    let builds = [("this build", netlens), ("--against", other)];
    let mut per_connection = [Vec::new(), Vec::new()];
    let mut per_segment = [Vec::new(), Vec::new()];
    for pair in 1..=pairs {
        let order = if pair % 2 == 1 { [0, 1] } else { [1, 0] };
        for index in order {
            let (label, binary) = builds[index];
            let costs = kernel_costs(binary, &[], seconds)?;
            per_connection[index].push(costs.per_connection_ns);
            per_segment[index].push(costs.probe_ns);
            println!(
                "pair {pair}: {label}: {:.0} conn/s, {:.0} ns kernel/conn ({}); bulk: tcp_probe {:.0} ns/run",
                costs.churn.rate,
                costs.per_connection_ns,
                busiest(&costs.programs, costs.churn.connections),
                costs.probe_ns
            );
        }
    }
    let (this, against) = (mean(&per_connection[0]), mean(&per_connection[1]));
    println!("cost: this build {this:.0} ns/conn, --against {against:.0} ns/conn, ratio {:.3}", this / against.max(1.0));
    let (this, against) = (mean(&per_segment[0]), mean(&per_segment[1]));
    println!("cost: tcp_probe this build {this:.0} ns/run, --against {against:.0} ns/run, ratio {:.3}", this / against.max(1.0));
    Ok(())
}

/// What `trace --json` from `netlens` (with `env`) costs the kernel, BPF
/// stats on: per connection under churn, per `tcp_probe` run under a
/// pinned bulk transfer (0 where none ran).
struct KernelCosts {
    churn: Churn,
    per_connection_ns: f64,
    programs: Vec<(String, u64, u64)>,
    probe_ns: f64,
}

fn kernel_costs(netlens: &Path, env: &[(&str, &str)], seconds: u32) -> Result<KernelCosts> {
    let newer_than = bpfstats::highest_id()?;
    let (tracer, _) = start_netlens_with(netlens, &["trace", "--json"], "netlens: attached", env)?;
    let measured = churn_measured(seconds, newer_than);
    let bulk_ran = measured.is_ok().then(|| bulk_measured(seconds, newer_than));
    stop_netlens(tracer)?;
    let (churn, per_connection_ns, programs) = measured?;
    let probe_ns = bulk_ran.transpose()?.as_deref().and_then(probe_ns_per_run).unwrap_or(0.0);
    Ok(KernelCosts { churn, per_connection_ns, programs, probe_ns })
}

/// The costliest programs of a run: runs per connection × ns per run.
fn busiest(programs: &[(String, u64, u64)], connections: f64) -> String {
    let mut sorted = programs.to_vec();
    sorted.sort_by_key(|(_, _, ns)| std::cmp::Reverse(*ns));
    sorted
        .iter()
        .take(8)
        .map(|(name, runs, ns)| format!("{name} {:.1}×{:.0} ns", *runs as f64 / connections.max(1.0), *ns as f64 / (*runs).max(1) as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `netlens top` in tmux under paced churn: (% of one core, conn/s).
fn top_at(netlens: &Path, seconds: u32, rate: u32) -> Result<(f64, f64)> {
    let top = TopSession::start(netlens, format!("netlens-bench-all-{}", std::process::id()))?;
    let before = cpu_seconds(top.pid)?;
    let churn_started = Instant::now();
    let run = churn(seconds, Some(rate));
    let after = cpu_seconds(top.pid);
    let elapsed = churn_started.elapsed().as_secs_f64();
    drop(top);
    let (run, after) = (run?, after?);
    let cpu = (after.0 - before.0) + (after.1 - before.1);
    Ok((cpu / elapsed * 100.0, run.rate))
}

fn print_table(f: &Figures, pairs: u32) {
    let range = |v: &[f64]| {
        let (lo, hi) = min_max(v);
        format!("[{lo:.0}..{hi:.0}]")
    };
    // Ratios are medians of per-pair ratios, each against its own pair's
    // baselines (two for churn, around netlens's runs; one for bulk).
    let kept = |with: &[f64]| ratio_summary(&pair_ratios(with, &f.none, 2));
    let bulk_kept = |with: &[f64]| ratio_summary(&pair_ratios(with, &f.bulk_none, 1));
    let machine = capture(Command::new("uname").arg("-r")).unwrap_or_default();
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!(
        "bench all: {pairs} pairs, kernel {}, {cores} cores; rates and costs are means over pairs, ratios the median of per-pair ratios [range]",
        machine.trim()
    );
    println!("| figure | no netlens | netlens | reference | netlens / floor | goal |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| churn rate kept, `trace --json > /dev/null` (stats off) | {:.0}/s {} | {:.0}/s ({}) | bpftrace {:.0}/s ({}) | {} | ≥ 0.97 |",
        mean(&f.none),
        range(&f.none),
        mean(&f.trace),
        kept(&f.trace),
        mean(&f.reference),
        kept(&f.reference),
        kept(&f.trace)
    );
    println!("| churn rate kept, `daemon` | {:.0}/s | {:.0}/s ({}) | | {} | ≥ 0.97 |", mean(&f.none), mean(&f.daemon), kept(&f.daemon), kept(&f.daemon));
    println!(
        "| churn rate kept, empty programs on netlens's {} hooks (the dispatch floor) | | | {:.0}/s ({}) | trace {}, daemon {} of it | |",
        f.floor_hooks,
        mean(&f.floor),
        kept(&f.floor),
        ratio_summary(&pair_ratios(&f.trace, &f.floor, 1)),
        ratio_summary(&pair_ratios(&f.daemon, &f.floor, 1))
    );
    println!(
        "| kernel time per connection (BPF stats, own run) | 0 | {:.0} ns | bpftrace {:.0} ns | {:.1}× bpftrace | ≤ 2,000 ns |",
        mean(&f.trace_ns_per_conn),
        mean(&f.reference_ns_per_conn),
        mean(&f.trace_ns_per_conn) / mean(&f.reference_ns_per_conn).max(1.0)
    );
    println!(
        "| kernel time per connection, empty programs on the same hooks (BPF stats) | | | {:.0} ns ({:.1} runs) | netlens +{:.0} ns | |",
        mean(&f.floor_ns_per_conn),
        mean(&f.floor_runs_per_conn),
        mean(&f.trace_ns_per_conn) - mean(&f.floor_ns_per_conn)
    );
    println!(
        "| tcp_probe per run (BPF stats, own run) | | {:.0} ns | empty program {:.0} ns | +{:.0} ns | ≤ 100 ns, ≤ +40 ns |",
        mean(&f.probe_ns),
        mean(&f.empty_ns),
        mean(&f.probe_ns) - mean(&f.empty_ns)
    );
    println!(
        "| the same two, flows in socket storage (`NETLENS_FLOW_STATE=storage`) | | {:.0} ns per connection, tcp_probe {:.0} ns | | +{:.0} ns over the empty program | ≤ 2,000 ns; ≤ 100 ns, ≤ +40 ns |",
        mean(&f.storage_ns_per_conn),
        mean(&f.storage_probe_ns),
        mean(&f.storage_probe_ns) - mean(&f.empty_ns)
    );
    println!(
        "| the same two, flows in the hash table (`NETLENS_FLOW_STATE=table`) | | {:.0} ns per connection, tcp_probe {:.0} ns | | +{:.0} ns over the empty program | ≤ 2,000 ns; ≤ 100 ns, ≤ +40 ns |",
        mean(&f.table_ns_per_conn),
        mean(&f.table_probe_ns),
        mean(&f.table_probe_ns) - mean(&f.empty_ns)
    );
    println!(
        "| bulk throughput kept (pinned, stats off) | {:.2} Gbit/s | {:.2} Gbit/s ({}) | empty program {:.2} Gbit/s ({}) | {} | ≥ 0.98 |",
        mean(&f.bulk_none),
        mean(&f.bulk_netlens),
        bulk_kept(&f.bulk_netlens),
        mean(&f.bulk_empty),
        bulk_kept(&f.bulk_empty),
        ratio_summary(&pair_ratios(&f.bulk_netlens, &f.bulk_empty, 1))
    );
    let worst_attach = f.attach_ms.iter().cloned().fold(0.0, f64::max);
    println!("| attached after start, right after a churn run | | {:.1} ms mean, {worst_attach:.1} ms max | | | ≤ 50 ms |", mean(&f.attach_ms));
    let worst_quiet = f.quiet_attach_ms.iter().cloned().fold(0.0, f64::max);
    println!(
        "| attached after start, quiet ({} starts) | | {:.1} ms mean, {worst_quiet:.1} ms max | | | ≤ 50 ms |",
        f.quiet_attach_ms.len(),
        mean(&f.quiet_attach_ms)
    );
    for (cpu, rate) in &f.top_cpu_pct {
        println!("| `top` CPU at {rate:.0} conn/s | | {cpu:.2} % of one core | | | ≤ 2 % at 10,000/s |");
    }
    // One row, each churn run's start → end side by side: flat is a
    // comparison across runs, not within one.
    let rss: Vec<String> = f.daemon_rss_mib.iter().map(|(start, end)| format!("{start:.1} → {end:.1}")).collect();
    println!("| daemon RSS under churn ({} runs) | | {} MiB | | | ≤ 30 MB, flat |", rss.len(), rss.join(", "));
    println!("| daemon user CPU per 10,000 connections | | {:.4} s | | | ≤ 0.02 s |", mean(&f.daemon_user_per_10k));
}
