use std::process::exit;

/// bpf-linker links the eBPF object; without it the failure later is cryptic.
fn main() {
    println!("cargo:rerun-if-env-changed=PATH");
    if which::which("bpf-linker").is_err() {
        eprintln!("netlens-ebpf: bpf-linker not found on PATH; run `cargo xtask build`, which installs it");
        exit(1);
    }
}
