"""Holes in reads of any size, as qemu-nbd sends them (libnbd's interop structured-read).

Usage: holes.py URI KIND
  KIND raw:   a raw export with --discard=unmap, 1 MiB: 'A'*64K at 64 KiB, the rest a hole.
  KIND qcow2: qemu-nbd's own case: a 3 KiB qcow2 with 512-byte clusters, all 1s but for a
              zero cluster at 2 KiB.
Every structured read without DF comes back as OFFSET_HOLE and OFFSET_DATA chunks in
order; with DF, as one data chunk.
"""
import sys

import nbd

uri, kind = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.connect_uri(uri)
chunks = []


def chunk(buf, offset, status, err):
    chunks.append((offset, len(buf), status, bytes(buf[:1])))
    return 0


def read(count, offset, flags=0):
    chunks.clear()
    buf = h.pread_structured(count, offset, chunk, flags)
    return buf, list(chunks)


HOLE, DATA = nbd.READ_HOLE, nbd.READ_DATA
if kind == "qcow2":
    buf, got = read(1024, 2048)
    assert got == [(2048, 512, HOLE, b"\0"), (2560, 512, DATA, b"\1")], got
    assert buf == bytes(512) + b"\1" * 512
    buf, got = read(1024, 2048, nbd.CMD_FLAG_DF)
    assert got == [(2048, 1024, DATA, b"\0")], got
    buf, got = read(3072, 0)
    assert got == [(0, 2048, DATA, b"\1"), (2048, 512, HOLE, b"\0"),
                   (2560, 512, DATA, b"\1")], got
else:
    K = 1024
    # Small reads: across the start of the data, inside it, inside the hole.
    buf, got = read(8 * K, 60 * K)
    assert got == [(60 * K, 4 * K, HOLE, b"\0"), (64 * K, 4 * K, DATA, b"A")], got
    assert buf == bytes(4 * K) + b"A" * 4 * K
    buf, got = read(4 * K, 100 * K)
    assert got == [(100 * K, 4 * K, DATA, b"A")], got
    buf, got = read(4 * K, 512 * K)
    assert got == [(512 * K, 4 * K, HOLE, b"\0")], got
    assert buf == bytes(4 * K)
    # A trim punches a hole inside data read a moment ago: the next read sees it, and
    # writing there again makes it data again.
    h.trim(4 * K, 96 * K)
    buf, got = read(12 * K, 92 * K)
    assert got == [(92 * K, 4 * K, DATA, b"A"), (96 * K, 4 * K, HOLE, b"\0"),
                   (100 * K, 4 * K, DATA, b"A")], got
    h.pwrite(b"B" * 4 * K, 96 * K)
    buf, got = read(12 * K, 92 * K)
    assert got == [(92 * K, 12 * K, DATA, b"A")], got
    assert buf == b"A" * 4 * K + b"B" * 4 * K + b"A" * 4 * K
    # Zeroes that may be punched (write_zeroes without NO_HOLE) read as a hole.
    h.zero(4 * K, 96 * K)
    buf, got = read(4 * K, 96 * K)
    assert got == [(96 * K, 4 * K, HOLE, b"\0")], got
h.shutdown()
print("ok")
