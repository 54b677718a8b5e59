//! Whole-screen tests: drive `App` with keys, render into ratatui's
//! `TestBackend` and read the text back. Plus batch text/JSON output.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::backend::TestBackend;
use ratatui::Terminal;

use super::app::{App, Control};
use super::batch::{batch_json, batch_text};
use super::model::*;
use super::view::{View, ViewSettings};

fn endpoint(name: &str, kind: EndpointKind, conn_per_s: f64, retransmits_per_s: f64) -> EndpointRow {
    EndpointRow {
        endpoint: name.to_string(),
        kind,
        connections: (conn_per_s * 10.0) as u64,
        conn_per_s,
        short_lived_pct: 100.0 - conn_per_s,
        handshake: Quantiles { p50_us: Some(800.0), p99_us: Some(12_300.0) },
        retransmits_per_s,
        retransmits_per_1k_segs: None,
        hol_stall_p99_us: Some(15_000.0),
        hol_stall_total_us: 40_000,
        zero_window_total_us: 0,
        accept_wait_p99_us: None,
        listen_overflows: 0,
        handshake_bars: vec![Bar { le_us: 1_000, count: 7 }, Bar { le_us: 10_000, count: 2 }],
        hol_stall_bars: vec![Bar { le_us: 16_000, count: 3 }],
    }
}

fn connection(local: &str, remote: &str, comm: &str, age_us: u64) -> ConnectionRow {
    ConnectionRow {
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
        netns: 4026531840,
        pid: Some(4242),
        comm: Some(comm.to_string()),
        age_us: Some(age_us),
        state: "ESTAB".to_string(),
        srtt_us: Some(250),
        cwnd: Some(10),
        retransmits: Some(1),
        hol_stall_us: Some(0),
        bytes_sent: Some(2048),
        bytes_received: None,
    }
}

/// Failures inside the eBPF programs show in the header only when there
/// are some.
#[test]
fn header_shows_bpf_errors_only_when_there_are_some() {
    let mut header = snapshot().header;
    let labels = |header: &Header| {
        super::header::header_lines(header).iter().flat_map(|line| line.fields.iter().map(|f| (f.label, f.value.clone()))).collect::<Vec<_>>()
    };
    assert!(!labels(&header).iter().any(|(label, _)| *label == "bpf errors"));
    header.bpf_errors = 2;
    assert!(labels(&header).contains(&("bpf errors", "2".to_string())), "{:?}", labels(&header));
}

#[test]
fn header_names_the_top_drop_reasons_where_the_kernel_has_them() {
    let mut header = snapshot().header;
    let labels = |header: &Header| {
        super::header::header_lines(header).iter().flat_map(|line| line.fields.iter().map(|f| (f.label, f.value.clone()))).collect::<Vec<_>>()
    };
    assert!(labels(&header).contains(&("top", "tcp_zerowindow 10.0/s".to_string())), "{:?}", labels(&header));
    header.drops_per_s = None;
    header.top_drop_reasons.clear();
    assert!(!labels(&header).iter().any(|(label, _)| *label == "drops"), "no drops field without drop reasons");
}

fn snapshot() -> Snapshot {
    Snapshot {
        header: Header {
            opened_per_s: 5.0,
            closed_per_s: 4.0,
            handshake_active: Quantiles { p50_us: Some(812.0), p99_us: Some(12_300.0) },
            handshake_passive: Quantiles::default(),
            retransmits_per_s: 1.5,
            hol_stalls_per_s: 0.5,
            hol_stall_p99_us: Some(15_000.0),
            zero_window_stalls_per_s: 0.0,
            time_wait: Some(42),
            events_lost: 3,
            bpf_errors: 0,
            drops_per_s: Some(12.0),
            top_drop_reasons: vec![DropRate { reason: "tcp_zerowindow".into(), per_s: 10.0 }],
        },
        findings: Vec::new(),
        endpoints: vec![
            endpoint("10.0.0.7:443", EndpointKind::Remote, 12.0, 0.5),
            endpoint("*:8080", EndpointKind::Listener, 30.0, 0.0),
            endpoint("10.0.0.9:5432", EndpointKind::Remote, 3.0, 2.0),
        ],
        connections: vec![
            connection("10.0.0.1:40000", "10.0.0.7:443", "curl", 2_000_000),
            connection("10.0.0.1:8080", "10.0.0.50:51000", "nginx", 90_000_000),
        ],
        connections_total: 2,
        processes: vec![ProcessRow {
            pid: 4242,
            comm: "nginx".to_string(),
            service: Some("nginx.service".to_string()),
            connections: 9,
            conn_per_s: 1.0,
            handshake: Quantiles::default(),
            retransmits_per_s: 0.0,
            hol_stall_total_us: 0,
        }],
    }
}

