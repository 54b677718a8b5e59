//! Harness for netlens's privileged integration tests and benchmarks:
//! private network namespaces, nftables loss, nstat, real TCP traffic and a
//! running `netlens` whose output the tests compare with the kernel's truth.
//! Everything here cleans up after itself (namespaces on drop, netlens on
//! drop) and every loop is bounded.

pub mod bulk;
pub mod exposition;
pub mod netlens;
pub mod netns;
pub mod traffic;

pub use netlens::{Netlens, Traced};
pub use netns::Netns;
