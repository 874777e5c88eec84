//! The connection under an [`super::remote::NbdRemote`], and what happens when it is lost:
//! qemu's `nbd` driver's states (`CONNECTED`, `CONNECTING_WAIT`, `CONNECTING_NOWAIT`,
//! `QUIT`) on threads.
//!
//! - **Up**: requests are sent on the connection of generation `gen`; one reader thread
//!   per generation fills their slots.
//! - **Down**: the connection broke (a socket error or the server's end). A connector
//!   thread tries again at once, then after 1, 2, 4, 8, 16, 16… seconds, until it is back
//!   or the remote is dropped. For `reconnect-delay` seconds after the loss, requests wait
//!   for it (those in flight at the loss are sent again on the new connection, as qemu's);
//!   after that, or with no delay, they fail with EIO until it is back.
//! - **Quit**: a protocol error (the server cannot be trusted), or the remote was dropped:
//!   every request fails, for good.
//!
//! Ordering rules (why they hold):
//! - A request joins `pending` under the `link` lock, and only while the link is Up with
//!   the generation it sends on; a loss moves Up → Down and drains `pending` under that same
//!   lock. So every request of a lost generation is failed as lost, and none of a new one.
//! - Lock order: `link`, then `pending`, then a slot's state. The reader thread takes
//!   `pending` and slots only.
//! - Cookies are unique across generations, so a late reply on a dead connection never
//!   fills a request of the new one.
//! - A read's data is written by the reader thread straight into the requester's buffer,
//!   only while the slot is not done and marked `filling`; the requester takes its outcome
//!   and leaves only once the slot is done and not filling (see `Dest`, `Pending`). So a
//!   loss that fails a request mid-fill never lets it return (or retry into the same
//!   buffer) while its buffer is still being written.
//! - Data safety across a reconnect: a write acknowledged without FUA lives in the server's
//!   cache until a FLUSH. When the connection is lost before that flush, the server may have
//!   died with it, so every later FLUSH fails with EIO, as a local file's after a failed
//!   fsync (qemu's `page_cache_inconsistent`): no FLUSH on a new connection may vouch for
//!   writes that may be gone. The same when the server fails a FLUSH. A connection lost
//!   with every write flushed loses nothing: requests fail only while it is down.

use super::ExportInfo;
use crate::transport::Stream;
// std's futex locks, not parking_lot's: a contended parking_lot lock spins with
// sched_yield, and a re-export's workers all share one connection (see `crate::sync`).
use crate::sync::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Condvar;
use std::time::{Duration, Instant};

/// What the connector hands back: a connection in transmission, its export, the id of
/// `base:allocation`.
pub type Connected = (super::Client, ExportInfo, Option<u32>);

/// Makes a new connection to the same export (connect, TLS, handshake): qemu's wording on
/// failure.
pub type Connector = Box<dyn Fn() -> Result<Connected, String> + Send + Sync>;

const NOT_SAME: &str = "not the same export";

/// Longest pause between two reconnect attempts (qemu's connect thread's).
const MAX_PAUSE: Duration = Duration::from_secs(16);

#[derive(Debug, Default)]
pub struct Outcome {
    pub done: bool,
    /// The connection was lost before the whole reply came.
    pub lost: bool,
    /// The first error the server reported (errno).
    pub error: Option<i32>,
    pub extents: Vec<(u64, bool, bool)>,
    /// The reader thread is writing into the read's buffer now (see [`Slot::fill`]).
    filling: bool,
    /// Bytes of the read its data and hole chunks covered.
    covered: u64,
}

