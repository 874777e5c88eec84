//! One export: the device and what the handshake tells clients about it.

use super::meta::{self, MetaContext};
use crate::nbd::proto::{TransmissionFlags, MAX_BUFFER_SIZE};
use crate::stats::Stats;
use backends::Device;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

#[derive(Debug)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub device: Device,
    /// CAN_MULTI_CONN: qemu-nbd sets it unless `-e 1`.
    pub multi_conn: bool,
    /// The metadata contexts offered (`base:allocation`, with `-A` `qemu:allocation-depth`,
    /// with `-B` `qemu:dirty-bitmap:NAME`).
    pub contexts: Vec<MetaContext>,
    /// `--stats`: the counters the connections record into.
    pub stats: Option<Arc<Stats>>,
    /// Connections in transmission now (see `transmission::may_splice_write`).
    pub(crate) transmitting: AtomicUsize,
}

/// Block sizes sent in NBD_INFO_BLOCK_SIZE: qemu-nbd's for a file (min: the image's request
/// alignment, 1 for most, 512 for a probed raw image; preferred 4 KiB; max 32 MiB).
pub const PREFERRED_BLOCK: u32 = 4096;
pub const MAX_BLOCK: u32 = MAX_BUFFER_SIZE;

impl Export {
    pub fn new(
        name: String,
        description: String,
        device: Device,
        multi_conn: bool,
        allocation_depth: bool,
    ) -> Export {
        Export {
            name,
            description,
            device,
            multi_conn,
            contexts: meta::available(allocation_depth, &[]),
            stats: None,
            transmitting: AtomicUsize::new(0),
        }
    }

    /// Count requests and connections in `stats`.
    pub fn with_stats(mut self, stats: Arc<Stats>) -> Export {
        self.stats = Some(stats);
        self
    }

    /// Offer `qemu:dirty-bitmap:NAME` for each `-B NAME` (the device has checked them).
    pub fn with_bitmaps(mut self, allocation_depth: bool, bitmaps: &[String]) -> Export {
        self.contexts = meta::available(allocation_depth, bitmaps);
        self
    }

    pub fn read_only(&self) -> bool {
        !self.device.caps().writable
    }

    /// The transmission flags for a connection that negotiated `structured` / `extended`
    /// and (`contexts`) selected at least one meta context.
    pub fn flags(&self, structured: bool, extended: bool, contexts: bool) -> TransmissionFlags {
        let caps = self.device.caps();
        let mut f = TransmissionFlags::HAS_FLAGS;
        if caps.flush {
            f |= TransmissionFlags::SEND_FLUSH;
        }
        if caps.fua.available() {
            f |= TransmissionFlags::SEND_FUA;
        }
        if caps.cache.available() {
            f |= TransmissionFlags::SEND_CACHE;
        }
        if caps.rotational {
            f |= TransmissionFlags::ROTATIONAL;
        }
        if self.read_only() {
            f |= TransmissionFlags::READ_ONLY;
        } else {
            if caps.trim {
                f |= TransmissionFlags::SEND_TRIM;
            }
            if caps.zero.available() {
                f |= TransmissionFlags::SEND_WRITE_ZEROES | TransmissionFlags::SEND_FAST_ZERO;
            }
        }
        if structured || extended {
            f |= TransmissionFlags::SEND_DF;
        }
        if self.multi_conn && caps.multi_conn {
            f |= TransmissionFlags::CAN_MULTI_CONN;
        }
        if extended && contexts {
            f |= TransmissionFlags::BLOCK_STAT_PAYLOAD;
        }
        f
    }
}
