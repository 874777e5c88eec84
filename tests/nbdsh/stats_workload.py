#!/usr/bin/python3
"""A known workload for the --stats test: URI as argv[1]; prints the counts it expects
per command as JSON (requests, bytes, errors), since CACHE depends on the server."""
import json
import sys

import nbd

h = nbd.NBD()
h.set_strict_mode(0)  # let an out-of-range read reach the server
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
size = h.get_size()
want = {}


def count(op, n, nbytes, errors=0):
    r, b, e = want.get(op, (0, 0, 0))
    want[op] = (r + n, b + nbytes, e + errors)


for i in range(10):
    h.pwrite(bytes([i]) * 4096, i * 4096)
count("write", 10, 40960)
for i in range(7):
    h.pread(8192, i * 8192)
count("read", 7, 57344)
h.flush()
h.flush()
count("flush", 2, 0)
for i in range(3):
    h.zero(65536, 1 << 20 + i)
count("write-zeroes", 3, 196608)
h.trim(65536, 4 << 20)
count("trim", 1, 65536)
h.block_status(1 << 20, 0, lambda *a: 0)
count("block-status", 1, 1 << 20)
if h.can_cache():
    h.cache(4096, 0)
    count("cache", 1, 4096)
try:
    h.pread(512, size)
    sys.exit("a read past the end succeeded")
except nbd.Error:
    count("read", 1, 512, 1)
h.shutdown()
print(json.dumps({k: list(v) for k, v in want.items()}))
