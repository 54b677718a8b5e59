//! What users see when something is wrong, and `netlens check`.

use std::process::Command;

use serde_json::Value;

use netlens_tests::netlens::binary;

/// The netlens command, run as nobody without capabilities if `as_nobody`.
fn command(args: &[&str], as_nobody: bool) -> Command {
    let mut command = if as_nobody {
        let mut setpriv = Command::new("setpriv");
        setpriv.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]).arg(binary());
        setpriv
    } else {
        Command::new(binary())
    };
    command.args(args);
    command
}

/// Runs netlens; returns (exit code, stdout, stderr).
fn netlens(args: &[&str], as_nobody: bool) -> (i32, String, String) {
    let output = command(args, as_nobody).output().expect("running netlens");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn assert_one_line_error(args: &[&str], as_nobody: bool, mentions: &str) {
    netlens_tests::netlens::assert_one_line_error(command(args, as_nobody), mentions);
}

#[test]
fn unprivileged_run_fails_with_one_line() {
    assert_one_line_error(&["trace"], true, "root");
}

#[test]
fn unknown_flag_fails_with_one_line() {
    assert_one_line_error(&["trace", "--frobnicate"], false, "--frobnicate");
}

#[test]
fn bad_port_fails_with_one_line() {
    assert_one_line_error(&["trace", "--port", "70000"], false, "70000");
    assert_one_line_error(&["trace", "--port", "http"], false, "http");
}

/// `netlens top` with stdout a pipe (and stdin not a terminal): one line
/// pointing at --batch, before any program is attached (no `attached`
/// line, no escape codes on stdout).
#[test]
fn top_without_a_terminal_fails_with_one_line() {
    assert_one_line_error(&["top"], false, "--batch");
    assert_one_line_error(&["top", "--view", "connections"], false, "needs a terminal");
}

#[test]
fn bad_duration_fails_with_one_line() {
    assert_one_line_error(&["trace", "--duration", "-1"], false, "duration");
    assert_one_line_error(&["trace", "--duration", "soon"], false, "soon");
}

/// `netlens check --json`, with `env` set.
fn check_json(env: &[(&str, &str)]) -> (i32, serde_json::Value) {
    let output = command(&["check", "--json"], false).envs(env.iter().copied()).output().expect("running netlens check");
    let text = String::from_utf8_lossy(&output.stdout);
    let value = serde_json::from_str(&text).unwrap_or_else(|err| panic!("check --json printed no JSON ({err}): {text}"));
    (output.status.code().unwrap_or(-1), value)
}

fn feature<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    let features = report["features"].as_array().expect("features");
    features.iter().find(|f| f["feature"] == name).unwrap_or_else(|| panic!("no feature {name}: {report}"))
}

/// Whether this kernel has a tracepoint, from tracefs itself.
fn has_tracepoint(category: &str, name: &str) -> bool {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .any(|root| std::path::Path::new(&format!("{root}/events/{category}/{name}")).is_dir())
}

