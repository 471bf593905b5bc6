# Shared by vm/build.sh (our agent as init) and vm/build-reference.sh (the
# reference agent as init): Debian packages, Debian's cloud kernel, virtio
# modules, busybox and a reproducible initramfs. Sourced, not run.

vm_target=x86_64-unknown-linux-musl
# The modules of the virtio-serial transport, in load order.
vm_serial_modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_mmio virtio_console)

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# vm_install_packages PKG...: installs the Debian packages that are missing.
vm_install_packages() {
  local missing=() p
  for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    sudo_if_needed apt-get update -q
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
}

# vm_fetch_kernel WORK OUT: downloads and unpacks Debian's cloud kernel
# package (not installed) into WORK/kernel; writes OUT/vmlinuz and
# OUT/kernel-release. Sets vm_kernel_pkg, vm_release and vm_kernel_dir.
vm_fetch_kernel() {
  local work=$1 out=$2
  mkdir -p "$work/kernel" "$work/deb"
  vm_kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
  if [ -z "$vm_kernel_pkg" ]; then
    sudo_if_needed apt-get update -q
    vm_kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
  fi
  echo "kernel package: $vm_kernel_pkg"
  (cd "$work/deb" && apt-get download -q "$vm_kernel_pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
  dpkg -x "$work"/deb/*.deb "$work/kernel"
  vm_release=$(ls "$work/kernel/lib/modules")
  vm_kernel_dir="$work/kernel"
  cp "$work/kernel/boot/vmlinuz-$vm_release" "$out/vmlinuz"
  echo "$vm_release" > "$out/kernel-release"
}

# vm_add_modules ROOT LIST MODULE...: copies each module that the kernel
# has as a module to ROOT/lib/modules and appends its guest path to LIST (in
# the order given); one built into the kernel is skipped. Needs vm_fetch_kernel.
vm_add_modules() {
  local root=$1 list=$2 m ko
  shift 2
  mkdir -p "$root/lib/modules"
  for m in "$@"; do
    ko=$(find "$vm_kernel_dir/lib/modules/$vm_release" -name "$m.ko" -print -quit)
    if [ -z "$ko" ]; then
      # Built into this kernel: nothing to load.
      grep -q "^CONFIG_$(echo "$m" | tr a-z A-Z)=y" "$vm_kernel_dir/boot/config-$vm_release" && continue
      echo "module $m is neither in $vm_kernel_pkg nor built in" >&2
      return 1
    fi
    cp "$ko" "$root/lib/modules/$m.ko"
    echo "/lib/modules/$m.ko" >> "$list"
  done
}

# vm_add_busybox ROOT: busybox-static as ROOT/bin/busybox with a link per applet.
vm_add_busybox() {
  local root=$1 applet
  mkdir -p "$root/bin"
  cp /bin/busybox "$root/bin/busybox"
  for applet in $("$root/bin/busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
  done
}

# vm_pack ROOT OUT: ROOT as a gzip'd newc cpio. Same inputs, same bytes:
# fixed times, sorted names, no gzip timestamp.
vm_pack() {
  local root=$1 out=$2
  find "$root" -exec touch -h -d @0 {} +
  (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -n -6 > "$out"
}