fn key(code: KeyCode) -> KeyEvent {
    KeyEvent::new(code, KeyModifiers::NONE)
}

fn press(app: &mut App, keys: &str) {
    for c in keys.chars() {
        assert_eq!(app.handle_key(key(KeyCode::Char(c))), Control::Continue, "key {c:?}");
    }
}

fn screen(app: &mut App, width: u16, height: u16) -> Vec<String> {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|frame| app.draw(frame)).unwrap();
    let buffer = terminal.backend().buffer();
    (0..height).map(|y| (0..width).map(|x| buffer[(x, y)].symbol()).collect::<String>()).collect()
}

fn app_with_data() -> App {
    let mut app = App::default();
    app.update(snapshot());
    app
}

/// Screen row on which `needle` first appears.
fn line_of(lines: &[String], needle: &str) -> Option<usize> {
    lines.iter().position(|l| l.contains(needle))
}

fn text(lines: &[String]) -> String {
    lines.join("\n")
}

#[test]
fn header_shows_rates_and_counts() {
    let lines = screen(&mut app_with_data(), 120, 30);
    let all = text(&lines);
    for expected in ["opened 5.0/s", "closed 4.0/s", "TIME_WAIT 42", "lost events 3", "active p50 812µs", "p99 12.30ms"]
    {
        assert!(all.contains(expected), "missing {expected:?} in\n{all}");
    }
    assert!(all.contains("retrans 1.5/s") && all.contains("HOL 0.5/s") && all.contains("p99 15.00ms"), "{all}");
    assert!(all.contains("passive p50 -"), "{all}");
}

#[test]
fn endpoints_sorted_by_conn_rate_then_reversed_then_next_column() {
    let mut app = app_with_data();
    let lines = screen(&mut app, 140, 30);
    let order = |lines: &[String]| ["*:8080", "10.0.0.7:443", "10.0.0.9:5432"].map(|e| line_of(lines, e).unwrap());
    let [listener, https, postgres] = order(&lines);
    assert!(listener < https && https < postgres, "\n{}", text(&lines));
    assert!(text(&lines).contains("CONN/S▼"));

    press(&mut app, "r");
    let lines = screen(&mut app, 140, 30);
    let [listener, https, postgres] = order(&lines);
    assert!(postgres < https && https < listener, "\n{}", text(&lines));
    assert!(text(&lines).contains("CONN/S▲"));

    // `>` moves to SHORT% (100 - conn/s here) in its natural direction.
    press(&mut app, ">");
    let lines = screen(&mut app, 140, 30);
    assert!(text(&lines).contains("SHORT%▼") && !text(&lines).contains("CONN/S▼"));
    let [listener, https, postgres] = order(&lines);
    assert!(postgres < https && https < listener, "\n{}", text(&lines));
}

#[test]
fn sort_chooser_picks_a_column_and_esc_cancels() {
    let mut app = app_with_data();
    press(&mut app, "s");
    assert!(text(&screen(&mut app, 120, 30)).contains("Sort by"));
    app.handle_key(key(KeyCode::Down)); // CONN/S -> SHORT%
    app.handle_key(key(KeyCode::Enter));
    assert!(text(&screen(&mut app, 120, 30)).contains("sort SHORT%▼"));

    app.handle_key(key(KeyCode::F(6)));
    app.handle_key(key(KeyCode::Home));
    app.handle_key(key(KeyCode::Esc));
    let all = text(&screen(&mut app, 120, 30));
    assert!(all.contains("sort SHORT%▼") && !all.contains("Sort by"), "{all}");
}

#[test]
fn filter_prompt_applies_on_enter_and_esc_clears() {
    let mut app = app_with_data();
    press(&mut app, "/8080");
    assert!(text(&screen(&mut app, 120, 30)).contains("Filter: 8080"));
    app.handle_key(key(KeyCode::Enter));
    let all = text(&screen(&mut app, 120, 30));
    assert!(all.contains("*:8080") && all.contains("filter \"8080\""), "{all}");
    assert!(!all.contains("10.0.0.7:443") && !all.contains("10.0.0.9:5432"), "{all}");

    press(&mut app, "/");
    app.handle_key(key(KeyCode::Esc));
    assert!(text(&screen(&mut app, 120, 30)).contains("10.0.0.7:443"));
}

#[test]
fn keys_switch_views() {
    let mut app = app_with_data();
    press(&mut app, "c");
    let all = text(&screen(&mut app, 140, 30));
    assert!(all.contains("LOCAL") && all.contains("10.0.0.50:51000") && all.contains("4242/nginx"), "{all}");
    // Oldest connection first by default.
    let lines = screen(&mut app, 140, 30);
    assert!(line_of(&lines, "nginx").unwrap() < line_of(&lines, "curl").unwrap());
    press(&mut app, "3");
    assert!(text(&screen(&mut app, 140, 30)).contains("COMM"));
    press(&mut app, "e");
    assert_eq!(app.settings.view, View::Endpoints);
}

