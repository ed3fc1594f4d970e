//! Worker threads for sessions. Listeners hand each accepted connection (or HTTP request) to an
//! idle worker over a std channel; when none is idle a new worker starts with the job. A worker
//! serves one session at a time with blocking reads, then waits for the next; past a few spare
//! workers it exits instead, so the threads (and their memory) of a burst of sessions go away
//! with it. Spares exit too once no session came for `SPARE_FOR`: a thread that served a
//! session keeps freed heap chunks in its allocator cache (glibc's tcache), scattered over pages
//! that the trim then cannot return; only the thread's exit hands them back. Exits ask the
//! [`Trimmer`] to return freed heap pages to the kernel.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::os::{self, Trimmer};

/// Work for a worker: serve one session or one request.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// Idle workers kept waiting for new sessions; more than this exit when their session ends.
const SPARE_WORKERS: usize = 16;
/// A spare worker that gets no job for this long exits (and gives back its memory).
const SPARE_FOR: Duration = Duration::from_secs(2);

/// A growing and shrinking set of worker threads fed by one channel.
pub struct Pool {
    name: &'static str,
    tx: Mutex<Sender<Job>>,
    rx: Arc<Mutex<Receiver<Job>>>,
    /// Workers blocked waiting for a job and not yet promised one.
    idle: Arc<AtomicUsize>,
    /// Workers alive.
    workers: Arc<AtomicUsize>,
    /// Told when workers exit.
    trimmer: Trimmer,
    /// How long a spare worker waits for a job before it exits.
    spare_for: Duration,
}

impl Pool {
    /// A pool whose threads are called `<name>-worker`; exiting workers ask `trimmer` to
    /// give their memory back.
    pub fn new(name: &'static str, trimmer: Trimmer) -> Pool {
        Pool::with_spare_for(name, trimmer, SPARE_FOR)
    }

    /// A pool whose spare workers wait `spare_for` for a job before they exit.
    fn with_spare_for(name: &'static str, trimmer: Trimmer, spare_for: Duration) -> Pool {
        let (tx, rx) = channel::<Job>();
        Pool {
            name,
            tx: Mutex::new(tx),
            rx: Arc::new(Mutex::new(rx)),
            idle: Arc::new(AtomicUsize::new(0)),
            workers: Arc::new(AtomicUsize::new(0)),
            trimmer,
            spare_for,
        }
    }

    /// Worker threads alive.
    pub fn workers(&self) -> usize {
        self.workers.load(Ordering::Relaxed)
    }

    /// Runs `job` on an idle worker, or on a new one. Gives the job back when no thread can be
    /// started (the system refused: out of threads or memory).
    pub fn submit(&self, job: Job) -> Result<(), (Job, std::io::Error)> {
        let claimed = self
            .idle
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if claimed {
            let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
            return match tx.send(job) {
                Ok(()) => Ok(()),
                Err(e) => Err((e.0, std::io::Error::other("the worker pool stopped"))),
            };
        }
        self.spawn_worker(job)
    }

    fn spawn_worker(&self, job: Job) -> Result<(), (Job, std::io::Error)> {
        let rx = Arc::clone(&self.rx);
        let idle = Arc::clone(&self.idle);
        let workers = Arc::clone(&self.workers);
        let trimmer = self.trimmer.clone();
        let spare_for = self.spare_for;
        // The job travels through a slot so it can be given back if the thread does not start.
        let slot = Arc::new(Mutex::new(Some(job)));
        let first = Arc::clone(&slot);
        workers.fetch_add(1, Ordering::Relaxed);
        let started = os::spawn(
            format!("{}-worker", self.name),
            os::SMALL_STACK,
            move || {
                let job = first.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(job) = job {
                    job();
                }
                work(&rx, &idle, spare_for);
                workers.fetch_sub(1, Ordering::Relaxed);
                trimmer.request();
            },
        );
        match started {
            Ok(_) => Ok(()),
            Err(e) => {
                self.workers.fetch_sub(1, Ordering::Relaxed);
                let job = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                match job {
                    Some(job) => Err((job, e)),
                    None => Ok(()),
                }
            }
        }
    }
}

/// A worker's life after its first job: wait for the next while few workers are spare, for at
/// most `spare_for` each time.
fn work(rx: &Mutex<Receiver<Job>>, idle: &AtomicUsize, spare_for: Duration) {
    loop {
        let spare = idle.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < SPARE_WORKERS).then_some(n + 1)
        });
        if spare.is_err() {
            return;
        }
        // Memory the previous session left in this thread's stack is not needed while it
        // waits, perhaps for long, as a spare.
        os::release_idle_stack();
        // Whoever submits after this decrement-claim sends exactly one job for us.
        let until = Instant::now() + spare_for;
        let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
        let job = match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(job) => job,
            Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {
                // Leave, unless a submitter already counted on a spare: its job is coming.
                let unclaimed = idle
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                    .is_ok();
                if unclaimed {
                    return;
                }
                match rx.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                }
            }
        };
        drop(rx);
        job();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

    /// Runs `n` jobs that all block until every one has started (so `n` workers exist at
    /// once), then lets them finish and waits for all of them.
    fn run_blocked_jobs(
        pool: &Pool,
        n: usize,
        done: &SyncSender<usize>,
        done_rx: &Receiver<usize>,
    ) {
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        for i in 0..n {
            let gate = Arc::clone(&gate);
            let done = done.clone();
            pool.submit(Box::new(move || {
                let (lock, cv) = &*gate;
                let mut open = lock.lock().unwrap();
                while !*open {
                    open = cv.wait(open).unwrap();
                }
                done.send(i).unwrap();
            }))
            .map_err(|(_, e)| e)
            .unwrap();
        }
        assert_eq!(pool.workers(), n);
        {
            let (lock, cv) = &*gate;
            *lock.lock().unwrap() = true;
            cv.notify_all();
        }
        for _ in 0..n {
            done_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        }
    }

    /// Polls (generously) until at most `left` workers are alive.
    fn wait_for_workers(pool: &Pool, left: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while pool.workers() > left && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn idle_workers_are_reused_and_surplus_ones_exit() {
        let pool = Pool::with_spare_for("t", Trimmer::start().unwrap(), Duration::from_secs(600));
        let (done_tx, done_rx) = sync_channel::<usize>(100);
        // Forty jobs that all block until released: forty workers.
        run_blocked_jobs(&pool, 40, &done_tx, &done_rx);
        wait_for_workers(&pool, SPARE_WORKERS);
        assert_eq!(pool.workers(), SPARE_WORKERS);
        // A new job goes to a spare worker: no thread is added.
        pool.submit(Box::new(move || done_tx.send(99).unwrap()))
            .map_err(|(_, e)| e)
            .unwrap();
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(30)).unwrap(), 99);
        assert_eq!(pool.workers(), SPARE_WORKERS);
    }

    #[test]
    fn spare_workers_exit_when_no_job_comes() {
        let pool = Pool::with_spare_for("t", Trimmer::start().unwrap(), Duration::from_millis(50));
        let (done_tx, done_rx) = sync_channel::<usize>(100);
        run_blocked_jobs(&pool, 4, &done_tx, &done_rx);
        wait_for_workers(&pool, 0);
        assert_eq!(pool.workers(), 0, "idle spares left");
        // Work still gets done: a new worker starts.
        pool.submit(Box::new(move || done_tx.send(7).unwrap()))
            .map_err(|(_, e)| e)
            .unwrap();
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(30)).unwrap(), 7);
    }
}
