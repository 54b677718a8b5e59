//! Installs what building netlens needs, printing what it installs and
//! skipping what is already there:
//! - an eBPF-capable Rust toolchain: rustup nightly with rust-src if present,
//!   else Debian's rustc-web + rust-web-src, linked into rustup as
//!   `netlens-bpf` and driven with RUSTC_BOOTSTRAP=1 (for -Z build-std);
//! - bpf-linker, built against the LLVM major version that toolchain uses;
//! - the tools the tests drive (nftables, iproute2, ethtool, promtool, curl, tmux,
//!   bpftool).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::{capture, run};

/// The rustup toolchain name Debian's rustc is linked under.
const LINKED_TOOLCHAIN: &str = "netlens-bpf";

/// How the eBPF crate gets built; applied to every cargo invocation.
pub struct EbpfToolchain {
    /// The rustup toolchain aya-build runs (`nightly` or the linked one).
    pub name: String,
    /// Debian's rustc is a stable release: -Z build-std needs this.
    pub bootstrap: bool,
}

impl EbpfToolchain {
    pub fn apply(&self, command: &mut Command) {
        command.env("NETLENS_EBPF_TOOLCHAIN", &self.name);
        if self.bootstrap {
            command.env("RUSTC_BOOTSTRAP", "1");
        }
    }
}

/// Makes sure everything is installed; returns the toolchain to use.
pub fn ensure(with_test_tools: bool) -> Result<EbpfToolchain> {
    let mut apt = Apt::default();
    let toolchain = ensure_rust(&mut apt)?;
    let llvm_major = llvm_major(&toolchain.name)?;
    ensure_bpf_linker(&mut apt, llvm_major)?;
    let mut tools = vec![("nft", "nftables"), ("ip", "iproute2"), ("nstat", "iproute2"), ("ss", "iproute2")];
    if with_test_tools {
        tools.push(("ethtool", "ethtool"));
        // tests/deploy.rs checks deploy/prometheus with promtool.
        tools.push(("promtool", "prometheus"));
        // tests/daemon.rs scrapes with curl; tests/top.rs drives a terminal.
        tools.push(("curl", "curl"));
        tools.push(("tmux", "tmux"));
        // tests/src/flow_table.rs reads the flow maps of a running netlens.
        tools.push(("bpftool", "bpftool"));
    }
    for (binary, package) in tools {
        if which(binary) {
            continue;
        }
        apt.install(&[package])?;
    }
    Ok(toolchain)
}

/// What `bench all` adds: bpftrace, whose one-line handshake timer is the
/// reference its table sets netlens beside.
pub fn ensure_bench_tools() -> Result<()> {
    if which("bpftrace") {
        return Ok(());
    }
    Apt::default().install(&["bpftrace"])
}

/// What the kernel matrix adds: QEMU, a static busybox for virtme-ng's
/// initramfs, kmod (virtme-ng runs depmod on the extracted kernels; the
/// guests load modules with the host's modprobe), file (virtme-ng reads the
/// kernel version with it), and virtme-ng itself from PyPI.
/// Returns how to run `vng`.
pub fn ensure_matrix_tools() -> Result<PathBuf> {
    let mut apt = Apt::default();
    apt.install(&["qemu-system-x86", "busybox-static", "kmod", "file", "dpkg", "debian-archive-keyring"])?;
    if let Some(vng) = find_vng() {
        return Ok(vng);
    }
    println!("xtask: installing virtme-ng {VIRTME_NG} (pip)");
    // A distribution's own python refuses pip installs (PEP 668): pipx then.
    if run(Command::new("python3").args(["-m", "pip", "install", "--quiet", &format!("virtme-ng=={VIRTME_NG}")])).is_err() {
        apt.install(&["pipx"])?;
        run(Command::new("pipx").args(["install", &format!("virtme-ng=={VIRTME_NG}")]))?;
    }
    find_vng().context("virtme-ng is installed, but there is no `vng` on PATH nor in ~/.local/bin")
}

/// `vng` on PATH, else where pipx and `pip --user` put it.
fn find_vng() -> Option<PathBuf> {
    if which("vng") {
        return Some(PathBuf::from("vng"));
    }
    let local = Path::new(&std::env::var_os("HOME")?).join(".local/bin/vng");
    local.is_file().then_some(local)
}

