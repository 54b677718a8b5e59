//! The network namespaces netlens watches, as files a thread can enter.
//!
//! The eBPF side sees every namespace; `--netns INODE` narrows what is
//! shown to one. A sock_diag dump, though, lists the sockets of the
//! namespace its netlink socket was created in. So a dump of "what netlens
//! watches" enters each watched namespace (setns on the calling thread),
//! creates its netlink socket there, and comes back at once: the socket
//! keeps its namespace, the thread does not.
//!
//! Namespaces are found as `ip netns` and `lsns` find them: the bind
//! mounts under /run/netns and each process's /proc/PID/ns/net.

use std::{
    collections::HashSet,
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

/// Namespaces dumped at most (a host with more containers than this shows
/// the connections of the first ones found).
pub const MAX_NAMESPACES: usize = 256;

/// A network namespace, open.
pub struct Namespace {
    /// Its inode number: what `--netns` takes and events carry.
    pub inode: u32,
    file: File,
}

impl Namespace {
    /// Runs `work` with the calling thread inside this namespace, then
    /// returns the thread to the namespace it was in. In the thread's own
    /// namespace it just runs: setns needs CAP_SYS_ADMIN (and systemd's
    /// RestrictNamespaces= forbids it), the dump of one's own does not.
    pub fn enter<T>(&self, work: impl FnOnce() -> T) -> Result<T> {
        let home = File::open("/proc/thread-self/ns/net").context("opening /proc/thread-self/ns/net")?;
        if home.metadata().is_ok_and(|meta| meta.ino() as u32 == self.inode) {
            return Ok(work());
        }
        set_netns(&self.file, self.inode)?;
        let result = work();
        set_netns(&home, 0).context("returning to netlens's own network namespace")?;
        Ok(result)
    }
}

fn set_netns(file: &File, inode: u32) -> Result<()> {
    // SAFETY: a valid, open namespace fd; setns changes only this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("entering network namespace {inode}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The namespaces netlens watches: `only` (a `--netns` inode), else every
/// one found (at most [`MAX_NAMESPACES`]). Fails when `only` names a
/// namespace nothing holds open.
pub fn watched(only: Option<u32>) -> Result<Vec<Namespace>> {
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    for path in candidates() {
        // Metadata through the link: the namespace's own inode (`ls -L -i`).
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        let inode = meta.ino() as u32;
        if only.is_some_and(|wanted| wanted != inode) || !seen.insert(inode) {
            continue;
        }
        // A process may exit between the two calls: skip it.
        let Ok(file) = File::open(&path) else { continue };
        found.push(Namespace { inode, file });
        if only.is_some() || found.len() == MAX_NAMESPACES {
            break;
        }
    }
    if let (Some(inode), true) = (only, found.is_empty()) {
        bail!("network namespace {inode} not found: no process and no /run/netns entry holds it");
    }
    Ok(found)
}

/// /run/netns/*, then /proc/PID/ns/net of every process, lazily.
fn candidates() -> impl Iterator<Item = PathBuf> {
    let named = entries(Path::new("/run/netns")).map(|entry| entry.path());
    let processes = entries(Path::new("/proc"))
        .filter(|entry| entry.file_name().to_str().is_some_and(|name| name.bytes().all(|b| b.is_ascii_digit())))
        .map(|entry| entry.path().join("ns/net"));
    named.chain(processes)
}

fn entries(directory: &Path) -> impl Iterator<Item = std::fs::DirEntry> {
    std::fs::read_dir(directory).into_iter().flatten().filter_map(Result::ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_inode() -> u32 {
        std::fs::metadata("/proc/self/ns/net").unwrap().ino() as u32
    }

    #[test]
    fn finds_its_own_namespace_by_inode() {
        let inode = own_inode();
        let found = watched(Some(inode)).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].inode, inode);
        // Entering it and coming back leaves the thread where it was.
        let inside = found[0].enter(own_thread_inode).unwrap();
        assert_eq!(inside, inode);
        assert_eq!(own_thread_inode(), inode);
    }

    fn own_thread_inode() -> u32 {
        std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino() as u32
    }

    #[test]
    fn all_namespaces_include_its_own_once() {
        let found = watched(None).unwrap();
        assert_eq!(found.iter().filter(|ns| ns.inode == own_inode()).count(), 1);
        assert!(found.len() <= MAX_NAMESPACES);
    }

    #[test]
    fn an_unknown_inode_is_an_error() {
        // Inode 1 is never a namespace (nsfs inodes start far above).
        let err = watched(Some(1)).err().expect("inode 1 is no namespace");
        assert!(err.to_string().contains("network namespace 1 not found"), "{err}");
    }
}
