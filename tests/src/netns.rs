//! Private network namespaces with a realistic loopback.

use std::{
    collections::HashMap,
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// A thread of [`Netns::spawn`]. Its result comes back over a channel,
/// not through `JoinHandle::join()`: in the 5.10 and 6.1 guests `join()`
/// now and then panicked inside std ("threads should not terminate
/// unexpectedly") on a thread that had finished its work.
pub struct NsThread<T> {
    result: mpsc::Receiver<T>,
}

impl<T> NsThread<T> {
    /// Waits for the thread's result, as `JoinHandle::join()` does; `Err`
    /// when it panicked.
    pub fn join(self) -> thread::Result<T> {
        self.result.recv().map_err(|_| panicked())
    }

    /// [`Self::join`], giving up at `deadline`: `None` when the thread has
    /// not finished by then, `Some(Err)` when it panicked.
    pub fn join_until(&self, deadline: std::time::Instant) -> Option<thread::Result<T>> {
        match self.result.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            Ok(value) => Some(Ok(value)),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => Some(Err(panicked())),
        }
    }
}

/// What `join` reports for a thread that dropped its channel unanswered:
/// it panicked.
fn panicked() -> Box<dyn std::any::Any + Send> {
    Box::new("the namespace thread panicked")
}

/// A network namespace made for one test, deleted on drop (with its
/// nftables rules and sockets).
pub struct Netns {
    pub name: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Netns {
    /// Creates the namespace: `lo` up at MTU 1500 with TSO/GSO/GRO off, so
    /// segments are real-sized and one drop loses one segment.
    pub fn new() -> Result<Self> {
        let name = format!("nlt{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        sh(Command::new("ip").args(["netns", "add", &name]))?;
        let netns = Self { name };
        netns.exec(&["ip", "link", "set", "lo", "up", "mtu", "1500"])?;
        netns.exec(&["ethtool", "-K", "lo", "tso", "off", "gso", "off", "gro", "off"])?;
        Ok(netns)
    }

    /// The namespace's inode number, as netlens reports it (`netns`).
    pub fn inode(&self) -> Result<u32> {
        let meta = std::fs::metadata(format!("/run/netns/{}", self.name))?;
        Ok(meta.ino() as u32)
    }

    /// Runs a command inside the namespace; returns its stdout.
    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        sh(Command::new("ip").args(["netns", "exec", &self.name]).args(argv))
    }

    /// Loads an nftables ruleset (text) into the namespace.
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        let path = std::env::temp_dir().join(format!("{}.nft", self.name));
        std::fs::write(&path, ruleset)?;
        let result = self.exec(&["nft", "-f", path.to_str().unwrap_or_default()]);
        let _ = std::fs::remove_file(&path);
        result.map(|_| ())
    }

    /// Absolute SNMP/netstat counters of the namespace, from `nstat`.
    pub fn nstat(&self) -> Result<HashMap<String, u64>> {
        let text = self.exec(&["nstat", "-asz", "--json"])?;
        let json: serde_json::Value = serde_json::from_str(&text).context("parsing nstat --json")?;
        let kernel = json["kernel"].as_object().context("nstat: no `kernel` object")?;
        Ok(kernel.iter().filter_map(|(k, v)| Some((k.clone(), v.as_u64()?))).collect())
    }

    /// Runs `work` on a thread that lives in this namespace, so every socket
    /// it opens is inside.
    pub fn spawn<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> NsThread<Result<T>> {
        let path = format!("/run/netns/{}", self.name);
        let (result_tx, result) = mpsc::channel();
        // Detached: the result comes back on the channel (see NsThread).
        drop(thread::spawn(move || {
            let outcome = (|| {
                let file = File::open(&path).with_context(|| format!("opening {path}"))?;
                // SAFETY: valid fd; setns affects only this thread.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns {path}: {}", std::io::Error::last_os_error());
                }
                Ok(work())
            })();
            let _ = result_tx.send(outcome);
        }));
        NsThread { result }
    }

    /// Waits (bounded) until no TCP socket but listeners and time-wait
    /// minisockets is left: every connection has reached CLOSE and
    /// reported it.
    ///
    /// A minisocket is the closed socket's stand-in, so it counts as closed
    /// whatever its substate: an orphan that reaches FIN-WAIT-2 becomes one
    /// (`tcp_time_wait(sk, TCP_FIN_WAIT2, ..)` after `tcp_done`) and shows
    /// as FIN-WAIT-2 for up to `tcp_fin_timeout` (60 s) if the peer's FIN
    /// never reaches it (seen once in the 5.10 guest, the peer already
    /// gone). `ss -o` names its timer `timewait`; a full FIN-WAIT-2 socket's
    /// timer is anything else.
    pub fn wait_closed(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let sockets = self.exec(&["ss", "-tanoH"])?;
            let open: Vec<&str> = sockets
                .lines()
                .filter(|l| !l.starts_with("LISTEN") && !l.contains("timer:(timewait,"))
                .collect();
            if open.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} sockets still open after {limit:?}: {:?}", open.len(), open.first());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(Command::new("ip").args(["netns", "del", &self.name]));
    }
}

/// Longest any helper command (`ip`, `ethtool`, `nft`, `nstat`, `ss`) may
/// run: a hung one fails the test with its name instead of hanging the
/// test binary until the runner kills it without a word.
const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// Runs `command` within [`COMMAND_LIMIT`]; returns its stdout, or an
/// error with its stderr when it fails.
pub fn sh(command: &mut Command) -> Result<String> {
    let shown = format!("{command:?}");
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {shown}"))?;
    let pid = child.id();
    let (done_tx, done) = mpsc::channel();
    thread::spawn(move || {
        let _ = done_tx.send(child.wait_with_output());
    });
    let output = match done.recv_timeout(COMMAND_LIMIT) {
        Ok(output) => output.with_context(|| format!("waiting for {shown}"))?,
        Err(_) => {
            // SAFETY: plain kill(2) on our own child, not yet reaped (the
            // waiting thread has not returned).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            bail!("{shown} did not finish within {COMMAND_LIMIT:?}: killed");
        }
    };
    if !output.status.success() {
        bail!("{shown} failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// How much nstat counter `key` grew between two [`Netns::nstat`] reads.
pub fn nstat_delta(before: &HashMap<String, u64>, after: &HashMap<String, u64>, key: &str) -> u64 {
    after.get(key).copied().unwrap_or(0).saturating_sub(before.get(key).copied().unwrap_or(0))
}
