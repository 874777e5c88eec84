//! Test hooks: a recorder of a file's writes and syncs in issue order, from which crash tests
//! build every state a power cut could leave (CrashMonkey style), and a delay at syncs and
//! lock hand-offs (`QNBD_TEST_DELAY_US`) that widens the windows where races would show.

use parking_lot::Mutex;
use std::sync::OnceLock;

/// One change to the file, in the order the calls completed. A sync is logged twice: as it
/// starts (every write logged before it is covered by it) and once it completed (a crash
/// after that point cannot lose those writes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    SetLen(u64),
    /// A sync started; the id pairs it with its completion.
    Sync(u64),
    SyncDone(u64),
    /// A point the test marks (a request acknowledged, a flush started or returned).
    Mark(u64),
}

#[derive(Debug, Default)]
pub struct Recorder {
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder::default()
    }

    pub(crate) fn write(&self, offset: u64, data: &[u8]) {
        self.events.lock().push(Event::Write {
            offset,
            data: data.to_vec(),
        });
    }

    pub(crate) fn zero(&self, offset: u64, len: u64) {
        self.events.lock().push(Event::Zero { offset, len });
    }

    pub(crate) fn set_len(&self, len: u64) {
        self.events.lock().push(Event::SetLen(len));
    }

    /// Log a sync's start; its id (its position in the log) goes to [`Recorder::sync_done`].
    pub(crate) fn sync(&self) -> u64 {
        let mut e = self.events.lock();
        let id = e.len() as u64;
        e.push(Event::Sync(id));
        id
    }

    pub(crate) fn sync_done(&self, id: u64) {
        self.events.lock().push(Event::SyncDone(id));
    }

    /// Log a test's own marker; returns its position in the log.
    pub fn mark(&self, id: u64) -> usize {
        let mut e = self.events.lock();
        e.push(Event::Mark(id));
        e.len() - 1
    }

    /// Everything logged so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().clone()
    }
}

/// Sleep a pseudo-random 0..N µs when `QNBD_TEST_DELAY_US=N` is set (tests only): called at
/// syncs and where the engine drops a lock between two steps of one change, to widen the
/// windows where a race would show.
pub fn test_delay() {
    static MAX_US: OnceLock<u64> = OnceLock::new();
    let max = *MAX_US.get_or_init(|| {
        std::env::var("QNBD_TEST_DELAY_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    });
    if max == 0 {
        return;
    }
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEED: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    let mut x = SEED.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    std::thread::sleep(std::time::Duration::from_micros(x % max));
}
