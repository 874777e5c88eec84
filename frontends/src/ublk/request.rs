//! One ublk request: its descriptor decoded into backend terms (ublk flags become
//! `IoFlags`) and carried out on the `Device`, giving the result the driver expects
//! (bytes moved, 0, or a negative errno).

use crate::stats::{self, Stats};
use backends::{Device, IoFlags};
use libublk::sys;
use std::sync::Arc;
use std::time::Instant;

/// What requests are carried out on: the device, and with `--stats` the counters.
#[derive(Clone)]
pub struct Target {
    pub device: Device,
    pub stats: Option<Arc<Stats>>,
}

impl Target {
    /// [`execute`], counted.
    pub fn execute(&self, req: &Request, buf: &mut [u8]) -> i32 {
        self.counted(req, || execute(&self.device, req, buf))
    }

    /// [`run`], counted: the request without its settle.
    pub fn run(&self, req: &Request, buf: &mut [u8]) -> i32 {
        self.counted(req, || run(&self.device, req, buf))
    }

    /// Whether the request that gave `res` must settle before it completes and the settle
    /// has work to do (see [`settle`]).
    pub fn unsettled(&self, req: &Request, res: i32) -> bool {
        settles(req, res) && self.device.unsettled()
    }

    /// [`settle`] the request that gave `res`; an error is counted.
    pub fn settle(&self, req: &Request, res: i32) -> i32 {
        let res = settle(&self.device, req, res);
        if let (Some(stats), true) = (&self.stats, res < 0) {
            stats.error(req.op.stat_op());
        }
        res
    }

