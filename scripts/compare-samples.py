#!/usr/bin/python3
"""qemu's iotest sample images (tests/qemu-iotests/sample_images), served by qnbd and by
qemu-nbd side by side: the images as they are and damaged the way the iotests damage them
(075 cloop, 078 bochs, 059 vmdk, 076 parallels, 135/146 vpc, 064/070 vhdx, 239 dmg). Each
case must be served alike (the same bytes: `qemu-img compare`; the same map: `nbdinfo
--map`) or refused alike (the same first line on stderr, exit code 1).

usage: compare-samples.py SAMPLE_DIR QNBD [QEMU_NBD]     (exit 1 on any difference)
Run by scripts/external-suites.sh, which has qemu's sources."""

import bz2
import os
import socket
import subprocess
import sys
import tempfile
import time

# (sample, format, [(offset, bytes)] pokes applied to a fresh copy)
BOCHS = [
    [],
    [(0x48, b"\xff\xff\xff\xff")],
    [(0x48, b"\x00\x00\x00\x40")],
    [(0x58, b"\x00\xc0\x0f\x00\x00\x00\x00\x7f")],
    [(0x48, b"\x10\x00\x00\x00")],
    [(0x50, b"\x00\x00\x00\x80")],
    [(0x50, b"\x00\x00\x00\x00")],
    [(0x50, b"\x00\x10\x00\x00")],
]
CLOOP = [
    [],
    [(128, b"\x00\x00\x02\x01")],
    [(128, b"\x00\x00\x00\x00")],
    [(128, b"\xff\xff\xfe\x00")],
    [(132, b"\xff\xff\xff\xff")],
    [(132, b"\x04\x00\x00\x01")],
    [(136, b"\x00\x00\x00\x00\xff\xff\xff\xff"), (144, b"\x00\x00\x00\x00\xff\xfe\x00\x00")],
    [(136, b"\x00\x00\x00\x00\x00\x00\x00\x00"), (144, b"\xff\xff\xff\xff\xff\xff\xff\xff")],
]
CASES = (
    [("empty.bochs", "bochs", p) for p in BOCHS]
    + [("simple-pattern.cloop", "cloop", p) for p in CLOOP]
    + [
        ("simple-dmg.dmg", "dmg", []),
        ("parallels-v1", "parallels", []),
        ("parallels-v2", "parallels", []),
        ("parallels-with-bitmap", "parallels", []),
        ("iotest-version3.vmdk", "vmdk", []),
        ("afl9.vmdk", "vmdk", []),
        ("d2v-zerofilled.vhd", "vpc", []),
        ("hyperv2012r2-dynamic.vhd", "vpc", []),
        ("virtualpc-dynamic.vhd", "vpc", []),
        ("afl5.img", "vpc", []),
        ("iotest-dynamic-1G.vhdx", "vhdx", []),
        ("test-disk2vhd.vhdx", "vhdx", []),
        ("iotest-dirtylog-10G-4M.vhdx", "vhdx", []),
    ]
)

# Formats whose block status differs from qemu's on purpose (README.md, "Differences"):
# qemu's vhdx driver reports everything as data, qnbd the blocks that are not there as holes.
MAPPED_OTHERWISE = {"vhdx"}


def greets(sock):
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(sock)
            return s.recv(8) == b"NBDMAGIC"
    except OSError:
        return False


def start(binary, img, fmt, sock):
    """A server on `sock`; None and its first stderr line when it refuses the image."""
    p = subprocess.Popen(
        [binary, "-r", "-t", "-f", fmt, "-k", sock, img],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    for _ in range(200):
        # qemu-nbd makes its socket before it opens the image: serving is a greeting.
        if os.path.exists(sock) and greets(sock):
            return p, None
        if p.poll() is not None:
            err = p.stderr.read().splitlines()
            first = err[0] if err else f"exit {p.returncode}"
            # The binary's name starts its messages.
            return None, (p.returncode, first.split(":", 1)[-1])
        time.sleep(0.05)
    p.kill()
    return None, ("hang", "no socket after 10 s")


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


def case(tmp, src, name, fmt, pokes, qnbd, qemu_nbd):
    img = os.path.join(tmp, name)
    with bz2.open(src) as f, open(img, "wb") as out:
        out.write(f.read())
    with open(img, "r+b") as f:
        for at, data in pokes:
            f.seek(at)
            f.write(data)
    servers, refusals, maps = [], [], []
    try:
        for i, b in enumerate([qnbd, qemu_nbd]):
            sock = os.path.join(tmp, f"s{i}")
            p, refused = start(b, img, fmt, sock)
            servers.append(p)
            refusals.append(refused)
            if p:
                uri = f"nbd+unix:///?socket={sock}"
                maps.append(run(["nbdinfo", "--map", uri])[1])
        if refusals[0] or refusals[1]:
            return refusals[0] == refusals[1], f"refused {refusals[0]} / {refusals[1]}"
        if maps[0] != maps[1] and fmt not in MAPPED_OTHERWISE:
            return False, f"maps differ:\n{maps[0]}\n{maps[1]}"
        uris = [f"nbd+unix:///?socket={os.path.join(tmp, f's{i}')}" for i in (0, 1)]
        rc, out = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", *uris])
        return rc == 0, out.strip().splitlines()[-1] if out.strip() else f"rc {rc}"
    finally:
        for p in servers:
            if p:
                p.terminate()
                p.wait()
        for i in (0, 1):
            sock = os.path.join(tmp, f"s{i}")
            if os.path.exists(sock):
                os.unlink(sock)
        os.unlink(img)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    samples, qnbd = sys.argv[1], sys.argv[2]
    qemu_nbd = sys.argv[3] if len(sys.argv) > 3 else "/usr/bin/qemu-nbd"
    failed = 0
    with tempfile.TemporaryDirectory(prefix="qnbd-samples") as tmp:
        for name, fmt, pokes in CASES:
            src = os.path.join(samples, name + ".bz2")
            label = name + "".join(f" @{at:#x}={data.hex()}" for at, data in pokes)
            if not os.path.exists(src):
                print(f"sample {label}: MISSING {src}")
                failed += 1
                continue
            same, what = case(tmp, src, name, fmt, pokes, qnbd, qemu_nbd)
            print(f"sample {label}: {'same' if same else 'DIFFERENT'}: {what}")
            failed += not same
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
