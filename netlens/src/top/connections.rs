//! The Connections view's rows: every connection the kernel lists (a
//! sock_diag dump, see `census::connections`), with what the flow table
//! knows of it merged in.
//!
//! The dump knows every connection, however old, its state and its byte
//! counts; the flow table knows only connections netlens saw open, but
//! knows their age, their process and their head-of-line stalls. A
//! connection in both shows the kernel's state and counters and the flow's
//! history. The dump is retaken every few seconds, so connections opened
//! since show from the flow table alone; a flow that started before the
//! dump and is not in it is gone (its close was missed) and is left out.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
};

use super::model::ConnectionRow;
use crate::{
    census::{
        connections::{ss_state_name, ConnectionList, KernelConnection},
        owners::Process,
    },
    event::Direction,
    filter::Filter,
    loader::LiveFlow,
};

/// A dump of the watched namespaces' connections and the processes
/// holding their sockets.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    pub list: ConnectionList,
    /// By socket inode (`ss -p`'s way); sockets no process holds (not yet
    /// accepted, or closed by their process) are absent.
    pub holders: HashMap<u32, Process>,
    /// CLOCK_MONOTONIC ns when the dump began.
    pub taken_ns: u64,
}

/// Which of the flow table's flows [`merge`] can use: those of listed
/// connections and those opened since the listing was taken; all where
/// there is no listing yet. Asked of each flow as the table is read, before
/// the view's limit: on a host with more connections than rows, the listed
/// rows then find their flows, instead of whichever the table holds first
/// (half of 2,000 rows showed no age with 4,000 flows in the table). A
/// capped listing fills every row itself, so the older flows it left out
/// would not show either. Flows without endpoints yet are never used.
/// A flow that would be a row of its own (not listed) must match `filter`
/// too: else, counted in the total before the rows are filtered, every
/// flow another namespace opened since the dump made `--netns` and
/// `--pid` totals count connections they do not show (2,001 for one row).
/// A listed connection's flow is kept whatever it is: its row is
/// filtered as a whole.
pub fn wanted<'a>(listing: Option<&Listing>, filter: &'a Filter) -> impl Fn(&LiveFlow) -> bool + 'a {
    let listed: Option<HashSet<(u32, SocketAddr, SocketAddr)>> =
        listing.map(|l| l.list.connections.iter().map(|c| (c.netns, c.local, c.remote)).collect());
    let taken_ns = listing.map_or(0, |l| l.taken_ns);
    move |flow| {
        let known = flow.established_ns != 0 || flow.local.port() != 0;
        let matches = || filter.matches_connection(&flow.local, &flow.remote, flow.pid, flow.comm.as_deref(), flow.netns);
        known
            && match &listed {
                Some(listed) if listed.contains(&(flow.netns, flow.local, flow.remote)) => true,
                Some(_) => flow.start_ns >= taken_ns && matches(),
                None => matches(),
            }
    }
}

/// The rows, at most `limit`, and how many connections there are in all.
pub fn merge(listing: Option<&Listing>, flows: &[LiveFlow], now_ns: u64, limit: usize) -> (Vec<ConnectionRow>, u64) {
    let key = |netns: u32, local: SocketAddr, remote: SocketAddr| (netns, local, remote);
    let by_key: HashMap<_, &LiveFlow> = flows.iter().map(|flow| (key(flow.netns, flow.local, flow.remote), flow)).collect();
    let mut rows = Vec::new();
    let mut listed = HashSet::new();
    let mut total = 0;
    if let Some(listing) = listing {
        total = listing.list.total;
        let mut kernel: Vec<&KernelConnection> = listing.list.connections.iter().collect();
        // A stable order: the dump's changes with every retake.
        kernel.sort_by_key(|c| (c.local, c.remote, c.netns));
        for connection in kernel {
            let flow_key = key(connection.netns, connection.local, connection.remote);
            listed.insert(flow_key);
            let flow = by_key.get(&flow_key).copied();
            rows.push(kernel_row(connection, flow, listing.holders.get(&connection.inode), now_ns));
        }
    }
    let capped = listing.is_some_and(|l| l.list.total > l.list.connections.len() as u64);
    for flow in flows {
        if listed.contains(&key(flow.netns, flow.local, flow.remote)) {
            continue;
        }
        let opened_since_the_dump = listing.is_none_or(|l| flow.start_ns >= l.taken_ns);
        if opened_since_the_dump || capped {
            total += u64::from(!capped);
            rows.push(flow_row(flow, now_ns));
        }
    }
    rows.truncate(limit);
    let total = total.max(rows.len() as u64);
    (rows, total)
}

