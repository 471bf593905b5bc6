//! The `agentwire` binary: `inspect` and `encode` against every vector.

mod common;

use std::process::Output;

use common::{agentwire, hex, vectors};
use serde_json::{Value, json};

fn json_lines(output: &Output) -> Vec<Value> {
    String::from_utf8(output.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[test]
fn inspect_json_gives_every_golden_frame_its_record() {
    for v in vectors("golden.jsonl") {
        let out = agentwire(&["inspect", "--json", "-"], &hex(v["frame"].as_str().unwrap()));
        assert_eq!(out.status.code(), Some(0), "{}", v["name"]);
        let expected = json!({
            "offset": 0, "id": v["id"], "flags": v["flags"], "v": v["gen"], "t": v["type"], "payload": v["payload"],
        });
        assert_eq!(json_lines(&out), vec![expected], "{}", v["name"]);
    }
}

#[test]
fn encode_gives_every_golden_frame_its_exact_bytes() {
    let lines = vectors("golden.jsonl");
    let mut input = String::new();
    let mut expected = Vec::new();
    for v in &lines {
        let line = json!({ "id": v["id"], "t": v["type"], "v": v["gen"], "payload": v["payload"] });
        input.push_str(&format!("{line}\n"));
        expected.extend(hex(v["frame"].as_str().unwrap()));
    }
    let out = agentwire(&["encode"], input.as_bytes());
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout == expected, "the 160 frames, byte for byte");

    // And the whole stream reads back through inspect, record for record.
    let back = agentwire(&["inspect", "--json"], &out.stdout);
    let records = json_lines(&back);
    assert_eq!(records.len(), lines.len());
    for (record, v) in records.iter().zip(&lines) {
        assert_eq!(record["payload"], v["payload"]);
    }
}

#[test]
fn inspect_json_on_every_malformed_vector_behaves_as_its_class_says() {
    for v in vectors("malformed.jsonl") {
        let name = v["name"].as_str().unwrap();
        let out = agentwire(&["inspect", "--json"], &hex(v["hex"].as_str().unwrap()));
        let records = json_lines(&out);
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"), "{name}");
        match v["class"].as_str().unwrap() {
            "fatal" => {
                assert_eq!(out.status.code(), Some(1), "{name}");
                let last = records.last().unwrap();
                assert!(last["fatal"]["message"].is_string(), "{name}: {last}");
                assert!(records.iter().all(|r| r.get("payload").is_none()), "{name}: never a frame");
            }
            "frame" => {
                assert_eq!(out.status.code(), Some(0), "{name}");
                assert_eq!(records.len(), 2, "{name}: {records:?}");
                assert!(records[0]["error"]["kind"].is_string() && records[0]["error"]["message"].is_string());
                assert_eq!(records[1]["t"], "core.exec.exited", "{name}");
                assert_eq!((records[1]["id"].as_u64(), &records[1]["payload"]), (Some(9), &json!({"code": 42})));
            }
            "ok" => {
                assert_eq!(out.status.code(), Some(0), "{name}");
                assert_eq!(records.len(), 1);
                assert_eq!((&records[0]["t"], &records[0]["payload"]), (&v["t"], &v["payload"]), "{name}");
            }
            class => panic!("{name}: class {class}"),
        }
    }
}

#[test]
fn inspect_names_the_kind_and_keeps_an_unknown_type() {
    let v = vectors("malformed.jsonl").into_iter().find(|v| v["name"] == "unknown-type").unwrap();
    let out = agentwire(&["inspect", "--json"], &hex(v["hex"].as_str().unwrap()));
    let records = json_lines(&out);
    assert_eq!(records[0]["error"]["kind"], "unsupported_message_type");
    assert_eq!(records[0]["t"], "core.future.thing");
    assert_eq!(records[1]["offset"], 37);
}

#[test]
fn inspect_for_a_person_prints_a_line_a_frame() {
    let v = vectors("golden.jsonl").into_iter().find(|v| v["name"] == "g3-exec-stdout-1").unwrap();
    let out = agentwire(&["inspect"], &hex(v["frame"].as_str().unwrap()));
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("core.exec.stdout") && text.contains("7 bytes"), "{text}");
}

