#!/usr/bin/python3
"""Leave a VHDX as an unclean close would: a log entry (one data sector of PATTERN bytes for
disk offset DISK_OFFSET, which must lie in a present block) that the file does not hold yet,
and the current header naming the log.  Usage: vhdx_dirty_log.py IMG DISK_OFFSET PATTERN"""
import struct
import sys


def crc32c(data):
    table = crc32c.table
    if table is None:
        table = []
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            table.append(c)
        crc32c.table = table
    c = 0xFFFFFFFF
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


crc32c.table = None


def with_checksum(buf, at=4):
    buf = bytearray(buf)
    buf[at:at + 4] = b"\0\0\0\0"
    buf[at:at + 4] = struct.pack("<I", crc32c(bytes(buf)))
    return buf


def guid_bytes(d1, d2, d3, d4):
    return struct.pack("<IHH", d1, d2, d3) + bytes(d4)


BAT = guid_bytes(0x2DC27766, 0xF623, 0x4200, [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08])
META = guid_bytes(0x8B7CA206, 0x4790, 0x4B9A, [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E])
PARAMS = guid_bytes(0xCAA16737, 0xFA36, 0x4D43, [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B])


def main():
    img, disk_off, pattern = sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3], 0)
    f = open(img, "r+b")
    heads = []
    for at in (64 << 10, 128 << 10):
        f.seek(at)
        heads.append((at, bytearray(f.read(4096))))
    cur_at, cur = max(heads, key=lambda h: struct.unpack_from("<Q", h[1], 8)[0])
    log_len, log_at = struct.unpack_from("<IQ", cur, 68)
    f.seek(192 << 10)
    rt = f.read(64 << 10)
    regions = {}
    for i in range(struct.unpack_from("<I", rt, 8)[0]):
        e = rt[16 + i * 32:48 + i * 32]
        regions[e[:16]] = struct.unpack_from("<Q", e, 16)[0]
    f.seek(regions[META])
    md = f.read(64 << 10)
    for i in range(struct.unpack_from("<H", md, 10)[0]):
        e = md[32 + i * 32:64 + i * 32]
        if e[:16] == PARAMS:
            f.seek(regions[META] + struct.unpack_from("<I", e, 16)[0])
            block = struct.unpack("<I", f.read(4))[0]
    b = disk_off // block
    chunk_ratio = (1 << 23) * 512 // block
    f.seek(regions[BAT] + 8 * (b + b // chunk_ratio))
    entry = struct.unpack("<Q", f.read(8))[0]
    assert entry & 7 == 6, "the target block is not present"
    file_off = (entry >> 20 << 20) + disk_off % block
    assert file_off % 4096 == 0
    f.seek(0, 2)
    size = f.tell()

    guid = bytes(range(1, 17))
    sector = bytes([pattern]) * 4096
    seq = 1
    hdr = bytearray(4096)
    struct.pack_into("<4sIIIQII16sQQ", hdr, 0, b"loge", 0, 8192, 0, seq, 1, 0, guid, size, size)
    struct.pack_into("<4sI8sQQ", hdr, 64, b"desc", struct.unpack("<I", sector[4092:])[0],
                     sector[:8], file_off, seq)
    data = bytearray(4096)
    struct.pack_into("<4sI", data, 0, b"data", seq >> 32)
    data[8:4092] = sector[8:4092]
    struct.pack_into("<I", data, 4092, seq & 0xFFFFFFFF)
    f.seek(log_at)
    f.write(with_checksum(bytes(hdr) + bytes(data)))
    cur[48:64] = guid
    f.seek(cur_at)
    f.write(with_checksum(cur))
    f.close()


main()
