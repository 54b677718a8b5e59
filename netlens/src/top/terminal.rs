//! Putting the terminal into TUI mode and, on every way out (normal exit,
//! error, panic, SIGTERM), putting it back.

use std::io::{self, Stdout};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use crossterm::cursor::{Hide, Show};
use crossterm::execute;
use crossterm::terminal::{disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen};
use ratatui::backend::CrosstermBackend;
use ratatui::Terminal;

/// Whether the terminal is currently in TUI mode. Makes [`restore`]
/// idempotent and a no-op otherwise, so a panic in batch mode or a second
/// restore never writes escape codes into someone's pipe.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Raw mode + alternate screen + hidden cursor for as long as it lives.
/// Derefs to the ratatui terminal: `guard.draw(|f| app.draw(f))?`.
pub struct TerminalGuard {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl TerminalGuard {
    pub fn new() -> anyhow::Result<Self> {
        ACTIVE.store(true, Ordering::SeqCst);
        // On any failure part way, undo what was done before reporting it.
        let setup = || -> anyhow::Result<Terminal<CrosstermBackend<Stdout>>> {
            enable_raw_mode().context("enabling raw mode")?;
            execute!(io::stdout(), EnterAlternateScreen, Hide).context("entering the alternate screen")?;
            let mut terminal = Terminal::new(CrosstermBackend::new(io::stdout())).context("creating the terminal")?;
            terminal.clear().context("clearing the screen")?;
            Ok(terminal)
        };
        match setup() {
            Ok(terminal) => Ok(TerminalGuard { terminal }),
            Err(e) => {
                restore();
                Err(e)
            }
        }
    }
}

impl Deref for TerminalGuard {
    type Target = Terminal<CrosstermBackend<Stdout>>;
    fn deref(&self) -> &Self::Target {
        &self.terminal
    }
}

impl DerefMut for TerminalGuard {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.terminal
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore();
    }
}

/// Leave the alternate screen, show the cursor and leave raw mode, if a
/// [`TerminalGuard`] set them up and nobody restored them yet. Errors are
/// ignored: this runs on the way out, where there is nothing better to do.
/// Safe to call from a SIGTERM handler task or anywhere else, repeatedly.
pub fn restore() {
    if !ACTIVE.swap(false, Ordering::SeqCst) {
        return;
    }
    let _ = execute!(io::stdout(), LeaveAlternateScreen, Show);
    let _ = disable_raw_mode();
}

/// Chain a panic hook that restores the terminal before the default hook
/// prints, so the message lands on the normal screen, readable, instead of
/// being wiped with the alternate screen. Call once, before creating the
/// [`TerminalGuard`].
pub fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        previous(info);
    }));
}
