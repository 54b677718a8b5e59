//! `netlens daemon` against the kernel: real traffic in a private namespace,
//! a real HTTP client (curl), the exposition checked by promtool and its
//! numbers compared with the traffic made and with nstat and ss. Needs root.
//!
//! The daemon runs inside the test's namespace (`ip netns exec`), so its
//! HTTP port and its socket census are the namespace's; `--netns` keeps
//! other tests' traffic out of its counters.

use std::{
    io::Read,
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result};
use netlens_tests::{
    assert_close,
    nstat_delta,
    exposition::{self, get, parse, promtool_check, sum, Sample},
    traffic::{churn_server, clients, retry_without_backoff, Server},
    Netlens, Netns,
};

const LISTEN: &str = "127.0.0.1:9977";

fn start_daemon(netns: &Netns, extra: &[&str]) -> Result<Netlens> {
    let inode = netns.inode()?.to_string();
    let mut args = vec!["daemon", "--netns", &inode];
    args.extend_from_slice(extra);
    Netlens::start_in(Some(&netns.name), &args)
}

/// Scrapes, checks the text with promtool, returns the samples.
fn scrape(netns: &Netns) -> Result<Vec<Sample>> {
    // Events reach the daemon within its 20 ms drain timer.
    std::thread::sleep(Duration::from_millis(100));
    let text = get(netns, LISTEN, "/metrics")?;
    promtool_check(&text)?;
    parse(&text)
}

