#!/usr/bin/env bash
# Builds the VM image that `agentwire vm` boots: Debian's cloud kernel and an
# initramfs whose /init is the agent (a static musl build), with busybox for a
# shell and utilities and the virtio modules the transport needs.
#
# Installs what it needs from Debian's packages (qemu-system-x86, cpio,
# busybox-static); the kernel package is downloaded and unpacked, not installed.
# Writes $AGENTWIRE_VM_DIR (default target/vm): vmlinuz, initramfs.cpio.gz,
# kernel-release. Nothing prebuilt is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${AGENTWIRE_VM_DIR:-target/vm}
work="$out/work"
target=x86_64-unknown-linux-musl
# The modules of the virtio-serial transport, in load order.
modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_mmio virtio_console)

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for p in qemu-system-x86 cpio busybox-static; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  sudo_if_needed apt-get update -q
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

rm -rf "$work"
mkdir -p "$work/kernel" "$work/deb"
kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
if [ -z "$kernel_pkg" ]; then
  sudo_if_needed apt-get update -q
  kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
fi
echo "kernel package: $kernel_pkg"
(cd "$work/deb" && apt-get download -q "$kernel_pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
dpkg -x "$work"/deb/*.deb "$work/kernel"
release=$(ls "$work/kernel/lib/modules")
cp "$work/kernel/boot/vmlinuz-$release" "$out/vmlinuz"
echo "$release" > "$out/kernel-release"

rustup target list --installed | grep -qx "$target" || rustup target add "$target"
cargo build --release --locked --target "$target" -p agentwire-cli --bin agentwire
agent="target/$target/release/agentwire"

root="$work/initramfs"
mkdir -p "$root"/{bin,etc/agentwire,lib/modules,proc,sys,dev,tmp,run,root}
cp "$agent" "$root/init"
cp /bin/busybox "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
: > "$root/etc/agentwire/modules"
for m in "${modules[@]}"; do
  ko=$(find "$work/kernel/lib/modules/$release" -name "$m.ko" -print -quit)
  if [ -z "$ko" ]; then
    # Built into this kernel: nothing to load.
    grep -q "^CONFIG_$(echo "$m" | tr a-z A-Z)=y" "$work/kernel/boot/config-$release" && continue
    echo "module $m is neither in $kernel_pkg nor built in" >&2
    exit 1
  fi
  cp "$ko" "$root/lib/modules/$m.ko"
  echo "/lib/modules/$m.ko" >> "$root/etc/agentwire/modules"
done
echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
echo "root:x:0:" > "$root/etc/group"
# Same inputs, same bytes: fixed times, sorted names, no gzip timestamp.
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -n -6 > "$out/initramfs.cpio.gz"
echo "built $out: kernel $release ($(stat -c %s "$out/vmlinuz") bytes), initramfs $(stat -c %s "$out/initramfs.cpio.gz") bytes, agent $(stat -c %s "$agent") bytes"
