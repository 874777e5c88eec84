"""A read-only export refuses writes, trims and zeroes with EPERM; reads still work.

Usage: readonly.py URI
"""
import sys

import nbd

h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.set_strict_mode(0)
assert h.is_read_only()
assert not h.can_trim() and not h.can_zero()
for fn in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.trim(512, 0), lambda: h.zero(512, 0)):
    try:
        fn()
        raise AssertionError("write on a read-only export succeeded")
    except nbd.Error as e:
        assert e.errno == "EPERM", e
assert len(h.pread(512, 0)) == 512
h.shutdown()
print("ok")
