//! A running `netlens trace --json`, and what it printed.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

/// The netlens binary under test: `NETLENS_BIN` (set by `cargo xtask
/// test`), else the release build in this workspace.
pub fn binary() -> PathBuf {
    std::env::var_os("NETLENS_BIN").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/netlens")
    })
}

pub struct Netlens {
    child: Child,
    stdout: Option<thread::JoinHandle<Vec<String>>>,
    stderr: Option<thread::JoinHandle<Vec<String>>>,
}

/// What one netlens run printed.
pub struct Traced {
    pub events: Vec<Value>,
    pub stderr: Vec<String>,
}

impl Traced {
    /// Events netlens said it missed (the kernel skipped a program already
    /// running on that CPU) or lost (ring buffer full), from its stderr.
    /// Tests that compare exact counts allow this much difference, and
    /// only when netlens itself reported it.
    pub fn unaccounted(&self) -> u64 {
        self.lost() + self.missed()
    }

    /// Events netlens said the full ring buffer lost (its last report).
    pub fn lost(&self) -> u64 {
        self.said("events lost")
    }

    /// Events netlens said the kernel skipped (its last report).
    pub fn missed(&self) -> u64 {
        self.said("events missed")
    }

    /// Runs of counting programs (drop reasons, listen overflows) netlens
    /// said the kernel skipped (its last report).
    pub fn counts_missed(&self) -> u64 {
        self.said("runs of counting programs skipped")
    }

    /// Retransmissions netlens said only a close's total showed (its last
    /// report).
    pub fn retransmits_unseen(&self) -> u64 {
        self.said("retransmissions so far had no retransmit event")
    }

    /// Flows the kernel's flow table lost, as netlens reported at exit (0
    /// when it said nothing).
    pub fn flows_lost(&self) -> u64 {
        self.stderr
            .iter()
            .filter_map(|l| l.strip_prefix("netlens: the flow table lost ")?.split(' ').next()?.parse().ok())
            .max()
            .unwrap_or(0)
    }

    /// Closed flows swept out of the flow table, as said at exit.
    pub fn flows_swept(&self) -> u64 {
        self.said("closed flows swept out of the flow table")
    }

    /// The largest N of stderr lines `netlens: N <what>…`.
    fn said(&self, what: &str) -> u64 {
        self.stderr
            .iter()
            .filter(|l| l.contains(what))
            .filter_map(|l| l.strip_prefix("netlens: ")?.split(' ').next()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
    }

    /// Events named `name`.
    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.events.iter().filter(move |e| e["event"] == name)
    }
}

impl Netlens {
    /// Starts `netlens ARGS` and waits (bounded) for `netlens: attached`.
    pub fn start(args: &[&str]) -> Result<Self> {
        Self::start_in(None, args)
    }

    /// Starts `netlens ARGS`, inside network namespace `netns` when given
    /// (`ip netns exec` execs it: the child's pid is netlens's).
    pub fn start_in(netns: Option<&str>, args: &[&str]) -> Result<Self> {
        Self::start_with_env(netns, args, &[])
    }

    /// Starts `netlens ARGS` in network namespace `netns` with `nsenter
    /// --net`, which (unlike `ip netns exec`) keeps the host's mounts in
    /// view, the cgroup hierarchy among them.
    pub fn start_nsenter(netns: &str, args: &[&str]) -> Result<Self> {
        let mut full = vec!["--net=/run/netns/".to_string() + netns, binary().display().to_string()];
        full.extend(args.iter().map(|a| a.to_string()));
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        Self::spawn("nsenter", &full, &[])
    }

    /// [`Self::start_in`] with extra environment variables.
    pub fn start_with_env(netns: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        let binary = binary();
        let program = binary.display().to_string();
        match netns {
            Some(name) => {
                let mut full = vec!["netns", "exec", name, &program];
                full.extend_from_slice(args);
                Self::spawn("ip", &full, env)
            }
            None => Self::spawn(&program, args, env),
        }
    }

    /// Starts `WRAPPER… netlens ARGS` (e.g. `setpriv` with options) and
    /// waits (bounded) for `netlens: attached`.
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Result<Self> {
        let program = binary().display().to_string();
        let (first, options) = wrapper.split_first().context("an empty wrapper")?;
        let mut full: Vec<&str> = options.to_vec();
        full.push(&program);
        full.extend_from_slice(args);
        Self::spawn(first, &full, &[])
    }

