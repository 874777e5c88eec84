"""kill -9 crash loop: what an NBD server acknowledged as durable must survive SIGKILL.

Usage (needs Debian's libnbd bindings, so run it with /usr/bin/python3):

    /usr/bin/python3 tests/nbdsh/crash.py \\
        --server 'qemu-nbd -t -e 0 -f qcow2 -k {sock} {img}' \\
        --create 'qemu-img create -q -f qcow2 -o cluster_size=4096 {img} 64M' \\
        --format qcow2 [--rounds 20] [--conns 8] [--depth 8] [--seed 1] \\
        [--min-kill 0.1] [--max-kill 0.9] [--prefill] [--keep-failed DIR] [--workdir DIR]

{img} and {sock} are replaced by paths in --workdir (default: a new directory in /var/tmp, as
/tmp may be a tmpfs where O_DIRECT, `-n`, fails). --server is split like a shell line and run
directly (no shell), so the process that gets SIGKILL is the server itself; the tool adds no
options: the template must allow --conns connections (`-e 0` or `-e N`) and may need `-t`.
--create runs through /bin/sh.

Each round
----------
1. Run --create on a fresh path. With --prefill, start the server once, write a recognisable
   pattern (b'OLD!' + sector number + filler) into the first 64 KiB of every 128 KiB of the
   region, flush, disconnect and stop the server with SIGTERM (so half the clusters start
   allocated, half not).
2. Start the server, wait for its socket, connect --conns libnbd handles and drive them from one
   select() loop, up to --depth requests in flight on each: WRITEs of 512 B .. --max-len
   (lengths skewed small, offsets clustered around a moving hot spot, and a quarter of the
   stream cuts one 4 KiB or 64 KiB block into 2-4 pieces sent back to back on different
   handles), --fua of them with FUA, WRITE_ZEROES (some with NO_HOLE, some with FUA) and a
   FLUSH on a handle about every --flush-every requests. Requests in flight at the same time
   never overlap (a busy map of sectors); otherwise any handle may touch any range. The
   request stream is fixed by --seed and the round number; so is the kill delay.
3. After a delay drawn from [--min-kill, --max-kill] seconds, SIGKILL the server process and
   wait for it; requests cut off by the kill fail (ENOTCONN) and are ignored. Replies already
   received count: the server sent them before it died.
4. For qcow2, `qemu-img check -f qcow2 IMG` must exit 0, or 3 (leaked clusters only, harmless)
   with no "ERROR" line; exit 2 or an ERROR line is a CORRUPT IMAGE.
5. `qemu-img convert -f FORMAT -O raw IMG OUT` (an independent reader) and every 512-byte sector
   of the region is checked against the rule below.

Durability rule (NBD spec, "Ordering of messages and writes", NBD_FLAG_CAN_MULTI_CONN)
------------------------------------------------------------------------------------
Every WRITE and WRITE_ZEROES is a VERSION of each sector it covers (zeroes for WRITE_ZEROES).
Versions of one sector are totally ordered: a request is only sent once every earlier request
overlapping it has completed. A version is DURABLE if
  a) it was acknowledged (successful reply) and carried FUA, or
  b) it was acknowledged before a FLUSH was *sent* on the same connection, and that FLUSH then
     completed successfully; if the server advertised NBD_FLAG_CAN_MULTI_CONN
     (h.can_multi_conn(), which the spec defines as "the effects of NBD_CMD_FLUSH ... MUST be
     visible across all connections"), a successful FLUSH on ANY connection covers every write
     acknowledged on any connection before that FLUSH was sent. --ignore-multi-conn restricts
     b) to the same connection even then (a weaker claim, never a false positive).
"Before the FLUSH was sent" is taken on the client side: the flush is queued after the reply to
the write was processed, so the server had replied to the write before it received the flush.
After the kill, each sector must hold
  - its latest DURABLE version, or any version issued AFTER that one (acknowledged, failed by
    the kill or still in flight: a non-durable write may or may not have landed, wholly or in
    part, sector by sector); or,
  - if it has no durable version, its initial content (zeroes, or the prefill pattern) or any of
    its versions;
  - a sector no request touched must hold its initial content.
A sector holding an older version or the initial content although a durable version exists is
LOST; a sector holding anything else (another sector's data, bytes no request wrote, a torn
sector) is CORRUPT. Any NBD error before the kill is a failure too.

Output: one line per round and a summary such as
`crash: 20 rounds, 51234 durable sectors checked, 0 lost, 0 corrupt sectors, 0 corrupt images`;
exit status 1 if anything was lost or corrupt, after printing the round, offsets and the
versions involved. --keep-failed DIR keeps a copy of each failing image (and a log of its
requests) there.
"""
import argparse
import errno
import os
import random
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import nbd
from nbdsafety import SECTOR, ZERO_SECTOR, Pattern, aligned, parse_size

