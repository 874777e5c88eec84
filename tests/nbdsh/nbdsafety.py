"""What verify.py and crash.py share: sizes on the command line and recognisable sector
contents (a header naming the writer and the sector, then bytes from a seeded pool), so a
wrong sector can be traced to the request that wrote it."""
import random
import struct

SECTOR = 512
MAGIC = b"QVFY"
OLD_MAGIC = b"OLD!"
HDR = struct.Struct("<4sIQ")
POOL_LEN = 1 << 16
ZERO_SECTOR = bytes(SECTOR)


def aligned(sec, nsec, k, nsec_region):
    """(sec, nsec) widened to whole multiples of k sectors, inside the region."""
    if k <= 1:
        return sec, nsec
    nsec = min(-(-nsec // k) * k, nsec_region - nsec_region % k)
    sec -= sec % k
    if sec + nsec > nsec_region:
        sec = (nsec_region - nsec) - (nsec_region - nsec) % k
    return sec, nsec


def parse_size(s):
    s = s.strip()
    mult = 1
    suffixes = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s and s[-1].upper() in suffixes:
        mult = suffixes[s[-1].upper()]
        s = s[:-1]
    return int(s, 0) * mult


class Pattern:
    """Recognisable sector contents: header (magic, writer, sector) + 496 pool bytes."""

    def __init__(self, seed):
        self.pool = random.Random(seed ^ 0x5EED).randbytes(POOL_LEN + SECTOR)

    def sector(self, wid, sec, magic=MAGIC):
        k = (wid * 7919 + sec * 104729) % POOL_LEN
        return HDR.pack(magic, wid & 0xFFFFFFFF, sec) + self.pool[k:k + SECTOR - HDR.size]

    def data(self, wid, first_sec, nsec):
        return b"".join([self.sector(wid, s) for s in range(first_sec, first_sec + nsec)])

    def old(self, sec):
        """What --prefill writes: a pattern of its own, told apart from every write."""
        return self.sector(0, sec, OLD_MAGIC)

    def describe(self, b, sec, initial=None):
        """What a 512-byte sector holds, for reports."""
        b = bytes(b)
        if b[:4] in (MAGIC, OLD_MAGIC):
            magic, wid, where = HDR.unpack(b[:HDR.size])
            d = ("write #%d" % wid) if magic == MAGIC else "prefill"
            if where != sec:
                d += " (meant for sector %d)" % where
            elif b != self.sector(wid, where, magic):
                d += " (torn)"
            return d
        if b == ZERO_SECTOR:
            return "zeroes"
        if initial is not None and b == bytes(initial):
            return "old"
        return "foreign %s..." % b[:16].hex()
