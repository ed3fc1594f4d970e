//! A condition variable that skips the wake-up system call when nobody waits. std's `Condvar`
//! makes a futex call on every notify; on the write path (log flushed, commit point moved)
//! usually nobody is waiting, and that call was one of the few per command.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, MutexGuard};
use std::time::Duration;

/// A `Condvar` that counts its waiters. Waiters must hold the mutex guarding the state they
/// wait on, and the state must change under that mutex, as with any condition variable.
#[derive(Debug, Default)]
pub struct Condition {
    cv: Condvar,
    waiters: AtomicUsize,
}

impl Condition {
    /// A condition nobody waits on.
    pub const fn new() -> Condition {
        Condition {
            cv: Condvar::new(),
            waiters: AtomicUsize::new(0),
        }
    }

    /// Waits for a notification (a poisoned mutex is taken over: the state stays usable).
    pub fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let guard = self.cv.wait(guard).unwrap_or_else(|e| e.into_inner());
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        guard
    }

    /// Waits for a notification or until `timeout` passes.
    pub fn wait_timeout<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: Duration,
    ) -> MutexGuard<'a, T> {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let guard = self
            .cv
            .wait_timeout(guard, timeout)
            .unwrap_or_else(|e| e.into_inner())
            .0;
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        guard
    }

    /// Wakes every waiter, if there is any.
    pub fn notify_all(&self) {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.cv.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_waiter_is_woken_by_a_change_made_under_the_mutex() {
        let shared = Arc::new((Mutex::new(false), Condition::new()));
        let waiter = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || {
                let (lock, cond) = &*shared;
                let mut ready = lock.lock().unwrap();
                while !*ready {
                    ready = cond.wait(ready);
                }
            })
        };
        let (lock, cond) = &*shared;
        *lock.lock().unwrap() = true;
        cond.notify_all();
        waiter.join().unwrap();
        assert_eq!(cond.waiters.load(Ordering::SeqCst), 0);
    }
}
