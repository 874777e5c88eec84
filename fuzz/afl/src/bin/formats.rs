//! AFL harness for qnbd_fuzz::formats (see fuzz/src/lib.rs for the input layout).

#[global_allocator]
static ALLOC: qnbd_fuzz::LimitAlloc = qnbd_fuzz::LimitAlloc;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        qnbd_fuzz::formats(data);
    });
}
