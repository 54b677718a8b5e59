//! `netlens check`: can netlens run here, and what will it show? Every
//! fact it depends on, each feature with the hook that serves it here (the
//! hooks loaded and attached for real, as a run would), and every hook's
//! outcome, as tables or as one JSON object (`--json`).

use serde_json::json;

use crate::{
    features::{FeatureStatus, Level},
    kernel::{btf::VMLINUX, probe},
    loader::{self, Attach, Hook, HOOKS},
};

struct Row {
    check: String,
    ok: bool,
    detail: String,
}

/// What `check` found.
struct Report {
    kernel: String,
    rows: Vec<Row>,
    features: Vec<FeatureStatus>,
    /// Every hook: its description and what happened to it.
    hooks: Vec<(String, String)>,
}

impl Report {
    /// netlens can run: every basic check passed and every required feature
    /// is served.
    fn ready(&self) -> bool {
        self.rows.iter().all(|r| r.ok)
            && !self.features.is_empty()
            && self.features.iter().all(|f| !f.feature.required || f.level != Level::Missing)
    }
}

/// Prints the report; returns whether netlens can run.
pub fn run(json: bool) -> bool {
    let report = inspect();
    if json {
        print_json(&report);
    } else {
        print_tables(&report);
    }
    report.ready()
}

fn inspect() -> Report {
    let mut rows = Vec::new();
    let mut row = |check: &str, ok: bool, detail: String| rows.push(Row { check: check.into(), ok, detail });

    let kernel = probe::kernel_release();
    match probe::too_old() {
        Some(problem) => row("kernel", false, problem),
        None => row("kernel", true, format!("{kernel} (needs {}.{}+)", probe::MIN_KERNEL.0, probe::MIN_KERNEL.1)),
    }
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

    let mut features = Vec::new();
    let mut hooks = Vec::new();
    let facts = privileged.then(loader::resolve_config);
    match facts {
        Some(Ok(mut facts)) => {
            row("tracefs", true, facts.tracefs.display().to_string());
            row("offsets", true, "tracepoint fields from tracefs, struct members from BTF".into());
            row("typed socket reads", true, facts.tcp_sock_cast().describe().into());
            row("overflow counts", true, facts.overflow_evidence().into());
            let attached = loader::choose_flow_home(&mut facts, loader::FlowTableUse::Session).and_then(|home| {
                let mut ebpf = loader::open(&facts)?;
                let (statuses, tried) = loader::attach_features(&mut ebpf, &facts);
                loader::place_flows(home, (ebpf, statuses, tried), &mut facts, loader::open)
            });
            match attached {
                Ok((mut ebpf, statuses, tried, home)) => {
                    row("flow state", true, home.describe(&facts.offsets.config));
                    features = statuses;
                    // The accept-queue features choose among hook families.
                    let optional = crate::optional::attach_optional(&mut ebpf, &facts);
                    features.extend(optional.iter().filter_map(crate::optional::FeatureStatus::as_feature));
                    hooks = HOOKS
                        .iter()
                        .map(|hook| {
                            let outcome = match tried.iter().find(|(h, _)| h.program == hook.program) {
                                Some((_, Ok(()))) => "loads, attaches".to_string(),
                                Some((_, Err(why))) => why.trim_start_matches(&format!("{}: ", hook.describe())).to_string(),
                                None => "not tried: its features are served by better hooks".to_string(),
                            };
                            (hook.describe(), outcome)
                        })
                        .collect();
                    hooks.extend(optional.iter().map(|status| (format!("{} hooks", status.feature), status.describe())));
                    let attached = tried
                        .iter()
                        .filter(|(_, outcome)| outcome.is_ok())
                        .map(|(hook, _)| *hook)
                        .chain(optional.iter().filter_map(|status| status.served_by).flat_map(|family| family.hooks.iter()));
                    row("skipped runs", true, skipped_runs(probe::parse_release(&kernel), attached));
                }
                Err(err) => row("ebpf object", false, format!("{err:#}")),
            }
        }
        Some(Err(err)) => row("offsets", false, format!("{err:#}")),
        None => row("tracefs", false, "not checked: needs privileges".into()),
    }
    Report { kernel, rows, features, hooks }
}

