//! Unit tests of the matrix table and its notes.

use super::{check::hook_kind, *};

#[test]
fn selection_refuses_unknown_kernels() {
    assert!(Selection::parse("4.19").is_err());
    assert_eq!(Selection::parse("all").map(|s| s.0.len()).ok(), Some(1 + GUEST_KERNELS.len()));
    assert!(matches!(Selection::parse("6.12").map(|s| s.0[0]), Ok(Target::Guest(k)) if k.suite == "trixie"));
}

#[test]
fn check_json_features_and_failed_checks() {
    let json = r#"{"kernel":"6.1.0","ready":false,"checks":[{"check":"btf","ok":true,"detail":""},{"check":"hook sock:sk_data_ready","ok":false,"detail":"no such tracepoint"}],
        "features":[{"feature":"hol_stall","status":"degraded","hook":"tcp_probe","why":"no sk_data_ready"}]}"#;
    let report = parse_check(Some(json), None, false, "exit 1".into());
    assert!(report.json);
    assert_eq!(report.features[0].status, "degraded");
    assert_eq!(report.failed_checks, vec![("hook sock:sk_data_ready".to_string(), "no such tracepoint".to_string())]);
}

#[test]
fn check_plain_table_fallback() {
    let table = "CHECK                 STATUS  DETAIL\nkernel                ok      6.1.0\ntracepoint sock:x     FAIL    missing here\nnetlens cannot run here: fix the FAIL rows.\n";
    let report = parse_check(None, Some(table), false, "exit 1".into());
    assert!(!report.json);
    assert_eq!(report.failed_checks, vec![("tracepoint sock:x".to_string(), "missing here".to_string())]);
}

#[test]
fn cells_name_the_kind_of_hook() {
    assert_eq!(hook_kind("fentry tcp_conn_request + fexit tcp_conn_request + fexit tcp_v4_syn_recv_sock").as_deref(), Some("fentry"));
    assert_eq!(hook_kind("kprobe inet_csk_accept + kretprobe inet_csk_accept").as_deref(), Some("kprobe"));
    assert_eq!(hook_kind("raw tracepoint tcp:tcp_probe + tracepoint tcp:tcp_cong_state_set").as_deref(), Some("tp"));
    assert_eq!(hook_kind("tp_btf sock:inet_sock_set_state").as_deref(), Some("tp_btf"));
    assert_eq!(hook_kind("tp_btf tcp:tcp_probe + fentry tcp_data_ready").as_deref(), Some("tp_btf+fentry"));
    assert_eq!(hook_kind(""), None);
    let feature = Feature { name: "accept_queue".into(), status: "ok".into(), hook: "fexit inet_csk_accept".into(), why: String::new() };
    assert_eq!(feature.cell(), "ok (fentry)");
}