WRITE, ZERO, FLUSH = "WRITE", "ZERO", "FLUSH"


class Op:
    __slots__ = ("id", "kind", "off", "len", "flags", "conn", "state", "ack", "flush_mark",
                 "data")

    def __init__(self, id, kind, off, length, flags, conn):
        self.id, self.kind, self.off, self.len, self.flags, self.conn = (
            id, kind, off, length, flags, conn)
        self.state = "new"       # new, inflight, acked, failed
        self.ack = None          # global acknowledgement number
        self.flush_mark = None   # FLUSH: acknowledgements seen when it was sent
        self.data = None

    @property
    def fua(self):
        return bool(self.flags & nbd.CMD_FLAG_FUA)

    def __str__(self):
        fl = []
        if self.flags & nbd.CMD_FLAG_FUA:
            fl.append("FUA")
        if self.flags & nbd.CMD_FLAG_NO_HOLE:
            fl.append("NO_HOLE")
        s = "#%d %s%s conn %d" % (self.id, self.kind, "|" + "|".join(fl) if fl else "", self.conn)
        if self.kind != FLUSH:
            s += " [%d, +%d)" % (self.off, self.len)
        return s



def vdi_leak_only(text):
    """qemu's VDI check calls a header count above the blocks mapped a corruption; it is a
    block written whose map entry was not (a crash between the two, in qemu's own order):
    a leak. Anything else is not."""
    errs = [l for l in text.splitlines() if "ERROR" in l]
    m = re.match(r"ERROR: allocated blocks mismatch, is (\d+), should be (\d+)$", errs[0]) \
        if len(errs) == 1 else None
    return m is not None and int(m.group(1)) < int(m.group(2))

