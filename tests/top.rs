//! `netlens top` end to end: batch output against the workload, and the
//! full-screen view in a real terminal (tmux) while one endpoint suffers
//! 2 % loss and another does not. Needs root.

use std::{
    net::SocketAddr,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use netlens_tests::{
    netlens::binary,
    traffic::{clients, retry_without_backoff, Server},
    Netlens, Netns,
};

/// Batch JSON: the endpoint appears with the connections made to it, as a
/// client endpoint and as a listener.
#[test]
fn batch_mode_counts_connections_per_endpoint() -> Result<()> {
    let netns = Netns::new()?;
    let inode = netns.inode()?.to_string();
    let top = Netlens::start(&["top", "--json", "-n", "3", "-d", "1", "--netns", &inode])?;
    let addr: SocketAddr = "127.0.0.1:8095".parse()?;
    let _server = Server::start(&netns, addr, 100)?;
    clients(&netns, addr, 40, 4, 1000)?;
    let traced = top.wait_exit(Duration::from_secs(15))?;
    assert_eq!(traced.events.len(), 3, "three snapshots, one JSON object per line");
    let last = &traced.events[2];
    assert_eq!(last["view"], "endpoints");
    let row = |name: &str| last["rows"].as_array().and_then(|rows| rows.iter().find(|r| r["endpoint"] == name)).cloned();
    let client_side = row("127.0.0.1:8095").context("no row for 127.0.0.1:8095")?;
    let listener = row("*:8095").context("no row for *:8095")?;
    assert_eq!(client_side["connections"], 40);
    assert_eq!(listener["connections"], 40);
    assert_eq!(listener["kind"], "listener");
    assert!(last["header"]["handshake_active"]["p99_us"].as_f64().is_some());
    Ok(())
}

/// The Findings view (`--view findings`): a process retrying a closed port
/// every 50 ms shows as a retry storm on that endpoint, the only finding.
#[test]
fn findings_view_names_a_retry_storm() -> Result<()> {
    let netns = Netns::new()?;
    let inode = netns.inode()?.to_string();
    let top = Netlens::start_in(Some(&netns.name), &["top", "--json", "--view", "findings", "-n", "4", "-d", "1", "--netns", &inode])?;
    retry_without_backoff(&netns, "127.0.0.1:8096".parse()?, Duration::from_millis(50), Duration::from_secs(3))?;
    let traced = top.wait_exit(Duration::from_secs(15))?;
    let last = traced.events.last().context("no snapshot")?;
    assert_eq!(last["view"], "findings");
    let rows = last["rows"].as_array().context("no rows")?;
    eprintln!("findings: {rows:?}");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["finding"], "retry_storm");
    assert_eq!(rows[0]["endpoint"], "127.0.0.1:8096");
    Ok(())
}

/// A tmux session running a shell; killed on drop.
struct Tmux {
    session: String,
}

