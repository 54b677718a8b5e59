//! netlens's eBPF programs: TCP tracepoints (they run on locked-down
//! kernels too), plus optional fentry/kprobe variants for the accept queue
//! (accept.rs, overflow.rs) that the loader prefers where they attach. Per-packet work stays here; only
//! per-connection events cross to userspace through one ring buffer.
#![no_std]
#![no_main]
// Inline BPF assembly: the one atomic add (overflow/mod.rs `add_to`).
#![feature(asm_experimental_arch)]

mod accept;
mod config;
mod congestion;
mod dynamics;
mod events;
mod flows;
mod kernel;
mod lifecycle;
mod overflow;
mod owners;
mod probe;
mod reset;
mod retransmit;
mod slots;
mod sock;
mod synstart;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach this.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
