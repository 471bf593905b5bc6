//! Every malformed vector behaves as its class says, read through `FramedRead`.

mod common;

use agentwire::{
    Message, MessageCodec, MessageType, Payload, RejectKind, Rejected, StreamError, payload::exec::ExecExited,
};
use common::{hex, vectors};
use futures::StreamExt;
use tokio_util::codec::FramedRead;

type Item = Result<Result<Message, Rejected>, StreamError>;

async fn read_all(bytes: &[u8]) -> Vec<Item> {
    FramedRead::new(bytes, MessageCodec::new()).collect().await
}

fn the_frame_after() -> Message {
    Message::new(9, ExecExited { code: 42 }).with_version(7)
}

/// The kind each named vector must be rejected with (vectors not named here
/// are held to their class alone).
fn expected_kind(name: &str) -> Option<RejectKind> {
    Some(match name {
        "body-not-cbor" | "body-not-map" => RejectKind::MalformedMessage,
        "unknown-type" => RejectKind::UnsupportedMessageType,
        "payload-mismatch" | "nested-bomb" | "huge-bstr-claim" => RejectKind::InvalidPayload,
        _ => return None,
    })
}

#[test]
fn every_vector_behaves_as_its_class_says() {
    futures::executor::block_on(async {
        let lines = vectors("malformed.jsonl");
        assert!(lines.len() >= 12);
        for v in lines {
            let name = v["name"].as_str().unwrap();
            let items = read_all(&hex(v["hex"].as_str().unwrap())).await;
            match v["class"].as_str().unwrap() {
                "fatal" => {
                    assert_eq!(items.len(), 1, "{name}: {items:?}");
                    assert!(items[0].is_err(), "{name}: a stream error, never a frame: {items:?}");
                }
                "frame" => {
                    assert_eq!(items.len(), 2, "{name}: {items:?}");
                    let rejected = match &items[0] {
                        Ok(Err(r)) => r,
                        other => panic!("{name}: expected a rejected frame, got {other:?}"),
                    };
                    if let Some(kind) = expected_kind(name) {
                        assert_eq!(rejected.kind, kind, "{name}: {rejected}");
                    }
                    assert!(!rejected.reason.is_empty());
                    assert_eq!(rejected.offset, 0, "{name}");
                    match &items[1] {
                        Ok(Ok(m)) => assert_eq!(m, &the_frame_after(), "{name}"),
                        other => panic!("{name}: the next frame must decode, got {other:?}"),
                    }
                }
                "ok" => {
                    assert_eq!(items.len(), 1, "{name}: {items:?}");
                    let msg = match &items[0] {
                        Ok(Ok(m)) => m,
                        other => panic!("{name}: {other:?}"),
                    };
                    assert_eq!(msg.message_type().wire_name(), v["t"].as_str().unwrap(), "{name}");
                    assert_eq!(serde_json::to_value(&msg.payload).unwrap(), v["payload"], "{name}");
                }
                class => panic!("{name}: unknown class {class}"),
            }
        }
    })
}

#[test]
fn an_unknown_type_keeps_its_name_and_payload() {
    futures::executor::block_on(async {
        let line = vectors("malformed.jsonl").into_iter().find(|v| v["name"] == "unknown-type").unwrap();
        let items = read_all(&hex(line["hex"].as_str().unwrap())).await;
        let Ok(Err(r)) = &items[0] else { panic!("{items:?}") };
        assert_eq!(r.type_name.as_ref().unwrap().as_str(), "core.future.thing");
        assert_eq!(&r.payload[..], b"\xa0");
        let reply = r.error_reply();
        assert_eq!(reply.id, r.id);
        let Payload::Error(e) = &reply.payload else { panic!() };
        assert_eq!(e.kind.as_str(), "unsupported_message_type");
        assert_eq!(e.offending_type.as_deref(), Some("core.future.thing"));

        // The raw codec hands it over as a message, not a rejection.
        let raw: Vec<_> =
            FramedRead::new(&hex(line["hex"].as_str().unwrap())[..], agentwire::RawMessageCodec::new()).collect().await;
        let Ok(Ok(m)) = &raw[0] else { panic!("{raw:?}") };
        assert_eq!((m.type_name.as_str(), &m.payload[..]), ("core.future.thing", &b"\xa0"[..]));
        let Ok(Ok(m)) = &raw[1] else { panic!("{raw:?}") };
        assert_eq!(m.type_name, agentwire::TypeName::Known(MessageType::ExecExited));
    })
}

#[test]
fn flags_that_disagree_with_the_type_are_invalid_flags() {
    futures::executor::block_on(async {
        // core.exec.exited (TERMINAL) sent with SESSION_START, then the good frame.
        let mut wire = hex("000000270000000102a3617607617470636f72652e657865632e657869746564617048a164636f6465182a");
        wire.extend(hex("000000270000000901a3617607617470636f72652e657865632e657869746564617048a164636f6465182a"));
        // Reserved bits are ignored: TERMINAL | 0x80 is fine.
        wire.extend(hex("000000270000000981a3617607617470636f72652e657865632e657869746564617048a164636f6465182a"));
        let items = read_all(&wire).await;
        assert_eq!(items.len(), 3);
        let Ok(Err(r)) = &items[0] else { panic!("{items:?}") };
        assert_eq!(r.kind, RejectKind::InvalidFlags);
        assert!(matches!(&items[1], Ok(Ok(m)) if *m == the_frame_after()));
        assert!(matches!(&items[2], Ok(Ok(m)) if m.payload == the_frame_after().payload && m.flags.bits() == 0x81));
    })
}
