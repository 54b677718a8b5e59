//! Drawing the main screen: summary header, view/status line, table and the
//! htop-style key bar. Overlays live in `popup.rs`, the detail pane in
//! `detail.rs`.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Paragraph, Row, Table, TableState};
use ratatui::Frame;

use super::app::{App, Mode};
use super::header::{findings_line, header_lines, TOPIC_WIDTH};
use super::model::{FindingRow, Header};
use super::table::{columns_that_fit, Align, Severity, TextTable};
use super::view::View;
use super::{detail, popup};

const COLUMN_SPACING: u16 = 1;
/// Rows the table keeps before the summary header is given any: in a tiny
/// terminal the rows matter more than the totals.
const MIN_TABLE_ROWS: u16 = 3;

pub(super) fn severity_style(severity: Severity) -> Style {
    match severity {
        Severity::Normal => Style::new(),
        Severity::Warn => Style::new().fg(Color::Yellow),
        Severity::Bad => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
    }
}

pub(super) fn bold() -> Style {
    Style::new().add_modifier(Modifier::BOLD)
}

pub(super) fn aligned(text: String, align: Align) -> Line<'static> {
    match align {
        Align::Left => Line::from(text),
        Align::Right => Line::from(text).right_aligned(),
    }
}

impl App {
    /// Draw the whole screen into `frame`; call from `Terminal::draw`.
    pub fn draw(&mut self, frame: &mut Frame) {
        let area = frame.area();
        let table = self.settings.table(&self.shown);
        // Adopt whatever row the selection resolves to, so a vanished row
        // hands the highlight to its neighbour instead of jumping back later.
        let selected = self.selection().resolve(&table);
        if let Some(index) = selected {
            self.selection_mut().set(&table, index);
        }

        let footer_h = u16::from(area.height >= 2);
        let status_h = u16::from(area.height >= 3);
        let header_h = 4.min(area.height.saturating_sub(footer_h + status_h + MIN_TABLE_ROWS));
        let [header_area, status_area, body_area, footer_area] = Layout::vertical([
            Constraint::Length(header_h),
            Constraint::Length(status_h),
            Constraint::Min(0),
            Constraint::Length(footer_h),
        ])
        .areas(area);

        draw_header(frame, header_area, &self.shown.header, &self.shown.findings);
        self.draw_status(frame, status_area, &table);
        self.draw_footer(frame, footer_area);

        let (table_area, detail_area) = match selected {
            Some(_) if self.detail_open => split_for_detail(body_area, detail::height(self.settings.view)),
            _ => (body_area, None),
        };
        let view = self.settings.view.index();
        self.page_rows = draw_table(frame, table_area, &table, selected, &mut self.table_states[view]);
        if let (Some(area), Some(index)) = (detail_area, selected) {
            detail::draw(frame, area, self.settings.view, &self.shown, &table, index);
        }

        match &self.mode {
            Mode::Help => popup::draw_help(frame, area),
            Mode::SortChooser { cursor } => popup::draw_sort_chooser(frame, area, &table, *cursor),
            Mode::Normal | Mode::Filter { .. } => {}
        }
    }

    fn draw_status(&self, frame: &mut Frame, area: Rect, table: &TextTable) {
        let mut spans = Vec::new();
        for view in View::ALL {
            let style = if view == self.settings.view {
                bold().add_modifier(Modifier::REVERSED)
            } else {
                Style::new().add_modifier(Modifier::DIM)
            };
            spans.push(Span::styled(format!(" {} ", view.title()), style));
        }
        spans.push(Span::raw(format!("  sort {}", table.title_with_marker(table.sort_column))));
        spans.push(Span::raw(format!("  rows {}/{}", table.rows.len(), table.total_rows)));
        if let Some(note) = super::view::capped_note(self.settings.view, self.displayed()) {
            spans.push(Span::styled(format!("  {note}"), Style::new().fg(Color::Yellow)));
        }
        if !self.settings.filter.is_empty() {
            spans.push(Span::raw("  "));
            spans.push(Span::styled(format!("filter \"{}\"", self.settings.filter), Style::new().fg(Color::Yellow)));
        }
        if self.paused {
            spans.push(Span::raw("  "));
            spans.push(Span::styled(" PAUSED ", bold().fg(Color::Black).bg(Color::Yellow)));
        }
        frame.render_widget(Paragraph::new(Line::from(spans)), area);
    }

