//! The deploy kit under deploy/: Prometheus rules pass `promtool`, the
//! Grafana dashboard only queries metrics netlens exports, and the systemd
//! unit and Kubernetes DaemonSet keep their hardening. Needs no privileges.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

/// Every metric the daemon exports (histograms and summaries by base name).
const NETLENS_METRICS: &[&str] = &[
    "netlens_tcp_handshake_duration_seconds",
    "netlens_tcp_handshake_duration_recent_seconds",
    "netlens_tcp_handshake_failures_total",
    "netlens_tcp_retransmits_total",
    "netlens_tcp_resets_total",
    "netlens_tcp_connections_opened_total",
    "netlens_tcp_connections_closed_total",
    "netlens_tcp_connection_lifetime_seconds",
    "netlens_tcp_hol_stall_duration_seconds",
    "netlens_tcp_hol_stall_duration_recent_seconds",
    "netlens_tcp_hol_stalled_bytes",
    "netlens_tcp_zero_window_duration_seconds",
    "netlens_tcp_srtt_seconds",
    "netlens_tcp_segment_srtt_seconds",
    "netlens_tcp_segment_cwnd_segments",
    "netlens_tcp_drops_total",
    "netlens_tcp_sockets",
    "netlens_tcp_ephemeral_ports_used_ratio",
    "netlens_events_lost_total",
    "netlens_flow_table_evictions_total",
    "netlens_build_info",
    "netlens_bpf_program_run_seconds_total",
    "netlens_bpf_program_runs_total",
    "netlens_bpf_stats_enabled",
    "netlens_bpf_errors_total",
    "netlens_map_read_failures_total",
    // Also exported by the daemon (netlens/src/daemon/metrics.rs).
    "netlens_endpoints_tracked",
    "netlens_tcp_slow_start_exits_total",
    "netlens_tcp_closed_in_slow_start_total",
    "netlens_finding_active",
];

/// Histograms and summaries: their series carry these suffixes.
const SERIES_SUFFIXES: &[&str] = &["_bucket", "_sum", "_count"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

fn read(relative: &str) -> String {
    let path = repo_root().join(relative);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Runs promtool with `args` from the repository root; panics with its
/// output unless it succeeds. A missing promtool fails the test.
fn promtool(args: &[&str]) -> String {
    let output = match Command::new("promtool").args(args).current_dir(repo_root()).output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not installed: run `cargo xtask test`, which installs it \
             (Debian package `prometheus`), or `apt-get install prometheus`"
        ),
        Err(e) => panic!("running promtool: {e}"),
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "promtool {args:?} failed:\n{stdout}\n{stderr}");
    stdout
}

/// Every `netlens_…` metric name in `text`, with histogram/summary
/// suffixes removed when the base name is a known metric.
fn netlens_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("netlens_") {
        // Skip matches inside a longer identifier (e.g. `my_netlens_x`).
        let preceded = rest[..start].chars().next_back().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let tail = &rest[start..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        if !preceded {
            let name = &tail[..end];
            let base = SERIES_SUFFIXES
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix).filter(|b| NETLENS_METRICS.contains(b)))
                .unwrap_or(name);
            names.push(base.to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// All panels, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            if let Some(nested) = panel.get("panels") {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn dashboard() -> Value {
    serde_json::from_str(&read("deploy/grafana/netlens.json")).expect("deploy/grafana/netlens.json is not valid JSON")
}

/// The PromQL of every panel target.
fn panel_exprs(dashboard: &Value) -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    for panel in panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or("").to_string();
        for target in panel.get("targets").and_then(Value::as_array).into_iter().flatten() {
            if let Some(expr) = target.get("expr").and_then(Value::as_str) {
                exprs.push((title.clone(), expr.to_string()));
            }
        }
    }
    exprs
}

