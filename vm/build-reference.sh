#!/usr/bin/env bash
# Builds a VM image whose init is the REFERENCE guest agent, microsandbox-agentd
# VERSION from crates.io (0.6.14 = generation 7, 0.7.13 = generation 10), for
# `agentwire vm --image target/vm-ref-VERSION` and the interop tests in
# crates/agentwire-cli/tests/vm.rs. See docs/INTEROP.md.
#
#   vm/build-reference.sh 0.6.14 [0.7.13 ...]
#
# The agent is run ONLY as PID 1 of a QEMU guest: it mounts, sets the clock and
# powers off. This script builds it (static musl, `cargo install --locked` with
# the crate's own lock file) and never runs it.
#
# Per version it writes target/vm-ref-VERSION: vmlinuz, initramfs.cpio.gz,
# kernel-release and the marker file `reference` that tells `agentwire vm` to
# set the machine up the way the reference agent needs (the virtiofs share
# it mounts at init). The agent build is cached in $AGENTWIRE_REF_CACHE
# (default target/reference): VERSION/bin/agentd, and build/ as cargo's target
# directory; cargo install does nothing when that version is already there.
# A cold build takes minutes on 2 cores (docs/INTEROP.md has the figures).
#
# The image: Debian's cloud kernel (vm/lib.sh, as vm/build.sh), busybox, and
# /init a busybox shell script that loads the virtio-serial and virtiofs
# modules (this kernel has them as modules; the agent loads none), waits for
# the `agent` port to appear in sysfs (the agent looks once and exits when it
# is missing), and execs the agent, which so runs as PID 1.
set -euo pipefail
cd "$(dirname "$0")/.."
. vm/lib.sh

[ $# -ge 1 ] || { echo "usage: vm/build-reference.sh VERSION..." >&2; exit 2; }

vm_install_packages qemu-system-x86 cpio busybox-static
# virtiofsd: Debian 12's QEMU ships it as /usr/lib/qemu/virtiofsd; later
# releases have it as its own package.
if [ ! -x /usr/lib/qemu/virtiofsd ] && [ ! -x /usr/libexec/virtiofsd ] && ! command -v virtiofsd >/dev/null; then
  vm_install_packages virtiofsd
fi
rustup target list --installed | grep -qx "$vm_target" || rustup target add "$vm_target"

modules=("${vm_serial_modules[@]}" fuse virtiofs)

# One kernel for every version.
kwork=target/vm-ref-kernel
rm -rf "$kwork"
mkdir -p "$kwork/out"
vm_fetch_kernel "$kwork" "$kwork/out"

for version in "$@"; do
  out="target/vm-ref-$version"
  work="$out/work"
  cache=${AGENTWIRE_REF_CACHE:-target/reference}
  prefix="$cache/$version"
  agentd="$prefix/bin/agentd"
  t0=$(date +%s)
  echo "microsandbox-agentd $version: cargo install into $prefix (nothing to do when cached)"
  # Static (musl, static-pie); the crate's Cargo.lock pins its dependencies.
  cargo install --quiet --locked --root "$prefix" --target "$vm_target" \
    --target-dir "$cache/build" microsandbox-agentd --version "=$version"
  t1=$(date +%s)
  echo "microsandbox-agentd $version: $agentd ($(stat -c %s "$agentd") bytes), $((t1 - t0)) s"

  rm -rf "$work"
  mkdir -p "$work"
  cp "$kwork/out/vmlinuz" "$kwork/out/kernel-release" "$out/"
  root="$work/initramfs"
  mkdir -p "$root"/{bin,sbin,etc,lib/modules,proc,sys,dev,tmp,run,root,var/tmp}
  cp "$agentd" "$root/sbin/agentd"
  vm_add_busybox "$root"
  : > "$work/modules"
  vm_add_modules "$root" "$work/modules" "${modules[@]}"
  {
    echo '#!/bin/busybox sh'
    echo '# Loads the modules the reference agent needs, then becomes it (PID 1).'
    echo 'export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
    sed 's/^/insmod /' "$work/modules"
    echo 'mount -t sysfs sysfs /sys'
    echo 'i=0'
    echo 'until grep -qx agent /sys/class/virtio-ports/*/name 2>/dev/null; do'
    echo '  i=$((i + 1)); [ $i -gt 1000 ] && { echo "init: no virtio port named agent" >&2; break; }'
    echo '  sleep 0.01'
    echo 'done'
    echo 'umount /sys'
    echo 'exec /sbin/agentd'
  } > "$root/init"
  chmod 755 "$root/init"
  echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
  echo "root:x:0:" > "$root/etc/group"
  vm_pack "$root" "$out/initramfs.cpio.gz"
  # What `agentwire vm` reads to set the machine up for this agent.
  printf 'agent=microsandbox-agentd\nversion=%s\nruntime_fs_tag=msb_runtime\n' "$version" > "$out/reference"
  echo "built $out: kernel $vm_release, initramfs $(stat -c %s "$out/initramfs.cpio.gz") bytes, $(($(date +%s) - t1)) s for the image"
done
