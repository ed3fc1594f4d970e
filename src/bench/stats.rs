//! Latency samples and their percentiles.

use std::time::Duration;

/// Latency samples in microseconds.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    micros: Vec<u64>,
}

impl Samples {
    /// Records one latency.
    pub fn add(&mut self, d: Duration) {
        self.micros.push(d.as_micros() as u64);
    }

    /// Records `n` operations that shared one latency (a pipelined batch).
    pub fn add_n(&mut self, d: Duration, n: usize) {
        let us = d.as_micros() as u64;
        self.micros.extend(std::iter::repeat_n(us, n));
    }

    /// Merges another set of samples.
    pub fn merge(&mut self, other: Samples) {
        self.micros.extend(other.micros);
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.micros.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.micros.is_empty()
    }

    /// The `p`-th percentile (0–100) in microseconds; 0 when empty.
    pub fn percentile(&mut self, p: f64) -> u64 {
        if self.micros.is_empty() {
            return 0;
        }
        self.micros.sort_unstable();
        let rank = ((p / 100.0) * (self.micros.len() - 1) as f64).round() as usize;
        self.micros[rank.min(self.micros.len() - 1)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut s = Samples::default();
        for i in 1..=100 {
            s.add(Duration::from_micros(i));
        }
        assert_eq!(s.percentile(50.0), 51);
        assert_eq!(s.percentile(99.0), 99);
        assert_eq!(s.percentile(100.0), 100);
        assert_eq!(Samples::default().percentile(50.0), 0);
    }
}
