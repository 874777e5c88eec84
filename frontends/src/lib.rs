//! qnbd frontends: everything that serves a block backend (the NBD server and client, the
//! kernel NBD binder, ublk). Frontends know `backends::Device`, never a concrete image format.

pub mod kernel;
pub mod nbd;
pub mod stats;
pub mod sync;
pub mod tls;
pub mod transport;
pub mod ublk;
