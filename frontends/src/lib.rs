//! qnbd frontends.
