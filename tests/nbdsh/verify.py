"""Concurrent data verifier for a live NBD server: every acknowledged write must be readable.

Usage (needs Debian's libnbd bindings, so run it with /usr/bin/python3):

    qemu-nbd -t -e 0 -f qcow2 -k /tmp/x.sock IMG &        # or qnbd, same options
    /usr/bin/python3 tests/nbdsh/verify.py 'nbd+unix:///?socket=/tmp/x.sock' \\
        [--conns 4] [--writes 20000] [--depth 16] [--seed 1] [--max-len 256K] \\
        [--trim-zeroes[=ALIGN]] [--no-trim] [--no-zero] [--no-fast-zero] [--region LO:HI]
        [--strict-fast-zero] [--seconds S] [--flush-may-fail]

What it does
------------
It opens N libnbd handles to URI, reads the region (default: the whole export) into a model
(a bytearray, plus a per-512-byte-sector state: known or unknown), then drives the handles from
one select() loop with the aio API, keeping up to D requests in flight on each handle.

The requests come from a deterministic stream (same --seed, same stream: offsets, lengths,
flags, data and the handle each one goes to; only the server's timing differs from run to run):
WRITE (a quarter with FUA), WRITE_ZEROES (some with NO_HOLE, some with FAST_ZERO, some with FUA),
TRIM, FLUSH and READ. Offsets and lengths are whole 512-byte sectors, lengths skewed small
(half are at most 4 KiB, a sixth go up to --max-len), offsets clustered around a hot spot that
moves, and a quarter of the stream cuts one 4 KiB (sometimes 64 KiB) block into 2-4 pieces sent
back to back on different handles, e.g. a 512-byte WRITE at the start of a 4 KiB block and a
WRITE_ZEROES of the other 3584 bytes in flight together: this is what finds read-modify-write
races and cluster-allocation races. The stream waits for its next request until that request's
handle has room and its sectors are free.

Every write carries recognisable data: each 512-byte sector starts with b'QVFY', the request
number (u32) and the absolute sector number (u64), and the other 496 bytes come from a seeded
random pool at an offset that depends on both, so a wrong sector can be traced to its writer.

Rules checked
-------------
1. Requests in flight at the same time never overlap (a shared busy map of sectors); apart from
   that any handle may touch any range at any time, and the model is updated when a request
   completes. So when a READ completes, every KNOWN sector it covers must equal the model.
2. A successful WRITE makes its sectors known with its data; a successful WRITE_ZEROES makes
   them known zeroes. A WRITE_ZEROES with FAST_ZERO that fails with ENOTSUP leaves each of its
   sectors either as it was or zeroed: the NBD spec only says the server "SHOULD NOT alter the
   contents of the export" then, and qemu-nbd 10 does zero the first part of a long request
   before it fails (the next READ of such a sector settles which one it is).
   --strict-fast-zero enforces the SHOULD: the data must be unchanged.
3. TRIM makes its sectors UNKNOWN (not checked until rewritten): the server may keep the old
   data, zero it, or anything in between. With --trim-zeroes=ALIGN the whole ALIGN-aligned
   blocks inside a TRIM become known zeroes and the rest of it unknown: for qcow2 without a
   backing file served with --discard=unmap, pass the cluster size (qemu-nbd and qnbd both
   discard whole clusters only and leave the data of a partly trimmed cluster alone).
   --trim-zeroes without a value means ALIGN=512 (every trimmed sector reads back as zero).
4. Any NBD error other than that ENOTSUP is a failure (the tool only sends valid requests).
5. A READ on one handle sees what was acknowledged on every other handle. That holds for a
   server with one cache shared by all connections, as qemu-nbd and qnbd are; the NBD spec
   itself only promises it after FLUSH or FUA and with NBD_FLAG_CAN_MULTI_CONN, so for other
   servers use --conns 1 (the tool prints a note when multi-conn is not advertised).
6. At the end every handle flushes, then the whole region is read back on the first handle and
   compared with the model (known sectors only); sectors outside the region are not modelled.

Exit status 0 and one summary line if nothing was wrong; otherwise exit 1 after printing the
first bad sectors (offset, the expected writer, what was found: another write's number, "zeroes",
"old" = the content before the run, or "foreign" bytes) and any unexpected errors.
"""
import argparse
import errno
import math
import os
import random
import select
import sys
import time
from array import array

import nbd
from nbdsafety import SECTOR, ZERO_SECTOR, Pattern, aligned, parse_size


READ, WRITE, ZERO, TRIM, FLUSH = "READ", "WRITE", "ZERO", "TRIM", "FLUSH"
# Sector states in the model.
UNKNOWN, KNOWN, OLD_OR_ZERO = 0, 1, 2
ALL_KNOWN = bytes([KNOWN]) * (1 << 20)


