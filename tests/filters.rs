//! Filters end to end, and a connection netlens did not see open. Needs root.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result};
use netlens_tests::{
    cgroup::wait_success,
    traffic::{clients, Server},
    Netlens, Netns, Traced,
};
use serde_json::Value;

/// Which events a filter keeps.
type Matches = Box<dyn Fn(&Value) -> bool>;

/// What identifies an event across netlens instances (each stamps its own
/// time): the event, its connection and which side.
fn identity(e: &Value) -> String {
    format!("{} {} {}:{} {}:{} {}", e["event"], e["family"], e["saddr"], e["sport"], e["daddr"], e["dport"], e["direction"])
}

/// Events by identity, counted.
fn multiset<'a>(events: impl Iterator<Item = &'a Value>) -> BTreeMap<String, usize> {
    let mut set = BTreeMap::new();
    for event in events {
        *set.entry(identity(event)).or_default() += 1;
    }
    set
}

/// `--pid`, `--comm`, `-4` and `-6`, each beside an unfiltered run on the
/// same traffic: each shows exactly the unfiltered events its filter
/// matches, and those are what the clients made: a bash client's one IPv4
/// connection, and this process's 3 IPv4 and 2 IPv6 connections.
#[test]
fn pid_comm_and_family_filters_show_exactly_their_connections() -> Result<()> {
    let netns = Netns::new()?;
    let inode = netns.inode()?.to_string();
    let (v4, v6): (SocketAddr, SocketAddr) = ("127.0.0.1:8121".parse()?, "[::1]:8121".parse()?);
    let _servers = (Server::start(&netns, v4, 0)?, Server::start(&netns, v6, 0)?);
    // bash waits for a line on stdin before it connects: its pid is known
    // before netlens starts.
    let mut bash = Command::new("ip")
        .args(["netns", "exec", &netns.name, "bash", "-c"])
        .arg("read go && exec 3<>/dev/tcp/127.0.0.1/8121 && echo hello >&3 && exec 3>&-")
        .stdin(Stdio::piped())
        .spawn()?;
    let bash_pid = bash.id();
    let start = |filter: &[&str]| {
        let mut args = vec!["trace", "--json", "--netns", &inode];
        args.extend_from_slice(filter);
        Netlens::start(&args)
    };
    let all = start(&[])?;
    let by_pid = start(&["--pid", &bash_pid.to_string()])?;
    let by_comm = start(&["--comm", "bash"])?;
    let only_v4 = start(&["-4"])?;
    let only_v6 = start(&["-6"])?;

    bash.stdin.take().context("bash stdin")?.write_all(b"go\n")?;
    wait_success(&mut bash, Duration::from_secs(20))?;
    let mine_v4 = clients(&netns, v4, 3, 1, 100)?;
    let mine_v6 = clients(&netns, v6, 2, 1, 100)?;
    netns.wait_closed(Duration::from_secs(20))?;
    let [all, by_pid, by_comm, only_v4, only_v6] =
        [all.stop()?, by_pid.stop()?, by_comm.stop()?, only_v4.stop()?, only_v6.stop()?];
    assert_eq!(all.unaccounted(), 0, "nothing may be lost for an exact comparison");

    let handshakes = |events: &[Value], family: u64, direction: &str| {
        events.iter().filter(|e| e["event"] == "handshake" && e["family"] == family && e["direction"] == direction).count()
    };
    // The unfiltered run against the clients' own counts.
    assert_eq!(handshakes(&all.events, 4, "active"), mine_v4.len() + 1);
    assert_eq!(handshakes(&all.events, 4, "passive"), mine_v4.len() + 1);
    assert_eq!(handshakes(&all.events, 6, "active"), mine_v6.len());
    assert_eq!(all.named("close").count(), 2 * (mine_v4.len() + 1 + mine_v6.len()));

    let cases: [(&str, &Traced, Matches); 4] = [
        ("--pid", &by_pid, Box::new(move |e: &Value| e["pid"] == bash_pid)),
        ("--comm", &by_comm, Box::new(|e: &Value| e["comm"] == "bash")),
        ("-4", &only_v4, Box::new(|e: &Value| e["family"] == 4)),
        ("-6", &only_v6, Box::new(|e: &Value| e["family"] == 6)),
    ];
    for (flag, traced, matches) in &cases {
        assert_eq!(traced.unaccounted(), 0, "{flag}: lost events");
        let expected = multiset(all.events.iter().filter(|e| matches(e)));
        assert_eq!(multiset(traced.events.iter()), expected, "{flag} shows what it matches, all of it");
    }
    // bash's connection: its handshake and its close, nothing of the
    // server's side (no pid there, or this process's after accept()).
    for traced in [&by_pid, &by_comm] {
        let kinds: Vec<&str> = traced.events.iter().filter_map(|e| e["event"].as_str()).collect();
        assert_eq!(kinds, ["handshake", "close"], "{:?}", traced.events);
        assert!(traced.events.iter().all(|e| e["direction"] == "active" && e["dport"] == 8121));
    }
    assert_eq!(handshakes(&only_v4.events, 4, "active"), mine_v4.len() + 1);
    assert_eq!(handshakes(&only_v6.events, 6, "active"), mine_v6.len());
    Ok(())
}