fn kernel_row(connection: &KernelConnection, flow: Option<&LiveFlow>, holder: Option<&Process>, now_ns: u64) -> ConnectionRow {
    let tcp = connection.tcp;
    // The flow's process first: the opener, or for a passive connection
    // the listener's until accept() names the accepting process.
    let (pid, comm) = match (flow.and_then(|f| f.pid), holder) {
        (Some(pid), _) => (Some(pid), flow.and_then(|f| f.comm.clone())),
        (None, Some(holder)) => (Some(holder.pid), Some(holder.comm.clone())),
        (None, None) => (None, None),
    };
    ConnectionRow {
        local: connection.local,
        remote: connection.remote,
        netns: connection.netns,
        pid,
        comm,
        age_us: flow.and_then(|f| age_us(f, now_ns)),
        state: ss_state_name(connection.state).to_string(),
        srtt_us: tcp.map(|t| t.srtt_us).or(flow.map(|f| f.srtt_us)),
        cwnd: tcp.map(|t| t.cwnd).or(flow.map(|f| f.cwnd)),
        retransmits: tcp.map(|t| t.total_retrans).or(flow.map(|f| f.retransmits)),
        hol_stall_us: flow.map(|f| f.hol_stall_ns / 1_000),
        bytes_sent: tcp.and_then(|t| t.bytes_sent),
        bytes_received: tcp.map(|t| t.bytes_received),
    }
}

/// A connection opened since the last dump: what the flow table knows.
fn flow_row(flow: &LiveFlow, now_ns: u64) -> ConnectionRow {
    let state = match (flow.established_ns, flow.direction) {
        (0, Some(Direction::Active)) => "SYN-SENT",
        (0, _) => "SYN-RECV",
        _ => "ESTAB",
    };
    ConnectionRow {
        local: flow.local,
        remote: flow.remote,
        netns: flow.netns,
        pid: flow.pid,
        comm: flow.comm.clone(),
        age_us: age_us(flow, now_ns),
        state: state.to_string(),
        srtt_us: Some(flow.srtt_us),
        cwnd: Some(flow.cwnd),
        retransmits: Some(flow.retransmits),
        hol_stall_us: Some(flow.hol_stall_ns / 1_000),
        bytes_sent: None,
        bytes_received: None,
    }
}

fn age_us(flow: &LiveFlow, now_ns: u64) -> Option<u64> {
    (flow.start_ns != 0).then(|| now_ns.saturating_sub(flow.start_ns) / 1_000)
}

#[cfg(test)]
mod tests {
    use netlens_common::tcp_state;

    use super::*;
    use crate::census::connections::TcpFigures;

    const NETNS: u32 = 4026532000;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn flow(local: &str, remote: &str, start_ns: u64) -> LiveFlow {
        LiveFlow {
            local: addr(local),
            remote: addr(remote),
            pid: Some(42),
            comm: Some("nginx".into()),
            netns: NETNS,
            direction: Some(Direction::Passive),
            start_ns,
            established_ns: start_ns + 50_000,
            srtt_us: 80,
            cwnd: 10,
            retransmits: 1,
            hol_stall_ns: 7_000_000,
        }
    }

    fn kernel(local: &str, remote: &str, state: u8, inode: u32) -> KernelConnection {
        KernelConnection {
            netns: NETNS,
            local: addr(local),
            remote: addr(remote),
            state,
            inode,
            tcp: Some(TcpFigures { srtt_us: 90, cwnd: 20, total_retrans: 2, bytes_sent: Some(1000), bytes_received: 500 }),
        }
    }

    fn listing(connections: Vec<KernelConnection>, total: u64, taken_ns: u64) -> Listing {
        Listing { list: ConnectionList { connections, total }, holders: HashMap::new(), taken_ns }
    }

    #[test]
    fn a_connection_in_both_shows_the_kernels_figures_and_the_flows_history() {
        let listing = listing(vec![kernel("10.0.0.1:80", "10.0.0.2:5000", tcp_state::CLOSE_WAIT, 7)], 1, 2_000_000_000);
        let flows = [flow("10.0.0.1:80", "10.0.0.2:5000", 1_000_000_000)];
        let (rows, total) = merge(Some(&listing), &flows, 3_000_000_000, 100);
        assert_eq!(total, 1);
        let row = &rows[0];
        assert_eq!(row.state, "CLOSE-WAIT", "the kernel's state, not ESTAB");
        assert_eq!((row.bytes_sent, row.bytes_received), (Some(1000), Some(500)));
        assert_eq!((row.srtt_us, row.cwnd, row.retransmits), (Some(90), Some(20), Some(2)));
        assert_eq!(row.age_us, Some(2_000_000));
        assert_eq!(row.hol_stall_us, Some(7_000));
        assert_eq!((row.pid, row.comm.as_deref()), (Some(42), Some("nginx")));
    }