/// The virtme-ng release the matrix is known to work with.
const VIRTME_NG: &str = "1.42";

fn ensure_rust(apt: &mut Apt) -> Result<EbpfToolchain> {
    if nightly_has_rust_src() {
        println!("xtask: eBPF toolchain: rustup nightly with rust-src");
        return Ok(EbpfToolchain { name: "nightly".into(), bootstrap: false });
    }
    apt.install(&["rustc-web", "cargo-web", "rust-web-src"])?;
    let listed = capture(Command::new("rustup").args(["toolchain", "list"]))?;
    if !listed.lines().any(|l| l.split_whitespace().next() == Some(LINKED_TOOLCHAIN)) {
        println!("xtask: linking Debian's rustc (/usr) as rustup toolchain {LINKED_TOOLCHAIN}");
        run(Command::new("rustup").args(["toolchain", "link", LINKED_TOOLCHAIN, "/usr"]))?;
    }
    println!("xtask: eBPF toolchain: Debian rustc-web as {LINKED_TOOLCHAIN} (RUSTC_BOOTSTRAP=1)");
    Ok(EbpfToolchain { name: LINKED_TOOLCHAIN.into(), bootstrap: true })
}

fn nightly_has_rust_src() -> bool {
    let Ok(sysroot) = capture(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"])) else {
        return false;
    };
    Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core").is_dir()
}

/// The LLVM major version of the toolchain's rustc (`rustc -vV`).
fn llvm_major(toolchain: &str) -> Result<u32> {
    let version = capture(Command::new("rustup").args(["run", toolchain, "rustc", "-vV"]))?;
    let llvm = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc -vV reports no LLVM version")?;
    llvm.split('.').next().unwrap_or("").trim().parse().context("parsing rustc's LLVM version")
}

fn ensure_bpf_linker(apt: &mut Apt, llvm_major: u32) -> Result<()> {
    let feature = format!("llvm-{llvm_major}");
    // cargo records how each binary was installed; reuse it when it was
    // built for this LLVM.
    let home = std::env::var("CARGO_HOME").unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or_default()));
    let installs = std::fs::read_to_string(Path::new(&home).join(".crates2.json")).unwrap_or_default();
    let installed = installs
        .split("\"bpf-linker ")
        .skip(1)
        .any(|entry| entry.split('}').next().is_some_and(|e| e.contains(&format!("\"{feature}\""))));
    if installed && which("bpf-linker") {
        println!("xtask: bpf-linker ({feature}) present");
        return Ok(());
    }
    let prefix = format!("/usr/lib/llvm-{llvm_major}");
    apt.install(&[&format!("llvm-{llvm_major}-dev"), &format!("libpolly-{llvm_major}-dev"), "libzstd-dev", "zlib1g-dev"])?;
    println!("xtask: installing bpf-linker 0.13 built against LLVM {llvm_major} (a few minutes)");
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--version", "0.13.0", "--locked", "--no-default-features", "--features", &feature, "--force"])
        .env("LLVM_PREFIX", &prefix)
        .env(format!("LLVM_SYS_{llvm_major}1_PREFIX"), &prefix))
}

fn which(binary: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {binary}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Debian packages: installs what is missing, updating the index once.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn installed(package: &str) -> bool {
        capture(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
            .is_ok_and(|status| status.contains("install ok installed"))
    }

    fn install(&mut self, packages: &[&str]) -> Result<()> {
        let missing: Vec<&str> = packages.iter().copied().filter(|p| !Self::installed(p)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if !which("apt-get") {
            bail!("missing {}: install them with your distribution's package manager (see README)", missing.join(" "));
        }
        if !self.updated {
            run(privileged("apt-get").args(["update", "-qq"]))?;
            self.updated = true;
        }
        println!("xtask: installing {}", missing.join(" "));
        run(privileged("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    }
}

/// `program`, through sudo unless we are root already.
pub fn privileged(program: &str) -> Command {
    if crate::is_root() {
        Command::new(program)
    } else {
        let mut command = Command::new("sudo");
        command.arg(program);
        command
    }
}
