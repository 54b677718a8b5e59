//! Builders of the Prometheus crate's protobuf values (label pairs,
//! families, counters, gauges, histograms, summaries), so that metrics.rs
//! reads as the list of metrics it is.

use prometheus::proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType, Quantile, Summary};

use crate::aggregate::{buckets::Buckets, recent::Recent};
use netlens_common::LOG2_BUCKETS;

/// Quantiles of the `_recent_seconds` summaries.
const QUANTILES: [f64; 3] = [0.5, 0.99, 0.999];

pub(super) fn label(name: &str, value: &str) -> LabelPair {
    let mut pair = LabelPair::default();
    pair.set_name(name.to_string());
    pair.set_value(value.to_string());
    pair
}

pub(super) fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(name.to_string());
    family.set_help(help.to_string());
    family.set_field_type(kind);
    family.set_metric(metrics);
    family
}

pub(super) fn counter(labels: Vec<LabelPair>, value: f64) -> Metric {
    let mut metric = Metric::from_label(labels);
    let mut counter = Counter::default();
    counter.set_value(value);
    metric.set_counter(counter);
    metric
}

pub(super) fn gauge(labels: Vec<LabelPair>, value: f64) -> Metric {
    let mut metric = Metric::from_label(labels);
    let mut gauge = Gauge::default();
    gauge.set_value(value);
    metric.set_gauge(gauge);
    metric
}

pub(super) fn histogram(labels: Vec<LabelPair>, buckets: &Buckets) -> Metric {
    let mut histogram = Histogram::default();
    histogram.set_sample_count(buckets.count());
    histogram.set_sample_sum(buckets.sum);
    histogram.set_bucket(
        buckets
            .cumulative()
            .map(|(bound, count)| {
                let mut bucket = Bucket::default();
                bucket.set_upper_bound(bound);
                bucket.set_cumulative_count(count);
                bucket
            })
            .collect(),
    );
    let mut metric = Metric::from_label(labels);
    metric.set_histogram(histogram);
    metric
}

/// A log2 histogram from the kernel: bucket i holds [2^(i-1), 2^i) in
/// `unit`s, so its upper bound is 2^i units.
pub(super) fn log2_histogram(counts: &[u64; LOG2_BUCKETS], unit: f64) -> Metric {
    let mut histogram = Histogram::default();
    let mut running = 0;
    let mut sum = 0.0;
    let mut buckets = Vec::with_capacity(LOG2_BUCKETS);
    for (index, count) in counts.iter().enumerate() {
        running += count;
        let upper = if index == 0 { 0.0 } else { (1u64 << index) as f64 * unit };
        // The middle of the bucket stands for its samples in the sum.
        sum += *count as f64 * upper * 0.75;
        let mut bucket = Bucket::default();
        bucket.set_upper_bound(upper);
        bucket.set_cumulative_count(running);
        buckets.push(bucket);
    }
    histogram.set_sample_count(running);
    histogram.set_sample_sum(sum);
    histogram.set_bucket(buckets);
    let mut metric = Metric::default();
    metric.set_histogram(histogram);
    metric
}

pub(super) fn summary(labels: Vec<LabelPair>, recent: &Recent, now_ns: u64) -> Metric {
    let window = recent.window(now_ns, &QUANTILES);
    let mut summary = Summary::default();
    summary.set_sample_count(window.count);
    summary.set_sample_sum(window.sum_seconds);
    summary.set_quantile(
        window
            .quantiles
            .iter()
            .map(|(q, value)| {
                let mut quantile = Quantile::default();
                quantile.set_quantile(*q);
                quantile.set_value(*value);
                quantile
            })
            .collect(),
    );
    let mut metric = Metric::from_label(labels);
    metric.set_summary(summary);
    metric
}

