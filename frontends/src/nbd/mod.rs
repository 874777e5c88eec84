//! The NBD protocol: constants, pure wire encoding, and the server.

pub mod proto;
pub mod server;
pub mod wire;
