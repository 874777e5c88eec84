//! The ublk device parameters (size, block sizes, cache, discard and write-zeroes limits,
//! read-only) derived once from the `Device`'s capabilities.

use backends::{Caps, Support};
use libublk::sys;

/// Logical block size: what a filesystem may address. 512 as the NBD binder uses.
pub const LOGICAL_BLOCK_SHIFT: u8 = 9;
/// Physical block size hint: filesystems align to it (the qcow2 and host-page granularity).
pub const PHYSICAL_BLOCK_SHIFT: u8 = 12;
/// Discard granularity advertised when the backend can trim.
pub const DISCARD_GRANULARITY: u32 = 4096;
/// Largest discard or write-zeroes request, in 512-byte sectors (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// Parameters for a device of `size` bytes whose requests carry at most `max_io_bytes`.
/// The size is rounded down to whole logical blocks, as the NBD binder does.
pub fn device_params(size: u64, caps: &Caps, max_io_bytes: u32) -> sys::ublk_params {
    // Every Device flushes; a write cache is what makes filesystems send flushes and FUA.
    let mut attrs = sys::UBLK_ATTR_VOLATILE_CACHE;
    if caps.fua != Support::None {
        attrs |= sys::UBLK_ATTR_FUA;
    }
    if !caps.writable {
        attrs |= sys::UBLK_ATTR_READ_ONLY;
    }
    if caps.rotational {
        attrs |= sys::UBLK_ATTR_ROTATIONAL;
    }
    let mut p = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC,
        basic: sys::ublk_param_basic {
            attrs,
            logical_bs_shift: LOGICAL_BLOCK_SHIFT,
            physical_bs_shift: PHYSICAL_BLOCK_SHIFT,
            io_opt_shift: PHYSICAL_BLOCK_SHIFT,
            io_min_shift: LOGICAL_BLOCK_SHIFT,
            max_sectors: max_io_bytes >> 9,
            dev_sectors: size >> 9,
            ..Default::default()
        },
        ..Default::default()
    };
    // Only what the backend really does: the kernel emulates write-zeroes by writing zero
    // pages itself when it is not advertised, which costs no allocation here.
    let trim = caps.writable && caps.trim;
    let zero = caps.writable && caps.zero == Support::Native;
    if trim || zero {
        p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        p.discard = sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: DISCARD_GRANULARITY,
            max_discard_sectors: if trim { MAX_DISCARD_SECTORS } else { 0 },
            max_write_zeroes_sectors: if zero { MAX_DISCARD_SECTORS } else { 0 },
            max_discard_segments: 1,
            reserved0: 0,
        };
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw() -> Caps {
        Caps {
            writable: true,
            flush: true,
            fua: Support::Native,
            trim: true,
            zero: Support::Native,
            fast_zero: false,
            cache: Support::Emulate,
            multi_conn: true,
            rotational: false,
        }
    }

    #[test]
    fn read_write_with_discard_and_zero() {
        let p = device_params((1 << 30) + 100, &rw(), 512 << 10);
        assert_eq!(p.basic.dev_sectors, (1 << 30) >> 9);
        assert_eq!(p.basic.max_sectors, 1024);
        assert_eq!(p.basic.logical_bs_shift, 9);
        assert_eq!(p.basic.physical_bs_shift, 12);
        assert_eq!(
            p.basic.attrs,
            sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA
        );
        assert_ne!(p.types & sys::UBLK_PARAM_TYPE_DISCARD, 0);
        assert_eq!(p.discard.max_discard_segments, 1);
        assert!(p.discard.discard_granularity > 0);
        assert!(p.discard.max_discard_sectors > 0);
        assert!(p.discard.max_write_zeroes_sectors > 0);
    }

    #[test]
    fn read_only_has_no_discard() {
        let p = device_params(1 << 20, &Caps::READ_ONLY, 512 << 10);
        assert_ne!(p.basic.attrs & sys::UBLK_ATTR_READ_ONLY, 0);
        assert_eq!(p.types, sys::UBLK_PARAM_TYPE_BASIC);
    }

    #[test]
    fn emulated_zero_is_not_advertised() {
        let caps = Caps {
            trim: false,
            zero: Support::Emulate,
            fua: Support::None,
            ..rw()
        };
        let p = device_params(1 << 20, &caps, 512 << 10);
        assert_eq!(p.types, sys::UBLK_PARAM_TYPE_BASIC);
        assert_eq!(p.basic.attrs & sys::UBLK_ATTR_FUA, 0);
        let caps = Caps {
            zero: Support::Emulate,
            ..rw()
        };
        let p = device_params(1 << 20, &caps, 512 << 10);
        assert!(p.discard.max_discard_sectors > 0);
        assert_eq!(p.discard.max_write_zeroes_sectors, 0);
    }
}
