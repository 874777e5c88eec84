//! The NBD protocol: constants, pure wire encoding, and the server.

pub mod client;
pub mod proto;
pub mod server;
pub mod wire;