    /// Runs `program ARGS` (netlens, however wrapped) and waits (bounded)
    /// for `netlens: attached`.
    fn spawn(program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        let binary = binary();
        if !binary.exists() {
            bail!("{} not built: run the tests through `cargo xtask test`", binary.display());
        }
        let mut child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let stderr = child.stderr.take().context("stderr")?;
        let (attached_tx, attached_rx) = mpsc::channel();
        let stderr = thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.starts_with("netlens: attached") {
                    let _ = attached_tx.send(());
                }
                lines.push(line);
            }
            lines
        });
        let stdout = thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).collect());
        let mut netlens = Self { child, stdout: Some(stdout), stderr: Some(stderr) };
        if attached_rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = netlens.child.kill();
            let stderr = netlens.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
            bail!("netlens did not attach within 30 s: {}", stderr.join(" | "));
        }
        Ok(netlens)
    }

    /// `netlens trace --json --netns INODE`.
    pub fn trace_netns(inode: u32) -> Result<Self> {
        Self::start(&["trace", "--json", "--netns", &inode.to_string()])
    }

    /// The same, with `hooks` (program names, comma-separated) left out as
    /// if this kernel lacked them: how the fallbacks older kernels use are
    /// tested on a new one.
    /// Hooks this test process was itself told to leave out stay out.
    pub fn trace_netns_without(inode: u32, hooks: &str) -> Result<Self> {
        let inherited = std::env::var("NETLENS_SKIP_HOOKS").unwrap_or_default();
        let skipped = if inherited.is_empty() { hooks.to_string() } else { format!("{inherited},{hooks}") };
        Self::start_with_env(None, &["trace", "--json", "--netns", &inode.to_string()], &[("NETLENS_SKIP_HOOKS", &skipped)])
    }

    /// Its process id (netlens's own, also under `ip netns exec`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` without waiting for anything (SIGSTOP, SIGCONT).
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Stops it with SIGINT (it must exit 0 within 10 s) and returns what
    /// it printed.
    pub fn stop(self) -> Result<Traced> {
        // Let the 20 ms drain timer pick up the last events first.
        thread::sleep(Duration::from_millis(100));
        self.stop_with(libc::SIGINT).map(|(traced, _)| traced)
    }

    /// Waits (bounded) for it to exit on its own (`top -n N`); it must exit 0.
    pub fn wait_exit(mut self, limit: Duration) -> Result<Traced> {
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                bail!("netlens did not exit within {limit:?}");
            }
            thread::sleep(Duration::from_millis(20));
        };
        self.collect(status)
    }

    /// Sends `signal`; returns what it printed and how long it took to exit
    /// (it must exit 0 within 10 s).
    pub fn stop_with(mut self, signal: i32) -> Result<(Traced, Duration)> {
        let sent = std::time::Instant::now();
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if sent.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
                bail!("netlens did not exit within 10 s of signal {signal}");
            }
            thread::sleep(Duration::from_millis(5));
        };
        let exited_after = sent.elapsed();
        Ok((self.collect(status)?, exited_after))
    }

    /// What it printed, once it has exited with `status`.
    fn collect(&mut self, status: std::process::ExitStatus) -> Result<Traced> {
        let lines = self.stdout.take().and_then(|h| h.join().ok()).unwrap_or_default();
        let stderr = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
        if !status.success() {
            bail!("netlens exited with {status}: {}", stderr.join(" | "));
        }
        let events = lines
            .iter()
            .map(|l| serde_json::from_str(l).with_context(|| format!("not a JSON line: {l}")))
            .collect::<Result<Vec<Value>>>()?;
        Ok(Traced { events, stderr })
    }
}

impl Drop for Netlens {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `command` (a netlens invocation, however wrapped) and asserts what a
/// user must see when something is wrong: a non-zero exit, nothing on
/// stdout, one `netlens: ` line on stderr that mentions `mentions`, no
/// panic or backtrace.
pub fn assert_one_line_error(mut command: Command, mentions: &str) {
    let shown = format!("{command:?}");
    let output = command.output().expect("running netlens");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{shown} succeeded");
    assert!(stdout.is_empty(), "{shown} printed to stdout: {stdout}");
    assert_eq!(stderr.lines().count(), 1, "{shown} printed more than one line: {stderr}");
    assert!(stderr.starts_with("netlens: "), "{stderr}");
    assert!(stderr.contains(mentions), "{shown}: `{stderr}` does not mention `{mentions}`");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"));
}
