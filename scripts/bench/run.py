#!/usr/bin/env python3
"""qnbd benchmark suite: qnbd beside qemu-nbd, nbdkit's file plugin and the loopback limit
(nbdkit's memory plugin), over Unix, TCP, TCP+TLS (x509) and TCP+TLS (PSK), on raw and qcow2
images (fresh, fully allocated, compressed). Not a test: it writes a markdown report, the raw
JSON of every round and a PNG chart. See scripts/bench/README.md.

    python3 scripts/bench/run.py            (environment knobs below; DRY_RUN=1 shows the plan)

Every figure is the median of ROUNDS rounds with its min-max spread. Rounds are interleaved:
each (transport, image, workload) runs every server once per round, one after the other, and
the rounds repeat the whole plan, so a slow drift of the machine hits every server alike.
"""

import ctypes
import datetime
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MISSING = 77


def env_list(name, default):
    return os.environ.get(name, default).split()


def env_int(name, default):
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        die(f"{name} must be an integer")


def die(msg, code=1):
    print(f"bench: {msg}", file=sys.stderr)
    sys.exit(code)


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Knobs

ALL_SERVERS = ["qnbd", "qemu-nbd", "nbdkit-file", "nbdkit-memory"]
# Optional qnbd variants (the old bench.sh 'aio' table): add them to SERVERS.
QNBD_VARIANTS = {
    "qnbd": [],
    "qnbd-io_uring": ["--aio=io_uring"],
    "qnbd-cache-none": ["--cache=none"],
    "qnbd-native": ["--aio=native", "--cache=none"],
    # NAME=value entries are the server's environment, not arguments.
    "qnbd-copied-writes": ["QNBD_SPLICE_WRITES=off"],
    "qnbd-spliced-writes": ["QNBD_SPLICE_WRITES=on"],
    "qnbd-spliced-reads": ["QNBD_SPLICE_READS=on"],
    "qnbd-copied-reads": ["QNBD_SPLICE_READS=off"],
}
ALL_TRANSPORTS = ["unix", "tcp", "tls-x509", "tls-psk"]
ALL_IMAGES = ["raw", "qcow2-fresh", "qcow2-full", "qcow2-compressed"]
LIMIT = "nbdkit-memory"

ROUNDS = env_int("ROUNDS", 5)
SIZE_MB = env_int("SIZE_MB", 1024)
RUNTIME = env_int("RUNTIME", 3)
RAMP = env_int("RAMP", 1)
SEQ_QD = env_int("SEQ_QD", 8)
SERVERS = env_list("SERVERS", " ".join(ALL_SERVERS))
TRANSPORTS = env_list("TRANSPORTS", " ".join(ALL_TRANSPORTS))
IMAGES = env_list("IMAGES", " ".join(ALL_IMAGES))
QCOW2_TRANSPORTS = env_list("QCOW2_TRANSPORTS", "unix")
WORKLOADS = env_list("WORKLOADS", "seq-read seq-write rand-read rand-write")
CONNS = env_list("CONNS", "1 4")
QDS = env_list("QDS", "1 8 32")
# The loopback limit: nbdkit's memory plugin by default; e.g. "memory allocator=malloc" or
# "null" (no data at all) to try another.
LIMIT_PLUGIN = env_list("LIMIT_PLUGIN", "memory")
CHART = os.environ.get("CHART", "1") != "0"
DRY_RUN = os.environ.get("DRY_RUN", "0") != "0"
STAMP = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
OUT = Path(os.environ.get("OUT", f"/var/tmp/qnbd-bench/{STAMP}"))
WORKDIR_PARENT = os.environ.get("WORKDIR", "/var/tmp")

for name, values, allowed in [
    ("SERVERS", SERVERS, ALL_SERVERS + list(QNBD_VARIANTS)),
    ("TRANSPORTS", TRANSPORTS, ALL_TRANSPORTS),
    ("QCOW2_TRANSPORTS", QCOW2_TRANSPORTS, ALL_TRANSPORTS),
    ("IMAGES", IMAGES, ALL_IMAGES),
]:
    bad = [v for v in values if v not in allowed]
    if bad:
        die(f"{name}: unknown {' '.join(bad)} (choose from {' '.join(allowed)})", 2)
if ROUNDS < 1 or SIZE_MB < 4 or RUNTIME < 1 or RAMP < 0:
    die("need ROUNDS >= 1, SIZE_MB >= 4, RUNTIME >= 1, RAMP >= 0", 2)


# ---------------------------------------------------------------------------------------------
# Workloads: (name, kind, rw, block size, queue depth, connections)


def workload_list():
    out = []

    def want(family, name):
        return family in WORKLOADS or name in WORKLOADS

    for rw in ["read", "write"]:
        for c in CONNS:
            name = f"seq-{rw}-c{c}"
            if want(f"seq-{rw}", name):
                out.append(dict(name=name, kind="seq", rw=rw, bs="1M", qd=SEQ_QD, conns=int(c)))
    for rw in ["read", "write"]:
        for qd in QDS:
            name = f"rand-{rw}-qd{qd}"
            if want(f"rand-{rw}", name):
                out.append(dict(name=name, kind="rand", rw="rand" + rw, bs="4k", qd=int(qd), conns=1))
    return out


