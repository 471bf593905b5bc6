//! A host and a guest agent talking the protocol over a real Unix socket, in one
//! process: bootstrap, the ready/init handshake, a real command run through
//! `core.exec.*`, a 16 MiB file streamed in and out through `core.fs.*`, 1,000
//! pings, an unknown type answered by `core.error`, shutdown.
//!
//! Prints a transcript and a summary, and exits 1 if any check fails.
//!
//! ```text
//! cargo run --release --example session
//! ```

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agentwire::payload::bootstrap::GuestBootstrap;
use agentwire::payload::core::{InitAck, InitResolved, Ping, Pong, Ready, ResolvedUser, Shutdown};
use agentwire::payload::exec::{
    ExecExited, ExecFailed, ExecFailureKind, ExecRequest, ExecStarted, ExecStderr, ExecStdout,
};
use agentwire::payload::fs::{FS_CHUNK_SIZE, FsData, FsOp, FsRequest, FsResponse};
use agentwire::{Flags, Message, MessageCodec, Payload, RawMessage, RawMessageCodec, TypeName};
use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio_util::codec::{Encoder, Framed};

const FILE_SIZE: usize = 16 * 1024 * 1024;
const PINGS: usize = 1_000;

/// The guest side: a small agent that serves exec, fs and ping.
async fn guest(io: UnixStream) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut framed = Framed::new(io, MessageCodec::new());
    let mut files: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut writing: Option<u64> = None;
    while let Some(item) = framed.next().await {
        let m = match item? {
            Ok(m) => m,
            Err(rejected) => {
                framed.send(rejected.error_reply()).await?;
                continue;
            }
        };
        let id = m.id;
        match m.payload {
            Payload::Bootstrap(_) => {
                let ready = Ready {
                    boot_time_ns: 1,
                    init_time_ns: 1,
                    ready_time_ns: 2,
                    agent_version: concat!("agentwire-example ", env!("CARGO_PKG_VERSION")).into(),
                };
                framed.send(Message::new(0, ready)).await?;
                framed.send(Message::new(0, InitResolved { default_user: ResolvedUser { uid: 0, gid: 0 } })).await?;
            }
            Payload::InitAck(_) => {}
            Payload::ExecRequest(req) => match tokio::process::Command::new(&req.cmd).args(&req.args).output().await {
                Ok(out) => {
                    framed.send(Message::new(id, ExecStarted { pid: 0 })).await?;
                    framed.send(Message::new(id, ExecStdout { data: out.stdout.into() })).await?;
                    if !out.stderr.is_empty() {
                        framed.send(Message::new(id, ExecStderr { data: out.stderr.into() })).await?;
                    }
                    framed.send(Message::new(id, ExecExited { code: out.status.code().unwrap_or(-1) })).await?;
                }
                Err(e) => {
                    let failed = ExecFailed {
                        kind: ExecFailureKind::NotFound,
                        errno: e.raw_os_error(),
                        errno_name: None,
                        message: e.to_string(),
                        stage: Some("spawn".into()),
                    };
                    framed.send(Message::new(id, failed)).await?;
                }
            },
            Payload::FsRequest(request) => match request.op {
                FsOp::Write { handle, .. } => {
                    files.insert(handle, Vec::with_capacity(FILE_SIZE));
                    writing = Some(handle);
                }
                FsOp::Read { handle, .. } => {
                    let file = Bytes::from(files.remove(&handle).unwrap_or_default());
                    for chunk in file.chunks(FS_CHUNK_SIZE) {
                        framed.feed(Message::new(id, FsData { data: file.slice_ref(chunk) })).await?;
                    }
                    framed.send(Message::new(id, FsResponse::success(None))).await?;
                }
                other => {
                    let failure = FsResponse::failure(format!("this example guest does not serve {other:?}"));
                    framed.send(Message::new(id, failure)).await?;
                }
            },
            Payload::FsData(FsData { data }) if data.is_empty() => {
                writing = None;
                framed.send(Message::new(id, FsResponse::success(None))).await?;
            }
            Payload::FsData(FsData { data }) => {
                if let Some(file) = writing.and_then(|h| files.get_mut(&h)) {
                    file.extend_from_slice(&data);
                }
            }
            Payload::Ping(_) => framed.send(Message::new(id, Pong {})).await?,
            Payload::Shutdown(_) => return Ok(()),
            other => {
                let reply = agentwire::payload::core::CoreError {
                    kind: agentwire::payload::core::CoreErrorKind::InvalidSession,
                    message: format!("this example guest does not serve {}", other.message_type()),
                    offending_type: Some(other.message_type().wire_name().into()),
                };
                framed.send(Message::new(id, reply)).await?;
            }
        }
    }
    Ok(())
}

