"""One client connection across the loss of the server behind a re-export.

Usage: flush_after_loss.py URI. Writes 64 KiB of 0x61 at 0 without a flush, says `written`,
waits for a line on stdin (the test kills and restarts the upstream server meanwhile), then
flushes: prints `flush: ok` or `flush: <errno name>`; then writes 0x62 at 64 KiB, flushes
again and prints `second flush: ok` or its error; reads both back and prints what they hold.
"""
import errno
import sys

import nbd

h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"a" * 65536, 0)
print("written", flush=True)
sys.stdin.readline()


def flush(label):
    try:
        h.flush()
        print(f"{label}: ok", flush=True)
    except nbd.Error as e:
        print(f"{label}: {errno.errorcode.get(e.errno, e.errno)}", flush=True)


flush("flush")
h.pwrite(b"b" * 65536, 65536)
flush("second flush")
first = h.pread(65536, 0)
second = h.pread(65536, 65536)
print("first:", "a" if first == b"a" * 65536 else "other")
print("second:", "b" if second == b"b" * 65536 else "other")
h.shutdown()
