#!/usr/bin/python3
"""Read a whole export in 4 KiB requests and print one line per request: its offset and the
SHA-1 of its bytes, or ERR when the read failed (then a new connection goes on: qemu-nbd
drops the client after a failed structured read, qnbd keeps it). Then try one write and
print its errno. Usage: dmg_blocks.py URI"""
import hashlib
import sys

import nbd


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


uri = sys.argv[1]
h = connect(uri)
size = h.get_size()
print("size", size)
for off in range(0, size, 4096):
    n = min(4096, size - off)
    try:
        print(off, hashlib.sha1(h.pread(n, off)).hexdigest())
    except nbd.Error:
        print(off, "ERR")
        try:
            h.shutdown()
        except nbd.Error:
            pass
        del h
        h = connect(uri)
try:
    h.pwrite(b"x" * 512, 0)
    print("write ok")
except nbd.Error as e:
    print("write", e.errno)
