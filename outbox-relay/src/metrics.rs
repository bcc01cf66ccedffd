//! Prometheus metrics, rendered by hand in the text exposition format (no registry needed).
//!
//! Names follow Prometheus conventions (`outbox_relay_…`, base units, counters end in `_total`);
//! no label ever carries an aggregate id or an event id.

use std::fmt::Write;

use crate::stats::Histogram;

/// Appends `histogram` in exposition format: cumulative `le` buckets, `+Inf`, sum and count.
pub fn histogram(out: &mut String, name: &str, help: &str, histogram: &Histogram) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (bound, cumulative) in histogram.cumulative_buckets() {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    let count = histogram.count();
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum {}", histogram.sum_seconds());
    let _ = writeln!(out, "{name}_count {count}");
}

/// Appends a counter or gauge.
pub fn sample(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::new(&[0.01, 0.1, 1.0]);
        h.observe(0.005);
        h.observe(0.05);
        h.observe(0.07);
        h.observe(5.0);
        let mut out = String::new();
        histogram(&mut out, "x_seconds", "test", &h);
        assert!(out.contains("x_seconds_bucket{le=\"0.01\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.1\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"1\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_seconds_count 4\n"), "{out}");
    }
}
