//! Connection lifecycle against the kernel's own truth: handshakes counted
//! and timed against the client's connect(), closes with exact byte counts,
//! refused connects. Needs root; each test runs in its own namespace.

use std::{
    collections::HashMap,
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;
use netlens_tests::{
    flow_table,
    traffic::{churn_server, clients, held_connections, paced_churn, Server, ServerProcess},
    Netlens, Netns,
};
use serde_json::Value;

fn port_of(event: &Value, key: &str) -> u16 {
    event[key].as_u64().unwrap_or(0) as u16
}

/// 200 connections: exactly 200 active and 200 passive handshakes, each
/// active one no longer than the client's own connect() time (+1 ms).
fn handshakes_match_connect_time(server: &str) -> Result<()> {
    let netns = Netns::new()?;
    let addr: SocketAddr = server.parse()?;
    let netlens = Netlens::trace_netns(netns.inode()?)?;
    let _server = Server::start(&netns, addr, 0)?;
    let conns = clients(&netns, addr, 200, 4, 100)?;
    netns.wait_closed(std::time::Duration::from_secs(20))?;
    let traced = netlens.stop()?;

    let on_port = |e: &&Value| port_of(e, "dport") == addr.port() || port_of(e, "sport") == addr.port();
    let active: HashMap<u16, f64> = traced
        .named("handshake")
        .filter(on_port)
        .filter(|e| e["direction"] == "active")
        .map(|e| (port_of(e, "sport"), e["handshake_us"].as_f64().unwrap_or(f64::MAX)))
        .collect();
    let passive = traced.named("handshake").filter(on_port).filter(|e| e["direction"] == "passive").count();
    // Exact, unless netlens itself reported missed events.
    let slack = traced.unaccounted() as usize;
    assert!(active.len() <= 200 && 200 - active.len() <= slack, "active handshakes: {} (missed {slack})", active.len());
    assert!(passive <= 200 && 200 - passive <= slack, "passive handshakes: {passive} (missed {slack})");
    let family = if addr.is_ipv4() { 4 } else { 6 };
    assert!(traced.named("handshake").all(|e| e["family"] == family));
    for conn in &conns {
        let Some(&handshake_us) = active.get(&conn.local_port) else {
            assert!(slack > 0, "no handshake for port {}", conn.local_port);
            continue;
        };
        let slack_us = netlens_tests::timing_slack_us(1000.0);
        assert!(
            handshake_us <= conn.connect_us + slack_us,
            "port {}: handshake {handshake_us} µs > connect() {} µs + {slack_us} µs",
            conn.local_port,
            conn.connect_us
        );
        assert!(handshake_us > 0.0);
    }
    // Active opens carry the opener's pid and comm (this test process).
    let pid = std::process::id();
    assert!(traced.named("handshake").filter(|e| e["direction"] == "active").all(|e| e["pid"] == pid));
    Ok(())
}

#[test]
fn ipv4_handshakes_match_connect_time() -> Result<()> {
    handshakes_match_connect_time("127.0.0.1:8080")
}

#[test]
fn ipv6_handshakes_match_connect_time() -> Result<()> {
    handshakes_match_connect_time("[::1]:8080")
}

/// `close` events: the server's bytes_received equals what each client
/// sent, and the client's bytes_received what the server replied.
#[test]
fn close_reports_exact_bytes() -> Result<()> {
    let netns = Netns::new()?;
    let addr: SocketAddr = "127.0.0.1:8081".parse()?;
    let netlens = Netlens::trace_netns(netns.inode()?)?;
    let server = Server::start(&netns, addr, 4321)?;
    let conns = clients(&netns, addr, 20, 2, 1_000_003)?;
    netns.wait_closed(std::time::Duration::from_secs(20))?;
    let traced = netlens.stop()?;

    let closes: Vec<&Value> = traced.named("close").collect();
    let slack = traced.unaccounted();
    let received_by_server = server.received.lock().unwrap().clone();
    for conn in &conns {
        assert_eq!(received_by_server.get(&conn.local_port), Some(&conn.sent));
        let passive = closes.iter().find(|e| e["direction"] == "passive" && port_of(e, "dport") == conn.local_port);
        let Some(passive) = passive else {
            assert!(slack > 0, "no passive close for client port {}", conn.local_port);
            continue;
        };
        assert_eq!(passive["bytes_received"], conn.sent, "server side bytes_received");
        assert_eq!(passive["bytes_sent"], 4321, "server side bytes_sent");
        let active = closes.iter().find(|e| e["direction"] == "active" && port_of(e, "sport") == conn.local_port);
        let Some(active) = active else {
            assert!(slack > 0, "no active close for port {}", conn.local_port);
            continue;
        };
        assert_eq!(active["bytes_sent"], conn.sent);
        assert_eq!(active["bytes_received"], conn.received);
        assert!(active["lifetime_us"].as_f64().unwrap_or(0.0) > 0.0);
    }
    Ok(())
}

/// A connect to a port nobody listens on: the client gets a reset and a
/// failed handshake with reason `reset`; the kernel sent that reset.
#[test]
fn refused_connect_reports_reset() -> Result<()> {
    let netns = Netns::new()?;
    let netlens = Netlens::trace_netns(netns.inode()?)?;
    let refused = netns
        .spawn(|| std::net::TcpStream::connect("127.0.0.1:9").map(|_| ()).unwrap_err().kind())
        .join()
        .unwrap()?;
    assert_eq!(refused, std::io::ErrorKind::ConnectionRefused);
    let traced = netlens.stop()?;

    let failed: Vec<&Value> = traced.named("handshake_failed").collect();
    assert_eq!(failed.len(), 1, "{:?}", traced.events);
    assert_eq!(failed[0]["reason"], "reset");
    assert_eq!(failed[0]["dport"], 9);
    assert_eq!(failed[0]["pid"], std::process::id());
    // Received on the connect()'s own socket: its process and ends, the
    // flow found in socket storage too (the typed build).
    let received: Vec<&Value> = traced.named("reset_received").collect();
    assert_eq!(received.len(), 1, "{:?}", traced.events);
    assert_eq!((&received[0]["dport"], &received[0]["pid"]), (&9.into(), &std::process::id().into()), "{}", received[0]);
    let sent: Vec<&Value> = traced.named("reset_sent").collect();
    // Kernels before 6.10 do not trace a reset sent without a socket, and
    // `netlens check` says so (resets: degraded).
    if resets_sent_without_socket_traced() {
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0]["sport"], 9, "the reset comes from the closed port's end");
    } else {
        assert_eq!(sent.len(), 0, "{sent:?}");
    }
    Ok(())
}

