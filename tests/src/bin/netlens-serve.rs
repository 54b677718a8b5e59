//! A TCP server in a process of its own, for tests that check which process
//! netlens names as a connection's server (a thread of the test would share
//! the test's pid).
//!
//! `netlens-serve ADDR`: listens on ADDR, prints `listening`, then serves
//! each connection in turn: reads it to EOF, answers `ok` and closes. It
//! exits when its stdin closes (the test dropped it) or after 300 s.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

/// Longest it runs, whatever the test does.
const LIFETIME: Duration = Duration::from_secs(300);

fn main() {
    if let Err(err) = run() {
        eprintln!("netlens-serve: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let addr: SocketAddr = std::env::args().nth(1).context("usage: netlens-serve ADDR")?.parse()?;
    let listener = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
    listener.set_nonblocking(true)?;
    println!("listening");
    std::io::stdout().flush()?;
    // The test's end of stdin closing is the signal to stop.
    thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    });
    let started = Instant::now();
    while started.elapsed() < LIFETIME {
        // In poll(2), not in accept() in a loop (see wait_for_connection).
        if !netlens_tests::traffic::wait_for_connection(&listener, netlens_tests::traffic::ACCEPT_POLL) {
            continue;
        }
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(Duration::from_secs(30)))?;
                let _ = stream.read_to_end(&mut Vec::new());
                let _ = stream.write_all(b"ok");
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
