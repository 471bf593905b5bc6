//! The deployed reference, `microsandbox-protocol`, in its two published
//! versions: 0.6.14 (`ref6`, generation 7) and 0.7.13 (`ref7`, generation 10),
//! driven through its own public API exactly as an application does:
//!
//! - encode: `Message::with_payload` (the payload to CBOR, in a `Vec`) and then
//!   `codec::encode_to_buf` (the envelope to CBOR, in another `Vec`, copied
//!   after the header into the output);
//! - decode: the reference's streaming decoder on a read buffer holding the
//!   frame (0.6.14: `codec::try_decode_from_buf` on a `Vec`; 0.7.13:
//!   `codec::try_decode_from_bytes` on a `BytesMut`), then `Message::payload`
//!   for the typed value.
//!
//! Shared by `benches/codec.rs` and `examples/profile_types.rs`, so that the
//! criterion medians and the callgrind counts measure the same calls.
//! Values are carried over from agentwire's types to the reference's through
//! the serde data model (`ciborium::Value`), outside any measurement.
#![allow(dead_code)] // each user takes what it needs

use bytes::BytesMut;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The reference's payload types of generation 7 under one path per version
/// (`r6::exec::ExecRequest`, ...), with `unit::Shutdown = ()`: the reference has
/// no type for the payload of `core.shutdown` and writes CBOR null.
pub mod r6 {
    pub use ref6::message::{Message, MessageType};
    #[allow(unused_imports)] // not every user names every module
    pub use ref6::{bootstrap, core, exec, fs, tcp};
    pub mod unit {
        pub type Shutdown = ();
    }
}

/// As [`r6`], for 0.7.13.
pub mod r7 {
    pub use ref7::message::{Message, MessageType};
    #[allow(unused_imports)] // not every user names every module
    pub use ref7::{bootstrap, core, exec, fs, tcp};
    pub mod unit {
        pub type Shutdown = ();
    }
}

/// `value` (one of agentwire's payloads) as the equal value of the reference's type `R`.
pub fn convert<R: DeserializeOwned>(value: &impl Serialize) -> R {
    ciborium::Value::serialized(value)
        .expect("a Value of our payload")
        .deserialized::<R>()
        .unwrap_or_else(|e| panic!("the reference cannot hold {}: {e}", std::any::type_name::<R>()))
}

/// 0.6.14's frame of `payload`, appended to `dst` (its `v` is 7).
#[inline]
pub fn encode_ref6<T: Serialize>(t: r6::MessageType, id: u32, payload: &T, dst: &mut Vec<u8>) {
    let m = r6::Message::with_payload(t, id, payload).expect("0.6.14 encodes the payload");
    ref6::codec::encode_to_buf(&m, dst).expect("0.6.14 frames the message");
}

/// 0.7.13's frame of `payload`, appended to `dst` (its `v` is 10).
#[inline]
pub fn encode_ref7<T: Serialize>(t: r7::MessageType, id: u32, payload: &T, dst: &mut Vec<u8>) {
    let m = r7::Message::with_payload(t, id, payload).expect("0.7.13 encodes the payload");
    ref7::codec::encode_to_buf(&m, dst).expect("0.7.13 frames the message");
}

/// 0.6.14 reads the first frame of `src` (consuming it) and its payload as `T`.
#[inline]
pub fn decode_ref6<T: DeserializeOwned>(src: &mut Vec<u8>) -> (r6::Message, T) {
    let m = ref6::codec::try_decode_from_buf(src).expect("0.6.14 reads the frame").expect("a whole frame");
    let p = m.payload::<T>().expect("0.6.14 reads the payload");
    (m, p)
}

/// 0.7.13 reads the first frame of `src` (consuming it) and its payload as `T`.
#[inline]
pub fn decode_ref7<T: DeserializeOwned>(src: &mut BytesMut) -> (r7::Message, T) {
    let m = ref7::codec::try_decode_from_bytes(src).expect("0.7.13 reads the frame").expect("a whole frame");
    let p = m.payload::<T>().expect("0.7.13 reads the payload");
    (m, p)
}

/// Calls `$f::<R6, R7>($ctx, r6 type, r7 type)` with the reference's payload
/// types (`R6`, `R7`) and message types of agentwire's generation-7 `MessageType` `$t`.
#[macro_export]
macro_rules! with_reference_types {
    ($t:expr, $f:ident ( $ctx:expr )) => {
        $crate::with_reference_types!(@list $t, $f ( $ctx ) ;
            (Ready, Ready, core::Ready),
            (InitResolved, InitResolved, core::InitResolved),
            (InitAck, InitAck, core::InitAck),
            (Shutdown, Shutdown, unit::Shutdown),
            (RelayClientDisconnected, RelayClientDisconnected, core::RelayClientDisconnected),
            (ClockSync, ClockSync, core::ClockSync),
            (Ping, Ping, core::Ping),
            (Pong, Pong, core::Pong),
            (Touch, Touch, core::Touch),
            (Touched, Touched, core::Touched),
            (Error, CoreError, core::CoreError),
            (ExecRequest, ExecRequest, exec::ExecRequest),
            (ExecStarted, ExecStarted, exec::ExecStarted),
            (ExecStdin, ExecStdin, exec::ExecStdin),
            (ExecStdinError, ExecStdinError, exec::ExecStdinError),
            (ExecStdout, ExecStdout, exec::ExecStdout),
            (ExecStderr, ExecStderr, exec::ExecStderr),
            (ExecExited, ExecExited, exec::ExecExited),
            (ExecFailed, ExecFailed, exec::ExecFailed),
            (ExecResize, ExecResize, exec::ExecResize),
            (ExecSignal, ExecSignal, exec::ExecSignal),
            (FsRequest, FsRequest, fs::FsRequest),
            (FsResponse, FsResponse, fs::FsResponse),
            (FsData, FsData, fs::FsData),
            (TcpConnect, TcpConnect, tcp::TcpConnect),
            (TcpConnected, TcpConnected, tcp::TcpConnected),
            (TcpData, TcpData, tcp::TcpData),
            (TcpEof, TcpEof, tcp::TcpEof),
            (TcpClose, TcpClose, tcp::TcpClose),
            (TcpClosed, TcpClosed, tcp::TcpClosed),
            (TcpFailed, TcpFailed, tcp::TcpFailed),
            (Bootstrap, Bootstrap, bootstrap::GuestBootstrap),
        )
    };
    (@list $t:expr, $f:ident ( $ctx:expr ) ; $( ($ours:ident, $theirs:ident, $m:ident :: $ty:ident) ),* $(,)?) => {
        match $t {
            $(
                agentwire::MessageType::$ours => $f::<
                    $crate::support::reference::r6::$m::$ty,
                    $crate::support::reference::r7::$m::$ty,
                >(
                    $ctx,
                    $crate::support::reference::r6::MessageType::$theirs,
                    $crate::support::reference::r7::MessageType::$theirs,
                ),
            )*
            other => panic!("{other} is not a type of generation 7"),
        }
    };
}
