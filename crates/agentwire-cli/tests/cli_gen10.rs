//! The `agentwire` binary at generation 10: `encode` and `inspect` against every
//! line of the shared vectors (generations 3, 7 and 10, raw bulk records
//! included), the bulk record's text view, and bulk records that break the
//! layout, on both sides.

mod common;

use std::path::PathBuf;
use std::process::Output;

use common::{agentwire, hex};
use serde_json::{Value, json};

/// The shared vector folder beside the checkout (`../shared/vectors` from the
/// workspace root). A missing folder is a failure, not a pass.
fn shared_vectors(name: &str) -> Vec<Value> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/vectors");
    assert!(dir.is_dir(), "{} is not present: the vectors cannot be checked", dir.display());
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Both vector files: 160 lines of generations 3 and 7, 188 of generation 10.
fn all_vectors() -> Vec<Value> {
    let old = shared_vectors("golden.jsonl");
    let gen10 = shared_vectors("golden-gen10.jsonl");
    assert_eq!((old.len(), gen10.len()), (160, 188));
    assert_eq!(gen10.iter().filter(|v| v["type"] == "bulk.record").count(), 4);
    old.into_iter().chain(gen10).collect()
}

fn is_bulk(v: &Value) -> bool {
    v["type"] == "bulk.record"
}

fn frame_of(v: &Value) -> Vec<u8> {
    hex(v["frame"].as_str().unwrap())
}