/// A connection opened and used before netlens attached, then used and
/// closed while it watches: both ends report a close with `direction` and
/// `lifetime_us` null and the connection's whole byte counts, before and
/// after attaching, exactly as each end sent and read them.
#[test]
fn connection_opened_before_attach_closes_with_exact_bytes() -> Result<()> {
    const BEFORE: (usize, usize) = (1_000, 2_000);
    const AFTER: (usize, usize) = (500_003, 700);
    let netns = Netns::new()?;
    let addr: SocketAddr = "127.0.0.1:8122".parse()?;
    let (client, server) = netns
        .spawn(move || -> Result<(TcpStream, TcpStream)> {
            let listener = TcpListener::bind(addr)?;
            let client = TcpStream::connect(addr)?;
            let (server, _) = listener.accept()?;
            Ok((client, server))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("setup panicked"))???;
    let exchange = |client: &mut TcpStream, server: &mut TcpStream, (up, down): (usize, usize)| -> Result<()> {
        let (mut up_buf, mut down_buf) = (vec![0u8; up], vec![0u8; down]);
        let mut writer = server.try_clone()?;
        let echo = std::thread::spawn(move || writer.write_all(&vec![b'd'; down]));
        client.write_all(&vec![b'u'; up])?;
        server.read_exact(&mut up_buf)?;
        client.read_exact(&mut down_buf)?;
        echo.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        Ok(())
    };
    let (mut client, mut server) = (client, server);
    exchange(&mut client, &mut server, BEFORE)?;
    let client_port = client.local_addr()?.port();

    let netlens = Netlens::trace_netns(netns.inode()?)?;
    exchange(&mut client, &mut server, AFTER)?;
    client.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    server.read_to_end(&mut rest)?;
    assert!(rest.is_empty());
    drop(server);
    client.read_to_end(&mut rest)?;
    drop(client);
    netns.wait_closed(Duration::from_secs(20))?;
    let traced = netlens.stop()?;

    assert_eq!(traced.unaccounted(), 0);
    assert_eq!(traced.named("handshake").count(), 0, "it opened before netlens attached");
    let closes: Vec<&Value> = traced.named("close").collect();
    assert_eq!(closes.len(), 2, "{:?}", traced.events);
    let (up, down) = ((BEFORE.0 + AFTER.0) as u64, (BEFORE.1 + AFTER.1) as u64);
    for close in &closes {
        assert!(close["direction"].is_null() && close.get("direction").is_some(), "{close}");
        assert!(close["lifetime_us"].is_null() && close.get("lifetime_us").is_some(), "{close}");
        let client_end = close["sport"] == client_port;
        let (sent, received) = if client_end { (up, down) } else { (down, up) };
        assert_eq!(close["bytes_sent"], sent, "{} end: {close}", if client_end { "client" } else { "server" });
        assert_eq!(close["bytes_received"], received, "{close}");
    }
    assert!(closes.iter().any(|c| c["sport"] == client_port) && closes.iter().any(|c| c["dport"] == client_port));
    Ok(())
}
