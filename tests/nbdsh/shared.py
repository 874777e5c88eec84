"""-e N: N clients are served at once; client N+1 waits until one leaves.

Usage: shared.py URI N
"""
import sys
import threading
import time

import nbd

uri, n = sys.argv[1], int(sys.argv[2])
handles = []
for i in range(n):
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(bytes([i + 1]) * 512, i * 512)
    handles.append(h)
for i, h in enumerate(handles):
    assert h.pread(512, i * 512) == bytes([i + 1]) * 512

# One more: it must not complete the handshake while all slots are taken.
done = threading.Event()


def extra():
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.pread(512, 0) == b"\x01" * 512
    done.set()
    h.shutdown()


t = threading.Thread(target=extra, daemon=True)
t.start()
time.sleep(1.0)
assert not done.is_set(), "client N+1 was served while N were connected"
handles.pop().shutdown()
assert done.wait(10), "client N+1 was not served after a slot freed"
for h in handles:
    h.shutdown()
print("ok")