/// A read's buffer: the requester's own, which the reader thread fills in place (one copy,
/// socket to buffer, instead of three: into a read-ahead buffer, a slot's, the caller's).
///
/// The rule that makes it sound: it is written only while its slot's `filling` is set;
/// `filling` is set only under the slot's lock while the slot is not done; the requester
/// leaves only once the slot is done and not filling ([`Pending`]'s drop). A loss that
/// completes a slot while the reader is filling it shuts the socket down first, so the
/// fill ends soon (with an error) and the requester's wait for it is short.
#[derive(Debug)]
struct Dest {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: `ptr` is dereferenced only by the thread that set `filling` (the reader), under
// the rule above, while the requester that owns the buffer is blocked; moving or sharing
// the address between threads is then sound.
unsafe impl Send for Dest {}
// SAFETY: as for Send: no two threads ever access the buffer at once.
unsafe impl Sync for Dest {}

#[derive(Debug)]
pub struct Slot {
    /// A read's offset and length (its data chunks must lie inside).
    pub read: Option<(u64, u64)>,
    dest: Dest,
    pub state: Mutex<Outcome>,
    pub cv: Condvar,
}

/// A request's slot while its requester may still be waiting: dropping it ends the
/// reader's right to the read's buffer (and waits for a fill under way to end).
pub struct Pending<'a> {
    slot: Arc<Slot>,
    _buf: std::marker::PhantomData<&'a mut [u8]>,
}

