use std::process::exit;

fn main() {
    // bpf-linker links the eBPF object; without it the failure later is cryptic.
    println!("cargo:rerun-if-env-changed=PATH");
    if which::which("bpf-linker").is_err() {
        eprintln!("netlens-ebpf: bpf-linker not found on PATH; run `cargo xtask build`, which installs it");
        exit(1);
    }
    // By default bpf-linker has LLVM expand memcpy "in order" (for the
    // kernel JIT's memcpy pattern matching), which also turns off LLVM's
    // inline expansion of memset and memmove: every zeroed struct or array
    // became a call to compiler_builtins' byte-at-a-time memset (a 272-byte
    // Flow: 272 loop turns, about 1,400 instructions, per passive open).
    // With the generic expansion, LLVM writes them as plain stores.
    println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
}