def unit(w):
    return "MiB/s" if w["kind"] == "seq" else "IOPS"


def writes(w):
    return w["rw"].endswith("write")


# ---------------------------------------------------------------------------------------------
# Processes: every child dies with us (PR_SET_PDEATHSIG) and is killed at exit.

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_children = []


def _die_with_parent():
    _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(cmd, **kw):
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, **kw)
    _children.append(p)
    return p


def reap(p, grace=5.0):
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in _children:
        _children.remove(p)


def kill_all():
    for p in list(_children):
        try:
            reap(p, 2.0)
        except Exception:
            pass


def _on_signal(sig, _frame):
    raise SystemExit(128 + sig)


def run_quiet(cmd, **kw):
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          preexec_fn=_die_with_parent, **kw)


def check(cmd, **kw):
    r = run_quiet(cmd, **kw)
    if r.returncode != 0:
        die(f"{' '.join(map(str, cmd))} failed:\n{r.stdout}{r.stderr}")
    return r.stdout


# ---------------------------------------------------------------------------------------------
# /proc readings


def proc_status_kib(pid, field):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid):
    """utime + stime of the whole process (all threads, living and exited), in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# ---------------------------------------------------------------------------------------------
# Tools


def need_tools():
    need = {"fio": "fio", "nbdinfo": "libnbd-bin", "nbdcopy": "libnbd-bin", "qemu-img": "qemu-utils"}
    if "qemu-nbd" in SERVERS:
        need["qemu-nbd"] = "qemu-utils"
    if any(s.startswith("nbdkit") for s in SERVERS):
        need["nbdkit"] = "nbdkit"
    transports = set(TRANSPORTS) | (set(QCOW2_TRANSPORTS) if set(IMAGES) - {"raw"} else set())
    if "tls-x509" in transports:
        need["certtool"] = "gnutls-bin"
    if "tls-psk" in transports:
        need["psktool"] = "gnutls-bin"
        need["cc"] = "gcc (builds the LD_PRELOAD shim that lets fio read tls-psk-file)"
    if CHART:
        need["gnuplot"] = "gnuplot-nox (or CHART=0)"
    missing = [f"{t} ({pkg})" for t, pkg in need.items() if shutil.which(t) is None]
    if missing:
        die("missing: " + ", ".join(missing) + " -- bash scripts/install-deps.sh", MISSING)
    if any(s.startswith("nbdkit") for s in SERVERS) and transports & {"tls-x509", "tls-psk"}:
        cfg = run_quiet(["nbdkit", "--dump-config"]).stdout
        if "tls=yes" not in cfg:
            die("this nbdkit is built without TLS", MISSING)


def nbdkit_has_filter(name):
    try:
        cfg = run_quiet(["nbdkit", "--dump-config"]).stdout
    except OSError:
        return False
    for line in cfg.splitlines():
        if line.startswith("filterdir="):
            return Path(line.split("=", 1)[1], f"nbdkit-{name}-filter.so").exists()
    return False


def qnbd_binary():
    if os.environ.get("QNBD"):
        q = Path(os.environ["QNBD"])
        if not os.access(q, os.X_OK):
            die(f"QNBD={q} is not executable", MISSING)
        return q
    q = ROOT / "target/release/qnbd"
    if os.environ.get("BUILD", "0") != "0" or not q.exists():
        cargo = shlex.split(os.environ.get("CARGO", "cargo"))
        if shutil.which(cargo[0]) is None:
            die(f"{q} is missing and {cargo[0]} is not installed", MISSING)
        log("building target/release/qnbd")
        r = subprocess.run(cargo + ["build", "--release", "-q"], cwd=ROOT)
        if r.returncode != 0 or not q.exists():
            die("cargo build --release failed")
    return q


def version(cmd):
    try:
        r = run_quiet(cmd, timeout=10)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


# ---------------------------------------------------------------------------------------------
# Images and credentials


def make_source(path):
    """SIZE_MB of data that compresses to about half (each 4 KiB: 2 KiB random, 2 KiB zero),
    so that 'qemu-img convert -c' really stores compressed clusters, and no 4 KiB block is
    all zero (nothing is skipped as sparse)."""
    zero = bytes(2048)
    with open(path, "wb") as f:
        for _ in range(SIZE_MB):
            rnd = os.urandom(512 * 1024)
            f.write(b"".join(rnd[i:i + 2048] + zero for i in range(0, len(rnd), 2048)))


class Images:
    def __init__(self, work):
        self.work = work
        self.src = work / "src.raw"
        self.masters = {}
        self.dirty = {}

    def prepare(self):
        if not (set(IMAGES) & {"raw", "qcow2-full", "qcow2-compressed"}) and "nbdkit-file" not in SERVERS:
            return
        log(f"preparing a {SIZE_MB} MiB source image")
        make_source(self.src)
        if "raw" in IMAGES:
            self.masters["raw"] = self.src
        # qemu-img convert leaves unwritten (fallocated) extents under the clusters it writes,
        # and ext4 then converts extents on every later write; a plain copy gives the qcow2
        # file the same host state as the raw working image (also a copy).
        for img, extra in [("qcow2-full", []), ("qcow2-compressed", ["-c"])]:
            if img in IMAGES:
                log(f"preparing the {img} master image")
                conv = self.work / f"{img}.conv"
                check(["qemu-img", "convert", "-q", *extra, "-f", "raw", "-O", "qcow2",
                       str(self.src), str(conv)])
                master = self.work / f"{img}.master"
                check(["cp", "--sparse=never", str(conv), str(master)])
                conv.unlink()
                self.masters[img] = master

    def working(self, img):
        """Path and format of the image a server should open; re-made when a write dirtied it
        (raw is only overwritten, its layout never changes, so it is copied once)."""
        if img == "qcow2-fresh":
            path = self.work / "fresh.qcow2"
            path.unlink(missing_ok=True)
            check(["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{SIZE_MB}M"])
            return path, "qcow2"
        path = self.work / f"{img}.img"
        if self.dirty.get(img, True):
            check(["cp", "--sparse=never", str(self.masters[img]), str(path)])
            self.dirty[img] = False
        return path, ("raw" if img == "raw" else "qcow2")

    def written(self, img):
        if img != "raw":
            self.dirty[img] = True


def make_pki(d):
    """x509 (CA + server certificate, as qemu and nbdkit expect in one directory) and a PSK
    file (user 'bench')."""
    server = d / "x509"
    server.mkdir(parents=True)

    def certtool(*args):
        check(["certtool", *args])

    (d / "ca.info").write_text("cn = bench CA\nca\ncert_signing_key\n")
    certtool("--generate-privkey", "--outfile", str(d / "ca-key.pem"))
    certtool("--generate-self-signed", "--load-privkey", str(d / "ca-key.pem"),
             "--template", str(d / "ca.info"), "--outfile", str(server / "ca-cert.pem"))
    (d / "server.info").write_text(
        "cn = localhost\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\n")
    certtool("--generate-privkey", "--outfile", str(server / "server-key.pem"))
    certtool("--generate-certificate", "--load-ca-privkey", str(d / "ca-key.pem"),
             "--load-ca-certificate", str(server / "ca-cert.pem"),
             "--load-privkey", str(server / "server-key.pem"), "--template", str(d / "server.info"),
             "--outfile", str(server / "server-cert.pem"))
    (d / "psk").mkdir()
    check(["psktool", "-u", "bench", "-p", str(d / "psk/keys.psk")])


# fio's nbd engine connects with nbd_connect_uri and never calls nbd_set_uri_allow_local_file,
# so libnbd refuses ?tls-psk-file=. This preloaded shim allows it before connecting.
SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdbool.h>
struct nbd_handle;
int nbd_connect_uri(struct nbd_handle *h, const char *uri)
{
    int (*real)(struct nbd_handle *, const char *) = dlsym(RTLD_NEXT, "nbd_connect_uri");
    int (*allow)(struct nbd_handle *, bool) = dlsym(RTLD_NEXT, "nbd_set_uri_allow_local_file");
    if (allow)
        allow(h, true);
    return real(h, uri);
}
"""


