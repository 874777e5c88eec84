#!/usr/bin/python3
"""Build an Apple disk image (UDIF .dmg) without macOS, for tests/format_dmg.rs.

Usage: make_dmg.py OUT SPEC_JSON [EXPECTED]

EXPECTED, if given, gets the guest bytes the image stands for (a raw file of the trailer's
sector count: the data chunks' sectors, zeroes elsewhere).

SPEC is a JSON object:
  form:         "xml" (a plist of base64 mish blocks, the default) or "rsrc" (the old
                resource fork of length-prefixed mish blocks)
  partitions:   list of {"first": first sector (default: after the previous partition),
                         "data_offset": the mish block's data offset (default 0: chunk
                         offsets are from the data fork's start), "chunks": [...]}
  chunk:        {"type": "raw"|"zlib"|"bz2"|"zero"|"ignore"|"comment"|"term"|"lzfse"|INT,
                 "sectors": N, and to lie: "sector", "count", "offset", "length";
                 "plain" and "stored": files with the chunk's sectors and its stored
                 bytes instead of the pattern (how an LZFSE chunk is given)}
  sectors:      the trailer's sector count (default: the end of the last chunk)
  data_fork_offset: where the data fork starts (default 0, any padding before it zeroes)

Data sectors hold a pattern derived from their sector number, so every sector differs.
The trailer (koly) is the file's last 512 bytes, big-endian, as Apple writes it.
"""
import base64
import bz2
import json
import plistlib
import struct
import sys
import zlib

TYPES = {
    "zero": 0,
    "raw": 1,
    "ignore": 2,
    "zlib": 0x80000005,
    "bz2": 0x80000006,
    "lzfse": 0x80000007,
    "comment": 0x7FFFFFFE,
    "term": 0xFFFFFFFF,
}


def pattern(sector, count):
    out = bytearray()
    for s in range(sector, sector + count):
        line = b"sector %08d " % s
        out += (line * (512 // len(line) + 1))[:512]
    return bytes(out)


def mish(first, sector_count, data_offset, entries):
    head = struct.pack(">4sIQQQII", b"mish", 1, first, sector_count, data_offset, 0, 0)
    head += b"\0" * 24  # reserved
    head += struct.pack(">II", 0, 0) + b"\0" * 128  # checksum
    head += struct.pack(">I", len(entries))
    assert len(head) == 204
    for e in entries:
        head += struct.pack(">IIQQQQ", *e)
    return head


def build(spec):
    fork_at = spec.get("data_fork_offset", 0)
    guest = {}
    data = bytearray(b"\0" * fork_at)
    blocks = []
    next_first = 0
    for p in spec["partitions"]:
        first = p.get("first", next_first)
        data_offset = p.get("data_offset", 0)
        entries = []
        sector = 0
        for c in p["chunks"]:
            kind = c["type"]
            t = TYPES[kind] if isinstance(kind, str) else kind
            n = c.get("sectors", 0)
            plain = pattern(first + sector, n)
            if "plain" in c:
                plain = open(c["plain"], "rb").read()
            if "stored" in c:
                stored = open(c["stored"], "rb").read()
            elif kind == "raw":
                stored = plain
            elif kind == "zlib":
                stored = zlib.compress(plain)
            elif kind == "bz2":
                stored = bz2.compress(plain)
            else:
                stored = b""
            if stored:
                guest[first + sector] = plain
            offset = len(data) - fork_at - data_offset
            data += stored
            entries.append((
                t,
                0,
                c.get("sector", sector),
                c.get("count", n),
                c.get("offset", offset),
                c.get("length", len(stored)),
            ))
            sector += n
        blocks.append(mish(first, sector, data_offset, entries))
        next_first = first + sector
    total = spec.get("sectors", next_first)
    data_len = len(data) - fork_at
    form = spec.get("form", "xml")
    if form == "xml":
        plist = {
            "resource-fork": {
                "blkx": [
                    {
                        "Attributes": "0x0050",
                        "CFName": "partition %d" % i,
                        "Data": b,
                        "ID": str(i),
                        "Name": "partition %d" % i,
                    }
                    for i, b in enumerate(blocks)
                ],
                "plst": [{"Attributes": "0x0050", "Data": b"\0" * 50, "ID": "0", "Name": ""}],
            }
        }
        xml = plistlib.dumps(plist)
        xml_at = len(data)
        data += xml
        xml_len, rsrc_at, rsrc_len = len(xml), 0, 0
    else:
        body = b"".join(struct.pack(">I", len(b)) + b for b in blocks)
        rsrc = struct.pack(">IIII", 16, 16 + len(body), len(body), 0) + body
        rsrc_at = len(data)
        data += rsrc
        rsrc_len, xml_at, xml_len = len(rsrc), 0, 0
    koly = bytearray(512)
    struct.pack_into(">4sIII", koly, 0, b"koly", 4, 512, 1)
    struct.pack_into(">QQQQQ", koly, 0x10, 0, fork_at, data_len, rsrc_at, rsrc_len)
    struct.pack_into(">II", koly, 0x38, 1, 1)
    struct.pack_into(">QQ", koly, 0xD8, xml_at, xml_len)
    struct.pack_into(">I", koly, 0x1E8, 1)
    struct.pack_into(">Q", koly, 0x1EC, total)
    expected = bytearray(total * 512)
    for s, plain in guest.items():
        expected[s * 512:s * 512 + len(plain)] = plain
    return bytes(data) + bytes(koly), bytes(expected[:total * 512])


def main():
    out, spec = sys.argv[1], json.loads(sys.argv[2])
    image, expected = build(spec)
    with open(out, "wb") as f:
        f.write(image)
    if len(sys.argv) > 3:
        with open(sys.argv[3], "wb") as f:
            f.write(expected)


if __name__ == "__main__":
    main()