impl Tmux {
    fn new() -> Result<Self> {
        let session = format!("netlens-top-{}", std::process::id());
        tmux(&["new-session", "-d", "-s", &session, "-x", "200", "-y", "50", "sh"])?;
        Ok(Self { session })
    }
    fn send(&self, keys: &[&str]) -> Result<()> {
        let mut argv = vec!["send-keys", "-t", &self.session];
        argv.extend_from_slice(keys);
        tmux(&argv).map(|_| ())
    }
    fn screen(&self) -> Result<String> {
        tmux(&["capture-pane", "-p", "-t", &self.session])
    }
    fn query(&self, format: &str) -> Result<String> {
        Ok(tmux(&["display-message", "-p", "-t", &self.session, format])?.trim().to_string())
    }
    /// Waits (bounded) until the screen satisfies `ready`.
    fn wait_for(&self, limit: Duration, ready: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            let screen = self.screen()?;
            if ready(&screen) {
                return Ok(screen);
            }
            if Instant::now() > deadline {
                bail!("screen not as expected after {limit:?}:\n{screen}");
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = tmux(&["kill-session", "-t", &self.session]);
    }
}

fn tmux(args: &[&str]) -> Result<String> {
    let output = Command::new("tmux").args(args).output().context("tmux not found: run the tests through `cargo xtask test`")?;
    if !output.status.success() {
        bail!("tmux {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The endpoint rows on screen: endpoint → its cells.
fn rows(screen: &str) -> Vec<Vec<String>> {
    screen
        .lines()
        .map(|line| line.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .filter(|cells| cells.len() >= 12 && (cells[0].starts_with("127.") || cells[0].starts_with("*:")))
        .collect()
}

/// Cells: ENDPOINT KIND CONNS CONN/S SHORT% HSP50 HSP99 RETR/S RETR/1K HOLP99 HOLTOT ZWINTOT.
fn cell<'a>(rows: &'a [Vec<String>], endpoint: &str, column: usize) -> Option<&'a str> {
    rows.iter().find(|r| r[0] == endpoint).map(|r| r[column].as_str())
}

#[test]
fn live_view_in_a_real_terminal() -> Result<()> {
    let netns = Netns::new()?;
    let inode = netns.inode()?.to_string();
    netns.nft("table inet loss {\n chain pre {\n  type filter hook prerouting priority 0;\n  tcp dport 8096 numgen random mod 1000 < 20 drop\n }\n}\n")?;
    let lossy: SocketAddr = "127.0.0.1:8096".parse()?;
    let clean: SocketAddr = "127.0.0.1:8097".parse()?;

    let tmux = Tmux::new()?;
    let command = format!("{} top -d 1 --netns {inode}; echo TOP_EXITED=$?", binary().display());
    tmux.send(&[&command, "Enter"])?;
    tmux.wait_for(Duration::from_secs(20), |s| s.contains("ENDPOINT") && s.contains("CONN/S"))?;

    // Servers and clients all on one CPU (threads inherit this thread's
    // affinity): loopback between two CPUs reorders segments, which is
    // real but brief head-of-line blocking, and the clean endpoint must
    // show none.
    netlens_tests::bulk::pin(0)?;
    let _servers = (Server::start(&netns, lossy, 10)?, Server::start(&netns, clean, 10)?);

    // Keep both endpoints busy while we look: bulk transfers, bounded. A
    // scoped thread borrows the namespace this test owns.
    let stop = AtomicBool::new(false);
    let screen = thread::scope(|scope| -> Result<String> {
        let workload = scope.spawn(|| -> Result<()> {
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(30) {
                clients(&netns, lossy, 4, 4, 512 * 1024)?;
                clients(&netns, clean, 4, 4, 512 * 1024)?;
            }
            Ok(())
        });
        let screen = tmux.wait_for(Duration::from_secs(20), |s| {
            let rows = rows(s);
            cell(&rows, "*:8096", 9).is_some_and(|p99| p99 != "-")
                && cell(&rows, "127.0.0.1:8096", 7).is_some_and(|r| r != "0.0")
                && cell(&rows, "127.0.0.1:8096", 8).is_some_and(|per_1k| per_1k != "-" && per_1k != "0.0")
                && cell(&rows, "127.0.0.1:8097", 2).is_some()
        });
        stop.store(true, Ordering::Relaxed);
        workload.join().map_err(|_| anyhow::anyhow!("workload panicked"))??;
        screen
    })?;
    eprintln!("{screen}");
    let shown = rows(&screen);
    // The clean endpoint: no retransmits, no stalls.
    assert_eq!(cell(&shown, "127.0.0.1:8097", 7), Some("0.0"), "clean endpoint retransmits");
    assert_eq!(cell(&shown, "*:8097", 9), Some("-"), "clean listener HOL p99");

    // `<` three times: sort by ENDPOINT (distinct values), ascending;
    // then `r` reverses it.
    let order = |screen: &str| rows(screen).iter().map(|r| r[0].clone()).collect::<Vec<_>>();
    tmux.send(&["<", "<", "<"])?;
    let ascending = order(&tmux.wait_for(Duration::from_secs(5), |s| s.contains("ENDPOINT▲"))?);
    tmux.send(&["r"])?;
    let descending = order(&tmux.wait_for(Duration::from_secs(5), |s| s.contains("ENDPOINT▼"))?);
    assert_eq!(ascending.len(), 4, "{ascending:?}");
    assert_eq!(descending, ascending.iter().rev().cloned().collect::<Vec<_>>());
    assert_ne!(descending, ascending);

    // `q`: the shell is back, out of the alternate screen, cursor visible.
    tmux.send(&["q"])?;
    tmux.wait_for(Duration::from_secs(5), |s| s.contains("TOP_EXITED=0"))?;
    assert_eq!(tmux.query("#{alternate_on}")?, "0", "alternate screen left on");
    assert_eq!(tmux.query("#{cursor_flag}")?, "1", "cursor hidden");
    Ok(())
}