/// An abortive close (SO_LINGER 0) with unread data: the client's kernel
/// sends one reset from the client's end, the socket already in CLOSE
/// (tcp_disconnect moves it there first), and the server receives it. In
/// socket storage the flow outlives the close, so the reset names the
/// client's process; in the table the close removed it.
#[test]
fn abortive_close_reports_reset_sent() -> Result<()> {
    let netns = Netns::new()?;
    let netlens = Netlens::trace_netns(netns.inode()?)?;
    let addr: SocketAddr = "127.0.0.1:8094".parse()?;
    let (client_port, server_saw) = netns
        .spawn(move || -> Result<(u16, std::io::ErrorKind)> {
            use std::io::{Read as _, Write as _};
            let listener = std::net::TcpListener::bind(addr)?;
            let mut client = std::net::TcpStream::connect(addr)?;
            let (mut server, _) = listener.accept()?;
            server.write_all(b"unread")?;
            std::thread::sleep(std::time::Duration::from_millis(50));
            let port = client.local_addr()?.port();
            client.flush()?;
            netlens_tests::sockets::abort(client)?;
            let mut byte = [0u8; 1];
            let saw = server.read(&mut byte).map_or_else(|err| err.kind(), |_| std::io::ErrorKind::Other);
            Ok((port, saw))
        })
        .join()
        .expect("client thread")??;
    assert_eq!(server_saw, std::io::ErrorKind::ConnectionReset);
    let traced = netlens.stop()?;

    let sent: Vec<&Value> = traced.named("reset_sent").filter(|e| port_of(e, "sport") == client_port).collect();
    assert_eq!(sent.len(), 1, "{:?}", traced.events);
    assert_eq!((&sent[0]["dport"], &sent[0]["state"]), (&addr.port().into(), &"CLOSE".into()), "{}", sent[0]);
    assert_eq!(sent[0]["netns"], netns.inode()?, "{}", sent[0]);
    let in_storage = std::env::var("NETLENS_FLOW_STATE").as_deref() == Ok("storage") && netlens_tests::kernel_version() >= (5, 11);
    if in_storage && typed_send_reset() {
        assert_eq!(sent[0]["pid"], std::process::id(), "{}", sent[0]);
    }
    let received: Vec<&Value> = traced.named("reset_received").filter(|e| port_of(e, "dport") == client_port).collect();
    assert_eq!(received.len(), 1, "{:?}", traced.events);
    assert_eq!(received[0]["sport"], addr.port());
    Ok(())
}

