//! Instructions per encode and per decode of each of the 32 message types of
//! generation 7, agentwire against the deployed reference (`microsandbox-protocol`
//! 0.6.14, and 0.7.13), counted by callgrind: `benches/callgrind_types.sh` runs
//! this program once per (type, operation, implementation) and prints the table.
//!
//! ```text
//! profile_types <ours|ref6|ref7> <encode|decode> <type> <N>   # N operations of one type
//! profile_types list                                          # the 32 wire names
//! ```
//!
//! The value of each type is one representative, realistic value
//! (`benches/support/samples.rs`); the reference's equal value is made from it
//! through the serde data model. Before the loop the program checks that both
//! sides write the same frame bytes (against 0.6.14 at `v = 7`, against 0.7.13
//! at `v = 10`), and that each decodes the other's frame to the value; a type
//! whose frames differ is reported on stderr and exits with status 3, so the
//! script can skip it.
//!
//! The N operations run inside one function that is never inlined,
//! `profile_types::<op>_<impl>`, so that `valgrind --tool=callgrind
//! --toggle-collect=profile_types::<op>_<impl>` counts only them:
//!
//! - encode: message value to whole frame bytes in a reused output buffer
//!   (agentwire: `MessageCodec::encode_message`; reference:
//!   `Message::with_payload` + `codec::encode_to_buf`, see `support/reference.rs`);
//! - decode: whole frame in its own fresh read buffer (made before the loop) to
//!   the typed value, by each side's streaming decoder. The decoded values are
//!   kept and dropped after the loop, on both sides, as `profile_ready` does.

#[path = "../benches/support/mod.rs"]
mod support;

use std::fmt::Debug;
use std::hint::black_box;
use std::process::ExitCode;

use agentwire::{Message, MessageCodec, MessageType};
use bytes::BytesMut;
use serde::Serialize;
use serde::de::DeserializeOwned;
use support::reference::{decode_ref6, decode_ref7, encode_ref6, encode_ref7, r6, r7};
use support::samples::{GENERATION, gen7_types, sample};
use tokio_util::codec::Decoder;

/// The correlation id of every frame (above 2^24, so it takes all four bytes of a CBOR-free header anyway).
const ID: u32 = 0x1000_0001;

#[inline(never)]
fn encode_ours(codec: &mut MessageCodec, message: &Message, dst: &mut BytesMut, n: usize) {
    for _ in 0..n {
        dst.clear();
        codec.encode_message(black_box(message), dst).expect("encodes");
    }
}

#[inline(never)]
fn decode_ours(codec: &mut MessageCodec, inputs: &mut [BytesMut], out: &mut Vec<Message>) {
    for src in inputs {
        out.push(codec.decode(src).expect("stream").expect("frame").expect("valid"));
    }
}

#[inline(never)]
fn encode_ref6_loop<T: Serialize>(t: r6::MessageType, value: &T, dst: &mut Vec<u8>, n: usize) {
    for _ in 0..n {
        dst.clear();
        encode_ref6(t, ID, black_box(value), dst);
    }
}

#[inline(never)]
fn decode_ref6_loop<T: DeserializeOwned>(inputs: &mut [Vec<u8>], out: &mut Vec<(r6::Message, T)>) {
    for src in inputs {
        out.push(decode_ref6(src));
    }
}

#[inline(never)]
fn encode_ref7_loop<T: Serialize>(t: r7::MessageType, value: &T, dst: &mut Vec<u8>, n: usize) {
    for _ in 0..n {
        dst.clear();
        encode_ref7(t, ID, black_box(value), dst);
    }
}

#[inline(never)]
fn decode_ref7_loop<T: DeserializeOwned>(inputs: &mut [BytesMut], out: &mut Vec<(r7::Message, T)>) {
    for src in inputs {
        out.push(decode_ref7(src));
    }
}

/// Our frame of `message`.
fn frame_of(message: &Message) -> Vec<u8> {
    let mut dst = BytesMut::new();
    MessageCodec::new().encode_message(message, &mut dst).expect("encodes");
    dst.to_vec()
}

/// Our decoder, speaking to a generation-7 peer as it does with the deployed guests.
fn our_codec() -> MessageCodec {
    let mut codec = MessageCodec::new();
    codec.set_peer_generation(GENERATION);
    codec
}

/// What one run measures.
struct Run {
    implementation: String,
    op: String,
    t: MessageType,
    n: usize,
}

