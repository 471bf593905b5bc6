#!/usr/bin/env python3
"""Writes the seed corpus under fuzz/corpus/<target>/ from tests/vectors.

Seeds: every golden frame (golden.jsonl, generations 7 and 3, and
golden-gen10.jsonl, raw bulk records included), every malformed input, a stream
of all golden frames of one type after another, and for the payload target the
payload (`p`) of every golden frame (for a raw bulk record, its whole body).
Run again after the vectors change.
"""
import hashlib
import json
import pathlib

here = pathlib.Path(__file__).resolve().parent
vectors = here.parent / "crates" / "agentwire" / "tests" / "vectors"
if not vectors.is_dir():  # the layout before the workspace split
    vectors = here.parent / "tests" / "vectors"
# `differential` gets the seeds of `message`: whole frames and streams of them.
targets = ["frame", "message", "payload", "roundtrip", "split", "differential"]


def head(buf, at):
    """(argument, size) of the CBOR head at `at` (canonical input only)."""
    info = buf[at] & 0x1F
    if info < 24:
        return info, 1
    width = 1 << (info - 24)
    return int.from_bytes(buf[at + 1 : at + 1 + width], "big"), 1 + width


def payload_of(frame):
    """The `p` of a canonical frame: the envelope is `a3 61 76 v 61 74 t 61 70 p`."""
    body = frame[9:]
    at = 3
    _, n = head(body, at)
    at += n + 2
    tlen, n = head(body, at)
    at += n + tlen + 2
    plen, n = head(body, at)
    return body[at + n : at + n + plen]


MAX_SEED = 16 * 1024  # the 100 KB nesting bomb and long streams are covered by cargo test


def write(target, data):
    if len(data) > MAX_SEED:
        return
    d = here / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    (d / hashlib.sha1(data).hexdigest()[:16]).write_bytes(data)


golden = [
    json.loads(l)
    for name in ("golden.jsonl", "golden-gen10.jsonl")
    for l in (vectors / name).read_text().splitlines()
    if l.strip()
]
malformed = [json.loads(l) for l in (vectors / "malformed.jsonl").read_text().splitlines() if l.strip()]
frames = [bytes.fromhex(g["frame"]) for g in golden]
bad = [bytes.fromhex(m["hex"]) for m in malformed]

for g, f in zip(golden, frames):
    for t in ("frame", "message", "roundtrip", "split", "differential"):
        write(t, f)
    # A raw bulk record has no envelope: its body is what the payload decoder reads.
    write("payload", f[9:] if g["type"] == "bulk.record" else payload_of(f))
for b in bad:
    for t in ("frame", "message", "split", "differential"):
        write(t, b)
by_type = {}
for g, f in zip(golden, frames):
    by_type.setdefault((g["gen"] >= 10, g["type"]), b"")
    by_type[(g["gen"] >= 10, g["type"])] += f
for stream in by_type.values():
    for t in ("message", "split", "differential"):
        write(t, stream)
for t in targets:
    print(t, len(list((here / "corpus" / t).iterdir())), "seeds")
