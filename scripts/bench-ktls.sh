#!/usr/bin/env bash
# TLS benchmark in the TCG guest (not a test), where the kernel has TLS (this host's may
# not): qnbd with kernel TLS (QNBD_KTLS=on), qnbd on its own record layer (the default) and nbdkit's file
# plugin, x509 over TCP loopback, fio's nbd engine as the client, rounds interleaved. The
# guest runs trixie-backports' newest kernel (TLS 1.3 in the kernel needs 6.14) on an
# emulated CPU with AES-NI. TCG is slow: compare ratios only.
#   scripts/bench-ktls.sh [RUNTIME_SECONDS] [ROUNDS]
# QNBD_BIN=path uses that binary instead of building target/release/qnbd.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${QNBD_BIN:-}" ]; then
    cargo build --release -q
    QNBD_BIN=$PWD/target/release/qnbd
fi
share=$(mktemp -d /var/tmp/qnbd-bench-tls.XXXXXX)
[ -n "${KEEP:-}" ] || trap 'rm -rf "$share"' EXIT
echo "${1:-5}" >"$share/bench-runtime"
echo "${2:-3}" >"$share/bench-rounds"

# A CA, a server certificate for 127.0.0.1 and a client certificate, as qemu's dir= wants.
pki=$share/pki
mkdir -p "$pki/ca" "$pki/server" "$pki/client"
(
    cd "$pki/ca"
    certtool --generate-privkey --outfile ca-key.pem 2>/dev/null
    printf 'cn = bench CA\nca\ncert_signing_key\n' >ca.info
    certtool --generate-self-signed --load-privkey ca-key.pem --template ca.info \
        --outfile ca-cert.pem 2>/dev/null
)
for role in server client; do
    d=$pki/$role
    cp "$pki/ca/ca-cert.pem" "$d/"
    certtool --generate-privkey --outfile "$d/$role-key.pem" 2>/dev/null
    if [ $role = server ]; then
        printf 'cn = localhost\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\n' >"$d/info"
    else
        printf 'cn = bench client\ntls_www_client\nencryption_key\nsigning_key\n' >"$d/info"
    fi
    certtool --generate-certificate --load-ca-privkey "$pki/ca/ca-key.pem" \
        --load-ca-certificate "$pki/ca/ca-cert.pem" --load-privkey "$d/$role-key.pem" \
        --template "$d/info" --outfile "$d/$role-cert.pem" 2>/dev/null
done

QNBD_BIN=$QNBD_BIN QNBD_VM_KERNEL=backports QNBD_VM_CPU=${QNBD_VM_CPU:-max} QNBD_VM_MEM=2048 QNBD_VM_TIMEOUT=3600 \
    bash scripts/vm/run.sh scripts/vm/guest/tls-bench.sh "$share" >"$share/out" 2>&1 || {
    cat "$share/out"
    exit 1
}
grep -a '^tls-bench:' "$share/out"
# Medians per server and job, then qnbd's ratios against nbdkit.
grep -ao 'RESULT .*' "$share/out" | tr -d '\r' | sort -k2,2 -k3,3 | awk '
    function median(list,   n, a, i, j, t) {
        n = split(list, a, " ")
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    { k = $2 " " $3; v[k] = v[k] " " $4; c[k] = c[k] " " $5; jobs[$3] = 1; srv[$2] = 1 }
    END {
        printf "%-14s %-12s %10s %10s\n", "job", "server", "MiB/s|IOPS", "cpu us/unit"
        for (j in jobs) for (s in srv) {
            k = s " " j; if (!(k in v)) continue
            mv[k] = median(v[k]); mc[k] = median(c[k])
            printf "%-14s %-12s %10.1f %10.1f\n", j, s, mv[k], mc[k]
        }
        printf "\nratios (speed, then CPU per unit; >1 speed and <1 CPU favour the first)\n"
        for (j in jobs) {
            b = "nbdkit " j; u = "qnbd-user " j; q = "qnbd-ktls " j
            if (mv[b] > 0 && mc[b] > 0) printf "%-14s ktls/nbdkit %5.2fx %5.2fx   user/nbdkit %5.2fx %5.2fx   ktls/user %5.2fx %5.2fx\n", j,
                mv[q] / mv[b], mc[q] / mc[b], mv[u] / mv[b], mc[u] / mc[b], (mv[u] > 0 ? mv[q] / mv[u] : 0), (mc[u] > 0 ? mc[q] / mc[u] : 0)
        }
    }'