    fn counted(&self, req: &Request, f: impl FnOnce() -> i32) -> i32 {
        let Some(stats) = &self.stats else {
            return f();
        };
        let started = Instant::now();
        let res = f();
        let op = req.op.stat_op();
        stats.request(op, req.len, started.elapsed());
        if res < 0 {
            stats.error(op);
        }
        res
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    /// Anything else (zoned ops, WRITE_SAME): refused.
    Other(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    pub offset: u64,
    pub len: u64,
    pub flags: IoFlags,
}

impl Op {
    /// The counter `--stats` records it under (the NBD command of the same effect).
    pub fn stat_op(self) -> stats::Op {
        match self {
            Op::Read => stats::Op::Read,
            Op::Write => stats::Op::Write,
            Op::Flush => stats::Op::Flush,
            Op::Discard => stats::Op::Trim,
            Op::WriteZeroes => stats::Op::WriteZeroes,
            Op::Other(_) => stats::Op::Other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "READ",
            Op::Write => "WRITE",
            Op::Flush => "FLUSH",
            Op::Discard => "DISCARD",
            Op::WriteZeroes => "WRITE_ZEROES",
            Op::Other(_) => "OTHER",
        }
    }
}

/// Decode a descriptor. A pure flush carries no range (its start sector is garbage, all
/// ones on 6.12), so its offset and length are 0 here; no range is computed for it.
pub fn decode(iod: &sys::ublksrv_io_desc) -> Request {
    let op = match iod.op_flags & 0xff {
        sys::UBLK_IO_OP_READ => Op::Read,
        sys::UBLK_IO_OP_WRITE => Op::Write,
        sys::UBLK_IO_OP_FLUSH => Op::Flush,
        sys::UBLK_IO_OP_DISCARD => Op::Discard,
        sys::UBLK_IO_OP_WRITE_ZEROES => Op::WriteZeroes,
        o => Op::Other(o),
    };
    if matches!(op, Op::Flush | Op::Other(_)) {
        return Request {
            op,
            offset: 0,
            len: 0,
            flags: IoFlags::empty(),
        };
    }
    let mut flags = IoFlags::empty();
    if iod.op_flags & sys::UBLK_IO_F_FUA != 0 && op != Op::Read {
        flags |= IoFlags::FUA;
    }
    if op == Op::WriteZeroes && iod.op_flags & sys::UBLK_IO_F_NOUNMAP == 0 {
        flags |= IoFlags::MAY_TRIM;
    }
    Request {
        op,
        // Sectors are 512 bytes whatever the logical block size. A start sector this
        // large is past any device; it is refused as out of range by Device.
        offset: iod.start_sector.saturating_mul(512),
        len: u64::from(iod.nr_sectors) * 512,
        flags,
    }
}

/// Carry out `req` with `buf` (the tag's buffer: read data goes there, write data comes
/// from there), settled. Returns the driver's result: bytes for READ/WRITE, 0, or -errno.
pub fn execute(device: &Device, req: &Request, buf: &mut [u8]) -> i32 {
    let res = run(device, req, buf);
    settle(device, req, res)
}

/// Whether a request that gave `res` must settle before it completes: a write-type request
/// that succeeded. The device outlives this server (recovery), so what completes must be in
/// the file.
fn settles(req: &Request, res: i32) -> bool {
    res >= 0 && matches!(req.op, Op::Write | Op::Discard | Op::WriteZeroes)
}

/// Make the request that gave `res` survive this server's death (`Device::settle`), when it
/// must; `res`, or the settle's error.
pub fn settle(device: &Device, req: &Request, res: i32) -> i32 {
    if !settles(req, res) {
        return res;
    }
    match device.settle() {
        Ok(()) => res,
        Err(e) => {
            tracing::debug!(
                "ublk {} offset {:#x}: writing out metadata failed: {e}",
                req.op.name(),
                req.offset
            );
            -e.errno()
        }
    }
}

/// [`execute`] without the settle.
pub fn run(device: &Device, req: &Request, buf: &mut [u8]) -> i32 {
    let data_len = || -> Option<usize> {
        usize::try_from(req.len)
            .ok()
            .filter(|&n| n <= buf.len() && n <= i32::MAX as usize)
    };
    let r = match req.op {
        Op::Flush => device.flush().map(|()| 0),
        Op::Read => match data_len() {
            Some(n) => device.read(req.offset, &mut buf[..n]).map(|()| n as i32),
            None => return -libc::EINVAL,
        },
        Op::Write => match data_len() {
            Some(n) => device
                .write(req.offset, &buf[..n], req.flags)
                .map(|()| n as i32),
            None => return -libc::EINVAL,
        },
        Op::Discard => device.trim(req.offset, req.len, req.flags).map(|()| 0),
        Op::WriteZeroes => device
            .write_zeroes(req.offset, req.len, req.flags)
            .map(|()| 0),
        Op::Other(_) => return -libc::EOPNOTSUPP,
    };
    match r {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(
                "ublk {} offset {:#x} length {:#x} failed: {e}",
                req.op.name(),
                req.offset,
                req.len
            );
            -e.errno()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backends::{BlockBackend, Caps, Result, Support};
    use std::sync::{Arc, Mutex};

    fn iod(op: u32, flags: u32, sector: u64, n: u32) -> sys::ublksrv_io_desc {
        sys::ublksrv_io_desc {
            op_flags: op | flags,
            nr_sectors: n,
            start_sector: sector,
            addr: 0,
        }
    }

    #[test]
    fn decoding() {
        let r = decode(&iod(sys::UBLK_IO_OP_FLUSH, 0, u64::MAX, 0));
        assert_eq!((r.op, r.offset, r.len), (Op::Flush, 0, 0));
        let r = decode(&iod(sys::UBLK_IO_OP_WRITE, sys::UBLK_IO_F_FUA, 8, 16));
        assert_eq!(
            (r.op, r.offset, r.len, r.flags),
            (Op::Write, 4096, 8192, IoFlags::FUA)
        );
        let r = decode(&iod(sys::UBLK_IO_OP_READ, sys::UBLK_IO_F_FUA, 1, 1));
        assert_eq!((r.op, r.flags), (Op::Read, IoFlags::empty()));
        let r = decode(&iod(sys::UBLK_IO_OP_WRITE_ZEROES, 0, 0, 8));
        assert_eq!(r.flags, IoFlags::MAY_TRIM);
        let r = decode(&iod(
            sys::UBLK_IO_OP_WRITE_ZEROES,
            sys::UBLK_IO_F_NOUNMAP,
            0,
            8,
        ));
        assert_eq!(r.flags, IoFlags::empty());
        let r = decode(&iod(sys::UBLK_IO_OP_READ, 0, u64::MAX, 1));
        assert_eq!(r.offset, u64::MAX);
        assert_eq!(
            decode(&iod(sys::UBLK_IO_OP_ZONE_OPEN, 0, 0, 0)).op,
            Op::Other(10)
        );
    }

    /// A memory image that records flushes and settles.
    #[derive(Debug, Default)]
    struct Mem {
        data: Mutex<Vec<u8>>,
        flushes: Mutex<u32>,
        settles: Mutex<u32>,
    }

    impl BlockBackend for Mem {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn caps(&self) -> Caps {
            Caps {
                writable: true,
                flush: true,
                fua: Support::Emulate,
                trim: true,
                zero: Support::Emulate,
                fast_zero: false,
                cache: Support::Emulate,
                multi_conn: true,
                rotational: false,
            }
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            let d = self.data.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write(&self, offset: u64, buf: &[u8], _flags: IoFlags) -> Result<()> {
            let mut d = self.data.lock().unwrap();
            d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            *self.flushes.lock().unwrap() += 1;
            Ok(())
        }
        fn trim(&self, _offset: u64, _len: u64, _flags: IoFlags) -> Result<()> {
            Ok(())
        }
        fn format_name(&self) -> &'static str {
            "mem"
        }
        fn settle(&self) -> Result<()> {
            *self.settles.lock().unwrap() += 1;
            Ok(())
        }
    }

    fn device() -> (Arc<Mem>, Device) {
        let m = Arc::new(Mem {
            data: Mutex::new(vec![0; 1 << 20]),
            flushes: Mutex::new(0),
            settles: Mutex::new(0),
        });
        (m.clone(), Device::new(m))
    }

    #[test]
    fn execution() {
        let (m, d) = device();
        let mut buf = vec![7u8; 64 << 10];
        let w = decode(&iod(sys::UBLK_IO_OP_WRITE, sys::UBLK_IO_F_FUA, 2, 8));
        assert_eq!(execute(&d, &w, &mut buf), 4096);
        assert_eq!(*m.flushes.lock().unwrap(), 1, "FUA emulated by a flush");
        assert_eq!(*m.settles.lock().unwrap(), 1, "a write is settled");
        let mut out = vec![0u8; 64 << 10];
        let r = decode(&iod(sys::UBLK_IO_OP_READ, 0, 2, 8));
        assert_eq!(execute(&d, &r, &mut out), 4096);
        assert_eq!(&out[..4096], &buf[..4096]);
        // The flush with a garbage start sector succeeds.
        let f = decode(&iod(sys::UBLK_IO_OP_FLUSH, 0, u64::MAX, 0));
        assert_eq!(execute(&d, &f, &mut out), 0);
        assert_eq!(*m.flushes.lock().unwrap(), 2);
        // Past the end, larger than the buffer, unsupported.
        let past = decode(&iod(sys::UBLK_IO_OP_READ, 0, 2048, 1));
        assert_eq!(execute(&d, &past, &mut out), -libc::EINVAL);
        let huge = decode(&iod(sys::UBLK_IO_OP_READ, 0, u64::MAX, 1));
        assert_eq!(execute(&d, &huge, &mut out), -libc::EINVAL);
        let big = decode(&iod(sys::UBLK_IO_OP_READ, 0, 0, 256));
        assert_eq!(execute(&d, &big, &mut out), -libc::EINVAL);
        let z = decode(&iod(sys::UBLK_IO_OP_ZONE_OPEN, 0, 0, 0));
        assert_eq!(execute(&d, &z, &mut out), -libc::EOPNOTSUPP);
        // Write-zeroes (emulated by Device) and discard.
        let wz = decode(&iod(
            sys::UBLK_IO_OP_WRITE_ZEROES,
            sys::UBLK_IO_F_NOUNMAP,
            2,
            8,
        ));
        assert_eq!(execute(&d, &wz, &mut out), 0);
        assert_eq!(execute(&d, &r, &mut out), 4096);
        assert!(out[..4096].iter().all(|&b| b == 0));
        let t = decode(&iod(sys::UBLK_IO_OP_DISCARD, 0, 0, 8));
        assert_eq!(execute(&d, &t, &mut out), 0);
        // Every write-type request was settled; reads and flushes need not be.
        assert_eq!(*m.settles.lock().unwrap(), 3);
    }
}