/// Whether this run's netlens sends `tcp_send_reset` through its typed
/// build (not left out to test the record build).
fn typed_send_reset() -> bool {
    !std::env::var("NETLENS_SKIP_HOOKS").unwrap_or_default().split(',').any(|p| p == "tcp_send_reset_btf")
}

/// Four local ports (ip_local_port_range, TIME_WAIT reuse off) toward one
/// server: four connections hold them in TIME_WAIT, the fifth connect()
/// fails with EADDRNOTAVAIL. netlens reports exactly that one as a failed
/// handshake with reason `no_local_port`, toward the server, with no
/// source port, from this process.
#[test]
fn connect_without_a_free_port_reports_no_local_port() -> Result<()> {
    let netns = Netns::new()?;
    netns.exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40003", "net.ipv4.tcp_tw_reuse=0"])?;
    let addr: SocketAddr = "127.0.0.1:8086".parse()?;
    churn_server(&netns, addr)?;
    let netlens = Netlens::trace_netns(netns.inode()?)?;
    let (made, exhausted) = paced_churn(&netns, addr, 50.0, std::time::Duration::from_secs(5))?;
    let traced = netlens.stop()?;

    assert!(exhausted, "{made} connections over 4 ports without EADDRNOTAVAIL");
    assert_eq!(made, 4, "4 ports, each left in TIME_WAIT");
    let failed: Vec<&Value> = traced.named("handshake_failed").collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["reason"], "no_local_port", "{}", failed[0]);
    assert_eq!(failed[0]["dport"], addr.port());
    assert_eq!(failed[0]["sport"], 0);
    assert_eq!(failed[0]["pid"], std::process::id());
    let active = traced.named("handshake").filter(|e| e["direction"] == "active").count();
    assert_eq!(active as u64, made);
    Ok(())
}

/// What `netlens check --json` says of resets on this kernel: ok (every
/// reset sent is traced) or degraded (not those sent without a socket).
fn resets_sent_without_socket_traced() -> bool {
    let output = std::process::Command::new(netlens_tests::netlens::binary())
        .args(["check", "--json"])
        .output()
        .expect("running netlens check");
    let report: Value = serde_json::from_slice(&output.stdout).expect("check --json prints JSON");
    let resets = report["features"].as_array().and_then(|f| f.iter().find(|f| f["feature"] == "resets")).cloned();
    match resets.as_ref().and_then(|r| r["status"].as_str()) {
        Some("ok") => true,
        Some("degraded") => false,
        other => panic!("resets is {other:?} in {report}"),
    }
}

