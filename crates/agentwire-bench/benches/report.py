#!/usr/bin/env python3
"""Prints the table of criterion medians and ratios from <target>/criterion.

Reads the median of each benchmark from <target>/criterion/<group>/<bench>/new/estimates.json
(the last run; <target> is $CARGO_TARGET_DIR, else the workspace's target) and
prints, per group and operation, the medians of agentwire, the reference
microsandbox-protocol 0.6.14 (ref6) and 0.7.13 (ref7) and the hand-written
baseline, each one's ratio to agentwire (above 1: agentwire is faster), and
for bulk groups agentwire's ratio to memcpy of the same bytes.
"""
import json
import os
import pathlib
import sys

target = os.environ.get("CARGO_TARGET_DIR") or pathlib.Path(__file__).resolve().parents[3] / "target"
root = pathlib.Path(target) / "criterion"


def median(group, bench):
    path = root / group / bench.replace("/", "_") / "new" / "estimates.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())["median"]["point_estimate"]


def fmt(ns):
    if ns is None:
        return "-"
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"


bulk_records = ("bulk_record_16k", "bulk_record_256k", "bulk_record_3m")
rows = [
    ("ready", "encode"), ("ready", "decode"),
    ("exited", "encode"), ("exited", "decode"),
    ("exec_request", "encode"), ("exec_request", "decode"),
    ("stdout_64k", "encode"), ("stdout_64k", "decode"),
    ("fs_data_1m", "encode"), ("fs_data_1m", "decode"),
    ("fs_data_3m", "encode"), ("fs_data_3m", "decode"),
    ("stream", "10000"), ("stream", "100000"),
    ("relay", "decode_encode"),
] + [(g, op) for g in bulk_records for op in ("encode", "encode_header", "decode")]
others = ("ref6", "ref7", "baseline")
print("| group | operation | agentwire | ref6 | ref7 | baseline "
      "| ref6 / agentwire | ref7 / agentwire | baseline / agentwire | agentwire / memcpy |")
print("|---|---|---|---|---|---|---|---|---|---|")
for group, op in rows:
    ours = median(group, f"{op}/agentwire")
    if ours is None:
        continue
    theirs = [median(group, f"{op}/{who}") for who in others]
    memcpy = median(group, "memcpy")
    to_memcpy = ratio(ours, memcpy) if memcpy and op in ("encode", "decode_encode") else "-"
    cells = " | ".join(fmt(t) for t in theirs)
    ratios = " | ".join(f"{ratio(t, ours)}x" if t else "-" for t in theirs)
    print(f"| {group} | {op} | {fmt(ours)} | {cells} | {ratios} | {to_memcpy} |")
for group in ("stdout_64k", "fs_data_1m", "fs_data_3m", "relay") + bulk_records:
    if median(group, "memcpy") is not None:
        print(f"| {group} | memcpy | {fmt(median(group, 'memcpy'))} | | | | | | | 1.00 |")
small = median("fs_data_1m", "decode_100b/agentwire")
small_equal = median("fs_data_1m", "decode_100b_before_1m/agentwire")
big = median("fs_data_1m", "decode/agentwire")
print(f"| fs_data_1m | decode of 100 B, input of 1 MiB + 100 B | {fmt(small_equal)} | | | | | | | |")
print(f"| fs_data_1m | decode of 100 B, input of 100 B | {fmt(small)} | | | | | | | |")
print()
print(f"- decode 1 MiB / decode 100 B, inputs of the same size: {ratio(big, small_equal)}")
print(f"- decode 1 MiB / decode 100 B from a 100-byte input: {ratio(big, small)}")
s10, s100 = median("stream", "10000/agentwire"), median("stream", "100000/agentwire")
print(f"- stream 100,000 / 10,000 frames: {ratio(s100, s10)}")
if len(sys.argv) > 1:
    print(f"- source: {root}")
