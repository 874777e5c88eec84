"""Writers that log what the server acknowledged, for SIGTERM-under-load checks
(scripts/load.sh). Run with /usr/bin/python3 (Debian's libnbd bindings).

  acklog.py write URI LOG --conns N [--block 64K] [--depth 8] [--seconds S]
                 [--index I --stride P]
      N connections write distinct blocks (block k only ever written once; with P writers,
      writer I takes blocks I, I+P, I+2P ...) with aio, as fast
      as the server takes them, until the server goes away or S seconds pass; every
      acknowledged write is appended to LOG as "offset tag". Exits 0 either way.
  acklog.py check URI LOG
      Every logged block must read back with its tag (run against the image after the
      server exited, served again read-only).

Block k carries b"ACK!" + tag (u64) + k (u64), repeated over the block.
"""
import argparse
import select
import struct
import sys
import time

import nbd


def block_data(k, tag, size):
    unit = b"ACK!" + struct.pack(">QQ", tag, k) + b"\0" * 12
    return (unit * (size // len(unit) + 1))[:size]


def parse_size(s):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = str(s)
    return int(s[:-1]) * mult[s[-1].upper()] if s[-1].upper() in mult else int(s)


def write(args):
    conns = []
    for i in range(args.conns):
        h = nbd.NBD()
        h.connect_uri(args.uri)
        conns.append(h)
    size = conns[0].get_size()
    nblocks = (size // args.block - args.index + args.stride - 1) // args.stride
    tag = int(time.time() * 1000)
    acked = []
    state = {"next": 0, "dead": False, "inflight": [0] * len(conns)}
    t0 = time.monotonic()

    def done(k, i, err):
        state["inflight"][i] -= 1
        if err.value:
            state["dead"] = True
        else:
            acked.append(k)
        return 1

    try:
        while not state["dead"]:
            if args.seconds and time.monotonic() - t0 > args.seconds:
                break
            for i, h in enumerate(conns):
                while state["inflight"][i] < args.depth and state["next"] < nblocks:
                    k = state["next"] * args.stride + args.index
                    state["next"] += 1
                    h.aio_pwrite(block_data(k, tag, args.block), k * args.block,
                                 completion=lambda err, k=k, i=i: done(k, i, err))
                    state["inflight"][i] += 1
            if state["next"] >= nblocks and not any(state["inflight"]):
                break
            rl = [h.aio_get_fd() for h in conns
                  if h.aio_get_direction() & nbd.AIO_DIRECTION_READ]
            wl = [h.aio_get_fd() for h in conns
                  if h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE]
            r, w, _ = select.select(rl, wl, [], 5)
            for h in conns:
                fd = h.aio_get_fd()
                if fd in w:
                    h.aio_notify_write()
                if fd in r:
                    h.aio_notify_read()
    except nbd.Error:
        pass  # the server went away: that is what this tool waits for
    with open(args.log, "w") as f:
        f.write("%d %d\n" % (tag, args.block))
        for k in acked:
            f.write("%d\n" % k)
    print("acklog: %d writes acknowledged on %d connections" % (len(acked), args.conns))


def check(args):
    with open(args.log) as f:
        tag, block = map(int, f.readline().split())
        ks = [int(line) for line in f if line.strip()]
    h = nbd.NBD()
    h.connect_uri(args.uri)
    lost = [k for k in ks if h.pread(block, k * block) != block_data(k, tag, block)]
    if lost:
        print("acklog: %d of %d acknowledged writes LOST, first at block %d"
              % (len(lost), len(ks), lost[0]))
        sys.exit(1)
    print("acklog: all %d acknowledged writes read back" % len(ks))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("uri")
    w.add_argument("log")
    w.add_argument("--conns", type=int, default=8)
    w.add_argument("--block", type=parse_size, default=64 << 10)
    w.add_argument("--depth", type=int, default=8)
    w.add_argument("--seconds", type=float, default=None)
    w.add_argument("--index", type=int, default=0)
    w.add_argument("--stride", type=int, default=1)
    c = sub.add_parser("check")
    c.add_argument("uri")
    c.add_argument("log")
    args = ap.parse_args()
    write(args) if args.cmd == "write" else check(args)


if __name__ == "__main__":
    main()