#[test]
fn alert_rules_pass_promtool_check() {
    let out = promtool(&["check", "rules", "deploy/prometheus/alerts.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    promtool(&["test", "rules", "deploy/prometheus/alerts_test.yml"]);
}

#[test]
fn alerts_cover_the_documented_conditions_and_use_only_exported_metrics() {
    let alerts = read("deploy/prometheus/alerts.yml");
    for name in netlens_names(&alerts) {
        assert!(NETLENS_METRICS.contains(&name.as_str()), "alerts.yml uses `{name}`, which netlens does not export");
    }
    for alert in [
        "NetlensHandshakeLatencyHigh",
        "NetlensSynRetransmits",
        "NetlensDataRetransmitRateHigh",
        "NetlensHolStallHigh",
        "NetlensEphemeralPortsExhausting",
        "NetlensEventsLost",
        "NetlensFlowTableEvicting",
        "NetlensDown",
        // One per doctor finding.
        "NetlensConnectionChurn",
        "NetlensSynLoss",
        "NetlensPortExhaustion",
        "NetlensHolBlocking",
        "NetlensPmtuBlackhole",
        "NetlensRetryStorm",
        "NetlensSlowReader",
        "NetlensAcceptOverflow",
        "NetlensRetransmitLoss",
    ] {
        assert!(alerts.contains(&format!("alert: {alert}\n")), "alerts.yml lacks {alert}");
    }
    // Every alert has a severity, says what it means and where to look next.
    for block in alerts.split("- alert: ").skip(1) {
        let name = block.lines().next().unwrap_or("");
        for field in ["severity: ", "summary: ", "description: "] {
            assert!(block.contains(field), "alert {name} lacks `{field}`");
        }
        assert!(
            block.contains("`netlens top`") || block.contains("`netlens check`") || block.contains("`netlens doctor`"),
            "alert {name} does not point to netlens"
        );
    }
}

#[test]
fn dashboard_queries_only_exported_metrics() {
    let dashboard = dashboard();
    let exprs = panel_exprs(&dashboard);
    assert!(exprs.len() >= 10, "the dashboard has only {} queries", exprs.len());
    let mut used = Vec::new();
    for (title, expr) in &exprs {
        for name in netlens_names(expr) {
            assert!(
                NETLENS_METRICS.contains(&name.as_str()),
                "panel `{title}` queries `{name}`, which netlens does not export: {expr}"
            );
            used.push(name);
        }
    }
    // The template variable queries too.
    for variable in dashboard["templating"]["list"].as_array().expect("templating.list") {
        let text = variable["query"].to_string() + &variable["definition"].to_string();
        for name in netlens_names(&text) {
            assert!(NETLENS_METRICS.contains(&name.as_str()), "variable queries `{name}`");
        }
    }
    for needed in [
        "netlens_tcp_handshake_duration_seconds",
        "netlens_tcp_retransmits_total",
        "netlens_tcp_hol_stall_duration_seconds",
        "netlens_tcp_connections_opened_total",
        "netlens_tcp_connections_closed_total",
        "netlens_tcp_sockets",
        "netlens_tcp_ephemeral_ports_used_ratio",
        "netlens_tcp_zero_window_duration_seconds",
        "netlens_bpf_program_run_seconds_total",
        "netlens_events_lost_total",
    ] {
        assert!(used.iter().any(|u| u == needed), "no panel shows {needed}");
    }
    for process_metric in ["process_cpu_seconds_total", "process_resident_memory_bytes"] {
        assert!(exprs.iter().any(|(_, e)| e.contains(process_metric)), "no panel shows {process_metric}");
    }
}

#[test]
fn dashboard_panels_cover_each_topic() {
    let dashboard = dashboard();
    let titles: Vec<String> = panels(&dashboard)
        .iter()
        .filter(|p| p["type"] != "row")
        .map(|p| p["title"].as_str().unwrap_or("").to_lowercase())
        .collect();
    for topic in ["handshake", "retransmit", "hol", "time_wait", "ports", "cost"] {
        assert!(titles.iter().any(|t| t.contains(topic)), "no panel title mentions `{topic}`: {titles:?}");
    }
}

#[test]
fn dashboard_uses_template_datasource_and_instance() {
    let dashboard = dashboard();
    let schema = dashboard["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    let variables = dashboard["templating"]["list"].as_array().expect("templating.list");
    let variable = |name: &str| variables.iter().find(|v| v["name"] == name);
    let datasource = variable("datasource").expect("a `datasource` variable");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");
    assert!(variable("instance").is_some(), "an `instance` variable");
    for panel in panels(&dashboard).into_iter().filter(|p| p["type"] != "row") {
        let title = &panel["title"];
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "panel {title}");
        for target in panel["targets"].as_array().into_iter().flatten() {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "panel {title}");
            let expr = target["expr"].as_str().unwrap_or("");
            assert!(expr.contains("$instance"), "panel {title} ignores the instance variable: {expr}");
        }
    }
}

/// promtool parses every panel query: each goes into a throwaway rule file
/// with Grafana's variables replaced by what they expand to.
#[test]
fn dashboard_queries_are_valid_promql() {
    let exprs = panel_exprs(&dashboard());
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in exprs.iter().enumerate() {
        let expanded = expr.replace("$__rate_interval", "1m").replace("$instance", ".*");
        let quoted = serde_json::to_string(&expanded).expect("a string");
        rules.push_str(&format!("      - record: dashboard:query{i}\n        expr: {quoted}\n"));
    }
    let dir = std::env::temp_dir().join(format!("netlens-deploy-test-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("dashboard_rules.yml");
    fs::write(&file, rules).expect("writing the rule file");
    let result = std::panic::catch_unwind(|| promtool(&["check", "rules", file.to_str().expect("UTF-8 temp path")]));
    let _ = fs::remove_dir_all(&dir);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn daemonset_is_not_privileged_and_adds_only_the_needed_capabilities() {
    let yaml = read("deploy/kubernetes/daemonset.yaml");
    let settings: Vec<&str> = yaml.lines().map(|l| l.split('#').next().unwrap_or("").trim()).collect();
    assert!(!settings.contains(&"privileged: true"), "the DaemonSet must not run privileged");
    assert!(settings.contains(&"privileged: false"));
    assert!(settings.contains(&"allowPrivilegeEscalation: false"));
    assert!(settings.contains(&"readOnlyRootFilesystem: true"));
    assert!(settings.contains(&"hostNetwork: true"));
    assert!(settings.contains(&"hostPID: true"));
    assert!(settings.contains(&r#"drop: ["ALL"]"#), "capabilities must drop ALL");
    let added: Vec<&str> = settings
        .iter()
        .skip_while(|l| **l != "add:")
        .skip(1)
        .take_while(|l| l.starts_with("- "))
        .map(|l| l.trim_start_matches("- ").trim())
        .collect();
    assert_eq!(added, ["BPF", "PERFMON", "SYS_RESOURCE", "NET_ADMIN"], "capabilities added");
    assert!(!settings.iter().any(|l| l.contains("SYS_ADMIN")), "SYS_ADMIN is only for kernels < 5.8 (comment)");
    for needle in [
        r#"prometheus.io/scrape: "true""#,
        r#"prometheus.io/port: "9977""#,
        r#"args: ["daemon", "--listen", "0.0.0.0:9977"]"#,
        "path: /healthz",
        "path: /sys/kernel/tracing",
        "path: /sys/kernel/btf",
        "memory: 128Mi",
        "- operator: Exists",
        "namespace: netlens",
    ] {
        assert!(settings.contains(&needle) || yaml.contains(needle), "daemonset.yaml lacks `{needle}`");
    }
}

#[test]
fn systemd_unit_is_hardened() {
    let unit = read("deploy/systemd/netlens.service");
    let settings: Vec<&str> = unit.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.is_empty()).collect();
    for needed in [
        "ExecStart=/usr/local/bin/netlens daemon",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "LockPersonality=yes",
        "CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_SYS_RESOURCE CAP_NET_ADMIN",
        "AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_SYS_RESOURCE CAP_NET_ADMIN",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_NETLINK AF_UNIX",
        "MemoryMax=128M",
    ] {
        assert!(settings.contains(&needed), "netlens.service lacks `{needed}`");
    }
    assert!(!settings.iter().any(|l| l.contains("CAP_SYS_ADMIN")), "CAP_SYS_ADMIN is only for kernels < 5.8 (comment)");
}