/// Passive handshakes and closes carry the server's process: for a listener
/// that was listening before netlens started (named from sock_diag's inode
/// and /proc/PID/fd) and for one opened after (named at listen()). The
/// servers are processes of their own, not threads of this test.
#[test]
fn passive_connections_carry_the_servers_process() -> Result<()> {
    const CONNECTIONS: usize = 20;
    let netns = Netns::new()?;
    let binary = env!("CARGO_BIN_EXE_netlens-serve");
    let older: SocketAddr = "127.0.0.1:8110".parse()?;
    let newer: SocketAddr = "127.0.0.1:8111".parse()?;
    let older_server = ServerProcess::start(&netns, older, binary)?;
    let netlens = Netlens::trace_netns(netns.inode()?)?;
    let newer_server = ServerProcess::start(&netns, newer, binary)?;
    for server in [older, newer] {
        clients(&netns, server, CONNECTIONS, 2, 100)?;
    }
    netns.wait_closed(std::time::Duration::from_secs(20))?;
    let traced = netlens.stop()?;
    let slack = traced.unaccounted() as usize;
    for (server, addr) in [(&older_server, older), (&newer_server, newer)] {
        for name in ["handshake", "close"] {
            let passive: Vec<&Value> = traced
                .named(name)
                .filter(|e| e["direction"] == "passive" && port_of(e, "sport") == addr.port())
                .collect();
            assert!(
                passive.len() <= CONNECTIONS && CONNECTIONS - passive.len() <= slack,
                "{addr}: {} passive {name} events (missed {slack})",
                passive.len()
            );
            for event in passive {
                assert_eq!(event["pid"], server.pid, "{addr}: {event}");
                assert_eq!(event["comm"], "netlens-serve", "{addr}: {event}");
            }
        }
    }
    Ok(())
}

/// Every close keeps the side it was opened on, 10 runs × 300 connections
/// (the daemon test's traffic: 294 short ones over 10 client threads, then
/// 6 bulk ones under 2 % loss): each client port closes as `active` with
/// this process's pid, each server-side close is `passive` on the server's
/// port. None may be on the wrong side; a close netlens could not place
/// (direction unknown) or did not see counts against what it reported
/// missed or lost. Two runs in an emulated guest (each takes ~20 times as
/// long there), ten on real hardware.
#[test]
fn closes_keep_their_direction() -> Result<()> {
    let pid = std::process::id();
    let runs = if netlens_tests::in_guest() { 2 } else { 10 };
    for run in 0..runs {
        let started = std::time::Instant::now();
        let netns = Netns::new()?;
        let addr: SocketAddr = "127.0.0.1:8090".parse()?;
        let netlens = Netlens::trace_netns(netns.inode()?)?;
        let _server = Server::start(&netns, addr, 1000)?;
        let mut conns = clients(&netns, addr, 294, 10, 100)?;
        eprintln!("run {run}: 294 short connections in {:.1} s", started.elapsed().as_secs_f64());
        netns.nft("table inet loss {\n chain pre {\n  type filter hook prerouting priority 0;\n  tcp dport 8090 numgen random mod 1000 < 20 drop\n }\n}\n")?;
        conns.extend(clients(&netns, addr, 6, 3, 2 << 20)?);
        eprintln!("run {run}: 6 bulk connections done at {:.1} s", started.elapsed().as_secs_f64());
        netns.wait_closed(std::time::Duration::from_secs(30))?;
        let traced = netlens.stop()?;
        eprintln!("run {run}: netlens stopped at {:.1} s", started.elapsed().as_secs_f64());

        let closes: Vec<&Value> = traced.named("close").collect();
        let wrong: Vec<&&Value> = closes
            .iter()
            .filter(|e| match e["direction"].as_str() {
                Some("active") => e["dport"] != addr.port() || e["pid"] != pid,
                Some("passive") => e["sport"] != addr.port(),
                _ => false,
            })
            .collect();
        assert!(wrong.is_empty(), "run {run}: {} closes on the wrong side: {wrong:?}", wrong.len());
        let active = closes.iter().filter(|e| e["direction"] == "active").count();
        let passive = closes.iter().filter(|e| e["direction"] == "passive").count();
        let slack = traced.unaccounted() as usize;
        eprintln!("run {run}: {active} active, {passive} passive of {} closes each; missed or lost {slack}", conns.len());
        if active < 300 || passive < 300 {
            let placed: Vec<&&Value> = closes.iter().filter(|e| !matches!(e["direction"].as_str(), Some("active" | "passive"))).collect();
            eprintln!("run {run}: closes with no direction: {placed:?}; netlens said {:?}", traced.stderr);
            // Everything netlens said about those connections (was the
            // handshake seen? on which side?).
            for close in placed {
                let ports = [port_of(close, "sport"), port_of(close, "dport")];
                for event in traced.events.iter().filter(|e| ports.contains(&port_of(e, "sport")) && ports.contains(&port_of(e, "dport"))) {
                    eprintln!("run {run}:   same connection: {event}");
                }
            }
        }
        assert!(active <= 300 && 300 - active <= slack, "run {run}: {active} active closes (missed {slack})");
        assert!(passive <= 300 && 300 - passive <= slack, "run {run}: {passive} passive closes (missed {slack})");
    }
    Ok(())
}

