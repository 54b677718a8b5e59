//! TCP drops by the kernel's reason (`netlens_tcp_drops_total{reason}`,
//! from skb:kfree_skb) against nstat: a receiver with a tiny socket buffer
//! that never reads while the sender pushes. Needs root, and kfree_skb with
//! a reason (5.17+).
//!
//! The counts are host-wide (kfree_skb has no namespace filter), nstat's
//! are the test namespace's: this file is its own test binary so no other
//! test of ours drops TCP packets meanwhile. Measured on 6.18: TCPRcvQDrop
//! 1-2 = proto_mem, TcpExtBeyondWindow 11-20 = tcp_invalid_sequence +
//! tcp_invalid_end_sequence; no zero-window drop (the sender respects a
//! zero window). A run of the program the kernel skipped (already running
//! on that CPU) may be a drop not counted: netlens reports those, and the
//! comparisons allow exactly that many.

use std::{
    collections::HashMap,
    io::Write,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use netlens_tests::{
    assert_close,
    exposition::{get, parse, promtool_check, Sample},
    Netlens, Netns,
};

const LISTEN: &str = "127.0.0.1:9977";

/// Shrinks the receive buffer of a connected socket to `bytes`. Done after
/// the handshake, the window it already advertised stays open (Linux does
/// not shrink it) while the memory behind it is gone: the sender, within
/// the window, sends what the receiver can only drop.
fn shrink_receive_buffer(stream: &TcpStream, bytes: i32) -> Result<()> {
    let size = &bytes as *const i32 as *const libc::c_void;
    // SAFETY: setsockopt on a descriptor the stream owns, with a valid int.
    if unsafe { libc::setsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, size, 4) } != 0 {
        bail!("SO_RCVBUF: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// `netlens_tcp_drops_total` by reason.
fn drops(samples: &[Sample]) -> HashMap<String, f64> {
    samples
        .iter()
        .filter(|s| s.name == "netlens_tcp_drops_total")
        .filter_map(|s| Some((s.label("reason")?.to_string(), s.value)))
        .collect()
}

/// Runs of the `kfree_skb` program the kernel skipped because it was
/// already running on that CPU: each may be one drop netlens did not count.
fn kfree_skb_skipped(samples: &[Sample]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == "netlens_bpf_program_skipped_runs_total" && s.label("program") == Some("kfree_skb"))
        .map(|s| s.value)
        .sum()
}

fn scrape(netns: &Netns) -> Result<Vec<Sample>> {
    // Counters are read at scrape time; events reach the daemon in 20 ms.
    thread::sleep(Duration::from_millis(100));
    let text = get(netns, LISTEN, "/metrics")?;
    promtool_check(&text)?;
    assert!(!text.contains("netlens_tcp_rcvqueue_full_drops_total"), "sock_rcvqueue_full is gone (TCP never takes it)");
    parse(&text)
}

/// One connection: the receiver accepts, shrinks its buffer and holds the
/// connection without reading for 3 s; the sender pushes for 2 s (bounded
/// by its write timeout). Returns the bytes the sender wrote.
fn push_into_shrunk_buffer(netns: &Netns, addr: SocketAddr) -> Result<u64> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = netns.spawn(move || -> Result<()> {
        let listener = TcpListener::bind(addr)?;
        let _ = ready_tx.send(());
        let (stream, _) = listener.accept()?;
        shrink_receive_buffer(&stream, 2048)?;
        thread::sleep(Duration::from_secs(3));
        drop(stream);
        Ok(())
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).context("receiver did not start")?;
    let sender = netns.spawn(move || -> Result<u64> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_write_timeout(Some(Duration::from_millis(100)))?;
        let chunk = [0x5au8; 16 * 1024];
        let (started, mut sent) = (Instant::now(), 0u64);
        while started.elapsed() < Duration::from_secs(2) {
            match stream.write(&chunk) {
                Ok(n) => sent += n as u64,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(sent)
    });
    let sent = sender.join().map_err(|_| anyhow::anyhow!("sender panicked"))???;
    receiver.join().map_err(|_| anyhow::anyhow!("receiver panicked"))???;
    Ok(sent)
}

#[test]
fn drops_by_reason_move_with_nstat() -> Result<()> {
    let netns = Netns::new()?;
    let inode = netns.inode()?.to_string();
    let daemon = Netlens::start_in(Some(&netns.name), &["daemon", "--netns", &inode])?;
    // `trace --drops` beside it: its `drop` lines must add up the same.
    let trace = Netlens::start_in(Some(&netns.name), &["trace", "--json", "--drops", "--netns", &inode])?;
    let before_nstat = netns.nstat()?;
    let before_samples = scrape(&netns)?;
    let before = drops(&before_samples);

    // First as Linux does by default (the advertised window never
    // shrinks: memory drops), then with net.ipv4.tcp_shrink_window=1 (the
    // window closes on data already in flight: zero-window drops).
    let mut sent = push_into_shrunk_buffer(&netns, "127.0.0.1:8099".parse()?)?;
    netns.exec(&["sysctl", "-qw", "net.ipv4.tcp_shrink_window=1"])?;
    sent += push_into_shrunk_buffer(&netns, "127.0.0.1:8098".parse()?)?;
    let after_nstat = netns.nstat()?;
    let after_samples = scrape(&netns)?;
    let after = drops(&after_samples);
    let skipped = kfree_skb_skipped(&after_samples) - kfree_skb_skipped(&before_samples);
    drop(daemon);
    // Past its next once-a-second read.
    thread::sleep(Duration::from_millis(1_100));
    let traced = trace.stop()?;

    let nstat = |key: &str| after_nstat.get(key).copied().unwrap_or(0) - before_nstat.get(key).copied().unwrap_or(0);
    let netlens = |reason: &str| after.get(reason).copied().unwrap_or(0.0) - before.get(reason).copied().unwrap_or(0.0);
    let moved: Vec<(String, f64)> =
        after.keys().map(|reason| (reason.clone(), netlens(reason))).filter(|(_, delta)| *delta > 0.0).collect();
    let (rcvq, zero_window, ofo) = (nstat("TcpExtTCPRcvQDrop"), nstat("TcpExtTCPZeroWindowDrop"), nstat("TcpExtTCPOFODrop"));
    let mut moved_nstat: Vec<(&String, u64)> =
        after_nstat.iter().map(|(k, v)| (k, v - before_nstat.get(k).copied().unwrap_or(0))).filter(|(k, d)| *d > 0 && k.starts_with("TcpExt")).collect();
    moved_nstat.sort();
    eprintln!("nstat TcpExt moved: {moved_nstat:?}");
    eprintln!("sent {sent} B; nstat: TCPRcvQDrop {rcvq}, TCPZeroWindowDrop {zero_window}, TCPOFODrop {ofo}; netlens moved: {moved:?}; kfree_skb runs the kernel skipped: {skipped}");

    assert!(rcvq > 0, "the shrunk buffer dropped nothing: no test");
    // One-to-one in tcp_data_queue(): TCPZeroWindowDrop is counted exactly
    // where the reason is SKB_DROP_REASON_TCP_ZEROWINDOW.
    // Less at most the runs the kernel skipped, as for proto_mem below.
    assert_close(netlens("tcp_zerowindow") as u64, zero_window, skipped as u64, "tcp_zerowindow vs TcpExtTCPZeroWindowDrop");
    // TCPRcvQDrop (tcp_data_queue) and TCPOFODrop (tcp_data_queue_ofo) are
    // TCP's two drops with SKB_DROP_REASON_PROTO_MEM (other protocols'
    // are not counted): their sum, less at most the runs the kernel
    // reports it skipped. Such a skip is rare but real: a drop in
    // tcp_data_queue() also happens in process context (the receiver's
    // release_sock() with bottom halves enabled), where an interrupt's
    // softirq can free a second packet on the same CPU mid-program
    // (seen once in CI: TCPRcvQDrop 2, proto_mem 1).
    assert_close(netlens("proto_mem") as u64, rcvq + ofo, skipped as u64, "proto_mem vs TcpExtTCPRcvQDrop + TcpExtTCPOFODrop");
    // Since 6.16 TcpExtBeyondWindow counts what tcp_sequence() refuses as
    // beyond the window the receiver shrank: reason TCP_INVALID_SEQUENCE
    // (all of the segment) or TCP_INVALID_END_SEQUENCE (its end): the sum.
    if let Some(beyond) = after_nstat.get("TcpExtBeyondWindow") {
        let beyond = beyond - before_nstat.get("TcpExtBeyondWindow").copied().unwrap_or(0);
        let reasons = netlens("tcp_invalid_sequence") + netlens("tcp_invalid_end_sequence");
        assert_close(reasons as u64, beyond, skipped as u64, "tcp_invalid_sequence + tcp_invalid_end_sequence vs TcpExtBeyondWindow");
    }
    // trace --drops: a line per reason and second, packets adding up to
    // the kernel's counts (trace attached before the first nstat read).
    let traced_drops = |reason: &str| -> u64 {
        traced.named("drop").filter(|e| e["reason"] == reason).map(|e| e["packets"].as_u64().unwrap_or(0)).sum()
    };
    assert!(traced.named("drop").all(|e| e["ts_ns"].as_u64().is_some() && e["packets"].as_u64() > Some(0)), "{:?}", traced.events);
    // trace's own programs: less at most the counting runs it said the
    // kernel skipped.
    let trace_skipped = traced.counts_missed();
    assert_close(traced_drops("proto_mem"), rcvq + ofo, trace_skipped, "trace --drops proto_mem vs TcpExtTCPRcvQDrop + TcpExtTCPOFODrop");
    assert_close(traced_drops("tcp_zerowindow"), zero_window, trace_skipped, "trace --drops tcp_zerowindow vs TcpExtTCPZeroWindowDrop");
    Ok(())
}
