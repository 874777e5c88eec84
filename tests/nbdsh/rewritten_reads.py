"""Large reads of a writable image between writes, zeroings and copies over the same
ranges, which the server may splice from the page cache: every read returns what the
writes before it left, never an earlier write's bytes or another range's. Writes go in
batches in flight together over disjoint ranges; reads then go many at a time.

Usage: rewritten_reads.py URI SEED
"""
import random
import sys

import nbd

uri, seed = sys.argv[1], int(sys.argv[2])
KiB, MiB = 1 << 10, 1 << 20
rng = random.Random(seed)

h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
model = bytearray(h.pread(size, 0)) if size <= 64 * MiB else None
assert model is not None, size


def some_range(align):
    n = rng.choice([4 * KiB, 64 * KiB, 100 * KiB + 3, MiB, 3 * MiB + 512])
    n = min(n, size)
    off = rng.randrange(0, size - n + 1)
    return (off - off % align, n) if off - off % align + n <= size else (off, n)


def disjoint(ranges, off, n):
    return all(off + n <= o or o + m <= off for o, m in ranges)


def drain():
    while h.aio_in_flight() > 0:
        h.poll(-1)


trimmed = []
for rnd in range(40):
    done = []
    for _ in range(8):
        off, n = some_range(rng.choice([1, 512, 64 * KiB]))
        if not disjoint(done, off, n):
            continue
        done.append((off, n))
        kind = rng.random()
        if kind < 0.7:
            data = bytes([rng.randrange(256)]) * 7 + rng.randbytes(1) + bytes(rnd & 0xFF)
            data = (data * (n // len(data) + 1))[:n]
            h.aio_pwrite(data, off)
            model[off : off + n] = data
        elif kind < 0.9:
            h.aio_zero(n, off, flags=rng.choice([0, nbd.CMD_FLAG_NO_HOLE]))
            model[off : off + n] = bytes(n)
        elif h.can_trim():
            h.aio_trim(n, off)
            trimmed.append((off, n))
    drain()
    # A trimmed range reads as it was or as zeroes, sector by sector (unaligned edges and
    # partial clusters stay as they were); what it reads now is what later reads must see.
    for off, n in trimmed:
        got = h.pread(n, off)
        for s in range(off - off % 512, off + n, 512):
            a, b = max(s, off) - off, min(s + 512, off + n) - off
            assert got[a:b] in (model[off + a : off + b], bytes(b - a)), f"trim at {off}"
        model[off : off + n] = got
    trimmed.clear()
    reads = []
    for _ in range(12):
        off, n = some_range(rng.choice([1, 4 * KiB, 64 * KiB]))
        buf = nbd.Buffer(n)
        reads.append((off, n, buf, h.aio_pread(buf, off)))
    drain()
    for off, n, buf, _ in reads:
        got = buf.to_bytearray()
        assert got == model[off : off + n], f"round {rnd}: read of {n} at {off} differs"
    if rnd % 10 == 9:
        h.flush()
h.shutdown()
print("ok")