    fn draw_footer(&self, frame: &mut Frame, area: Rect) {
        let line = match &self.mode {
            Mode::Filter { draft } => Line::from(vec![
                Span::styled("Filter: ", bold()),
                Span::raw(draft.clone()),
                Span::styled("█", Style::new().add_modifier(Modifier::SLOW_BLINK)),
                Span::styled("   Enter apply  Esc clear", Style::new().add_modifier(Modifier::DIM)),
            ]),
            _ => key_bar(self.paused),
        };
        frame.render_widget(Paragraph::new(line), area);
    }
}

/// htop's F-key bar: key in the terminal's colours, action on cyan.
fn key_bar(paused: bool) -> Line<'static> {
    let keys = [
        ("F1", "Help"),
        ("e", "Endpts"),
        ("c", "Conns"),
        ("p", "Procs"),
        ("f", "Finds"),
        ("F6", "Sort"),
        ("<>", "Col"),
        ("r", "Rev"),
        ("/", "Filter"),
        ("Spc", if paused { "Resume" } else { "Pause" }),
        ("Enter", "Detail"),
        ("q", "Quit"),
    ];
    let label = Style::new().fg(Color::Black).bg(Color::Cyan);
    let spans: Vec<Span<'static>> = keys
        .into_iter()
        .flat_map(|(key, action)| [Span::styled(key, bold()), Span::styled(format!("{action} "), label)])
        .collect();
    Line::from(spans)
}

fn draw_header(frame: &mut Frame, area: Rect, header: &Header, findings: &[FindingRow]) {
    let lines: Vec<Line> = header_lines(header)
        .into_iter()
        .chain([findings_line(findings)])
        .map(|line| {
            let mut spans = vec![Span::styled(format!("{:<TOPIC_WIDTH$}", line.topic), bold())];
            for (i, field) in line.fields.into_iter().enumerate() {
                if i > 0 {
                    spans.push(Span::raw("  "));
                }
                if !field.label.is_empty() {
                    spans.push(Span::styled(field.label, bold().add_modifier(Modifier::DIM)));
                    spans.push(Span::raw(" "));
                }
                spans.push(Span::styled(field.value, severity_style(field.severity)));
            }
            Line::from(spans)
        })
        .collect();
    frame.render_widget(Paragraph::new(lines), area);
}

/// Splits the body into table and detail pane; the table keeps a few rows
/// and the pane is dropped when there is no room for it at all.
fn split_for_detail(area: Rect, wanted: u16) -> (Rect, Option<Rect>) {
    let height = wanted.min(area.height.saturating_sub(MIN_TABLE_ROWS + 1));
    if height < 3 {
        return (area, None);
    }
    let [table, detail] = Layout::vertical([Constraint::Min(0), Constraint::Length(height)]).areas(area);
    (table, Some(detail))
}

/// Draws `table` with as many columns as fit; returns the body height.
fn draw_table(
    frame: &mut Frame,
    area: Rect,
    table: &TextTable,
    selected: Option<usize>,
    state: &mut TableState,
) -> usize {
    if area.height == 0 || area.width == 0 {
        return 0;
    }
    let shown = columns_that_fit(&table.widths, area.width as usize, COLUMN_SPACING as usize);
    let header_style = bold().fg(Color::Black).bg(Color::Green);
    let header = Row::new((0..shown).map(|i| {
        let style = if i == table.sort_column { header_style.bg(Color::Cyan) } else { header_style };
        Cell::from(aligned(table.title_with_marker(i), table.aligns[i])).style(style)
    }))
    .style(header_style);
    let rows =
        table.rows.iter().map(|row| {
            Row::new(row.cells.iter().zip(&table.aligns).take(shown).map(|(cell, &align)| {
                Cell::from(aligned(cell.text.clone(), align)).style(severity_style(cell.severity))
            }))
        });
    let widths = table.widths.iter().take(shown).map(|&w| Constraint::Length(w));
    let widget = Table::new(rows, widths)
        .header(header)
        .column_spacing(COLUMN_SPACING)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    state.select(selected);
    frame.render_stateful_widget(widget, area, state);

    if table.rows.is_empty() && area.height > 1 {
        let message = if table.total_rows == 0 { "no data yet" } else { "no rows match the filter (Esc clears)" };
        let line_area = Rect { y: area.y + 1, height: 1, ..area };
        frame.render_widget(Paragraph::new(message).style(Style::new().add_modifier(Modifier::DIM)), line_area);
    }
    area.height.saturating_sub(1) as usize
}
