//! `netlens top --batch`: one snapshot as plain text (like `top -b`) or as a
//! single JSON line, with the same view, sort and filter as the TUI.

use serde::Serialize;

use super::header::{findings_line, header_lines, plain_lines};
use super::model::{Header, Snapshot};
use super::table::{columns_that_fit, pad, visible_rows, TableRow};
use super::view::{capped_note, View, ViewSettings};

/// The summary header and the current view's table as aligned plain text,
/// ending in a newline. Columns are as wide as their content; right-most
/// columns that would exceed `width` are dropped (0 = no limit).
pub fn batch_text(settings: &ViewSettings, snapshot: &Snapshot, width: usize) -> String {
    let mut out = String::new();
    for line in header_lines(&snapshot.header).into_iter().chain([findings_line(&snapshot.findings)]) {
        for text in plain_lines(&line, width) {
            out.push_str(&text);
            out.push('\n');
        }
    }

    let table = settings.table(snapshot);
    let mut status = format!(
        "{}: {} of {} rows, sorted by {}",
        settings.view.title(),
        table.rows.len(),
        table.total_rows,
        table.title_with_marker(table.sort_column)
    );
    if !settings.filter.is_empty() {
        status.push_str(&format!(", filter \"{}\"", settings.filter));
    }
    if let Some(note) = capped_note(settings.view, snapshot) {
        status.push_str(&format!(", {note}"));
    }
    out.push('\n');
    out.push_str(&status);
    out.push_str("\n\n");

    let titles: Vec<String> = (0..table.titles.len()).map(|i| table.title_with_marker(i)).collect();
    let widths: Vec<usize> = titles
        .iter()
        .enumerate()
        .map(|(i, title)| {
            let cells = table.rows.iter().map(|r| r.cells[i].text.chars().count());
            cells.chain([title.chars().count()]).max().unwrap_or(0)
        })
        .collect();
    let widths_u16: Vec<u16> = widths.iter().map(|&w| w.min(u16::MAX as usize) as u16).collect();
    let shown = if width == 0 { widths.len() } else { columns_that_fit(&widths_u16, width, 1) };
    let line = |cells: &mut dyn Iterator<Item = &str>| -> String {
        let padded: Vec<String> =
            cells.zip(&widths).zip(&table.aligns).take(shown).map(|((text, &w), &align)| pad(text, w, align)).collect();
        let mut line = padded.join(" ").trim_end().to_string();
        line.push('\n');
        line
    };
    out.push_str(&line(&mut titles.iter().map(String::as_str)));
    for row in &table.rows {
        out.push_str(&line(&mut row.cells.iter().map(|c| c.text.as_str())));
    }
    out
}

#[derive(Serialize)]
struct BatchJson<'a, R: Serialize> {
    view: &'static str,
    header: &'a Header,
    rows: Vec<&'a R>,
    /// Connections view: how many connections the kernel holds (more than
    /// the rows when the list was capped).
    #[serde(skip_serializing_if = "Option::is_none")]
    connections_total: Option<u64>,
}

fn to_json<R: TableRow + Serialize>(settings: &ViewSettings, snapshot: &Snapshot, rows: &[R]) -> String {
    let doc = BatchJson {
        view: settings.view.name(),
        header: &snapshot.header,
        rows: visible_rows(rows, settings.sort(), &settings.filter),
        connections_total: (settings.view == View::Connections).then_some(snapshot.connections_total),
    };
    // Plain data with string keys cannot fail to serialize; still, never
    // panic in an output path.
    serde_json::to_string(&doc).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }).to_string())
}

/// One line of JSON (no trailing newline): `{"view", "header", "rows"}` with
/// the current view's rows in the current order and filter (and
/// `connections_total` in the Connections view).
pub fn batch_json(settings: &ViewSettings, snapshot: &Snapshot) -> String {
    match settings.view {
        View::Endpoints => to_json(settings, snapshot, &snapshot.endpoints),
        View::Connections => to_json(settings, snapshot, &snapshot.connections),
        View::Processes => to_json(settings, snapshot, &snapshot.processes),
        View::Findings => to_json(settings, snapshot, &snapshot.findings),
    }
}
