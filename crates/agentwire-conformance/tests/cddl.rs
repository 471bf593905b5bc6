//! Every golden frame with an envelope (`golden.jsonl`, generations 7 and 3,
//! and `golden-gen10.jsonl`) against the CDDL schema `schema/agentwire.cddl`:
//! its envelope against the rule `envelope`, its payload against
//! `typed-payload` (the one-entry map from the frame's type name to its
//! payload). Raw bulk records have no CBOR and are left out. The frames are
//! taken apart here with ciborium, not with agentwire, so that the schema is
//! checked against the bytes and not against the codec's reading of them.
//! Validation is done by the `cddl` crate.

#[path = "../../agentwire/tests/common/mod.rs"]
mod common;

use std::collections::HashSet;

use agentwire::MessageType;
use cddl::ast::CDDL;
use cddl::validator::Validator;
use cddl::validator::cbor::CBORValidator;
use ciborium::value::Value;
use common::{hex, vectors};

const SCHEMA: &str = include_str!("../../agentwire/schema/agentwire.cddl");

/// The schema with `root` as its first rule, which is the one the `cddl`
/// crate validates against.
fn schema_rooted_at(root: &str) -> String {
    format!("agentwire-root = {root}\n\n{SCHEMA}")
}

/// Parses a schema text (kept alive by the caller, as the AST borrows it).
fn parse(text: &str) -> CDDL<'_> {
    cddl::cddl_from_str(text, true).unwrap_or_else(|e| panic!("schema does not parse: {e}"))
}

/// Validates `value` against the root rule of `schema`; the errors as text.
///
/// The `cddl` crate (0.10.2, the newest that builds with this workspace's
/// rust-version) has one gap that matters here: where a rule expects a scalar
/// (`bstr`, `tstr`, an integer) it accepts an array whose items would match,
/// e.g. `[1, 2]` for `data: bstr`. So arrays are also checked to appear only
/// under the keys the schema declares as arrays ([`array_keys`]).
fn validate(schema: &CDDL<'_>, value: &Value) -> Result<(), String> {
    let mut validator = CBORValidator::new(schema, value.clone(), None);
    validator.validate().map_err(|e| e.to_string())?;
    let mut misplaced = Vec::new();
    arrays_outside_array_keys(value, None, "", &array_keys(), &mut misplaced);
    if misplaced.is_empty() { Ok(()) } else { Err(format!("array where the schema has none: {misplaced:?}")) }
}

/// The map keys whose value the schema declares as an array: `key: [...]`, or
/// `key: rule` where `rule = [...]` (the MAC and IP address rules).
fn array_keys() -> HashSet<String> {
    let text: String = SCHEMA.lines().map(|l| l.split(';').next().unwrap_or_default()).collect::<Vec<_>>().join("\n");
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    let array_rules: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once(" = ").filter(|(_, def)| def.trim_start().starts_with('[')))
        .map(|(name, _)| name.trim())
        .collect();
    let mut keys = HashSet::new();
    for (at, _) in text.match_indices(':') {
        let key: String =
            text[..at].chars().rev().take_while(|&c| is_ident(c)).collect::<Vec<_>>().into_iter().rev().collect();
        let value = text[at + 1..].trim_start();
        let names_array_rule =
            array_rules.iter().any(|r| value.strip_prefix(r).is_some_and(|rest| !rest.starts_with(is_ident)));
        if !key.is_empty() && (value.starts_with('[') || names_array_rule) {
            keys.insert(key);
        }
    }
    keys
}

/// Collects the paths of arrays in `value` that are not the value of one of `keys`.
fn arrays_outside_array_keys(
    value: &Value,
    key: Option<&str>,
    path: &str,
    keys: &HashSet<String>,
    out: &mut Vec<String>,
) {
    match value {
        Value::Array(items) => {
            if !key.is_some_and(|k| keys.contains(k)) {
                out.push(path.to_string());
            }
            for (i, item) in items.iter().enumerate() {
                arrays_outside_array_keys(item, None, &format!("{path}/{i}"), keys, out);
            }
        }
        Value::Map(entries) => {
            for (k, v) in entries {
                let k = k.as_text();
                arrays_outside_array_keys(v, k, &format!("{path}/{}", k.unwrap_or("?")), keys, out);
            }
        }
        Value::Tag(_, inner) => arrays_outside_array_keys(inner, None, path, keys, out),
        _ => {}
    }
}

