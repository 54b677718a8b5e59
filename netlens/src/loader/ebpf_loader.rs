//! aya's loader, made without its parse of the kernel's BTF.
//!
//! aya 0.14's `EbpfLoader::new()` reads and parses `/sys/kernel/btf/vmlinux`
//! every time (~25 ms of CPU and ~18 MB of allocations here, the largest
//! single step of start-up) for CO-RE relocations, and offers no way to
//! skip it: `.btf(None)` only drops the result. Our object has no CO-RE
//! relocations (Rust eBPF emits none; offsets come from our own BTF index),
//! and the BTF-typed programs load with a stand-in made from netlens's own
//! index (`KernelFacts::fentry_btf`, attach_btf.rs). So the loader is made in a thread of its
//! own whose root directory holds no `sys/kernel/btf/vmlinux`: the read
//! fails at once, and the loader is the one `.btf(None)` would give.
//! The thread first unshares its filesystem attributes (root, cwd, umask),
//! so no other thread's root moves, and they go when the thread ends.
//! Without CAP_SYS_CHROOT (or without /proc) the root stays, and the loader
//! is made with its parse, as before.

use aya::EbpfLoader;

/// A directory every Linux process has and that cannot hold `sys/`: the
/// numbered entries of our own open files.
const EMPTY_ROOT: &std::ffi::CStr = c"/proc/self/fdinfo";

/// A loader without the kernel's BTF (see the module's comment). Blocks
/// for the thread; call it from a thread of its own to overlap it.
pub fn without_kernel_btf() -> EbpfLoader<'static> {
    let made = std::thread::spawn(|| {
        // SAFETY: unshare(CLONE_FS) gives this thread its own root, cwd and
        // umask (allowed in a threaded process), so chroot moves only this
        // thread's root; the pointer is a valid C string.
        unsafe {
            if libc::unshare(libc::CLONE_FS) == 0 {
                libc::chroot(EMPTY_ROOT.as_ptr());
            }
        }
        EbpfLoader::new()
    })
    .join();
    // The thread can only panic inside aya; then make it here, with the parse.
    made.unwrap_or_else(|_| EbpfLoader::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The thread's new root never leaks into the caller's.
    #[test]
    fn the_callers_root_stays() {
        let _ = without_kernel_btf();
        assert!(std::path::Path::new("/proc/self/status").exists());
    }
}
