//! Exact quantiles over the last minute: six 10-second HdrHistograms in a
//! ring, merged when asked. A scrape sees what happened lately, not since
//! boot, and memory stays fixed.

use hdrhistogram::Histogram;

const SLOT_NS: u64 = 10_000_000_000;
const SLOTS: usize = 6;
/// The window the quantiles cover, for the metric's help text.
pub const WINDOW_SECONDS: u64 = SLOT_NS / 1_000_000_000 * SLOTS as u64;

pub struct Recent {
    /// Each slot's histogram (microseconds) and the 10 s period it holds.
    slots: Vec<(u64, Histogram<u64>)>,
}

impl Default for Recent {
    fn default() -> Self {
        let empty = Histogram::new_with_bounds(1, 100_000_000, 3).expect("static bounds are valid");
        Self { slots: vec![(u64::MAX, empty); SLOTS] }
    }
}

/// Quantiles in seconds, with the count and sum (seconds) they cover.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Window {
    pub count: u64,
    pub sum_seconds: f64,
    pub quantiles: Vec<(f64, f64)>,
}

impl Recent {
    pub fn record(&mut self, ts_ns: u64, value_ns: u64) {
        let period = ts_ns / SLOT_NS;
        let (slot_period, histogram) = &mut self.slots[(period % SLOTS as u64) as usize];
        if *slot_period != period {
            histogram.reset();
            *slot_period = period;
        }
        histogram.saturating_record((value_ns / 1_000).clamp(1, 100_000_000));
    }

    /// The given quantiles over the periods still inside the window at `now_ns`.
    pub fn window(&self, now_ns: u64, quantiles: &[f64]) -> Window {
        let now_period = now_ns / SLOT_NS;
        let mut merged: Option<Histogram<u64>> = None;
        for (period, histogram) in &self.slots {
            if *period == u64::MAX || *period + (SLOTS as u64) <= now_period || *period > now_period {
                continue;
            }
            match &mut merged {
                Some(total) => {
                    let _ = total.add(histogram);
                }
                None => merged = Some(histogram.clone()),
            }
        }
        let Some(total) = merged.filter(|h| !h.is_empty()) else {
            return Window { quantiles: quantiles.iter().map(|q| (*q, 0.0)).collect(), ..Window::default() };
        };
        Window {
            count: total.len(),
            sum_seconds: total.mean() * total.len() as f64 / 1e6,
            quantiles: quantiles.iter().map(|q| (*q, total.value_at_quantile(*q) as f64 / 1e6)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_cover_the_last_minute_only() {
        let mut recent = Recent::default();
        let start = 1_000 * SLOT_NS;
        for i in 1..=100u64 {
            recent.record(start, i * 1_000_000); // 1..100 ms
        }
        let window = recent.window(start + SLOT_NS, &[0.5, 0.99]);
        assert_eq!(window.count, 100);
        assert!((window.quantiles[0].1 - 0.050).abs() < 0.001, "{:?}", window);
        assert!((window.quantiles[1].1 - 0.099).abs() < 0.001, "{:?}", window);
        // Seven periods later the samples have aged out.
        assert_eq!(recent.window(start + 7 * SLOT_NS, &[0.5]).count, 0);
    }
}