/// A payload labelled with its type, as `typed-payload` takes it.
fn typed(wire_name: &str, payload: Value) -> Value {
    Value::Map(vec![(Value::Text(wire_name.to_string()), payload)])
}

fn cbor(bytes: &[u8]) -> Value {
    ciborium::de::from_reader(bytes).unwrap_or_else(|e| panic!("not CBOR: {e}"))
}

fn to_cbor(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(value, &mut out).unwrap();
    out
}

/// One golden frame, taken apart by hand.
struct GoldenFrame {
    name: String,
    /// The writer's generation (`v`).
    generation: u64,
    wire_name: String,
    envelope: Value,
    payload: Value,
}

/// The frames of both vector files that have an envelope (every line but the
/// raw bulk records of `golden-gen10.jsonl`, whose body is not CBOR).
fn golden_frames() -> Vec<GoldenFrame> {
    let lines = [vectors("golden.jsonl"), vectors("golden-gen10.jsonl")].concat();
    assert_eq!(lines.len(), 160 + 188);
    lines
        .into_iter()
        .filter(|v| v["type"] != "bulk.record")
        .map(|v| {
            let name = v["name"].as_str().unwrap().to_string();
            let frame = hex(v["frame"].as_str().unwrap());
            // [len u32 BE][id u32 BE][flags u8][body]
            let len = u32::from_be_bytes(frame[0..4].try_into().unwrap()) as usize;
            assert_eq!(len, frame.len() - 4, "{name}: length prefix");
            assert_eq!(u64::from(u32::from_be_bytes(frame[4..8].try_into().unwrap())), v["id"].as_u64().unwrap());
            assert_eq!(u64::from(frame[8]), v["flags"].as_u64().unwrap(), "{name}: flags");
            assert_eq!(frame[8] & 0x08, 0, "{name}: a CBOR frame without the BULK flag");
            let envelope = cbor(&frame[9..]);
            assert_eq!(to_cbor(&envelope), frame[9..], "{name}: the envelope is canonical and all of the body");
            let entry = |key: &str| {
                envelope
                    .as_map()
                    .and_then(|m| m.iter().find(|(k, _)| k.as_text() == Some(key)))
                    .map(|(_, v)| v.clone())
                    .unwrap_or_else(|| panic!("{name}: no {key:?} in the envelope"))
            };
            let generation = entry("v").as_integer().map(u64::try_from).unwrap().unwrap();
            assert_eq!(generation, v["gen"].as_u64().unwrap(), "{name}: v");
            let wire_name = entry("t").as_text().unwrap().to_string();
            assert_eq!(wire_name, v["type"].as_str().unwrap(), "{name}: type");
            let p = entry("p").into_bytes().unwrap_or_else(|_| panic!("{name}: p is not a byte string"));
            let payload = cbor(&p);
            assert_eq!(to_cbor(&payload), p, "{name}: the payload is one item, nothing after it");
            GoldenFrame { name, generation, wire_name, envelope, payload }
        })
        .collect()
}

/// The wire names that `typed-payload` lists, read from the schema text.
fn schema_wire_names() -> Vec<String> {
    let start = SCHEMA.find("typed-payload =").expect("the schema has typed-payload");
    let rule = &SCHEMA[start..SCHEMA[start..].find("\n\n").map_or(SCHEMA.len(), |end| start + end)];
    rule.split('"').skip(1).step_by(2).map(str::to_string).collect()
}

/// The types whose body is an envelope: all but the raw bulk record.
fn envelope_types() -> impl Iterator<Item = MessageType> {
    MessageType::ALL.into_iter().filter(|t| t.has_envelope())
}

#[test]
fn the_schema_lists_every_type_of_generation_10_once() {
    let names = schema_wire_names();
    let table: Vec<&str> = envelope_types().map(|t| t.wire_name()).collect();
    assert_eq!(names.len(), 46);
    assert_eq!(names, table, "typed-payload follows the table of message.rs");
    assert!(!SCHEMA.contains("\"bulk.record\""), "a raw bulk record has no CBOR payload");
}

#[test]
fn the_array_keys_are_those_of_the_schema() {
    let mut keys: Vec<String> = array_keys().into_iter().collect();
    keys.sort();
    let expected = [
        "List",
        "address",
        "args",
        "connection_id",
        "external_mount_tags",
        "incarnation",
        "dir_mounts",
        "default_env",
        "disk_mounts",
        "dns",
        "env",
        "file_mounts",
        "gateway",
        "mac",
        "rlimits",
        "tmpfs_mounts",
    ];
    let mut expected: Vec<String> = expected.iter().map(|k| k.to_string()).collect();
    expected.sort();
    assert_eq!(keys, expected);
}

