#!/usr/bin/env bash
# The formats target's seeds (fuzz/corpus/formats): images qemu-img and qemu-io make in the
# formats other than qcow2 — vmdk (sparse, stream-optimized, with a parent), vdi, vpc
# (dynamic and fixed), vhdx, qed (with a backing file), parallels, qcow (v1: plain, compressed, with a backing file), bochs, cloop and dmg (built here) — with data, zeroes and unwritten
# parts, each opened read-write and read-only. Run by make-seeds.sh; alone it needs only
# qemu-utils.
set -euo pipefail
corpus=$(realpath "$(dirname "$0")")/corpus/formats
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
mkdir -p "$corpus"
rm -f "$corpus"/*

# seed NAME FORMAT-INDEX FILE [MODE...]: control byte 0 (format, bit 3 read-only, bit 4
# discard), three I/O places, then the image; modes rw (the default), ro, discard. The
# images of a MiB and more (a whole vdi, vpc or vhdx data block) are seeded once.
seed() {
    local name=$1 idx=$2 file=$3 mode
    shift 3
    for mode in "${@:-rw}"; do
        # The format index: bits 0-2, then bits 5-6 (fuzz/src/lib.rs).
        local ctl=$(((idx & 7) | (idx >> 3) << 5))
        [ $mode = ro ] && ctl=$((ctl | 8))
        [ $mode = discard ] && ctl=$((ctl | 16))
        { printf "\\$(printf %03o "$ctl")\\000\\200\\360"; cat "$file"; } >"$corpus/$name-$mode"
    done
}
io() { # io FORMAT FILE COMMAND...
    local fmt=$1 file=$2
    shift 2
    for c in "$@"; do qemu-io -f "$fmt" -c "$c" "$file" >/dev/null; done
}

printf 'backing data' >base.raw
qemu-img create -q -f vmdk a.vmdk 256K
io vmdk a.vmdk 'write -P 1 0 8k' 'write -P 2 128k 4k' 'write -z 192k 64k'
qemu-img convert -q -O vmdk -o subformat=streamOptimized a.vmdk s.vmdk
qemu-img create -q -f vmdk -b a.vmdk -F vmdk c.vmdk
io vmdk c.vmdk 'write -P 3 64k 4k'
seed vmdk-sparse 0 a.vmdk rw ro discard
seed vmdk-stream 0 s.vmdk rw ro
seed vmdk-child 0 c.vmdk rw ro

qemu-img create -q -f vdi v.vdi 256K
qemu-img create -q -f vdi vd.vdi 256K
io vdi vd.vdi 'write -P 4 0 4k' 'write -P 5 200k 1k'
seed vdi-empty 1 v.vdi rw ro
seed vdi-data 1 vd.vdi

qemu-img create -q -f vpc p.vpc 256K
qemu-img create -q -f vpc pd.vpc 256K
io vpc pd.vpc 'write -P 6 0 4k'
qemu-img create -q -f vpc -o subformat=fixed pf.vpc 64K
io vpc pf.vpc 'write -P 7 512 1k'
seed vpc-empty 2 p.vpc rw ro
seed vpc-data 2 pd.vpc
seed vpc-fixed 2 pf.vpc rw ro discard

qemu-img create -q -f vhdx -o block_size=1M,log_size=1M hd.vhdx 256K
io vhdx hd.vhdx 'write -P 8 0 4k'
seed vhdx-data 3 hd.vhdx

qemu-img create -q -f qed -o cluster_size=4096 q.qed 256K
io qed q.qed 'write -P 9 0 8k' 'write -z 64k 4k'
qemu-img create -q -f qed -o cluster_size=4096 -b base.raw -F raw qb.qed 64K
io qed qb.qed 'write -P 10 4k 4k'
seed qed-data 4 q.qed rw ro discard
seed qed-backing 4 qb.qed rw ro

qemu-img create -q -f parallels -o cluster_size=4k pa.hdd 256K
io parallels pa.hdd 'write -P 11 0 8k' 'write -P 12 64k 4k' 'write -z 4k 4k'
seed parallels-data 5 pa.hdd rw ro discard
# Bochs and cloop images qemu reads but cannot make: built byte by byte, served read-only.
python3 - <<'PY'
import struct, zlib
head = lambda t, n: t.ljust(n, b"\0")
h = head(b"Bochs Virtual HD Image", 32) + head(b"Redolog", 16) + head(b"Growing", 16)
h += struct.pack("<IIIIIIQ", 0x20000, 512, 16, 512, 4096, 0, 64 << 10)
ext = bytes([0xfe]) + bytes(511) + b"bochs data".ljust(4096, b"\0")
cat = struct.pack("<16I", 0, *([0xFFFFFFFF] * 14), 1)
open("b.bochs", "wb").write(head(h, 512) + cat + ext + ext)
pre = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
blocks = [zlib.compress(bytes([i]) * 4096) for i in range(4)]
offs = [136 + 8 * 5]
for b in blocks:
    offs.append(offs[-1] + len(b))
body = head(pre, 128) + struct.pack(">II", 4096, 4) + struct.pack(">5Q", *offs)
open("c.cloop", "wb").write(body + b"".join(blocks))
PY
seed bochs-data 6 b.bochs ro
seed cloop-data 7 c.cloop ro

# dmg: qemu-img cannot write one; tests/tools/make_dmg.py builds them (read-only only).
mkdmg=$(realpath "$(dirname "$0")")/../tests/tools/make_dmg.py
/usr/bin/python3 "$mkdmg" d.dmg '{"partitions":[{"chunks":[{"type":"raw","sectors":4},
  {"type":"zlib","sectors":8},{"type":"zero","sectors":64},{"type":"bz2","sectors":4},
  {"type":"ignore","sectors":4},{"type":"term"}]},{"chunks":[{"type":"zlib","sectors":3}]}]}'
/usr/bin/python3 "$mkdmg" dr.dmg '{"form":"rsrc","partitions":[{"chunks":[{"type":"raw","sectors":2},
  {"type":"zlib","sectors":5}]}]}'
seed dmg-xml 8 d.dmg ro
seed dmg-rsrc 8 dr.dmg ro

qemu-img create -q -f qcow qc.qcow 256K
io qcow qc.qcow 'write -P 13 0 8k' 'write -P 14 64k 1k'
# qemu 10 exits 1 once the image is written (its closing zero-length compressed write fails).
qemu-img convert -q -c -O qcow qc.qcow qz.qcow || true
qemu-img create -q -f qcow -b base.raw -F raw qcb.qcow 64K
io qcow qcb.qcow 'write -P 15 4k 4k'
seed qcow-data 9 qc.qcow rw ro
seed qcow-compressed 9 qz.qcow rw ro
seed qcow-backing 9 qcb.qcow rw ro
echo "make-format-seeds: $(ls "$corpus" | wc -l) seeds, $(du -sh "$corpus" | cut -f1)"
