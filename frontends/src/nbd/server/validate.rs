//! Request validation, in one place, before any backend code runs. Messages and errnos are
//! qemu-nbd 10's, since scripts and users compare against it.

use super::handshake::Negotiated;
use crate::nbd::proto::*;
use crate::nbd::wire::Request;

/// A request refused with an NBD error; the connection goes on.
#[derive(Debug, PartialEq, Eq)]
pub struct Reject {
    pub errno: u32,
    pub msg: String,
}

fn reject(errno: u32, msg: impl Into<String>) -> Reject {
    Reject {
        errno,
        msg: msg.into(),
    }
}

/// What to do with the bytes that follow a request header.
#[derive(Debug, PartialEq, Eq)]
pub enum Payload {
    None,
    /// Read this many bytes as the request's data.
    Read(usize),
    /// The client sent bytes we will refuse: read and drop them so the stream stays in step.
    Drain(usize),
    /// Too large to read: end the connection (qemu drops a client sending a >32 MiB write).
    Fatal(String),
}

/// Decide how much payload follows `req`.
pub fn payload(req: &Request, neg: &Negotiated) -> Payload {
    let with_len = neg.extended && req.flags.contains(CmdFlags::PAYLOAD_LEN);
    if req.cmd != CMD_WRITE && !with_len {
        return Payload::None;
    }
    if neg.extended && req.cmd == CMD_WRITE && !with_len {
        tracing::trace!(
            name: "nbd_co_receive_ext_payload_compliance",
            "client sent non-compliant write without payload flag: from=0x{:x}, len=0x{:x}",
            req.offset,
            req.len
        );
    }
    if req.len > MAX_BUFFER_SIZE as u64 {
        return Payload::Fatal(format!(
            "len ({}) is larger than max len ({MAX_BUFFER_SIZE})",
            req.len
        ));
    }
    match req.cmd {
        CMD_WRITE | CMD_BLOCK_STATUS => Payload::Read(req.len as usize),
        _ => Payload::Drain(req.len as usize),
    }
}

/// The effect length: the header's length, or for BLOCK_STATUS with a payload, the payload's.
pub fn effect_len(req: &Request, payload: &[u8], neg: &Negotiated) -> u64 {
    if req.cmd == CMD_BLOCK_STATUS && neg.extended && req.flags.contains(CmdFlags::PAYLOAD_LEN) {
        if payload.len() >= 8 {
            let mut a = [0u8; 8];
            a.copy_from_slice(&payload[..8]);
            return u64::from_be_bytes(a);
        }
        return 0;
    }
    req.len
}

fn valid_flags(cmd: u16, neg: &Negotiated) -> CmdFlags {
    let mut v = CmdFlags::FUA;
    match cmd {
        CMD_READ if neg.structured => v |= CmdFlags::DF,
        CMD_WRITE_ZEROES => v |= CmdFlags::NO_HOLE | CmdFlags::FAST_ZERO,
        CMD_BLOCK_STATUS => v |= CmdFlags::REQ_ONE,
        _ => {}
    }
    if neg.extended && matches!(cmd, CMD_WRITE | CMD_BLOCK_STATUS) {
        v |= CmdFlags::PAYLOAD_LEN;
    }
    v
}

