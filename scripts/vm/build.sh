#!/usr/bin/env bash
# Build (or reuse) the test guest for kernel tests: Debian's 6.12 kernel, a busybox initramfs
# with the nbd / ublk_drv / 9p / ext4 modules and the tools the guest tests use, and a
# qemu-system-x86_64 unpacked from Debian's package (installing it would replace the
# preinstalled qemu-utils 10.0.2). Everything lives in $QNBD_VM_CACHE. QNBD_VM_KERNEL=backports
# takes the newest kernel of trixie-backports instead (its cache: $QNBD_VM_CACHE-backports).
# Prints the cache directory. Exit 77 when it cannot be built here.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
CACHE=${QNBD_VM_CACHE:-$HOME/.cache/qnbd-vm}
[ "${QNBD_VM_KERNEL:-}" = backports ] && CACHE=$CACHE-backports
mkdir -p "$CACHE/debs"
log() { echo "vm/build: $*" >&2; }

need=""
for t in depmod:kmod modprobe:kmod cpio:cpio xz:xz-utils mkfs.ext4:e2fsprogs sfdisk:fdisk; do
    command -v "${t%%:*}" >/dev/null || need="$need ${t#*:}"
done
if [ -n "$need" ]; then
    log "installing$need"
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-remove $need >/dev/null ||
        { log "cannot install$need"; exit 77; }
fi

if [ ! -f "$CACHE/kernel.ok" ]; then
    log "downloading the kernel, qemu-system and busybox packages"
    cd "$CACHE/debs"
    kpkg=$(apt-cache depends linux-image-6.12-amd64 2>/dev/null | awk '/Depends: linux-image-6.12/{print $2; exit}')
    if [ -z "$kpkg" ]; then
        apt-get update -qq || true
        kpkg=$(apt-cache depends linux-image-6.12-amd64 2>/dev/null | awk '/Depends: linux-image-6.12/{print $2; exit}')
    fi
    [ -n "$kpkg" ] || { log "no linux-image-6.12 package can be found"; exit 77; }
    if [ "${QNBD_VM_KERNEL:-}" = backports ]; then
        # The newest kernel of Debian's trixie-backports instead (for features 6.12 lacks),
        # fetched by hand: the host's apt does not know that suite.
        mirror=http://deb.debian.org/debian
        curl -fsS "$mirror/dists/trixie-backports/main/binary-amd64/Packages.xz" | xz -d >Packages ||
            { log "cannot read trixie-backports' package list"; exit 77; }
        # The newest version that has its modules (in their own package since 6.19, else
        # in the image's).
        newest() { awk -v re="^linux-$1-[0-9]+\\.[0-9.]+\\+[a-z0-9]+-amd64\$" '$1 == "Package:" && $2 ~ re { print $2 }' Packages |
            sed "s/^linux-$1-//" | sort -V | tail -1; }
        kv=$(newest modules)
        [ -n "$kv" ] || kv=$(newest image)
        [ -n "$kv" ] || { log "no kernel in trixie-backports"; exit 77; }
        kname=linux-image-$kv
        # Newer kernels come in pieces: the image (a metapackage), the binary, the modules.
        for p in "$kname" "${kname/linux-image/linux-binary}" "${kname/linux-image/linux-modules}"; do
            file=$(awk -v p="$p" '$1 == "Package:" { m = ($2 == p) } m && $1 == "Filename:" { print $2 }' Packages | tail -1)
            [ -n "$file" ] || continue
            log "from trixie-backports: $(basename "$file")"
            curl -fsS -o "$(basename "$file")" "$mirror/$file" || { log "cannot download $file"; exit 77; }
        done
        rm -f Packages
        kpkg=
    fi
    # shellcheck disable=SC2086
    apt-get download $kpkg qemu-system-x86 qemu-system-common qemu-system-data busybox-static \
        seabios ipxe-qemu nbd-client >/dev/null 2>&1 || { log "apt-get download failed"; exit 77; }
    rm -rf "$CACHE/root"
    mkdir -p "$CACHE/root"
    for d in "$CACHE"/debs/*.deb; do dpkg -x "$d" "$CACHE/root"; done
    # Newer Debian kernels install their modules under /usr (merged /usr).
    if [ -d "$CACHE/root/usr/lib/modules" ] && [ ! -d "$CACHE/root/lib/modules" ]; then
        mkdir -p "$CACHE/root/lib"
        mv "$CACHE/root/usr/lib/modules" "$CACHE/root/lib/modules"
    fi
    kver=$(ls "$CACHE/root/lib/modules")
    depmod -b "$CACHE/root" "$kver"
    echo "$kver" >"$CACHE/kernel.ok"
fi
kver=$(cat "$CACHE/kernel.ok")
root=$CACHE/root
# Newer Debian kernels keep the image beside their modules.
if [ ! -f "$root/boot/vmlinuz-$kver" ] && [ -f "$root/lib/modules/$kver/vmlinuz" ]; then
    mkdir -p "$root/boot"
    cp "$root/lib/modules/$kver/vmlinuz" "$root/boot/vmlinuz-$kver"
fi
qemu=$root/usr/bin/qemu-system-x86_64

# The emulator's shared libraries, never letting apt remove anything (qemu-utils stays).
missing=$(ldd "$qemu" | awk '/not found/{print $1}')
if [ -n "$missing" ]; then
    log "installing libraries for qemu-system: $missing"
    pkgs=$(dpkg-deb -f "$CACHE"/debs/qemu-system-x86_*.deb Depends | tr ',' '\n' | sed 's/(.*//; s/|.*//; s/ //g' | grep '^lib')
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-remove $pkgs >/dev/null
    if ldd "$qemu" | grep -q "not found"; then
        log "qemu-system-x86_64 still misses: $(ldd "$qemu" | awk '/not found/{print $1}' | tr '\n' ' ')"
        exit 77
    fi
