#!/usr/bin/env python3
"""Prints the table of criterion medians and ratios from target/criterion.

Reads the median of each benchmark from target/criterion/<group>/<bench>/new/estimates.json
(the last run) and prints, per group, agentwire's median, the baseline's, their
ratio, and for bulk groups the ratio to memcpy of the same bytes.
"""
import json
import pathlib
import sys

root = pathlib.Path(__file__).resolve().parents[3] / "target" / "criterion"


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


rows = [
    ("ready", "encode"), ("ready", "decode"),
    ("stdout_64k", "encode"), ("stdout_64k", "decode"),
    ("fs_data_1m", "encode"), ("fs_data_1m", "decode"),
    ("fs_data_3m", "encode"), ("fs_data_3m", "decode"),
    ("stream", "10000"), ("stream", "100000"),
    ("relay", "decode_encode"),
    ("exited", "encode"), ("exited", "decode"),
    ("exec_request", "encode"), ("exec_request", "decode"),
]
print("| group | operation | agentwire (median) | baseline (median) | baseline / agentwire | agentwire / memcpy |")
print("|---|---|---|---|---|---|")
for group, op in rows:
    ours = median(group, f"{op}/agentwire")
    base = median(group, f"{op}/baseline")
    memcpy = median(group, "memcpy")
    to_memcpy = ratio(ours, memcpy) if memcpy and op != "decode" else "-"
    print(f"| {group} | {op} | {fmt(ours)} | {fmt(base)} | {ratio(base, ours)}x | {to_memcpy} |")
for group in ("stdout_64k", "fs_data_1m", "fs_data_3m", "relay"):
    print(f"| {group} | memcpy | {fmt(median(group, 'memcpy'))} | | | 1.00 |")
small = median("fs_data_1m", "decode_100b/agentwire")
small_equal = median("fs_data_1m", "decode_100b_before_1m/agentwire")
big = median("fs_data_1m", "decode/agentwire")
print(f"| fs_data_1m | decode of 100 B, input of 1 MiB + 100 B | {fmt(small_equal)} | | | |")
print(f"| fs_data_1m | decode of 100 B, input of 100 B | {fmt(small)} | | | |")
print()
print(f"- decode 1 MiB / decode 100 B, inputs of the same size: {ratio(big, small_equal)}")
print(f"- decode 1 MiB / decode 100 B from a 100-byte input: {ratio(big, small)}")
s10, s100 = median("stream", "10000/agentwire"), median("stream", "100000/agentwire")
print(f"- stream 100,000 / 10,000 frames: {ratio(s100, s10)}")
if len(sys.argv) > 1:
    print(f"- source: {root}")