fn file_contents() -> Bytes {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..FILE_SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// FNV-1a, enough to compare two 16 MiB buffers in a printed line.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

struct Checks {
    failed: usize,
}

impl Checks {
    fn check(&mut self, ok: bool, what: &str) {
        println!("  [{}] {what}", if ok { "ok" } else { "FAILED" });
        self.failed += usize::from(!ok);
    }
}

fn line(dir: &str, m: &Message) {
    let summary = match &m.payload {
        Payload::ExecStdout(o) => format!("{} bytes: {:?}", o.data.len(), String::from_utf8_lossy(&o.data).trim_end()),
        Payload::FsData(d) => format!("{} bytes", d.data.len()),
        Payload::Bootstrap(b) => format!("hostname={:?}", b.hostname.as_deref().unwrap_or("")),
        Payload::Error(e) => format!("{} {:?}", e.kind, e.message),
        other => format!("{other:?}"),
    };
    println!("{dir} id={:<3} {:<15} {:<20} {summary}", m.id, m.flags.to_string(), m.message_type().wire_name());
}

#[tokio::main]
async fn main() -> ExitCode {
    let (host_io, guest_io) = UnixStream::pair().expect("socket pair");
    let guest = tokio::spawn(guest(guest_io));
    let mut host = Framed::new(host_io, MessageCodec::new());
    let mut checks = Checks { failed: 0 };
    let mut sent = (0usize, 0usize);
    let mut received = (0usize, 0usize);

    macro_rules! send {
        ($m:expr) => {{
            let m: Message = $m;
            sent = (sent.0 + 1, sent.1 + m.wire_len().expect("sized"));
            if !matches!(m.payload, Payload::FsData(_) | Payload::Ping(_)) {
                line("host  ->", &m);
            }
            host.send(m).await.expect("send");
        }};
    }
    macro_rules! recv {
        () => {{
            let m = host.next().await.expect("stream open").expect("stream intact").expect("a valid frame");
            received = (received.0 + 1, received.1 + m.wire_len().expect("sized"));
            m
        }};
    }

    println!("agentwire {}: host and guest over a Unix socket pair\n", env!("CARGO_PKG_VERSION"));

    send!(Message::new(0, GuestBootstrap { hostname: Some("sandbox".into()), ..Default::default() }));
    let ready = recv!();
    line("<- guest", &ready);
    host.codec_mut().negotiate_with(&ready);
    let resolved = recv!();
    line("<- guest", &resolved);
    send!(Message::new(0, InitAck {}));

    send!(Message::new(1, ExecRequest { args: vec!["-sr".into()], ..ExecRequest::new("uname") }));
    let mut stdout = Vec::new();
    let exit_code = loop {
        let m = recv!();
        line("<- guest", &m);
        match m.payload {
            Payload::ExecStdout(o) => stdout.extend_from_slice(&o.data),
            Payload::ExecExited(e) => break Some(e.code),
            Payload::ExecFailed(_) => break None,
            _ => {}
        }
    };

    let file = file_contents();
    let started = Instant::now();
    send!(Message::new(2, FsRequest { op: FsOp::Write { handle: 1, offset: 0, len: Some(FILE_SIZE as u64) } }));
    for chunk in file.chunks(FS_CHUNK_SIZE) {
        send!(Message::new(2, FsData { data: file.slice_ref(chunk) }));
    }
    send!(Message::new(2, FsData { data: Bytes::new() }));
    let written = recv!();
    line("<- guest", &written);
    send!(Message::new(3, FsRequest { op: FsOp::Read { handle: 1, offset: 0, len: None } }));
    let mut back = Vec::with_capacity(FILE_SIZE);
    loop {
        let m = recv!();
        match m.payload {
            Payload::FsData(d) => back.extend_from_slice(&d.data),
            _ => {
                line("<- guest", &m);
                break;
            }
        }
    }
    let transfer = started.elapsed();

    let mut rtts = Vec::with_capacity(PINGS);
    for i in 0..PINGS {
        let t = Instant::now();
        send!(Message::new(100 + i as u32, Ping {}));
        let pong = recv!();
        rtts.push(t.elapsed());
        if pong.id != 100 + i as u32 {
            checks.check(false, "pong on the ping's id");
        }
    }
    println!("host  -> {PINGS} x core.ping, guest answers each with core.pong");
    rtts.sort();

    // A type from a newer generation: the guest answers core.error and carries on.
    let unknown = RawMessage {
        id: 7,
        flags: Flags::NONE,
        version: 7,
        type_name: TypeName::Unknown("core.future.thing".into()),
        payload: Bytes::from_static(b"\xa0"),
    };
    let mut wire = BytesMut::new();
    RawMessageCodec::new().encode(unknown, &mut wire).expect("encodes");
    println!("host  -> id=7   -               core.future.thing    (a type generation 7 does not have)");
    host.get_mut().write_all(&wire).await.expect("write");
    sent = (sent.0 + 1, sent.1 + wire.len());
    let error = recv!();
    line("<- guest", &error);

    send!(Message::new(0, Shutdown));
    let guest_result = tokio::time::timeout(Duration::from_secs(10), guest).await;

    println!("\nchecks:");
    checks.check(ready.version == agentwire::PROTOCOL_VERSION, "guest speaks generation 7");
    checks.check(matches!(resolved.payload, Payload::InitResolved(_)), "init resolved");
    checks.check(exit_code == Some(0) && !stdout.is_empty(), "uname ran in the guest and exited 0");
    checks.check(matches!(&written.payload, Payload::FsResponse(r) if r.ok), "16 MiB written");
    checks.check(checksum(&back) == checksum(&file) && back.len() == FILE_SIZE, "16 MiB read back identical");
    checks.check(rtts.len() == PINGS, "1,000 pings answered");
    checks.check(
        matches!(&error.payload, Payload::Error(e) if e.kind.as_str() == "unsupported_message_type") && error.id == 7,
        "unknown type answered by core.error on its id",
    );
    checks.check(matches!(guest_result, Ok(Ok(Ok(())))), "guest shut down cleanly");

    let mb_per_s = (2 * FILE_SIZE) as f64 / 1e6 / transfer.as_secs_f64();
    let pct = |p: usize| rtts[(rtts.len() * p / 100).min(rtts.len() - 1)];
    println!("\nsummary:");
    println!("  host -> guest: {} frames, {} bytes", sent.0, sent.1);
    println!("  guest -> host: {} frames, {} bytes", received.0, received.1);
    println!(
        "  file: 16 MiB written and read back in {transfer:.2?}: {mb_per_s:.0} MB/s; checksum {:016x}",
        checksum(&back)
    );
    println!("  ping round trip over {PINGS}: p50 {:.1?}, p99 {:.1?}", pct(50), pct(99));
    if checks.failed == 0 {
        println!("\nall checks held");
        ExitCode::SUCCESS
    } else {
        println!("\n{} check(s) FAILED", checks.failed);
        ExitCode::FAILURE
    }
}
