//! From a cgroup id to its cgroup v2 path. The id the kernel side reports
//! (`bpf_get_current_cgroup_id`, the socket's cgroup) is the cgroup
//! directory's kernfs id, which is also its inode number. The kernel opens
//! a cgroup directory by that id as a file handle (`FILEID_KERNFS`, what
//! systemd's `cg_path_from_cgroupid` uses): one syscall, no walk. Where
//! that is refused, a bounded walk of the tree compares inode numbers.
//! Both touch the filesystem: they run on the resolver's own thread.

use std::{
    fs::File,
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

/// `FILEID_KERNFS` (include/linux/exportfs.h): an 8-byte kernfs node id.
const FILEID_KERNFS: i32 = 0xfe;
/// The fallback walk gives up after this many directories.
const WALK_LIMIT: usize = 100_000;

/// The cgroup v2 hierarchy.
pub struct CgroupFs {
    /// Where it is reached from here.
    mount: PathBuf,
    /// Where it is mounted in the namespace it was found in (the same, or
    /// as init sees it): links to its directories may read either way.
    mounted_at: PathBuf,
    root: File,
}

impl CgroupFs {
    /// The first cgroup2 mount in `/proc/self/mountinfo` (`/sys/fs/cgroup`,
    /// or `/sys/fs/cgroup/unified` on a hybrid host), else init's, reached
    /// through `/proc/1/root` (`ip netns exec` mounts a new /sys, which
    /// hides the cgroup mounts); `None` without either.
    pub fn find() -> Option<Self> {
        let own = std::fs::read_to_string("/proc/self/mountinfo").ok().and_then(|text| cgroup2_mount(&text));
        if let Some(mount) = own {
            if let Ok(root) = File::open(&mount) {
                return Some(Self { mounted_at: mount.clone(), mount, root });
            }
        }
        let mounted_at = cgroup2_mount(&std::fs::read_to_string("/proc/1/mountinfo").ok()?)?;
        let mount = Path::new("/proc/1/root").join(mounted_at.strip_prefix("/").ok()?);
        let root = File::open(&mount).ok()?;
        Some(Self { mount, mounted_at, root })
    }

    /// The path of cgroup `id` below the hierarchy's root (`/` for the
    /// root, `/system.slice/nginx.service`), or `None` when no such cgroup
    /// exists any more.
    pub fn path_of(&self, id: u64) -> Option<String> {
        match self.open_by_id(id) {
            Ok(dir) => {
                let target = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd())).ok()?;
                let target = target.to_str()?;
                // A directory removed since: the kernel says so in the link.
                if target.ends_with(" (deleted)") {
                    return None;
                }
                relative_to(Path::new(target), &self.mount).or_else(|| relative_to(Path::new(target), &self.mounted_at))
            }
            // The cgroup is gone (ESTALE) or the id is not one (ENOENT, EINVAL).
            Err(err) if matches!(err.raw_os_error(), Some(libc::ESTALE | libc::ENOENT)) => None,
            // Handles refused here (no CAP_DAC_READ_SEARCH, an old kernel): walk.
            Err(_) => self.walk_for(id),
        }
    }

    fn open_by_id(&self, id: u64) -> io::Result<File> {
        #[repr(C)]
        struct KernfsHandle {
            handle_bytes: u32,
            handle_type: i32,
            id: u64,
        }
        let handle = KernfsHandle { handle_bytes: 8, handle_type: FILEID_KERNFS, id };
        // SAFETY: open_by_handle_at reads a `struct file_handle` (two ints
        // and `handle_bytes` bytes) from a pointer we own for the call; it
        // returns a new descriptor or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_open_by_handle_at,
                self.root.as_raw_fd(),
                &raw const handle,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor the kernel just gave us and nobody else owns.
        Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) })
    }

    /// Breadth-first over the hierarchy for the directory whose inode is
    /// `id`; bounded by [`WALK_LIMIT`] directories.
    fn walk_for(&self, id: u64) -> Option<String> {
        let mut queue = std::collections::VecDeque::from([self.mount.clone()]);
        let mut visited = 0;
        while let Some(dir) = queue.pop_front() {
            visited += 1;
            if visited > WALK_LIMIT {
                return None;
            }
            if std::fs::metadata(&dir).is_ok_and(|meta| meta.ino() == id) {
                return relative_to(&dir, &self.mount);
            }
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    queue.push_back(entry.path());
                }
            }
        }
        None
    }
}

/// The mount point of the first cgroup2 filesystem in a mountinfo text.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
        let (fields, fs) = line.split_once(" - ")?;
        if fs.split(' ').next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(unescape(fields.split(' ').nth(4)?)))
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `path` below `mount`, starting with `/` (`/` for the mount itself).
fn relative_to(path: &Path, mount: &Path) -> Option<String> {
    let below = path.strip_prefix(mount).ok()?;
    Some(format!("/{}", below.to_str()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_of_pure_and_hybrid_hosts() {
        let hybrid = "31 25 0:27 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n\
                      42 31 0:39 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n";
        assert_eq!(cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let pure = "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/sda rw\n"), None);
        let spaced = "35 24 0:30 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(spaced), Some(PathBuf::from("/mnt/my cgroups")));
    }

    #[test]
    fn paths_are_relative_to_the_mount() {
        let mount = Path::new("/sys/fs/cgroup");
        assert_eq!(relative_to(Path::new("/sys/fs/cgroup"), mount).as_deref(), Some("/"));
        assert_eq!(
            relative_to(Path::new("/sys/fs/cgroup/system.slice/nginx.service"), mount).as_deref(),
            Some("/system.slice/nginx.service")
        );
        assert_eq!(relative_to(Path::new("/elsewhere"), mount), None);
    }
}
