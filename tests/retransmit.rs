//! Retransmissions against the kernel's counters (nstat, in the test's own
//! namespace), with loss injected by nftables in the prerouting hook (a
//! drop in output would return EPERM to the sender instead of losing the
//! packet). Needs root.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::Duration,
};

use anyhow::Result;
use netlens_tests::{assert_close, nstat_delta, traffic::{clients, Server}, Netlens, Netns};
use serde_json::Value;

/// An nftables ruleset that drops what `rule` matches in prerouting.
fn loss_rule(rule: &str) -> String {
    format!("table inet loss {{\n chain pre {{\n  type filter hook prerouting priority 0;\n  {rule}\n }}\n}}\n")
}

/// The segments a set of retransmit events carried (`segs` each).
fn segments(events: &[&Value]) -> u64 {
    events.iter().map(|e| e["segs"].as_u64().unwrap_or(0)).sum()
}

fn port_of(event: &Value, key: &str) -> u16 {
    event[key].as_u64().unwrap_or(0) as u16
}

/// 20 % of SYNs dropped: SYN_SENT retransmits equal TcpExtTCPSynRetrans;
/// every connection whose SYN was retransmitted took ≥ 1 s (the initial
/// RTO) to establish, the others stayed fast. 20 %, not more: a connect
/// fails the test when seven SYNs in a row are lost (the client waits 70 s,
/// the 7th retransmission leaves at 63 s), 60 × 0.2⁷ ≈ 1 run in 100,000;
/// at 30 % it was 1 in 75.
#[test]
fn syn_loss_shows_in_handshake_time() -> Result<()> {
    let netns = Netns::new()?;
    let addr: SocketAddr = "127.0.0.1:8082".parse()?;
    netns.nft(&loss_rule("tcp dport 8082 tcp flags & (syn | ack) == syn numgen random mod 1000 < 200 drop"))?;
    let netlens = Netlens::trace_netns(netns.inode()?)?;
    let _server = Server::start(&netns, addr, 0)?;
    let before = netns.nstat()?;
    let conns = clients(&netns, addr, 60, 20, 10)?;
    netns.wait_closed(Duration::from_secs(30))?;
    let after = netns.nstat()?;
    let traced = netlens.stop()?;

    let syn_retransmits: Vec<&Value> = traced.named("retransmit").filter(|e| e["state"] == "SYN_SENT").collect();
    // The kernel counts retransmitted SYN-ACKs in TcpExtTCPSynRetrans too
    // (tcp_rtx_synack), and netlens reports those as synack_retransmit.
    let synack_retransmits = traced.named("synack_retransmit").count() as u64;
    let syn_retrans = nstat_delta(&before, &after, "TcpExtTCPSynRetrans");
    assert!(syn_retrans > 0, "20 % SYN loss over 60 connects retransmitted nothing");
    // A port can serve two connects in one run: the loopback reuses a
    // client port still in TIME_WAIT (tcp_tw_reuse=2). So each handshake is
    // matched with the SYN retransmits of its port since that port's
    // previous handshake, in time order.
    let ts = |e: &Value| e["ts_ns"].as_u64().unwrap_or(0);
    let mut handshakes: Vec<&Value> = traced.named("handshake").filter(|e| e["direction"] == "active").collect();
    handshakes.sort_by_key(|e| ts(e));
    // A retransmit event netlens reported missing (a skipped program run)
    // leaves its handshake slow with no retransmit seen: at most that many.
    let missing_retransmits = syn_retrans.saturating_sub(syn_retransmits.len() as u64);
    // What the client measured around connect(), the longest per port.
    let mut connect_us: HashMap<u16, f64> = HashMap::new();
    for conn in &conns {
        let longest = connect_us.entry(conn.local_port).or_insert(0.0);
        *longest = longest.max(conn.connect_us);
    }
    let slack_us = netlens_tests::timing_slack_us(1000.0);
    let (mut slow, mut slow_unexplained) = (0, Vec::new());
    let mut previous_handshake: HashMap<u16, u64> = HashMap::new();
    let mut retried_handshakes = 0u64;
    for e in &handshakes {
        let handshake_us = e["handshake_us"].as_f64().unwrap_or(0.0);
        let port = port_of(e, "sport");
        let since = previous_handshake.insert(port, ts(e)).unwrap_or(0);
        let retried = syn_retransmits.iter().any(|r| port_of(r, "sport") == port && ts(r) > since && ts(r) <= ts(e));
        // What the client measured around connect() bounds it from above
        // (a starved guest vCPU once made a loss-free handshake 561 ms).
        let client_us = connect_us.get(&port).copied().unwrap_or(f64::MAX);
        assert!(handshake_us <= client_us + slack_us, "port {port}: handshake {handshake_us} µs > connect() {client_us} µs");
        if retried {
            retried_handshakes += 1;
            // The SYN's retransmission timer is 1 s in jiffies: it can fire
            // up to one tick (10 ms at HZ=100) before 1 s of nanosecond
            // clock has passed (998.4 ms measured on Debian's 6.12, HZ=250).
            if handshake_us < 990_000.0 {
                // Everything netlens said about this port, and what the client saw.
                let said: Vec<&Value> = traced.events.iter().filter(|e| port_of(e, "sport") == port || port_of(e, "dport") == port).collect();
                panic!("port {port}: retransmitted SYN but handshake {handshake_us} µs; connect() took {client_us} µs; events {said:?}");
            }
            slow += 1;
        } else if handshake_us >= 990_000.0 {
            // A retransmission timeout inside it, and no event for it.
            slow_unexplained.push((port, handshake_us));
        }
    }
    // Said before any count is asserted: CI read netlens short of
    // TcpExtTCPSynRetrans twice (21 of 22, 9 of 11) and never here; which
    // handshakes were slow without an event, and what state the other
    // retransmit events had, tell where the missing ones went.
    let other_states: Vec<String> = traced
        .named("retransmit")
        .filter(|e| e["state"] != "SYN_SENT")
        .map(|e| format!("{}:{}->{}", e["state"], port_of(e, "sport"), port_of(e, "dport")))
        .collect();
    eprintln!(
        "syn loss: {} SYN_SENT ({} segments) + {synack_retransmits} SYN-ACK retransmits, nstat TcpExtTCPSynRetrans {syn_retrans}, TcpExtListenOverflows {}, {slow} of {} handshakes >= 1 s, {} events missed or lost, {} flows lost; slow without an event: {slow_unexplained:?}; retransmits in other states: {other_states:?}",
        syn_retransmits.len(),
        segments(&syn_retransmits),
        nstat_delta(&before, &after, "TcpExtListenOverflows"),
        conns.len(),
        traced.unaccounted(),
        traced.flows_lost(),
    );
    assert_close(
        syn_retransmits.len() as u64 + synack_retransmits,
        syn_retrans,
        traced.unaccounted(),
        "SYN_SENT + SYN-ACK retransmits vs TcpExtTCPSynRetrans",
    );
    assert!(
        slow_unexplained.len() as u64 <= missing_retransmits,
        "handshakes >= 1 s without a SYN retransmit event: {slow_unexplained:?} (netlens missed {missing_retransmits} retransmits)"
    );
    // Every retransmitted SYN is followed by its connection's handshake on
    // that port, less only the events netlens said it lost or missed.
    let unaccounted = traced.unaccounted();
    let orphans: Vec<_> = syn_retransmits
        .iter()
        .filter(|r| !handshakes.iter().any(|h| port_of(h, "sport") == port_of(r, "sport") && ts(h) >= ts(r)))
        .collect();
    // What a failure needs: the orphans, and every event on their ports.
    let on_their_ports: Vec<&Value> =
        traced.events.iter().filter(|e| orphans.iter().any(|r| port_of(e, "sport") == port_of(r, "sport"))).collect();
    assert!(
        orphans.len() as u64 <= unaccounted,
        "{} SYN retransmits with no handshake after them (netlens missed {unaccounted}): {orphans:?}; their ports' events: {on_their_ports:?}",
        orphans.len()
    );
    assert!(retried_handshakes > 0, "no handshake matched a SYN retransmit");
    assert_close(handshakes.len() as u64, conns.len() as u64, unaccounted, "active handshakes vs connects");
    Ok(())
}

