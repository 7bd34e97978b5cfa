//! Counters and a latency histogram on atomics, rendered in the Prometheus text format.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A fixed-bucket histogram; `observe` is a few relaxed atomic adds.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative), plus one for +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Appends `name_bucket`, `name_sum` and `name_count` lines with `labels`.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        use std::fmt::Write as _;
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// Per-service counters that do not belong to one instance.
#[derive(Debug, Default)]
pub struct ServiceMetrics {
    /// Answers the balancer gave itself (503, 502, 504), by class 1xx..5xx.
    pub local: [AtomicU64; 5],
    /// Extra attempts made after a failed one.
    pub retries: AtomicU64,
    /// Responses cut off mid-body because nothing moved for `--upstream-timeout` (the client
    /// got a truncated answer, although its status was counted as the instance's).
    pub cut: AtomicU64,
    /// Requests whose client closed before the answer came (nginx's 499): the upstream
    /// request was abandoned.
    pub aborted: AtomicU64,
    /// Requests that waited for a place at an instance (`--max-conns-per-instance`), and
    /// those that waited in vain (503).
    pub queued: AtomicU64,
    pub queue_timeouts: AtomicU64,
    pub latency: Histogram,
}

/// Escapes a Prometheus label value.
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x", "s=\"a\"");
        assert!(out.contains("x_bucket{s=\"a\",le=\"0.0005\"} 1\n"));
        assert!(out.contains("x_bucket{s=\"a\",le=\"0.005\"} 2\n"));
        assert!(out.contains("x_bucket{s=\"a\",le=\"+Inf\"} 3\n"));
        assert!(out.contains("x_count{s=\"a\"} 3\n"));
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("a\"b\\c"), "a\\\"b\\\\c");
    }
}
