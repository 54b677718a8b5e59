//! Harness for netlens's privileged integration tests and benchmarks:
//! private network namespaces, nftables loss, nstat, real TCP traffic and a
//! running `netlens` whose output the tests compare with the kernel's truth.
//! Everything here cleans up after itself (namespaces on drop, netlens on
//! drop) and every loop is bounded.

pub mod bulk;
pub mod cgroup;
pub mod exposition;
pub mod flow_table;
pub mod netlens;
pub mod netns;
pub mod sockets;
pub mod traffic;

pub use netlens::{Netlens, Traced};
pub use netns::{nstat_delta, Netns, NsThread};

/// Inside a software-emulated guest of the kernel matrix (`cargo xtask
/// test --kernel`, which sets `NETLENS_GUEST=1`), where a loopback
/// handshake takes milliseconds: timing bounds loosen, counts stay exact.
pub fn in_guest() -> bool {
    std::env::var_os("NETLENS_GUEST").is_some_and(|value| value == "1")
}

/// (major, minor) of the running kernel.
pub fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers = release.split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().unwrap_or(0));
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0))
}

/// CLOCK_MONOTONIC in ns: the clock of the events' `ts_ns` and of the
/// flow table's `closed_ns`.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// A timing tolerance: `host_us` on real hardware, at least 50 ms in a
/// guest.
pub fn timing_slack_us(host_us: f64) -> f64 {
    if in_guest() {
        host_us.max(50_000.0)
    } else {
        host_us
    }
}

/// A count netlens made against the kernel's: exact, or short by at most
/// `missing`, what netlens itself reported it lost or the kernel skipped
/// (never more than the kernel's).
pub fn assert_close(netlens: u64, kernel: u64, missing: u64, what: &str) {
    if missing == 0 {
        assert_eq!(netlens, kernel, "{what}");
    } else {
        eprintln!("{what}: netlens reported {missing} missed/lost events or runs");
        assert!(netlens <= kernel && kernel - netlens <= missing, "{what}: netlens {netlens}, kernel {kernel}, reported missing {missing}");
    }
}
