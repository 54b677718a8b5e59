//! Short, fixed-ish width value formatting shared by the TUI and batch text.

use crate::trace::human_duration;

/// Shown for values that are not known yet.
pub const NONE: &str = "-";

/// A duration given in microseconds: "812µs", "12.30ms", "1.020s".
pub fn micros(us: u64) -> String {
    human_duration(us.saturating_mul(1_000))
}

/// Like [`micros`] for quantiles, which are fractional and may be missing.
pub fn micros_opt(us: Option<f64>) -> String {
    match us {
        Some(us) if us.is_finite() => human_duration((us.max(0.0) * 1_000.0).round() as u64),
        _ => NONE.to_string(),
    }
}

/// Per-second rates keep one decimal so 0.2/s of retransmits is not "0".
pub fn rate(per_s: f64) -> String {
    format!("{per_s:.1}")
}

pub fn rate_opt(value: Option<f64>) -> String {
    value.map_or_else(|| NONE.to_string(), rate)
}

pub fn percent(pct: f64) -> String {
    format!("{pct:.0}%")
}

/// Connection age: sub-second as a duration, then "42.5s", "3m05s", "2h07m".
pub fn age(us: u64) -> String {
    let secs = us / 1_000_000;
    match secs {
        0 => micros(us),
        1..=59 => format!("{:.1}s", us as f64 / 1e6),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
    }
}

/// Byte counts in binary units like top: "512B", "12.3K", "4.0M".
pub fn bytes(value: u64) -> String {
    const UNITS: [&str; 5] = ["K", "M", "G", "T", "P"];
    if value < 1024 {
        return format!("{value}B");
    }
    let mut scaled = value as f64 / 1024.0;
    let mut unit = 0;
    while scaled >= 1024.0 && unit + 1 < UNITS.len() {
        scaled /= 1024.0;
        unit += 1;
    }
    format!("{scaled:.1}{}", UNITS[unit])
}

pub fn bytes_opt(value: Option<u64>) -> String {
    value.map_or_else(|| NONE.to_string(), bytes)
}

/// A histogram bucket bound as a bar label: "≤100µs", "≤1ms", "≤2.5ms", "≤1s".
pub fn bucket_label(le_us: u64) -> String {
    let (value, unit) = match le_us {
        0..=999 => return format!("≤{le_us}µs"),
        1_000..=999_999 => (le_us as f64 / 1e3, "ms"),
        _ => (le_us as f64 / 1e6, "s"),
    };
    if value.fract() == 0.0 {
        format!("≤{value:.0}{unit}")
    } else {
        format!("≤{value:.1}{unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_short() {
        assert_eq!(micros(812), "812µs");
        assert_eq!(micros_opt(Some(12_300.0)), "12.30ms");
        assert_eq!(micros_opt(None), "-");
        assert_eq!(age(42_500_000), "42.5s");
        assert_eq!(age(185_000_000), "3m05s");
        assert_eq!(age(7_620_000_000), "2h07m");
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(12_595), "12.3K");
        assert_eq!(bytes(4 * 1024 * 1024), "4.0M");
        assert_eq!(bucket_label(100), "≤100µs");
        assert_eq!(bucket_label(1_000), "≤1ms");
        assert_eq!(bucket_label(2_500), "≤2.5ms");
        assert_eq!(bucket_label(1_000_000), "≤1s");
    }
}
