//! A full session between a host and a scripted guest over real sockets with
//! `Framed`: Unix socket pair and TCP on 127.0.0.1. Both sides log every frame
//! they send and receive; the logs must match exactly (once, in order, on its id).

use agentwire::payload::bootstrap::GuestBootstrap;
use agentwire::payload::core::{
    CoreErrorKind, InitAck, InitResolved, Ping, Ready, ResolvedUser, Shutdown, Touch, Touched,
};
use agentwire::payload::exec::{ExecExited, ExecRequest, ExecStarted, ExecStderr, ExecStdin, ExecStdout};
use agentwire::payload::fs::{FsData, FsOp, FsRequest, FsResponse, FsResponseData};
use agentwire::payload::tcp::{TcpClose, TcpClosed, TcpConnect, TcpConnected, TcpData, TcpEof};
use agentwire::{
    EncodeError, FS_CHUNK_SIZE, Message, MessageCodec, MessageType, Payload, RawMessage, RawMessageCodec, TypeName,
};
use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{Encoder, Framed};

type Log = Vec<(u32, String)>;

fn entry(m: &Message) -> (u32, String) {
    (m.id, m.message_type().wire_name().to_string())
}

/// A stand-in guest: answers each request the way the protocol says.
struct Guest<S> {
    framed: Framed<S, MessageCodec>,
    sent: Log,
    received: Log,
    files: std::collections::HashMap<u64, Vec<u8>>,
    generation: u8,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Guest<S> {
    async fn send(&mut self, m: Message) {
        self.sent.push(entry(&m));
        self.framed.send(m).await.unwrap();
    }

    async fn run(mut self) -> (Log, Log) {
        let mut activity = 0u64;
        let mut writing: Option<(u32, u64)> = None;
        while let Some(item) = self.framed.next().await {
            let m = match item.unwrap() {
                Ok(m) => m,
                Err(rejected) => {
                    self.received.push((rejected.id, format!("rejected {}", rejected.type_name.as_ref().unwrap())));
                    let reply = rejected.error_reply();
                    self.send(reply).await;
                    continue;
                }
            };
            self.received.push(entry(&m));
            let id = m.id;
            match m.payload {
                Payload::Bootstrap(b) => {
                    assert_eq!(b.hostname.as_deref(), Some("sandbox"));
                    let ready = Ready {
                        boot_time_ns: 1,
                        init_time_ns: 2,
                        ready_time_ns: 3,
                        agent_version: "test".into(),
                        capabilities: None,
                    };
                    self.send(Message::new(0, ready).with_version(self.generation)).await;
                    let user = InitResolved { default_user: ResolvedUser { uid: 1000, gid: 1000 } };
                    self.send(Message::new(0, user).with_version(self.generation)).await;
                }
                Payload::InitAck(_) => {}
                Payload::ExecRequest(req) => {
                    assert_eq!(req.cmd, "cat");
                    self.send(Message::new(id, ExecStarted { pid: 4242 })).await;
                }
                Payload::ExecStdin(ExecStdin { data }) if data.is_empty() => {
                    self.send(Message::new(id, ExecStderr { data: Bytes::from_static(b"cat: done\n") })).await;
                    self.send(Message::new(id, ExecExited { code: 0 })).await;
                }
                Payload::ExecStdin(ExecStdin { data }) => self.send(Message::new(id, ExecStdout { data })).await,
                Payload::FsRequest(request) => match request.op {
                    FsOp::Write { handle, .. } => {
                        self.files.insert(handle, Vec::new());
                        writing = Some((id, handle));
                    }
                    FsOp::Read { handle, offset, len } => {
                        let file = Bytes::from(self.files[&handle].clone());
                        let end = len.map_or(file.len(), |l| (offset + l) as usize).min(file.len());
                        for chunk in file.slice(offset as usize..end).chunks(FS_CHUNK_SIZE) {
                            self.send(Message::new(id, FsData { data: file.slice_ref(chunk) })).await;
                        }
                        let handle = FsResponseData::Handle(handle);
                        self.send(Message::new(id, FsResponse::success(Some(handle)))).await;
                    }
                    other => panic!("guest got {other:?}"),
                },
                Payload::FsData(FsData { data }) => {
                    let (write_id, handle) = writing.expect("data of an open write");
                    assert_eq!(write_id, id, "data on the write's id");
                    if data.is_empty() {
                        writing = None;
                        self.send(Message::new(id, FsResponse::success(None))).await;
                    } else {
                        self.files.get_mut(&handle).unwrap().extend_from_slice(&data);
                    }
                }
                Payload::TcpConnect(c) => {
                    assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 5432));
                    self.send(Message::new(id, TcpConnected {})).await;
                }
                Payload::TcpData(TcpData { data }) => self.send(Message::new(id, TcpData { data })).await,
                Payload::TcpEof(_) => self.send(Message::new(id, TcpEof {})).await,
                Payload::TcpClose(_) => self.send(Message::new(id, TcpClosed {})).await,
                Payload::Ping(_) => self.send(Message::new(id, agentwire::payload::core::Pong {})).await,
                Payload::Touch(_) => {
                    activity += 1;
                    self.send(Message::new(id, Touched { activity_seq: activity })).await;
                }
                Payload::Shutdown(_) => break,
                other => panic!("guest got {other:?}"),
            }
        }
        (self.sent, self.received)
    }
}

