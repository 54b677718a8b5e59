//! One guest of the kernel matrix: boots a kernel with virtme-ng under QEMU
//! (software emulation: TCG), the host's filesystem shared read-only over 9p,
//! and runs `guest.sh` in it, which leaves its results in a directory shared
//! read-write with the host.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::{bounded, kernels::KernelImage};

/// The script the guest runs (its steps and result files are described there).
const GUEST_SCRIPT: &str = include_str!("guest.sh");

/// Guest memory. Under TCG untouched memory costs the host nothing.
const GUEST_MEMORY: &str = "2G";

/// Bounds inside the guest, handed to guest.sh; the whole guest is bounded
/// by the caller's limit on top of these.
const CHECK_LIMIT: Duration = Duration::from_secs(120);
const SMOKE_LIMIT: Duration = Duration::from_secs(60);
const TEST_BINARY_LIMIT: Duration = Duration::from_secs(480);
/// How long before the host's limit the guest reports what it is stuck on
/// (boot takes 6-10 s of that).
const GUEST_DUMP_BEFORE: Duration = Duration::from_secs(60);

/// A test executable built on the host, run inside the guest.
pub struct TestBinary {
    /// The cargo target name, e.g. `lifecycle`.
    pub name: String,
    pub executable: PathBuf,
    /// The package directory: cargo runs tests from there.
    pub package_dir: PathBuf,
}

/// What every guest runs, prepared once on the host.
pub struct GuestInputs {
    /// How to run virtme-ng's `vng`.
    pub vng: PathBuf,
    pub netlens: PathBuf,
    pub tests: Vec<TestBinary>,
}

/// What one guest run left behind, for the matrix.
pub struct GuestResults {
    pub outcome: bounded::Outcome,
    /// Where guest.sh wrote its files.
    pub dir: PathBuf,
}

impl GuestResults {
    pub fn read(&self, name: &str) -> Option<String> {
        fs::read_to_string(self.dir.join(name)).ok()
    }

    /// guest.sh got to its end (it was not killed, nor did the guest crash).
    pub fn finished(&self) -> bool {
        self.dir.join("finished").exists()
    }

    /// `(step, exit status)` in the order the guest ran them.
    pub fn steps(&self) -> Vec<(String, i32)> {
        self.read("steps.tsv")
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let mut fields = line.split('\t');
                Some((fields.next()?.to_string(), fields.next()?.parse().ok()?))
            })
            .collect()
    }
}

/// Boots `image` and runs guest.sh with `inputs`; kills the guest at
/// `limit`. `label` names the kernel in the output and the results
/// directory (`target/matrix/<label>/`).
pub fn run(label: &str, image: &KernelImage, inputs: &GuestInputs, test_args: &[String], limit: Duration) -> Result<GuestResults> {
    let dir = crate::workspace_root().join("target/matrix").join(label);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::write(dir.join("guest.sh"), GUEST_SCRIPT)?;
    let tests: Vec<&TestBinary> = inputs.tests.iter().filter(|test| crate::matrix::runs_in(label, &test.name)).collect();
    fs::write(dir.join("plan.tsv"), plan(&inputs.netlens, &tests, test_args, limit))?;
    // The command travels base64-encoded on the kernel command line (2 KiB
    // at most): keep it short, the plan is in a file.
    let script = dir.join("guest.sh");
    let mut vng = Command::new(&inputs.vng);
    vng.arg("--run")
        .arg(&image.vmlinuz)
        // No KVM on this kind of machine: TCG.
        .arg("--disable-kvm")
        // Debian 12's virtiofsd is too old for virtme-ng.
        .arg("--force-9p")
        .args(["--memory", GUEST_MEMORY])
        .args(["--cpus", "2"])
        .arg(format!("--rwdir={}", dir.display()))
        .arg("--exec")
        .arg(format!("sh {} {}", script.display(), dir.display()));
    println!("xtask: booting {label} ({}) under QEMU/TCG, limit {} s", image.release, limit.as_secs());
    let outcome = bounded::run(&mut vng, limit, label)?;
    Ok(GuestResults { outcome, dir })
}

/// Environment variables of netlens that the guest's runs take from the
/// host's.
const PASSED_TO_GUESTS: [&str; 1] = ["NETLENS_FLOW_STATE"];

/// plan.tsv: what guest.sh runs, one tab-separated record a line.
fn plan(netlens: &Path, tests: &[&TestBinary], test_args: &[String], whole_guest_limit: Duration) -> String {
    let mut plan = format!("netlens\t{}\n", netlens.display());
    for (name, limit) in [("check", CHECK_LIMIT), ("smoke", SMOKE_LIMIT), ("test", TEST_BINARY_LIMIT)] {
        let _ = writeln!(plan, "limit\t{name}\t{}", limit.as_secs());
    }
    // When the guest itself describes what hangs, before the host kills it
    // (a process stuck in the kernel outlives its own `timeout`).
    let _ = writeln!(plan, "limit\tguest_dump\t{}", whole_guest_limit.saturating_sub(GUEST_DUMP_BEFORE).as_secs());
    for arg in test_args {
        let _ = writeln!(plan, "arg\t{arg}");
    }
    // Choices the host was asked for carry into the guest (e.g.
    // `NETLENS_FLOW_STATE=storage cargo xtask test --kernel 6.1`).
    for name in PASSED_TO_GUESTS {
        if let Ok(value) = std::env::var(name) {
            let _ = writeln!(plan, "env\t{name}\t{value}");
        }
    }
    for test in tests {
        let _ = writeln!(plan, "test\t{}\t{}\t{}", test.name, test.package_dir.display(), test.executable.display());
    }
    plan
}
