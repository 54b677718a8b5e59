//! Load generator for `cargo xtask bench`: runs a workload in its own
//! private network namespace and prints its rate.
//!
//! `netlens-load churn SECONDS`: open/close connections as fast as possible;
//! prints `netns=INODE` first (so a tracer can attach to it), then
//! `connections=N seconds=S rate=R`.
//! `netlens-load churn SECONDS RATE`: the same at about RATE connections a
//! second (paced; for measuring a view's cost at a fixed load).
//! `netlens-load bulk SECONDS`: one bulk transfer, sender pinned to CPU 0
//! and receiver to CPU 1; prints `bytes=N seconds=S rate=GBIT_PER_S`.

use std::{io::Write, net::SocketAddr, time::{Duration, Instant}};

use anyhow::{bail, Context as _, Result};
use netlens_tests::{traffic, Netns};

fn main() {
    if let Err(err) = run() {
        eprintln!("netlens-load: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(workload), Some(seconds)) = (args.get(1), args.get(2)) else {
        bail!("usage: netlens-load churn SECONDS");
    };
    let seconds: f64 = seconds.parse().context("SECONDS must be a number")?;
    let netns = Netns::new()?;
    netns.exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"])?;
    println!("netns={}", netns.inode()?);
    std::io::stdout().flush()?;
    match workload.as_str() {
        "churn" => {
            let addr: SocketAddr = "127.0.0.1:7070".parse()?;
            traffic::churn_server(&netns, addr)?;
            // Give a tracer that attaches after reading netns= a moment.
            std::thread::sleep(Duration::from_millis(200));
            let started = Instant::now();
            let count = match args.get(3) {
                Some(rate) => paced_churn(&netns, addr, Duration::from_secs_f64(seconds), rate.parse().context("RATE must be a number")?)?,
                None => traffic::churn(&netns, addr, Duration::from_secs_f64(seconds), 2)?,
            };
            let elapsed = started.elapsed().as_secs_f64();
            println!("connections={count} seconds={elapsed:.2} rate={:.0}", count as f64 / elapsed);
        }
        "bulk" => {
            let addr: SocketAddr = "127.0.0.1:7071".parse()?;
            let (bytes, elapsed) = traffic::timed_bulk(&netns, addr, Duration::from_secs_f64(seconds))?;
            println!("bytes={bytes} seconds={elapsed:.2} rate={:.3}", bytes as f64 * 8.0 / elapsed / 1e9);
        }
        other => bail!("unknown workload `{other}`"),
    }
    Ok(())
}

/// Connections at `rate` a second for `duration`, from one thread: each
/// opens, half-closes and reads to EOF, then waits for its slot.
fn paced_churn(netns: &Netns, addr: SocketAddr, duration: Duration, rate: f64) -> Result<u64> {
    use std::io::Read;
    let handle = netns.spawn(move || -> Result<u64> {
        let started = Instant::now();
        let mut done = 0u64;
        let mut buffer = [0u8; 16];
        while started.elapsed() < duration {
            let mut stream = std::net::TcpStream::connect(addr)?;
            stream.shutdown(std::net::Shutdown::Write)?;
            while stream.read(&mut buffer)? > 0 {}
            done += 1;
            let due = Duration::from_secs_f64(done as f64 / rate);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(done)
    });
    Ok(handle.join().map_err(|_| anyhow::anyhow!("churn thread panicked"))???)
}
