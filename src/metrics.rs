//! Running figures: the moving averages `metrics-state` reports, and the counters and
//! histograms behind `GET /metrics`. Counting stays off the hot path's locks: counters that
//! every command touches are striped (each thread adds to one of several copies, summed when
//! scraped), the rest are plain atomics.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::LazyLock;
use std::time::Duration;

use crate::protocol::VERBS;

/// Weight of the newest sample in a moving average.
const ALPHA: f64 = 0.1;

/// Hot paths time one call in this many per thread (the first one included).
const SAMPLE_EVERY: u32 = 64;

/// True for the calls a hot path should time: one in `SAMPLE_EVERY` on this thread, so a
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

/// Copies of each striped counter.
const STRIPES: usize = 16;

thread_local! {
    /// The stripe this thread adds to.
    static STRIPE: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES
    };
}

/// A set of counters kept in `STRIPES` copies on separate cache lines, so threads adding to
/// them at once do not fight over one line.
#[derive(Debug)]
pub struct Striped {
    stride: usize,
    cells: Box<[AtomicU64]>,
}

impl Striped {
    /// `len` counters at zero.
    pub fn new(len: usize) -> Striped {
        // Whole cache lines (8 counters) per stripe.
        let stride = len.div_ceil(8) * 8;
        Striped {
            stride,
            cells: (0..stride * STRIPES).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Adds `n` to counter `i`.
    pub fn add(&self, i: usize, n: u64) {
        let stripe = STRIPE.with(|s| *s);
        if let Some(cell) = self.cells.get(stripe * self.stride + i) {
            cell.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The total of counter `i`.
    pub fn sum(&self, i: usize) -> u64 {
        (0..STRIPES)
            .filter_map(|s| self.cells.get(s * self.stride + i))
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// Upper bounds (seconds) of the histogram buckets; the last bucket is `+Inf`.
pub const BUCKETS: [f64; 18] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

fn bucket_of(d: Duration) -> usize {
    let secs = d.as_secs_f64();
    BUCKETS
        .iter()
        .position(|b| secs <= *b)
        .unwrap_or(BUCKETS.len())
}

/// Counts of observations per bucket, cumulative as Prometheus wants them, with count and sum.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramView {
    /// Observations at or below each bound of [`BUCKETS`], then the total (`+Inf`).
    pub cumulative: Vec<u64>,
    /// Sum of the observations, seconds.
    pub sum: f64,
}

impl HistogramView {
    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }
}

/// Histograms of durations, one per label value, striped like [`Striped`].
#[derive(Debug)]
pub struct Histograms {
    cells: Striped,
}

/// Cells of one histogram: a count per bucket (with `+Inf`), then the sum in nanoseconds.
const HISTOGRAM_CELLS: usize = BUCKETS.len() + 2;

impl Histograms {
    /// `n` empty histograms.
    pub fn new(n: usize) -> Histograms {
        Histograms {
            cells: Striped::new(n * HISTOGRAM_CELLS),
        }
    }

    /// Records one observation in histogram `i`.
    pub fn observe(&self, i: usize, d: Duration) {
        let base = i * HISTOGRAM_CELLS;
        self.cells.add(base + bucket_of(d), 1);
        self.cells.add(
            base + BUCKETS.len() + 1,
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
        );
    }

    /// Histogram `i` as Prometheus exposes it.
    pub fn view(&self, i: usize) -> HistogramView {
        let base = i * HISTOGRAM_CELLS;
        let mut total = 0;
        let cumulative = (0..=BUCKETS.len())
            .map(|b| {
                total += self.cells.sum(base + b);
                total
            })
            .collect();
        HistogramView {
            cumulative,
            sum: self.cells.sum(base + BUCKETS.len() + 1) as f64 / 1e9,
        }
    }
}

/// Process-wide figures for `GET /metrics` that the code paths below the node update.
#[derive(Debug)]
pub struct Stats {
    /// Commands run, per verb ([`VERBS`] order) and result (even: ok, odd: error).
    pub commands: Striped,
    /// Time commands take to run (not counting the wait for durability), per verb.
    pub command_time: Histograms,
    /// Pushes queued to watchers and arbiters.
    pub pushes: Striped,
    /// Sessions disconnected for not reading their pushes or replies.
    pub slow_consumers: AtomicU64,
    /// Writes a secondary forwarded to its primary.
    pub forwarded_writes: AtomicU64,
    /// Elections this node ran as a candidate.
    pub elections: AtomicU64,
    /// Time fsyncs of the operation log take.
    pub fsync_time: Histograms,
    /// Time snapshots take.
    pub snapshot_time: Histograms,
    /// Snapshots that could not be stored in the S3 bucket.
    pub s3_failures: AtomicU64,
    /// Bytes uploaded to the S3 bucket.
    pub s3_uploaded_bytes: AtomicU64,
}

/// The figures of this process.
pub static STATS: LazyLock<Stats> = LazyLock::new(|| Stats {
    commands: Striped::new(VERBS.len() * 2),
    command_time: Histograms::new(VERBS.len()),
    pushes: Striped::new(1),
    slow_consumers: AtomicU64::new(0),
    forwarded_writes: AtomicU64::new(0),
    elections: AtomicU64::new(0),
    fsync_time: Histograms::new(1),
    snapshot_time: Histograms::new(1),
    s3_failures: AtomicU64::new(0),
    s3_uploaded_bytes: AtomicU64::new(0),
});

/// Index of `verb` in [`VERBS`] (commands are labelled by it).
pub fn verb_index(verb: &str) -> Option<usize> {
    VERBS.iter().position(|v| *v == verb)
}

/// Counts one command run and how long it took.
pub fn command_done(verb: &str, ok: bool, took: Duration) {
    if let Some(i) = verb_index(verb) {
        STATS.commands.add(i * 2 + usize::from(!ok), 1);
        STATS.command_time.observe(i, took);
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
    fn striped_counters_sum_every_thread() {
        let c = std::sync::Arc::new(Striped::new(3));
        let threads: Vec<_> = (0..20)
            .map(|_| {
                let c = std::sync::Arc::clone(&c);
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        c.add(1, 2);
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(c.sum(1), 40_000);
        assert_eq!(c.sum(0), 0);
    }

    #[test]
    fn histograms_are_cumulative_with_count_and_sum() {
        let h = Histograms::new(2);
        h.observe(1, Duration::from_micros(5));
        h.observe(1, Duration::from_millis(3));
        h.observe(1, Duration::from_secs(10));
        let v = h.view(1);
        assert_eq!(v.cumulative[0], 1, "5 µs is under 10 µs");
        assert_eq!(v.cumulative[8], 2, "3 ms is under 5 ms");
        assert_eq!(v.cumulative[BUCKETS.len() - 1], 2, "10 s is over 5 s");
        assert_eq!(v.count(), 3);
        assert!((v.sum - 10.003005).abs() < 1e-9, "{}", v.sum);
        assert_eq!(h.view(0).count(), 0);
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