#[test]
fn every_golden_frame_matches_the_schema() {
    let payload_text = schema_rooted_at("typed-payload");
    let payload_schema = parse(&payload_text);
    let envelope_text = schema_rooted_at("envelope");
    let envelope_schema = parse(&envelope_text);

    let frames = golden_frames();
    let mut failures = Vec::new();
    for f in &frames {
        if let Err(e) = validate(&envelope_schema, &f.envelope) {
            failures.push(format!("{} (envelope): {e}", f.name));
        }
        if let Err(e) = validate(&payload_schema, &typed(&f.wire_name, f.payload.clone())) {
            // Leave out the other alternatives of typed-payload, which fail by their key.
            let e: Vec<&str> = e.lines().filter(|l| !l.contains("object missing key")).collect();
            failures.push(format!("{} ({}): {}", f.name, f.wire_name, e.join("; ")));
        }
    }
    assert!(failures.is_empty(), "{} of {} frames fail:\n{}", failures.len(), frames.len(), failures.join("\n"));

    // All 160 + 184 frames were checked: every type of generation 7 among
    // those of golden.jsonl, every type of generation 10 among the others.
    assert_eq!(frames.len(), 160 + 184);
    for t in envelope_types() {
        let of = |g: u64| frames.iter().filter(|f| f.generation == g && f.wire_name == t.wire_name()).count();
        assert_eq!(of(10), 4, "golden frames of {t} at v = 10");
        assert_eq!(of(7) > 0, t.is_available_at(7), "golden frames of {t} at v = 7");
    }
}

/// The `user` entries of fs operations in a payload: `(where, value)`.
fn fs_users(payload: &Value) -> Vec<(&'static str, Option<Value>)> {
    let entry = |m: &Value, key: &str| {
        m.as_map().and_then(|m| m.iter().find(|(k, _)| k.as_text() == Some(key))).map(|(_, v)| v.clone())
    };
    let Some(op) = entry(payload, "op") else { return Vec::new() };
    let mut users = Vec::new();
    for variant in ["Symlink", "Mkdir"] {
        if let Some(fields) = entry(&op, variant) {
            users.push((variant, entry(&fields, "user")));
        }
    }
    if let Some(options) = entry(&op, "OpenFile").and_then(|open| entry(&open, "options")) {
        users.push(("OpenFile", entry(&options, "user")));
    }
    users
}

/// Our own frames of the three fs operations with a `user` key, unset and
/// set, at v = 7 and v = 10, taken apart like the golden frames (the golden
/// files hold only one such frame, at v = 10).
fn our_fs_user_frames() -> Vec<(String, u64, Value)> {
    use agentwire::payload::fs::{FsOp, FsOpenOptions, FsRequest};
    use agentwire::{Message, MessageCodec};
    use tokio_util::codec::Encoder;
    let mut frames = Vec::new();
    for user in [None, Some("app:app".to_string())] {
        let ops = [
            FsOp::Symlink { target: "t".into(), link_path: "l".into(), user: user.clone() },
            FsOp::Mkdir { path: "/d".into(), mode: None, user: user.clone() },
            FsOp::OpenFile { path: "/f".into(), options: FsOpenOptions { user: user.clone(), ..Default::default() } },
        ];
        for op in ops {
            for v in [7, 10] {
                let m = Message::new(3, FsRequest::new(op.clone())).with_version(v);
                let mut frame = bytes::BytesMut::new();
                MessageCodec::new().encode(m, &mut frame).unwrap();
                let envelope = cbor(&frame[9..]);
                let p = envelope.as_map().unwrap().iter().find(|(k, _)| k.as_text() == Some("p")).unwrap().1.clone();
                frames.push((format!("ours {op:?} at v={v}"), u64::from(v), cbor(&p.into_bytes().unwrap())));
            }
        }
    }
    frames
}

