//! qnbd frontends: everything that serves a block backend (the NBD server, later the NBD
//! client, the kernel binder and ublk). Frontends know `backends::Device`, never a concrete
//! image format.

pub mod kernel;
pub mod nbd;
pub mod tls;
pub mod transport;