/// `check` exits 0 and names exactly what this kernel lacks: the features a
/// missing tracepoint takes away are degraded or served another way, the
/// others are ok.
#[test]
fn check_passes_here_and_names_what_this_kernel_lacks() {
    let (code, report) = check_json(&[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["ready"], true);
    for required in ["lifecycle", "retransmits"] {
        assert_eq!(feature(&report, required)["status"], "ok", "{report}");
    }
    // Every kernel netlens supports takes the BTF-tracepoint builds.
    assert_eq!(feature(&report, "lifecycle")["hook"], "tp_btf sock:inet_sock_set_state", "{report}");
    assert_eq!(feature(&report, "transport")["hook"], "tp_btf tcp:tcp_probe", "{report}");
    assert_eq!(feature(&report, "retransmits")["hook"], "tp_btf tcp:tcp_retransmit_skb", "{report}");
    // Before 6.10, tcp:tcp_send_reset has the 4-tuple layout (a `sport`
    // field) and skips resets sent without a socket.
    let old_reset_layout = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"].iter().any(|root| {
        std::fs::read_to_string(format!("{root}/events/tcp/tcp_send_reset/format")).is_ok_and(|f| f.contains(" sport;"))
    });
    let resets = feature(&report, "resets");
    assert_eq!(resets["status"], if old_reset_layout { "degraded" } else { "ok" }, "{resets}");
    for always in ["synack_retransmits", "transport"] {
        assert_eq!(feature(&report, always)["status"], "ok", "{report}");
    }
    let congestion = feature(&report, "congestion_episodes");
    if has_tracepoint("tcp", "tcp_cong_state_set") {
        assert_eq!(congestion["status"], "ok", "{congestion}");
        assert_eq!(congestion["hook"], "tp_btf tcp:tcp_cong_state_set");
    } else {
        assert_eq!(congestion["status"], "degraded", "{congestion}");
        assert!(congestion["why"].as_str().unwrap_or("").contains("tcp_cong_state_set"), "{congestion}");
    }
    let hol = feature(&report, "hol_stalls");
    if has_tracepoint("sock", "sk_data_ready") {
        assert_eq!((&hol["status"], &hol["hook"]), (&"ok".into(), &"tp_btf tcp:tcp_probe + tp_btf sock:sk_data_ready".into()));
    } else {
        // The data-ready path from fentry or a kprobe, else degraded.
        let hook = hol["hook"].as_str().unwrap_or("");
        match hol["status"].as_str() {
            Some("ok") => assert!(hook.ends_with("tcp_data_ready"), "{hol}"),
            Some("degraded") => assert_eq!(hook, "tp_btf tcp:tcp_probe"),
            other => panic!("hol_stalls {other:?}: {hol}"),
        }
    }
    // Every kernel in the matrix has what the listen-overflow hooks need
    // to ask the kernel's own count (else they fall back to inexact tests
    // of the queue, which the accept tests pass most of the time).
    let checks = report["checks"].as_array().expect("checks");
    let evidence = checks.iter().find(|row| row["check"] == "overflow counts").expect("an `overflow counts` row");
    assert!(evidence["detail"].as_str().unwrap_or("").starts_with("the kernel's per-CPU TcpExtListenOverflows"), "{evidence}");
    // From 6.7 the kernel counts every run it skips; before, not those of
    // classic tracepoints and kprobes, which no TCP hook uses any more
    // where BTF tracepoints load.
    let skipped = checks.iter().find(|row| row["check"] == "skipped runs").expect("a `skipped runs` row");
    let skipped = skipped["detail"].as_str().unwrap_or("");
    if kernel_version(&report) >= (6, 7) {
        assert!(skipped.starts_with("counted for every program:"), "{skipped}");
    } else {
        assert!(!skipped.contains("tcp:"), "{skipped}");
    }
    let hooks = report["hooks"].as_array().expect("hooks");
    assert!(hooks.len() >= 11, "{report}");
    for hook in hooks {
        let outcome = hook["outcome"].as_str().unwrap_or("");
        let described = hook["hook"].as_str().unwrap_or("");
        if described.contains("sk_data_ready") && !has_tracepoint("sock", "sk_data_ready") {
            assert_eq!(outcome, "this kernel has no tracepoint sock:sk_data_ready");
        }
        // accept(): every kernel in the matrix has fexit or kprobes, or
        // the task's saved registers for the exit-only tracepoint (5.15+).
        // A refused program falls back without an error, so a change
        // that the verifier rejects shows only here.
        if described == "accept_queue hooks" {
            let best = ["accept_queue: fexit", "accept_queue: kprobe", "accept_queue: tracepoint, exits only"];
            assert!(best.iter().any(|way| outcome.starts_with(way)), "{hook}");
        }
    }
    // Flows live in the array from 5.12 on (BPF compare-and-exchange),
    // before in the hash table, unless another is asked for.
    let home = if kernel_version(&report) >= (5, 12) { "array of" } else { "hash table" };
    assert!(flow_state(&report).starts_with(home), "{report}");
}

/// Asked for, socket storage is what `check` reports on 5.11+ (tracing
/// programs may use it from then on), the table before; a value that is
/// neither is refused in one line.
#[test]
fn check_reports_flows_in_socket_storage_when_asked() {
    let (code, report) = check_json(&[("NETLENS_FLOW_STATE", "storage")]);
    assert_eq!(code, 0, "{report}");
    let storage = kernel_version(&report) >= (5, 11);
    assert_eq!(flow_state(&report).starts_with("socket storage"), storage, "{report}");
    let mut trace = command(&["trace"], false);
    trace.env("NETLENS_FLOW_STATE", "lru");
    netlens_tests::netlens::assert_one_line_error(trace, "NETLENS_FLOW_STATE=`lru` must be `array`, `table` or `storage`");
}

