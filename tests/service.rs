//! Service attribution against the kernel: processes started in cgroup v2
//! directories the test creates (a `.service` unit and a container's
//! `docker-<id>.scope`), their connections reported with the cgroup's id
//! (the directory's inode), path and name, in `trace --json` and under
//! `daemon --by service`. Needs root and a cgroup2 mount.

use std::{
    io::Write,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use netlens_tests::{
    cgroup::{wait_success, TestCgroup},
    exposition::{get, parse, sum},
    Netlens, Netns,
};
use serde_json::Value;

const PORT: u16 = 8111;
const METRICS: &str = "127.0.0.1:9977";

/// Waits (bounded) until something listens on `port` in `netns`.
fn wait_listening(netns: &Netns, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if netns.exec(&["ss", "-tlnH", &format!("sport = :{port}")])?.contains(&format!(":{port}")) {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on port {port}")
}

#[test]
fn connections_carry_their_cgroup_path_and_service() -> Result<()> {
    let pid = std::process::id();
    let netns = Netns::new()?;
    let inode = netns.inode()?.to_string();
    let unit = TestCgroup::create(&format!("netlens-test-{pid}.service"))?;
    let slice = TestCgroup::create(&format!("netlens-test-{pid}.slice"))?;
    let container_id = format!("{:064x}", u64::from(pid) << 20 | 0xabc);
    let container = TestCgroup::create(&format!("netlens-test-{pid}.slice/docker-{container_id}.scope"))?;
    let trace = Netlens::trace_netns(netns.inode()?)?;
    // Without CAP_DAC_READ_SEARCH (as deploy/ runs it), cgroup handles are
    // refused and netlens walks the hierarchy instead: the same answers.
    let without_handles = Netlens::start_wrapped(
        &["setpriv", "--inh-caps=-dac_read_search", "--bounding-set=-dac_read_search", "--"],
        &["trace", "--json", "--netns", &inode],
    )?;
    // In the namespace (its port and census), with the cgroup mounts in view.
    let daemon = Netlens::start_nsenter(&netns.name, &["daemon", "--netns", &inode, "--by", "service"])?;
    let top = Netlens::start(&["top", "--json", "-n", "3", "-d", "1", "--view", "processes", "--netns", &inode])?;

    // The server: python in the container's cgroup (its listener, and so
    // the accepted connection, is created there); one connection read to
    // EOF, then closed.
    let server_code = format!(
        "import socket\ns=socket.socket()\ns.bind(('127.0.0.1',{PORT}))\ns.listen()\ns.settimeout(30)\n\
         c,_=s.accept()\nc.settimeout(30)\nwhile c.recv(65536): pass\nc.close()\n"
    );
    // Each waits for a line on stdin, once moved into its cgroup.
    let mut server = Command::new("ip")
        .args(["netns", "exec", &netns.name, "bash", "-c", "read go && exec python3 -c \"$0\"", &server_code])
        .stdin(Stdio::piped())
        .spawn()?;
    container.adopt(server.id())?;
    server.stdin.take().context("server stdin")?.write_all(b"go\n")?;
    wait_listening(&netns, PORT)?;
    // The client: bash in the unit's cgroup, one connection, 6 bytes.
    let mut client = Command::new("ip")
        .args(["netns", "exec", &netns.name, "bash", "-c"])
        .arg(format!("read go && exec 3<>/dev/tcp/127.0.0.1/{PORT} && echo hello >&3 && exec 3>&-"))
        .stdin(Stdio::piped())
        .spawn()?;
    let client_pid = client.id();
    unit.adopt(client_pid)?;
    client.stdin.take().context("client stdin")?.write_all(b"go\n")?;
    wait_success(&mut client, Duration::from_secs(20))?;
    wait_success(&mut server, Duration::from_secs(20))?;
    netns.wait_closed(Duration::from_secs(20))?;
    // Events reach the daemon within its 20 ms drain timer.
    thread::sleep(Duration::from_millis(300));
    let samples = parse(&get(&netns, METRICS, "/metrics")?)?;
    let traced = trace.stop()?;
    let walked = without_handles.stop()?;
    drop(daemon);
    let snapshots = top.wait_exit(Duration::from_secs(15))?;

    let on_port = |e: &&Value| e["sport"] == PORT || e["dport"] == PORT;
    let attribution = |events: &[Value]| -> Vec<String> {
        events.iter().filter(on_port).map(|e| format!("{} {} {} {}", e["event"], e["cgroup"], e["cgroup_path"], e["service"])).collect()
    };
    assert_eq!(attribution(&walked.events), attribution(&traced.events), "with and without cgroup handles");
    let ours: Vec<&Value> = traced.events.iter().filter(on_port).collect();
    let (unit_id, container_id_inode) = (unit.id()?, container.id()?);
    let client_side: Vec<&&Value> = ours.iter().filter(|e| e["dport"] == PORT).collect();
    let server_side: Vec<&&Value> = ours.iter().filter(|e| e["sport"] == PORT && e["event"] != "accepted").collect();
    // The kernel's truth: one connection, so one handshake and one close
    // on each side.
    for (side, events) in [("client", &client_side), ("server", &server_side)] {
        let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
        assert_eq!(kinds, ["handshake", "close"], "{side} side: {events:?}");
    }
    for event in &client_side {
        assert_eq!(event["pid"], client_pid, "{event}");
        assert_eq!(event["cgroup"], unit_id, "{event}");
        assert_eq!(event["cgroup_path"], unit.path.as_str(), "{event}");
        assert_eq!(event["service"], format!("netlens-test-{pid}.service"), "{event}");
    }
    for event in &server_side {
        assert_eq!(event["cgroup"], container_id_inode, "{event}");
        assert_eq!(event["cgroup_path"], container.path.as_str(), "{event}");
        assert_eq!(event["service"], format!("docker-{container_id}"), "{event}");
    }

    // The daemon: each side under its service.
    let opened = "netlens_tcp_connections_opened_total";
    let unit_name = format!("netlens-test-{pid}.service");
    let container_name = format!("docker-{container_id}");
    let endpoints: Vec<String> = samples
        .iter()
        .filter(|s| s.name == opened)
        .map(|s| format!("{}/{}={}", s.label("direction").unwrap_or("?"), s.label("endpoint").unwrap_or("?"), s.value))
        .collect();
    assert_eq!(sum(&samples, opened, &[("direction", "active"), ("endpoint", &unit_name)]), 1.0, "{endpoints:?}");
    assert_eq!(sum(&samples, opened, &[("direction", "passive"), ("endpoint", &container_name)]), 1.0);
    assert_eq!(sum(&samples, opened, &[("endpoint", &unit_name)]), 1.0, "nothing else under the unit");

    // top's Processes view: the client's row names its unit.
    let last = snapshots.events.last().context("no top snapshot")?;
    assert_eq!(last["view"], "processes");
    let rows = last["rows"].as_array().context("no rows")?;
    let row = rows.iter().find(|r| r["pid"] == client_pid).with_context(|| format!("no row for pid {client_pid}: {rows:?}"))?;
    assert_eq!(row["comm"], "bash");
    assert_eq!(row["service"], unit_name.as_str(), "{row}");
    drop((container, slice, unit));
    Ok(())
}
