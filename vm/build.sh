#!/usr/bin/env bash
# Builds the VM image that `agentwire vm` boots: Debian's cloud kernel and an
# initramfs whose /init is the agent (a static musl build), with busybox for a
# shell and utilities and the virtio modules the transport needs.
#
# Installs what it needs from Debian's packages (qemu-system-x86, cpio,
# busybox-static, musl-tools for mimalloc's C code); the kernel package is
# downloaded and unpacked, not installed.
# Writes $AGENTWIRE_VM_DIR (default target/vm): vmlinuz, initramfs.cpio.gz,
# kernel-release. Nothing prebuilt is committed. vm/lib.sh holds the steps
# shared with vm/build-reference.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
. vm/lib.sh
out=${AGENTWIRE_VM_DIR:-target/vm}
work="$out/work"
target=$vm_target

vm_install_packages qemu-system-x86 cpio busybox-static musl-tools

rm -rf "$work"
mkdir -p "$work"
vm_fetch_kernel "$work" "$out"

rustup target list --installed | grep -qx "$target" || rustup target add "$target"
# With mimalloc as the allocator: musl's is slow (see the `global_allocator`
# in crates/agentwire-cli/src/main.rs); musl-gcc compiles mimalloc's C code.
cargo build --release --locked --target "$target" -p agentwire-cli --bin agentwire --features mimalloc
agent="${CARGO_TARGET_DIR:-target}/$target/release/agentwire"

root="$work/initramfs"
mkdir -p "$root"/{bin,etc/agentwire,lib/modules,proc,sys,dev,tmp,run,root}
cp "$agent" "$root/init"
vm_add_busybox "$root"
: > "$root/etc/agentwire/modules"
vm_add_modules "$root" "$root/etc/agentwire/modules" "${vm_serial_modules[@]}"
echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
# For `agentwire vm-bench` (kernel command line rdinit=/bench-init): a raw
# copy over the agent's port (the agent binary's hidden `vm-bench --guest`),
# then the agent as init on the same port. Unused by a normal boot.
cat > "$root/bench-init" <<'SCRIPT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r m; do insmod "$m" 2>/dev/null; done < /etc/agentwire/modules
/init vm-bench --guest agent || echo "bench-init: the raw copy failed" >&2
umount /dev /sys /proc
exec /init
SCRIPT
chmod 755 "$root/bench-init"
echo "root:x:0:" > "$root/etc/group"
vm_pack "$root" "$out/initramfs.cpio.gz"
echo "built $out: kernel $vm_release ($(stat -c %s "$out/vmlinuz") bytes), initramfs $(stat -c %s "$out/initramfs.cpio.gz") bytes, agent $(stat -c %s "$agent") bytes"