/// Checks the frames of both sides, then runs the measured loop.
fn run<R6, R7>(run: &Run, t6: r6::MessageType, t7: r7::MessageType) -> Result<(), String>
where
    R6: Serialize + DeserializeOwned + Debug,
    R7: Serialize + DeserializeOwned + Debug,
{
    let payload = sample(run.t);
    let message = Message::new(ID, payload.clone()).with_version(GENERATION);
    let ours = frame_of(&message);
    let n = run.n;
    match (run.implementation.as_str(), run.op.as_str()) {
        ("ours", "encode") => {
            let mut dst = BytesMut::with_capacity(ours.len() * 2);
            encode_ours(&mut our_codec(), &message, &mut dst, n);
            assert_eq!(dst[..], ours[..]);
        }
        ("ours", "decode") => {
            let mut inputs: Vec<BytesMut> = (0..n).map(|_| BytesMut::from(&ours[..])).collect();
            let mut out = Vec::with_capacity(n);
            decode_ours(&mut our_codec(), &mut inputs, &mut out);
            assert!(out.iter().all(|m| *m == message));
        }
        ("ref6", op) => {
            let theirs: R6 = support::reference::convert(&payload);
            let mut frame = Vec::new();
            encode_ref6(t6, ID, &theirs, &mut frame);
            if frame != ours {
                return Err(format!("0.6.14's frame differs\n ours {ours:02x?}\n ref6 {frame:02x?}"));
            }
            let expected = format!("{theirs:?}");
            let (_, read) = decode_ref6::<R6>(&mut ours.clone());
            assert_eq!(format!("{read:?}"), expected, "0.6.14 reads our frame to another value");
            if op == "encode" {
                let mut dst = Vec::with_capacity(frame.len() * 2);
                encode_ref6_loop(t6, &theirs, &mut dst, n);
                assert_eq!(dst, frame);
            } else {
                let mut inputs: Vec<Vec<u8>> = (0..n).map(|_| frame.clone()).collect();
                let mut out = Vec::with_capacity(n);
                decode_ref6_loop::<R6>(&mut inputs, &mut out);
                assert!(out.iter().all(|(_, p)| format!("{p:?}") == expected));
            }
        }
        ("ref7", op) => {
            // 0.7.13 stamps its own generation, 10: compared with our frame at v = 10.
            let ours = frame_of(&message.clone().with_version(10));
            let theirs: R7 = support::reference::convert(&payload);
            let mut frame = Vec::new();
            encode_ref7(t7, ID, &theirs, &mut frame);
            if frame != ours {
                return Err(format!("0.7.13's frame differs\n ours {ours:02x?}\n ref7 {frame:02x?}"));
            }
            let expected = format!("{theirs:?}");
            let (_, read) = decode_ref7::<R7>(&mut BytesMut::from(&ours[..]));
            assert_eq!(format!("{read:?}"), expected, "0.7.13 reads our frame to another value");
            if op == "encode" {
                let mut dst = Vec::with_capacity(frame.len() * 2);
                encode_ref7_loop(t7, &theirs, &mut dst, n);
                assert_eq!(dst, frame);
            } else {
                let mut inputs: Vec<BytesMut> = (0..n).map(|_| BytesMut::from(&frame[..])).collect();
                let mut out = Vec::with_capacity(n);
                decode_ref7_loop::<R7>(&mut inputs, &mut out);
                assert!(out.iter().all(|(_, p)| format!("{p:?}") == expected));
            }
        }
        (i, o) => panic!("the implementation is ours, ref6 or ref7 and the operation encode or decode, not {i} {o}"),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("list") {
        for t in gen7_types() {
            println!("{}", t.wire_name());
        }
        return ExitCode::SUCCESS;
    }
    let [implementation, op, name, n] = &args[..] else {
        eprintln!("usage: profile_types <ours|ref6|ref7> <encode|decode> <type> <N> | list");
        return ExitCode::from(2);
    };
    let t = MessageType::from_wire_name(name).unwrap_or_else(|| panic!("no message type {name}"));
    assert!(gen7_types().contains(&t), "{name} is not a type of generation {GENERATION}");
    let n = n.parse().expect("N is a number");
    let r = Run { implementation: implementation.clone(), op: op.clone(), t, n };
    match with_reference_types!(t, run(&r)) {
        Ok(()) => {
            println!("{implementation} {op} {name}: {n} times");
            ExitCode::SUCCESS
        }
        Err(difference) => {
            eprintln!("{name}: skipped, {difference}");
            ExitCode::from(3)
        }
    }
}
