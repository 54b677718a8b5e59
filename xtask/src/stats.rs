//! The few statistics the benchmarks print: means, medians, ranges, and
//! ratios taken pair by pair.

pub fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// (lowest, highest).
pub fn min_max(values: &[f64]) -> (f64, f64) {
    values.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

/// Each pair's rate with netlens over the same pair's baseline (`baselines`
/// per pair, run around it), so that a slow phase of the machine during
/// one pair moves that pair's ratio only.
pub fn pair_ratios(with: &[f64], baselines: &[f64], per_pair: usize) -> Vec<f64> {
    with.iter().zip(baselines.chunks(per_pair)).map(|(with, baseline)| with / mean(baseline)).collect()
}

/// "0.933 [0.370..0.975]": the median of per-pair ratios and their range.
pub fn ratio_summary(ratios: &[f64]) -> String {
    let (lo, hi) = min_max(ratios);
    format!("{:.3} [{lo:.3}..{hi:.3}]", median(ratios))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_pair_moves_its_own_ratio_only() {
        // Pair 2 ran in a slow phase: its baselines and its run both fell.
        let none = [29_917.0, 29_930.0, 17_889.0, 29_955.0, 28_853.0, 29_508.0];
        let trace = [27_898.0, 8_888.0, 28_444.0];
        let ratios = pair_ratios(&trace, &none, 2);
        assert_eq!(ratios.len(), 3);
        assert!((ratios[0] - 27_898.0 / 29_923.5).abs() < 1e-12);
        assert_eq!(ratio_summary(&ratios), "0.932 [0.372..0.975]");
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
