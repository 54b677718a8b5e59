//! The Enter pane under the table: every field of the selected row, and for
//! an endpoint its handshake and HOL-stall distributions as bar charts.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Bar as ChartBar, BarChart, Block, Clear, Paragraph};
use ratatui::Frame;

use super::columns::kind_name;
use super::format;
use super::model::{Bar, FindingRow, Snapshot};
use super::render::{bold, severity_style};
use super::table::{TableRow, TextTable};
use super::view::View;

/// Rows the pane asks for: endpoints list 12 fields beside their charts,
/// the other views lay their fields out in two columns.
pub(super) fn height(view: View) -> u16 {
    let fields = view.column_titles().len() as u16;
    match view {
        View::Endpoints => fields + 2,
        View::Connections | View::Processes => fields.div_ceil(2) + 2,
        // Severity, finding, endpoint, then summary, evidence and advice
        // each on its own wrapped lines.
        View::Findings => 12,
    }
}

/// A finding in full: its summary, evidence and advice, wrapped.
fn draw_finding(frame: &mut Frame, area: Rect, finding: &FindingRow) {
    let title = format!(" {} {} on {} ", finding.severity, finding.finding, finding.endpoint);
    let block = Block::bordered().title(Span::styled(title, bold()));
    let lines = vec![
        Line::from(finding.summary.clone()),
        Line::from(vec![Span::styled("evidence ", bold()), Span::raw(finding.evidence.clone())]),
        Line::from(vec![Span::styled("advice ", bold()), Span::raw(finding.advice.clone())]),
    ];
    frame.render_widget(Paragraph::new(lines).block(block).wrap(ratatui::widgets::Wrap { trim: true }), area);
}

pub(super) fn draw(frame: &mut Frame, area: Rect, view: View, snapshot: &Snapshot, table: &TextTable, row: usize) {
    let Some(text_row) = table.rows.get(row) else {
        return;
    };
    frame.render_widget(Clear, area);
    let fields = field_lines(table, row);
    let endpoint = match view {
        View::Endpoints => snapshot.endpoints.iter().find(|e| e.identity() == text_row.id),
        View::Connections | View::Processes | View::Findings => None,
    };
    if view == View::Findings {
        if let Some(finding) = snapshot.findings.iter().find(|f| f.identity() == text_row.id) {
            draw_finding(frame, area, finding);
        }
        return;
    }
    let Some(endpoint) = endpoint else {
        // LOCAL and REMOTE, or PID and COMM: what the row is about.
        let cell = |i: usize| text_row.cells.get(i).map_or("", |c| c.text.as_str());
        let title = match view {
            View::Connections => format!(" {} → {} ", cell(0), cell(1)),
            _ => format!(" {} {} ", cell(0), cell(1)),
        };
        let block = Block::bordered().title(Span::styled(title, bold()));
        let inner = block.inner(area);
        frame.render_widget(block, area);
        let mut left = fields;
        let right = left.split_off(left.len().div_ceil(2));
        let [left_area, right_area] = Layout::horizontal([Constraint::Fill(1); 2]).areas(inner);
        frame.render_widget(Paragraph::new(left), left_area);
        frame.render_widget(Paragraph::new(right), right_area);
        return;
    };

    let title = format!(" {} ({}) ", endpoint.endpoint, kind_name(endpoint.kind));
    let block = Block::bordered().title(Span::styled(title, bold()));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let [fields_area, handshake_area, hol_area] =
        Layout::horizontal([Constraint::Length(24), Constraint::Fill(1), Constraint::Fill(1)]).areas(inner);
    frame.render_widget(Paragraph::new(fields), fields_area);
    draw_bars(frame, handshake_area, " handshake ", &endpoint.handshake_bars);
    draw_bars(frame, hol_area, " HOL stalls ", &endpoint.hol_stall_bars);
}

