#!/usr/bin/env bash
# Builds and runs every fuzz target (or those named) for SECONDS each, on a
# copy of the committed seed corpus, and prints executions and findings.
#
#   fuzz/run.sh SECONDS [TARGET...]
#
# MAX_LEN (default 8192) is the largest input libFuzzer makes; RSS_LIMIT_MB
# (default 2048) its memory limit. The limit leaves room for a run at
# MAX_LEN=65536: libFuzzer's own corpus and traces, plus the inputs that the
# harnesses copy (split holds the whole stream several times over), reached
# 525 MB in `split`, which the old 512 MB limit reported as an out-of-memory.
#
# Uses the nightly toolchain when there is one, else stable with RUSTC_BOOTSTRAP=1.
# Exits 1 if any target finds a crash, a leak, a timeout or runs out of memory.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frame message payload roundtrip split differential)
max_len=${MAX_LEN:-8192}
rss_limit_mb=${RSS_LIMIT_MB:-2048}

if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly)
else
  toolchain=()
  export RUSTC_BOOTSTRAP=1
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

cargo "${toolchain[@]}" fuzz build -O
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0
printf '%-12s %8s %12s %10s %8s  %s\n' target seconds executions exec/s corpus findings
for t in "${targets[@]}"; do
  mkdir -p "$work/$t" "artifacts/$t"
  log="$work/$t.log"
  status=0
  # New inputs go to the first (scratch) directory; the committed seeds stay as they are.
  cargo "${toolchain[@]}" fuzz run -O "$t" "$work/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb="$rss_limit_mb" -max_len="$max_len" -timeout=10 -print_final_stats=1 >"$log" 2>&1 || status=$?
  runs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo 0)
  corpus=$(( $(ls "$work/$t" | wc -l) + $(ls "corpus/$t" | wc -l) ))
  findings=$(ls "artifacts/$t" 2>/dev/null | wc -l)
  rate=$(( runs / (seconds > 0 ? seconds : 1) ))
  verdict="none"
  if [ "$status" -ne 0 ] || [ "$findings" -gt 0 ]; then
    verdict="FOUND (exit $status): see fuzz/artifacts/$t and the log below"
    failed=1
  fi
  printf '%-12s %8s %12s %10s %8s  %s\n' "$t" "$seconds" "$runs" "$rate" "$corpus" "$verdict"
  if [ "$verdict" != none ]; then tail -40 "$log"; fi
done
exit $failed
