//! The accept queue against the kernel's truth: listen overflows against
//! nstat's TcpExtListenOverflows (exact), accept-queue waits against what a
//! slow server measured itself. Needs root; each test in its own namespace.
//! `NETLENS_GUEST=1` (software-emulated guests) loosens the timing bounds,
//! never the counts.

use std::{
    collections::HashMap,
    io::Write,
    net::{SocketAddr, TcpListener, TcpStream},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;
use netlens_tests::{assert_close, Netlens, Netns};
use serde_json::Value;

/// One test at a time: run side by side (libtest's default on the host),
/// two netlens instances and two loads share the 2 cores. That load is
/// what exposed the tracepoint path's race between two CPUs' SYN checks
/// (one short of 51 now and then; the accounted drops were read after
/// `sk_drops`, see `take_one` in overflow/mod.rs); the tests still run
/// alone, so that each count compares with a namespace's nstat undisturbed.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn port_of(event: &Value, key: &str) -> u16 {
    event[key].as_u64().unwrap_or(0) as u16
}

/// A listener on `port` with `backlog` that never accepts, and `clients`
/// that connect at once (each gives up after 2.5 s, sends a few bytes if it
/// got in, and holds on until 3 s): the `dropped` of netlens's
/// listen_overflow events add up to TcpExtListenOverflows, exactly. With
/// `hold_acks`, the clients' pure ACKs are dropped for the first 500 ms, so
/// that handshakes complete on their data instead, after the queue filled:
/// overflows at final-ACK time rather than at the SYN.
fn listen_overflows_match_nstat(port: u16, backlog: i32, clients: usize, hold_acks: bool) -> Result<()> {
    let _serial = one_at_a_time();
    let netns = Netns::new()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let netlens = Netlens::trace_netns(netns.inode()?)?;
    let listener = netns
        .spawn(move || netlens_tests::sockets::listener_with_backlog(addr.port(), backlog))
        .join()
        .expect("listener thread")??;
    if hold_acks {
        netns.nft(&format!(
            "table inet hold {{\n chain pre {{\n  type filter hook prerouting priority 0;\n  tcp dport {port} tcp flags == ack drop\n }}\n}}\n"
        ))?;
    }
    let before = netns.nstat()?;
    let started = Instant::now();
    let clients: Vec<_> = (0..clients)
        .map(|_| {
            netns.spawn(move || {
                // Refused, timed out or queued: all the same here.
                let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(2_500)).ok();
                if let Some(mut stream) = stream.as_ref() {
                    let _ = stream.write_all(b"hello");
                }
                thread::sleep(Duration::from_secs(3).saturating_sub(started.elapsed()));
                drop(stream);
            })
        })
        .collect();
    if hold_acks {
        thread::sleep(Duration::from_millis(500));
        netns.exec(&["nft", "delete", "table", "inet", "hold"])?;
    }
    for client in clients {
        client.join().expect("client thread")?;
    }
    let after = netns.nstat()?;
    drop(listener);
    let traced = netlens.stop()?;

    let delta = |key: &str| after.get(key).copied().unwrap_or(0) - before.get(key).copied().unwrap_or(0);
    let overflows = delta("TcpExtListenOverflows");
    assert!(overflows > 0, "a backlog of {backlog} overflowed nothing");
    let events: Vec<&Value> = traced.named("listen_overflow").collect();
    let dropped: u64 = events.iter().map(|e| e["dropped"].as_u64().unwrap_or(0)).sum();
    eprintln!(
        "listen overflows (backlog {backlog}, hold_acks {hold_acks}): netlens {dropped} in {} events, nstat TcpExtListenOverflows {overflows} (SyncookiesRecv {}, SyncookiesFailed {})",
        events.len(),
        delta("TcpExtSyncookiesRecv"),
        delta("TcpExtSyncookiesFailed")
    );
    if dropped != overflows {
        for event in &events {
            eprintln!("  {event}");
        }
        for line in &traced.stderr {
            eprintln!("  netlens said: {line}");
        }
    }
    // Exact, unless netlens said the kernel skipped runs of the programs
    // that count these (a program is not run again on a CPU it is running
    // on): then short by at most that many.
    assert_close(dropped, overflows, traced.counts_missed() + traced.missed(), "netlens dropped vs TcpExtListenOverflows");
    for event in &events {
        assert_eq!(port_of(event, "sport"), addr.port(), "{event}");
        assert_eq!(event["saddr"], "127.0.0.1");
        assert_eq!(event["backlog"], backlog, "{event}");
        assert!(event["pid"].is_null());
    }
    // One event per listener per second at most (the run lasts ~3 s).
    assert!(events.len() <= 5, "{} listen_overflow events for one listener in ~3 s", events.len());
    Ok(())
}

