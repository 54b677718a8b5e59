//! `netlens doctor` against injected faults: one scenario per finding, in
//! its own namespace, each asserting that the doctor names that finding on
//! the right endpoint and no other warning or critical finding; and healthy
//! traffic (pinned bulk, keep-alive, a few short connections) with no
//! warning or critical finding at all. Needs root.
//!
//! The doctor runs inside the namespace (`ip netns exec`, so its socket
//! census is the namespace's) with `--netns` (so other tests' traffic stays
//! out), and is ended with SIGINT once the scenario is over: the window is
//! the scenario.

use std::{net::SocketAddr, thread, time::Duration};

use anyhow::Result;
use netlens_tests::{
    bulk::Bulk,
    sockets::listener_with_backlog,
    traffic::{churn_server, clients, keepalive, paced_churn, retry_without_backoff, Server},
    Netlens, Netns,
};
use serde_json::Value;

fn doctor(netns: &Netns) -> Result<Netlens> {
    let inode = netns.inode()?.to_string();
    Netlens::start_in(Some(&netns.name), &["doctor", "--json", "--duration", "60", "--netns", &inode])
}

/// Ends the doctor (SIGINT: it reports what it saw) and returns its
/// findings.
fn findings(doctor: Netlens) -> Result<Vec<Value>> {
    let traced = doctor.stop()?;
    for line in &traced.stderr {
        eprintln!("doctor stderr: {line}");
    }
    for finding in &traced.events {
        eprintln!("finding: {finding}");
    }
    for finding in &traced.events {
        for key in ["finding", "severity", "endpoint", "summary", "advice"] {
            assert!(finding[key].is_string(), "{key} missing: {finding}");
        }
        assert!(finding["evidence"].is_object(), "{finding}");
    }
    Ok(traced.events)
}

fn serious(findings: &[Value]) -> Vec<&Value> {
    findings.iter().filter(|f| f["severity"] == "warning" || f["severity"] == "critical").collect()
}

/// `kind` is found on `endpoint`, and every warning or critical finding is
/// of that kind (on loopback both ends of a connection are watched: the
/// client's `ip:port` and the listener's `*:port` may both show it).
fn assert_only<'a>(findings: &'a [Value], kind: &str, endpoint: &str) -> &'a Value {
    let found = assert_found(findings, kind, endpoint);
    for f in serious(findings) {
        assert_eq!(f["finding"], kind, "another finding: {f}");
    }
    found
}

/// `kind` is found on `endpoint` as a warning or critical finding.
fn assert_found<'a>(findings: &'a [Value], kind: &str, endpoint: &str) -> &'a Value {
    let found = findings
        .iter()
        .find(|f| f["finding"] == kind && f["endpoint"] == endpoint)
        .unwrap_or_else(|| panic!("no {kind} on {endpoint}: {findings:?}"));
    assert!(found["severity"] == "warning" || found["severity"] == "critical", "{found}");
    found
}

fn assert_healthy(findings: &[Value]) {
    assert!(serious(findings).is_empty(), "healthy traffic has findings: {findings:?}");
}

