"""A client that stops sending leaves the server asleep: after a burst of one-at-a-time
requests (which teaches the reader to spin on the socket, see busy_poll.rs) the connection
stays open and idle, and the server must use next to no CPU while it does.
Prints "ok", or what went wrong. Arguments: URI, server pid."""

import os
import sys
import time

import nbd

uri, pid = sys.argv[1], int(sys.argv[2])


def cpu_ticks():
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


h = nbd.NBD()
h.connect_uri(uri)
block = os.urandom(4096)
for i in range(4000):
    off = (i * 7919 % 2048) * 4096
    if i % 2:
        h.pwrite(block, off)
    elif h.pread(4096, off) is None:
        sys.exit("no data")
before = cpu_ticks()
time.sleep(2)
used = cpu_ticks() - before
hz = os.sysconf("SC_CLK_TCK")
if used > hz // 5:
    sys.exit(f"the server used {used / hz:.2f} s of CPU in 2 s of an idle connection")
if h.pread(4096, 0) is None:
    sys.exit("no data after the pause")
h.shutdown()
print("ok")
