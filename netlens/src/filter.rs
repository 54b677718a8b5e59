//! Which connections a view shows: `--port`, `--pid`, `--comm`, `--netns`,
//! `-4`/`-6`, shared by every command.

use std::net::SocketAddr;

use crate::event::ConnEvent;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Either end's port.
    pub port: Option<u16>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// Network namespace inode (`ls -L -i /proc/PID/ns/net`).
    pub netns: Option<u32>,
    /// 4 or 6.
    pub family: Option<u8>,
}

impl Filter {
    pub fn matches(&self, event: &ConnEvent) -> bool {
        self.matches_connection(&event.local, &event.remote, event.pid, event.comm.as_deref(), event.netns)
    }

    /// The same test on a connection's parts (a live flow, not an event).
    pub fn matches_connection(
        &self,
        local: &SocketAddr,
        remote: &SocketAddr,
        pid: Option<u32>,
        comm: Option<&str>,
        netns: u32,
    ) -> bool {
        self.matches_endpoints(local, remote, netns)
            && self.pid.is_none_or(|wanted| pid == Some(wanted))
            && self.comm.as_deref().is_none_or(|wanted| comm == Some(wanted))
    }

    /// The tests on what a socket dump knows of a connection (its ends and
    /// namespace, not yet its process).
    pub fn matches_endpoints(&self, local: &SocketAddr, remote: &SocketAddr, netns: u32) -> bool {
        let family = if local.is_ipv4() { 4 } else { 6 };
        self.port.is_none_or(|port| local.port() == port || remote.port() == port)
            && self.netns.is_none_or(|wanted| netns == wanted)
            && self.family.is_none_or(|wanted| family == wanted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Detail, Direction};

    fn event(local: &str, remote: &str, pid: Option<u32>, comm: Option<&str>) -> ConnEvent {
        ConnEvent {
            ts_ns: 1,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            pid,
            comm: comm.and_then(|c| crate::event::ShortName::from_bytes(c.as_bytes())),
            netns: 4026531840,
            cgroup: 1,
            service: None,
            direction: Some(Direction::Active),
            detail: Detail::Handshake { direction: Direction::Active, handshake_ns: 1 },
        }
    }

    #[test]
    fn port_matches_either_end() {
        let filter = Filter { port: Some(8080), ..Filter::default() };
        assert!(filter.matches(&event("127.0.0.1:8080", "127.0.0.1:5000", None, None)));
        assert!(filter.matches(&event("127.0.0.1:5000", "127.0.0.1:8080", None, None)));
        assert!(!filter.matches(&event("127.0.0.1:5000", "127.0.0.1:5001", None, None)));
    }

    #[test]
    fn pid_comm_netns_and_family_must_all_match() {
        let e = event("[::1]:80", "[::1]:5000", Some(7), Some("curl"));
        assert!(Filter::default().matches(&e));
        assert!(Filter { pid: Some(7), comm: Some("curl".into()), family: Some(6), ..Default::default() }.matches(&e));
        assert!(!Filter { pid: Some(8), ..Default::default() }.matches(&e));
        assert!(!Filter { comm: Some("wget".into()), ..Default::default() }.matches(&e));
        assert!(!Filter { family: Some(4), ..Default::default() }.matches(&e));
        assert!(!Filter { netns: Some(1), ..Default::default() }.matches(&e));
        // A passive connection has no pid: a pid filter excludes it.
        assert!(!Filter { pid: Some(7), ..Default::default() }.matches(&event("127.0.0.1:80", "127.0.0.1:1", None, None)));
    }

    /// A socket dump's test: the ends and the namespace; the process is
    /// not known yet, so `--pid` and `--comm` do not exclude.
    #[test]
    fn endpoints_alone_leave_the_process_tests_out() {
        let (local, remote) = ("127.0.0.1:443".parse().unwrap(), "127.0.0.1:5000".parse().unwrap());
        let filter = Filter { port: Some(443), pid: Some(1), comm: Some("nginx".into()), ..Filter::default() };
        assert!(filter.matches_endpoints(&local, &remote, 7));
        assert!(!Filter { port: Some(80), ..filter.clone() }.matches_endpoints(&local, &remote, 7));
        assert!(!Filter { family: Some(6), ..filter.clone() }.matches_endpoints(&local, &remote, 7));
        assert!(!Filter { netns: Some(8), ..filter }.matches_endpoints(&local, &remote, 7));
    }
}