class Op:
    __slots__ = ("id", "kind", "off", "len", "flags", "conn", "data", "buf", "issued", "done",
                 "err")

    def __init__(self, id, kind, off, length, flags, conn):
        self.id, self.kind, self.off, self.len, self.flags, self.conn = (
            id, kind, off, length, flags, conn)
        self.data = self.buf = None
        self.issued = self.done = self.err = None

    def __str__(self):
        fl = []
        if self.flags & nbd.CMD_FLAG_FUA:
            fl.append("FUA")
        if self.flags & nbd.CMD_FLAG_NO_HOLE:
            fl.append("NO_HOLE")
        if self.flags & nbd.CMD_FLAG_FAST_ZERO:
            fl.append("FAST_ZERO")
        s = "#%d %s%s conn %d" % (self.id, self.kind, "|" + "|".join(fl) if fl else "", self.conn)
        if self.kind != FLUSH:
            s += " [%d, +%d)" % (self.off, self.len)
        return s


def op_stream(args, caps, lo, hi):
    """Deterministic stream of requests; yields Op objects (READs do not count as writes)."""
    rng = random.Random(args.seed)
    nsec_region = (hi - lo) // SECTOR
    max_sec = max(1, args.max_len // SECTOR)
    kinds = [(WRITE, 55)]
    if caps["zero"]:
        kinds.append((ZERO, 15))
    if caps["trim"]:
        kinds.append((TRIM, 7))
    if caps["flush"]:
        kinds.append((FLUSH, 3))
    kinds.append((READ, 20))
    kind_names = [k for k, _ in kinds]
    kind_weights = [w for _, w in kinds]

    def pick_len():
        r = rng.random()
        short = 1.0 - args.long_share
        if r < short * 0.5 / 0.83:
            n = rng.randint(1, min(8, max_sec))
        elif r < short:
            n = int(2 ** rng.uniform(0, 7))  # up to 64 KiB
        else:
            n = int(2 ** rng.uniform(0, max(0.0, math.log2(max_sec))))
        return max(1, min(n, max_sec, nsec_region))

    def make(kind, sec, nsec):
        nonlocal next_id
        if kind != FLUSH:
            sec, nsec = aligned(sec, nsec, args.align // SECTOR, nsec_region)
        flags = 0
        if kind == WRITE and caps["fua"] and rng.random() < 0.25:
            flags |= nbd.CMD_FLAG_FUA
        elif kind == ZERO:
            r = rng.random()
            if r < 0.3:
                flags |= nbd.CMD_FLAG_NO_HOLE
            elif r < 0.5 and caps["fast_zero"]:
                flags |= nbd.CMD_FLAG_FAST_ZERO
            if caps["fua"] and rng.random() < 0.2:
                flags |= nbd.CMD_FLAG_FUA
        op = Op(next_id, kind, lo + sec * SECTOR, nsec * SECTOR, flags, rng.randrange(args.conns))
        next_id += 1
        return op

    next_id = 1
    writes = 0
    hot = rng.randrange(nsec_region)
    last_end = 0
    while writes < args.writes:
        if rng.random() < 0.01:
            hot = rng.randrange(nsec_region)
        r = rng.random()
        if r < 0.25:
            # Cut one block into 2-4 pieces sent back to back.
            bsec = 8 if rng.random() < 0.8 else 128
            bsec = min(bsec, nsec_region)
            base = (hot + rng.randrange(-1024, 1024)) % nsec_region
            base -= base % bsec
            if base + bsec > nsec_region:
                base = 0
            ncut = rng.randint(1, min(3, bsec - 1)) if bsec > 1 else 0
            cuts = sorted(rng.sample(range(1, bsec), ncut)) if ncut else []
            bounds = [0] + cuts + [bsec]
            pieces = list(zip(bounds, bounds[1:]))
            rng.shuffle(pieces)
            for a, b in pieces:
                if writes >= args.writes:
                    break
                kind = rng.choices(kind_names, kind_weights)[0]
                if kind == FLUSH:
                    kind = WRITE
                if kind != READ:
                    writes += 1
                yield make(kind, base + a, b - a)
            last_end = base + bsec
            continue
        kind = rng.choices(kind_names, kind_weights)[0]
        if kind == FLUSH:
            writes += 1
            yield make(FLUSH, 0, 0)
            continue
        nsec = pick_len()
        if r < 0.45:
            sec = last_end  # right after the previous request
        elif r < 0.9:
            window = 512 if rng.random() < 0.5 else 4096
            sec = hot + rng.randrange(-window, window)
        else:
            sec = rng.randrange(nsec_region)
        sec = max(0, min(sec, nsec_region - nsec))
        if kind != READ:
            writes += 1
        last_end = sec + nsec if sec + nsec < nsec_region else 0
        yield make(kind, sec, nsec)


class Conn:
    def __init__(self, uri, i):
        self.i = i
        self.h = nbd.NBD()
        self.h.set_handle_name("verify%d" % i)
        # The TLS tests name their certificate directory or PSK file in the URI.
        self.h.set_uri_allow_local_file(True)
        self.h.connect_uri(uri)
        self.fd = self.h.aio_get_fd()
        self.inflight = 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("uri")
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--writes", type=int, default=20000)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-len", type=parse_size, default=256 << 10)
    ap.add_argument("--long-share", type=float, default=0.17,
                    help="share of lengths drawn up to --max-len (the rest are up to 64 KiB)")
    ap.add_argument("--align", type=parse_size, default=SECTOR,
                    help="offsets and lengths in multiples of this (page-aligned requests "
                         "take other paths in a server)")
    ap.add_argument("--trim-zeroes", nargs="?", const="512", default=None, metavar="ALIGN",
                    help="TRIMmed sectors read back as zeroes (only whole ALIGN blocks, if given)")
    ap.add_argument("--no-trim", action="store_true")
    ap.add_argument("--no-zero", action="store_true")
    ap.add_argument("--no-fast-zero", action="store_true")
    ap.add_argument("--region", default=None, metavar="LO:HI")
    ap.add_argument("--strict-fast-zero", action="store_true",
                    help="a FAST_ZERO failing with ENOTSUP must leave the data unchanged")
    ap.add_argument("--flush-may-fail", action="store_true",
                    help="a FLUSH may fail with EIO (a re-export whose server was lost with "
                         "unflushed writes says so): counted, not an error")
    ap.add_argument("--max-report", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=None,
                    help="stop issuing requests after S seconds (or --writes, if sooner)")
    ap.add_argument("--keep-ops", type=int, default=200000,
                    help="requests remembered for error reports (bounds memory on long runs)")
    args = ap.parse_args()
    trim_align = parse_size(args.trim_zeroes) if args.trim_zeroes is not None else None
    if trim_align is not None and (trim_align < SECTOR or trim_align % SECTOR):
        ap.error("--trim-zeroes ALIGN must be a multiple of 512")
    if args.max_len < SECTOR:
        ap.error("--max-len must be at least 512")

    t0 = time.monotonic()
    conns = [Conn(args.uri, i) for i in range(args.conns)]
    h0 = conns[0].h
    size = h0.get_size()
    lo, hi = 0, size - size % SECTOR
    if args.region:
        a, b = args.region.split(":")
        lo, hi = parse_size(a), parse_size(b)
        if lo % SECTOR or hi % SECTOR or not 0 <= lo < hi <= size:
            ap.error("--region must be 512-aligned inside the export (size %d)" % size)
    if hi <= lo:
        ap.error("export too small")
    caps = {
        "fua": h0.can_fua(), "flush": h0.can_flush(),
        "zero": h0.can_zero() and not args.no_zero,
        "trim": h0.can_trim() and not args.no_trim,
        "fast_zero": (h0.can_fast_zero() and h0.can_zero() and not args.no_zero
                      and not args.no_fast_zero),
    }
    pat = Pattern(args.seed)
    if args.conns > 1 and not h0.can_multi_conn():
        print("verify: note: the server does not advertise multi-conn; reads on one "
              "connection are still expected to see writes acknowledged on the others")

    # The model: the region's content, known/unknown per sector, last writer per sector.
    model = bytearray(hi - lo)
    chunk = 4 << 20
    for off in range(0, hi - lo, chunk):
        n = min(chunk, hi - lo - off)
        model[off:off + n] = h0.pread(n, lo + off)
    initial = bytes(model)
    nsec = (hi - lo) // SECTOR
    known = bytearray(ALL_KNOWN[:1]) * nsec
    busy = bytearray(nsec)
    lastop = array("l", [0]) * nsec
    ops_by_id = {}

    stats = dict(writes=0, fua=0, zero=0, trim=0, flush=0, reads=0, enotsup=0, flush_eio=0)
    bad = {}          # sector index -> report line
    errors = []       # unexpected NBD errors
    state = {"inflight": 0, "seq": 0}

    def expected_desc(sec):
        b = model[sec * SECTOR:(sec + 1) * SECTOR]
        d = pat.describe(b, lo // SECTOR + sec, initial[sec * SECTOR:(sec + 1) * SECTOR])
        w = lastop[sec]
        if w and w in ops_by_id and not d.startswith("write"):
            d += " (from %s)" % ops_by_id[w]
        return d

    def check(where, off_rel, got):
        """Compare got (bytes at region offset off_rel) with the model's known sectors."""
        n = len(got)
        s, e = off_rel // SECTOR, (off_rel + n) // SECTOR
        mv = memoryview(model)[off_rel:off_rel + n]
        if mv == got and known.find(0, s, e) == -1 and known.find(2, s, e) == -1:
            return
        gv = memoryview(got)
        for i in range(s, e):
            k = known[i]
            if k == UNKNOWN:
                continue
            a = (i - s) * SECTOR
            if mv[a:a + SECTOR] == gv[a:a + SECTOR]:
                known[i] = KNOWN
                continue
            if k == OLD_OR_ZERO and gv[a:a + SECTOR] == ZERO_SECTOR:
                mv[a:a + SECTOR] = ZERO_SECTOR   # resolved: the failed fast zero did zero it
                known[i] = KNOWN
                continue
            if i not in bad:
                ab = lo // SECTOR + i
                bad[i] = "  offset %d (sector %d), %s: expected %s%s, found %s" % (
                    ab * SECTOR, ab, where, expected_desc(i),
                    " or zeroes" if k == OLD_OR_ZERO else "",
                    pat.describe(gv[a:a + SECTOR], ab, initial[i * SECTOR:(i + 1) * SECTOR]))

    def complete(op, err):
        try:
            return completed(op, err)
        except Exception as ex:  # an exception must not vanish inside libnbd
            errors.append("internal error completing %s: %r" % (op, ex))
            return 1

    def completed(op, err):
        state["seq"] += 1
        op.done, op.err = state["seq"], err
        c = conns[op.conn]
        c.inflight -= 1
        state["inflight"] -= 1
        s, e = (op.off - lo) // SECTOR, (op.off - lo + op.len) // SECTOR
        r0 = op.off - lo
        if err:
            if op.kind == ZERO and op.flags & nbd.CMD_FLAG_FAST_ZERO and err == errno.ENOTSUP:
                # The spec only says SHOULD NOT alter the export here (qemu-nbd does zero
                # some of a long request): each sector keeps its old data or reads zeroes.
                stats["enotsup"] += 1
                for i in range(s, e) if not args.strict_fast_zero else ():
                    if known[i] == KNOWN:
                        known[i] = OLD_OR_ZERO
            elif op.kind == FLUSH and err == errno.EIO and args.flush_may_fail:
                stats["flush_eio"] += 1
            else:
                errors.append("%s failed: %s" % (op, os.strerror(err)))
        elif op.kind == WRITE:
            model[r0:r0 + op.len] = op.data
            known[s:e] = ALL_KNOWN[:e - s]
            lastop[s:e] = array("l", [op.id]) * (e - s)
        elif op.kind == ZERO:
            model[r0:r0 + op.len] = bytes(op.len)
            known[s:e] = ALL_KNOWN[:e - s]
            lastop[s:e] = array("l", [op.id]) * (e - s)
        elif op.kind == TRIM:
            known[s:e] = bytes(e - s)
            if trim_align is not None:
                a = -(-op.off // trim_align) * trim_align
                b = (op.off + op.len) // trim_align * trim_align
                if b > a:
                    zs, ze = (a - lo) // SECTOR, (b - lo) // SECTOR
                    model[a - lo:b - lo] = bytes(b - a)
                    known[zs:ze] = ALL_KNOWN[:ze - zs]
                    lastop[zs:ze] = array("l", [op.id]) * (ze - zs)
        elif op.kind == READ:
            check("read %s" % op, r0, op.buf)
        if op.kind != FLUSH:
            busy[s:e] = bytes(e - s)
        op.data = op.buf = None
        return 1

    def issue(op):
        state["seq"] += 1
        op.issued = state["seq"]
        c = conns[op.conn]
        h = c.h
        s, e = (op.off - lo) // SECTOR, (op.off - lo + op.len) // SECTOR
        cb = lambda err, op=op: complete(op, err.value)
        if op.kind == WRITE:
            op.data = pat.data(op.id, op.off // SECTOR, op.len // SECTOR)
            h.aio_pwrite(op.data, op.off, completion=cb, flags=op.flags)
            stats["writes"] += 1
            if op.flags & nbd.CMD_FLAG_FUA:
                stats["fua"] += 1
        elif op.kind == ZERO:
            h.aio_zero(op.len, op.off, completion=cb, flags=op.flags)
            stats["writes"] += 1
            stats["zero"] += 1
            if op.flags & nbd.CMD_FLAG_FUA:
                stats["fua"] += 1
        elif op.kind == TRIM:
            h.aio_trim(op.len, op.off, completion=cb, flags=op.flags)
            stats["writes"] += 1
            stats["trim"] += 1
        elif op.kind == FLUSH:
            h.aio_flush(completion=cb)
            stats["writes"] += 1
            stats["flush"] += 1
        else:
            op.buf = bytearray(op.len)
            h.aio_pread(nbd.Buffer.from_buffer(op.buf), op.off, completion=cb)
            stats["reads"] += 1
        if op.kind != FLUSH:
            busy[s:e] = b"\x01" * (e - s)
        c.inflight += 1
        state["inflight"] += 1

    by_fd = {c.fd: c for c in conns}

    def pump():
        rl, wl = [], []
        for c in conns:
            d = c.h.aio_get_direction()
            if d & nbd.AIO_DIRECTION_READ:
                rl.append(c.fd)
            if d & nbd.AIO_DIRECTION_WRITE:
                wl.append(c.fd)
        r, w, _ = select.select(rl, wl, [], 30)
        if not r and not w:
            raise SystemExit("verify: FAIL: no progress for 30 s with %d requests in flight"
                             % state["inflight"])
        for fd in w:
            by_fd[fd].h.aio_notify_write()
        for fd in r:
            by_fd[fd].h.aio_notify_read()

    stream = op_stream(args, caps, lo, hi)
    pending = None
    try:
        while True:
            while True:
                if pending is None:
                    if args.seconds is not None and time.monotonic() - t0 > args.seconds:
                        stream = iter(())
                    pending = next(stream, None)
                    if pending is None:
                        break
                    ops_by_id[pending.id] = pending
                    if len(ops_by_id) > args.keep_ops:
                        del ops_by_id[next(iter(ops_by_id))]
                op = pending
                if conns[op.conn].inflight >= args.depth:
                    break
                if op.kind != FLUSH:
                    s = (op.off - lo) // SECTOR
                    if busy.find(1, s, s + op.len // SECTOR) != -1:
                        break
                issue(op)
                pending = None
            if pending is None and state["inflight"] == 0:
                break
            pump()
        # Final pass: flush everywhere, then read the whole region back.
        for c in conns:
            if caps["flush"]:
                try:
                    c.h.flush()
                except nbd.Error as ex:
                    if not (args.flush_may_fail and ex.errnum == errno.EIO):
                        raise
                    stats["flush_eio"] += 1
        for off in range(0, hi - lo, chunk):
            n = min(chunk, hi - lo - off)
            check("final read", off, h0.pread(n, lo + off))
    except nbd.Error as ex:
        errors.append("NBD error: %s" % ex)
    for c in conns:
        try:
            c.h.shutdown()
        except nbd.Error:
            pass

    elapsed = time.monotonic() - t0
    st = stats
    summary = ("verify: %d writes (%d FUA, %d zero, %d trim, %d flush, %d reads) %s, %d lost"
               % (st["writes"], st["fua"], st["zero"], st["trim"], st["flush"], st["reads"],
                  "verified" if not bad and not errors else "FAILED", len(bad)))
    extra = " [%d conns, depth %d, seed %d, region %d:%d, %.1f s" % (
        args.conns, args.depth, args.seed, lo, hi, elapsed)
    if st["enotsup"]:
        extra += ", %d fast-zero ENOTSUP" % st["enotsup"]
    if st["flush_eio"]:
        extra += ", %d flush EIO" % st["flush_eio"]
    print(summary + extra + "]")
    if bad:
        print("bad sectors (first %d of %d):" % (min(args.max_report, len(bad)), len(bad)))
        for i in sorted(bad)[:args.max_report]:
            print(bad[i])
        print("requests on the first bad sectors (issue/completion are event numbers):")
        for i in sorted(bad)[:3]:
            off = lo + i * SECTOR
            print("  offset %d:" % off)
            hist = [op for op in ops_by_id.values()
                    if op.kind != FLUSH and op.off <= off < op.off + op.len and op.issued]
            if len(hist) > 12:
                print("    ... %d earlier" % (len(hist) - 12))
            for op in hist[-12:]:
                print("    %s issued %s completed %s%s" % (
                    op, op.issued, op.done,
                    "" if not op.err else " error " + errno.errorcode.get(op.err, "?")))
    for e in errors[:args.max_report]:
        print("error: " + e)
    if len(errors) > args.max_report:
        print("... %d errors in all" % len(errors))
    sys.exit(1 if bad or errors else 0)


if __name__ == "__main__":
    main()