/// The host side, logging what it sends and receives.
struct Host<S> {
    framed: Framed<S, MessageCodec>,
    sent: Log,
    received: Log,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Host<S> {
    async fn send(&mut self, m: Message) {
        self.sent.push(entry(&m));
        self.framed.send(m).await.unwrap();
    }

    async fn recv(&mut self) -> Message {
        let m = self.framed.next().await.expect("stream open").expect("stream ok").expect("frame ok");
        self.received.push(entry(&m));
        m
    }

    /// Writes a frame of a type generation 7 does not have.
    async fn send_unknown(&mut self, id: u32) {
        let raw = RawMessage {
            id,
            flags: agentwire::Flags::NONE,
            version: 7,
            type_name: TypeName::Unknown("core.future.thing".into()),
            payload: Bytes::from_static(b"\xa0"),
        };
        let mut wire = BytesMut::new();
        RawMessageCodec::new().encode(raw, &mut wire).unwrap();
        self.sent.push((id, "rejected core.future.thing".into()));
        self.framed.flush().await.unwrap();
        self.framed.get_mut().write_all(&wire).await.unwrap();
    }
}

fn file_of(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Starts a guest of `generation` on `guest_io` and a host on `host_io`, and
/// runs bootstrap and the ready handshake; returns the host and the guest's task.
async fn start<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    host_io: S,
    guest_io: S,
    generation: u8,
) -> (Host<S>, tokio::task::JoinHandle<(Log, Log)>) {
    let guest = Guest {
        framed: Framed::new(guest_io, MessageCodec::new()),
        sent: Vec::new(),
        received: Vec::new(),
        files: Default::default(),
        generation,
    };
    let guest = tokio::spawn(guest.run());
    let mut host = Host { framed: Framed::new(host_io, MessageCodec::new()), sent: Vec::new(), received: Vec::new() };
    host.send(Message::new(0, GuestBootstrap { hostname: Some("sandbox".into()), ..Default::default() })).await;
    let ready = host.recv().await;
    assert!(matches!(&ready.payload, Payload::Ready(r) if r.agent_version == "test"));
    assert_eq!(ready.version, generation);
    assert_eq!(host.framed.codec_mut().negotiate_with(&ready), Some(generation));
    assert!(matches!(host.recv().await.payload, Payload::InitResolved(_)));
    (host, guest)
}

async fn full_session<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(host_io: S, guest_io: S) {
    let (mut host, guest) = start(host_io, guest_io, 7).await;
    host.send(Message::new(0, InitAck::default())).await;

    // exec: stdin in, stdout and stderr out, exit.
    host.send(Message::new(1, ExecRequest::new("cat"))).await;
    assert_eq!(host.recv().await.payload, Payload::ExecStarted(ExecStarted { pid: 4242 }));
    for data in [&b"hello "[..], b"world\n", b""] {
        host.send(Message::new(1, ExecStdin { data: Bytes::copy_from_slice(data) })).await;
    }
    let mut stdout = Vec::new();
    loop {
        let m = host.recv().await;
        assert_eq!(m.id, 1);
        match m.payload {
            Payload::ExecStdout(o) => stdout.extend_from_slice(&o.data),
            Payload::ExecStderr(e) => assert_eq!(&e.data[..], b"cat: done\n"),
            Payload::ExecExited(e) => {
                assert_eq!(e.code, 0);
                assert!(m.flags.contains(agentwire::Flags::TERMINAL));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(stdout, b"hello world\n");

    // A 10 MiB file streamed in FS_CHUNK_SIZE chunks, then read back.
    let file = Bytes::from(file_of(10 * 1024 * 1024));
    let write = FsOp::Write { handle: 5, offset: 0, len: Some(file.len() as u64) };
    host.send(Message::new(2, FsRequest::new(write))).await;
    for chunk in file.chunks(FS_CHUNK_SIZE) {
        host.send(Message::new(2, FsData { data: file.slice_ref(chunk) })).await;
    }
    host.send(Message::new(2, FsData { data: Bytes::new() })).await;
    assert!(matches!(host.recv().await.payload, Payload::FsResponse(r) if r.ok));
    host.send(Message::new(3, FsRequest::new(FsOp::Read { handle: 5, offset: 0, len: None }))).await;
    let mut back = Vec::new();
    let mut chunks = 0;
    loop {
        let m = host.recv().await;
        assert_eq!(m.id, 3);
        match m.payload {
            Payload::FsData(d) => {
                assert!(d.data.len() <= FS_CHUNK_SIZE);
                chunks += 1;
                back.extend_from_slice(&d.data);
            }
            Payload::FsResponse(r) => {
                assert!(r.ok);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(chunks, 4);
    assert!(back == file, "file read back differs");

    // tcp: connect, data both ways, eof, close.
    host.send(Message::new(4, TcpConnect::new("127.0.0.1", 5432))).await;
    assert_eq!(host.recv().await.message_type(), MessageType::TcpConnected);
    host.send(Message::new(4, TcpData { data: Bytes::from_static(b"SELECT 1") })).await;
    assert_eq!(host.recv().await.payload, Payload::TcpData(TcpData { data: Bytes::from_static(b"SELECT 1") }));
    host.send(Message::new(4, TcpEof {})).await;
    assert_eq!(host.recv().await.message_type(), MessageType::TcpEof);
    host.send(Message::new(4, TcpClose {})).await;
    assert_eq!(host.recv().await.message_type(), MessageType::TcpClosed);

    // ping/pong and touch/touched answer on the request's id.
    host.send(Message::new(5, Ping {})).await;
    assert_eq!(host.recv().await.id, 5);
    host.send(Message::new(6, Touch {})).await;
    assert_eq!(host.recv().await.payload, Payload::Touched(Touched { activity_seq: 1 }));

    // An unknown type gets core.error on its id, and the session goes on.
    host.send_unknown(7).await;
    let err = host.recv().await;
    assert_eq!(err.id, 7);
    let Payload::Error(e) = err.payload else { panic!() };
    assert_eq!(e.kind, CoreErrorKind::UnsupportedMessageType);
    assert_eq!(e.offending_type.as_deref(), Some("core.future.thing"));
    host.send(Message::new(8, Ping {})).await;
    assert_eq!(host.recv().await.id, 8);

    host.send(Message::new(0, Shutdown)).await;
    let (guest_sent, guest_received) = guest.await.unwrap();
    assert_eq!(guest_received, host.sent, "host -> guest: every frame once, in order, on its id");
    assert_eq!(host.received, guest_sent, "guest -> host: every frame once, in order, on its id");
    // 2 handshake + 4 exec + 6 fs write + 1 fs read + 4 tcp + 2 ping/touch + 1 unknown + 1 ping + 1 shutdown
    assert_eq!(host.sent.len(), 22);
    assert_eq!(host.received.len(), 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_session_over_a_unix_socket_pair() {
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    full_session(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_session_over_tcp_loopback() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (host, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    full_session(host.unwrap(), accepted.unwrap().0).await;
}

#[tokio::test]
async fn the_send_gate_refuses_tcp_to_a_generation_3_peer_and_the_connection_keeps_working() {
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    let (mut host, guest) = start(a, b, 3).await;
    assert_eq!(host.framed.codec().negotiated_generation(), 3);

    let refused = host.framed.send(Message::new(1, TcpConnect::new("127.0.0.1", 5432))).await;
    match refused {
        Err(EncodeError::Generation(e)) => {
            assert_eq!(e.to_string(), "the peer speaks generation 3; core.tcp.connect needs 4");
        }
        other => panic!("{other:?}"),
    }
    // Nothing of the refused frame went out; the connection still works.
    host.send(Message::new(2, ExecRequest::new("cat"))).await;
    assert_eq!(host.recv().await.id, 2);
    host.send(Message::new(0, Shutdown)).await;
    let (_, guest_received) = guest.await.unwrap();
    assert_eq!(guest_received, host.sent);
}