/// N connections: opened counters and the handshake histogram count N on
/// each side, under the endpoint they belong to; data retransmits under
/// 2 % loss equal the kernel's TcpRetransSegs.
#[test]
fn counters_move_by_exactly_the_traffic() -> Result<()> {
    let netns = Netns::new()?;
    let daemon = start_daemon(&netns, &[])?;
    assert_eq!(get(&netns, LISTEN, "/healthz")?.trim(), "ok");
    let addr: SocketAddr = "127.0.0.1:8090".parse()?;
    let _server = Server::start(&netns, addr, 1000)?;
    const N: usize = 150;
    clients(&netns, addr, N, 10, 100)?;
    // Then bulk transfers under 2 % loss toward the server.
    netns.nft("table inet loss {\n chain pre {\n  type filter hook prerouting priority 0;\n  tcp dport 8090 numgen random mod 1000 < 20 drop\n }\n}\n")?;
    let before = netns.nstat()?;
    clients(&netns, addr, 6, 3, 2 << 20)?;
    netns.wait_closed(Duration::from_secs(30))?;
    let after = netns.nstat()?;
    let samples = scrape(&netns)?;

    let total = (N + 6) as f64;
    // Besides the traffic: the healthz request and this scrape, curl's own
    // connections to the daemon (active from curl, passive to *:9977).
    let requests = 2.0;
    // Exact, less only the events netlens reported lost or the kernel
    // skipped (a handshake's program run nested on a busy CPU; rare).
    let lost = sum(&samples, "netlens_events_lost_total", &[]);
    let exact_but_lost = |counted: f64, expected: f64, what: &str| assert_close(counted as u64, expected as u64, lost as u64, what);
    let opened = "netlens_tcp_connections_opened_total";
    exact_but_lost(sum(&samples, opened, &[("direction", "active"), ("endpoint", "127.0.0.1:8090")]), total, "opened active");
    exact_but_lost(sum(&samples, opened, &[("direction", "passive"), ("endpoint", "*:8090")]), total, "opened passive");
    let handshakes = "netlens_tcp_handshake_duration_seconds_count";
    exact_but_lost(sum(&samples, handshakes, &[("direction", "active")]), total + requests, "active handshakes");
    exact_but_lost(sum(&samples, handshakes, &[("direction", "passive")]), total + requests, "passive handshakes");
    // Closes, per endpoint: every one on its own side. Only events netlens
    // reported lost (or the kernel skipped) may be missing, and no close
    // lands anywhere else (a close with the wrong direction would land
    // under its own ephemeral port's endpoint).
    let closed = "netlens_tcp_connections_closed_total";
    let active = sum(&samples, closed, &[("direction", "active"), ("endpoint", "127.0.0.1:8090")]);
    let passive = sum(&samples, closed, &[("direction", "passive"), ("endpoint", "*:8090")]);
    eprintln!("closed: {active} active, {passive} passive of {total} each; events lost {lost}");
    // First, so that a count short below names where the close went.
    let elsewhere: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == closed && s.value > 0.0)
        .filter(|s| !matches!(s.label("endpoint"), Some("127.0.0.1:8090" | "*:8090" | "127.0.0.1:9977" | "*:9977")))
        .collect();
    assert!(elsewhere.is_empty(), "closes under other endpoints: {elsewhere:?}");
    let sockets_left = netns.exec(&["ss", "-tanH", "state", "all"]).unwrap_or_default();
    assert!(active <= total && total - active <= lost, "closed {active} active of {total}, lost {lost}; sockets now:\n{sockets_left}");
    assert!(passive <= total && total - passive <= lost, "closed {passive} passive of {total}, lost {lost}; sockets now:\n{sockets_left}");

    let retransmits = sum(&samples, "netlens_tcp_retransmits_total", &[]);
    let kernel = nstat_delta(&before, &after, "TcpRetransSegs") as f64;
    eprintln!("retransmits: netlens {retransmits}, TcpRetransSegs {kernel}, events lost {lost}");
    assert!(kernel > 0.0, "2 % loss over 12 MB retransmitted nothing");
    assert!(retransmits <= kernel && kernel - retransmits <= lost, "netlens {retransmits} vs kernel {kernel}");
    // The exact quantiles cover the same handshakes.
    exact_but_lost(
        sum(&samples, "netlens_tcp_handshake_duration_recent_seconds_count", &[("direction", "active")]),
        total + requests,
        "recent active handshakes",
    );
    // A normal run: no program failed part way, no map read failed. One
    // series per attached program, so a failure would show.
    let errors: Vec<&Sample> = samples.iter().filter(|s| s.name == "netlens_bpf_errors_total").collect();
    eprintln!("bpf errors: {:?}", errors.iter().map(|s| (s.label("program").unwrap_or(""), s.value)).collect::<Vec<_>>());
    assert!(errors.len() >= 8, "one series per attached program: {errors:?}");
    // The build that serves: BTF tracepoint, or raw (see netlens-ebpf's sock.rs).
    assert!(errors.iter().any(|s| matches!(s.label("program"), Some("tcp_probe" | "tcp_probe_btf"))), "{errors:?}");
    assert_eq!(errors.iter().map(|s| s.value).sum::<f64>(), 0.0, "{errors:?}");
    assert_eq!(sum(&samples, "netlens_map_read_failures_total", &[]), 0.0);

    let (traced, _) = daemon.stop_with(libc::SIGTERM)?;
    assert!(traced.events.is_empty(), "the daemon wrote to stdout");
    Ok(())
}