impl std::ops::Deref for Pending<'_> {
    type Target = Arc<Slot>;
    fn deref(&self) -> &Arc<Slot> {
        &self.slot
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut st = self.slot.state.lock();
        st.done = true;
        while st.filling {
            st = self.slot.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Slot {
    /// The slot of one request; for a read, `(offset, buffer)` its data goes to.
    ///
    /// # Safety
    /// The returned guard must be dropped (not leaked with `mem::forget`): its drop is what
    /// keeps the reader thread from writing into `buf` once its borrow ends.
    pub unsafe fn start(read: Option<(u64, &mut [u8])>) -> Pending<'_> {
        let (read, dest) = match read {
            Some((offset, buf)) => (
                Some((offset, buf.len() as u64)),
                Dest {
                    ptr: buf.as_mut_ptr(),
                    len: buf.len(),
                },
            ),
            None => (
                None,
                Dest {
                    ptr: std::ptr::null_mut(),
                    len: 0,
                },
            ),
        };
        Pending {
            slot: Arc::new(Slot {
                read,
                dest,
                state: Mutex::new(Outcome::default()),
                cv: Condvar::new(),
            }),
            _buf: std::marker::PhantomData,
        }
    }

    /// Run `f` on the read's bytes `[from, from + n)`, to be written from the socket; with
    /// None when the requester is gone (the bytes are to be skipped) or they lie outside.
    pub fn fill<T>(&self, from: usize, n: usize, f: impl FnOnce(Option<&mut [u8]>) -> T) -> T {
        let inside = from.checked_add(n).is_some_and(|end| end <= self.dest.len);
        {
            let mut st = self.state.lock();
            if st.done || !inside {
                drop(st);
                return f(None);
            }
            st.filling = true;
            st.covered += n as u64;
        }
        // SAFETY: in bounds (checked above), and the requester neither touches nor frees
        // its buffer while `filling` is set (see `Dest`); no other thread fills this slot,
        // as one reader thread reads every reply of a connection, and a slot belongs to one.
        let buf = unsafe { std::slice::from_raw_parts_mut(self.dest.ptr.add(from), n) };
        let out = f(Some(buf));
        self.state.lock().filling = false;
        self.cv.notify_all();
        out
    }

    /// The read's bytes `[from, from + n)` are a hole: zeroes.
    pub fn zero(&self, from: usize, n: usize) {
        self.fill(from, n, |buf| {
            if let Some(buf) = buf {
                buf.fill(0);
            }
        });
    }

    /// A read whose reply ended without an error but did not cover it: data or hole
    /// chunks missing, so part of the buffer would be left as it was.
    pub fn short(&self) -> bool {
        self.read
            .is_some_and(|(_, len)| self.state.lock().covered < len)
    }

    /// The reply is whole (or will never be): wake the request.
    pub fn complete(&self, error: Option<i32>, lost: bool) {
        let mut st = self.state.lock();
        if let Some(e) = error {
            st.error.get_or_insert(e);
        }
        st.lost |= lost;
        st.done = true;
        self.cv.notify_all();
    }

    /// The outcome, once the reply is whole and the reader has let go of the buffer.
    pub fn wait(&self) -> Outcome {
        let mut st = self.state.lock();
        while !st.done || st.filling {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let out = std::mem::take(&mut *st);
        // Taken, but still done: a late fill must not start.
        st.done = true;
        out
    }
}

/// How a connection ended.
#[derive(Debug)]
pub enum Loss {
    /// A socket error or the server's end: worth connecting again.
    Io(String),
    /// The server broke the protocol: not trusted again.
    Protocol(String),
}

enum State {
    Up {
        gen: u64,
        writer: Arc<Mutex<Stream>>,
    },
    Down {
        since: Instant,
    },
    Quit,
}

struct Link {
    state: State,
    /// Why the last connection ended.
    why: String,
    /// The export as first opened: a new connection must offer the same.
    info: ExportInfo,
    allocation: Option<u32>,
}

pub struct Shared {
    link: Mutex<Link>,
    changed: Condvar,
    pub pending: Mutex<HashMap<u64, Arc<Slot>>>,
    /// qemu's `reconnect-delay`: how long requests wait for a lost connection.
    delay: Duration,
    connector: Option<Connector>,
    name: String,
    /// Writes acknowledged without FUA, and how many of them a FLUSH has covered.
    acked: AtomicU64,
    flushed: AtomicU64,
    /// Acknowledged writes may be lost (a connection lost before their flush, or a failed
    /// flush): every flush fails from then on.
    flush_poisoned: AtomicBool,
}

impl Shared {
    /// The link over its first connection (`stream`, after the handshake); the reader
    /// thread starts here.
    pub fn start(
        stream: Stream,
        info: ExportInfo,
        allocation: Option<u32>,
        name: String,
        delay: Duration,
        connector: Option<Connector>,
    ) -> std::io::Result<Arc<Shared>> {
        let shared = Arc::new(Shared {
            link: Mutex::new(Link {
                state: State::Quit,
                why: String::new(),
                info,
                allocation,
            }),
            changed: Condvar::new(),
            pending: Mutex::new(HashMap::new()),
            delay,
            connector,
            name,
            acked: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            flush_poisoned: AtomicBool::new(false),
        });
        shared.go_up(stream, 1)?;
        Ok(shared)
    }

    /// Make `stream` generation `gen`'s connection and start its reader.
    fn go_up(self: &Arc<Self>, stream: Stream, gen: u64) -> std::io::Result<()> {
        let reader = stream.try_clone()?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("nbd-client".into())
            .spawn(move || super::replies::read_replies(reader, &me, gen))?;
        self.link.lock().state = State::Up {
            gen,
            writer: Arc::new(Mutex::new(stream)),
        };
        self.changed.notify_all();
        Ok(())
    }

    /// The connection to send a request on, with `cookie`'s slot registered on it; waits
    /// while the link is down within `reconnect-delay`. EIO when there is none.
    pub fn register(
        &self,
        cookie: u64,
        slot: &Arc<Slot>,
    ) -> std::io::Result<(u64, Arc<Mutex<Stream>>)> {
        let mut link = self.link.lock();
        loop {
            match &link.state {
                State::Up { gen, writer } => {
                    self.pending.lock().insert(cookie, slot.clone());
                    return Ok((*gen, writer.clone()));
                }
                State::Down { since } if !self.delay.is_zero() => {
                    let until = *since + self.delay;
                    let now = Instant::now();
                    if now >= until {
                        return Err(self.lost_error(&link));
                    }
                    link = self
                        .changed
                        .wait_timeout(link, until - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                _ => return Err(self.lost_error(&link)),
            }
        }
    }

    fn lost_error(&self, link: &Link) -> std::io::Error {
        tracing::error!(export = %self.name, "NBD connection lost: {}", link.why);
        std::io::Error::from_raw_os_error(libc::EIO)
    }

    /// A request whose connection was lost: true when it is to be sent again (within
    /// `reconnect-delay` of the loss, or the link is already back).
    pub fn retry_lost(&self) -> bool {
        if self.delay.is_zero() {
            return false;
        }
        match self.link.lock().state {
            State::Up { .. } => true,
            State::Down { since } => since.elapsed() < self.delay,
            State::Quit => false,
        }
    }

    /// The EIO for a request that will not be sent again.
    pub fn lost(&self) -> std::io::Error {
        self.lost_error(&self.link.lock())
    }

    /// Connection `gen` ended: fail its requests as lost, and try again when `why` allows.
    pub fn end(self: &Arc<Self>, gen: u64, why: Loss) {
        let mut link = self.link.lock();
        let State::Up { gen: now, writer } = &link.state else {
            return;
        };
        if *now != gen {
            return;
        }
        writer.lock().shutdown();
        let again = matches!(why, Loss::Io(_)) && self.connector.is_some();
        link.why = match why {
            Loss::Io(m) | Loss::Protocol(m) => m,
        };
        link.state = if again {
            State::Down {
                since: Instant::now(),
            }
        } else {
            State::Quit
        };
        if self.acked.load(Ordering::Acquire) > self.flushed.load(Ordering::Acquire) {
            self.poison_flush("the connection was lost before written data was flushed");
        }
        let slots: Vec<_> = self.pending.lock().drain().map(|(_, s)| s).collect();
        for s in slots {
            s.complete(None, true);
        }
        self.changed.notify_all();
        drop(link);
        if again {
            tracing::warn!(export = %self.name, "NBD connection lost, connecting again: {}", self.why());
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name("nbd-connect".into())
                .spawn(move || me.reconnect(gen + 1));
            if let Err(e) = spawned {
                self.quit(format!("cannot start a thread to connect again: {e}"));
            }
        }
    }

    fn why(&self) -> String {
        self.link.lock().why.clone()
    }

    /// For good: every later request fails (a protocol error, or the remote dropped).
    pub fn quit(&self, why: String) -> Option<Arc<Mutex<Stream>>> {
        let mut link = self.link.lock();
        let old = std::mem::replace(&mut link.state, State::Quit);
        if link.why.is_empty() {
            link.why = why;
        }
        self.changed.notify_all();
        match old {
            State::Up { writer, .. } => Some(writer),
            _ => None,
        }
    }

    /// The connector thread: connect again until it works or the remote is gone.
    fn reconnect(self: Arc<Self>, gen: u64) {
        let Some(connect) = self.connector.as_ref() else {
            return;
        };
        let mut pause = Duration::from_secs(1);
        let mut said = String::new();
        loop {
            if matches!(self.link.lock().state, State::Quit) {
                return;
            }
            match connect().and_then(|c| self.same_export(c)) {
                Ok(stream) => {
                    if !matches!(self.link.lock().state, State::Down { .. }) {
                        stream.shutdown();
                        return;
                    }
                    match self.go_up(stream, gen) {
                        Ok(()) => {
                            tracing::warn!(export = %self.name, "NBD connection is back");
                            return;
                        }
                        Err(e) => tracing::warn!(export = %self.name, "connecting again: {e}"),
                    }
                }
                // A user's attention: this server will not be taken back as it is.
                Err(msg) if msg.starts_with(NOT_SAME) && said != msg => {
                    tracing::error!(export = %self.name, "connecting again: {msg}");
                    said = msg;
                }
                Err(msg) => tracing::debug!(export = %self.name, "connecting again: {msg}"),
            }
            let link = self.link.lock();
            if !matches!(link.state, State::Quit) {
                drop(self.changed.wait_timeout(link, pause));
            }
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    /// The new connection's stream, if its export is the one first opened: the same size
    /// and block size, no less of what requests rely on (writes, FUA, flush, zeroes, block
    /// status). Otherwise qemu's behaviour: the attempt fails and another follows.
    fn same_export(&self, (c, info, allocation): Connected) -> Result<Stream, String> {
        let link = self.link.lock();
        let old = &link.info;
        let kept = crate::nbd::proto::TransmissionFlags::from_bits_retain(old.flags)
            - crate::nbd::proto::TransmissionFlags::READ_ONLY;
        let now = crate::nbd::proto::TransmissionFlags::from_bits_retain(info.flags);
        let why = if info.size != old.size {
            Some(format!(
                "the export's size is now {} (was {})",
                info.size, old.size
            ))
        } else if info.min_block.max(1) != old.min_block.max(1) {
            Some(format!(
                "the export's minimum block size is now {}",
                info.min_block
            ))
        } else if now.contains(crate::nbd::proto::TransmissionFlags::READ_ONLY)
            && old.flags & crate::nbd::proto::TransmissionFlags::READ_ONLY.bits() == 0
        {
            Some("the export is now read-only".into())
        } else if !now.contains(kept) || (link.allocation.is_some() && allocation.is_none()) {
            Some("the server no longer offers what the first connection did".into())
        } else {
            None
        };
        drop(link);
        match why {
            None => Ok(c.into_stream()),
            Some(why) => {
                c.into_stream().shutdown();
                Err(format!("{NOT_SAME}: {why}"))
            }
        }
    }

    /// A write was acknowledged (not durable yet unless `fua`).
    pub fn wrote(&self, fua: bool) {
        if !fua {
            self.acked.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// What a FLUSH about to be sent will cover.
    pub fn flush_mark(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    /// A FLUSH sent at `mark` completed.
    pub fn flushed(&self, mark: u64) {
        self.flushed.fetch_max(mark, Ordering::AcqRel);
    }

    /// From now on every flush fails: acknowledged writes may be lost (`why`).
    pub fn poison_flush(&self, why: &str) {
        if !self.flush_poisoned.swap(true, Ordering::AcqRel) {
            tracing::error!(
                export = %self.name,
                "{why}: it may be lost, and every flush fails from now on"
            );
        }
    }

    pub fn flush_poisoned(&self) -> bool {
        self.flush_poisoned.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_read_is_filled_in_place_and_holes_are_zeroes() {
        let mut buf = vec![7u8; 8];
        // SAFETY: dropped at the end of the block.
        let slot = unsafe { Slot::start(Some((0, &mut buf[..]))) };
        slot.fill(0, 4, |b| b.expect("in place").copy_from_slice(b"abcd"));
        slot.zero(4, 4);
        assert!(!slot.short());
        slot.complete(None, false);
        let out = slot.wait();
        assert!(!out.lost && out.error.is_none());
        drop(slot);
        assert_eq!(buf, b"abcd\0\0\0\0");
    }

    #[test]
    fn a_reply_that_leaves_part_of_the_read_unsaid_is_short() {
        let mut buf = [0u8; 8];
        // SAFETY: dropped at the end of the block.
        let slot = unsafe { Slot::start(Some((0, &mut buf[..]))) };
        slot.fill(0, 4, |b| b.expect("in place").fill(1));
        assert!(slot.short());
    }

    #[test]
    fn outside_the_read_or_after_it_is_done_nothing_is_written() {
        let mut buf = [0u8; 8];
        // SAFETY: dropped at the end of the block.
        let slot = unsafe { Slot::start(Some((0, &mut buf[..]))) };
        assert!(slot.fill(4, 8, |b| b.is_none()));
        assert!(slot.fill(usize::MAX, 2, |b| b.is_none()));
        slot.complete(None, true);
        assert!(slot.fill(0, 4, |b| b.is_none()));
    }

    /// A loss completes a slot while the reader is filling it: the requester does not get
    /// its outcome (nor leave, freeing its buffer) before the fill has ended.
    #[test]
    fn the_requester_waits_for_a_fill_under_way() {
        let mut buf = vec![0u8; 4096];
        // SAFETY: dropped at the end of the block, after the reader thread is joined.
        let slot = unsafe { Slot::start(Some((0, &mut buf[..]))) };
        let reader_slot = Arc::clone(&slot);
        let (inside, go_on) = (mpsc::channel(), mpsc::channel::<()>());
        let reader = std::thread::spawn(move || {
            reader_slot.fill(0, 4096, |b| {
                inside.0.send(()).unwrap();
                go_on.1.recv().unwrap();
                b.expect("in place").fill(9);
            })
        });
        inside.1.recv().unwrap();
        slot.complete(None, true);
        let waiter_slot = Arc::clone(&slot);
        let waiter = std::thread::spawn(move || waiter_slot.wait());
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !waiter.is_finished(),
            "the outcome came while the buffer was being filled"
        );
        go_on.0.send(()).unwrap();
        reader.join().unwrap();
        assert!(waiter.join().unwrap().lost);
        drop(slot);
        assert!(buf.iter().all(|&b| b == 9));
    }
}
