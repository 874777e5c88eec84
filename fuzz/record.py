#!/usr/bin/env python3
"""Recording tools for the fuzz seed corpora (fuzz/make-seeds.sh runs them).

  record.py proxy LISTEN_PORT UPSTREAM_SOCKET OUTDIR
      A TCP proxy on 127.0.0.1:LISTEN_PORT to the NBD server on a Unix socket; every
      connection N is saved as OUTDIR/N.c2s (what the client sent) and OUTDIR/N.s2c (what the
      server sent). Runs until killed.
  record.py goclient UPSTREAM_SOCKET OUT
      Speak what qnbd_fuzz::client's GO mode speaks (EXTENDED_HEADERS or STRUCTURED_REPLY,
      LIST_META_CONTEXT, GO) to a server and save everything the server sent.
  record.py split RECORDING_DIR CORPUS_DIR
      Turn recordings into seeds: handshake/ (byte 0, then the client's bytes), transmission/
      (the mode byte for the negotiation the client made, then its requests), client/ (byte 0,
      then the server's bytes).
"""
import os
import socket
import struct
import sys
import threading

IHAVEOPT = 0x49484156454F5054
OPT_EXPORT_NAME, OPT_ABORT, OPT_GO = 1, 2, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_EXTENDED = 8, 9, 11
MAX_SEED = 64 << 10


def proxy(port, upstream, outdir):
    os.makedirs(outdir, exist_ok=True)
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(16)
    open(f"{outdir}/.ready", "w").close()
    n = 0
    while True:
        c, _ = ls.accept()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(upstream)
        n += 1

        def pump(src, dst, path):
            with open(path, "wb") as f:
                while True:
                    try:
                        b = src.recv(65536)
                    except OSError:
                        b = b""
                    if not b:
                        break
                    f.write(b)
                    f.flush()
                    try:
                        dst.sendall(b)
                    except OSError:
                        break
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        for src, dst, suffix in ((c, s, "c2s"), (s, c, "s2c")):
            threading.Thread(
                target=pump, args=(src, dst, f"{outdir}/{n:03d}.{suffix}"), daemon=True
            ).start()


def recv_exact(s, n):
    b = b""
    while len(b) < n:
        x = s.recv(n - len(b))
        if not x:
            raise EOFError
        b += x
    return b


def goclient(upstream, out):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(upstream)
    got = bytearray()

    def read(n):
        b = recv_exact(s, n)
        got.extend(b)
        return b

    def opt(code, data=b""):
        s.sendall(struct.pack(">QII", IHAVEOPT, code, len(data)) + data)

    def replies():
        while True:
            _, _, rep, ln = struct.unpack(">QIII", read(20))
            read(ln)
            if rep == 1 or rep & 0x80000000:
                return rep

    read(18)
    s.sendall(struct.pack(">I", 3))
    opt(OPT_EXTENDED)
    if replies() != 1:
        opt(OPT_STRUCTURED_REPLY)
        replies()
    opt(OPT_LIST_META, struct.pack(">II", 0, 0))
    replies()
    opt(OPT_GO, struct.pack(">IHHHH", 0, 3, 3, 1, 2))
    replies()
    s.close()
    with open(out, "wb") as f:
        f.write(got)


def split_client(c2s):
    """(handshake bytes, requests, negotiation mode) of one client stream, or None when it
    never reached transmission."""
    if len(c2s) < 4:
        return None
    at = 4
    structured = extended = False
    while at + 16 <= len(c2s):
        magic, code, ln = struct.unpack(">QII", c2s[at : at + 16])
        if magic != IHAVEOPT:
            return None
        at += 16 + ln
        if code == OPT_STRUCTURED_REPLY:
            structured = True
        elif code == OPT_EXTENDED:
            extended = True
        elif code == OPT_ABORT:
            return None
        elif code in (OPT_GO, OPT_EXPORT_NAME):
            if code == OPT_EXPORT_NAME:
                mode = 0
            elif extended:
                mode = 2
            elif structured:
                mode = 1
            else:
                mode = 3
            return c2s[:at], c2s[at:], mode
    return None


def split(recdir, corpus):
    for d in ("handshake", "transmission", "client"):
        os.makedirs(f"{corpus}/{d}", exist_ok=True)
    seen = set()
    for name in sorted(os.listdir(recdir)):
        if name.startswith("."):
            continue
        path = f"{recdir}/{name}"
        data = open(path, "rb").read()[:MAX_SEED]
        if not data:
            continue
        tag = os.path.splitext(name)[0]

        def save(kind, b):
            if (kind, b) in seen:
                return
            seen.add((kind, b))
            with open(f"{corpus}/{kind}/{tag}", "wb") as f:
                f.write(b)

        if name.endswith(".c2s"):
            save("handshake", b"\x00" + data)
            r = split_client(data)
            if r and r[1]:
                _, reqs, mode = r
                # The negotiation the client made, on the raw and the qcow2 export.
                save("transmission", bytes([mode << 2]) + reqs)
                tag += "-qcow2"
                save("transmission", bytes([(mode << 2) | 2]) + reqs)
        elif name.endswith(".s2c"):
            save("client", b"\x00" + data)
        elif name.endswith(".go"):
            save("client", b"\x01" + data)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "proxy":
        proxy(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    elif cmd == "goclient":
        goclient(sys.argv[2], sys.argv[3])
    elif cmd == "split":
        split(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
