//! Builds the eBPF programs (netlens-ebpf) for bpfel-unknown-none and leaves
//! the object in OUT_DIR, where src/loader.rs embeds it with include_bytes!,
//! without its DWARF (see [`strip_dwarf`]).
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
    )?;
    let out_dir = std::env::var("OUT_DIR").context("OUT_DIR")?;
    strip_dwarf(&std::path::Path::new(&out_dir).join("netlens"))
}

/// Drops the object's DWARF (`.debug_*` and their relocations): three
/// quarters of its 2.4 MB, read by nothing at run time. bpf-linker makes
/// the BTF (`.BTF`, `.BTF.ext`) that aya and the kernel use from it, and
/// keeps it in the object. Without it the netlens binary is 1.8 MB
/// smaller, and start-up, which copies the object once to rewrite its
/// casts (loader/casts.rs), touches 0.6 MB instead of 2.4 (on this VM each
/// new page costs several µs).
fn strip_dwarf(object_path: &std::path::Path) -> anyhow::Result<()> {
    let data = std::fs::read(object_path).with_context(|| format!("reading {}", object_path.display()))?;
    let mut builder = object::build::elf::Builder::read(&*data).context("parsing the eBPF object")?;
    // The DWARF sections, and the relocation sections that apply to them.
    let dwarf: Vec<_> = builder.sections.iter().filter(|section| section.name.as_slice().starts_with(b".debug")).map(|section| section.id()).collect();
    for section in builder.sections.iter_mut() {
        if dwarf.contains(&section.id()) || section.sh_info_section.is_some_and(|target| dwarf.contains(&target)) {
            section.delete = true;
        }
    }
    builder.delete_orphans();
    // LLVM keeps the section names in the symbols' string table, which the
    // builder writes as that alone: the names get a table of their own.
    if !builder.sections.iter().any(|section| matches!(section.data, object::build::elf::SectionData::SectionString)) {
        let names = builder.sections.add();
        names.name = b".shstrtab".to_vec().into();
        names.sh_type = object::elf::SHT_STRTAB;
        names.data = object::build::elf::SectionData::SectionString;
    }
    let mut stripped = Vec::new();
    builder.write(&mut stripped).context("writing the eBPF object")?;
    std::fs::write(object_path, stripped).with_context(|| format!("writing {}", object_path.display()))
}