/// 1 in 3 SYN-ACKs dropped: synack_retransmit events equal the kernel's
/// count, and the passive handshake time includes the retransmission delay.
#[test]
fn synack_loss_shows_in_passive_handshake_time() -> Result<()> {
    let netns = Netns::new()?;
    let addr: SocketAddr = "127.0.0.1:8083".parse()?;
    netns.nft(&loss_rule("tcp sport 8083 tcp flags & (syn | ack) == syn | ack numgen inc mod 3 == 0 drop"))?;
    let netlens = Netlens::trace_netns(netns.inode()?)?;
    let _server = Server::start(&netns, addr, 0)?;
    let before = netns.nstat()?;
    let conns = clients(&netns, addr, 30, 10, 10)?;
    netns.wait_closed(Duration::from_secs(30))?;
    let after = netns.nstat()?;
    let traced = netlens.stop()?;

    // TcpExtTCPSynRetrans counts the client's SYN retransmits and the
    // server's SYN-ACK retransmits together.
    let syn_sent_events: Vec<&Value> = traced.named("retransmit").filter(|e| e["state"] == "SYN_SENT").collect();
    let syn_sent = syn_sent_events.len() as u64;
    let synacks: Vec<&Value> = traced.named("synack_retransmit").collect();
    // Printed before the checks: what a failure needs to be read.
    eprintln!(
        "synack loss: {} synack_retransmit + {syn_sent} SYN retransmits ({} segments), nstat TcpExtTCPSynRetrans {}, {} events missed or lost, {} flows lost",
        synacks.len(),
        segments(&syn_sent_events),
        nstat_delta(&before, &after, "TcpExtTCPSynRetrans"),
        traced.unaccounted(),
        traced.flows_lost(),
    );
    assert!(!synacks.is_empty(), "dropping every third SYN-ACK retransmitted none");
    assert_close(synacks.len() as u64 + syn_sent, nstat_delta(&before, &after, "TcpExtTCPSynRetrans"), traced.unaccounted(), "SYN and SYN-ACK retransmits vs TcpExtTCPSynRetrans");
    let passive: Vec<&Value> = traced.named("handshake").filter(|e| e["direction"] == "passive").collect();
    // Every connect() completed: one passive handshake each, less the
    // events netlens reported missed or lost (a loaded host fills the ring).
    assert_close(passive.len() as u64, conns.len() as u64, traced.unaccounted(), "passive handshakes vs completed connects");
    // A client port can serve two connections of the test (loopback
    // reuses TIME_WAIT ports): a SYN-ACK retransmission belongs to the
    // first passive handshake on its port after it.
    let ts = |e: &Value| e["ts_ns"].as_u64().unwrap_or(0);
    let handshake_us = |e: &Value| e["handshake_us"].as_f64().unwrap_or(0.0);
    let on_port = |port: u16| passive.iter().copied().filter(move |e| port_of(e, "dport") == port);
    for r in &synacks {
        let Some(next) = on_port(port_of(r, "dport")).filter(|e| ts(e) >= ts(r)).min_by_key(|e| ts(e)) else { continue };
        assert!(handshake_us(next) >= 900_000.0, "SYN-ACK retransmitted ({r}) but the next passive handshake on its port {next}");
    }
    for e in &passive {
        let started = ts(e).saturating_sub((handshake_us(e) * 1e3) as u64);
        let delayed = synacks.iter().any(|r| port_of(r, "dport") == port_of(e, "dport") && (started..=ts(e)).contains(&ts(r)));
        if !delayed {
            // No SYN-ACK retransmission timeout (1 s) inside it; a fixed
            // 100 ms bound failed where a busy host starved the guest.
            assert!(handshake_us(e) < 900_000.0, "passive handshake {e} without SYN-ACK loss");
        }
    }
    Ok(())
}

