//! The mutex a connection's threads queue on (its read and write sides, a TLS session).
//!
//! Why not parking_lot's, used elsewhere: a contended parking_lot lock spins with
//! `sched_yield` before it parks, and a connection's idle workers all wait on its read lock.
//! On two cores that was 13 % of the server's time at QD 32 over TLS (perf, the yields and
//! the task switches they cause). std's futex mutex spins briefly without yielding, then
//! sleeps until the holder wakes exactly one waiter.

use std::sync::{MutexGuard, TryLockError};

#[derive(Debug, Default)]
pub struct Mutex<T>(std::sync::Mutex<T>);

impl<T> Mutex<T> {
    pub const fn new(v: T) -> Mutex<T> {
        Mutex(std::sync::Mutex::new(v))
    }

    /// Lock; a holder that panicked leaves the data as it was (these locks guard sockets
    /// and buffers, whose state a panic cannot leave half-updated in a way that matters
    /// more than the connection ending).
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        match self.0.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }
}
