//! The image file: positional reads and writes with the file name and offset in every error.

use crate::{Error, Result};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct ImageFile {
    pub file: File,
    pub path: PathBuf,
}

impl ImageFile {
    /// Read `buf.len()` bytes; bytes past the end of the file read as zeroes (as qemu does
    /// for compressed clusters near the end and sparse tails).
    pub fn read(&self, op: &'static str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err(op, offset, buf.len() as u64, e)),
            }
        }
        Ok(())
    }

    pub fn write(&self, op: &'static str, offset: u64, buf: &[u8]) -> Result<()> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.err(op, offset, buf.len() as u64, e))
    }

    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| self.err("flush", 0, 0, e))
    }

    pub fn len(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| self.err("stat", 0, 0, e))
    }

    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| self.err("extend", len, 0, e))
    }

    pub fn err(&self, op: &'static str, offset: u64, len: u64, e: io::Error) -> Error {
        Error::io(op, &self.path, offset, len, e)
    }

    pub fn corrupt(&self, msg: String) -> Error {
        corrupt(&self.path, msg)
    }
}

pub fn corrupt(path: &Path, msg: String) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        msg,
    }
}
