//! One table abstraction shared by the three views, the TUI and batch mode.
//!
//! A view is a row type implementing [`TableRow`]: a static list of
//! [`Column`]s (title, width, alignment, cell formatter, sort key, trouble
//! rule) plus a filter match and a stable identity. [`visible_rows`] is the
//! single place rows are filtered and ordered; [`TextTable`] is the formatted
//! result both the TUI and the plain-text batch output draw.

use std::cmp::Ordering;
use std::net::SocketAddr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// How alarming a value is; the TUI maps it to a colour, batch text ignores it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    #[default]
    Normal,
    Warn,
    Bad,
}

/// What a column sorts by. Columns never mix variants; `None` (no value)
/// is expressed by the key function returning `None` and always sorts last.
#[derive(Clone, Debug, PartialEq)]
pub enum SortKey {
    Num(f64),
    Text(String),
    /// Numeric address order (10.0.0.9 before 10.0.0.10), then port.
    Addr(SocketAddr),
}

impl SortKey {
    /// A numeric key; NaN counts as "no value" so it cannot scramble the order.
    pub fn num(value: Option<f64>) -> Option<SortKey> {
        value.filter(|v| !v.is_nan()).map(SortKey::Num)
    }

    fn cmp_same_kind(&self, other: &SortKey) -> Ordering {
        match (self, other) {
            (SortKey::Num(a), SortKey::Num(b)) => a.total_cmp(b),
            (SortKey::Text(a), SortKey::Text(b)) => a.cmp(b),
            (SortKey::Addr(a), SortKey::Addr(b)) => a.cmp(b),
            // Only reachable if a key function mixes kinds; keep it total.
            _ => self.rank().cmp(&other.rank()),
        }
    }

    fn rank(&self) -> u8 {
        match self {
            SortKey::Addr(_) => 0,
            SortKey::Num(_) => 1,
            SortKey::Text(_) => 2,
        }
    }
}

/// One column of a view. Plain fn pointers so the column lists are statics.
pub struct Column<R> {
    pub title: &'static str,
    pub width: u16,
    pub align: Align,
    /// Direction a fresh sort on this column starts in: numbers worst/biggest
    /// first, names alphabetically.
    pub descending_first: bool,
    pub cell: fn(&R) -> String,
    pub key: fn(&R) -> Option<SortKey>,
    pub severity: fn(&R) -> Severity,
}

fn normal<R>(_: &R) -> Severity {
    Severity::Normal
}

impl<R> Column<R> {
    /// Right-aligned, sorts descending first.
    pub const fn num(title: &'static str, width: u16, cell: fn(&R) -> String, key: fn(&R) -> Option<SortKey>) -> Self {
        Column { title, width, align: Align::Right, descending_first: true, cell, key, severity: normal::<R> }
    }

    /// Left-aligned, sorts ascending first.
    pub const fn text(title: &'static str, width: u16, cell: fn(&R) -> String, key: fn(&R) -> Option<SortKey>) -> Self {
        Column { title, width, align: Align::Left, descending_first: false, cell, key, severity: normal::<R> }
    }

    pub const fn ascending_first(mut self) -> Self {
        self.descending_first = false;
        self
    }

    pub const fn trouble(mut self, severity: fn(&R) -> Severity) -> Self {
        self.severity = severity;
        self
    }
}

/// A row type shown as a table.
pub trait TableRow: Sized + 'static {
    fn columns() -> &'static [Column<Self>];
    /// `needle` is already lower-cased and non-empty.
    fn matches(&self, needle: &str) -> bool;
    /// Survives refreshes, so the selection follows the row when it moves.
    fn identity(&self) -> String;
}

/// Sort column (index into the view's columns) and whether the user flipped
/// the column's natural direction with `r`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SortState {
    pub column: usize,
    pub reversed: bool,
}

impl SortState {
    /// Sort by the column titled `title` (case-insensitive) in its natural
    /// direction; `None` if the view has no such column.
    pub fn by_title<R: TableRow>(title: &str) -> Option<SortState> {
        R::columns()
            .iter()
            .position(|c| c.title.eq_ignore_ascii_case(title))
            .map(|column| SortState { column, reversed: false })
    }

    pub fn descending<R: TableRow>(&self) -> bool {
        let natural = R::columns().get(self.column).is_none_or(|c| c.descending_first);
        natural != self.reversed
    }
}

/// Case-insensitive substring test used by the `TableRow::matches` impls.
pub fn contains_ci(haystack: &str, needle_lower: &str) -> bool {
    haystack.to_lowercase().contains(needle_lower)
}

/// The rows of one view that pass `filter`, in sort order. Stable: rows with
/// equal keys keep the aggregator's order. Rows without a value sort last in
/// either direction.
pub fn visible_rows<'a, R: TableRow>(rows: &'a [R], sort: SortState, filter: &str) -> Vec<&'a R> {
    let needle = filter.trim().to_lowercase();
    let mut keyed: Vec<(Option<SortKey>, &R)> = rows
        .iter()
        .filter(|row| needle.is_empty() || row.matches(&needle))
        .map(|row| (R::columns().get(sort.column).and_then(|c| (c.key)(row)), row))
        .collect();
    let descending = sort.descending::<R>();
    keyed.sort_by(|(a, _), (b, _)| match (a, b) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (Some(a), Some(b)) => {
            let order = a.cmp_same_kind(b);
            if descending {
                order.reverse()
            } else {
                order
            }
        }
    });
    keyed.into_iter().map(|(_, row)| row).collect()
}