    /// With a listing, the flows of listed connections and those opened
    /// since it was taken; with none yet, all. Never a flow without
    /// endpoints.
    #[test]
    fn wanted_flows_are_those_the_listing_can_use() {
        let listing = listing(vec![kernel("10.0.0.1:80", "10.0.0.2:5000", tcp_state::ESTABLISHED, 7)], 5, 2_000);
        let listed = flow("10.0.0.1:80", "10.0.0.2:5000", 1_000);
        let gone = flow("10.0.0.1:80", "10.0.0.3:5000", 1_000);
        let newer = flow("10.0.0.1:80", "10.0.0.4:5000", 3_000);
        let mut no_endpoints = flow("0.0.0.0:0", "0.0.0.0:0", 3_000);
        no_endpoints.established_ns = 0;
        let everything = Filter::default();
        let keeps = wanted(Some(&listing), &everything);
        assert_eq!([&listed, &gone, &newer, &no_endpoints].map(|f| keeps(f)), [true, false, true, false]);
        let keeps = wanted(None, &everything);
        assert_eq!([&listed, &gone, &newer, &no_endpoints].map(|f| keeps(f)), [true, true, true, false]);
        // Another process's: only the listed one, whose row is tested whole.
        let other_pid = Filter { pid: Some(7), ..Filter::default() };
        let keeps = wanted(Some(&listing), &other_pid);
        assert_eq!([&listed, &gone, &newer, &no_endpoints].map(|f| keeps(f)), [true, false, false, false]);
        let keeps = wanted(None, &other_pid);
        assert_eq!([&listed, &gone, &newer, &no_endpoints].map(|f| keeps(f)), [false, false, false, false]);
    }

    #[test]
    fn a_connection_older_than_netlens_is_listed_with_its_holder() {
        let mut listing = listing(vec![kernel("10.0.0.1:80", "10.0.0.2:5000", tcp_state::ESTABLISHED, 7)], 1, 10);
        listing.holders.insert(7, Process { pid: 99, comm: "postgres".into() });
        let (rows, _) = merge(Some(&listing), &[], 20, 100);
        let row = &rows[0];
        assert_eq!(row.state, "ESTAB");
        assert_eq!((row.pid, row.comm.as_deref()), (Some(99), Some("postgres")));
        assert_eq!((row.age_us, row.hol_stall_us), (None, None), "not seen open: unknown, not zero");
    }

    #[test]
    fn a_socket_without_tcp_info_shows_unknowns_not_zeros() {
        let mut orphan = kernel("10.0.0.1:80", "10.0.0.2:5000", tcp_state::FIN_WAIT2, 0);
        orphan.tcp = None;
        let (rows, _) = merge(Some(&listing(vec![orphan], 1, 10)), &[], 20, 100);
        let row = &rows[0];
        assert_eq!(row.state, "FIN-WAIT-2");
        assert_eq!((row.srtt_us, row.cwnd, row.retransmits), (None, None, None));
        assert_eq!((row.bytes_sent, row.bytes_received), (None, None));
    }

    #[test]
    fn flows_opened_since_the_dump_are_added_and_stale_ones_dropped() {
        let listing = listing(vec![kernel("10.0.0.1:80", "10.0.0.2:5000", tcp_state::ESTABLISHED, 7)], 1, 2_000);
        let flows = [
            flow("10.0.0.1:80", "10.0.0.2:5001", 3_000), // opened after the dump
            flow("10.0.0.1:80", "10.0.0.2:5002", 1_000), // before it, and not in it: gone
        ];
        let (rows, total) = merge(Some(&listing), &flows, 4_000, 100);
        let remotes: Vec<_> = rows.iter().map(|r| r.remote.port()).collect();
        assert_eq!(remotes, [5000, 5001]);
        assert_eq!(total, 2);
        assert_eq!(rows[1].state, "ESTAB");
        assert_eq!(rows[1].bytes_sent, None);
    }

    #[test]
    fn without_a_dump_the_flow_table_is_all_there_is() {
        let mut opening = flow("10.0.0.2:5000", "10.0.0.1:80", 5);
        opening.established_ns = 0;
        opening.direction = Some(Direction::Active);
        let (rows, total) = merge(None, &[opening], 10, 100);
        assert_eq!(total, 1);
        assert_eq!(rows[0].state, "SYN-SENT");
    }

    #[test]
    fn a_capped_dump_keeps_flows_and_reports_the_kernels_total() {
        let listing = listing(vec![kernel("10.0.0.1:80", "10.0.0.2:5000", tcp_state::ESTABLISHED, 7)], 5_000, 2_000);
        let flows = [flow("10.0.0.1:80", "10.0.0.2:5002", 1_000)]; // maybe beyond the cap
        let (rows, total) = merge(Some(&listing), &flows, 4_000, 1);
        assert_eq!(rows.len(), 1, "at most the limit");
        assert_eq!(total, 5_000);
    }
}
