#!/usr/bin/python3
"""A hostile NBD server for client tests: a correct handshake (structured replies,
base:allocation, GO), then replies that break the protocol in one chosen way.

usage: hostile_nbd_server.py SOCKET MODE SEED
MODE: magic (garbage bytes), cookie (a reply for a cookie never sent), bigchunk (a 4 GiB
chunk), outside (a data chunk outside its read), shortdata, holebad (a hole outside its
read), badblock (a minimum block size the export size is no multiple of, at GO), late (two
good replies, then each reply broken in a way drawn from the others), uncovered (a read's
reply ends after a data chunk for its first half only: well-formed, but half the read is
missing; other requests are served)."""
import os, random, socket, struct, sys

path, mode, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
SIZE = 64 << 20
KINDS = ["magic", "cookie", "bigchunk", "outside", "shortdata", "holebad", "err", "close"]


def rd(c, n):
    b = b""
    while len(b) < n:
        x = c.recv(n - len(b))
        if not x:
            raise EOFError
        b += x
    return b


def rep(c, opt, typ, data=b""):
    c.sendall(struct.pack(">QIII", 0x3E889045565A9, opt, typ, len(data)) + data)


def handshake(c):
    c.sendall(b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 3))
    rd(c, 4)
    while True:
        _, opt, ln = struct.unpack(">QII", rd(c, 16))
        rd(c, ln)
        if opt == 8:
            rep(c, opt, 1)
        elif opt == 10:
            rep(c, opt, 4, struct.pack(">I", 7) + b"base:allocation")
            rep(c, opt, 1)
        elif opt == 7:
            rep(c, opt, 3, struct.pack(">HQH", 0, SIZE, 1 | 4 | 8 | 64))
            if mode == "badblock":
                rep(c, opt, 3, struct.pack(">HIII", 3, 3, 4096, 1 << 20))
            rep(c, opt, 1)
            return
        else:
            rep(c, opt, 0x80000001)


def serve(c):
    served = 0
    while True:
        _, _, typ, cookie, off, ln = struct.unpack(">IHHQQI", rd(c, 28))
        if typ == 1:
            rd(c, ln)
        if typ == 2:
            return
        served += 1
        k = mode
        if mode == "late":
            k = "ok" if served <= 2 else rng.choice(KINDS)
        sr, ch = 0x67446698, 0x668E33EF
        if k == "magic":
            c.sendall(os.urandom(64))
        elif k == "cookie":
            c.sendall(struct.pack(">IIQ", sr, 0, cookie + 999))
        elif k == "bigchunk":
            c.sendall(struct.pack(">IHHQI", ch, 1, 5, cookie, 0xFFFFFFFF))
        elif k == "outside":
            c.sendall(struct.pack(">IHHQIQ", ch, 1, 1, cookie, 24, off + ln + 4096) + b"x" * 16)
        elif k == "shortdata":
            c.sendall(struct.pack(">IHHQI", ch, 1, 1, cookie, 4) + b"abcd")
        elif k == "holebad":
            c.sendall(struct.pack(">IHHQIQI", ch, 1, 2, cookie, 12, off, 0xFFFFFFFF))
        elif k == "err":
            c.sendall(struct.pack(">IHHQIIH", ch, 1, 0x8001, cookie, 6, 5, 0))
        elif k == "close":
            return
        elif k == "uncovered" and typ == 0:
            half = ln // 2
            c.sendall(struct.pack(">IHHQIQ", ch, 1, 1, cookie, 8 + half, off) + b"u" * half)
        elif typ == 0:
            c.sendall(struct.pack(">IIQ", sr, 0, cookie) + b"\0" * ln)
        else:
            c.sendall(struct.pack(">IIQ", sr, 0, cookie))


if os.path.exists(path):
    os.unlink(path)
ls = socket.socket(socket.AF_UNIX)
ls.bind(path)
ls.listen(4)
while True:
    c, _ = ls.accept()
    try:
        handshake(c)
        serve(c)
    except (EOFError, OSError, struct.error):
        pass
    c.close()
