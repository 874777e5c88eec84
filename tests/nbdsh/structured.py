"""Structured replies, sparse reads, block status, FUA, fast zero, range errors.

Usage: structured.py URI   (the export is 16 MiB: data 'A'*64K at 1 MiB, the rest a hole)
"""
import sys

import nbd

uri = sys.argv[1]
MiB = 1 << 20


def connect(structured=True):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    if structured:
        h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    h.set_strict_mode(0)
    return h


# Structured replies off: plain reads still work, block status is not available.
h = connect(structured=False)
assert not h.get_structured_replies_negotiated()
assert h.pread(16, MiB) == b"A" * 16
assert not h.can_df()
h.shutdown()

h = connect()
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
assert h.can_df()

# A read over hole + data + hole comes back with OFFSET_HOLE chunks.
chunks = []


def chunk(buf, offset, status, err):
    chunks.append((offset, len(buf), status))
    return 0


buf = h.pread_structured(3 * MiB, 0, chunk)
assert buf[:MiB] == bytes(MiB)
assert buf[MiB:MiB + 65536] == b"A" * 65536
assert buf[MiB + 65536:] == bytes(2 * MiB - 65536)
kinds = [c[2] for c in chunks]
assert nbd.READ_HOLE in kinds and nbd.READ_DATA in kinds, chunks
assert sum(c[1] for c in chunks) == 3 * MiB, chunks

# DF: one data chunk only.
chunks.clear()
h.pread_structured(128 * 1024, MiB - 65536, chunk, nbd.CMD_FLAG_DF)
assert len(chunks) == 1 and chunks[0][2] == nbd.READ_DATA, chunks

# Block status, full and REQ_ONE.
extents = []


def ext(metacontext, offset, entries, err):
    assert metacontext == "base:allocation"
    extents.append(list(entries))
    return 0


h.block_status(4 * MiB, 0, ext)
flat = extents[-1]
pairs = list(zip(flat[0::2], flat[1::2]))
assert pairs[0] == (MiB, 3), pairs
assert pairs[1] == (65536, 0), pairs
h.block_status(4 * MiB, 0, ext, nbd.CMD_FLAG_REQ_ONE)
assert len(extents[-1]) == 2 and extents[-1][0] <= 4 * MiB, extents[-1]

# FUA write, then read back.
h.pwrite(b"fua!" * 128, 2 * MiB, nbd.CMD_FLAG_FUA)
assert h.pread(512, 2 * MiB) == b"fua!" * 128

# Write zeroes with FAST_ZERO (raw files zero cheaply) and NO_HOLE.
h.pwrite(b"z" * 4096, 3 * MiB)
h.zero(4096, 3 * MiB, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(4096, 3 * MiB) == bytes(4096)
h.pwrite(b"z" * 4096, 3 * MiB)
h.zero(4096, 3 * MiB, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4096, 3 * MiB) == bytes(4096)

# Out of range: EINVAL, and the connection goes on.
size = h.get_size()
for fn in (lambda: h.pread(512, size), lambda: h.pwrite(b"x" * 512, size - 256),
           lambda: h.trim(4096, size), lambda: h.zero(1, size)):
    try:
        fn()
        raise AssertionError("out-of-range request succeeded")
    except nbd.Error as e:
        assert e.errno == "EINVAL", e
assert h.pread(16, MiB) == b"A" * 16

# A zero-length read is fine.
assert h.pread(0, 0) == b""

# Flush and cache.
h.flush()
h.cache(MiB, 0)
h.shutdown()
print("ok")