/// Check a request against the negotiated state and the export size.
/// `len` is the effect length (see [`effect_len`]); `payload` what was read for it.
pub fn validate(
    req: &Request,
    len: u64,
    payload: &[u8],
    neg: &Negotiated,
    size: u64,
) -> Result<(), Reject> {
    let cmd = req.cmd;
    if !matches!(
        cmd,
        CMD_READ
            | CMD_WRITE
            | CMD_FLUSH
            | CMD_TRIM
            | CMD_CACHE
            | CMD_WRITE_ZEROES
            | CMD_BLOCK_STATUS
    ) {
        return Err(reject(
            EINVAL,
            format!("invalid request type ({cmd}) received"),
        ));
    }
    let flags = TransmissionFlags::from_bits_retain(neg.flags);
    if cmd == CMD_READ && len > MAX_BUFFER_SIZE as u64 {
        return Err(reject(
            EINVAL,
            format!("len ({len}) is larger than max len ({MAX_BUFFER_SIZE})"),
        ));
    }
    if cmd != CMD_FLUSH && (req.offset > size || len > size - req.offset) {
        return Err(reject(
            EINVAL,
            format!(
                "operation past EOF; From: {}, Len: {len}, Size: {size}",
                req.offset
            ),
        ));
    }
    let bad = req.flags.difference(valid_flags(cmd, neg));
    if !bad.is_empty()
        || (req.flags.contains(CmdFlags::DF) && !flags.contains(TransmissionFlags::SEND_DF))
    {
        return Err(reject(
            EINVAL,
            format!(
                "unsupported flags for command {} (got {:#x})",
                cmd_name(cmd),
                req.flags.bits()
            ),
        ));
    }
    if matches!(cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES)
        && flags.contains(TransmissionFlags::READ_ONLY)
    {
        return Err(reject(EPERM, "Export is read-only"));
    }
    match cmd {
        CMD_TRIM if !flags.contains(TransmissionFlags::SEND_TRIM) => {
            return Err(reject(EINVAL, "trim is not supported by this export"))
        }
        CMD_WRITE_ZEROES if !flags.contains(TransmissionFlags::SEND_WRITE_ZEROES) => {
            return Err(reject(
                EINVAL,
                "write zeroes is not supported by this export",
            ))
        }
        CMD_BLOCK_STATUS => {
            if !neg.structured || neg.contexts.is_empty() {
                return Err(reject(EINVAL, "CMD_BLOCK_STATUS not negotiated"));
            }
            if len == 0 {
                return Err(reject(EINVAL, "block status of length 0"));
            }
            if neg.extended && req.flags.contains(CmdFlags::PAYLOAD_LEN) {
                check_context_ids(payload, neg)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// A BLOCK_STATUS payload's context ids, as qemu checks them
/// (`nbd_co_block_status_payload_read`): at least one, each negotiated, none twice, and no
/// more than were negotiated. A request naming none would get no reply chunk at all.
fn check_context_ids(payload: &[u8], neg: &Negotiated) -> Result<(), Reject> {
    let n = match payload.len().checked_sub(8) {
        Some(n) if n % 4 == 0 && n / 4 <= neg.contexts.len() => n / 4,
        _ => return Err(reject(EINVAL, "invalid block status payload length")),
    };
    if n == 0 {
        return Err(reject(EINVAL, "block status payload names no meta context"));
    }
    let mut seen = Vec::with_capacity(n);
    for id in payload[8..].chunks_exact(4) {
        let id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
        if !neg.contexts.iter().any(|c| c.id == id) {
            return Err(reject(EINVAL, format!("unknown meta context id {id}")));
        }
        if seen.contains(&id) {
            return Err(reject(EINVAL, format!("meta context id {id} named twice")));
        }
        seen.push(id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::meta;
    use super::*;

    fn neg(structured: bool, ro: bool) -> Negotiated {
        let mut flags = TransmissionFlags::HAS_FLAGS
            | TransmissionFlags::SEND_FLUSH
            | TransmissionFlags::SEND_FUA;
        if ro {
            flags |= TransmissionFlags::READ_ONLY;
        } else {
            flags |= TransmissionFlags::SEND_TRIM | TransmissionFlags::SEND_WRITE_ZEROES;
        }
        if structured {
            flags |= TransmissionFlags::SEND_DF;
        }
        Negotiated {
            structured,
            extended: false,
            contexts: if structured {
                meta::available(false, &[])
            } else {
                vec![]
            },
            flags: flags.bits(),
        }
    }

    fn req(cmd: u16, flags: u16, offset: u64, len: u64) -> Request {
        Request {
            flags: CmdFlags::from_bits_retain(flags),
            cmd,
            cookie: 1,
            offset,
            len,
        }
    }

    #[test]
    fn table() {
        let size = 1 << 20;
        let rows: Vec<(Request, Negotiated, Option<u32>)> = vec![
            (req(CMD_READ, 0, 0, 512), neg(false, false), None),
            (req(CMD_READ, 0, size, 0), neg(false, false), None),
            (req(CMD_READ, 0, size, 1), neg(false, false), Some(EINVAL)),
            (
                req(CMD_READ, 0, u64::MAX, 2),
                neg(false, false),
                Some(EINVAL),
            ),
            (
                req(CMD_READ, 0, 0, 33554944),
                neg(false, false),
                Some(EINVAL),
            ),
            (
                req(CMD_WRITE, 0, size - 1, 2),
                neg(false, false),
                Some(EINVAL),
            ),
            (req(CMD_WRITE, 0, 0, 512), neg(false, true), Some(EPERM)),
            (req(CMD_TRIM, 0, 0, 512), neg(false, true), Some(EPERM)),
            (req(CMD_READ, 0x04, 0, 512), neg(false, false), Some(EINVAL)),
            (req(CMD_READ, 0x04, 0, 512), neg(true, false), None),
            (req(CMD_READ, 0x20, 0, 512), neg(true, false), Some(EINVAL)),
            (req(CMD_WRITE_ZEROES, 0x13, 0, 512), neg(true, false), None),
            (req(CMD_WRITE, 0x02, 0, 512), neg(true, false), Some(EINVAL)),
            (req(CMD_BLOCK_STATUS, 0x08, 0, 512), neg(true, false), None),
            (
                req(CMD_BLOCK_STATUS, 0, 0, 512),
                neg(false, false),
                Some(EINVAL),
            ),
            (req(99, 0, 0, 0), neg(true, false), Some(EINVAL)),
            (req(CMD_FLUSH, 0, u64::MAX, 0), neg(true, false), None),
        ];
        for (i, (r, n, want)) in rows.iter().enumerate() {
            let got = validate(r, r.len, &[], n, size).err().map(|e| e.errno);
            assert_eq!(got, *want, "row {i}: {r:?}");
        }
    }

    #[test]
    fn messages_match_qemu() {
        let e = validate(
            &req(CMD_READ, 0, 67108864, 512),
            512,
            &[],
            &neg(true, false),
            67108864,
        )
        .unwrap_err();
        assert_eq!(
            e.msg,
            "operation past EOF; From: 67108864, Len: 512, Size: 67108864"
        );
        let e = validate(
            &req(CMD_READ, 0x20, 0, 512),
            512,
            &[],
            &neg(true, false),
            1 << 20,
        )
        .unwrap_err();
        assert_eq!(e.msg, "unsupported flags for command read (got 0x20)");
        let e = validate(&req(99, 0, 0, 0), 0, &[], &neg(true, false), 1).unwrap_err();
        assert_eq!(e.msg, "invalid request type (99) received");
    }

    #[test]
    fn a_block_status_payload_names_each_negotiated_context_once() {
        let mut n = neg(true, false);
        n.extended = true;
        let ids: Vec<u32> = n.contexts.iter().map(|c| c.id).collect();
        assert!(!ids.is_empty());
        let payload = |ids: &[u32]| {
            let mut p = 4096u64.to_be_bytes().to_vec();
            for id in ids {
                p.extend_from_slice(&id.to_be_bytes());
            }
            p
        };
        let r = req(CMD_BLOCK_STATUS, 0x20, 0, 0);
        let check = |p: &[u8]| validate(&r, 4096, p, &n, 1 << 20).err().map(|e| e.errno);
        assert_eq!(check(&payload(&ids[..1])), None);
        // None named (libnbd's interop block-status-payload hung here: no reply chunk).
        assert_eq!(check(&payload(&[])), Some(EINVAL));
        assert_eq!(check(&payload(&[ids[0], ids[0]])), Some(EINVAL));
        assert_eq!(check(&payload(&[999])), Some(EINVAL));
        let mut too_many = ids.clone();
        too_many.push(ids[0]);
        assert_eq!(check(&payload(&too_many)), Some(EINVAL));
        assert_eq!(check(&payload(&ids)[..10]), Some(EINVAL));
    }

    #[test]
    fn oversized_write_is_fatal_and_read_is_not() {
        let n = neg(true, false);
        assert!(matches!(
            payload(&req(CMD_WRITE, 0, 0, 33554944), &n),
            Payload::Fatal(_)
        ));
        assert_eq!(payload(&req(CMD_READ, 0, 0, 33554944), &n), Payload::None);
        assert_eq!(
            payload(&req(CMD_WRITE, 0, 0, 4096), &n),
            Payload::Read(4096)
        );
    }
}