#[test]
fn help_opens_and_any_key_closes_it() {
    let mut app = app_with_data();
    press(&mut app, "?");
    assert!(text(&screen(&mut app, 100, 30)).contains("reverse sort order"));
    // `q` closes help rather than quitting.
    press(&mut app, "q");
    assert!(!text(&screen(&mut app, 100, 30)).contains("reverse sort order"));
}

#[test]
fn enter_opens_detail_pane_with_bars() {
    let mut app = app_with_data();
    app.handle_key(key(KeyCode::Down)); // second row: 10.0.0.7:443
    app.handle_key(key(KeyCode::Enter));
    let all = text(&screen(&mut app, 120, 40));
    for expected in ["10.0.0.7:443 (remote)", "handshake", "HOL stalls", "≤1ms", "≤10ms", "≤16ms"] {
        assert!(all.contains(expected), "missing {expected:?} in\n{all}");
    }
    app.handle_key(key(KeyCode::Esc));
    assert!(!text(&screen(&mut app, 120, 40)).contains("HOL stalls"));

    // Connections show their fields, including ones the table had to drop.
    press(&mut app, "c");
    app.handle_key(key(KeyCode::Enter));
    let all = text(&screen(&mut app, 60, 40));
    assert!(all.contains("RECV") && all.contains("2.0K"), "{all}");
    assert!(all.contains("10.0.0.1:8080 → 10.0.0.50:51000"), "{all}");
}

#[test]
fn selection_follows_its_row_across_refreshes() {
    let mut app = app_with_data();
    app.handle_key(key(KeyCode::Down));
    screen(&mut app, 120, 30);
    assert_eq!(app.selection().id.as_deref(), Some("remote/10.0.0.7:443"));
    let mut busier = snapshot();
    busier.endpoints[0].conn_per_s = 99.0; // 10.0.0.7:443 moves to the top
    app.update(busier);
    let lines = screen(&mut app, 120, 30);
    assert_eq!(app.selection().index, 0);
    assert!(line_of(&lines, "10.0.0.7:443").unwrap() < line_of(&lines, "*:8080").unwrap());
}

#[test]
fn pause_freezes_the_display() {
    let mut app = app_with_data();
    press(&mut app, " ");
    let mut changed = snapshot();
    changed.header.opened_per_s = 77.0;
    app.update(changed);
    let all = text(&screen(&mut app, 120, 30));
    assert!(all.contains("PAUSED") && all.contains("opened 5.0/s"), "{all}");
    press(&mut app, " ");
    let all = text(&screen(&mut app, 120, 30));
    assert!(!all.contains("PAUSED") && all.contains("opened 77.0/s"), "{all}");
}

#[test]
fn quit_keys() {
    let mut app = app_with_data();
    press(&mut app, "/q"); // typed into the prompt, not a quit
    assert_eq!(app.handle_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)), Control::Quit);
    assert_eq!(app_with_data().handle_key(key(KeyCode::Char('q'))), Control::Quit);
    assert_eq!(app_with_data().handle_key(key(KeyCode::Esc)), Control::Continue);
}

#[test]
fn tiny_and_narrow_terminals_do_not_panic() {
    let mut app = app_with_data();
    let lines = screen(&mut app, 20, 5);
    assert!(text(&lines).contains("*:8080"), "{}", text(&lines));
    // Narrow: right-most columns dropped, the first ones intact.
    let lines = screen(&mut app, 40, 12);
    assert!(text(&lines).contains("ENDPOINT") && !text(&lines).contains("ZWIN"));

    let setups: [&dyn Fn(&mut App); 5] = [
        &|_| {},
        &|a| {
            a.handle_key(key(KeyCode::Enter));
        },
        &|a| press(a, "?"),
        &|a| press(a, "s"),
        &|a| press(a, "c/x"),
    ];
    for setup in setups {
        let mut app = app_with_data();
        setup(&mut app);
        for width in 0..=45 {
            for height in 0..=16 {
                screen(&mut app, width, height);
            }
        }
    }
}