/// Backlog 2, 20 clients: overflows at the SYN (the common kind).
#[test]
fn listen_overflows_match_nstat_exactly() -> Result<()> {
    listen_overflows_match_nstat(8090, 2, 20, false)
}

/// Backlog 0, 6 clients whose handshakes complete late: overflows at the
/// final ACK (SYN cookies included).
#[test]
fn final_ack_listen_overflows_match_nstat_exactly() -> Result<()> {
    listen_overflows_match_nstat(8092, 0, 6, true)
}

/// A server that sleeps 300 ms before each accept(), and 5 clients that
/// connect at once: each `accepted` event's wait matches what the process
/// measured (client's connect() return to the server's accept() return,
/// both CLOCK_MONOTONIC in this process) within 10 % or 20 ms, and names
/// the accepting process; the connection's close carries it too.
/// With flows in the table the kernel side times the wait; in socket
/// storage (5.11+, see the test below), userspace does, from the passive
/// handshake.
#[test]
fn accept_waits_match_the_server() -> Result<()> {
    accept_waits_match(&[])
}

#[test]
fn accept_waits_match_the_server_with_flows_in_socket_storage() -> Result<()> {
    accept_waits_match(&[("NETLENS_FLOW_STATE", "storage")])
}

fn accept_waits_match(env: &[(&str, &str)]) -> Result<()> {
    const CLIENTS: usize = 5;
    let _serial = one_at_a_time();
    let netns = Netns::new()?;
    let addr: SocketAddr = "127.0.0.1:8091".parse()?;
    let netlens = Netlens::start_with_env(None, &["trace", "--json", "--netns", &netns.inode()?.to_string()], env)?;
    let listener = netns.spawn(move || TcpListener::bind(addr)).join().expect("listener thread")??;
    let (connected_tx, connected_rx) = mpsc::channel();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let connected = connected_tx.clone();
            netns.spawn(move || -> Result<()> {
                let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                connected.send((stream.local_addr()?.port(), Instant::now()))?;
                thread::sleep(Duration::from_millis(2_500));
                Ok(())
            })
        })
        .collect();
    // The server: this thread (its pid and comm are what netlens must name).
    let comm = std::fs::read_to_string("/proc/thread-self/comm")?.trim().to_string();
    let mut accepted_at = HashMap::new();
    for _ in 0..CLIENTS {
        thread::sleep(Duration::from_millis(300));
        let (stream, peer) = listener.accept()?;
        accepted_at.insert(peer.port(), Instant::now());
        drop(stream);
    }
    for client in clients {
        client.join().expect("client thread")??;
    }
    let connected: HashMap<u16, Instant> = connected_rx.try_iter().collect();
    netns.wait_closed(Duration::from_secs(10))?;
    let traced = netlens.stop()?;

    let accepted: Vec<&Value> = traced.named("accepted").filter(|e| port_of(e, "sport") == addr.port()).collect();
    let slack = traced.unaccounted() as usize;
    assert!(accepted.len() <= CLIENTS && CLIENTS - accepted.len() <= slack, "{} accepted events (missed {slack})", accepted.len());
    let (relative, absolute_ms) = if netlens_tests::in_guest() { (0.5, 200.0) } else { (0.1, 20.0) };
    for event in &accepted {
        let port = port_of(event, "dport");
        let measured = accepted_at[&port].duration_since(connected[&port]).as_secs_f64() * 1e3;
        let traced_ms = event["accept_wait_us"].as_f64().unwrap_or(-1.0) / 1e3;
        eprintln!("port {port}: accept wait netlens {traced_ms:.2} ms, server measured {measured:.2} ms, queue {}/{}", event["queue_len"], event["backlog"]);
        let bound = (measured * relative).max(absolute_ms);
        assert!((traced_ms - measured).abs() <= bound, "port {port}: netlens {traced_ms} ms vs measured {measured} ms");
        assert!(traced_ms >= 250.0, "port {port}: waited {traced_ms} ms behind a 300 ms sleep");
        assert_eq!(event["pid"], std::process::id(), "{event}");
        assert_eq!(event["comm"], comm.as_str(), "{event}");
        assert!(event["queue_len"].as_u64() < event["backlog"].as_u64(), "{event}");
    }
    // After accept() the flow belongs to the server: its close says so.
    for close in traced.named("close").filter(|e| port_of(e, "sport") == addr.port()) {
        assert_eq!(close["pid"], std::process::id(), "{close}");
        assert_eq!(close["comm"], comm.as_str(), "{close}");
    }
    Ok(())
}