/// (major, minor) of the kernel `check` reported.
fn kernel_version(report: &Value) -> (u32, u32) {
    let release = report["kernel"].as_str().unwrap_or_default();
    let mut numbers = release.split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().unwrap_or(0));
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0))
}

/// `check`'s `flow state` line.
fn flow_state(report: &Value) -> String {
    let row = report["checks"].as_array().into_iter().flatten().find(|c| c["check"] == "flow state");
    row.and_then(|c| c["detail"].as_str()).unwrap_or_default().to_string()
}

/// A hook left out (as on a kernel without it) degrades only its feature,
/// in `check` and in one stderr line at the start of `trace`.
#[test]
fn a_missing_optional_hook_degrades_only_its_feature() {
    let skip = [("NETLENS_SKIP_HOOKS", "tcp_cong_state_set,tcp_cong_state_set_btf,tcp_retransmit_synack,tcp_retransmit_synack_btf")];
    let (code, report) = check_json(&skip);
    assert_eq!(code, 0, "{report}");
    assert_eq!(feature(&report, "congestion_episodes")["status"], "degraded");
    assert_eq!(feature(&report, "congestion_episodes")["hook"], "tp_btf tcp:tcp_probe");
    let synack = feature(&report, "synack_retransmits");
    assert_eq!(synack["status"], "missing");
    assert!(synack["why"].as_str().unwrap_or("").contains("left out by NETLENS_SKIP_HOOKS"), "{synack}");
    assert_eq!(feature(&report, "lifecycle")["status"], "ok");

    let output = command(&["trace", "--duration", "0.3"], false).envs(skip).output().expect("running netlens trace");
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let notices: Vec<&str> = stderr.lines().filter(|l| l.contains(" degraded: ") || l.contains(" missing: ")).collect();
    assert_eq!(notices.len(), 2, "{stderr}");
    // In FEATURES order.
    assert!(notices[0].starts_with("netlens: synack_retransmits missing: "), "{stderr}");
    assert!(notices[1].starts_with("netlens: congestion_episodes degraded: "), "{stderr}");
}

/// A required hook left out: netlens refuses to start, in one line.
#[test]
fn a_missing_required_hook_stops_netlens_in_one_line() {
    let mut trace = command(&["trace"], false);
    // Both builds (sock.rs in the eBPF crate).
    let both = "tcp_retransmit_skb_btf,tcp_retransmit_skb";
    trace.env("NETLENS_SKIP_HOOKS", both);
    netlens_tests::netlens::assert_one_line_error(trace, "retransmits cannot be traced on this kernel");
    let (code, report) = check_json(&[("NETLENS_SKIP_HOOKS", both)]);
    assert_ne!(code, 0);
    assert_eq!(report["ready"], false);
}

#[test]
fn check_without_privileges_fails() {
    let (code, stdout, _) = netlens(&["check"], true);
    assert_ne!(code, 0);
    assert!(stdout.contains("FAIL"), "{stdout}");
}

#[test]
fn trace_stops_by_itself_after_duration() {
    let started = std::time::Instant::now();
    let (code, _, stderr) = netlens(&["trace", "--duration", "0.5", "--json"], false);
    assert_eq!(code, 0, "{stderr}");
    // Other lines may come first (a degraded feature, a listener whose
    // process cannot be named).
    assert!(stderr.lines().any(|line| line.starts_with("netlens: attached")), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

/// A Ctrl-C the moment `netlens: attached` appears (what a script does
/// once netlens is ready) stops `trace` cleanly, exit 0, every time: its
/// handler is in place before it attaches. It was installed after, and a
/// SIGINT in between killed the process (`cargo xtask bench all` met it).
#[test]
fn trace_stops_cleanly_on_sigint_right_after_attaching() {
    use std::io::{BufRead as _, BufReader};
    const STARTS: usize = 10;
    for start in 0..STARTS {
        let mut child = Command::new(binary())
            .args(["trace", "--json"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting netlens");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let mut said = String::new();
        // Bounded by netlens itself: it attaches or fails within seconds,
        // and either way stderr then has a line (or closes).
        while !said.lines().any(|line| line.starts_with("netlens: attached")) {
            if stderr.read_line(&mut said).expect("reading stderr") == 0 {
                panic!("start {start}: netlens ended before attaching: {said}");
            }
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let status = child.wait().expect("waiting for netlens");
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut rest);
        assert!(status.success(), "start {start}: {status} after SIGINT; stderr: {said}{rest}");
    }
}
