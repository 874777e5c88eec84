"""Random writes on four connections at once, each connection in its own quarter of the
export (so the result does not depend on how the server orders them). Sizes 512 B - 1 MiB,
offsets aligned or not, some as write-zeroes. The expected contents go to MODEL_PATH.

usage: random_writes.py URI MODEL_PATH SEED
"""
import random
import sys
import threading

import nbd

uri, model_path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
handles = []
for _ in range(4):
    h = nbd.NBD()
    h.connect_uri(uri)
    handles.append(h)
size = handles[0].get_size()
model = bytearray()
chunk = 4 << 20
for off in range(0, size, chunk):
    model += handles[0].pread(min(chunk, size - off), off)
quarter = size // 4
errors = []


def worker(i):
    try:
        r = random.Random(seed * 10 + i)
        h = handles[i]
        lo, hi = i * quarter, (i + 1) * quarter
        for k in range(40):
            n = min(int(2 ** r.uniform(9, 20)), quarter)
            if r.random() < 0.5:
                n = max(512, n - n % 512)
            off = r.randint(lo, hi - n)
            if r.random() < 0.5:
                off -= off % 512
            if k % 7 == 3:
                h.zero(n, off)
                model[off:off + n] = bytes(n)
            else:
                data = r.randbytes(n)
                h.pwrite(data, off)
                model[off:off + n] = data
        h.flush()
    except Exception as e:  # reported by the main thread
        errors.append(e)


threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
if errors:
    raise errors[0]
# Read back through a connection that wrote nothing there.
for off in range(0, size, chunk):
    got = handles[(off // quarter + 1) % 4].pread(min(chunk, size - off), off)
    assert got == model[off:off + len(got)], f"read back differs near offset {off}"
for h in handles:
    h.shutdown()
with open(model_path, "wb") as f:
    f.write(model)
print("ok")
