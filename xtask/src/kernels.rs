//! Debian's own kernels for the matrix, fetched with a private apt
//! configuration (the system's sources are never changed) from the Debian
//! mirror the system already uses, and kept under `target/kernels/` so a
//! second run does not download again.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use crate::{bounded, capture, workspace_root};

/// A guest kernel: the matrix name and the Debian release that ships it.
pub struct GuestKernel {
    pub name: &'static str,
    pub suite: &'static str,
}

/// The guest kernels, oldest first: bullseye's 5.10, bookworm's 6.1,
/// trixie's 6.12 (each suite's `linux-image-amd64`).
pub const GUEST_KERNELS: [GuestKernel; 3] = [
    GuestKernel { name: "5.10", suite: "bullseye" },
    GuestKernel { name: "6.1", suite: "bookworm" },
    GuestKernel { name: "6.12", suite: "trixie" },
];

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// apt-get update, one kernel's download (~100 MB), one extraction.
const APT_LIMIT: Duration = Duration::from_secs(600);

/// A kernel ready to boot: its image, with its modules beside it in the
/// extracted package (virtme-ng finds `lib/modules/<release>` from there).
pub struct KernelImage {
    pub vmlinuz: PathBuf,
    /// `uname -r` of that kernel, e.g. `6.12.117+deb13-amd64`.
    pub release: String,
}

/// Fetches and caches guest kernels; the package index is updated at most
/// once per run, and only when a kernel is not cached yet.
pub struct KernelCache {
    root: PathBuf,
    apt: Option<PrivateApt>,
}

impl KernelCache {
    pub fn new() -> Self {
        Self { root: workspace_root().join("target/kernels"), apt: None }
    }

    /// The kernel, from the cache or downloaded and extracted.
    pub fn fetch(&mut self, kernel: &GuestKernel) -> Result<KernelImage> {
        let tree = self.root.join(kernel.name);
        if let Ok(image) = find_image(&tree) {
            println!("xtask: kernel {}: cached {} ({})", kernel.name, image.release, tree.display());
            return Ok(image);
        }
        if self.apt.is_none() {
            self.apt = Some(PrivateApt::updated(&self.root.join("apt"))?);
        }
        let apt = self.apt.as_ref().context("apt index")?;
        let package = apt.unsigned_image_package(kernel.suite)?;
        println!("xtask: kernel {}: downloading {package} ({})", kernel.name, kernel.suite);
        let downloads = self.root.join("downloads");
        fs::create_dir_all(&downloads)?;
        let deb = apt.download(&package, &downloads)?;
        // Extract beside the final place, then rename: an interrupted run
        // never leaves a half tree that looks cached.
        let partial = self.root.join(format!("{}.partial", kernel.name));
        let _ = fs::remove_dir_all(&partial);
        let _ = fs::remove_dir_all(&tree);
        bounded::run_ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial), APT_LIMIT, "dpkg-deb")?;
        fs::write(partial.join("package"), format!("{package}\n"))?;
        fs::rename(&partial, &tree).with_context(|| format!("moving {} into place", tree.display()))?;
        fs::remove_file(&deb)?;
        find_image(&tree)
    }
}

