"""Write a source image's clusters through a compress-filter export until the server dies.

Usage: compress_crash.py URI SOURCE DURABLE_LOG [CONNS]
Each of CONNS connections (threads) writes whole 64 KiB clusters of SOURCE, in a shuffled
order, and flushes after every 8; once a flush returns, the clusters it covers are appended
to DURABLE_LOG (one index a line): those must survive the server being killed.
"""
import random
import sys
import threading

import nbd

uri, source, log_path = sys.argv[1], sys.argv[2], sys.argv[3]
conns = int(sys.argv[4]) if len(sys.argv) > 4 else 4
CLUSTER = 65536
data = open(source, "rb").read()
order = list(range(len(data) // CLUSTER))
random.Random(7).shuffle(order)
lock = threading.Lock()
log = open(log_path, "w")


def worker(k):
    h = nbd.NBD()
    h.connect_uri(uri)
    acked = []
    try:
        for n, i in enumerate(order[k::conns]):
            h.pwrite(data[i * CLUSTER:(i + 1) * CLUSTER], i * CLUSTER)
            acked.append(i)
            if n % 8 == 7:
                h.flush()
                with lock:
                    log.write("".join(f"{c}\n" for c in acked))
                    log.flush()
                acked.clear()
    except nbd.Error:
        pass


threads = [threading.Thread(target=worker, args=(k,)) for k in range(conns)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("ok")
