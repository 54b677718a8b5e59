//! Interactive state of `netlens top` and its key bindings. No terminal I/O:
//! the run loop feeds [`App::update`] and [`App::handle_key`] and calls
//! [`App::draw`] (in `render.rs`) inside `Terminal::draw`.

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::widgets::TableState;

use super::model::Snapshot;
use super::table::{SortState, TextTable};
use super::view::{View, ViewSettings};

/// What the run loop should do after a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Continue,
    Quit,
}

/// Which keyboard "owner" is active; overlays take all keys until closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// The `/` prompt; `draft` becomes the filter on Enter.
    Filter {
        draft: String,
    },
    /// The `s`/F6 column list; `cursor` indexes the view's columns.
    SortChooser {
        cursor: usize,
    },
    Help,
}

/// The selected row of one view. Remembered by identity so it follows its
/// row when a refresh reorders the table; `index` is the fallback when the
/// row disappears (e.g. the connection closed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Selection {
    pub(super) index: usize,
    pub(super) id: Option<String>,
}

impl Selection {
    /// Row index to highlight in `table`, `None` when it is empty.
    pub(super) fn resolve(&self, table: &TextTable) -> Option<usize> {
        let last = table.rows.len().checked_sub(1)?;
        let by_id = self.id.as_deref().and_then(|id| table.position(id));
        Some(by_id.unwrap_or(self.index).min(last))
    }

    /// Select row `index` of `table` (clamped), remembering its identity.
    pub(super) fn set(&mut self, table: &TextTable, index: usize) {
        let Some(last) = table.rows.len().checked_sub(1) else {
            *self = Selection::default();
            return;
        };
        self.index = index.min(last);
        self.id = Some(table.rows[self.index].id.clone());
    }
}

pub struct App {
    /// View, sorts and filter; batch mode renders with the same settings.
    pub settings: ViewSettings,
    pub(super) mode: Mode,
    /// What is on screen; frozen while paused.
    pub(super) shown: Snapshot,
    /// Newest snapshot received while paused, shown on resume.
    pub(super) pending: Option<Snapshot>,
    pub(super) paused: bool,
    pub(super) selections: [Selection; 4],
    pub(super) detail_open: bool,
    /// Scroll offset of each view's table, kept across frames.
    pub(super) table_states: [TableState; 4],
    /// Body rows of the last drawn table, for PgUp/PgDn.
    pub(super) page_rows: usize,
}

impl Default for App {
    fn default() -> Self {
        App::new(ViewSettings::default())
    }
}

impl App {
    pub fn new(settings: ViewSettings) -> Self {
        App {
            settings,
            mode: Mode::Normal,
            shown: Snapshot::default(),
            pending: None,
            paused: false,
            selections: Default::default(),
            detail_open: false,
            table_states: Default::default(),
            page_rows: 10,
        }
    }

    /// Hand the app a fresh snapshot. While paused it is kept aside and the
    /// display stays frozen.
    pub fn update(&mut self, snapshot: Snapshot) {
        if self.paused {
            self.pending = Some(snapshot);
        } else {
            self.shown = snapshot;
        }
    }

    /// The snapshot on screen (the frozen one while paused).
    pub fn displayed(&self) -> &Snapshot {
        &self.shown
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    pub fn detail_open(&self) -> bool {
        self.detail_open
    }

    pub(super) fn selection(&self) -> &Selection {
        &self.selections[self.settings.view.index()]
    }

    pub(super) fn selection_mut(&mut self) -> &mut Selection {
        &mut self.selections[self.settings.view.index()]
    }

    pub fn handle_key(&mut self, key: KeyEvent) -> Control {
        // Terminals with keyboard enhancement also report releases; act once.
        if key.kind == KeyEventKind::Release {
            return Control::Continue;
        }
        // Ctrl-C always quits, whatever is open: the way out must not depend
        // on the state of the UI.
        if key.modifiers.contains(KeyModifiers::CONTROL) && matches!(key.code, KeyCode::Char('c' | 'C')) {
            return Control::Quit;
        }
        match std::mem::replace(&mut self.mode, Mode::Normal) {
            Mode::Help => {} // any key closes help
            Mode::Filter { draft } => self.filter_key(key, draft),
            Mode::SortChooser { cursor } => self.chooser_key(key, cursor),
            Mode::Normal => return self.normal_key(key),
        }
        Control::Continue
    }

    fn filter_key(&mut self, key: KeyEvent, mut draft: String) {
        match key.code {
            KeyCode::Enter => self.settings.filter = draft.trim().to_string(),
            KeyCode::Esc => self.settings.filter.clear(),
            KeyCode::Backspace => {
                draft.pop();
                self.mode = Mode::Filter { draft };
            }
            KeyCode::Char('u') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                self.mode = Mode::Filter { draft: String::new() };
            }
            KeyCode::Char(c) if !key.modifiers.contains(KeyModifiers::CONTROL) => {
                draft.push(c);
                self.mode = Mode::Filter { draft };
            }
            _ => self.mode = Mode::Filter { draft },
        }
    }

