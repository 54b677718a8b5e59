//! One-connection transfers with control over CPU placement, congestion
//! control and the receiver's pace, for the transport-dynamics tests.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::Netns;

#[derive(Clone, Debug, Default)]
pub struct Bulk {
    /// Bytes the client sends.
    pub bytes: usize,
    /// Run client and server on this CPU (no cross-CPU reordering).
    pub cpu: Option<usize>,
    /// TCP_CONGESTION for the client (the sender).
    pub congestion: Option<&'static str>,
    /// The server accepts, then waits this long before reading.
    pub reader_pause: Duration,
    /// Send this many bytes first, then pause `burst_gap`, then the rest
    /// (so the receiver is idle, waiting, when the second burst starts).
    pub first_burst: usize,
    pub burst_gap: Duration,
}

/// What the transfer looked like from the two applications.
#[derive(Clone, Debug)]
pub struct Transfer {
    pub client_port: u16,
    pub received: u64,
    /// (time since the transfer started, bytes read so far) after every
    /// read.
    pub reads: Vec<(Duration, u64)>,
    /// The reader thread's time runnable but not running (its run-queue
    /// delay, /proc/thread-self/schedstat) so far, after every read: a
    /// wait for data is the time between two reads less what this grew.
    pub read_run_delays: Vec<Duration>,
    /// When the client started writing its second burst (same clock).
    pub second_burst_at: Duration,
    pub elapsed: Duration,
}

/// The calling thread's run-queue delay so far (the second field of
/// /proc/thread-self/schedstat, ns); zero where the kernel keeps none.
fn run_delay() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    Duration::from_nanos(stat.split_whitespace().nth(1).and_then(|ns| ns.parse().ok()).unwrap_or(0))
}

/// Pins the calling thread to one CPU.
pub fn pin(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sets the socket's congestion control algorithm.
pub fn set_congestion(stream: &TcpStream, name: &str) -> Result<()> {
    // SAFETY: valid fd; the option value is the name's bytes.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("TCP_CONGESTION {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl Bulk {
    /// Runs the transfer to `addr` inside `netns`; bounded by 120 s.
    pub fn run(&self, netns: &Netns, addr: SocketAddr) -> Result<Transfer> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let base = Instant::now();
        let server_opts = self.clone();
        let server = netns.spawn(move || -> Result<(Vec<(Duration, u64)>, Vec<Duration>, u64)> {
            if let Some(cpu) = server_opts.cpu {
                pin(cpu)?;
            }
            let listener = TcpListener::bind(addr)?;
            let _ = ready_tx.send(());
            let (mut stream, _) = listener.accept()?;
            stream.set_read_timeout(Some(Duration::from_secs(120)))?;
            std::thread::sleep(server_opts.reader_pause);
            let mut reads = Vec::new();
            let mut run_delays = Vec::new();
            let mut total = 0u64;
            let mut buffer = vec![0u8; 64 * 1024];
            loop {
                let n = stream.read(&mut buffer)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                reads.push((base.elapsed(), total));
                run_delays.push(run_delay());
            }
            Ok((reads, run_delays, total))
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).context("server did not start")?;
        let client_opts = self.clone();
        let client = netns.spawn(move || -> Result<(u16, Duration, Duration)> {
            if let Some(cpu) = client_opts.cpu {
                pin(cpu)?;
            }
            let started = Instant::now();
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
            if let Some(name) = client_opts.congestion {
                set_congestion(&stream, name)?;
            }
            stream.set_write_timeout(Some(Duration::from_secs(120)))?;
            let port = stream.local_addr()?.port();
            let chunk = vec![b'b'; 256 * 1024];
            let mut sent = 0;
            let mut second_burst_at = Duration::ZERO;
            if client_opts.first_burst > 0 {
                stream.write_all(&chunk[..client_opts.first_burst.min(chunk.len())])?;
                sent = client_opts.first_burst.min(chunk.len());
                std::thread::sleep(client_opts.burst_gap);
                second_burst_at = base.elapsed();
            }
            while sent < client_opts.bytes {
                let n = (client_opts.bytes - sent).min(chunk.len());
                stream.write_all(&chunk[..n])?;
                sent += n;
            }
            stream.shutdown(Shutdown::Write)?;
            Ok((port, started.elapsed(), second_burst_at))
        });
        let (client_port, elapsed, second_burst_at) = client.join().map_err(|_| anyhow::anyhow!("client panicked"))???;
        let (reads, read_run_delays, received) = server.join().map_err(|_| anyhow::anyhow!("server panicked"))???;
        Ok(Transfer { client_port, received, reads, read_run_delays, second_burst_at, elapsed })
    }
}