/// 5,000 distinct remote endpoints (127.x.y.1:9100): series stay under the
/// bound, top-k endpoints are tracked, the rest adds up under `other`.
#[test]
fn series_stay_bounded_with_5000_endpoints() -> Result<()> {
    let netns = Netns::new()?;
    let _daemon = start_daemon(&netns, &["--top-k", "50"])?;
    churn_server(&netns, "0.0.0.0:9100".parse()?)?;
    let connect_to = |from: u32, to: u32| {
        netns.spawn(move || -> Result<()> {
            let mut buffer = [0u8; 16];
            for i in from..to {
                let ip = Ipv4Addr::new(127, 1 + (i / 250) as u8, (i % 250) as u8, 1);
                let mut stream = TcpStream::connect_timeout(&SocketAddrV4::new(ip, 9100).into(), Duration::from_secs(5))?;
                stream.shutdown(Shutdown::Write)?;
                while stream.read(&mut buffer)? > 0 {}
            }
            Ok(())
        })
    };
    let _ = connect_to(0, 100).join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    let few = scrape(&netns)?;
    let handles: Vec<_> = (0..4).map(|t| connect_to(100 + t * 1225, 100 + (t + 1) * 1225)).collect();
    for handle in handles {
        let _ = handle.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    let many = scrape(&netns)?;

    let endpoints = |samples: &[Sample]| {
        let mut names: Vec<String> = samples.iter().filter_map(|s| s.label("endpoint").map(str::to_string)).collect();
        names.sort();
        names.dedup();
        names.len()
    };
    eprintln!("series: {} after 100 endpoints, {} after 5,000; endpoint values {}", few.len(), many.len(), endpoints(&many));
    // 50 remote endpoints + the listener *:9100 share 50 slots, plus other.
    assert!(endpoints(&many) <= 51, "{} endpoint label values", endpoints(&many));
    assert_eq!(sum(&many, "netlens_endpoints_tracked", &[]), 50.0);
    // The bound: what 51 endpoints can have, whatever the traffic.
    assert!(many.len() <= few.len() + 200, "series grew from {} to {}", few.len(), many.len());
    assert!(many.len() < 6_000, "{} series", many.len());
    let opened = sum(&many, "netlens_tcp_connections_opened_total", &[("direction", "active")]);
    // The two scrapes are connections too (curl to the daemon).
    assert_eq!(opened, 5_002.0, "tracked + other must add up");
    Ok(())
}

/// 500 connections ending in TIME_WAIT toward one port: the census's gauge
/// equals `ss`, and the ports ratio is that over ip_local_port_range.
#[test]
fn census_counts_time_wait_and_ports() -> Result<()> {
    let netns = Netns::new()?;
    let _daemon = start_daemon(&netns, &["--census-interval", "0.2"])?;
    let addr: SocketAddr = "127.0.0.1:8091".parse()?;
    let _server = Server::start(&netns, addr, 10)?;
    // The client half-closes first, so the client side ends in TIME_WAIT.
    clients(&netns, addr, 500, 10, 10)?;
    netns.wait_closed(Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_millis(300));
    let samples = scrape(&netns)?;
    // The scrape's own connection closed after the census was taken.
    let ss_time_wait = netns.exec(&["ss", "-tanH", "state", "time-wait"])?.lines().filter(|l| !l.contains(":9977")).count() as f64;
    let gauge = sum(&samples, "netlens_tcp_sockets", &[("state", "time_wait")]);
    eprintln!("TIME_WAIT: netlens {gauge}, ss {ss_time_wait}");
    assert!(ss_time_wait >= 500.0, "ss shows {ss_time_wait} TIME_WAIT sockets");
    assert_eq!(gauge, ss_time_wait);
    let range = netns.exec(&["cat", "/proc/sys/net/ipv4/ip_local_port_range"])?;
    let bounds: Vec<f64> = range.split_whitespace().filter_map(|n| n.parse().ok()).collect();
    let size = bounds[1] - bounds[0] + 1.0;
    let ratio = sum(&samples, "netlens_tcp_ephemeral_ports_used_ratio", &[("destination", "127.0.0.1:8091")]);
    eprintln!("ports ratio toward 127.0.0.1:8091: {ratio} ({} of {size})", ratio * size);
    assert_eq!((ratio * size).round(), ss_time_wait);
    Ok(())
}

/// `/healthz` is 200 while the event loop drains, also when no event
/// arrives for longer than its staleness bound (5 s): the loop's own timer
/// keeps draining, so an idle host is healthy.
#[test]
fn healthz_is_up_while_the_loop_drains() -> Result<()> {
    let netns = Netns::new()?;
    let _daemon = start_daemon(&netns, &[])?;
    assert_eq!(get(&netns, LISTEN, "/healthz")?, "ok\n");
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(get(&netns, LISTEN, "/healthz")?, "ok\n", "idle for 6 s, yet the loop drains");
    Ok(())
}

/// SIGTERM: exit 0 within 1 s. Port in use, bad config file, bad flags:
/// one line on stderr and a non-zero exit, before anything is loaded.
#[test]
fn signals_and_bad_settings() -> Result<()> {
    let netns = Netns::new()?;
    let daemon = start_daemon(&netns, &[])?;
    let (_, exited_after) = daemon.stop_with(libc::SIGTERM)?;
    eprintln!("SIGTERM to exit: {exited_after:?}");
    assert!(exited_after < Duration::from_secs(1), "took {exited_after:?}");

    // Inside the namespace, where the port is taken.
    let refused = |args: &[&str], expect: &str| {
        let mut command = std::process::Command::new("ip");
        command.args(["netns", "exec", &netns.name]).arg(netlens_tests::netlens::binary()).args(args);
        netlens_tests::netlens::assert_one_line_error(command, expect);
    };
    let taken = netns.spawn(|| TcpListener::bind("127.0.0.1:9978"));
    let _holder = taken.join().map_err(|_| anyhow::anyhow!("bind panicked"))??;
    refused(&["daemon", "--listen", "127.0.0.1:9978"], "cannot listen on 127.0.0.1:9978");
    refused(&["daemon", "--listen", "localhost"], "not IP:PORT");
    refused(&["daemon", "--census-interval", "0"], "census_interval must be a positive");
    refused(&["daemon", "--by", "everything"], "invalid value 'everything'");
    let config = std::env::temp_dir().join(format!("netlens-test-{}.toml", std::process::id()));
    std::fs::write(&config, "listen = \"127.0.0.1:9977\"\ntop_kk = 5\n")?;
    let config_arg = config.to_str().context("config path")?.to_string();
    let result = std::panic::catch_unwind(|| refused(&["daemon", "--config", &config_arg], "line 2: unknown field `top_kk`"));
    let _ = std::fs::remove_file(&config);
    if let Err(failure) = result {
        std::panic::resume_unwind(failure);
    }
    Ok(())
}

#[test]
fn exposition_parser_reads_what_promtool_accepts() -> Result<()> {
    let text = "# HELP a_total x\n# TYPE a_total counter\na_total{endpoint=\"*:80\"} 2\n";
    exposition::promtool_check(text)?;
    assert_eq!(sum(&parse(text)?, "a_total", &[("endpoint", "*:80")]), 2.0);
    Ok(())
}

/// The doctor's findings as series: a process retrying a closed port every
/// 50 ms makes `netlens_finding_active{finding="retry_storm"}` 1 for that
/// endpoint, and nothing else holds.
#[test]
fn findings_are_exported_while_they_hold() -> Result<()> {
    let netns = Netns::new()?;
    let _daemon = start_daemon(&netns, &[])?;
    let quiet = scrape(&netns)?;
    assert!(quiet.iter().all(|s| s.name != "netlens_finding_active"), "a finding before any traffic");
    let failed = retry_without_backoff(&netns, "127.0.0.1:8199".parse()?, Duration::from_millis(50), Duration::from_secs(3))?;
    let samples = scrape(&netns)?;
    let active: Vec<&Sample> = samples.iter().filter(|s| s.name == "netlens_finding_active").collect();
    eprintln!("{failed} failed connects; active findings: {:?}", active.iter().map(|s| (s.label("finding"), s.label("endpoint"))).collect::<Vec<_>>());
    assert_eq!(sum(&samples, "netlens_finding_active", &[("finding", "retry_storm"), ("endpoint", "127.0.0.1:8199")]), 1.0);
    assert_eq!(active.len(), 1, "only the retry storm holds");
    Ok(())
}
