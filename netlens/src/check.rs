//! `netlens check`: can netlens run here? Every fact it depends on, and each
//! hook loaded and attached for real, as a table.

use crate::{
    kernel::{btf::VMLINUX, probe},
    loader::{self, HOOKS},
};

struct Row {
    check: String,
    ok: bool,
    detail: String,
    /// An optional feature this kernel cannot serve: shown, never fatal.
    off: bool,
}

/// Prints the table; returns whether netlens can run.
pub fn run() -> bool {
    let mut rows = Vec::new();
    let mut row = |check: &str, ok: bool, detail: String| rows.push(Row { check: check.into(), ok, detail, off: false });

    row("kernel", true, probe::kernel_release());
    row("btf", probe::has_btf(), if probe::has_btf() { VMLINUX.into() } else { format!("{VMLINUX} missing: needs CONFIG_DEBUG_INFO_BTF=y") });
    let privileged = probe::privileged();
    row(
        "privileges",
        privileged,
        if privileged { "CAP_BPF+CAP_PERFMON (or CAP_SYS_ADMIN)".into() } else { "missing CAP_BPF+CAP_PERFMON: run as root".into() },
    );
    // Lockdown blocks kprobes and some helpers under `confidentiality`;
    // tracepoints keep working under `integrity`.
    let lockdown = probe::lockdown();
    row(
        "lockdown",
        lockdown.as_deref() != Some("confidentiality"),
        lockdown.unwrap_or_else(|| "not reported (lockdown LSM inactive or securityfs unmounted)".into()),
    );

    let config = if privileged { Some(loader::resolve_config()) } else { None };
    match &config {
        Some(Ok((tracefs, _))) => {
            row("tracefs", true, tracefs.display().to_string());
            row("offsets", true, "tracepoint fields from tracefs, struct members from BTF".into());
        }
        Some(Err(err)) => row("offsets", false, format!("{err:#}")),
        None => row("tracefs", false, "not checked: needs privileges".into()),
    }

    let mut ebpf = match &config {
        Some(Ok((_, config))) => match loader::open(config) {
            Ok(ebpf) => Some(ebpf),
            Err(err) => {
                row("ebpf object", false, format!("{err:#}"));
                None
            }
        },
        _ => None,
    };
    let tracefs = match &config {
        Some(Ok((path, _))) => Some(path.clone()),
        _ => None,
    };
    for hook in HOOKS {
        let name = format!("{}:{}", hook.category, hook.tracepoint);
        let present = tracefs
            .as_deref()
            .map(|t| t.join("events").join(hook.category).join(hook.tracepoint).is_dir());
        let (ok, detail) = match (present, ebpf.as_mut()) {
            (Some(false), _) => (false, "tracepoint missing from this kernel".to_string()),
            (_, None) => (false, "not checked".to_string()),
            (_, Some(ebpf)) => hook_status(ebpf, hook),
        };
        row(&name, ok, detail);
    }

    // Optional features: the first family of hooks that attaches serves.
    if let (Some(ebpf), Some(Ok((_, config)))) = (ebpf.as_mut(), &config) {
        for status in crate::optional::attach_optional(ebpf, config) {
            let off = status.served_by.is_none();
            rows.push(Row { check: format!("optional {}", status.feature), ok: true, detail: status.describe(), off });
        }
    }

    let width = rows.iter().map(|r| r.check.len()).max().unwrap_or(10).max(10);
    println!("{:<width$}  {:<6}  DETAIL", "CHECK", "STATUS");
    for r in &rows {
        let status = match (r.ok, r.off) {
            (_, true) => "off",
            (true, false) => "ok",
            (false, false) => "FAIL",
        };
        println!("{:<width$}  {:<6}  {}", r.check, status, r.detail);
    }
    let ready = rows.iter().all(|r| r.ok);
    println!("{}", if ready { "netlens can run here." } else { "netlens cannot run here: fix the FAIL rows." });
    ready
}

/// Loads and attaches one program (the attachment is released with the
/// object when `check` ends).
fn hook_status(ebpf: &mut aya::Ebpf, hook: &loader::Hook) -> (bool, String) {
    let kind = match hook.attach {
        loader::Attach::Record => "tracepoint",
        loader::Attach::Raw => "raw tracepoint",
        loader::Attach::FEntry => "fentry",
        loader::Attach::FExit => "fexit",
        loader::Attach::KProbe => "kprobe",
        loader::Attach::KRetProbe => "kretprobe",
    };
    match loader::attach(ebpf, hook) {
        Ok(()) => (true, format!("present, loads, attaches ({kind})")),
        Err(loader::HookError::Load(err)) => (false, format!("present; load failed: {err:#}")),
        Err(loader::HookError::Attach(err)) => (false, format!("present, loads; attach failed: {err:#}")),
    }
}
