//! Which process holds a socket, found as `ss -p` finds it: sock_diag
//! gives each socket's inode, and `/proc/PID/fd/N` links to
//! `socket:[INODE]` for each socket a process has open. Socket inodes are
//! unique across network namespaces, so one walk of /proc serves them all.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
};

/// A process holding a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    /// `/proc/PID/comm`: at most 15 bytes, as the kernel side's comm.
    pub comm: String,
}

/// What a walk of /proc found.
#[derive(Debug, Default)]
pub struct Holders {
    /// By socket inode.
    pub found: HashMap<u32, Process>,
    /// Processes whose descriptors could not be read: another user's, or
    /// one with capabilities we lack, without CAP_SYS_PTRACE.
    pub unreadable: usize,
}

/// The processes holding the sockets of `wanted` inodes, by inode. When
/// several hold one (a forked server's workers), the lowest pid, which
/// is normally the parent that opened it. One walk over every process's
/// file descriptors; stops early once every inode is found.
pub fn holders(wanted: &HashSet<u32>) -> Holders {
    let mut holders = Holders::default();
    let found = &mut holders.found;
    if wanted.is_empty() {
        return holders;
    }
    let mut pids = process_ids();
    pids.sort_unstable();
    for pid in pids {
        let mut comm = None;
        let denied = |err: &std::io::Error| err.kind() == std::io::ErrorKind::PermissionDenied;
        let fds = match std::fs::read_dir(Path::new("/proc").join(pid.to_string()).join("fd")) {
            Ok(fds) => fds,
            Err(err) if denied(&err) => {
                holders.unreadable += 1;
                continue;
            }
            // Exited meanwhile.
            Err(_) => continue,
        };
        for fd in fds.filter_map(Result::ok) {
            // The directory may list where the links cannot be read (root
            // without CAP_SYS_PTRACE, looking at a process with more
            // capabilities): one such process is enough to say so.
            let target = match std::fs::read_link(fd.path()) {
                Ok(target) => target,
                Err(err) if denied(&err) => {
                    holders.unreadable += 1;
                    break;
                }
                // Closed meanwhile.
                Err(_) => continue,
            };
            let Some(inode) = target.to_str().and_then(socket_inode) else { continue };
            if !wanted.contains(&inode) || found.contains_key(&inode) {
                continue;
            }
            let comm = comm.get_or_insert_with(|| read_comm(pid)).clone();
            found.insert(inode, Process { pid, comm });
        }
        if found.len() == wanted.len() {
            break;
        }
    }
    holders
}

/// The socket inodes held by the processes `pid` and `comm` name (either
/// or both; `comm` as `/proc/PID/comm` has it): what `top --pid`/`--comm`
/// keep from the kernel's connection list before its cap. Cheap for a pid
/// (one process's descriptors); a name reads every process's `comm`, and
/// the descriptors of those it names.
pub fn sockets_held_by(pid: Option<u32>, comm: Option<&str>) -> HashSet<u32> {
    let pids = match pid {
        Some(pid) => vec![pid],
        None => process_ids(),
    };
    let mut inodes = HashSet::new();
    for pid in pids {
        if comm.is_some_and(|wanted| read_comm(pid) != wanted) {
            continue;
        }
        for fd in read_dir(&Path::new("/proc").join(pid.to_string()).join("fd")) {
            if let Some(inode) = std::fs::read_link(fd.path()).ok().as_deref().and_then(|target| target.to_str()).and_then(socket_inode) {
                inodes.insert(inode);
            }
        }
    }
    inodes
}

/// Every process's id, from the numbered entries of /proc.
fn process_ids() -> Vec<u32> {
    read_dir(Path::new("/proc")).filter_map(|entry| entry.file_name().to_str()?.parse().ok()).collect()
}

fn read_dir(directory: &Path) -> impl Iterator<Item = std::fs::DirEntry> {
    std::fs::read_dir(directory).into_iter().flatten().filter_map(Result::ok)
}

fn read_comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).map(|comm| comm.trim_end_matches('\n').to_string()).unwrap_or_default()
}

/// The inode of an fd link's target `socket:[12345]`; None for anything
/// else (files, pipes, `anon_inode:...`).
fn socket_inode(target: &str) -> Option<u32> {
    target.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, os::unix::fs::MetadataExt};

    use super::*;

    #[test]
    fn socket_links_parse() {
        assert_eq!(socket_inode("socket:[12345]"), Some(12345));
        assert_eq!(socket_inode("socket:[]"), None);
        assert_eq!(socket_inode("pipe:[12345]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
        assert_eq!(socket_inode("socket:[12345"), None);
    }

    /// The inode of a socket this process holds.
    fn inode_of(socket: &TcpListener) -> u32 {
        std::fs::metadata(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(socket))).unwrap().ino() as u32
    }

    #[test]
    fn finds_this_process_holding_its_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let inode = inode_of(&listener);
        let found = holders(&HashSet::from([inode]));
        let process = found.found.get(&inode).expect("this process holds it");
        assert_eq!(process.pid, std::process::id());
        assert_eq!(process.comm, read_comm(std::process::id()));
        assert!(holders(&HashSet::new()).found.is_empty());
    }

    #[test]
    fn finds_the_sockets_of_a_process_by_pid_and_by_name() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let inode = inode_of(&listener);
        let (me, my_name) = (std::process::id(), read_comm(std::process::id()));
        assert!(sockets_held_by(Some(me), None).contains(&inode));
        assert!(sockets_held_by(None, Some(&my_name)).contains(&inode));
        assert!(sockets_held_by(Some(me), Some(&my_name)).contains(&inode));
        assert!(!sockets_held_by(Some(me), Some("not-this-name")).contains(&inode));
        assert!(!sockets_held_by(Some(1), None).contains(&inode));
    }
}
