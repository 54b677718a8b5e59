//! Centered overlays: the help screen and the sort-column chooser.

use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, List, ListState, Paragraph};
use ratatui::Frame;

use super::render::bold;
use super::table::TextTable;

/// Keys and what they do, as the help overlay lists them.
pub const HELP: &[(&str, &str)] = &[
    ("e 1", "Endpoints view (remote endpoints and listening ports)"),
    ("c 2", "Connections view"),
    ("p 3", "Processes view"),
    ("s F6", "choose sort column"),
    ("< >", "sort by previous / next column"),
    ("r", "reverse sort order"),
    ("/ F4", "filter: address, port, endpoint, comm (Enter applies, Esc clears)"),
    ("space", "pause / resume the display"),
    ("↑ ↓ PgUp PgDn", "move selection"),
    ("Home End", "first / last row"),
    ("Enter", "toggle detail pane for the selected row"),
    ("Esc", "close detail pane, then clear filter"),
    ("? F1", "this help"),
    ("q F10 Ctrl-C", "quit"),
];

/// A `width` x `height` rectangle centred in `area`, shrunk to fit it.
fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let width = width.min(area.width);
    let height = height.min(area.height);
    Rect { x: area.x + (area.width - width) / 2, y: area.y + (area.height - height) / 2, width, height }
}

pub(super) fn draw_help(frame: &mut Frame, area: Rect) {
    let key_width = HELP.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
    let mut lines: Vec<Line> = HELP
        .iter()
        .map(|(key, what)| Line::from(vec![Span::styled(format!("{key:<key_width$}  "), bold()), Span::raw(*what)]))
        .collect();
    lines.push(Line::raw(""));
    lines.push(Line::styled("Yellow/red values: retransmits, zero-window, HOL p99 > 10ms,", Style::new()));
    lines.push(Line::styled("handshake p99 ≥ 1s (SYN retransmits), netlens lost events.", Style::new()));
    lines.push(Line::styled("Press any key to close.", Style::new().add_modifier(Modifier::DIM)));
    let width = lines.iter().map(Line::width).max().unwrap_or(0) as u16 + 4;
    let popup = centered(area, width, lines.len() as u16 + 2);
    frame.render_widget(Clear, popup);
    frame.render_widget(Paragraph::new(lines).block(Block::bordered().title(Span::styled(" Help ", bold()))), popup);
}

pub(super) fn draw_sort_chooser(frame: &mut Frame, area: Rect, table: &TextTable, cursor: usize) {
    let items: Vec<Line> = (0..table.titles.len()).map(|i| Line::raw(table.title_with_marker(i))).collect();
    let width = items.iter().map(Line::width).max().unwrap_or(0).max(14) as u16 + 4;
    let popup = centered(area, width, items.len() as u16 + 2);
    let list = List::new(items)
        .block(Block::bordered().title(Span::styled(" Sort by ", bold())))
        .highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    let mut state = ListState::default().with_selected(Some(cursor));
    frame.render_widget(Clear, popup);
    frame.render_stateful_widget(list, popup, &mut state);
}
