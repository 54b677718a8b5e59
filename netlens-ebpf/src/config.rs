//! The offsets userspace resolved at start-up (see netlens_common::config).

use netlens_common::Config;

/// Written by the loader through `EbpfLoader::set_global` before load; the
/// map is frozen, so the verifier sees these as constants.
#[unsafe(no_mangle)]
static CONFIG: Config = unsafe { core::mem::zeroed() };

/// Reads one field of [`CONFIG`]. The volatile read stops the compiler from
/// folding in the all-zero initial value. Name a scalar where a program
/// runs often: a volatile read of a struct loads every member of it, each
/// time (the verifier knows the values, but the loads still run). The
/// struct reads left (a tracepoint's tuple fields, the raw build's
/// windows) are read once per run, on paths where that is small.
macro_rules! cfg_field {
    ($($path:ident).+) => {
        {
            // Inside a caller's own unsafe block this one is redundant.
            #[allow(unused_unsafe)]
            let value = unsafe { core::ptr::read_volatile(&crate::config::config().$($path).+) };
            value
        }
    };
}
pub(crate) use cfg_field;

#[inline(always)]
pub fn config() -> &'static Config {
    &CONFIG
}
