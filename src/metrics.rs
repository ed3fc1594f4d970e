//! Running figures reported by `metrics-state`: moving averages of how long gets and
//! replicated writes take.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Weight of the newest sample in a moving average.
const ALPHA: f64 = 0.1;

/// Hot paths time one call in this many per thread (the first one included).
const SAMPLE_EVERY: u32 = 64;

/// True for the calls a hot path should time: one in [`SAMPLE_EVERY`] on this thread, so a
/// million gets a second do not all update one shared average.
pub fn sample_due() -> bool {
    thread_local!(static CALLS: Cell<u32> = const { Cell::new(0) });
    CALLS.with(|calls| {
        let n = calls.get();
        calls.set(n.wrapping_add(1));
        n % SAMPLE_EVERY == 0
    })
}

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
    fn a_thread_samples_its_first_call_then_one_in_sixty_four() {
        let due: Vec<bool> = (0..130).map(|_| sample_due()).collect();
        let sampled: Vec<usize> = (0..130).filter(|i| due[*i]).collect();
        assert_eq!(sampled, vec![0, 64, 128]);
    }

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
