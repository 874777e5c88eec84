"""Large writes, whose payload the server may splice from the socket into the page cache:
every byte lands where it was sent, at any offset and length, with and without FUA, simple
and structured, many in flight, and a refused one (past the end) costs nothing but its error.
After a flush the file holds exactly what the client wrote.

Usage: large_writes.py URI PATH [OFFSET]
PATH is the file the export lies in, the export starting at OFFSET (a slice) or 0.
"""
import errno
import random
import sys

import nbd

uri, path = sys.argv[1], sys.argv[2]
base = int(sys.argv[3]) if len(sys.argv) > 3 else 0
KiB, MiB = 1 << 10, 1 << 20
rng = random.Random(7)


def connect(structured):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri(uri)
    # Unaligned requests too, even where the server advertises a minimum block size.
    h.set_strict_mode(0)
    return h


h = connect(True)
size = h.get_size()
with open(path, "rb") as f:
    f.seek(base)
    model = bytearray(f.read(size))
model += bytes(size - len(model))
h.shutdown()


def pattern(n):
    return bytes(rng.getrandbits(8) for _ in range(min(n, 4096))) * (n // 4096 + 1)


def write(h, off, n, flags=0):
    data = pattern(n)[:n]
    h.pwrite(data, off, flags)
    model[off : off + n] = data


for structured in (True, False):
    h = connect(structured)
    for off in (0, 17, 4095, MiB + 512, 3 * MiB + 4096):
        for n in (64 * KiB, 100 * KiB + 3, MiB, 4 * MiB):
            write(h, off, n)
            assert h.pread(n, off) == model[off : off + n], f"write of {n} at {off}"
    write(h, 2 * MiB + 9, MiB, nbd.CMD_FLAG_FUA)
    # Up to the last byte of the export (a ragged tail is part of it).
    write(h, size - 200 * KiB, 200 * KiB)
    # Past the end: refused, and the connection goes on.
    try:
        h.pwrite(bytes(MiB), size - 512 * KiB)
        raise AssertionError("a write past the end was accepted")
    except nbd.Error as e:
        assert e.errnum == errno.EINVAL, e
    # Many in flight at once, disjoint, mixed with reads.
    bufs = []
    for i in range(24):
        off = 5 * KiB + i * 300 * KiB
        n = 256 * KiB if i % 2 else 96 * KiB + 11
        data = pattern(n)[:n]
        h.aio_pwrite(data, off)
        model[off : off + n] = data
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for i in range(0, size - MiB, 700 * KiB):
        assert h.pread(MiB, i) == model[i : i + MiB], f"read at {i} after aio writes"
    h.flush()
    h.shutdown()

with open(path, "rb") as f:
    f.seek(base)
    on_disk = f.read(size)
assert on_disk == model[: len(on_disk)], "the file differs from what was written"
print("ok")
