#!/usr/bin/env bash
# Make the seed corpora in fuzz/corpus from real traffic and real images:
#  - handshake, transmission, client: sessions of qemu-img, qemu-io, nbdinfo, nbdcopy and
#    qemu-nbd -L / qnbd -L recorded through a proxy (fuzz/record.py) against qnbd and
#    qemu-nbd, a PSK TLS session's client side, and a GO client's view of both servers;
#  - qcow2: images qemu-img makes (data, compressed zlib and zstd, extended L2, internal
#    snapshots, bitmaps, backing names, refcount widths, compat 0.10, a dirty image);
#  - formats: the other formats' images (fuzz/make-format-seeds.sh).
# The parsers seeds are written by hand (fuzz/corpus/parsers). Needs a built qnbd
# (QNBD=path, default target/debug/qnbd) and scripts/install-deps.sh's packages.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
qnbd=$(realpath "${QNBD:-target/debug/qnbd}")
corpus=$root/fuzz/corpus
rec=$root/fuzz/record.py
tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

wait_for() { for _ in $(seq 100); do [ -e "$1" ] && return; sleep 0.1; done; echo "no $1" >&2; exit 1; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cd "$tmp"
qemu-img create -q -f raw a.raw 256K
qemu-io -f raw -c 'write -P 0x11 0 64k' -c 'write -P 0x22 128k 4k' a.raw >/dev/null
cp a.raw src.raw
qemu-img create -q -f qcow2 -o cluster_size=4096 b.qcow2 256K
qemu-io -f qcow2 -c 'write -P 0x33 0 8k' b.qcow2 >/dev/null
qemu-img bitmap --add b.qcow2 b0

# qnbd and qemu-nbd, each behind a recording proxy.
"$qnbd" -k "$tmp/qnbd.sock" -t -e 0 -f raw -A a.raw 2>/dev/null &
pids+=($!)
qemu-nbd -k "$tmp/qemu.sock" -t -e 0 -f qcow2 -A -B b0 b.qcow2 2>/dev/null &
pids+=($!)
wait_for "$tmp/qnbd.sock"
wait_for "$tmp/qemu.sock"
p1=$(port)
python3 "$rec" proxy "$p1" "$tmp/qnbd.sock" "$tmp/rec-qnbd" &
pids+=($!)
p2=$(port)
python3 "$rec" proxy "$p2" "$tmp/qemu.sock" "$tmp/rec-qemu" &
pids+=($!)
wait_for "$tmp/rec-qnbd/.ready"
wait_for "$tmp/rec-qemu/.ready"
u1=nbd://127.0.0.1:$p1
u2=nbd://127.0.0.1:$p2

qemu-img info "$u1" >/dev/null
qemu-img convert -O raw "$u1" out.raw
qemu-img convert -n -f raw -O raw src.raw "$u1"
qemu-img map --output=json "$u1" >/dev/null
qemu-io -f raw -c 'write -P 7 4k 8k' -c 'write -z 64k 64k' -c 'discard 128k 4k' \
    -c 'write -f -P 8 200k 1k' -c flush -c 'read 0 4k' -c 'aio_write -P 9 8k 4k' \
    -c 'aio_flush' "$u1" >/dev/null
nbdinfo "$u1" >/dev/null
nbdinfo --list "$u1" >/dev/null
nbdinfo --map "$u1" >/dev/null
nbdinfo --map=qemu:allocation-depth "$u1" >/dev/null
nbdcopy "$u1" out2.raw
nbdcopy src.raw "$u1"
/usr/bin/python3 -m nbd -u "$u1" -c 'h.pwrite(b"x" * 512, 512); h.zero(4096, 8192); h.trim(4096, 65536); h.cache(4096, 0); h.flush()'
qemu-nbd -L -b 127.0.0.1 -p "$p1" >/dev/null
"$qnbd" -L -b 127.0.0.1 -p "$p1" >/dev/null
"$qnbd" -L -b 127.0.0.1 -p "$p2" >/dev/null
qemu-nbd -L -b 127.0.0.1 -p "$p2" >/dev/null
nbdinfo --map=qemu:dirty-bitmap:b0 "$u2" >/dev/null
nbdinfo --list "$u2" >/dev/null
python3 "$rec" goclient "$tmp/qnbd.sock" "$tmp/rec-qnbd/go-qnbd.go"
python3 "$rec" goclient "$tmp/qemu.sock" "$tmp/rec-qemu/go-qemu.go"
sleep 0.5
for d in rec-qnbd rec-qemu; do
    for f in "$tmp/$d"/[!.]*; do mv "$f" "$(dirname "$f")/${d#rec-}-$(basename "$f")"; done
    python3 "$rec" split "$tmp/$d" "$corpus"
done

# A TLS (PSK) session's client side, for the handshake target's TLS mode (byte 0 = 4).
mkdir psk
psktool -u qemu -p psk/keys.psk >/dev/null
"$qnbd" -k "$tmp/tls.sock" -t -e 0 -f raw --object tls-creds-psk,id=tls0,dir=psk,endpoint=server \
    --tls-creds tls0 a.raw 2>/dev/null &
pids+=($!)
wait_for "$tmp/tls.sock"
p3=$(port)
python3 "$rec" proxy "$p3" "$tmp/tls.sock" "$tmp/rec-tls" &
pids+=($!)
wait_for "$tmp/rec-tls/.ready"
qemu-img info --object tls-creds-psk,id=tls0,dir=psk,endpoint=client,username=qemu \
    --image-opts "driver=nbd,host=127.0.0.1,port=$p3,tls-creds=tls0" >/dev/null
sleep 0.5
for f in "$tmp"/rec-tls/*.c2s; do
    { printf '\004'; head -c 65536 "$f"; } >"$corpus/handshake/tls-$(basename "$f" .c2s)"
done

# qcow2 images: 4 control bytes (mode, three I/O places), then the image.
q() { # name, create options, then qemu-io commands
    local name=$1 opts=$2
    shift 2
    qemu-img create -q -f qcow2 -o "$opts" "$name.qcow2" 64K
    for c in "$@"; do qemu-io -f qcow2 -c "$c" "$name.qcow2" >/dev/null; done
}
printf 'backing data' >base.raw
q empty cluster_size=512
q data cluster_size=512 'write -P 0xaa 0 4k' 'write -P 0xbb 33k 1k' 'write -z 40k 4k'
q refcount1 cluster_size=512,refcount_bits=1 'write -P 1 0 2k'
q refcount64 cluster_size=512,refcount_bits=64 'write -P 1 0 2k'
q v2 cluster_size=512,compat=0.10 'write -P 2 1k 2k'
q lazy cluster_size=512,lazy_refcounts=on 'write -P 3 0 1k'
q extl2 cluster_size=16k,extended_l2=on 'write -P 4 0 2k' 'write -P 5 20k 1k' 'write -z 40k 2k'
qemu-img create -q -f qcow2 -o cluster_size=512 -b base.raw -F raw backing.qcow2 64K
qemu-io -f qcow2 -c 'write -P 6 512 512' backing.qcow2 >/dev/null
qemu-img create -q -f raw plain.raw 64K
qemu-io -f raw -c 'write -P 0x5c 0 16k' -c 'write -P 0x5d 32k 1k' plain.raw >/dev/null
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096 plain.raw zlib.qcow2
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096,compression_type=zstd plain.raw zstd.qcow2
q snap cluster_size=512 'write -P 7 0 1k'
qemu-img snapshot -c s1 snap.qcow2
qemu-io -f qcow2 -c 'write -P 8 0 2k' snap.qcow2 >/dev/null
q bitmap cluster_size=512 'write -P 9 0 1k'
qemu-img bitmap --add bitmap.qcow2 b0
qemu-img bitmap --add --disable bitmap.qcow2 b1
qemu-io -f qcow2 -c 'write -P 10 4k 1k' bitmap.qcow2 >/dev/null
q datafile cluster_size=512,data_file=datafile.raw 'write -P 11 0 2k' 'write -z 4k 1k'
q datafileraw cluster_size=512,data_file=datafileraw.raw,data_file_raw=on 'write -P 12 1k 2k'
cp lazy.qcow2 dirty.qcow2
# The dirty bit (incompatible feature bit 0, header bytes 72-79).
printf '\001' | dd of=dirty.qcow2 bs=1 seek=79 conv=notrunc status=none
for img in *.qcow2; do
    n=${img%.qcow2}
    { printf '\000\000\200\360'; cat "$img"; } >"$corpus/qcow2/$n-rw"
    { printf '\001\020\100\377'; cat "$img"; } >"$corpus/qcow2/$n-ro"
done
{ printf '\005\000\200\360'; cat snap.qcow2; } >"$corpus/qcow2/snap-l1"
{ printf '\002\000\200\360'; cat data.qcow2; } >"$corpus/qcow2/data-discard"
bash "$root/fuzz/make-format-seeds.sh"
echo "make-seeds: $(for d in "$corpus"/*; do printf '%s %s  ' "$(basename "$d")" "$(ls "$d" | wc -l)"; done)"