/// `boot/vmlinuz-<release>` in an extracted kernel package.
fn find_image(tree: &Path) -> Result<KernelImage> {
    let boot = tree.join("boot");
    for entry in fs::read_dir(&boot).with_context(|| format!("reading {}", boot.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Some(release) = name.strip_prefix("vmlinuz-") {
            return Ok(KernelImage { release: release.to_string(), vmlinuz: path });
        }
    }
    bail!("no vmlinuz in {}", boot.display())
}

/// apt-get and apt-cache over our own sources list, lists and cache
/// directories: the system's apt state is left alone.
struct PrivateApt {
    options: Vec<String>,
}

impl PrivateApt {
    /// Writes a sources list with every guest kernel's suite at the system's
    /// Debian mirror, then updates the index.
    fn updated(dir: &Path) -> Result<Self> {
        let mirror = system_debian_mirror()?;
        if !Path::new(KEYRING).exists() {
            bail!("{KEYRING} is missing: install debian-archive-keyring");
        }
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let sources: String = GUEST_KERNELS
            .iter()
            .map(|k| format!("deb [signed-by={KEYRING}] {mirror} {} main\n", k.suite))
            .collect();
        let sources_list = dir.join("sources.list");
        fs::write(&sources_list, sources)?;
        let mut options = vec![
            format!("Dir::Etc::sourcelist={}", sources_list.display()),
            "Dir::Etc::sourceparts=-".to_string(),
            format!("Dir::State::Lists={}", dir.join("lists").display()),
            format!("Dir::Cache={}", dir.join("cache").display()),
        ];
        // apt drops to the `_apt` user to download, who may not write here.
        if crate::is_root() {
            options.push("APT::Sandbox::User=root".to_string());
        }
        let apt = Self { options };
        println!("xtask: updating a private apt index ({}) for the guest kernels", dir.display());
        bounded::run_ok(apt.command("apt-get").args(["update", "-qq"]), APT_LIMIT, "apt")?;
        Ok(apt)
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        for option in &self.options {
            command.arg("-o").arg(option);
        }
        command
    }

    /// `linux-image-amd64` in `suite` depends on the current ABI's image,
    /// e.g. `linux-image-6.1.0-50-amd64`; its `-unsigned` twin has the same
    /// kernel without the Secure Boot signature (and no signed-template
    /// indirection), which is all QEMU needs.
    fn unsigned_image_package(&self, suite: &str) -> Result<String> {
        let record = capture(self.command("apt-cache").args(["show", &format!("linux-image-amd64/{suite}")]))
            .with_context(|| format!("no linux-image-amd64 in {suite} at the system's Debian mirror"))?;
        let depends = record
            .lines()
            .find_map(|line| line.strip_prefix("Depends:"))
            .with_context(|| format!("linux-image-amd64/{suite} has no Depends"))?;
        let image = depends
            .split(',')
            .filter_map(|dependency| dependency.split_whitespace().next())
            .find(|name| name.starts_with("linux-image-"))
            .with_context(|| format!("linux-image-amd64/{suite} depends on no linux-image-*"))?;
        Ok(format!("{image}-unsigned"))
    }

    /// Downloads `package` into `dir`; returns the .deb.
    fn download(&self, package: &str, dir: &Path) -> Result<PathBuf> {
        bounded::run_ok(self.command("apt-get").args(["download", "-qq", package]).current_dir(dir), APT_LIMIT, "apt")?;
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.starts_with(&format!("{package}_")) && name.ends_with(".deb") {
                return Ok(path);
            }
        }
        bail!("apt-get download {package} left no .deb in {}", dir.display())
    }
}

/// The Debian archive URI from the system's apt sources: the first `deb`
/// source with a plain release suite (not `-security`, `-updates`, ...) and
/// the `main` component. Read at run time so no mirror is written down here.
fn system_debian_mirror() -> Result<String> {
    let mut files: Vec<PathBuf> = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut parts: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        parts.sort();
        files.extend(parts);
    }
    for file in &files {
        let Ok(text) = fs::read_to_string(file) else { continue };
        let name = file.to_string_lossy();
        let found = if name.ends_with(".sources") { mirror_in_deb822(&text) } else { mirror_in_one_line(&text) };
        if let Some(uri) = found {
            return Ok(uri);
        }
    }
    bail!("no Debian `deb` source with a release suite and `main` in /etc/apt (the guest kernels come from the system's Debian mirror)")
}

fn is_release_suite(suite: &str) -> bool {
    !suite.is_empty() && !suite.contains(['-', '/'])
}

/// deb822 (`*.sources`): stanzas of `Field: value` lines.
fn mirror_in_deb822(text: &str) -> Option<String> {
    text.split("\n\n").find_map(|stanza| {
        let field = |name: &str| -> String {
            stanza
                .lines()
                .filter(|line| !line.starts_with('#'))
                .find_map(|line| {
                    let (key, value) = line.split_once(':')?;
                    key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_string())
                })
                .unwrap_or_default()
        };
        let enabled = !field("Enabled").eq_ignore_ascii_case("no");
        let deb = field("Types").split_whitespace().any(|t| t == "deb");
        let suite = field("Suites").split_whitespace().any(is_release_suite);
        let main = field("Components").split_whitespace().any(|c| c == "main");
        (enabled && deb && suite && main).then(|| field("URIs").split_whitespace().next().map(str::to_string)).flatten()
    })
}

/// One-line format: `deb [options] URI suite component...`.
fn mirror_in_one_line(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.split('#').next()?.trim();
        let rest = line.strip_prefix("deb ")?.trim_start();
        // Options in brackets may hold spaces.
        let rest = if rest.starts_with('[') { rest.split_once(']')?.1 } else { rest };
        let mut words = rest.split_whitespace();
        let (uri, suite) = (words.next()?, words.next()?);
        (is_release_suite(suite) && words.any(|c| c == "main")).then(|| uri.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_takes_the_release_stanza() {
        let text = "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n\
                    Types: deb deb-src\n# comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main contrib\n";
        assert_eq!(mirror_in_deb822(text).as_deref(), Some("http://mirror.example/debian"));
    }

    #[test]
    fn one_line_skips_options_and_updates() {
        let text = "deb http://mirror.example/debian bookworm-updates main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main # x\n";
        assert_eq!(mirror_in_one_line(text).as_deref(), Some("http://mirror.example/debian"));
    }
}