/// The one rule the schema leaves to the generation (`? user:`): the `user`
/// key of Symlink, Mkdir and the open options is absent at v = 7 and always
/// written, null when none, at v = 10. Checked on the golden frames and on
/// ours, which must also match the schema.
#[test]
fn the_fs_user_key_follows_the_writer_generation() {
    let schema_text = schema_rooted_at("typed-payload");
    let schema = parse(&schema_text);
    let golden = golden_frames()
        .into_iter()
        .filter(|f| f.wire_name == "core.fs.request")
        .map(|f| (f.name, f.generation, f.payload));
    let ours = our_fs_user_frames();
    assert_eq!(ours.len(), 12);
    for (name, _, payload) in &ours {
        validate(&schema, &typed("core.fs.request", payload.clone())).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let (mut absent, mut null, mut set) = (0, 0, 0);
    for (name, generation, payload) in golden.chain(ours) {
        for (variant, user) in fs_users(&payload) {
            match (generation, user) {
                (10, Some(Value::Null)) => null += 1,
                (7 | 10, Some(Value::Text(_))) => set += 1,
                (7 | 3, None) => absent += 1,
                (g, user) => panic!("{name} ({variant}): user {user:?} in a frame of generation {g}"),
            }
        }
    }
    assert_eq!((absent, null, set), (3, 3 + 1, 6), "absent at v = 7, null at v = 10 (ours and one golden), set");
}

/// Golden payloads, changed so that they are wrong, must be refused.
#[test]
fn wrong_payloads_are_rejected() {
    let text = schema_rooted_at("typed-payload");
    let schema = parse(&text);
    let text_field = |k: &str, v: Value| Value::Map(vec![(Value::Text(k.into()), v)]);

    // The right shape is accepted, so the refusals below are about the changes.
    let exited = text_field("code", Value::Integer((-1).into()));
    validate(&schema, &typed("core.exec.exited", exited.clone())).unwrap();
    // The cddl crate itself, without the array check, refuses a text exit code.
    let text_code = typed("core.exec.exited", text_field("code", Value::Text("-1".into())));
    let refusal = CBORValidator::new(&schema, text_code, None).validate().unwrap_err().to_string();
    assert!(refusal.contains("\"code\""), "{refusal}");

    let wrong = [
        // core.exec.exited whose code is a text string.
        ("core.exec.exited", text_field("code", Value::Text("-1".into()))),
        // i32, u32 and u16 out of range.
        ("core.exec.exited", text_field("code", Value::Integer((i64::from(i32::MAX) + 1).into()))),
        ("core.exec.exited", text_field("code", Value::Integer((i64::from(i32::MIN) - 1).into()))),
        ("core.exec.started", text_field("pid", Value::Integer((u64::from(u32::MAX) + 1).into()))),
        ("core.exec.started", text_field("pid", Value::Integer((-1).into()))),
        (
            "core.exec.resize",
            Value::Map(vec![
                (Value::Text("rows".into()), Value::Integer(65536.into())),
                (Value::Text("cols".into()), Value::Integer(80.into())),
            ]),
        ),
        // A required key missing.
        ("core.exec.exited", Value::Map(vec![])),
        // A key the type does not have (writers write none; readers skip them).
        (
            "core.exec.exited",
            Value::Map(vec![
                (Value::Text("code".into()), Value::Integer(0.into())),
                (Value::Text("signal".into()), Value::Integer(9.into())),
            ]),
        ),
        // An Option written as an absent key where agentwire writes null.
        (
            "core.fs.response",
            Value::Map(vec![(Value::Text("ok".into()), Value::Bool(true)), (Value::Text("error".into()), Value::Null)]),
        ),
        // A valid payload under another type's name.
        ("core.exec.started", exited.clone()),
        // A type the schema does not have.
        ("core.exec.exited2", exited.clone()),
        // Data as an array of integers instead of a byte string.
        ("core.exec.stdout", text_field("data", Value::Array(vec![Value::Integer(1.into())]))),
        // core.shutdown is null, not an empty map.
        ("core.shutdown", Value::Map(vec![])),
        // An error kind that is not one of generation 7.
        (
            "core.error",
            Value::Map(vec![
                (Value::Text("kind".into()), Value::Text("no_such_kind".into())),
                (Value::Text("message".into()), Value::Text("x".into())),
            ]),
        ),
        // An FsOp variant name in the wrong case.
        ("core.fs.request", text_field("op", text_field("realpath", text_field("path", Value::Text("/".into()))))),
        // A user that is neither text nor null.
        (
            "core.fs.request",
            text_field(
                "op",
                text_field("Symlink", map(&[("target", tstr("t")), ("link_path", tstr("l")), ("user", int(0))])),
            ),
        ),
        // A MAC of five octets.
        (
            "core.bootstrap",
            Value::Map(vec![
                (Value::Text("network".into()), {
                    Value::Map(vec![
                        (Value::Text("interface".into()), Value::Text("eth0".into())),
                        (Value::Text("mac".into()), Value::Array(vec![Value::Integer(2.into()); 5])),
                        (Value::Text("mtu".into()), Value::Integer(1500.into())),
                    ])
                }),
                (Value::Text("security_profile".into()), Value::Text("default".into())),
            ]),
        ),
    ];
    let wrong = wrong.into_iter().chain(wrong_gen10_payloads());
    let accepted: Vec<String> = wrong
        .into_iter()
        .map(|(wire_name, payload)| typed(wire_name, payload))
        .filter(|value| validate(&schema, value).is_ok())
        .map(|value| format!("{value:?}"))
        .collect();
    assert!(accepted.is_empty(), "accepted:\n{}", accepted.join("\n"));
}

fn map(entries: &[(&str, Value)]) -> Value {
    Value::Map(entries.iter().map(|(k, v)| (Value::Text(k.to_string()), v.clone())).collect())
}

fn tstr(s: &str) -> Value {
    Value::Text(s.to_string())
}

fn int(i: i128) -> Value {
    Value::Integer(i.try_into().unwrap())
}

fn octets(n: usize) -> Value {
    Value::Array(vec![int(7); n])
}

/// Payloads of the generation-8 to -10 additions, each wrong in one way.
fn wrong_gen10_payloads() -> Vec<(&'static str, Value)> {
    let credit = |kind: Value, flow: Value| {
        map(&[("kind", kind), ("flow", flow), ("consumed_offset", int(0)), ("credit_limit", int(1))])
    };
    let position =
        map(&[("control_bytes", int(1)), ("control_frames", int(1)), ("bulk_bytes", int(1)), ("bulk_frames", int(1))]);
    let limits = |drop: &str| {
        let all = [
            ("max_executions", int(128)),
            ("input_limit", int(65536)),
            ("output_limit", int(1048576)),
            ("stdin_chunk_size", int(16384)),
            ("output_chunk_size", int(16384)),
        ];
        map(&all.into_iter().filter(|(k, _)| *k != drop).collect::<Vec<_>>())
    };
    let ready = |extra: (&str, Value)| {
        map(&[("boot_time_ns", int(1)), ("init_time_ns", int(2)), ("ready_time_ns", int(3)), extra])
    };
    let offer = |format: i128| {
        map(&[("format", int(format)), ("max_record_payload", int(16384)), ("guest_to_host_credit_limit", int(0))])
    };
    let error = |extra: (&str, Value)| map(&[("kind", tstr("initialization_failed")), ("message", tstr("m")), extra]);
    vec![
        // Integer enums out of range, or as text.
        ("core.bulk.credit", credit(int(3), int(1))),
        ("core.bulk.credit", credit(int(1), int(0))),
        ("core.bulk.credit", credit(int(1), tstr("host_to_guest"))),
        ("core.bulk.finish", map(&[("kind", int(2)), ("flow", int(2)), ("final_offset", int(-1))])),
        ("core.bulk.cancel", map(&[("kind", int(1)), ("reason", int(6)), ("message", tstr(""))])),
        ("core.bulk.cancel", map(&[("kind", int(1)), ("reason", int(0)), ("message", tstr(""))])),
        // A required key missing.
        (
            "core.bulk.accepted",
            map(&[
                ("kind", int(1)),
                ("flows", int(3)),
                ("format", int(1)),
                ("max_record_payload", int(16384)),
                ("host_to_guest_credit_limit", int(0)),
            ]),
        ),
        ("core.workload.freeze", map(&[("external_mount_tags", Value::Array(vec![])), ("attempt_id", tstr("a"))])),
        ("core.root_disk.state", map(&[("filesystem_bytes", int(4096))])),
        // The always-written keys left out.
        ("core.workload.freeze", map(&[("attempt_id", tstr("a")), ("host_input", position.clone())])),
        (
            "core.workload.frozen",
            map(&[("attempt_id", tstr("a")), ("guest_bulk_bytes_target", int(0)), ("input_credit", position.clone())]),
        ),
        // A thaw mode that does not exist.
        ("core.workload.thaw", map(&[("attempt_id", tstr("a")), ("mode", tstr("pause"))])),
        // A negative cumulative count.
        ("core.exec.output.ack", map(&[("consumed", int(-1))])),
        ("core.exec.stdin.ack", map(&[("consumed", tstr("1"))])),
        // Exec limits with a key left out (writers write all five), or out of range.
        ("core.ready", ready(("exec_limits", limits("output_chunk_size")))),
        ("core.bootstrap", map(&[("security_profile", tstr("default")), ("exec_limits", limits("max_executions"))])),
        ("core.ready", ready(("relay_lease", map(&[("max_format", int(256))])))),
        ("core.ready", ready(("workload_transport_barrier_version", int(-2)))),
        // Identities of 15 octets, or as a byte string.
        (
            "core.ready",
            ready((
                "bulk_transport",
                map(&[("profile", tstr("dual-port-v1")), ("port", tstr("agent-bulk")), ("connection_id", octets(15))]),
            )),
        ),
        (
            "core.relay.client.disconnected",
            map(&[("id_start", int(1)), ("id_end_exclusive", int(2)), ("incarnation", octets(17))]),
        ),
        (
            "core.relay.client.disconnected",
            map(&[("id_start", int(1)), ("id_end_exclusive", int(2)), ("incarnation", Value::Bytes(vec![7; 16]))]),
        ),
        // An "omit if false" bool written as false.
        ("core.init.ack", map(&[("failure", Value::Bool(false))])),
        ("core.bootstrap", map(&[("init_failure_ack", Value::Bool(false)), ("security_profile", tstr("default"))])),
        // A catch-all enum with a name no writer writes, or not text.
        ("core.error", error(("init_failure", tstr("disk_full")))),
        ("core.error", error(("init_failure", int(1)))),
        ("core.error", error(("workload_failure", map(&[("attempt_id", tstr("a")), ("disposition", tstr("gone"))])))),
        ("core.error", error(("workload_failure", map(&[("disposition", tstr("unavailable"))])))),
        // Bulk offers of the wrong shape.
        ("core.tcp.connect", map(&[("host", tstr("h")), ("port", int(1)), ("bulk", offer(256))])),
        (
            "core.fs.request",
            map(&[
                ("op", map(&[("Read", map(&[("handle", int(1)), ("offset", int(0)), ("len", Value::Null)]))])),
                ("bulk", Value::Null),
            ]),
        ),
    ]
}

/// The right shapes of the additions are accepted, so that the refusals of
/// `wrong_gen10_payloads` are about what each changes.
#[test]
fn right_gen10_payloads_are_accepted() {
    let schema_text = schema_rooted_at("typed-payload");
    let schema = parse(&schema_text);
    let limits = map(&[
        ("max_executions", int(1)),
        ("input_limit", int(2)),
        ("output_limit", int(3)),
        ("stdin_chunk_size", int(4)),
        ("output_chunk_size", int(5)),
    ]);
    let right = [
        (
            "core.bulk.credit",
            map(&[("kind", int(2)), ("flow", int(1)), ("consumed_offset", int(0)), ("credit_limit", int(1))]),
        ),
        ("core.bulk.cancel", map(&[("kind", int(1)), ("reason", int(5)), ("message", tstr(""))])),
        ("core.exec.output.ack", map(&[("consumed", int(0))])),
        ("core.init.ack", map(&[("failure", Value::Bool(true))])),
        ("core.init.ack", map(&[])),
        (
            "core.error",
            map(&[
                ("kind", tstr("capability_unavailable")),
                ("message", tstr("m")),
                ("workload_failure", map(&[("attempt_id", tstr("a")), ("disposition", tstr("unknown"))])),
            ]),
        ),
        (
            "core.relay.client.disconnected",
            map(&[("id_start", int(1)), ("id_end_exclusive", int(2)), ("incarnation", octets(16))]),
        ),
        (
            "core.bootstrap",
            map(&[
                ("init_failure_ack", Value::Bool(true)),
                ("security_profile", tstr("default")),
                ("exec_limits", limits.clone()),
            ]),
        ),
        (
            "core.ready",
            map(&[
                ("boot_time_ns", int(1)),
                ("init_time_ns", int(2)),
                ("ready_time_ns", int(3)),
                ("exec_limits", limits),
            ]),
        ),
    ];
    for (wire_name, payload) in right {
        let value = typed(wire_name, payload);
        validate(&schema, &value).unwrap_or_else(|e| panic!("{value:?}: {e}"));
    }
}
