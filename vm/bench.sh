#!/usr/bin/env bash
# Measures the VM transport at the virtio-serial port's limit: boots the image
# from vm/build.sh once with /bench-init as the initramfs's init, times a raw
# copy over the agent's port in both directions at several guest read and
# write sizes (the agent binary's hidden `vm-bench --guest`, before the agent
# starts), then the agent's transfers over the same port through the host
# client (file write and read in /tmp, exec stdin into dd and stdout from dd,
# exec cat with its output checked byte for byte against its input, exec
# stdout of busybox cat of the /tmp file: sendfile, no copy), and the
# guest's tmpfs alone (dd in the guest), and prints MB/s, the guest's CPU ticks
# and page faults of each agent transfer, and each one's ratio to the best raw
# copy of its direction in the same boot (a file transfer also to tmpfs alone,
# when that is lower). A lost or changed byte is an error.
#
#   vm/bench.sh [--build] [agentwire vm-bench options: --mib N --rounds N
#               --machine q35|microvm --exec-window-kib N]
#
# --build runs vm/build.sh first. The image is $AGENTWIRE_VM_DIR (default
# target/vm); the agentwire binary the one vm/build.sh built (static musl,
# under ${CARGO_TARGET_DIR:-target}). AGENTWIRE_VM_SMP sets the guest's vCPUs
# (default 1). Software emulation on a shared machine varies from run to run:
# use --rounds 2 or more and compare ratios, not absolute rates.
#
# More knobs, as environment variables: AGENTWIRE_VM_APPEND adds words to the
# guest kernel's command line; AGENTWIRE_VM_BENCH_ONLY=0,4 runs only those agent transfers (0 fs
# write, 1 fs read, 2 exec stdin, 3 exec stdout, 4 exec cat, 5 exec stdout of
# cat of the file 0 wrote) and no raw copy;
# AGENTWIRE_VM_BENCH_LEGACY=1 sends no exec policy, so executions are legacy
# ones, whose stdin the agent drops beyond its 1 MiB queue (exec cat fails).
set -euo pipefail
cd "$(dirname "$0")/.."
. vm/lib.sh
if [ "${1:-}" = "--build" ]; then
  shift
  vm/build.sh
fi
image=${AGENTWIRE_VM_DIR:-target/vm}
bin="${CARGO_TARGET_DIR:-target}/$vm_target/release/agentwire"
[ -x "$bin" ] || { echo "no $bin: run vm/build.sh (or vm/bench.sh --build) first" >&2; exit 2; }
exec "$bin" vm-bench --image "$image" "$@"