def build_shim(work):
    c = work / "allow-local-file.c"
    so = work / "allow-local-file.so"
    c.write_text(SHIM_C)
    check(["cc", "-shared", "-fPIC", "-O2", "-o", str(so), str(c), "-ldl"])
    return so


# ---------------------------------------------------------------------------------------------
# Servers


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process on one transport and image. .uri is what the clients use."""

    def __init__(self, ctx, name, transport, img_path, fmt, read_only):
        self.ctx, self.name, self.transport = ctx, name, transport
        self.env = {}
        work = ctx["work"]
        self.sock = work / "nbd.sock"
        self.sock.unlink(missing_ok=True)
        self.port = free_port()
        pki = work / "pki"
        psk = pki / "psk/keys.psk"
        addr = []
        if name in QNBD_VARIANTS or name == "qemu-nbd":
            binary = str(ctx["qnbd"]) if name in QNBD_VARIANTS else "qemu-nbd"
            extra = [a for a in QNBD_VARIANTS.get(name, []) if a.startswith("-")]
            self.env = dict(a.split("=", 1) for a in QNBD_VARIANTS.get(name, []) if not a.startswith("-"))
            if transport == "unix":
                addr = ["-k", str(self.sock)]
            else:
                addr = ["-b", "127.0.0.1", "-p", str(self.port)]
            if transport == "tls-x509":
                addr += ["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={pki / 'x509'},verify-peer=off",
                         "--tls-creds", "tls0"]
            elif transport == "tls-psk":
                addr += ["--object", f"tls-creds-psk,id=tls0,endpoint=server,dir={pki / 'psk'}",
                         "--tls-creds", "tls0"]
            ro = ["-r"] if read_only else []
            self.cmd = [binary, "-f", fmt, "-t", "-e", "0", *ro, *extra, *addr, str(img_path)]
        else:
            if transport == "unix":
                addr = ["-U", str(self.sock)]
            else:
                addr = ["-i", "127.0.0.1", "-p", str(self.port)]
            if transport == "tls-x509":
                addr += ["--tls=require", f"--tls-certificates={pki / 'x509'}"]
            elif transport == "tls-psk":
                addr += ["--tls=require", f"--tls-psk={psk}"]
            if name == LIMIT:
                plugin = LIMIT_PLUGIN + [f"size={SIZE_MB}M"]
            elif fmt == "qcow2":
                plugin = ["--filter=qcow2dec", "file", f"file={img_path}"]
            else:
                plugin = ["file", f"file={img_path}"]
            ro = ["-r"] if read_only else []
            self.cmd = ["nbdkit", "-f", "--exit-with-parent", *ro, *addr, *plugin]
        self.uri = {
            "unix": f"nbd+unix:///?socket={self.sock}",
            "tcp": f"nbd://127.0.0.1:{self.port}/",
            # The clients do not verify the server's certificate (fio would need a local
            # tls-certificates= directory); the encryption is the same.
            "tls-x509": f"nbds://127.0.0.1:{self.port}/?tls-verify-peer=false",
            "tls-psk": f"nbds://bench@127.0.0.1:{self.port}/?tls-psk-file={psk}",
        }[transport]
        self.log = work / "server.log"
        self.proc = None

    def _connectable(self):
        try:
            if self.transport == "unix":
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(str(self.sock))
            else:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
            return True
        except OSError:
            return False

    def start(self):
        """Start it; returns milliseconds from the spawn to the first successful nbdinfo."""
        t0 = time.monotonic()
        with open(self.log, "wb") as logf:
            self.proc = spawn(self.cmd, stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        deadline = t0 + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self._connectable():
                r = run_quiet(["nbdinfo", "--size", self.uri], timeout=20)
                if r.returncode == 0:
                    return (time.monotonic() - t0) * 1000
            time.sleep(0.001)
        self.stop()
        tail = self.log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{self.name} did not start ({' '.join(self.cmd)}):\n{tail}")

    def stop(self):
        if self.proc is not None:
            reap(self.proc)
            self.proc = None


# ---------------------------------------------------------------------------------------------
# fio


def fio_cmd(w, uri, out):
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={w['rw']}",
           f"--bs={w['bs']}", f"--iodepth={w['qd']}", "--time_based", f"--runtime={RUNTIME}",
           f"--ramp_time={RAMP}", "--percentile_list=50:99:99.9", "--group_reporting",
           "--output-format=json", f"--output={out}"]
    if w["kind"] == "seq":
        part = SIZE_MB // w["conns"]
        cmd += [f"--numjobs={w['conns']}", f"--size={part}M", f"--offset_increment={part}M"]
    else:
        cmd += [f"--size={SIZE_MB}M", "--norandommap"]
    return cmd


def parse_fio(path, w):
    j = json.loads(path.read_text())["jobs"][0]
    d = j["write" if writes(w) else "read"]
    bs = 1 << 20 if w["kind"] == "seq" else 4096
    pct = d.get("clat_ns", {}).get("percentile", {})

    def p(key):
        v = pct.get(key)
        return v / 1000 if v is not None else None

    value = d["bw_bytes"] / (1 << 20) if w["kind"] == "seq" else d["iops"]
    return dict(value=value, ops=d["io_bytes"] // bs, p50_us=p("50.000000"),
                p99_us=p("99.000000"), p999_us=p("99.900000"))


def run_fio(ctx, w, server, out):
    """Run one fio job against a started server; samples the server's RSS while it runs and
    its CPU time from the end of the ramp to the end of the run."""
    env = dict(os.environ)
    if server.transport == "tls-psk":
        env["LD_PRELOAD"] = str(ctx["shim"])
    pid = server.proc.pid
    errf = ctx["work"] / "fio.err"
    with open(errf, "wb") as err:
        t0 = time.monotonic()
        p = spawn(fio_cmd(w, server.uri, out), stdout=err, stderr=subprocess.STDOUT, env=env)
        cpu0 = None
        rss_max = 0
        deadline = t0 + RAMP + RUNTIME + 120
        while p.poll() is None:
            now = time.monotonic()
            if cpu0 is None and now - t0 >= RAMP:
                cpu0 = proc_cpu_s(pid)
            rss_max = max(rss_max, proc_status_kib(pid, "VmRSS") or 0)
            if now > deadline:
                reap(p)
                raise RuntimeError("fio did not finish in time")
            wait = 0.05
            if cpu0 is None:
                wait = min(wait, max(0.001, t0 + RAMP - time.monotonic()))
            time.sleep(wait)
        cpu1 = proc_cpu_s(pid)
        if p in _children:
            _children.remove(p)
    if cpu0 is None:
        cpu0 = cpu1
    if p.returncode != 0:
        raise RuntimeError(f"fio failed ({p.returncode}):\n" + errf.read_text(errors="replace")[-2000:])
    if server.proc.poll() is not None:
        raise RuntimeError(f"{server.name} exited during the run:\n" + server.log.read_text(errors="replace")[-2000:])
    r = parse_fio(out, w)
    r["cpu_s"] = cpu1 - cpu0
    r["cpu_us_per_op"] = (cpu1 - cpu0) * 1e6 / r["ops"] if r["ops"] else None
    r["rss_load_kib"] = rss_max
    r["hwm_kib"] = proc_status_kib(pid, "VmHWM")
    return r


# ---------------------------------------------------------------------------------------------
# The plan


def make_plan(ctx):
    """Cells (transport, image), each with its workloads and the servers that run each."""
    wl = workload_list()
    qcow2dec = ctx["qcow2dec"]
    cells = []
    limit_planned = set()
    for image in IMAGES:
        transports = TRANSPORTS if image == "raw" else QCOW2_TRANSPORTS
        for t in transports:
            cases = []
            for w in wl:
                if image == "qcow2-fresh" and not writes(w):
                    continue  # reading a fresh image reads nothing but holes
                servers = []
                for s in SERVERS:
                    if s == LIMIT:
                        # The loopback limit does not depend on the image: measured once per
                        # transport and workload, in the raw cell when there is one.
                        if (t, w["name"]) in limit_planned:
                            continue
                        if image != "raw" and "raw" in IMAGES and t in TRANSPORTS:
                            continue
                        limit_planned.add((t, w["name"]))
                    if s == "nbdkit-file" and image != "raw" and not (qcow2dec and not writes(w)):
                        continue  # the file plugin cannot open qcow2; qcow2dec reads only
                    servers.append(s)
                if servers:
                    cases.append((w, servers))
            if cases:
                cells.append(dict(transport=t, image=image, cases=cases))
    return cells


def run_case(ctx, rnd, cell, w, sname):
    images = ctx["images"]
    t, image = cell["transport"], cell["image"]
    case_id = f"r{rnd}-{t}-{image}-{w['name']}-{sname}"
    rec = dict(round=rnd, transport=t, image=image, workload=w["name"], server=sname,
               unit=unit(w), ok=False)
    server = None
    try:
        if sname == LIMIT:
            img_path, fmt = None, "raw"
        else:
            img_path, fmt = images.working(image)
        os.sync()  # earlier writes reach the disk now, not during the measurement
        read_only = sname == "nbdkit-file" and fmt == "qcow2"
        server = Server(ctx, sname, t, img_path, fmt, read_only)
        rec["ttl_ms"] = server.start()
        if sname == LIMIT and not writes(w) and images.src.exists():
            # A memory disk reads as zeroes until written: give it the images' data, or the
            # limit of a read is that of sending one zeroed buffer, hot in the CPU cache.
            check(["nbdcopy", str(images.src), server.uri])
        time.sleep(0.1)
        rec["rss_idle_kib"] = proc_status_kib(server.proc.pid, "VmRSS")
        out = ctx["out"] / "raw" / f"{case_id}.fio.json"
        rec.update(run_fio(ctx, w, server, out))
        rec["ok"] = True
    except (RuntimeError, subprocess.SubprocessError, OSError, ValueError, KeyError) as e:
        rec["error"] = str(e)
        log(f"{case_id}: FAILED: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    finally:
        if server is not None:
            server.stop()
        if sname != LIMIT and writes(w):
            images.written(image)
    if rec["ok"]:
        lat = f" p99 {rec['p99_us']:.0f}us" if rec.get("p99_us") else ""
        log(f"{case_id}: {rec['value']:.1f} {rec['unit']}{lat}, "
            f"{rec['cpu_us_per_op'] or 0:.1f} us cpu/op, ttl {rec['ttl_ms']:.0f} ms")
    with open(ctx["out"] / "rounds.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


# ---------------------------------------------------------------------------------------------
# Report


def stats(values):
    v = [x for x in values if x is not None]
    if not v:
        return None
    return dict(median=statistics.median(v), min=min(v), max=max(v), n=len(v))


def fmt_num(x):
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_stat(s, scale=1.0):
    if s is None:
        return "–"
    if s["n"] == 1:
        return fmt_num(s["median"] * scale)
    return f"{fmt_num(s['median'] * scale)} ({fmt_num(s['min'] * scale)}–{fmt_num(s['max'] * scale)})"


def ratio(a, b):
    if a is None or b is None or not b["median"]:
        return "–"
    return f"{a['median'] / b['median']:.2f}×"


def summarise(records, cells):
    """{(transport, image, workload, server): {metric: stats}}; the loopback limit is keyed
    by ('*' image) because it does not depend on the image."""
    groups = {}
    for r in records:
        if not r["ok"]:
            continue
        img = "*" if r["server"] == LIMIT else r["image"]
        groups.setdefault((r["transport"], img, r["workload"], r["server"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        out[key] = {m: stats([r.get(m) for r in rs]) for m in
                    ["value", "p50_us", "p99_us", "p999_us", "cpu_us_per_op", "ttl_ms",
                     "rss_idle_kib", "rss_load_kib", "hwm_kib"]}
    return out


def cell_servers(cell):
    seen = []
    for _, servers in cell["cases"]:
        for s in servers:
            if s not in seen and s != LIMIT:
                seen.append(s)
    return seen


def write_report(ctx, cells, records, done_rounds):
    summ = summarise(records, cells)
    out = ctx["out"]
    has_limit = LIMIT in SERVERS
    L = []
    L.append(f"# qnbd benchmark {STAMP}\n")
    L.append(f"Rounds: {done_rounds} of {ROUNDS} (each figure: median (min–max) over the rounds). "
             f"Image {SIZE_MB} MiB; fio runtime {RUNTIME} s after a {RAMP} s ramp; sequential "
             f"1 MiB at QD {SEQ_QD} per connection; random 4 KiB on one connection.\n")
    L.append("| | version |\n|---|---|")
    for k, v in ctx["versions"].items():
        L.append(f"| {k} | {v} |")
    L.append("")
    if not ctx["qcow2dec"] and "nbdkit-file" in SERVERS and set(IMAGES) - {"raw"}:
        L.append("nbdkit has no qcow2dec filter here, so the qcow2 rows have no nbdkit-file column.\n")
    L.append("Ratios are ratios of the medians; > 1 means qnbd is faster (throughput) or uses "
             "more (CPU, latency, memory). \"% of limit\" is qnbd's throughput as a share of "
             f"the loopback limit ({LIMIT}: `nbdkit {' '.join(LIMIT_PLUGIN)}` on the same transport).\n")

    def lim(t, wname):
        return summ.get((t, "*", wname, LIMIT), {}).get("value")

    def get(t, image, wname, s, m):
        return summ.get((t, image, wname, s), {}).get(m)

    L.append("## Throughput (MiB/s for seq, IOPS for rand)\n")
    for cell in cells:
        t, image = cell["transport"], cell["image"]
        servers = cell_servers(cell)
        L.append(f"### {t}, {image}\n")
        head = ["workload"] + servers + ([f"limit ({LIMIT})"] if has_limit else [])
        ratios = []
        if "qnbd" in servers and "qemu-nbd" in servers:
            ratios.append("qnbd/qemu-nbd")
        if "qnbd" in servers and "nbdkit-file" in servers:
            ratios.append("qnbd/nbdkit-file")
        if "qnbd" in servers and has_limit:
            ratios.append("qnbd % of limit")
        L.append("| " + " | ".join(head + ratios) + " |")
        L.append("|" + "---|" * (len(head) + len(ratios)))
        for w, _ in cell["cases"]:
            n = w["name"]
            row = [f"{n} ({unit(w)})"] + [fmt_stat(get(t, image, n, s, "value")) for s in servers]
            if has_limit:
                row.append(fmt_stat(lim(t, n)))
            q = get(t, image, n, "qnbd", "value")
            if "qnbd/qemu-nbd" in ratios:
                row.append(ratio(q, get(t, image, n, "qemu-nbd", "value")))
            if "qnbd/nbdkit-file" in ratios:
                row.append(ratio(q, get(t, image, n, "nbdkit-file", "value")))
            if "qnbd % of limit" in ratios:
                lv = lim(t, n)
                row.append(f"{100 * q['median'] / lv['median']:.0f} %" if q and lv and lv["median"] else "–")
            L.append("| " + " | ".join(row) + " |")
        L.append("")

    L.append("## Latency of random 4 KiB requests (fio completion latency, µs: p50 / p99 / p99.9)\n")
    for cell in cells:
        t, image = cell["transport"], cell["image"]
        rand = [w for w, _ in cell["cases"] if w["kind"] == "rand"]
        if not rand:
            continue
        servers = cell_servers(cell) + ([LIMIT] if has_limit else [])
        L.append(f"### {t}, {image}\n")
        peers = [p for p in ["qemu-nbd", "nbdkit-file"] if "qnbd" in servers and p in servers]
        L.append("| workload | " + " | ".join(servers + [f"qnbd/{p} p99" for p in peers]) + " |")
        L.append("|" + "---|" * (len(servers) + len(peers) + 1))
        for w in rand:
            n = w["name"]
            row = [n]
            for s in servers:
                img = "*" if s == LIMIT else image
                g = [get(t, img, n, s, m) for m in ["p50_us", "p99_us", "p999_us"]]
                row.append(" / ".join(fmt_num(x["median"]) if x else "–" for x in g))
            for p in peers:
                row.append(ratio(get(t, image, n, "qnbd", "p99_us"), get(t, image, n, p, "p99_us")))
            L.append("| " + " | ".join(row) + " |")
        L.append("")

    L.append("## Server CPU per request (user+sys µs per request; seq requests are 1 MiB)\n")
    for cell in cells:
        t, image = cell["transport"], cell["image"]
        servers = cell_servers(cell) + ([LIMIT] if has_limit else [])
        L.append(f"### {t}, {image}\n")
        peers = [p for p in ["qemu-nbd", "nbdkit-file"] if "qnbd" in servers and p in servers]
        L.append("| workload | " + " | ".join(servers + [f"qnbd/{p}" for p in peers]) + " |")
        L.append("|" + "---|" * (len(servers) + len(peers) + 1))
        for w, _ in cell["cases"]:
            n = w["name"]
            row = [n]
            for s in servers:
                img = "*" if s == LIMIT else image
                row.append(fmt_stat(get(t, img, n, s, "cpu_us_per_op")))
            for p in peers:
                row.append(ratio(get(t, image, n, "qnbd", "cpu_us_per_op"), get(t, image, n, p, "cpu_us_per_op")))
            L.append("| " + " | ".join(row) + " |")
        L.append("")

    L.append("## Start-up and memory (over every start of the server in the cell)\n")
    L.append("Time to listening: spawn → first successful `nbdinfo` (ms). RSS idle: VmRSS after "
             "that first connection. RSS under load: highest VmRSS sampled during a workload "
             "(median over workloads and rounds, and the max). Peak: highest VmHWM.\n")
    L.append("| transport, image | server | time to listening ms | RSS idle MiB | RSS under load MiB (max) | peak VmHWM MiB |")
    L.append("|---|---|---|---|---|---|")
    mib = 1 / 1024
    for cell in cells:
        t, image = cell["transport"], cell["image"]
        ran_limit = any(LIMIT in ss for _, ss in cell["cases"])
        servers = cell_servers(cell) + ([LIMIT] if ran_limit else [])
        for s in servers:
            rs = [r for r in records if r["ok"] and r["transport"] == t and r["server"] == s
                  and (r["image"] == image or s == LIMIT)]
            if not rs:
                continue
            ttl = stats([r["ttl_ms"] for r in rs])
            idle = stats([r["rss_idle_kib"] for r in rs])
            load = stats([r["rss_load_kib"] for r in rs])
            hwm = stats([r["hwm_kib"] for r in rs])
            L.append(f"| {t}, {image} | {s} | {fmt_stat(ttl)} | {fmt_num(idle['median'] * mib) if idle else '–'} | "
                     f"{fmt_num(load['median'] * mib) if load else '–'} ({fmt_num(load['max'] * mib) if load else '–'}) | "
                     f"{fmt_num(hwm['max'] * mib) if hwm else '–'} |")
    L.append("")
    fails = [r for r in records if not r["ok"]]
    if fails:
        L.append(f"## Failures ({len(fails)})\n")
        for r in fails:
            first = (r.get("error") or "").strip().splitlines()
            L.append(f"- round {r['round']} {r['transport']} {r['image']} {r['workload']} {r['server']}: "
                     f"{first[0] if first else '?'}")
        L.append("")
    if CHART and (out / "chart.png").exists():
        L.append("![throughput chart](chart.png)\n")
    (out / "results.md").write_text("\n".join(L))
    (out / "summary.json").write_text(json.dumps(
        [dict(transport=k[0], image=k[1], workload=k[2], server=k[3], **v) for k, v in summ.items()],
        indent=1))
    return summ


def write_chart(ctx, cells, summ):
    """One panel per (transport, image): each workload's throughput per server as a share of
    the loopback limit (or of qemu-nbd, or of the first server, when the limit was not run),
    with min-max error bars."""
    out = ctx["out"]
    data = out / "chart"
    data.mkdir(exist_ok=True)
    panels = []
    for i, cell in enumerate(cells):
        t, image = cell["transport"], cell["image"]
        servers = cell_servers(cell)
        with_limit = LIMIT in SERVERS
        cols = servers + ([LIMIT] if with_limit else [])
        ref_name = LIMIT if with_limit else ("qemu-nbd" if "qemu-nbd" in servers else servers[0])
        rows = []
        for w, _ in cell["cases"]:
            n = w["name"]
            ref = summ.get((t, "*" if ref_name == LIMIT else image, n, ref_name), {}).get("value")
            if not ref or not ref["median"]:
                continue
            vals = []
            for s in cols:
                v = summ.get((t, "*" if s == LIMIT else image, n, s), {}).get("value")
                if v:
                    k = 100 / ref["median"]
                    vals += [v["median"] * k, v["min"] * k, v["max"] * k]
                else:
                    vals += ["NaN"] * 3
            rows.append(n + " " + " ".join(f"{x:.2f}" if x != "NaN" else x for x in vals))
        if not rows:
            continue
        f = data / f"panel{i}.dat"
        f.write_text("# workload " + " ".join(f"{s} {s}-min {s}-max" for s in cols) + "\n" + "\n".join(rows) + "\n")
        panels.append((f, f"{t}, {image}", cols, ref_name))
    if not panels:
        return
    ncol = 2 if len(panels) > 1 else 1
    nrow = (len(panels) + ncol - 1) // ncol
    g = [f"set terminal pngcairo size {800 * ncol},{420 * nrow} font ',9'",
         f"set output '{out / 'chart.png'}'",
         f"set multiplot layout {nrow},{ncol} title 'qnbd benchmark {STAMP}: throughput, median and min-max of {ctx['rounds_done']} rounds'",
         "set style data histogram", "set style histogram errorbars gap 2 lw 1",
         "set style fill solid 0.85 border -1", "set boxwidth 0.9", "set grid ytics",
         "set xtics rotate by -25 nomirror", "set yrange [0:*]", "set key top right font ',8'",
         "set bars 0.5"]
    for f, title, cols, ref_name in panels:
        ylabel = "% of loopback limit" if ref_name == LIMIT else f"% of {ref_name}"
        g.append(f"set title '{title}'")
        g.append(f"set ylabel '{ylabel}'")
        parts = []
        for j, s in enumerate(cols):
            c = 2 + 3 * j
            src = f"'{f}'" if j == 0 else "''"
            xt = ":xtic(1)" if j == 0 else ""
            parts.append(f"{src} using {c}:{c + 1}:{c + 2}{xt} title '{s}'")
        g.append("plot " + ", ".join(parts))
    g.append("unset multiplot")
    script = data / "chart.gp"
    script.write_text("\n".join(g) + "\n")
    r = run_quiet(["gnuplot", str(script)])
    if r.returncode != 0:
        log(f"gnuplot failed:\n{r.stderr}")


# ---------------------------------------------------------------------------------------------


def main():
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    if not DRY_RUN:
        need_tools()
    ctx = dict(qcow2dec=("nbdkit-file" in SERVERS and shutil.which("nbdkit") is not None
                         and nbdkit_has_filter("qcow2dec")))
    cells = make_plan(ctx)
    if not cells:
        die("nothing to run with these SERVERS/TRANSPORTS/IMAGES/WORKLOADS", 2)
    n_cases = sum(len(s) for c in cells for _, s in c["cases"])
    est = n_cases * ROUNDS * (RUNTIME + RAMP + 1.5)
    log(f"{n_cases} runs per round × {ROUNDS} rounds ≈ {est / 60:.0f} min (+ image preparation)")
    if DRY_RUN:
        for c in cells:
            for w, s in c["cases"]:
                print(f"{c['transport']:9} {c['image']:17} {w['name']:14} {' '.join(s)}")
        return 0
    if any(s in QNBD_VARIANTS for s in SERVERS):
        ctx["qnbd"] = qnbd_binary()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "raw").mkdir(exist_ok=True)
    ctx["out"] = OUT
    work = Path(tempfile.mkdtemp(prefix="qnbd-bench-work.", dir=WORKDIR_PARENT))
    ctx["work"] = work
    try:
        ctx["versions"] = {
            "qnbd": version([str(ctx["qnbd"]), "--version"]) if "qnbd" in ctx else "–",
            "qnbd git": version(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]),
            "qemu-nbd": version(["qemu-nbd", "--version"]) if shutil.which("qemu-nbd") else "–",
            "nbdkit": version(["nbdkit", "--version"]) if shutil.which("nbdkit") else "–",
            "fio": version(["fio", "--version"]),
            "kernel": version(["uname", "-r"]),
            "cpu": next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                         if l.startswith("model name")), "?") + f" × {os.cpu_count()}",
        }
        transports = {c["transport"] for c in cells}
        if transports & {"tls-x509", "tls-psk"}:
            make_pki(work / "pki")
        if "tls-psk" in transports:
            ctx["shim"] = build_shim(work)
        images = Images(work)
        images.prepare()
        ctx["images"] = images
        (OUT / "settings.json").write_text(json.dumps(dict(
            rounds=ROUNDS, size_mb=SIZE_MB, runtime=RUNTIME, ramp=RAMP, seq_qd=SEQ_QD,
            servers=SERVERS, transports=TRANSPORTS, images=IMAGES, qcow2_transports=QCOW2_TRANSPORTS,
            workloads=[w["name"] for w in workload_list()], versions=ctx["versions"],
            nbdkit_qcow2dec=ctx["qcow2dec"]), indent=1))
        log(f"results in {OUT}")
        records = []
        for rnd in range(1, ROUNDS + 1):
            log(f"round {rnd} of {ROUNDS}")
            for cell in cells:
                for w, servers in cell["cases"]:
                    for s in servers:
                        records.append(run_case(ctx, rnd, cell, w, s))
            ctx["rounds_done"] = rnd
            summ = write_report(ctx, cells, records, rnd)
            if CHART:
                write_chart(ctx, cells, summ)
                write_report(ctx, cells, records, rnd)  # now with the chart link
        log(f"done: {OUT / 'results.md'}" + (f" and {OUT / 'chart.png'}" if CHART else ""))
        return 1 if any(not r["ok"] for r in records) else 0
    finally:
        kill_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        kill_all()
