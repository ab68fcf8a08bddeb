//! A latency histogram fed from the writer threads and read by the self-metrics.

use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (seconds) of the store-write latency histogram buckets, then +Inf.
pub const LATENCY_BOUNDS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram fed from the writer threads.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

/// A consistent-enough copy of a [`Histogram`]: cumulative bucket counts, sum and count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramSnap {
    pub cumulative: Vec<u64>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe_ns(&self, ns: u64) {
        let s = ns as f64 / 1e9;
        let i = LATENCY_BOUNDS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnap {
        let mut acc = 0;
        let cumulative: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| {
                acc += b.load(Ordering::Relaxed);
                acc
            })
            .collect();
        // The count is the +Inf bucket, so the exposition is self-consistent even while
        // writers observe concurrently.
        let count = *cumulative.last().unwrap_or(&0);
        HistogramSnap {
            cumulative,
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            count,
        }
    }
}

impl HistogramSnap {
    /// The upper bound of the bucket holding quantile `q` of the observations since `before`
    /// (None without observations; +Inf shows as the largest finite bound).
    pub fn quantile_bound_since(&self, before: &HistogramSnap, q: f64) -> Option<f64> {
        let n = self.count.saturating_sub(before.count);
        if n == 0 {
            return None;
        }
        let want = (q * n as f64).ceil().max(1.0) as u64;
        for (i, c) in self.cumulative.iter().enumerate() {
            let prev = before.cumulative.get(i).copied().unwrap_or(0);
            if c.saturating_sub(prev) >= want {
                return Some(
                    *LATENCY_BOUNDS
                        .get(i)
                        .unwrap_or(&LATENCY_BOUNDS[LATENCY_BOUNDS.len() - 1]),
                );
            }
        }
        Some(LATENCY_BOUNDS[LATENCY_BOUNDS.len() - 1])
    }
}
