//! Child processes with a deadline, their output read through pipes.
//!
//! Pipes, not files: QEMU (under virtme-ng) reopens its stdout and stderr by
//! path (`/proc/self/fd/1`), so when they are regular files its writes land
//! at its own offsets and corrupt the log. Through a pipe they stay in order.

use std::{
    io::{BufRead, BufReader, Read},
    process::{Command, ExitStatus, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

/// How a bounded child ended.
pub struct Outcome {
    /// `None`: it was still running at the deadline and was killed.
    pub status: Option<ExitStatus>,
    /// Everything it wrote on stdout.
    pub stdout: String,
    /// Its last [`TAIL_LINES`] lines, stdout and stderr as they came: what a
    /// report shows when the child hung, since CI logs keep only their end.
    pub tail: Vec<String>,
}

/// How many of a child's last output lines [`Outcome::tail`] keeps.
pub const TAIL_LINES: usize = 40;

impl Outcome {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// "exit 1", "killed by signal 9", "timed out after 420 s".
    pub fn describe(&self, limit: Duration) -> String {
        match self.status {
            None => format!("timed out after {} s", limit.as_secs()),
            Some(status) => match status.code() {
                Some(code) => format!("exit {code}"),
                None => format!("ended by {status}"),
            },
        }
    }
}

/// [`run`], failing unless the command exits 0 in time.
pub fn run_ok(command: &mut Command, limit: Duration, label: &str) -> Result<Outcome> {
    let outcome = run(command, limit, label)?;
    if !outcome.success() {
        anyhow::bail!("{:?} failed ({})", command.get_program(), outcome.describe(limit));
    }
    Ok(outcome)
}

/// After the child exits, how long its pipes may stay open (held by a
/// grandchild) before we stop reading them.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Runs `command` with stdin from /dev/null, echoing each output line with
/// `[label] ` in front; kills it and all its descendants at `limit`.
pub fn run(command: &mut Command, limit: Duration, label: &str) -> Result<Outcome> {
    let start = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {command:?}"))?;
    let (lines_tx, lines_rx) = mpsc::channel::<(bool, String)>();
    let stdout = child.stdout.take().context("child stdout")?;
    let stderr = child.stderr.take().context("child stderr")?;
    for (is_stdout, pipe) in [(true, Box::new(stdout) as Box<dyn Read + Send>), (false, Box::new(stderr))] {
        let lines_tx = lines_tx.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut raw = Vec::new();
            // Lossy: a guest console may write anything.
            while reader.read_until(b'\n', &mut raw).is_ok_and(|n| n > 0) {
                let line = String::from_utf8_lossy(&raw).trim_end_matches(['\n', '\r']).to_string();
                raw.clear();
                if lines_tx.send((is_stdout, line)).is_err() {
                    break;
                }
            }
        });
    }
    drop(lines_tx);

    let deadline = start + limit;
    let mut collected = String::new();
    let mut tail = std::collections::VecDeque::with_capacity(TAIL_LINES);
    let mut status = None;
    let mut ended_at: Option<Instant> = None;
    let mut pipes_open = true;
    loop {
        if pipes_open {
            match lines_rx.recv_timeout(Duration::from_millis(200)) {
                Ok((is_stdout, line)) => {
                    if tail.len() == TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line.clone());
                    if is_stdout {
                        println!("[{label}] {line}");
                        collected.push_str(&line);
                        collected.push('\n');
                    } else {
                        eprintln!("[{label}] {line}");
                    }
                }
                Err(RecvTimeoutError::Disconnected) => pipes_open = false,
                Err(RecvTimeoutError::Timeout) => {}
            }
        } else {
            thread::sleep(Duration::from_millis(100));
        }
        if ended_at.is_none() {
            if let Some(exit) = child.try_wait().context("waiting for a child")? {
                status = Some(exit);
                ended_at = Some(Instant::now());
            } else if Instant::now() >= deadline {
                eprintln!("[{label}] still running after {} s: killing it", limit.as_secs());
                kill_tree(child.id());
                let _ = child.wait();
                ended_at = Some(Instant::now());
            }
        }
        if let Some(ended) = ended_at {
            if !pipes_open || ended.elapsed() >= DRAIN_GRACE {
                break;
            }
        }
    }
    Ok(Outcome { status, stdout: collected, tail: tail.into() })
}

/// SIGKILLs `root` and every process descended from it (virtme-ng runs QEMU
/// as a child; killing vng alone would leave QEMU running). The tree is
/// collected first, while the parent links still exist.
fn kill_tree(root: u32) {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut tree = vec![root];
    let mut next = 0;
    while next < tree.len() {
        let parent = tree[next];
        tree.extend(parents.iter().filter(|(_, ppid)| *ppid == parent).map(|(pid, _)| *pid));
        next += 1;
    }
    for pid in tree {
        // SAFETY: kill has no memory-safety preconditions; these pids are ours.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
}
