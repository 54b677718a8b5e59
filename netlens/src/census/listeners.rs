//! The processes of listeners that were listening before netlens
//! attached. The kernel side records a listener's process when it sees
//! listen(); for older listeners this asks sock_diag for every listening
//! socket's inode and `/proc/PID/fd` for the process holding it, so that
//! passive connections name their server from the first one on.

use std::collections::HashSet;

use anyhow::Result;
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6},
    inet::{ExtensionFlags, StateFlags},
};

use super::{
    netns::Namespace,
    owners::{self, Process},
    sockdiag::{DumpRequest, SockDiag},
};

/// A listening port and the process holding its socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerProcess {
    pub netns: u32,
    pub port: u16,
    pub process: Process,
}

/// What [`listener_processes`] found, and what it could not look at.
#[derive(Debug, Default)]
pub struct Found {
    pub listeners: Vec<ListenerProcess>,
    /// The inode of every listening socket dumped, named or not.
    pub inodes: HashSet<u32>,
    /// Namespaces that could not be dumped (entering another namespace
    /// needs CAP_SYS_ADMIN), with the first error.
    pub skipped: Option<(usize, String)>,
    /// Listeners no process was found for, and processes whose
    /// descriptors could not be read (CAP_SYS_PTRACE): together, the
    /// likely reason.
    pub unnamed: usize,
    pub unreadable: usize,
}

/// The listeners of `namespaces` and their processes; listeners no
/// process holds (closed meanwhile, or /proc/PID/fd unreadable without
/// CAP_SYS_PTRACE) are left out, and so are those whose inode is in
/// `known` (found by an earlier call: /proc is read only for new ones).
/// A namespace that cannot be dumped is skipped and counted; fails only
/// when none could be.
pub fn listener_processes(namespaces: &[Namespace], known: &HashSet<u32>) -> Result<Found> {
    let mut listeners = Vec::new();
    let mut first_error = None;
    let (mut dumped, mut failed) = (0, 0);
    for namespace in namespaces {
        match listeners_of(namespace) {
            Ok(found) => {
                dumped += 1;
                listeners.extend(
                    found.into_iter().filter(|(_, inode)| !known.contains(inode)).map(|(port, inode)| (namespace.inode, port, inode)),
                );
            }
            Err(err) => {
                failed += 1;
                first_error.get_or_insert(err);
            }
        }
    }
    if let (Some(err), 0) = (&first_error, dumped) {
        return Err(anyhow::anyhow!("{err:#}"));
    }
    let inodes: HashSet<u32> = listeners.iter().map(|&(_, _, inode)| inode).collect();
    let holders = if inodes.is_empty() { owners::Holders::default() } else { owners::holders(&inodes) };
    let unnamed = inodes.iter().filter(|inode| !holders.found.contains_key(inode)).count();
    Ok(Found {
        listeners: listeners
            .into_iter()
            .filter_map(|(netns, port, inode)| Some(ListenerProcess { netns, port, process: holders.found.get(&inode)?.clone() }))
            .collect(),
        inodes,
        skipped: first_error.map(|err| (failed, format!("{err:#}"))),
        unnamed,
        unreadable: holders.unreadable,
    })
}

/// (port, inode) of each listening socket of `namespace`.
fn listeners_of(namespace: &Namespace) -> Result<Vec<(u16, u32)>> {
    let mut sock_diag = namespace.enter(SockDiag::open)??;
    let mut found = Vec::new();
    for (sequence, family) in [(1, AF_INET), (2, AF_INET6)] {
        let request = DumpRequest { family, states: StateFlags::LISTEN, extensions: ExtensionFlags::empty() };
        sock_diag.dump_tcp(&request, sequence, |socket, _| found.push((socket.socket_id.source_port, socket.inode)))?;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, os::unix::fs::MetadataExt};

    use super::*;
    use crate::census::netns;

    #[test]
    fn finds_this_process_behind_its_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino() as u32;
        let found = listener_processes(&netns::watched(Some(own)).unwrap(), &HashSet::new()).unwrap();
        assert!(found.skipped.is_none());
        let mine = found.listeners.iter().find(|l| l.port == port).expect("the listener is listed");
        assert_eq!(mine.netns, own);
        assert_eq!(mine.process.pid, std::process::id());
    }
}
