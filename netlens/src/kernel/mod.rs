//! What netlens needs from the running kernel, found at start-up.
pub mod btf;
pub mod kallsyms;
pub mod map_ops;
pub mod offsets;
pub mod probe;
pub mod progstats;
pub mod tracefs;