    fn chooser_key(&mut self, key: KeyEvent, cursor: usize) {
        let last = self.settings.view.column_titles().len().saturating_sub(1);
        let cursor = match key.code {
            KeyCode::Esc => return,
            KeyCode::Enter => {
                self.sort_by_column(cursor);
                return;
            }
            KeyCode::Up => cursor.saturating_sub(1),
            KeyCode::Down => cursor + 1,
            KeyCode::Home | KeyCode::PageUp => 0,
            KeyCode::End | KeyCode::PageDown => last,
            _ => cursor,
        };
        self.mode = Mode::SortChooser { cursor: cursor.min(last) };
    }

    fn normal_key(&mut self, key: KeyEvent) -> Control {
        match key.code {
            KeyCode::Char('q') | KeyCode::F(10) => return Control::Quit,
            KeyCode::Char('e' | '1') => self.settings.view = View::Endpoints,
            KeyCode::Char('c' | '2') => self.settings.view = View::Connections,
            KeyCode::Char('p' | '3') => self.settings.view = View::Processes,
            KeyCode::Char('f' | '4') => self.settings.view = View::Findings,
            KeyCode::Char('s') | KeyCode::F(6) => {
                self.mode = Mode::SortChooser { cursor: self.settings.sort().column };
            }
            KeyCode::Char('<') => self.sort_by_column(self.settings.sort().column.saturating_sub(1)),
            KeyCode::Char('>') => self.sort_by_column(self.settings.sort().column + 1),
            KeyCode::Char('r') => {
                let sort = self.settings.sort_mut();
                sort.reversed = !sort.reversed;
            }
            KeyCode::Char('/') | KeyCode::F(4) => {
                self.mode = Mode::Filter { draft: self.settings.filter.clone() };
            }
            KeyCode::Char(' ') => self.toggle_pause(),
            KeyCode::Char('?') | KeyCode::F(1) => self.mode = Mode::Help,
            KeyCode::Enter => self.detail_open = !self.detail_open,
            // Esc only closes things: the detail pane first, then the filter.
            KeyCode::Esc if self.detail_open => self.detail_open = false,
            KeyCode::Esc => self.settings.filter.clear(),
            KeyCode::Up => self.move_selection(|i, _, _| i.saturating_sub(1)),
            KeyCode::Down => self.move_selection(|i, _, _| i.saturating_add(1)),
            KeyCode::PageUp => self.move_selection(|i, page, _| i.saturating_sub(page)),
            KeyCode::PageDown => self.move_selection(|i, page, _| i.saturating_add(page)),
            KeyCode::Home => self.move_selection(|_, _, _| 0),
            KeyCode::End => self.move_selection(|_, _, last| last),
            _ => {}
        }
        Control::Continue
    }

    /// Sort the current view by `column` (clamped) in its natural direction;
    /// re-choosing the current column keeps any reversal.
    fn sort_by_column(&mut self, column: usize) {
        let last = self.settings.view.column_titles().len().saturating_sub(1);
        let column = column.min(last);
        let sort = self.settings.sort_mut();
        if sort.column != column {
            *sort = SortState { column, reversed: false };
        }
    }

    fn toggle_pause(&mut self) {
        self.paused = !self.paused;
        if !self.paused {
            if let Some(newest) = self.pending.take() {
                self.shown = newest;
            }
        }
    }

    /// `step(current, page, last)` gives the new index; clamped by `set`.
    fn move_selection(&mut self, step: impl Fn(usize, usize, usize) -> usize) {
        let table = self.settings.table(&self.shown);
        let Some(current) = self.selection().resolve(&table) else {
            return;
        };
        let last = table.rows.len().saturating_sub(1);
        let page = self.page_rows.max(1);
        self.selection_mut().set(&table, step(current, page, last));
    }
}
