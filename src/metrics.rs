//! Running figures reported by `metrics-state`: moving averages of how long gets and
//! replicated writes take.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Weight of the newest sample in a moving average.
const ALPHA: f64 = 0.1;

/// An exponential moving average of durations in milliseconds, updated without a lock.
#[derive(Debug, Default)]
pub struct MovingAvg {
    bits: AtomicU64,
}

impl MovingAvg {
    /// Folds one sample into the average (the first sample becomes the average).
    pub fn record(&self, sample: Duration) {
        let ms = sample.as_secs_f64() * 1000.0;
        let _ = self
            .bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                let avg = f64::from_bits(old);
                let next = if old == 0 {
                    ms
                } else {
                    avg + ALPHA * (ms - avg)
                };
                Some(next.to_bits())
            });
    }

    /// The current average in milliseconds (0 before any sample).
    pub fn millis(&self) -> f64 {
        f64::from_bits(self.bits.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_sample_sets_the_average_and_later_ones_move_it_by_a_tenth() {
        let avg = MovingAvg::default();
        assert_eq!(avg.millis(), 0.0);
        avg.record(Duration::from_millis(10));
        assert_eq!(avg.millis(), 10.0);
        avg.record(Duration::from_millis(20));
        assert!((avg.millis() - 11.0).abs() < 1e-9, "{}", avg.millis());
    }
}
