//! Busy-polling a connection's socket for a short while before its reader sleeps on it.
//!
//! A client with one request in flight sends the next one a few microseconds after it read
//! our reply. If the reader is asleep by then, the request must wake it, and waking a thread
//! whose CPU went idle costs more than the whole request (on a virtual machine the idle CPU
//! has left the guest: 15–20 µs measured here, against 5 µs to serve a cached 4 KiB write).
//! So the reader first looks at the socket in a loop for up to a window, the way qemu's
//! IOThreads poll their handlers (`util/aio-posix.c`, `poll-max-ns`), and the window adapts
//! the same way: after each wait it is compared with how long the wait really was —
//! - the wait ended inside the window: it is right, kept;
//! - the wait was longer than the largest window: polling would not have helped, so the
//!   window goes to zero (an idle or slow client costs no spinning);
//! - in between: the window doubles (from 4 µs), up to the largest.
//!
//! Spinning takes a CPU from everyone else, so it is done only when it can pay: never on a
//! one-CPU machine, by at most one reader fewer than there are CPUs at a time (a global
//! count), not while other workers of the connection are serving requests (their replies,
//! not the client, are what comes next), and not for a client that sent several requests
//! since the last wait (it has more in flight and is busy reading our replies). `QNBD_POLL_MAX_US` sets the largest window
//! (default 128; 0 turns polling off). 64 µs was too short on this machine for a TLS client's
//! next request (its wait is longer, so the window fell to zero and never spun): x509 QD1
//! reads went 0.95× → 2.43× nbdkit with 128, Unix QD1 reads 1.48× → 2.24×.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

const START_NS: u64 = 4_000;
const DEFAULT_MAX_US: u64 = 128;

/// Readers spinning now, across all connections.
static SPINNING: AtomicUsize = AtomicUsize::new(0);

/// The adaptive poll window of one connection's reader. Used only under the read lock;
/// atomics only so that the connection is `Sync`.
#[derive(Default)]
pub(super) struct BusyPoll {
    window_ns: AtomicU64,
    /// Requests read since the reader last found the socket empty.
    read_since_wait: AtomicU32,
}

impl BusyPoll {
    /// A request was read.
    pub(super) fn request_read(&self) {
        self.read_since_wait.fetch_add(1, Ordering::Relaxed);
    }

    /// Before a read that may sleep: spin until `ready()` or the window has passed, when
    /// spinning may pay: not while other workers of the connection are serving
    /// (`others_busy`), nor when the client sent more than one request since the last wait
    /// (it keeps several in flight, so it is busy with our replies, not idle, and the CPU
    /// is better left to it). Returns when the wait began, for [`BusyPoll::waited`].
    pub(super) fn spin(&self, others_busy: bool, ready: impl Fn() -> bool) -> Instant {
        let start = Instant::now();
        let window = self.window_ns.load(Ordering::Relaxed);
        let pipelined = self.read_since_wait.swap(0, Ordering::Relaxed) > 1;
        if window == 0 || others_busy || pipelined {
            return start;
        }
        let Some(_slot) = SpinSlot::take() else {
            return start;
        };
        while !ready() {
            if start.elapsed().as_nanos() >= u128::from(window) {
                break;
            }
            // A client on this CPU must not wait for the spin to end.
            std::thread::yield_now();
        }
        start
    }

    /// After the read: fit the window to how long the wait that began at `start` was.
    pub(super) fn waited(&self, start: Instant) {
        let max = max_ns();
        let waited = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let window = self.window_ns.load(Ordering::Relaxed);
        let next = next_window(window, waited, max);
        if next != window {
            self.window_ns.store(next, Ordering::Relaxed);
        }
    }
}

/// qemu's `adjust_polling_time` with a grow factor of 2 and a shrink to zero.
fn next_window(window: u64, waited: u64, max: u64) -> u64 {
    if max == 0 || waited > max {
        0
    } else if waited <= window {
        window
    } else {
        (window * 2).clamp(START_NS, max)
    }
}

fn max_ns() -> u64 {
    static MAX: OnceLock<u64> = OnceLock::new();
    *MAX.get_or_init(|| {
        let us = match std::env::var("QNBD_POLL_MAX_US") {
            Ok(v) => v.trim().parse().unwrap_or_else(|_| {
                tracing::warn!("QNBD_POLL_MAX_US={v:?} is not a number of microseconds");
                DEFAULT_MAX_US
            }),
            Err(_) => DEFAULT_MAX_US,
        };
        us.saturating_mul(1000)
    })
}

/// One of the (CPUs − 1) places for a spinning reader; given back on drop.
struct SpinSlot;

impl SpinSlot {
    fn take() -> Option<SpinSlot> {
        static LIMIT: OnceLock<usize> = OnceLock::new();
        let limit = *LIMIT.get_or_init(|| {
            std::thread::available_parallelism().map_or(0, |n| n.get().saturating_sub(1))
        });
        SPINNING
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| SpinSlot)
    }
}

impl Drop for SpinSlot {
    fn drop(&mut self) {
        SPINNING.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 64_000;

    #[test]
    fn the_window_grows_from_the_start_while_waits_are_short_and_stays_once_it_covers_them() {
        let mut w = 0;
        for expect in [4_000, 8_000, 16_000, 32_000] {
            w = next_window(w, 20_000, MAX);
            assert_eq!(w, expect);
        }
        assert_eq!(next_window(w, 20_000, MAX), 32_000);
        assert_eq!(next_window(w, 50_000, MAX), 64_000);
        assert_eq!(next_window(64_000, 60_000, MAX), 64_000);
    }

    #[test]
    fn a_wait_longer_than_the_largest_window_turns_polling_off() {
        assert_eq!(next_window(32_000, 65_000, MAX), 0);
        assert_eq!(next_window(0, 1_000_000, MAX), 0);
    }

    #[test]
    fn a_largest_window_of_zero_never_polls() {
        assert_eq!(next_window(0, 0, 0), 0);
        assert_eq!(next_window(8_000, 100, 0), 0);
    }

    #[test]
    fn a_spin_with_no_window_returns_at_once_and_a_ready_socket_ends_a_spin() {
        let p = BusyPoll::default();
        let t = p.spin(false, || panic!("no window: nothing is polled"));
        assert!(t.elapsed().as_secs() < 1);
        p.window_ns.store(10_000_000_000, Ordering::Relaxed);
        let t = p.spin(false, || true);
        assert!(t.elapsed().as_secs() < 5);
        assert_eq!(SPINNING.load(Ordering::Relaxed), 0);
    }
}
