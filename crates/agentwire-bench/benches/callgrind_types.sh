#!/usr/bin/env bash
# Instructions per encode and per decode of each of the 32 generation-7 message
# types, agentwire against the deployed reference microsandbox-protocol 0.6.14
# (generation 7) and 0.7.13 (generation 10), counted by callgrind
# (examples/profile_types.rs). Counts are exact and unaffected by other load on
# the machine, so runs may go in parallel.
#
# Usage: benches/callgrind_types.sh [N]        (N operations per count, default 2000)
#   REFS="ref6"   only 0.6.14 (default "ref6 ref7")
#   TYPES="core.ready core.exec.request"   only these types (default: all 32)
#   JOBS=2        valgrind runs at once (default 2)
#
# Each (type, operation, implementation) is one run of the example under
# `valgrind --tool=callgrind --toggle-collect=profile_types::<loop>`, which
# counts only the function holding the N operations; the table shows that total
# divided by N. Ratios are reference / agentwire (above 1: agentwire runs fewer
# instructions). A type whose frames differ between the two sides is not
# measured (the example refuses it) and shows as "skipped".
set -euo pipefail
cd "$(dirname "$0")/../../.."
n=${1:-2000}
refs=${REFS:-ref6 ref7}
jobs=${JOBS:-2}
target=${CARGO_TARGET_DIR:-target}
cargo build --release -p agentwire-bench --example profile_types >&2
exe=$target/release/examples/profile_types
types=${TYPES:-$("$exe" list)}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# One count: writes instructions per operation, or "skipped", to $out/<impl>.<op>.<type>.
count() { # impl op type
  local fn="$2_$1"
  [ "$1" = ours ] || fn="$2_$1_loop"
  local cg="$out/$1.$2.$3.cg"
  if valgrind --tool=callgrind --callgrind-out-file="$cg" --toggle-collect="profile_types::$fn" \
    "$exe" "$1" "$2" "$3" "$n" >/dev/null 2>"$cg.err"; then
    awk -v n="$n" '/^summary:/ { printf "%.0f\n", $2 / n }' "$cg" >"$out/$1.$2.$3"
  elif grep -q skipped "$cg.err"; then
    echo skipped >"$out/$1.$2.$3"
    grep skipped "$cg.err" >&2
  else
    cat "$cg.err" >&2
    echo failed >"$out/$1.$2.$3"
  fi
}
export -f count
export out exe n

for t in $types; do
  for op in encode decode; do
    for impl in ours $refs; do echo "$impl $op $t"; done
  done
done | xargs -P "$jobs" -L 1 bash -c 'count "$@"' _

get() { cat "$out/$1.$2.$3"; }
for ref in $refs; do
  case $ref in
    ref6) echo "### agentwire against microsandbox-protocol 0.6.14 (frames at v = 7)" ;;
    ref7) echo "### agentwire against microsandbox-protocol 0.7.13 (its frames at v = 10, ours at v = 7)" ;;
  esac
  echo
  echo "| type | encode ours | encode $ref | ratio | decode ours | decode $ref | ratio |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for t in $types; do
    printf '%s %s %s %s %s\n' "$t" "$(get ours encode "$t")" "$(get "$ref" encode "$t")" \
      "$(get ours decode "$t")" "$(get "$ref" decode "$t")"
  done | awk '
    function ratio(o, r) { if (o + 0 > 0 && r + 0 > 0) { s[++k] = log(r / o); return sprintf("%.1fx", r / o) } return "-" }
    { printf "| %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, ratio($2, $3), $4, $5, ratio($4, $5) }
    END {
      # Geometric mean of every ratio in the table (encode and decode).
      for (i = 1; i <= k; i++) sum += s[i]
      if (k) printf "| geometric mean of the %d ratios | | | %.1fx | | | |\n", k, exp(sum / k)
    }'
  echo
done
echo "(instructions per operation: callgrind total of N = $n operations / N; ratio = reference / agentwire)"