/// Bulk transfers with 2 % data loss: retransmitted segments, per event and
/// per closed connection, equal TcpRetransSegs exactly; spurious ones equal
/// TcpExtTCPDSACKRecvSegs; bytes received equal bytes sent.
#[test]
fn data_loss_matches_kernel_counters_exactly() -> Result<()> {
    data_loss_matches_kernel_counters(8084, "")
}

/// The same through the formatted record's build of tcp_retransmit_skb,
/// the one a kernel that refuses the BTF tracepoint gets.
#[test]
fn data_loss_matches_kernel_counters_on_the_record_build() -> Result<()> {
    data_loss_matches_kernel_counters(8085, "tcp_retransmit_skb_btf")
}

/// `skipped`: hooks left out (see `Netlens::trace_netns_without`).
fn data_loss_matches_kernel_counters(port: u16, skipped: &str) -> Result<()> {
    let netns = Netns::new()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    netns.nft(&loss_rule(&format!("tcp dport {port} tcp flags & syn == 0 numgen random mod 1000 < 20 drop")))?;
    let netlens = Netlens::trace_netns_without(netns.inode()?, skipped)?;
    let server = Server::start(&netns, addr, 0)?;
    let before = netns.nstat()?;
    let conns = clients(&netns, addr, 8, 4, 4 << 20)?;
    netns.wait_closed(Duration::from_secs(60))?;
    let after = netns.nstat()?;
    let traced = netlens.stop()?;

    let retrans_segs = nstat_delta(&before, &after, "TcpRetransSegs");
    assert!(retrans_segs > 0, "2 % loss over 32 MB retransmitted nothing");
    let traced_segs: u64 = traced.named("retransmit").map(|e| e["segs"].as_u64().unwrap_or(0)).sum();
    let synack_segs = traced.named("synack_retransmit").count() as u64;
    let slack = traced.unaccounted();
    // A retransmission no event reported (the kernel skipped the hook, or
    // before 6.10 failed to send it) shows in the connection's next event,
    // or, after its last, only in the close's total: netlens counts those.
    let unseen = traced.retransmits_unseen();
    let failed = nstat_delta(&before, &after, "TcpExtTCPRetransFail");
    assert_close(traced_segs + synack_segs, retrans_segs, slack + unseen, "retransmit segs vs TcpRetransSegs");
    // Each data retransmission names its segment: at least one MSS-sized
    // span, at most what the skb's segments can hold (64 KB).
    for e in traced.named("retransmit").filter(|e| e["state"] == "ESTABLISHED") {
        let span = e["seq_span"].as_u64().unwrap_or(0);
        assert!((1..=65_536).contains(&span), "retransmit without its sequence span: {e}");
    }
    let closes: Vec<&Value> = traced.named("close").collect();
    assert_close(closes.len() as u64, 2 * conns.len() as u64, slack, "close events");
    let closed_retrans: u64 = closes.iter().map(|e| e["retransmits"].as_u64().unwrap_or(0)).sum();
    assert_close(closed_retrans, retrans_segs, slack, "close retransmits vs TcpRetransSegs");
    let spurious: u64 = closes.iter().map(|e| e["spurious_retransmits"].as_u64().unwrap_or(0)).sum();
    assert_eq!(spurious, nstat_delta(&before, &after, "TcpExtTCPDSACKRecvSegs"), "spurious vs DSACKRecvSegs");
    eprintln!(
        "data loss ({hooks}): retransmit segs {traced_segs}, close retransmits {closed_retrans}, nstat TcpRetransSegs {retrans_segs}, TcpExtTCPRetransFail {failed}, seen only at close {unseen}; spurious {spurious}, nstat TcpExtTCPDSACKRecvSegs {}",
        nstat_delta(&before, &after, "TcpExtTCPDSACKRecvSegs"),
        hooks = if skipped.is_empty() { "best hooks" } else { skipped },
    );
    let received = server.received.lock().unwrap().clone();
    for conn in &conns {
        let close = closes.iter().find(|e| e["direction"] == "passive" && port_of(e, "dport") == conn.local_port);
        let Some(close) = close else {
            assert!(slack > 0, "no server close for port {}", conn.local_port);
            continue;
        };
        assert_eq!(close["bytes_received"], conn.sent);
        assert_eq!(received.get(&conn.local_port), Some(&conn.sent));
    }
    assert!(traced.stderr.iter().all(|l| !l.contains("events lost")), "ring buffer overflowed: {:?}", traced.stderr);
    Ok(())
}
