//! Builds the eBPF programs (netlens-ebpf) for bpfel-unknown-none and leaves
//! the object in OUT_DIR, where src/loader.rs embeds it with include_bytes!.
//!
//! Toolchain: `NETLENS_EBPF_TOOLCHAIN` names the rustup toolchain that
//! builds it (`cargo xtask` sets it: rustup nightly with rust-src when
//! present, else Debian's rustc linked as a rustup toolchain, with
//! RUSTC_BOOTSTRAP=1 for -Z build-std). Default: nightly.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=NETLENS_EBPF_TOOLCHAIN");
    let toolchain_name = std::env::var("NETLENS_EBPF_TOOLCHAIN").ok();
    let toolchain = match toolchain_name.as_deref() {
        None | Some("") | Some("nightly") => Toolchain::Nightly,
        Some(name) => Toolchain::Custom(name),
    };
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("netlens has no parent directory"))?
        .join("netlens-ebpf");
    let ebpf_dir = ebpf_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    aya_build::build_ebpf(
        [Package { name: "netlens-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        toolchain,
    )
}
