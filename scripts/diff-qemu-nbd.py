#!/usr/bin/python3
"""Differential run: the same random requests (writes, zeroes with and without NO_HOLE and
FAST_ZERO, trims, flushes, reads) through qnbd and qemu-nbd, each on its own copy of the same
image, for qcow2 in its variants and the other formats; prints every answer that differs
(reads of trimmed ranges excepted: their contents are the server's choice) and every image
`qemu-img check` does not find clean.

Usage: scripts/diff-qemu-nbd.py [CONFIG...]   (SEEDS=n seeds per config, default 3, from SEED0, default 0;
QNBD=path, default target/release/qnbd). Known differences, both fine by the NBD spec: v2
qcow2 zeroing with FAST_ZERO (qemu-nbd refuses it, qnbd deallocates), qed over a backing file
(qemu copies the backing file into the rest of a zero cluster a write lands in; qnbd keeps
zeroes), and a FAST_ZERO request both refuse with ENOTSUP (qemu has zeroed part of the range
by then, qnbd none of it; the spec leaves a failed request's range unspecified). qcow2 images
with an external data file are served from their own directory (qemu resolves a relative data
file name against the current directory).
"""
import os, random, subprocess, sys, tempfile, time, shutil
sys.path.insert(0, "/usr/lib/python3/dist-packages")
import nbd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QNBD = os.environ.get("QNBD", os.path.join(ROOT, "target/release/qnbd"))
WORK = tempfile.mkdtemp(prefix="qnbd-diff-")
KiB, MiB = 1024, 1 << 20

def serve(prog, sock, args, cwd):
    if os.path.exists(sock): os.unlink(sock)
    p = subprocess.Popen([prog, "-k", sock, "-t"] + args, stderr=subprocess.PIPE, cwd=cwd)
    for _ in range(200):
        if os.path.exists(sock): break
        time.sleep(0.02)
    time.sleep(0.1)
    return p

def run(cfg, seed, nops=300):
    name, create, sargs, img_fmt = cfg
    d = f"{WORK}/{name}"
    shutil.rmtree(d, ignore_errors=True); os.makedirs(f"{d}/a")
    subprocess.run(create.format(d=d), shell=True, check=True, cwd=f"{d}/a")
    # Each server gets its own directory: an external data file or backing file named
    # relative to the image stays its own.
    shutil.copytree(f"{d}/a", f"{d}/b")
    hs, procs = [], []
    for prog, img in ((QNBD, "a/img"), ("qemu-nbd", "b/img")):
        sock = f"{d}/{prog.split('/')[-1]}.sock"
        a = [x.replace("IMG", f"{d}/{img}") for x in sargs]
        # From the image's directory: qemu opens a relative data file name from there.
        procs.append(serve(prog, sock, a, os.path.dirname(f"{d}/{img}")))
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.connect_unix(sock)
        hs.append(h)
    size = hs[0].get_size()
    assert size == hs[1].get_size()
    rng = random.Random(seed)
    trimmed = []
    bad = 0
    ops = []
    for i in range(nops):
        r = rng.random()
        n = rng.choice([512, 4 * KiB, 64 * KiB, 100 * KiB, MiB])
        off = rng.randrange(0, size - n) // 512 * 512
        if "compress" in name:
            off, n = off // 65536 * 65536, 65536
        res = []
        for h in hs:
            try:
                if r < 0.35:
                    data = bytes([(seed * 7 + i) & 0xFF]) * n
                    h.pwrite(data, off); res.append("ok")
                elif r < 0.5:
                    fl = random.Random(i).choice([0, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FAST_ZERO])
                    h.zero(n, off, flags=fl); res.append("ok")
                elif r < 0.6:
                    if h.can_trim(): h.trim(n, off)
                    res.append("ok")
                elif r < 0.65:
                    h.flush(); res.append("ok")
                else:
                    res.append(h.pread(n, off))
            except nbd.Error as e:
                res.append(f"err {e.errno}")
        ops.append((i, r, off, n))
        if r >= 0.5 and r < 0.6:
            trimmed.append((off, n))
        if res[0] != res[1]:
            tr = any(o < off + n and off < o + m for o, m in trimmed)
            kind = "read" if r >= 0.65 else ("write" if r < .35 else "zero" if r < .5 else "trim")
            if isinstance(res[0], (bytes, bytearray)) and tr and not os.environ.get("SHOWTRIM"):
                continue
            bad += 1
            if bad < 4:
                a, b = res
                if isinstance(a, (bytes, bytearray)) and isinstance(b, (bytes, bytearray)):
                    j = next(k for k in range(len(a)) if a[k] != b[k])
                    print(f"  {name} seed {seed} op {i} {kind} off {off} n {n}: differ at +{j}: qnbd {a[j]} qemu {b[j]}")
                else:
                    print(f"  {name} seed {seed} op {i} {kind} off {off} n {n}: qnbd {str(a)[:40]} qemu {str(b)[:40]}")
    for h in hs:
        h.shutdown()
    for p in procs:
        p.terminate(); p.wait()
    for img in ("a/img", "b/img"):
        c = subprocess.run(["qemu-img", "check", "-f", img_fmt, f"{d}/{img}"], capture_output=True, text=True,
                           cwd=os.path.dirname(f"{d}/{img}"))
        if c.returncode != 0 and "does not support checks" not in c.stderr:
            print(f"  {name} seed {seed} {img}: check rc {c.returncode}: {c.stdout[-300:]} {c.stderr[-300:]}")
    return bad

