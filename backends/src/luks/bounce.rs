//! The buffer a write is encrypted in (the caller's data must stay as it is): one per
//! thread, grown to the largest chunk seen and then reused, so the data path does not
//! allocate. A nested use on the same thread (a layer under a layer) gets a fresh buffer.

use std::cell::RefCell;

/// Writes are encrypted and written in chunks of at most this many bytes (qemu's
/// `BLOCK_CRYPTO_MAX_IO_SIZE`).
pub const CHUNK: usize = 1 << 20;

thread_local! {
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` on a scratch buffer of `len` bytes (contents unspecified).
pub fn with<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    BUF.with(|cell| match cell.try_borrow_mut() {
        Ok(mut b) => {
            if b.len() < len {
                b.resize(len, 0);
            }
            f(&mut b[..len])
        }
        Err(_) => f(&mut vec![0u8; len]),
    })
}

/// Copy `data` into a scratch buffer, let `encrypt` work on the copy, then hand it to
/// `write`: chunk by chunk of at most [`CHUNK`] bytes, each with its offset into `data`.
pub fn encrypt_and_write<E>(
    data: &[u8],
    mut encrypt: impl FnMut(usize, &mut [u8]),
    mut write: impl FnMut(usize, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let mut done = 0;
    while done < data.len() {
        let n = (data.len() - done).min(CHUNK);
        with(n, |b| {
            b.copy_from_slice(&data[done..done + n]);
            encrypt(done, b);
            write(done, b)
        })?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_data_in_order_and_nesting_works() {
        let data: Vec<u8> = (0..(CHUNK * 2 + 1000)).map(|i| i as u8).collect();
        let mut out = Vec::new();
        encrypt_and_write::<()>(
            &data,
            |at, b| {
                // A nested use gets its own buffer.
                with(16, |inner| inner.fill(0xff));
                assert_eq!(b[0], at as u8);
            },
            |at, b| {
                assert_eq!(at, out.len());
                out.extend_from_slice(b);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(out, data);
    }
}
