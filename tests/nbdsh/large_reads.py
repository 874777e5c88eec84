"""Large reads, which the server may splice from the page cache: every byte as in the file,
at any offset and length, simple and structured, many in flight, over the ragged tail, and
after the file shrank under the server (those bytes read as zeroes, the connection lives on).

Usage: large_reads.py URI PATH [OUTER OFFSET]
PATH holds the export's bytes (8 MiB + 300); the export is PATH itself, or the part of file
OUTER from OFFSET on (a slice), which is then the file shrunk; OUTER "-": the export is not
a plain file (an image format), nothing is shrunk.
"""
import os
import sys

import nbd

uri, path = sys.argv[1], sys.argv[2]
outer, base = (sys.argv[3], int(sys.argv[4])) if len(sys.argv) > 4 else (path, 0)
KiB, MiB = 1 << 10, 1 << 20

with open(path, "rb") as f:
    data = f.read()
probe = nbd.NBD()
probe.connect_uri(uri)
size = probe.get_size()
probe.shutdown()
assert len(data) <= size < len(data) + 512, (len(data), size)
expect = data + bytes(size - len(data))


def connect(structured):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri(uri)
    # Unaligned requests too, even where the server advertises a minimum block size.
    h.set_strict_mode(0)
    return h


def check(h, off, n):
    got = h.pread(n, off)
    assert got == expect[off : off + n], f"read of {n} at {off} differs"


def check_df(h, off, n):
    """With DF the reply is one data chunk: no holes looked for first."""
    chunks = []
    got = h.pread_structured(
        n, off, lambda buf, o, status, err: chunks.append((o, status)), nbd.CMD_FLAG_DF
    )
    assert chunks == [(off, nbd.READ_DATA)], chunks
    assert got == expect[off : off + n], f"DF read of {n} at {off} differs"


for structured in (True, False):
    h = connect(structured)
    for off in (0, 17, 4095, MiB + 512, 3 * MiB + 4096):
        for n in (64 * KiB, 100 * KiB + 3, MiB, 4 * MiB):
            check(h, off, n)
    if structured:
        check_df(h, 4096, 2 * MiB)
    # Over the end of the file: the bytes, then the zeroes of the last sector.
    check(h, size - 128 * KiB, 128 * KiB)
    # Many in flight at once, replies in any order.
    bufs = []
    for i in range(48):
        off = (i * 151 * KiB) % (size - MiB)
        b = nbd.Buffer(MiB if i % 3 else 96 * KiB)
        h.aio_pread(b, off)
        bufs.append((off, b))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for off, b in bufs:
        got = b.to_bytearray()
        assert got == expect[off : off + len(got)], f"aio read at {off} differs"
    h.shutdown()

if outer == "-":
    print("ok")
    sys.exit(0)
# The file shrinks under the server: what is gone reads as zeroes, and nothing breaks.
h = connect(True)
os.truncate(outer, base + 2 * MiB)
expect = data[: 2 * MiB] + bytes(size - 2 * MiB)
check(h, MiB + MiB // 2, MiB)
check(h, 3 * MiB, MiB)
check(h, 0, 4 * MiB)
h.shutdown()
print("ok")
