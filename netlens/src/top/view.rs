//! Which view is shown and how it is ordered and filtered: the state the TUI
//! and batch mode share, independent of any terminal.

use super::model::{ConnectionRow, EndpointRow, FindingRow, ProcessRow, Snapshot};
use super::table::{SortState, TableRow, TextTable};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum View {
    #[default]
    Endpoints,
    Connections,
    Processes,
    /// The doctor's findings holding now.
    Findings,
}

impl View {
    pub const ALL: [View; 4] = [View::Endpoints, View::Connections, View::Processes, View::Findings];

    pub fn index(self) -> usize {
        match self {
            View::Endpoints => 0,
            View::Connections => 1,
            View::Processes => 2,
            View::Findings => 3,
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            View::Endpoints => "Endpoints",
            View::Connections => "Connections",
            View::Processes => "Processes",
            View::Findings => "Findings",
        }
    }

    /// Lower-case name used in JSON output and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            View::Endpoints => "endpoints",
            View::Connections => "connections",
            View::Processes => "processes",
            View::Findings => "findings",
        }
    }

    pub fn from_name(name: &str) -> Option<View> {
        View::ALL.into_iter().find(|v| v.name().eq_ignore_ascii_case(name))
    }

    pub fn column_titles(self) -> Vec<&'static str> {
        fn titles<R: TableRow>() -> Vec<&'static str> {
            R::columns().iter().map(|c| c.title).collect()
        }
        match self {
            View::Endpoints => titles::<EndpointRow>(),
            View::Connections => titles::<ConnectionRow>(),
            View::Processes => titles::<ProcessRow>(),
            View::Findings => titles::<FindingRow>(),
        }
    }

    /// Default orders, chosen so the first screen answers "who is busiest":
    /// - Endpoints and Processes by CONN/S: always populated (never `None`),
    ///   the churn that drives most transport incidents, and trouble values
    ///   are coloured anyway so they stand out without sorting on them.
    /// - Connections by AGE, oldest first: ages grow in lockstep, so rows do
    ///   not jump between refreshes and the list is readable while live.
    pub fn default_sort(self) -> SortState {
        let sort = match self {
            View::Endpoints => SortState::by_title::<EndpointRow>("CONN/S"),
            View::Connections => SortState::by_title::<ConnectionRow>("AGE"),
            View::Processes => SortState::by_title::<ProcessRow>("CONN/S"),
            // Most severe first, as the doctor prints them.
            View::Findings => SortState::by_title::<FindingRow>("SEVERITY"),
        };
        sort.unwrap_or_default()
    }
}

/// View, per-view sort and filter. `Default` is what `netlens top` starts with.
#[derive(Clone, Debug, PartialEq)]
pub struct ViewSettings {
    pub view: View,
    /// Indexed by [`View::index`]: each view remembers its own sort.
    pub sorts: [SortState; 4],
    /// Applied filter (case-insensitive substring); empty shows everything.
    pub filter: String,
}

impl Default for ViewSettings {
    fn default() -> Self {
        ViewSettings { view: View::default(), sorts: View::ALL.map(View::default_sort), filter: String::new() }
    }
}

impl ViewSettings {
    pub fn sort(&self) -> SortState {
        self.sorts[self.view.index()]
    }

    pub fn sort_mut(&mut self) -> &mut SortState {
        &mut self.sorts[self.view.index()]
    }

    /// Sort the current view by the column titled `title` (case-insensitive),
    /// e.g. for a `--sort` flag. The error lists the valid titles.
    pub fn sort_by_title(&mut self, title: &str) -> Result<(), String> {
        let titles = self.view.column_titles();
        match titles.iter().position(|t| t.eq_ignore_ascii_case(title.trim())) {
            Some(column) => {
                *self.sort_mut() = SortState { column, reversed: false };
                Ok(())
            }
            None => {
                Err(format!("no column {title:?} in the {} view; columns: {}", self.view.name(), titles.join(", ")))
            }
        }
    }

    /// The current view of `snapshot`, filtered, sorted and formatted.
    pub fn table(&self, snapshot: &Snapshot) -> TextTable {
        let sort = self.sort();
        match self.view {
            View::Endpoints => TextTable::build(&snapshot.endpoints, sort, &self.filter),
            View::Connections => TextTable::build(&snapshot.connections, sort, &self.filter),
            View::Processes => TextTable::build(&snapshot.processes, sort, &self.filter),
            View::Findings => TextTable::build(&snapshot.findings, sort, &self.filter),
        }
    }
}

/// For the Connections view when the kernel holds more connections than
/// were listed: "first 2000 of 15301 connections".
pub fn capped_note(view: View, snapshot: &Snapshot) -> Option<String> {
    let listed = snapshot.connections.len() as u64;
    (view == View::Connections && snapshot.connections_total > listed)
        .then(|| format!("first {listed} of {} connections", snapshot.connections_total))
}