def op_stream(rng, args, caps, lo, hi):
    """Endless deterministic stream of WRITE / ZERO / FLUSH requests."""
    nsec_region = (hi - lo) // SECTOR
    max_sec = max(1, args.max_len // SECTOR)
    next_id = 1
    hot = rng.randrange(nsec_region)
    last_end = 0

    def pick_len():
        r = rng.random()
        if r < 0.6:
            n = rng.randint(1, min(8, max_sec))
        else:
            n = int(2 ** rng.uniform(0, max(0.0, (max_sec.bit_length() - 1))))
        return max(1, min(n, max_sec, nsec_region))

    def make(kind, sec, nsec, conn=None):
        nonlocal next_id
        if conn is None:
            conn = rng.randrange(args.conns)
        if kind != FLUSH and caps["flush"] and rng.random() < 1.0 / args.flush_every:
            kind, sec, nsec = FLUSH, 0, 0
        if kind == ZERO and not caps["zero"]:
            kind = WRITE
        if kind != FLUSH:
            sec, nsec = aligned(sec, nsec, args.align // SECTOR, nsec_region)
        flags = 0
        if kind in (WRITE, ZERO) and caps["fua"] and rng.random() < args.fua:
            flags |= nbd.CMD_FLAG_FUA
        if kind == ZERO and rng.random() < 0.3:
            flags |= nbd.CMD_FLAG_NO_HOLE
        op = Op(next_id, kind, lo + sec * SECTOR, nsec * SECTOR, flags, conn)
        next_id += 1
        return op

    def kind():
        return ZERO if rng.random() < args.zero else WRITE

    while True:
        if rng.random() < 0.01:
            hot = rng.randrange(nsec_region)
        r = rng.random()
        if r < 0.25:
            bsec = min(8 if rng.random() < 0.7 else 128, nsec_region)
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
                yield make(kind(), base + a, b - a)
            last_end = base + bsec
            continue
        nsec = pick_len()
        if r < 0.45:
            sec = last_end
        elif r < 0.9:
            sec = hot + rng.randrange(-2048, 2048)
        else:
            sec = rng.randrange(nsec_region)
        sec = max(0, min(sec, nsec_region - nsec))
        last_end = sec + nsec if sec + nsec < nsec_region else 0
        yield make(kind(), sec, nsec)


def group(items):
    """[(sector, key, line)] sorted -> [(first, last, line)], merging runs with one key."""
    runs = []
    for i, key, line in items:
        if runs and runs[-1][1] == i - 1 and runs[-1][3] == key:
            runs[-1][1] = i
        else:
            runs.append([i, i, line, key])
    return [(a, b, line) for a, b, line, _ in runs]


def fmt_cmd(template, **kw):
    return template.format(**{k: shlex.quote(v) for k, v in kw.items()})


class Round:
    def __init__(self, args, rnd, workdir, pat):
        self.args, self.rnd, self.pat = args, rnd, pat
        self.img = os.path.join(workdir, "crash.img")
        self.sock = os.path.join(workdir, "crash.sock")
        self.out = os.path.join(workdir, "crash.raw")
        self.log = []
        self.proc = None

    def say(self, msg):
        self.log.append(msg)

    def start_server(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        argv = shlex.split(self.args.server.format(img=self.img, sock=self.sock))
        with open(self.img + ".stderr", "ab") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited with %s before listening: %s" % (
                    self.proc.returncode, open(self.img + ".stderr").read()[-500:]))
            if os.path.exists(self.sock):
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(self.sock)
                    s.close()
                    return
                except OSError:
                    s.close()
            time.sleep(0.01)
        raise RuntimeError("server did not listen on %s" % self.sock)

    def stop_server(self, sig):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def connect(self, n):
        uri = "nbd+unix:///?socket=" + self.sock
        hs = []
        for i in range(n):
            h = nbd.NBD()
            h.set_handle_name("crash%d" % i)
            h.aio_connect_uri(uri)
            hs.append(h)
        deadline = time.monotonic() + 20
        while any(h.aio_is_connecting() for h in hs):
            if time.monotonic() > deadline:
                raise RuntimeError("could not connect %d handles: does --server allow them "
                                   "(-e 0)?" % n)
            for h in hs:
                if h.aio_is_dead() or h.aio_is_closed():
                    raise RuntimeError("connection %d of %d failed" % (hs.index(h) + 1, n))
                if h.aio_is_connecting():
                    h.poll(10)
        for i, h in enumerate(hs):
            if not h.aio_is_ready():
                raise RuntimeError("connection %d of %d failed" % (i + 1, n))
        return hs

    def prefill(self, lo, hi):
        """Write the OLD! pattern into the first 64 KiB of every 128 KiB; returns what the
        region then holds (zeroes between, or with --initial-from-image what it reads)."""
        initial = bytearray(hi - lo)
        self.start_server()
        try:
            h = self.connect(1)[0]
            step = 128 << 10
            for off in range(lo, hi, step):
                n = min(64 << 10, hi - off)
                n -= n % SECTOR
                if n <= 0:
                    continue
                data = b"".join(self.pat.old(s) for s in range(off // SECTOR,
                                                                 (off + n) // SECTOR))
                h.pwrite(data, off)
                initial[off - lo:off - lo + n] = data
            if h.can_flush():
                h.flush()
            if self.args.initial_from_image:
                # What lies between the pattern is not zeroes (a backing file's bytes).
                for off in range(lo, hi, 4 << 20):
                    n = min(4 << 20, hi - off)
                    initial[off - lo:off - lo + n] = h.pread(n, off)
            h.shutdown()
        finally:
            self.stop_server(signal.SIGTERM)
        return initial

    def run(self, results):
        args, rnd = self.args, self.rnd
        rng = random.Random(args.seed * 1000003 + rnd)
        kill_after = rng.uniform(args.min_kill, args.max_kill)
        for p in (self.img, self.out, self.img + ".stderr"):
            if os.path.exists(p):
                os.unlink(p)
        subprocess.run(fmt_cmd(args.create, img=self.img), shell=True, check=True)

        # Export size and region from a first look at the image.
        self.start_server()
        try:
            h = self.connect(1)[0]
            size = h.get_size()
            h.shutdown()
        finally:
            self.stop_server(signal.SIGTERM)
        lo, hi = 0, size - size % SECTOR
        if args.region:
            a, b = args.region.split(":")
            lo, hi = parse_size(a), parse_size(b)
            if lo % SECTOR or hi % SECTOR or not 0 <= lo < hi <= size:
                raise SystemExit("--region must be 512-aligned inside the export (%d)" % size)
        initial = self.prefill(lo, hi) if args.prefill else bytearray(hi - lo)

        self.start_server()
        pid = self.proc.pid
        hs = self.connect(args.conns)
        h0 = hs[0]
        caps = {"fua": h0.can_fua(), "flush": h0.can_flush(), "zero": h0.can_zero()}
        multi = h0.can_multi_conn() and not args.ignore_multi_conn
        nsec = (hi - lo) // SECTOR
        busy = bytearray(nsec)
        versions = {}            # sector index -> [Op, ...] in issue order
        ops = []
        inflight = [0] * args.conns
        acks = [0]               # global acknowledgement counter
        flush_mark = [0] * args.conns   # per connection: acks covered by a completed FLUSH
        killed = [False]
        errors = []
        stats = dict(writes=0, fua=0, zero=0, flush=0, acked=0)

        def complete(op, err):
            try:
                inflight[op.conn] -= 1
                if op.kind != FLUSH:
                    s = (op.off - lo) // SECTOR
                    busy[s:s + op.len // SECTOR] = bytes(op.len // SECTOR)
                if err:
                    op.state = "failed"
                    if not killed[0]:
                        errors.append("%s failed before the kill: %s" % (op, os.strerror(err)))
                    return 1
                op.state = "acked"
                acks[0] += 1
                op.ack = acks[0]
                if op.kind == FLUSH:
                    flush_mark[op.conn] = max(flush_mark[op.conn], op.flush_mark)
                else:
                    stats["acked"] += 1
            except Exception as ex:  # must not vanish inside libnbd
                errors.append("internal error completing %s: %r" % (op, ex))
            return 1

        def issue(op):
            h = hs[op.conn]
            cb = lambda err, op=op: complete(op, err.value)
            if op.kind == WRITE:
                data = self.pat.data(op.id, op.off // SECTOR, op.len // SECTOR)
                h.aio_pwrite(data, op.off, completion=cb, flags=op.flags)
            elif op.kind == ZERO:
                h.aio_zero(op.len, op.off, completion=cb, flags=op.flags)
            else:
                op.flush_mark = acks[0]
                h.aio_flush(completion=cb)
            op.state = "inflight"
            inflight[op.conn] += 1
            ops.append(op)
            if op.kind != FLUSH:
                s = (op.off - lo) // SECTOR
                busy[s:s + op.len // SECTOR] = b"\x01" * (op.len // SECTOR)
                for i in range(s, s + op.len // SECTOR):
                    versions.setdefault(i, []).append(op)
                stats["writes"] += 1
                stats["zero"] += op.kind == ZERO
                stats["fua"] += op.fua
            else:
                stats["flush"] += 1

        fds = {h.aio_get_fd(): h for h in hs}

        def pump(timeout):
            rl, wl = [], []
            for fd, h in fds.items():
                if h.aio_is_dead() or h.aio_is_closed():
                    continue
                d = h.aio_get_direction()
                if d & nbd.AIO_DIRECTION_READ:
                    rl.append(fd)
                if d & nbd.AIO_DIRECTION_WRITE:
                    wl.append(fd)
            if not rl and not wl:
                return
            r, w, _ = select.select(rl, wl, [], timeout)
            for fd in w:
                try:
                    fds[fd].aio_notify_write()
                except nbd.Error:
                    pass
            for fd in r:
                try:
                    fds[fd].aio_notify_read()
                except nbd.Error:
                    pass

        stream = op_stream(rng, args, caps, lo, hi)
        t0 = time.monotonic()
        deadline = t0 + kill_after
        pending = None
        try:
            while time.monotonic() < deadline and not errors:
                while True:
                    if pending is None:
                        pending = next(stream)
                    op = pending
                    if inflight[op.conn] >= args.depth:
                        break
                    if op.kind != FLUSH:
                        s = (op.off - lo) // SECTOR
                        if busy.find(1, s, s + op.len // SECTOR) != -1:
                            break
                    issue(op)
                    pending = None
                pump(max(0.0, min(0.05, deadline - time.monotonic())))
                if self.proc.poll() is not None:
                    errors.append("server exited by itself with status %s" % self.proc.returncode)
                    break
        except nbd.Error as ex:
            errors.append("NBD error before the kill: %s" % ex)
        killed[0] = True
        os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        # Collect the replies the server sent before it died; the rest fail with ENOTCONN.
        end = time.monotonic() + 10
        while any(h.aio_in_flight() > 0 and not h.aio_is_dead() for h in hs):
            if time.monotonic() > end:
                break
            pump(0.1)
        del h0, hs, fds  # closes the handles
        load_time = time.monotonic() - t0

        # Which versions are durable.
        global_mark = max(flush_mark)

        def durable(op):
            if op.state != "acked":
                return False
            if op.fua:
                return True
            mark = global_mark if multi else flush_mark[op.conn]
            return op.ack <= mark

        def why(op):
            """Why a version is durable, for reports."""
            if not durable(op):
                return ""
            if op.fua:
                return " DURABLE(FUA)"
            for f in ops:
                if f.kind == FLUSH and f.state == "acked" and f.flush_mark >= op.ack and \
                        (multi or f.conn == op.conn):
                    return " DURABLE(flush #%d conn %d)" % (f.id, f.conn)
            return " DURABLE(?)"

        # The image.
        corrupt_image = None
        if args.format in ("qed", "parallels"):
            # A QED image left dirty (a Parallels one left in use) is checked and repaired by
            # the next read-write open (qemu's rule, ours too): open it as a user would, by
            # serving it again.
            try:
                self.start_server()
            except RuntimeError as ex:
                corrupt_image = "reopening the image failed: %s" % ex
            self.stop_server(signal.SIGTERM)
        if args.format in ("qcow2", "vmdk", "vdi", "vhdx", "qed", "parallels"):
            c = subprocess.run(["qemu-img", "check", "-f", args.format, self.img],
                               capture_output=True, text=True)
            text = c.stdout + c.stderr
            if args.format == "vdi" and c.returncode == 2 and vdi_leak_only(text):
                pass
            elif c.returncode not in (0, 3) or "ERROR" in text:
                lines = [l for l in text.splitlines() if "ERROR" in l]
                more = len(lines) - 8
                lines = lines[:8] + (["... %d more ERROR lines" % more] if more > 0 else [])
                lines += [l for l in text.splitlines() if "were found" in l]
                corrupt_image = "qemu-img check exit %d:\n%s" % (c.returncode, "\n".join(lines))
        c = subprocess.run(["qemu-img", "convert", "-f", args.format, "-O", "raw",
                            self.img, self.out], capture_output=True, text=True)
        if c.returncode != 0:
            corrupt_image = (corrupt_image or "") + "qemu-img convert failed: " + c.stderr
            got = None
        else:
            with open(self.out, "rb") as f:
                f.seek(lo)
                got = f.read(hi - lo)
            os.unlink(self.out)

        lost, corrupt, n_durable = [], [], 0
        if got is not None:
            gv = memoryview(got)
            iv = memoryview(initial)
            # Sectors no request touched: bulk compare, then look closer where they differ.
            untouched_bad = []
            if gv != iv:
                step = 1 << 20
                for a in range(0, hi - lo, step):
                    if gv[a:a + step] != iv[a:a + step]:
                        for i in range(a // SECTOR, min(a + step, hi - lo) // SECTOR):
                            if i not in versions and \
                                    gv[i * SECTOR:(i + 1) * SECTOR] != iv[i * SECTOR:(i + 1) * SECTOR]:
                                untouched_bad.append(i)
            for i in untouched_bad:
                found = self.pat.describe(gv[i * SECTOR:(i + 1) * SECTOR], lo // SECTOR + i)
                corrupt.append((i, (None, found.split(" (meant")[0]),
                                "no request touched it: expected initial %s, found %s" % (
                                    self.pat.describe(iv[i * SECTOR:(i + 1) * SECTOR],
                                                      lo // SECTOR + i), found)))
            for i, vs in versions.items():
                ab = lo // SECTOR + i
                cur = gv[i * SECTOR:(i + 1) * SECTOR]
                d = None
                for j in range(len(vs) - 1, -1, -1):
                    if durable(vs[j]):
                        d = j
                        break
                allowed = vs[d:] if d is not None else vs
                ok = False
                for op in allowed:
                    want = ZERO_SECTOR if op.kind == ZERO else self.pat.sector(op.id, ab)
                    if cur == want:
                        ok = True
                        break
                if d is None:
                    if not ok and cur == iv[i * SECTOR:(i + 1) * SECTOR]:
                        ok = True
                else:
                    n_durable += 1
                if ok:
                    continue
                # Classify: an older version (or the initial content) is LOST, else CORRUPT.
                older = cur == iv[i * SECTOR:(i + 1) * SECTOR]
                for op in vs[:d]:
                    want = ZERO_SECTOR if op.kind == ZERO else self.pat.sector(op.id, ab)
                    older = older or cur == want
                hist = "; ".join("%s %s%s" % (op, op.state, why(op))
                                 for op in vs[-6:])
                found = self.pat.describe(cur, ab)
                line = "expected %s, found %s; versions: %s%s" % (
                    ("%s or later" % vs[d]) if d is not None else "initial or any version",
                    found, "... " if len(vs) > 6 else "", hist)
                key = (vs[d].id if d is not None else None, found.split(" (meant")[0])
                (lost if older else corrupt).append((i, key, line))

        res = dict(rnd=rnd, kill_after=kill_after, load=load_time, ops=len(ops), **stats,
                   durable=n_durable, lost=len(lost), corrupt=len(corrupt),
                   corrupt_image=corrupt_image, errors=errors, multi=multi)
        results.append(res)
        print("round %d: kill after %.2f s, %d writes (%d FUA, %d zero), %d flush, %d acked, "
              "%d durable sectors, %d lost, %d corrupt%s%s" % (
                  rnd, kill_after, stats["writes"], stats["fua"], stats["zero"],
                  stats["flush"], stats["acked"], n_durable, len(lost), len(corrupt),
                  ", CORRUPT IMAGE" if corrupt_image else "",
                  ", %d errors" % len(errors) if errors else ""), flush=True)
        failed = lost or corrupt or corrupt_image or errors
        if failed:
            for kind, lst in (("LOST", lost), ("CORRUPT", corrupt)):
                runs = group(sorted(lst))
                for first, last, line in runs[:args.max_report]:
                    print("  %s [%d, +%d) (sectors %d-%d): %s" % (
                        kind, lo + first * SECTOR, (last - first + 1) * SECTOR,
                        lo // SECTOR + first, lo // SECTOR + last, line))
                if len(runs) > args.max_report:
                    print("  ... %d %s sectors in %d runs" % (len(lst), kind, len(runs)))
            if corrupt_image:
                print("  " + corrupt_image.strip().replace("\n", "\n  "))
            for e in errors[:args.max_report]:
                print("  error: " + e)
            if args.keep_failed:
                os.makedirs(args.keep_failed, exist_ok=True)
                base = os.path.join(args.keep_failed, "round%d" % rnd)
                shutil.copyfile(self.img, base + ".img")
                with open(base + ".log", "w") as f:
                    f.write("server: %s\ncreate: %s\nseed %d round %d multi-conn %s\n" % (
                        args.server, args.create, args.seed, rnd, multi))
                    for op in ops:
                        f.write("%s %s ack=%s%s%s\n" % (
                            op, op.state, op.ack,
                            " flush_mark=%s" % op.flush_mark if op.kind == FLUSH else "",
                            why(op) if op.kind != FLUSH else ""))
                    for kind, lst in (("LOST", lost), ("CORRUPT", corrupt)):
                        for i, _, line in sorted(lst):
                            f.write("%s offset %d: %s\n" % (kind, lo + i * SECTOR, line))
                print("  kept %s.img and %s.log" % (base, base))
        return not failed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", required=True, help="command with {sock} and {img}")
    ap.add_argument("--create", required=True, help="shell command with {img}")
    ap.add_argument("--format", choices=["raw", "qcow2", "qcow", "vmdk", "vdi", "vpc", "vhdx", "qed", "parallels"],
                    required=True)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--min-kill", type=float, default=0.1)
    ap.add_argument("--max-kill", type=float, default=0.9)
    ap.add_argument("--max-len", type=parse_size, default=64 << 10)
    ap.add_argument("--align", type=parse_size, default=SECTOR,
                    help="offsets and lengths in multiples of this")
    ap.add_argument("--fua", type=float, default=0.4, help="share of writes with FUA")
    ap.add_argument("--zero", type=float, default=0.15, help="share of WRITE_ZEROES")
    ap.add_argument("--flush-every", type=float, default=32,
                    help="a FLUSH about every N requests")
    ap.add_argument("--prefill", action="store_true")
    ap.add_argument("--initial-from-image", action="store_true",
                    help="after the prefill, read the region's initial content from the "
                         "image (for images over a backing file with data)")
    ap.add_argument("--region", default=None, metavar="LO:HI")
    ap.add_argument("--ignore-multi-conn", action="store_true")
    ap.add_argument("--keep-failed", default=None, metavar="DIR")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--max-report", type=int, default=8)
    args = ap.parse_args()
    if args.max_len < SECTOR:
        ap.error("--max-len must be at least 512")

    workdir = args.workdir or tempfile.mkdtemp(prefix="qnbd-crash.", dir="/var/tmp")
    os.makedirs(workdir, exist_ok=True)
    pat = Pattern(args.seed)
    results = []
    t0 = time.monotonic()
    for rnd in range(1, args.rounds + 1):
        r = Round(args, rnd, workdir, pat)
        try:
            r.run(results)
        finally:
            r.stop_server(signal.SIGKILL)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    lost = sum(r["lost"] for r in results)
    corrupt = sum(r["corrupt"] for r in results)
    images = sum(1 for r in results if r["corrupt_image"])
    errs = sum(len(r["errors"]) for r in results)
    print("crash: %d rounds, %d durable sectors checked, %d lost, %d corrupt sectors, "
          "%d corrupt images%s [%d conns, depth %d, seed %d, multi-conn %s, %.1f s]" % (
              len(results), sum(r["durable"] for r in results), lost, corrupt, images,
              ", %d errors" % errs if errs else "", args.conns, args.depth, args.seed,
              results[0]["multi"] if results else "?", time.monotonic() - t0))
    bad = [r["rnd"] for r in results if r["lost"] or r["corrupt"] or r["corrupt_image"]
           or r["errors"]]
    if bad:
        print("failed rounds: %s" % " ".join(map(str, bad)))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