fn json_lines(output: &Output) -> Vec<Value> {
    String::from_utf8(output.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The line `encode` reads for a vector, as `inspect --json` writes it:
/// no `v` for a bulk record (the record carries none).
fn encode_line(v: &Value) -> Value {
    if is_bulk(v) {
        json!({ "id": v["id"], "t": v["type"], "payload": v["payload"] })
    } else {
        json!({ "id": v["id"], "t": v["type"], "v": v["gen"], "payload": v["payload"] })
    }
}

/// Splits a stream of whole frames at their length prefixes.
fn split_frames(mut stream: &[u8]) -> Vec<&[u8]> {
    let mut frames = Vec::new();
    while !stream.is_empty() {
        let len = u32::from_be_bytes(stream[..4].try_into().unwrap()) as usize + 4;
        let (frame, rest) = stream.split_at(len.min(stream.len()));
        frames.push(frame);
        stream = rest;
    }
    frames
}

/// `encode` of `input` gives exactly `expected`, frame by frame, naming the
/// first vector that differs.
fn assert_encodes_to(vectors: &[Value], input: &str, expected: &[u8]) {
    let out = agentwire(&["encode"], input.as_bytes());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let got = split_frames(&out.stdout);
    assert_eq!(got.len(), vectors.len(), "one frame a line");
    for (frame, v) in got.iter().zip(vectors) {
        assert!(*frame == frame_of(v).as_slice(), "{}: {} != {}", v["name"], common::to_hex(frame), v["frame"]);
    }
    assert!(out.stdout == expected);
}

#[test]
fn encode_gives_every_line_of_both_vector_files_its_exact_bytes() {
    let vectors = all_vectors();
    let input: String = vectors.iter().map(|v| format!("{}\n", encode_line(v))).collect();
    let expected: Vec<u8> = vectors.iter().flat_map(frame_of).collect();
    assert_encodes_to(&vectors, &input, &expected);

    // Each line on its own too (a codec that kept state from line to line would show here).
    for v in vectors.iter().filter(|v| is_bulk(v) || v["gen"] != 10 || v["name"].as_str().unwrap().ends_with("-1")) {
        let out = agentwire(&["encode", "-"], format!("{}\n", encode_line(v)).as_bytes());
        assert_eq!(out.status.code(), Some(0), "{}: {}", v["name"], stderr(&out));
        assert!(out.stdout == frame_of(v), "{}", v["name"]);
    }
}

#[test]
fn inspect_json_of_the_concatenated_frames_gives_each_line_its_record() {
    let vectors = all_vectors();
    let stream: Vec<u8> = vectors.iter().flat_map(frame_of).collect();
    let out = agentwire(&["inspect", "--json"], &stream);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let records = json_lines(&out);
    assert_eq!(records.len(), vectors.len());
    let mut offset = 0u64;
    for (record, v) in records.iter().zip(&vectors) {
        let name = &v["name"];
        let mut expected = json!({
            "offset": offset, "id": v["id"], "flags": v["flags"], "t": v["type"], "payload": v["payload"],
        });
        if !is_bulk(v) {
            expected["v"] = v["gen"].clone();
        }
        // The whole record: a bulk record has exactly offset, id, flags, t and payload.
        assert_eq!(record, &expected, "{name}");
        offset += frame_of(v).len() as u64;
    }

    // The exact text of a bulk record's line, key for key.
    let bulk = vectors.iter().position(|v| v["name"] == "g10-bulk-record-2").unwrap();
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    let line = text.lines().nth(bulk).unwrap();
    let at: u64 = vectors[..bulk].iter().map(|v| frame_of(v).len() as u64).sum();
    assert_eq!(
        line,
        format!(
            r#"{{"flags":8,"id":110,"offset":{at},"payload":{{"data":[163],"flow":1,"kind":1,"offset":6022183935021710903}},"t":"bulk.record"}}"#
        )
    );

    // And what inspect wrote reads back through encode, offsets and all, to the same bytes.
    let again = agentwire(&["encode"], &out.stdout);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert!(again.stdout == stream, "inspect --json | encode gives the stream back");
}

#[test]
fn inspect_json_writes_fs_payloads_as_their_generation_writes_them() {
    // `user` is left out below generation 10 and written as null from 10 on.
    let mkdir = |v: u8| {
        json!({ "id": 3, "t": "core.fs.request", "v": v,
                "payload": { "op": { "Mkdir": { "path": "/d", "mode": null } } } })
    };
    let input = format!("{}\n{}\n", mkdir(7), mkdir(10));
    let out = agentwire(&["encode"], input.as_bytes());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let frames = split_frames(&out.stdout);
    assert_eq!(frames.len(), 2);
    assert!(!frames[0].windows(4).any(|w| w == b"user"), "a generation-7 frame has no user key");
    assert!(frames[1].windows(5).any(|w| w == b"user\xf6"), "a generation-10 frame has user: null");
    let records = json_lines(&agentwire(&["inspect", "--json"], &out.stdout));
    assert_eq!((&records[0]["v"], &records[1]["v"]), (&json!(7), &json!(10)));
    assert_eq!(records[0]["payload"], json!({ "op": { "Mkdir": { "path": "/d", "mode": null } } }));
    assert_eq!(records[1]["payload"], json!({ "op": { "Mkdir": { "path": "/d", "mode": null, "user": null } } }));
    // The text view renders the same way.
    let text = String::from_utf8(agentwire(&["inspect"], &out.stdout).stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines[0].contains("user") && lines[1].contains(r#""user":null"#), "{text}");
}

#[test]
fn encode_writes_generation_8_to_10_types_at_the_current_generation_by_default() {
    let input = concat!(
        "{\"id\": 5, \"t\": \"core.exec.output.ack\", \"payload\": {\"consumed\": 300}}\n",
        "{\"id\": 6, \"t\": \"core.bulk.finish\", \"payload\": {\"kind\": 2, \"flow\": 1, \"final_offset\": 9}}\n",
        "{\"id\": 7, \"t\": \"core.root_disk.grow\", \"payload\": {\"size_bytes\": 1024}}\n",
        "{\"id\": 8, \"t\": \"bulk.record\", \"payload\": {\"kind\": 2, \"flow\": 1, \"offset\": 9, \"data\": [104, 105]}}\n",
    );
    let out = agentwire(&["encode"], input.as_bytes());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let records = json_lines(&agentwire(&["inspect", "--json"], &out.stdout));
    let summary: Vec<_> = records.iter().map(|r| (r["t"].as_str().unwrap(), r.get("v").cloned())).collect();
    assert_eq!(
        summary,
        [
            ("core.exec.output.ack", Some(json!(10))),
            ("core.bulk.finish", Some(json!(10))),
            ("core.root_disk.grow", Some(json!(10))),
            ("bulk.record", None),
        ]
    );
    assert_eq!(records[3]["payload"], json!({ "kind": 2, "flow": 1, "offset": 9, "data": [104, 105] }));
    assert_eq!(&out.stdout[out.stdout.len() - 23..], b"\0\0\0\x13\0\0\0\x08\x08\x02\x01\0\0\0\0\0\0\0\0\0\x09hi");
}

#[test]
fn inspect_for_a_person_names_a_bulk_records_kind_flow_offset_and_size() {
    let bulk: Vec<Value> = shared_vectors("golden-gen10.jsonl").into_iter().filter(is_bulk).collect();
    let stream: Vec<u8> = bulk.iter().flat_map(frame_of).collect();
    let out = agentwire(&["inspect"], &stream);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), bulk.len(), "{text}");
    for (line, v) in lines.iter().zip(&bulk) {
        let p = &v["payload"];
        let kind = ["", "kind=filesystem(1)", "kind=tcp(2)"][p["kind"].as_u64().unwrap() as usize];
        let flow = ["", "flow=host-to-guest(1)", "flow=guest-to-host(2)"][p["flow"].as_u64().unwrap() as usize];
        let offset = format!("offset={}", p["offset"]);
        let size = format!(" {} bytes ", p["data"].as_array().unwrap().len());
        let id = format!("id={}", v["id"]);
        for part in [kind, flow, &offset, &size, &id, "BULK", "bulk.record"] {
            assert!(line.contains(part), "{}: {part} in {line}", v["name"]);
        }
        assert!(!line.contains("\"data\""), "not a dump of the payload: {line}");
    }
    assert!(lines[0].contains(r#"1 bytes ".""#), "{}", lines[0]);
}

/// A valid record (id 7, kind 1, flow 2, offset 0, data "abc") with its bytes
/// changed by `edit`.
fn record(edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut r = b"\0\0\0\x14\0\0\0\x07\x08\x01\x02\0\0\0\0\0\0\0\0\0\0abc".to_vec();
    edit(&mut r);
    r
}

#[test]
fn a_broken_bulk_record_loses_the_stream_at_its_offset() {
    let good = frame_of(&shared_vectors("golden-gen10.jsonl")[0]);
    let at = good.len();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bulk with terminal", record(|r| r[8] = 0x09), "flags 0x09"),
        ("bulk with a reserved bit", record(|r| r[8] = 0x88), "flags 0x88"),
        ("reserved bytes", record(|r| r[12] = 1), "reserved bytes 0x0001"),
        ("kind 3", record(|r| r[9] = 3), "kind 3"),
        ("flow 0", record(|r| r[10] = 0), "flow 0"),
        ("no data", record(|r| r[..4].copy_from_slice(&17u32.to_be_bytes())), "length 17"),
        ("above 3 MiB", record(|r| r[..4].copy_from_slice(&(18 + 3 * 1024 * 1024u32).to_be_bytes())), "3145729"),
        ("offset overflow", record(|r| r[13..21].copy_from_slice(&(u64::MAX - 1).to_be_bytes())), "2^64"),
    ];
    // A good record, then the broken one, then a frame that must never be shown.
    let after = frame_of(&shared_vectors("golden-gen10.jsonl")[1]);
    for (name, broken, says) in cases {
        let stream = [&good[..], &broken, &after].concat();
        let out = agentwire(&["inspect", "--json"], &stream);
        assert_eq!(out.status.code(), Some(1), "{name}: exits as other fatal errors do");
        assert!(!stderr(&out).contains("panicked"), "{name}");
        let records = json_lines(&out);
        assert_eq!(records.len(), 2, "{name}: {records:?}");
        assert_eq!(records[0]["t"], "core.ready", "{name}");
        let fatal = &records[1];
        assert_eq!(fatal["offset"], at, "{name}: {fatal}");
        let message = fatal["fatal"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("bulk record at offset {at} (id 7)")), "{name}: {message}");
        assert!(message.contains(says), "{name}: {says} in {message}");

        let out = agentwire(&["inspect"], &stream);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let text = String::from_utf8(out.stdout).unwrap();
        let last = text.lines().last().unwrap();
        assert!(last.trim_start().starts_with(&format!("{at}  STREAM FAILED: bulk record at offset {at}")), "{last}");
        assert_eq!(text.lines().count(), 2, "{name}: {text}");

        // Alone, it is still a capture (a frame's length and header): the
        // fatal line says what is wrong, not that the input is something else.
        let out = agentwire(&["inspect", "--json"], &broken);
        assert_eq!(out.status.code(), Some(1), "{name}");
        assert_eq!(json_lines(&out)[0]["offset"], 0, "{name}");
        assert!(!stderr(&out).contains("does not look like a capture"), "{name}: {}", stderr(&out));
    }
    // The same record unbroken is fine.
    let out = agentwire(&["inspect", "--json"], &[&good[..], &record(|_| ()), &after].concat());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(json_lines(&out)[1]["payload"], json!({ "kind": 1, "flow": 2, "offset": 0, "data": [97, 98, 99] }));
}

#[test]
fn encode_refuses_a_bulk_record_that_breaks_the_layout_naming_the_line() {
    let line = |payload: Value, extra: Value| {
        let mut l = json!({ "id": 7, "t": "bulk.record", "payload": payload });
        l.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        format!("{l}\n")
    };
    let p = |kind: u64, flow: u64, offset: u64, data: Vec<u8>| json!({ "kind": kind, "flow": flow, "offset": offset, "data": data });
    let none = json!({});
    let lines = [
        line(p(1, 2, 0, b"abc".to_vec()), none.clone()),              // 1: good
        line(p(1, 2, 0, vec![]), none.clone()),                       // 2: empty
        line(p(3, 2, 0, vec![1]), none.clone()),                      // 3: kind
        line(p(1, 0, 0, vec![1]), none.clone()),                      // 4: flow
        line(p(1, 2, u64::MAX, vec![1]), none.clone()),               // 5: overflow
        line(p(1, 2, 0, vec![0; 3 * 1024 * 1024 + 1]), none.clone()), // 6: too long
        line(p(1, 2, 0, vec![1]), json!({ "flags": 9 })),             // 7: flags
        line(p(1, 2, 0, vec![1]), json!({ "v": 7 })),                 // 8: below generation 8
        line(json!({ "kind": 1, "flow": 2, "offset": 0, "data": [1], "size": 1 }), none.clone()), // 9
        line(p(1, 2, 0, vec![1]), json!({ "gen": 10 })),              // 10: unknown line key
        line(p(2, 1, u64::MAX - 3, vec![7; 3]), json!({ "v": 10, "flags": 8, "offset": 99 })), // 11: good
        line(p(1, 2, 0, vec![0; 3 * 1024 * 1024]), none.clone()),     // 12: good, the largest
    ];
    let out = agentwire(&["encode"], lines.concat().as_bytes());
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    for expected in [
        "line 2: payload of bulk.record: data is empty",
        "line 3: payload of bulk.record: kind 3 is neither 1 (filesystem) nor 2 (tcp)",
        "line 4: payload of bulk.record: flow 0 is neither 1",
        "line 5: payload of bulk.record: offset 18446744073709551615 plus the data passes 2^64 - 1",
        "line 6: payload of bulk.record: 3145729 bytes of data exceed the record limit of 3145728",
        "line 7: flags: a bulk.record always has flags 8",
        "line 8: v: a bulk.record needs generation 8 or later, not 7",
        "line 9: payload of bulk.record: unknown key size",
        "line 10: \"gen\" is not a key of a line",
    ] {
        assert!(err.contains(expected), "{expected} in {err}");
    }
    assert!(!err.contains("line 1:") && !err.contains("line 11:") && !err.contains("line 12:"), "{err}");
    assert_eq!(err.lines().count(), 9, "{err}");
    let records = json_lines(&agentwire(&["inspect", "--json"], &out.stdout));
    let offsets: Vec<_> = records
        .iter()
        .map(|r| (r["payload"]["offset"].as_u64(), r["payload"]["data"].as_array().map(Vec::len)))
        .collect();
    assert_eq!(offsets, [(Some(0), Some(3)), (Some(u64::MAX - 3), Some(3)), (Some(0), Some(3 * 1024 * 1024))]);
}
