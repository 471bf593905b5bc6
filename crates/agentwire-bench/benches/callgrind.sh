#!/usr/bin/env bash
# Instructions per `core.ready` encode and decode, agentwire and the baseline,
# counted by callgrind (exact and unaffected by other load on the machine,
# unlike the criterion times). Usage: benches/callgrind.sh [N]
set -euo pipefail
cd "$(dirname "$0")/../../.."
n=${1:-20000}
cargo build --release -p agentwire-bench --example profile_ready >&2
exe=target/release/examples/profile_ready
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
count() { # mode function
  valgrind --tool=callgrind --callgrind-out-file="$out/$1.cg" --toggle-collect="profile_ready::$2" \
    "$exe" "$1" "$n" >/dev/null 2>&1
  callgrind_annotate "$out/$1.cg" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }'
}
printf '%-8s %12s %12s %8s\n' operation agentwire baseline ratio
for op in decode encode; do
  ours=$(count "$op" "${op}_ours")
  base=$(count "baseline-$op" "${op}_baseline")
  awk -v op="$op" -v o="$ours" -v b="$base" -v n="$n" \
    'BEGIN { printf "%-8s %12.0f %12.0f %7.2fx\n", op, o / n, b / n, b / o }'
done
echo "(instructions per operation, mean of $n; ratio = baseline / agentwire)"