fi

# The initramfs: rebuilt when this script or the guest init changes.
key=$(cat "$here/build.sh" "$here/init" | sha256sum | cut -c1-16)
initrd=$CACHE/initrd-$key.cpio.gz
if [ ! -f "$initrd" ]; then
    log "building the initramfs"
    ir=$CACHE/initramfs
    rm -rf "$ir"
    mkdir -p "$ir"/{bin,sbin,dev,proc,sys,tmp,mnt,share,lib/modules,usr/bin,etc}
    cp "$root/bin/busybox" "$ir/bin/busybox"
    for a in $("$ir/bin/busybox" --list); do
        [ -e "$ir/bin/$a" ] || ln -s busybox "$ir/bin/$a"
    done
    # Modules in dependency order, decompressed.
    want="nbd ublk_drv loop 9p 9pnet_virtio ext4 virtio_pci virtio_ring virtio tls crypto-gcm crypto-ghash chacha20poly1305 crypto-chacha20 crypto-poly1305"
    mods=$(for m in $want; do modprobe -d "$root" -S "$kver" --show-depends "$m" 2>/dev/null || true; done |
        awk '$1=="insmod"{print $2}' | awk '!seen[$0]++')
    : >"$ir/lib/modules/order"
    for m in $mods; do
        b=$(basename "$m" .xz)
        xz -dc "$m" >"$ir/lib/modules/$b" 2>/dev/null || cp "$m" "$ir/lib/modules/$b"
        echo "$b" >>"$ir/lib/modules/order"
    done
    # Host tools and their libraries.
    tools="mkfs.ext4 e2fsck blockdev sfdisk qemu-img qemu-io qemu-nbd sha256sum cmp fio dd nbdkit"
    for t in $tools; do
        p=$(command -v "$t" || true)
        [ -n "$p" ] || { log "note: $t is not on this host; the guest goes without it"; continue; }
        rm -f "$ir/usr/bin/$t"
        cp "$p" "$ir/usr/bin/$t"
        for l in $(ldd "$p" | awk '/=>/{print $3} /^\t\/lib/{print $1}'); do
            [ -f "$l" ] || continue
            mkdir -p "$ir$(dirname "$l")"
            cp -L "$l" "$ir$l"
        done
    done
    # nbdkit's file plugin, where nbdkit looks for it (the guest's benchmarks compare).
    plug=$(nbdkit --dump-config 2>/dev/null | sed -n 's/^plugindir=//p')
    if [ -n "$plug" ] && [ -f "$plug/nbdkit-file-plugin.so" ]; then
        mkdir -p "$ir$plug"
        cp "$plug/nbdkit-file-plugin.so" "$ir$plug/"
        for l in $(ldd "$plug/nbdkit-file-plugin.so" | awk '/=>/{print $3}'); do
            mkdir -p "$ir$(dirname "$l")"
            cp -L "$l" "$ir$l"
        done
    fi
    cp "$root/usr/sbin/nbd-client" "$ir/usr/bin/" 2>/dev/null || true
    for l in $(ldd "$ir/usr/bin/nbd-client" 2>/dev/null | awk '/=>/{print $3}'); do
        mkdir -p "$ir$(dirname "$l")"
        cp -L "$l" "$ir$l"
    done
    for l in /lib/x86_64-linux-gnu/libgcc_s.so.1 /lib64/ld-linux-x86-64.so.2; do
        mkdir -p "$ir$(dirname "$l")"
        cp -L "$l" "$ir$l"
    done
    cp "$here/init" "$ir/init"
    chmod +x "$ir/init"
    (cd "$ir" && find . | cpio -o -H newc 2>/dev/null | gzip -1) >"$initrd.tmp"
    mv "$initrd.tmp" "$initrd"
fi
ln -sf "$initrd" "$CACHE/initrd.cpio.gz"
echo "$CACHE"