Q = "qemu-img create -q -f qcow2"
cfgs = [
    ("plain", f"{Q} img 64M", ["-f", "qcow2", "IMG"], "qcow2"),
    ("plain-unmap", f"{Q} img 64M", ["-f", "qcow2", "--discard=unmap", "IMG"], "qcow2"),
    ("ext", f"{Q} -o extended_l2=on img 64M", ["-f", "qcow2", "--discard=unmap", "IMG"], "qcow2"),
    ("ext-nounmap", f"{Q} -o extended_l2=on img 64M", ["-f", "qcow2", "IMG"], "qcow2"),
    ("c4k", f"{Q} -o cluster_size=4096 img 64M", ["-f", "qcow2", "--discard=unmap", "IMG"], "qcow2"),
    ("v2", f"{Q} -o compat=0.10 img 64M", ["-f", "qcow2", "--discard=unmap", "IMG"], "qcow2"),
    ("v2-nounmap", f"{Q} -o compat=0.10 img 64M", ["-f", "qcow2", "IMG"], "qcow2"),
    ("backing", f"qemu-img create -q -f raw b.raw 64M && qemu-io -f raw -c 'write -P 0x33 0 64M' b.raw >/dev/null && {Q} -b b.raw -F raw img 64M", ["-f", "qcow2", "--discard=unmap", "IMG"], "qcow2"),
    ("backing-v2", f"qemu-img create -q -f raw b.raw 64M && qemu-io -f raw -c 'write -P 0x33 0 64M' b.raw >/dev/null && {Q} -o compat=0.10 -b b.raw -F raw img 64M", ["-f", "qcow2", "--discard=unmap", "IMG"], "qcow2"),
    ("backing-ext", f"qemu-img create -q -f raw b.raw 64M && qemu-io -f raw -c 'write -P 0x33 0 64M' b.raw >/dev/null && {Q} -o extended_l2=on -b b.raw -F raw img 64M", ["-f", "qcow2", "--discard=unmap", "IMG"], "qcow2"),
    ("compressed", f"qemu-img create -q -f raw s.raw 64M && qemu-io -f raw -c 'write -P 0x44 0 40M' s.raw >/dev/null && qemu-img convert -c -O qcow2 s.raw img", ["-f", "qcow2", "--discard=unmap", "IMG"], "qcow2"),
    ("detect-unmap", f"{Q} img 64M", ["-f", "qcow2", "--discard=unmap", "--detect-zeroes=unmap", "IMG"], "qcow2"),
    ("compress-filter", f"{Q} img 64M", ["--discard=unmap", "--image-opts", "driver=compress,file.driver=qcow2,file.file.filename=IMG"], "qcow2"),
    ("raw-unmap", "truncate -s 64M img", ["-f", "raw", "--discard=unmap", "IMG"], "raw"),
    ("snapshot", f"{Q} img 64M && qemu-io -f qcow2 -c 'write -P 0x55 0 32M' img >/dev/null && qemu-img snapshot -c s1 img && qemu-io -f qcow2 -c 'write -P 0x66 16M 32M' img > /dev/null", ["-f", "qcow2", "--discard=unmap", "IMG"], "qcow2"),
]
cfgs += [
    ("refcount1", f"{Q} -o refcount_bits=1 img 64M", ["-f", "qcow2", "--discard=unmap", "IMG"], "qcow2"),
    ("c2m", f"{Q} -o cluster_size=2M img 64M", ["-f", "qcow2", "--discard=unmap", "IMG"], "qcow2"),
    ("lazy", f"{Q} -o lazy_refcounts=on img 64M", ["-f", "qcow2", "IMG"], "qcow2"),
    ("datafile", f"{Q} -o data_file=d.raw img 64M", ["-f", "qcow2", "--discard=unmap", "IMG"], "qcow2"),
    ("datafile-nounmap", f"{Q} -o data_file=d.raw img 64M", ["-f", "qcow2", "IMG"], "qcow2"),
    ("datafile-raw", f"{Q} -o data_file=d.raw,data_file_raw=on img 64M", ["-f", "qcow2", "--discard=unmap", "IMG"], "qcow2"),
    ("datafile-raw-nounmap", f"{Q} -o data_file=d.raw,data_file_raw=on img 64M", ["-f", "qcow2", "IMG"], "qcow2"),
    ("datafile-ext-c4k", f"{Q} -o data_file=d.raw,extended_l2=on,cluster_size=16k img 64M", ["-f", "qcow2", "--discard=unmap", "IMG"], "qcow2"),
    ("datafile-backing", f"qemu-img create -q -f raw b.raw 64M && qemu-io -f raw -c 'write -P 0x33 0 64M' b.raw >/dev/null && {Q} -o data_file=d.raw -b b.raw -F raw img 64M", ["-f", "qcow2", "--discard=unmap", "IMG"], "qcow2"),
    ("ext-c4k-backing", f"qemu-img create -q -f raw b.raw 64M && qemu-io -f raw -c 'write -P 0x33 0 64M' b.raw >/dev/null && {Q} -o extended_l2=on,cluster_size=16k -b b.raw -F raw img 64M", ["-f", "qcow2", "--discard=unmap", "IMG"], "qcow2"),
]
B = "qemu-img create -q -f raw b.raw 64M && qemu-io -f raw -c 'write -P 0x33 0 64M' b.raw >/dev/null && "
for fmt, opt in [("qed", ""), ("qed", "-o cluster_size=4096"), ("vmdk", ""), ("vdi", ""), ("vhdx", ""), ("vpc", ""), ("parallels", ""), ("parallels", "-o cluster_size=64k")]:
    cfgs.append((f"{fmt}{opt.replace(' ', '').replace('=', '')}", f"qemu-img create -q -f {fmt} {opt} img 64M", ["-f", fmt, "--discard=unmap", "IMG"], fmt))
cfgs.append(("qed-backing", B + "qemu-img create -q -f qed -b b.raw -F raw img 64M", ["-f", "qed", "IMG"], "qed"))
only = sys.argv[1:] 
tot = 0
for cfg in cfgs:
    if only and cfg[0] not in only: continue
    first = int(os.environ.get("SEED0", "0"))
    for seed in range(first, first + int(os.environ.get("SEEDS", "3"))):
        b = run(cfg, seed)
        tot += b
    print(f"{cfg[0]}: done")
print("total diffs", tot)
shutil.rmtree(WORK, ignore_errors=True)