#[test]
fn usage_errors_and_unreadable_files_exit_2_naming_the_file() {
    let out = agentwire(&["inspect", "/nonexistent/capture.bin"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/capture.bin"));
    assert_eq!(agentwire(&["inspect", "--no-such-flag"], b"").status.code(), Some(2));
    assert_eq!(agentwire(&["no-such-command"], b"").status.code(), Some(2));
}

#[test]
fn encode_reports_bad_lines_by_number_and_writes_the_good_ones() {
    let input = concat!(
        "{\"id\": 9, \"t\": \"core.exec.exited\", \"payload\": {\"code\": 42}}\n",
        "{\"id\": 1, \"t\": \"core.future.thing\", \"payload\": {}}\n",
        "not json\n",
        "{\"id\": 1, \"t\": \"core.exec.exited\", \"payload\": {\"code\": \"x\"}}\n",
        "{\"id\": 4294967296, \"t\": \"core.ping\", \"payload\": {}}\n",
        "\n",
        "{\"id\": 2, \"t\": \"core.ping\", \"payload\": {}, \"flags\": 128}\n",
    );
    let out = agentwire(&["encode", "-"], input.as_bytes());
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    for line in ["line 2:", "line 3:", "line 4:", "line 5:"] {
        assert!(err.contains(line), "{line} in {err}");
    }
    assert!(!err.contains("line 1:") && !err.contains("line 7:"), "{err}");
    let records = json_lines(&agentwire(&["inspect", "--json"], &out.stdout));
    assert_eq!(records.len(), 2);
    assert_eq!(records[1]["flags"], 128);
}

#[test]
fn encode_refuses_keys_the_type_does_not_have() {
    let input = concat!(
        "{\"id\": 1, \"t\": \"core.exec.request\", \"payload\": {\"cmd\": \"ls\", \"arg\": [\"-l\"]}}\n",
        "{\"id\": 1, \"t\": \"core.ping\", \"payload\": {}, \"flag\": 1}\n",
        "{\"id\": 1, \"t\": \"core.fs.request\", \"payload\": {\"op\": {\"Stat\": {\"path\": \"/\", \"follow_symlink\": true, \"folow\": 1}}}}\n",
        "{\"id\": 7, \"t\": \"core.error\", \"payload\": {\"kind\": \"invalid_session\", \"message\": \"m\", \"offending_type\": null}}\n",
    );
    let out = agentwire(&["encode", "-"], input.as_bytes());
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("line 1: payload of core.exec.request: unknown key arg"), "{err}");
    assert!(err.contains("line 2: \"flag\" is not a key of a line"), "{err}");
    assert!(err.contains("line 3:") && err.contains("folow"), "{err}");
    assert!(!err.contains("line 4:"), "a known optional key given as null is fine: {err}");
    assert_eq!(json_lines(&agentwire(&["inspect", "--json"], &out.stdout)).len(), 1);
}

#[test]
fn encode_of_a_directory_exits_2_naming_it_instead_of_looping() {
    let dir = std::env::temp_dir();
    let out = agentwire(&["encode", dir.to_str().unwrap(), "-o", "/dev/null"], b"");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(dir.to_str().unwrap()) && err.contains("Is a directory"), "{err}");
    assert!(err.lines().count() <= 2, "one message, not a loop: {err}");
    // As standard input.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentwire"))
        .args(["encode", "-o", "/dev/null"])
        .stdin(std::fs::File::open(&dir).unwrap())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("standard input"));
}

#[test]
fn inspect_says_when_a_stream_is_not_a_capture() {
    let out = agentwire(&["inspect"], b"hello world, this is text\n");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not look like a capture") && err.contains("68 65 6c 6c"), "{err}");
}