/// Whether netlens can count every program run the kernel skips (a
/// program is not run while another runs on that CPU, e.g. when a softirq
/// interrupts one): `events missed` rests on the kernel's count. Before 6.7
/// the kernel skips classic tracepoint and kprobe programs without counting
/// it (`trace_call_bpf`); BTF-typed and raw programs either nest or are
/// counted on every kernel. `attached`: the hooks in use.
fn skipped_runs<'a>(version: Option<(u32, u32)>, attached: impl Iterator<Item = &'a Hook>) -> String {
    if version.is_some_and(|version| version >= (6, 7)) {
        return "counted for every program: netlens reports them as events missed".into();
    }
    let uncounted: Vec<String> = attached
        .filter(|hook| matches!(hook.attach, Attach::Record | Attach::KProbe | Attach::KRetProbe))
        .map(Hook::describe)
        .collect();
    if uncounted.is_empty() {
        return "counted for every program in use (all BTF-typed or raw)".into();
    }
    format!(
        "not counted for {}: before 6.7 the kernel skips those while another BPF program runs on that CPU without counting it",
        uncounted.join(", ")
    )
}

fn print_tables(report: &Report) {
    let width = report.rows.iter().map(|r| r.check.len()).max().unwrap_or(10).max(10);
    println!("{:<width$}  {:<6}  DETAIL", "CHECK", "STATUS");
    for r in &report.rows {
        println!("{:<width$}  {:<6}  {}", r.check, if r.ok { "ok" } else { "FAIL" }, r.detail);
    }
    if !report.features.is_empty() {
        println!();
        let width = report.features.iter().map(|f| f.feature.name.len()).max().unwrap_or(10);
        println!("{:<width$}  {:<8}  SERVED BY / WHY", "FEATURE", "STATUS");
        for f in &report.features {
            let detail = match f.level {
                Level::Ok => f.hooks.join(" + "),
                Level::Degraded => format!("{} ({})", f.hooks.join(" + "), f.why),
                Level::Missing => f.why.clone(),
            };
            let required = if f.feature.required && f.level == Level::Missing { " (required)" } else { "" };
            println!("{:<width$}  {:<8}  {detail}{required}", f.feature.name, f.level.as_str());
        }
    }
    if !report.hooks.is_empty() {
        println!();
        let width = report.hooks.iter().map(|(h, _)| h.len()).max().unwrap_or(10);
        println!("{:<width$}  OUTCOME", "HOOK");
        for (hook, outcome) in &report.hooks {
            println!("{hook:<width$}  {outcome}");
        }
    }
    println!();
    println!(
        "{}",
        if report.ready() {
            "netlens can run here."
        } else {
            "netlens cannot run here: fix the FAIL rows (and any required feature that is missing)."
        }
    );
}

fn print_json(report: &Report) {
    let value = json!({
        "kernel": report.kernel,
        "ready": report.ready(),
        "checks": report.rows.iter().map(|r| json!({"check": r.check, "ok": r.ok, "detail": r.detail})).collect::<Vec<_>>(),
        "features": report.features.iter().map(|f| json!({
            "feature": f.feature.name,
            "status": f.level.as_str(),
            "required": f.feature.required,
            "hook": f.hooks.join(" + "),
            "why": f.why,
        })).collect::<Vec<_>>(),
        "hooks": report.hooks.iter().map(|(hook, outcome)| json!({"hook": hook, "outcome": outcome})).collect::<Vec<_>>(),
    });
    println!("{value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Before 6.7 the classic tracepoints in use are named; from 6.7, or
    /// with only typed hooks, every skipped run is counted.
    #[test]
    fn skipped_runs_name_the_uncounted_hooks() {
        let record = HOOKS.iter().find(|hook| matches!(hook.attach, Attach::Record)).expect("a classic tracepoint hook");
        let typed = HOOKS.iter().find(|hook| matches!(hook.attach, Attach::Btf)).expect("a BTF tracepoint hook");
        let old = skipped_runs(Some((6, 1)), [record, typed].into_iter());
        assert!(old.starts_with(&format!("not counted for {}: before 6.7", record.describe())), "{old}");
        assert!(!old.contains(&typed.describe()), "{old}");
        assert!(skipped_runs(Some((6, 7)), [record].into_iter()).starts_with("counted for every program:"));
        assert!(skipped_runs(Some((5, 10)), [typed].into_iter()).starts_with("counted for every program in use"));
    }
}
