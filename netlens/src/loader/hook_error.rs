//! Why a hook could not be set up, in one line for `check`'s table (the
//! whole verifier log with `check --verbose`).

/// Why a hook could not be set up.
#[derive(Debug)]
pub enum HookError {
    /// The kernel lacks it (or netlens cannot read its layout here).
    Unavailable(String),
    Load(anyhow::Error),
    Attach(anyhow::Error),
}

impl std::fmt::Display for HookError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HookError::Unavailable(why) => write!(f, "{why}"),
            HookError::Load(err) => write!(f, "the kernel rejected the program: {}", short_error(err)),
            HookError::Attach(err) => write!(f, "attaching failed: {}", short_error(err)),
        }
    }
}

/// Whether hook errors keep the kernel's whole verifier log (`netlens
/// check --verbose`) instead of its first line.
pub static FULL_ERRORS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// aya's errors carry the verifier log; a line for a table needs the cause.
fn short_error(err: &anyhow::Error) -> String {
    let text = format!("{err:#}");
    if FULL_ERRORS.load(std::sync::atomic::Ordering::Relaxed) {
        return text;
    }
    let line = text.lines().next().unwrap_or_default();
    let line = line.split(". Verifier output").next().unwrap_or(line);
    let cut: String = line.chars().take(160).collect();
    cut
}

impl std::error::Error for HookError {}