#[test]
fn batch_text_is_plain_aligned_and_ordered() {
    let settings = ViewSettings::default();
    let out = batch_text(&settings, &snapshot(), 0);
    assert!(!out.contains('\x1b'));
    assert!(out.contains("opened 5.0/s") && out.contains("Endpoints: 3 of 3 rows, sorted by CONN/S▼"), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    let header = line_of_str(&lines, "ENDPOINT");
    let order = ["*:8080", "10.0.0.7:443", "10.0.0.9:5432"].map(|e| line_of_str(&lines, e));
    assert!(header < order[0] && order[0] < order[1] && order[1] < order[2], "{out}");
    // Right-aligned numbers end in the same column as their title.
    let char_end = |line: &str, needle: &str| line[..line.find(needle).unwrap() + needle.len()].chars().count();
    assert_eq!(char_end(lines[header], "CONN/S▼"), char_end(lines[order[0]], "30.0"), "{out}");

    let narrow = batch_text(&settings, &snapshot(), 50);
    assert!(narrow.lines().all(|l| l.chars().count() <= 50), "{narrow}");
    assert!(narrow.contains("ENDPOINT") && !narrow.contains("ZWIN TOT"), "{narrow}");
}

fn line_of_str(lines: &[&str], needle: &str) -> usize {
    lines.iter().position(|l| l.contains(needle)).unwrap()
}

#[test]
fn batch_json_is_one_parseable_line_in_view_order() {
    assert!(!batch_json(&ViewSettings::default(), &snapshot()).contains("connections_total"), "Connections view only");
    let mut settings = ViewSettings::default();
    let line = batch_json(&settings, &snapshot());
    assert!(!line.contains('\n'));
    let doc: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(doc["view"], "endpoints");
    assert_eq!(doc["header"]["time_wait"], 42);
    let rows: Vec<&str> = doc["rows"].as_array().unwrap().iter().map(|r| r["endpoint"].as_str().unwrap()).collect();
    assert_eq!(rows, ["*:8080", "10.0.0.7:443", "10.0.0.9:5432"]);

    settings.view = View::Connections;
    settings.filter = "CURL".to_string();
    let doc: serde_json::Value = serde_json::from_str(&batch_json(&settings, &snapshot())).unwrap();
    assert_eq!(doc["view"], "connections");
    assert_eq!(doc["rows"].as_array().unwrap().len(), 1);
    assert_eq!(doc["rows"][0]["remote"], "10.0.0.7:443");
    assert_eq!(doc["connections_total"], 2);

    settings.sort_by_title("retr").unwrap();
    assert!(settings.sort_by_title("nope").unwrap_err().contains("LOCAL"));
}

fn finding(severity: &str, name: &str, endpoint: &str) -> FindingRow {
    FindingRow {
        severity: severity.to_string(),
        finding: name.to_string(),
        endpoint: endpoint.to_string(),
        summary: format!("{name} summary with numbers"),
        evidence: "conn_per_s=120".to_string(),
        advice: "reuse connections".to_string(),
    }
}

#[test]
fn findings_line_and_view() {
    let mut app = app_with_data();
    let all = text(&screen(&mut app, 140, 30));
    assert!(all.contains("Findings  none"), "{all}");
    let mut with_findings = snapshot();
    with_findings.findings =
        vec![finding("warning", "connection_churn", "10.0.0.7:443"), finding("critical", "syn_loss", "10.0.0.9:5432")];
    app.update(with_findings.clone());
    let lines = screen(&mut app, 140, 30);
    let line = line_of(&lines, "Findings").map(|i| lines[i].clone()).unwrap_or_default();
    assert!(line.contains("connection_churn 10.0.0.7:443") && line.contains("syn_loss 10.0.0.9:5432"), "{}", text(&lines));
    press(&mut app, "f");
    assert_eq!(app.settings.view, View::Findings);
    let lines = screen(&mut app, 140, 30);
    // Most severe first.
    let critical = lines.iter().rposition(|l| l.contains("syn_loss summary")).unwrap();
    let warning = lines.iter().rposition(|l| l.contains("connection_churn summary")).unwrap();
    assert!(critical < warning, "{}", text(&lines));
    assert!(text(&lines).contains("SEVERITY"));
    let mut settings = ViewSettings::default();
    settings.view = View::Findings;
    let batch = batch_text(&settings, &with_findings, 0);
    assert!(batch.contains("Findings  syn_loss 10.0.0.9:5432") || batch.contains("syn_loss 10.0.0.9:5432"), "{batch}");
    let json: serde_json::Value = serde_json::from_str(&batch_json(&settings, &with_findings)).unwrap();
    assert_eq!(json["view"], "findings");
    assert_eq!(json["rows"][0]["finding"], "syn_loss");
}

/// A capped connection list says so, in batch text and on the status line.
#[test]
fn a_capped_connection_list_says_so() {
    let settings = ViewSettings { view: View::Connections, ..ViewSettings::default() };
    let mut capped = snapshot();
    assert!(!batch_text(&settings, &capped, 0).contains("connections,"), "not capped: no note");
    capped.connections_total = 15_301;
    let text = batch_text(&settings, &capped, 0);
    assert!(text.contains("Connections: 2 of 2 rows, sorted by AGE▼, first 2 of 15301 connections"), "{text}");
    let endpoints = ViewSettings::default();
    assert!(!batch_text(&endpoints, &capped, 0).contains("15301"));
}