/// Where the kernel has BPF_MAP_LOOKUP_AND_DELETE_ELEM for hash maps
/// (5.14+), a close leaves its flow in the table, closed, for the next
/// socket at that address, and userspace sweeps the ones no socket took;
/// before, a close removes its entry. Read from the kernel's copy of the
/// table (bpftool), by the flows' namespace. Other tests' sockets may take
/// our entries (the kernel reuses socket memory at once), never remove
/// them: only a sweep does, so every entry of ours gone from the table was
/// swept.
#[test]
fn closed_flows_are_kept_for_reuse_then_swept() -> Result<()> {
    const CONNECTIONS: usize = 20;
    let keeps = netlens_tests::kernel_version() >= (5, 14);
    let netns = Netns::new()?;
    let inode = netns.inode()?;
    let addr: SocketAddr = "127.0.0.1:7112".parse()?;
    // 256 entries: a sweep is due once a sixteenth of them, 16, are closed.
    // The table's sweep; the array frees a slot at its close (losses.rs).
    let netlens = Netlens::start_with_env(
        None,
        &["trace", "--json"],
        &[("NETLENS_FLOW_TABLE_ENTRIES", "256"), ("NETLENS_FLOW_STATE", "table")],
    )?;
    assert_eq!(flow_table::home(netlens.pid())?, flow_table::Home::Table);
    held_connections(&netns, addr, CONNECTIONS)?;
    netns.wait_closed(Duration::from_secs(30))?;
    let closed_by = netlens_tests::monotonic_ns();
    let ours = |entries: Vec<flow_table::Entry>| -> Vec<_> { entries.into_iter().filter(|e| e.netns == inode).collect() };

    // Within a second of the closes: no sweep may take them yet.
    let kept = ours(flow_table::entries(netlens.pid())?);
    eprintln!("{} of our {} flows in the table right after they closed", kept.len(), 2 * CONNECTIONS);
    if keeps {
        assert!(!kept.is_empty(), "closed flows kept for reuse");
        assert!(kept.iter().all(|entry| entry.closed_ns != 0 && entry.closed_ns <= closed_by), "every one closed: {kept:?}");
    } else {
        assert!(kept.is_empty(), "a close removes its entry before 5.14: {kept:?}");
    }

    // Swept within a second of their first second (the sweep's minimum age
    // and its check period), or taken by other sockets; polled for 10 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut table = flow_table::entries(netlens.pid())?;
    while table.iter().any(|entry| entry.netns == inode && entry.closed_ns != 0) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(250));
        table = flow_table::entries(netlens.pid())?;
    }
    let traced = netlens.stop()?;
    let (closed, open): (Vec<_>, Vec<_>) = ours(table.clone()).into_iter().partition(|entry| entry.closed_ns != 0);
    assert!(closed.is_empty(), "closed flows left in the table after 10 s: {closed:?}");
    // An open one is a connection whose close the kernel skipped (other
    // tests' programs run meanwhile), counted as missed.
    assert!(open.len() as u64 <= traced.unaccounted(), "{} flows left open, {} events missed", open.len(), traced.unaccounted());
    let gone = kept.iter().filter(|ours| !table.iter().any(|entry| entry.key == ours.key)).count() as u64;
    eprintln!("{gone} of our entries gone from the table; netlens swept {} closed flows", traced.flows_swept());
    assert!(traced.flows_swept() >= gone, "each entry gone was swept; stderr: {:?}", traced.stderr);
    Ok(())
}
