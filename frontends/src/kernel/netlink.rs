//! The kernel's `nbd` generic netlink family (linux/nbd-netlink.h), through neli.

use super::{DeviceParams, KernelError};
use neli::consts::nl::NlmF;
use neli::consts::socket::NlFamily;
use neli::genl::{AttrTypeBuilder, Genlmsghdr, GenlmsghdrBuilder, Nlattr, NlattrBuilder};
use neli::nl::{NlPayload, Nlmsghdr};
use neli::router::synchronous::NlRouter;
use neli::types::{Buffer, GenlBuffer};
use neli::utils::Groups;
use neli_proc_macros::neli_enum;
use std::os::fd::{AsRawFd, OwnedFd};

const FAMILY: &str = "nbd";
const VERSION: u8 = 1;

#[neli_enum(serialized_type = "u8")]
pub enum NbdCmd {
    Unspec = 0,
    Connect = 1,
    Disconnect = 2,
    Reconfigure = 3,
    LinkDead = 4,
    Status = 5,
}
impl neli::consts::genl::Cmd for NbdCmd {}

#[neli_enum(serialized_type = "u16")]
pub enum NbdAttr {
    Unspec = 0,
    Index = 1,
    SizeBytes = 2,
    BlockSizeBytes = 3,
    Timeout = 4,
    ServerFlags = 5,
    ClientFlags = 6,
    Sockets = 7,
    DeadConnTimeout = 8,
    DeviceList = 9,
    BackendIdentifier = 10,
}
impl neli::consts::genl::NlAttrType for NbdAttr {}

/// Nested attribute numbers inside NBD_ATTR_SOCKETS.
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

fn nl_err(e: impl std::fmt::Display) -> KernelError {
    KernelError::Netlink(e.to_string())
}

fn attr<P: neli::ToBytes + neli::Size>(
    t: NbdAttr,
    p: P,
) -> Result<Nlattr<NbdAttr, Buffer>, KernelError> {
    NlattrBuilder::default()
        .nla_type(
            AttrTypeBuilder::default()
                .nla_type(t)
                .build()
                .map_err(nl_err)?,
        )
        .nla_payload(p)
        .build()
        .map_err(nl_err)
}

fn router() -> Result<(NlRouter, u16), KernelError> {
    let (sock, _) =
        NlRouter::connect(NlFamily::Generic, Some(0), Groups::empty()).map_err(nl_err)?;
    let id = sock
        .resolve_genl_family(FAMILY)
        .map_err(|_| KernelError::NoFamily)?;
    Ok((sock, id))
}

/// The kernel answers EBUSY while the device is configured or merely held open by someone
/// (an unconfigured nbd device gets a config on open); the caller decides whether to retry.
fn classify(msg: &str) -> KernelError {
    if msg.contains("error: -16") || msg.contains("Device or resource busy") {
        KernelError::Busy
    } else if msg.contains("error: -2,") || msg.contains("error: -19") {
        KernelError::Netlink(format!("no such device: {msg}"))
    } else {
        nl_err(msg)
    }
}

/// Send one command and return the index the kernel answers with, if any.
fn request(cmd: NbdCmd, attrs: GenlBuffer<NbdAttr, Buffer>) -> Result<Option<u32>, KernelError> {
    let (sock, family) = router()?;
    let msg = GenlmsghdrBuilder::default()
        .cmd(cmd)
        .version(VERSION)
        .attrs(attrs)
        .build()
        .map_err(nl_err)?;
    let recv = sock
        .send::<_, _, u16, Genlmsghdr<NbdCmd, NbdAttr>>(family, NlmF::ACK, NlPayload::Payload(msg))
        .map_err(|e| classify(&e.to_string()))?;
    let mut index = None;
    for m in recv {
        let m: Nlmsghdr<u16, Genlmsghdr<NbdCmd, NbdAttr>> =
            m.map_err(|e| classify(&e.to_string()))?;
        if let NlPayload::Payload(p) = m.nl_payload() {
            if let Ok(i) = p
                .attrs()
                .get_attr_handle()
                .get_attr_payload_as::<u32>(NbdAttr::Index)
            {
                index = Some(i);
            }
        }
    }
    Ok(index)
}

/// NBD_CMD_CONNECT: returns the device index (the kernel's choice when `index` is None).
pub fn connect(
    index: Option<u32>,
    sockets: &[OwnedFd],
    p: &DeviceParams,
) -> Result<u32, KernelError> {
    let mut attrs = GenlBuffer::new();
    if let Some(i) = index {
        attrs.push(attr(NbdAttr::Index, i)?);
    }
    attrs.push(attr(NbdAttr::SizeBytes, p.size)?);
    attrs.push(attr(NbdAttr::BlockSizeBytes, p.block_size.max(512) as u64)?);
    attrs.push(attr(NbdAttr::ServerFlags, p.flags as u64)?);
    if let Some(t) = p.timeout {
        attrs.push(attr(NbdAttr::Timeout, t)?);
    }
    let mut socks = attr(NbdAttr::Sockets, Vec::<u8>::new())?;
    for s in sockets {
        let fd_attr = NlattrBuilder::default()
            .nla_type(
                AttrTypeBuilder::default()
                    .nla_type(NBD_SOCK_FD)
                    .build()
                    .map_err(nl_err)?,
            )
            .nla_payload(s.as_raw_fd() as u32)
            .build()
            .map_err(nl_err)?;
        let item = NlattrBuilder::default()
            .nla_type(
                AttrTypeBuilder::default()
                    .nla_type(NBD_SOCK_ITEM)
                    .build()
                    .map_err(nl_err)?,
            )
            .nla_payload(Vec::<u8>::new())
            .build()
            .map_err(nl_err)?
            .nest(&fd_attr)
            .map_err(nl_err)?;
        socks = socks.nest(&item).map_err(nl_err)?;
    }
    attrs.push(socks);
    match request(NbdCmd::Connect, attrs)? {
        Some(i) => Ok(i),
        None => index.ok_or_else(|| {
            KernelError::Netlink("the kernel did not say which device it bound".into())
        }),
    }
}

/// NBD_CMD_DISCONNECT.
pub fn disconnect(index: u32) -> Result<(), KernelError> {
    let mut attrs = GenlBuffer::new();
    attrs.push(attr(NbdAttr::Index, index)?);
    request(NbdCmd::Disconnect, attrs).map(|_| ())
}