/// "TITLE     value" for every column, including those too wide to show.
fn field_lines(table: &TextTable, row: usize) -> Vec<Line<'static>> {
    let Some(text_row) = table.rows.get(row) else {
        return Vec::new();
    };
    table
        .titles
        .iter()
        .zip(&text_row.cells)
        .map(|(title, cell)| {
            Line::from(vec![
                Span::styled(format!("{title:<10}"), bold()),
                Span::styled(cell.text.clone(), severity_style(cell.severity)),
            ])
        })
        .collect()
}

fn draw_bars(frame: &mut Frame, area: Rect, title: &'static str, bars: &[Bar]) {
    let block = Block::bordered().title(title);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let labelled = |b: &Bar| (format::bucket_label(b.le_us), compact_count(b.count));
    let widest = trim_zeros(bars)
        .iter()
        .map(|b| {
            let (label, value) = labelled(b);
            label.chars().count().max(value.len())
        })
        .max();
    let Some(bar_width) = widest else {
        frame.render_widget(Paragraph::new("no samples"), inner);
        return;
    };
    let bar_width = bar_width.max(3) as u16;
    let fitting = (inner.width as usize + 1) / (bar_width as usize + 1);
    let chart_bars: Vec<ChartBar> = fit_bars(bars, fitting)
        .iter()
        .map(|b| {
            let (label, value) = labelled(b);
            ChartBar::with_label(label, b.count).text_value(value)
        })
        .collect();
    let chart = BarChart::new(chart_bars)
        .bar_width(bar_width)
        .bar_gap(1)
        .bar_style(Style::new().fg(Color::Cyan))
        .value_style(Style::new().fg(Color::Black).bg(Color::Cyan));
    frame.render_widget(chart, inner);
}

/// "12", "4k", "1.2M": counts inside a bar a few cells wide.
fn compact_count(count: u64) -> String {
    match count {
        0..=9_999 => count.to_string(),
        10_000..=999_999 => format!("{}k", count / 1_000),
        _ => format!("{:.1}M", count as f64 / 1e6),
    }
}

/// The bars from the first to the last non-empty one.
fn trim_zeros(bars: &[Bar]) -> &[Bar] {
    let Some(first) = bars.iter().position(|b| b.count > 0) else {
        return &[];
    };
    let last = bars.iter().rposition(|b| b.count > 0).unwrap_or(first);
    &bars[first..=last]
}

/// At most `max` bars: empty ends trimmed, then the lowest buckets merged
/// into one. The merged bar keeps the "≤ bound" meaning exactly (it counts
/// everything up to the bound of its last member) and the tail, which is
/// what an incident is about, is never cut off.
pub(super) fn fit_bars(bars: &[Bar], max: usize) -> Vec<Bar> {
    let trimmed = trim_zeros(bars);
    if max == 0 {
        return Vec::new();
    }
    if trimmed.len() <= max {
        return trimmed.to_vec();
    }
    let merged_len = trimmed.len() - max + 1;
    let (low, rest) = trimmed.split_at(merged_len);
    let merged = Bar { le_us: low[low.len() - 1].le_us, count: low.iter().map(|b| b.count).sum() };
    std::iter::once(merged).chain(rest.iter().copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bar(le_us: u64, count: u64) -> Bar {
        Bar { le_us, count }
    }

    #[test]
    fn fit_bars_trims_and_merges_low_buckets() {
        let bars = [bar(100, 0), bar(1_000, 3), bar(10_000, 5), bar(100_000, 0), bar(1_000_000, 2), bar(10_000_000, 0)];
        assert_eq!(fit_bars(&bars, 10), vec![bar(1_000, 3), bar(10_000, 5), bar(100_000, 0), bar(1_000_000, 2)]);
        assert_eq!(fit_bars(&bars, 2), vec![bar(100_000, 8), bar(1_000_000, 2)]);
        assert_eq!(fit_bars(&bars, 0), vec![]);
        assert_eq!(fit_bars(&[bar(1, 0)], 3), vec![]);
    }
}