fn nft_prerouting(netns: &Netns, rule: &str) -> Result<()> {
    netns.nft(&format!("table inet doctor {{\n chain pre {{\n  type filter hook prerouting priority 0;\n  {rule}\n }}\n}}\n"))
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// 150 short connections per second for 4 s, each a few bytes.
#[test]
fn connection_churn_is_found() -> Result<()> {
    let netns = Netns::new()?;
    let addr = addr(8101);
    churn_server(&netns, addr)?;
    let doctor = doctor(&netns)?;
    let (made, _) = paced_churn(&netns, addr, 150.0, Duration::from_secs(4))?;
    let findings = findings(doctor)?;
    let found = assert_only(&findings, "connection_churn", "127.0.0.1:8101");
    eprintln!("churn: made {made} connections; doctor: {}", found["evidence"]);
    let per_s = found["evidence"]["conn_per_s"].as_f64().unwrap_or(0.0);
    assert!((60.0..=160.0).contains(&per_s), "{per_s} conn/s for 150/s over 4 s (plus start and stop)");
    assert!(found["evidence"]["short_small_pct"].as_f64() >= Some(90.0));
    Ok(())
}

/// 20 % of SYNs dropped: connects of ~1 s and ~3 s. 60 connects: about 12
/// slow ones (fewer than the rule's 3 about once in 5,000 runs). A connect
/// that loses seven SYNs in a row outlasts the client's 70 s: at 30 % and
/// 40 connects that was one run in about 115 (seen in the 6.1 guest), at
/// 20 % and 60 connects one in about 1,300.
#[test]
fn syn_loss_is_found() -> Result<()> {
    let netns = Netns::new()?;
    let addr = addr(8102);
    nft_prerouting(&netns, "tcp dport 8102 tcp flags & (syn | ack) == syn numgen random mod 1000 < 200 drop")?;
    let _server = Server::start(&netns, addr, 0)?;
    let doctor = doctor(&netns)?;
    let conns = clients(&netns, addr, 60, 20, 10)?;
    let slow = conns.iter().filter(|c| c.connect_us >= 900_000.0).count();
    netns.wait_closed(Duration::from_secs(10))?;
    let findings = findings(doctor)?;
    let found = assert_only(&findings, "syn_loss", "127.0.0.1:8102");
    let evidence = &found["evidence"];
    let counted: u64 = ["handshakes_1s", "handshakes_3s", "handshakes_7s_plus"].iter().map(|k| evidence[*k].as_u64().unwrap_or(0)).sum();
    eprintln!("syn loss: {slow} of {} connects took ≥ 0.9 s by the client's clock; doctor: {evidence}", conns.len());
    assert_eq!(counted, slow as u64, "slow handshakes: doctor vs the clients' own clocks");
    Ok(())
}

/// Every 2,500th full-size data segment is dropped together with its
/// retransmissions for 300 ms (its sequence number goes into a timed
/// nftables set), so each loss is recovered only by the retransmission
/// timeout while later segments wait at the receiver: head-of-line stalls
/// of RTO size on one long, large transfer, with little loss overall.
#[test]
fn hol_blocking_is_found() -> Result<()> {
    let netns = Netns::new()?;
    let addr = addr(8103);
    netns.nft(
        "table inet doctor {\n set held { typeof tcp sequence; flags dynamic,timeout; timeout 300ms; }\n chain pre {\n  type filter hook prerouting priority 0;\n  tcp dport 8103 tcp sequence @held drop\n  tcp dport 8103 ip length > 1000 numgen inc mod 5000 == 1200 add @held { tcp sequence } drop\n }\n}\n",
    )?;
    let doctor = doctor(&netns)?;
    let before = netns.nstat()?;
    // One segment in 5,000 held for 300 ms: about nine RTO stalls over
    // 64 MB. How much the sender resends after each RTO is not ours to
    // fix: usually about 36 segments (7 retransmits per 1,000 segments,
    // below the loss rule's 10), but one fresh-clone CI run resent about
    // 119 per stall (1,187 of 47,551 segments, none of them spurious) and
    // the doctor rightly named retransmit_loss too. That one other finding
    // is allowed, and only when the kernel counted at least the
    // retransmits it reports.
    let transfer = Bulk { bytes: 64 << 20, cpu: Some(0), ..Bulk::default() }.run(&netns, addr)?;
    netns.wait_closed(Duration::from_secs(10))?;
    let after = netns.nstat()?;
    let findings = findings(doctor)?;
    let found = assert_found(&findings, "hol_blocking", "*:8103");
    let kernel_retransmits = after.get("TcpRetransSegs").copied().unwrap_or(0) - before.get("TcpRetransSegs").copied().unwrap_or(0);
    for other in serious(&findings).into_iter().filter(|f| f["finding"] != "hol_blocking") {
        assert_eq!(other["finding"], "retransmit_loss", "another finding: {other}");
        let evidence = &other["evidence"];
        let (retransmitted, sent) = (evidence["retransmitted_segs"].as_u64().unwrap_or(0), evidence["segs_out"].as_u64().unwrap_or(0));
        assert!(retransmitted <= kernel_retransmits, "doctor counts {retransmitted} retransmits, nstat TcpRetransSegs {kernel_retransmits}");
        assert!(retransmitted * 1000 >= 10 * sent, "retransmit_loss at {retransmitted} of {sent} segments: {other}");
        eprintln!("hol: also retransmit_loss, {retransmitted} of {sent} segments; nstat TcpRetransSegs {kernel_retransmits}");
    }
    eprintln!("hol: transfer took {:?}; doctor: {}", transfer.elapsed, found["evidence"]);
    assert!(found["evidence"]["longest_stall_us"].as_u64() >= Some(200_000));
    Ok(())
}

/// 2 % random loss on data toward the server.
#[test]
fn retransmit_loss_is_found() -> Result<()> {
    let netns = Netns::new()?;
    let addr = addr(8104);
    nft_prerouting(&netns, "tcp dport 8104 tcp flags & syn == 0 numgen random mod 1000 < 20 drop")?;
    let _server = Server::start(&netns, addr, 0)?;
    let doctor = doctor(&netns)?;
    let before = netns.nstat()?;
    clients(&netns, addr, 4, 2, 2 << 20)?;
    netns.wait_closed(Duration::from_secs(20))?;
    let after = netns.nstat()?;
    let findings = findings(doctor)?;
    let found = assert_only(&findings, "retransmit_loss", "127.0.0.1:8104");
    let delta = |key: &str| after.get(key).copied().unwrap_or(0) - before.get(key).copied().unwrap_or(0);
    eprintln!(
        "loss: nstat TcpRetransSegs {} of TcpOutSegs {}; doctor: {}",
        delta("TcpRetransSegs"),
        delta("TcpOutSegs"),
        found["evidence"]
    );
    // The kernel's truth. The clients' sockets' totals at close, sorted
    // into genuine and spurious (DSACK-confirmed), must equal the data
    // retransmissions seen one by one as they happened (two independent
    // paths), and cannot exceed the namespace's own count without the SYNs'
    // (syn_loss's); the rest of that count is the server's (a FIN
    // retransmitted when the client's ACK of it was dropped: one CI run
    // had 129 of 130). Under CPU contention a delayed ACK draws timer
    // retransmissions, so the rate itself is not bounded from above: 2 %
    // loss read 40.2 per 1,000 once, with 165 of the kernel's 416 spurious.
    let evidence = &found["evidence"];
    let count = |key: &str| evidence[key].as_u64().unwrap_or(0);
    let closed = count("retransmitted_segs") + count("spurious_retransmitted_segs");
    assert_eq!(closed, count("data_retransmits_live"), "close totals vs live retransmits: {evidence}");
    let kernel = delta("TcpRetransSegs") - delta("TcpExtTCPSynRetrans");
    assert!(closed <= kernel, "{closed} retransmits, more than nstat TcpRetransSegs - TcpExtTCPSynRetrans {kernel}: {evidence}");
    let per_1000 = evidence["retransmits_per_1000_segs"].as_f64().unwrap_or(0.0);
    let own = 1000.0 * count("retransmitted_segs") as f64 / count("segs_out").max(1) as f64;
    assert!((per_1000 - own).abs() < 0.1, "rate {per_1000} per 1,000 is not its own evidence's {own:.1}: {evidence}");
    assert!(per_1000 >= 10.0, "2 % loss measured as {per_1000} per 1,000");
    Ok(())
}

/// The server stops reading for 1.5 s while the client sends 64 MiB.
#[test]
fn slow_reader_is_found() -> Result<()> {
    let netns = Netns::new()?;
    let addr = addr(8105);
    let doctor = doctor(&netns)?;
    Bulk { bytes: 64 << 20, reader_pause: Duration::from_millis(1500), ..Bulk::default() }.run(&netns, addr)?;
    netns.wait_closed(Duration::from_secs(10))?;
    let findings = findings(doctor)?;
    // Our sender saw the peer's zero window; the listener's end is the one
    // not reading.
    let client = assert_only(&findings, "slow_reader", "127.0.0.1:8105");
    assert_eq!(client["evidence"]["side"], "peer");
    let server = assert_only(&findings, "slow_reader", "*:8105");
    assert_eq!(server["evidence"]["side"], "local");
    let ms = server["evidence"]["zero_window_ms"].as_f64().unwrap_or(0.0);
    eprintln!("slow reader: paused 1.5 s; doctor: client {}, server {}", client["evidence"], server["evidence"]);
    assert!((1_000.0..=2_000.0).contains(&ms), "reader paused 1.5 s, zero window {ms} ms");
    Ok(())
}

/// A listener with backlog 2 that never accepts, and 20 clients.
#[test]
fn accept_overflow_is_found() -> Result<()> {
    let netns = Netns::new()?;
    let addr = addr(8106);
    // The doctor first: where only tracepoints serve listen overflows,
    // netlens knows listeners from their listen() (README, "How it works").
    let doctor = doctor(&netns)?;
    let listener = netns.spawn(move || listener_with_backlog(addr.port(), 2)).join().expect("listener thread")??;
    let clients: Vec<_> = (0..20)
        .map(|_| {
            netns.spawn(move || {
                let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(2_500)).ok();
                thread::sleep(Duration::from_secs(3));
                drop(stream);
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client thread")?;
    }
    let findings = findings(doctor)?;
    drop(listener);
    let found = assert_only(&findings, "accept_overflow", "*:8106");
    eprintln!("accept overflow: doctor: {}", found["evidence"]);
    assert!(found["evidence"]["dropped_connections"].as_u64() > Some(0));
    assert_eq!(found["evidence"]["backlog_connections"], 2);
    Ok(())
}

/// One process connecting every 50 ms, for 3 s, to a port nobody listens
/// on: refused (reset) each time, retried at once.
#[test]
fn retry_storm_is_found() -> Result<()> {
    let netns = Netns::new()?;
    let addr = addr(8107);
    let doctor = doctor(&netns)?;
    let failed = retry_without_backoff(&netns, addr, Duration::from_millis(50), Duration::from_secs(3))?;
    let findings = findings(doctor)?;
    let found = assert_only(&findings, "retry_storm", "127.0.0.1:8107");
    eprintln!("retry storm: {failed} failed connects; doctor: {}", found["evidence"]);
    assert_eq!(found["evidence"]["failed_connects"].as_u64(), Some(failed));
    let interval = found["evidence"]["attempt_interval_p50_ms"].as_f64().unwrap_or(0.0);
    assert!((50.0..=80.0).contains(&interval), "attempts every 50 ms (+ connect), doctor says {interval} ms");
    Ok(())
}

/// ip_local_port_range of 60 ports, tcp_tw_reuse off: churn until connect()
/// fails with EADDRNOTAVAIL. Fewer than churn's minimum of connections, so
/// port exhaustion is the one finding.
#[test]
fn port_exhaustion_is_found() -> Result<()> {
    let netns = Netns::new()?;
    netns.exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40059", "net.ipv4.tcp_tw_reuse=0"])?;
    let addr = addr(8108);
    churn_server(&netns, addr)?;
    let doctor = doctor(&netns)?;
    let (made, exhausted) = paced_churn(&netns, addr, 200.0, Duration::from_secs(3))?;
    assert!(exhausted, "{made} connections without EADDRNOTAVAIL");
    thread::sleep(Duration::from_millis(2_500)); // one census at least
    let findings = findings(doctor)?;
    let found = assert_only(&findings, "port_exhaustion", "127.0.0.1:8108");
    eprintln!("ports: {made} connections then EADDRNOTAVAIL; doctor: {}", found["evidence"]);
    assert_eq!(found["evidence"]["port_range_ports"], 60);
    // The client saw exactly one EADDRNOTAVAIL (it stops there).
    assert_eq!(found["evidence"]["eaddrnotavail_connects"], 1, "{}", found["evidence"]);
    assert_eq!(found["severity"], "critical");
    Ok(())
}

/// A bulk transfer seconds long: 2 GiB here, 256 MiB in the kernel-matrix
/// guests (emulated CPUs move loopback data some ten times slower).
fn bulk_bytes() -> usize {
    if netlens_tests::in_guest() { 256 << 20 } else { 2 << 30 }
}

/// A long bulk transfer (2 GiB, seconds long), both ends on one CPU:
/// nothing is wrong.
#[test]
fn pinned_bulk_is_healthy() -> Result<()> {
    let netns = Netns::new()?;
    let doctor = doctor(&netns)?;
    Bulk { bytes: bulk_bytes(), cpu: Some(0), ..Bulk::default() }.run(&netns, addr(8110))?;
    netns.wait_closed(Duration::from_secs(10))?;
    assert_healthy(&findings(doctor)?);
    Ok(())
}

/// An unpinned bulk transfer: loopback may reorder across CPUs, which
/// shows as spurious retransmits and short stalls, not a problem.
#[test]
fn unpinned_bulk_is_healthy() -> Result<()> {
    let netns = Netns::new()?;
    let doctor = doctor(&netns)?;
    Bulk { bytes: bulk_bytes(), ..Bulk::default() }.run(&netns, addr(8111))?;
    netns.wait_closed(Duration::from_secs(10))?;
    assert_healthy(&findings(doctor)?);
    Ok(())
}

/// Four keep-alive connections, 200 requests each, 10 ms apart.
#[test]
fn keepalive_is_healthy() -> Result<()> {
    let netns = Netns::new()?;
    let doctor = doctor(&netns)?;
    let answered = keepalive(&netns, addr(8112), 4, 200, Duration::from_millis(10), 20_000)?;
    assert_eq!(answered, 800);
    netns.wait_closed(Duration::from_secs(10))?;
    assert_healthy(&findings(doctor)?);
    Ok(())
}

/// A handful of short connections.
#[test]
fn a_few_short_connections_are_healthy() -> Result<()> {
    let netns = Netns::new()?;
    let addr = addr(8113);
    let _server = Server::start(&netns, addr, 1000)?;
    let doctor = doctor(&netns)?;
    clients(&netns, addr, 8, 2, 500)?;
    netns.wait_closed(Duration::from_secs(10))?;
    assert_healthy(&findings(doctor)?);
    Ok(())
}

/// No traffic at all: one line on stderr in JSON mode, nothing on stdout;
/// in text mode one line saying what was watched. Exit 0 either way.
#[test]
fn no_finding_says_so_in_one_line() -> Result<()> {
    let netns = Netns::new()?;
    let inode = netns.inode()?.to_string();
    let json = Netlens::start_in(Some(&netns.name), &["doctor", "--json", "--duration", "1", "--netns", &inode])?
        .wait_exit(Duration::from_secs(15))?;
    assert!(json.events.is_empty());
    assert!(json.stderr.iter().any(|l| l.starts_with("netlens: no findings: watched 0 connections")), "{:?}", json.stderr);
    let output = std::process::Command::new("ip")
        .args(["netns", "exec", &netns.name])
        .arg(netlens_tests::netlens::binary())
        .args(["doctor", "--duration", "1", "--netns", &inode])
        .output()?;
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with("No findings: watched 0 connections"), "{stdout}");
    Ok(())
}

/// Bad input: one line, exit 2.
#[test]
fn bad_duration_is_one_line() {
    let mut command = std::process::Command::new(netlens_tests::netlens::binary());
    command.args(["doctor", "--duration", "soon"]);
    let output = command.output().expect("running netlens");
    assert_eq!(output.status.code(), Some(2));
    netlens_tests::netlens::assert_one_line_error(
        {
            let mut again = std::process::Command::new(netlens_tests::netlens::binary());
            again.args(["doctor", "--duration", "soon"]);
            again
        },
        "soon",
    );
}

/// A size-based drop (IP packets over 1,000 bytes toward the server, as a
/// router without ICMP "fragmentation needed" would): the handshake and a
/// 200-byte request get through, then a 64 KiB write hangs on its first
/// full-size segment, retransmitted on RTO while the doctor watches.
#[test]
fn pmtu_blackhole_is_found() -> Result<()> {
    use std::io::{Read, Write};
    let netns = Netns::new()?;
    let addr = addr(8109);
    nft_prerouting(&netns, "tcp dport 8109 ip length > 1000 drop")?;
    let server = netns.spawn(move || -> Result<()> {
        let listener = std::net::TcpListener::bind(addr)?;
        let (mut stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(8)))?;
        let mut buffer = [0u8; 65536];
        while matches!(stream.read(&mut buffer), Ok(n) if n > 0) {}
        Ok(())
    });
    thread::sleep(Duration::from_millis(200));
    let doctor = doctor(&netns)?;
    let client = netns.spawn(move || -> Result<()> {
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.write_all(&[b'q'; 200])?;
        thread::sleep(Duration::from_millis(100));
        stream.write_all(&vec![b'b'; 64 * 1024])?;
        // Hang on, as an application would, while the doctor watches.
        thread::sleep(Duration::from_millis(7_000));
        Ok(())
    });
    client.join().expect("client thread")??;
    let findings = findings(doctor)?;
    let found = assert_only(&findings, "pmtu_blackhole", "127.0.0.1:8109");
    eprintln!("pmtu: doctor: {}", found["evidence"]);
    assert_eq!(found["evidence"]["stuck_segment_bytes"], 1448, "a full-size segment (MSS 1448 at MTU 1500)");
    assert!(found["evidence"]["stuck_retransmits"].as_u64() >= Some(4));
    drop(netns);
    drop(server); // its read times out by itself (8 s); no need to wait
    Ok(())
}
