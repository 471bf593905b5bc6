//! Every golden frame against the CDDL schema `schema/agentwire.cddl`: its
//! envelope against the rule `envelope`, its payload against `typed-payload`
//! (the one-entry map from the frame's type name to its payload). The frames
//! are taken apart here with ciborium, not with agentwire, so that the schema
//! is checked against the bytes and not against the codec's reading of them.
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
    wire_name: String,
    envelope: Value,
    payload: Value,
}

fn golden_frames() -> Vec<GoldenFrame> {
    vectors("golden.jsonl")
        .into_iter()
        .map(|v| {
            let name = v["name"].as_str().unwrap().to_string();
            let frame = hex(v["frame"].as_str().unwrap());
            // [len u32 BE][id u32 BE][flags u8][body]
            let len = u32::from_be_bytes(frame[0..4].try_into().unwrap()) as usize;
            assert_eq!(len, frame.len() - 4, "{name}: length prefix");
            assert_eq!(u64::from(u32::from_be_bytes(frame[4..8].try_into().unwrap())), v["id"].as_u64().unwrap());
            assert_eq!(u64::from(frame[8]), v["flags"].as_u64().unwrap(), "{name}: flags");
            let envelope = cbor(&frame[9..]);
            assert_eq!(to_cbor(&envelope), frame[9..], "{name}: the envelope is canonical and all of the body");
            let entry = |key: &str| {
                envelope
                    .as_map()
                    .and_then(|m| m.iter().find(|(k, _)| k.as_text() == Some(key)))
                    .map(|(_, v)| v.clone())
                    .unwrap_or_else(|| panic!("{name}: no {key:?} in the envelope"))
            };
            let wire_name = entry("t").as_text().unwrap().to_string();
            assert_eq!(wire_name, v["type"].as_str().unwrap(), "{name}: type");
            let p = entry("p").into_bytes().unwrap_or_else(|_| panic!("{name}: p is not a byte string"));
            let payload = cbor(&p);
            assert_eq!(to_cbor(&payload), p, "{name}: the payload is one item, nothing after it");
            GoldenFrame { name, wire_name, envelope, payload }
        })
        .collect()
}

/// The wire names that `typed-payload` lists, read from the schema text.
fn schema_wire_names() -> Vec<String> {
    let start = SCHEMA.find("typed-payload =").expect("the schema has typed-payload");
    let rule = &SCHEMA[start..SCHEMA[start..].find("\n\n").map_or(SCHEMA.len(), |end| start + end)];
    rule.split('"').skip(1).step_by(2).map(str::to_string).collect()
}

#[test]
fn the_schema_lists_every_type_of_generation_7_once() {
    let names = schema_wire_names();
    let table: Vec<&str> = MessageType::ALL.iter().map(|t| t.wire_name()).collect();
    assert_eq!(names.len(), 32);
    assert_eq!(names, table, "typed-payload follows the table of message.rs");
}

#[test]
fn the_array_keys_are_those_of_the_schema() {
    let mut keys: Vec<String> = array_keys().into_iter().collect();
    keys.sort();
    let expected = [
        "List",
        "address",
        "args",
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

    // All 160 frames were checked, and every type of generation 7 among them.
    assert_eq!(frames.len(), 160);
    for t in MessageType::ALL {
        assert!(frames.iter().any(|f| f.wire_name == t.wire_name()), "no golden frame of {t}");
    }
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
    let accepted: Vec<String> = wrong
        .into_iter()
        .map(|(wire_name, payload)| typed(wire_name, payload))
        .filter(|value| validate(&schema, value).is_ok())
        .map(|value| format!("{value:?}"))
        .collect();
    assert!(accepted.is_empty(), "accepted:\n{}", accepted.join("\n"));
}