#[derive(Clone, Debug, PartialEq)]
pub struct TextCell {
    pub text: String,
    pub severity: Severity,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TextRow {
    pub id: String,
    pub cells: Vec<TextCell>,
}

/// A view's visible rows, formatted: what the TUI and batch text render.
#[derive(Clone, Debug, PartialEq)]
pub struct TextTable {
    pub titles: Vec<&'static str>,
    pub widths: Vec<u16>,
    pub aligns: Vec<Align>,
    pub sort_column: usize,
    pub descending: bool,
    pub rows: Vec<TextRow>,
    /// Rows before filtering, for "12/40 rows".
    pub total_rows: usize,
}

impl TextTable {
    pub fn build<R: TableRow>(rows: &[R], sort: SortState, filter: &str) -> TextTable {
        let columns = R::columns();
        let text_rows = visible_rows(rows, sort, filter)
            .into_iter()
            .map(|row| TextRow {
                id: row.identity(),
                cells: columns.iter().map(|c| TextCell { text: (c.cell)(row), severity: (c.severity)(row) }).collect(),
            })
            .collect();
        TextTable {
            titles: columns.iter().map(|c| c.title).collect(),
            widths: columns.iter().map(|c| c.width).collect(),
            aligns: columns.iter().map(|c| c.align).collect(),
            sort_column: sort.column,
            descending: sort.descending::<R>(),
            rows: text_rows,
            total_rows: rows.len(),
        }
    }

    /// Column title with the sort direction marker on the sort column.
    pub fn title_with_marker(&self, column: usize) -> String {
        let title = self.titles.get(column).copied().unwrap_or("");
        if column == self.sort_column {
            format!("{title}{}", if self.descending { "▼" } else { "▲" })
        } else {
            title.to_string()
        }
    }

    pub fn position(&self, id: &str) -> Option<usize> {
        self.rows.iter().position(|r| r.id == id)
    }
}

/// How many leading columns fit in `available` cells with `spacing` between
/// them. Narrow terminals drop right-most columns; at least one is kept (and
/// clipped by the renderer) so the view never goes blank.
pub fn columns_that_fit(widths: &[u16], available: usize, spacing: usize) -> usize {
    let mut used = 0usize;
    let mut count = 0;
    for &width in widths {
        let needed = width as usize + if count == 0 { 0 } else { spacing };
        if used + needed > available {
            break;
        }
        used += needed;
        count += 1;
    }
    count.max(1).min(widths.len())
}

/// Pads `text` to `width` characters per `align` (no truncation).
pub fn pad(text: &str, width: usize, align: Align) -> String {
    match align {
        Align::Left => format!("{text:<width$}"),
        Align::Right => format!("{text:>width$}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Item {
        name: &'static str,
        value: Option<f64>,
    }

    static ITEM_COLUMNS: [Column<Item>; 2] = [
        Column::text("NAME", 6, |r| r.name.to_string(), |r| Some(SortKey::Text(r.name.to_string()))),
        Column::num("VALUE", 6, |r| format!("{:?}", r.value), |r| SortKey::num(r.value)),
    ];

    impl TableRow for Item {
        fn columns() -> &'static [Column<Self>] {
            &ITEM_COLUMNS
        }
        fn matches(&self, needle: &str) -> bool {
            contains_ci(self.name, needle)
        }
        fn identity(&self) -> String {
            self.name.to_string()
        }
    }

    fn names(rows: &[&Item]) -> Vec<&'static str> {
        rows.iter().map(|r| r.name).collect()
    }

    fn items() -> Vec<Item> {
        vec![
            Item { name: "a", value: Some(1.0) },
            Item { name: "b", value: None },
            Item { name: "c", value: Some(3.0) },
            Item { name: "d", value: Some(1.0) },
            Item { name: "e", value: Some(f64::NAN) },
        ]
    }

    #[test]
    fn numeric_sort_is_stable_descending_first_with_none_last() {
        let items = items();
        let sort = SortState { column: 1, reversed: false };
        assert_eq!(names(&visible_rows(&items, sort, "")), ["c", "a", "d", "b", "e"]);
        let reversed = SortState { column: 1, reversed: true };
        assert_eq!(names(&visible_rows(&items, reversed, "")), ["a", "d", "c", "b", "e"]);
    }

    #[test]
    fn text_sort_is_ascending_first_and_filter_is_case_insensitive() {
        let items = items();
        let sort = SortState::by_title::<Item>("name").unwrap();
        assert_eq!(names(&visible_rows(&items, sort, "")), ["a", "b", "c", "d", "e"]);
        assert_eq!(names(&visible_rows(&items, sort, " C ")), ["c"]);
    }

    #[test]
    fn narrow_widths_drop_right_columns_but_keep_one() {
        assert_eq!(columns_that_fit(&[10, 5, 5], 100, 1), 3);
        assert_eq!(columns_that_fit(&[10, 5, 5], 16, 1), 2);
        assert_eq!(columns_that_fit(&[10, 5, 5], 3, 1), 1);
        assert_eq!(columns_that_fit(&[], 3, 1), 0);
    }
}
