//! cgroup v2 directories made for one test, and processes started in them.

use std::{
    os::unix::fs::MetadataExt,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// The cgroup v2 mount point (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
/// on a hybrid host), from this process's mountinfo.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (fields, fs) = line.split_once(" - ")?;
            (fs.starts_with("cgroup2 ")).then(|| PathBuf::from(fields.split(' ').nth(4).unwrap_or_default()))
        })
        .context("no cgroup2 filesystem mounted")
}

/// A cgroup directory, removed on drop (once its processes have exited).
pub struct TestCgroup {
    pub dir: PathBuf,
    /// Below the hierarchy's root, as netlens reports it (`/a/b.service`).
    pub path: String,
}

impl TestCgroup {
    /// Creates `relative` (e.g. `netlens-test-1.service`) under the mount.
    pub fn create(relative: &str) -> Result<Self> {
        let dir = cgroup2_mount()?.join(relative);
        std::fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        Ok(Self { dir, path: format!("/{relative}") })
    }

    /// The cgroup id the kernel reports: the directory's inode number.
    pub fn id(&self) -> Result<u64> {
        Ok(std::fs::metadata(&self.dir)?.ino())
    }

    /// Moves process `pid` into this cgroup (from outside: `ip netns
    /// exec` mounts its own /sys, where the cgroup mounts are hidden).
    pub fn adopt(&self, pid: u32) -> Result<()> {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving {pid} into {}", self.dir.display()))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // A cgroup can be removed once empty; its last process may still
        // be exiting: bounded retries.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline && self.dir.exists() {
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Waits (bounded) for `child` to exit with success.
pub fn wait_success(child: &mut std::process::Child, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("{status}");
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("did not exit within {limit:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}
