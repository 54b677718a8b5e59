//! What users see when something is wrong, and `netlens check`.

use std::process::Command;

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

#[test]
fn bad_duration_fails_with_one_line() {
    assert_one_line_error(&["trace", "--duration", "-1"], false, "duration");
    assert_one_line_error(&["trace", "--duration", "soon"], false, "soon");
}

#[test]
fn check_passes_here_and_lists_every_hook() {
    let (code, stdout, _) = netlens(&["check"], false);
    assert_eq!(code, 0, "{stdout}");
    for hook in ["sock:inet_sock_set_state", "tcp:tcp_retransmit_skb", "tcp:tcp_retransmit_synack", "tcp:tcp_send_reset", "tcp:tcp_receive_reset"] {
        let row = stdout.lines().find(|l| l.starts_with(hook)).unwrap_or_else(|| panic!("no row for {hook}"));
        assert!(row.contains(" ok "), "{row}");
    }
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
    assert!(stderr.lines().next().unwrap_or("").starts_with("netlens: attached"), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}
