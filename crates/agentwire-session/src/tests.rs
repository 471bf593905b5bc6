//! The state machine driven with byte slices, as a transport would.

use std::time::{Duration, Instant};

use agentwire::payload::bootstrap::GuestBootstrap;
use agentwire::payload::core::{
    ClockSync, CoreErrorKind, InitAck, Ping, Ready, RelayClientDisconnected, ResolvedUser, Touch,
};
use agentwire::payload::exec::{ExecExited, ExecRequest, ExecSignal, ExecStdin, ExecStdout};
use agentwire::payload::fs::FsData;
use agentwire::payload::tcp::{TcpConnect, TcpData};
use agentwire::relay::{AGENT_RELAY_ID_RANGE_STEP, RelayHandshake};
use agentwire::{Frame, Message, MessageCodec, MessageType, Payload};
use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::{Config, Connection, ConnectionError, Event, Phase, SendError};

fn wire(messages: &[Message]) -> Vec<u8> {
    let mut codec = MessageCodec::new();
    let mut out = BytesMut::new();
    for m in messages {
        codec.encode(m.clone(), &mut out).unwrap();
    }
    out.to_vec()
}

fn frames(bytes: Bytes) -> Vec<Message> {
    let mut codec = MessageCodec::new();
    let mut buf = BytesMut::from(&bytes[..]);
    let mut out = Vec::new();
    while let Some(item) = codec.decode(&mut buf).unwrap() {
        out.push(item.unwrap());
    }
    assert!(buf.is_empty(), "a partial frame was written");
    out
}

fn types(bytes: Bytes) -> Vec<(u32, MessageType)> {
    frames(bytes).iter().map(|m| (m.id, m.message_type())).collect()
}

fn events(c: &mut Connection) -> Vec<Event> {
    std::iter::from_fn(|| c.poll_event()).collect()
}

fn user() -> ResolvedUser {
    ResolvedUser { uid: 1000, gid: 1000 }
}

/// An agent taken through the start-up exchange with a host of generation `v`.
fn ready_agent(config: Config, v: u8) -> Connection {
    let now = Instant::now();
    let mut agent = Connection::agent(config, now);
    agent.handle_input(&wire(&[Message::new(0, GuestBootstrap::default()).with_version(v)]), now).unwrap();
    assert!(matches!(events(&mut agent)[..], [Event::Bootstrap(_)]));
    agent.init_resolved(user()).unwrap();
    agent.handle_input(&wire(&[Message::new(0, InitAck::default())]), now).unwrap();
    assert_eq!(events(&mut agent), vec![Event::InitAcked]);
    agent.ready(Ready::default()).unwrap();
    assert!(agent.is_established());
    agent.poll_transmit();
    agent
}

#[test]
fn agent_lifecycle_in_the_deployed_order() {
    let now = Instant::now();
    let mut agent = Connection::agent(Config::default(), now);
    assert!(agent.poll_transmit().is_empty(), "the agent speaks only after the bootstrap");
    let boot = wire(&[Message::new(0, GuestBootstrap { hostname: Some("vm".into()), ..Default::default() })]);
    // One byte at a time: nothing happens until the frame is whole.
    for b in &boot[..boot.len() - 1] {
        agent.handle_input(&[*b], now).unwrap();
        assert!(agent.poll_event().is_none());
    }
    agent.handle_input(&boot[boot.len() - 1..], now).unwrap();
    match &events(&mut agent)[..] {
        [Event::Bootstrap(b)] => assert_eq!(b.hostname.as_deref(), Some("vm")),
        other => panic!("{other:?}"),
    }
    assert_eq!(agent.phase(), Phase::Resolving);
    agent.init_resolved(user()).unwrap();
    assert_eq!(types(agent.poll_transmit()), vec![(0, MessageType::InitResolved)]);
    // ready cannot go out before the ack
    assert!(matches!(agent.ready(Ready::default()), Err(SendError::NotEstablished(MessageType::Ready))));
    agent.handle_input(&wire(&[Message::new(0, InitAck::default())]), now).unwrap();
    assert_eq!(events(&mut agent), vec![Event::InitAcked]);
    agent.ready(Ready { agent_version: "t".into(), ..Default::default() }).unwrap();
    assert_eq!(types(agent.poll_transmit()), vec![(0, MessageType::Ready)]);
    assert!(agent.is_established());
    assert_eq!(agent.poll_timeout(), None, "no handshake deadline once ready");
}

#[test]
fn agent_startup_failure_is_reported_on_id_0() {
    let now = Instant::now();
    let mut agent = Connection::agent(Config::default(), now);
    let err = agent.handle_input(&wire(&[Message::new(1, Ping {})]), now).unwrap_err();
    assert!(matches!(err, ConnectionError::Startup(ref s) if s.contains("core.ping")), "{err}");
    let sent = frames(agent.poll_transmit());
    match &sent[..] {
        [Message { id: 0, payload: Payload::Error(e), .. }] => {
            assert_eq!(e.kind.as_str(), "initialization_failed");
            assert!(e.message.starts_with("bootstrap failed: "), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(agent.phase(), Phase::Closed);
    // A bootstrap older than generation 7 fails the same way.
    let mut agent = Connection::agent(Config::default(), now);
    let old = wire(&[Message::new(0, GuestBootstrap::default()).with_version(6)]);
    assert!(agent.handle_input(&old, now).is_err());
    // Anything but the ack after init.resolved, too.
    let mut agent = Connection::agent(Config::default(), now);
    agent.handle_input(&wire(&[Message::new(0, GuestBootstrap::default())]), now).unwrap();
    agent.init_resolved(user()).unwrap();
    let err = agent.handle_input(&wire(&[Message::new(5, Ping {})]), now).unwrap_err();
    assert!(err.to_string().contains("core.init.ack"), "{err}");
}

#[test]
fn agent_handshake_times_out() {
    let now = Instant::now();
    let config = Config { handshake_timeout: Duration::from_secs(60), ..Config::default() };
    let mut agent = Connection::agent(config, now);
    assert_eq!(agent.poll_timeout(), Some(now + Duration::from_secs(60)));
    agent.handle_timeout(now + Duration::from_secs(59)).unwrap();
    let err = agent.handle_timeout(now + Duration::from_secs(60)).unwrap_err();
    assert_eq!(err.to_string(), "no core.bootstrap within 60s");
    assert_eq!(agent.phase(), Phase::Closed);
    assert!(matches!(&frames(agent.poll_transmit())[..], [Message { id: 0, payload: Payload::Error(_), .. }]));
}

#[test]
fn idle_timeout_counts_from_the_last_input() {
    let now = Instant::now();
    let config = Config { idle_timeout: Some(Duration::from_secs(5)), ..Config::default() };
    let mut agent = ready_agent(config, 7);
    let later = now + Duration::from_secs(4);
    agent.handle_input(&wire(&[Message::new(3, Ping {})]), later).unwrap();
    agent.handle_timeout(now + Duration::from_secs(8)).unwrap();
    assert!(matches!(agent.handle_timeout(later + Duration::from_secs(5)), Err(ConnectionError::Idle(_))));
}

#[test]
fn agent_answers_what_it_owes() {
    let mut agent = ready_agent(Config::default(), 7);
    let now = Instant::now();
    let input = wire(&[
        Message::new(3, Ping {}),
        Message::new(4, Touch {}),
        Message::new(9, ExecStdin { data: Bytes::from_static(b"x") }),
        Message::new(9, ExecSignal { signal: 9 }),
        Message::new(10, FsData { data: Bytes::from_static(b"x") }),
        Message::new(11, TcpData { data: Bytes::from_static(b"x") }),
        Message::new(12, ExecExited { code: 0 }),
    ]);
    agent.handle_input(&input, now).unwrap();
    let sent = frames(agent.poll_transmit());
    let got: Vec<_> = sent.iter().map(|m| (m.id, m.message_type())).collect();
    assert_eq!(
        got,
        vec![
            (3, MessageType::Pong),
            (4, MessageType::Touched),
            (10, MessageType::FsResponse),
            (11, MessageType::TcpFailed),
            (12, MessageType::Error),
        ],
        "stdin and signal for an unknown id are ignored, as by the deployed agent"
    );
    let ignored = events(&mut agent).into_iter().filter(|e| matches!(e, Event::Ignored(_))).count();
    assert_eq!(ignored, 2);
}

#[test]
fn sessions_open_route_and_close() {
    let mut agent = ready_agent(Config::default(), 7);
    let now = Instant::now();
    let req = ExecRequest::new("cat");
    agent.handle_input(&wire(&[Message::new(7, req.clone())]), now).unwrap();
    assert!(matches!(&events(&mut agent)[..], [Event::Request(m)] if m.id == 7));
    // A second request on an open id, and input of another family, are refused.
    let again = wire(&[Message::new(7, req.clone()), Message::new(7, TcpData { data: Bytes::new() })]);
    agent.handle_input(&again, now).unwrap();
    let refused = frames(agent.poll_transmit());
    assert_eq!(refused.len(), 2);
    for m in &refused {
        match &m.payload {
            Payload::Error(e) => assert_eq!(e.kind, CoreErrorKind::InvalidSession),
            other => panic!("{other:?}"),
        }
    }
    agent.handle_input(&wire(&[Message::new(7, ExecStdin { data: Bytes::from_static(b"abc") })]), now).unwrap();
    assert!(matches!(&events(&mut agent)[..], [Event::Input(m)] if m.id == 7));
    assert_eq!(agent.sessions().get(7).unwrap().buffered, 3 + crate::table::FRAME_CHARGE);
    agent.consumed(7, 3 + crate::table::FRAME_CHARGE);
    agent.send(7, ExecStdout { data: Bytes::from_static(b"abc") }).unwrap();
    agent.send(7, ExecExited { code: 0 }).unwrap();
    assert!(agent.sessions().is_empty(), "the TERMINAL frame closed the session");
    assert!(matches!(agent.send(7, ExecStdout { data: Bytes::new() }), Err(SendError::NoSession { id: 7, .. })));
    // The id may be used again.
    agent.handle_input(&wire(&[Message::new(7, req)]), now).unwrap();
    assert!(matches!(&events(&mut agent)[..], [Event::Request(_)]));
}

#[test]
fn session_limit_refuses_one_request() {
    let config = Config { max_sessions: 2, ..Config::default() };
    let mut agent = ready_agent(config, 7);
    let req = || ExecRequest::new("true");
    let input = wire(&[Message::new(1, req()), Message::new(2, req()), Message::new(3, req())]);
    agent.handle_input(&input, Instant::now()).unwrap();
    assert_eq!(events(&mut agent).len(), 2);
    assert_eq!(types(agent.poll_transmit()), vec![(3, MessageType::Error)]);
}

#[test]
fn negotiated_generation_gates_both_directions() {
    // A generation-3 host: core.ping (gen 6) from it is refused by the decoder,
    // and core.error (gen 5) cannot be sent back, so nothing is answered.
    let mut agent = ready_agent(Config::default(), 7);
    assert_eq!(agent.negotiated(), 7);
    let now = Instant::now();
    let mut old = Connection::agent(Config::default(), now);
    old.handle_input(&wire(&[Message::new(0, GuestBootstrap::default()).with_version(7)]), now).unwrap();
    assert_eq!(old.negotiated(), 7);
    // The host side: a generation-3 agent's ready limits what the host sends.
    let mut host = Connection::host(Config::default(), GuestBootstrap::default(), now);
    host.poll_transmit();
    host.handle_input(&wire(&[Message::new(0, Ready::default()).with_version(3)]), now).unwrap();
    assert!(host.is_established());
    assert_eq!(host.negotiated(), 3);
    let err = host.open(TcpConnect::new("db", 5432)).unwrap_err();
    assert_eq!(err.to_string(), "the peer speaks generation 3; core.tcp.connect needs 4");
    assert!(host.poll_transmit().is_empty(), "nothing was sent");
    // And frames above generation 3 from that agent are rejected, not delivered.
    host.handle_input(&wire(&[Message::new(1, agentwire::payload::core::Pong {})]), now).unwrap();
    assert!(
        matches!(&events(&mut host)[..], [Event::Ready { .. }, Event::Rejected(r)] if r.kind == agentwire::RejectKind::UnsupportedProtocolGeneration)
    );
    // The agent side of the same rule.
    agent.handle_input(&wire(&[Message::new(3, Ping {})]), now).unwrap();
    assert_eq!(types(agent.poll_transmit()), vec![(3, MessageType::Pong)]);
}

#[test]
fn host_lifecycle_acknowledges_then_waits_for_ready() {
    let now = Instant::now();
    let mut host = Connection::host(Config::default(), GuestBootstrap::default(), now);
    assert_eq!(types(host.poll_transmit()), vec![(0, MessageType::Bootstrap)]);
    assert!(matches!(host.open(Ping {}), Err(SendError::NotEstablished(_))));
    let resolved = agentwire::payload::core::InitResolved { default_user: user() };
    host.handle_input(&wire(&[Message::new(0, resolved)]), now).unwrap();
    assert_eq!(types(host.poll_transmit()), vec![(0, MessageType::InitAck)]);
    assert_eq!(events(&mut host), vec![Event::InitResolved(user())]);
    host.handle_input(&wire(&[Message::new(0, Ready::default())]), now).unwrap();
    assert!(matches!(&events(&mut host)[..], [Event::Ready { negotiated: 10, peer_generation: 10, .. }]));
    let id = host.open(Ping {}).unwrap();
    assert_eq!(id, 1);
    assert_eq!(host.open(Ping {}).unwrap(), 2, "a fresh id for every operation");
    host.send(0, ClockSync { unix_time_nanos: 1 }).unwrap();
    assert!(matches!(host.send(9, ExecStdin { data: Bytes::new() }), Err(SendError::NoSession { id: 9, .. })));
    assert!(matches!(host.send(0, ExecExited { code: 1 }), Err(SendError::Direction { .. })));
    // Replies are routed; the TERMINAL one closes; a late one is ignored.
    host.poll_transmit();
    let pong = wire(&[Message::new(1, agentwire::payload::core::Pong {})]);
    host.handle_input(&pong, now).unwrap();
    assert!(matches!(&events(&mut host)[..], [Event::Reply(m)] if m.id == 1));
    host.handle_input(&pong, now).unwrap();
    assert!(matches!(&events(&mut host)[..], [Event::Ignored(m)] if m.id == 1));
}

#[test]
fn host_reports_the_agents_init_failure() {
    let now = Instant::now();
    let mut host = Connection::host(Config::default(), GuestBootstrap::default(), now);
    let e = agentwire::payload::core::CoreError::new(CoreErrorKind::InitializationFailed, "init failed: no such user");
    let err = host.handle_input(&wire(&[Message::new(0, e)]), now).unwrap_err();
    assert!(matches!(err, ConnectionError::InitFailed(ref s) if s.contains("no such user")), "{err}");
}

#[test]
fn host_through_a_relay_uses_its_range() {
    let now = Instant::now();
    let mut host = Connection::host_via_relay(Config::default(), now);
    assert!(host.poll_transmit().is_empty(), "a relay client sends no bootstrap");
    let mut ready = BytesMut::new();
    MessageCodec::new().encode(Message::new(0, Ready::default()), &mut ready).unwrap();
    let ready_frame = agentwire::FrameCodec::new().decode(&mut ready).unwrap().unwrap().unwrap();
    let prologue = RelayHandshake::for_client(2, Frame::clone(&ready_frame)).unwrap();
    let mut bytes = BytesMut::new();
    prologue.encode(&mut bytes).unwrap();
    bytes.extend_from_slice(&wire(&[Message::new(2 * AGENT_RELAY_ID_RANGE_STEP, agentwire::payload::core::Pong {})]));
    host.handle_input(&bytes[..5], now).unwrap();
    assert!(!host.is_established());
    host.handle_input(&bytes[5..], now).unwrap();
    assert!(host.is_established());
    assert_eq!(host.id_range(), 2 * AGENT_RELAY_ID_RANGE_STEP + 1..3 * AGENT_RELAY_ID_RANGE_STEP);
    assert_eq!(host.open(Ping {}).unwrap(), 2 * AGENT_RELAY_ID_RANGE_STEP + 1);
    assert!(matches!(&events(&mut host)[..], [Event::Ready { .. }, Event::Ignored(_)]));
}

#[test]
fn buffered_data_holds_back_input() {
    let c = crate::table::FRAME_CHARGE + 8;
    let config = Config { max_buffered_per_session: c + 2, max_buffered: 2 * c - 1, ..Config::default() };
    let mut agent = ready_agent(config, 7);
    let now = Instant::now();
    let req = ExecRequest::new("cat");
    agent.handle_input(&wire(&[Message::new(1, req.clone()), Message::new(2, req)]), now).unwrap();
    let chunk = |id| Message::new(id, ExecStdin { data: Bytes::from_static(b"12345678") });
    agent.handle_input(&wire(&[chunk(1)]), now).unwrap();
    assert!(agent.wants_input());
    agent.handle_input(&wire(&[chunk(1)]), now).unwrap();
    assert!(!agent.wants_input(), "one session holds two frames");
    agent.consumed(1, 2 * c);
    assert!(agent.wants_input());
    agent.handle_input(&wire(&[chunk(1), chunk(2)]), now).unwrap();
    assert!(!agent.wants_input(), "all sessions together hold two frames");
    agent.consumed(2, c);
    assert!(agent.wants_input());
}

#[test]
fn client_disconnect_closes_its_sessions_only() {
    let mut agent = ready_agent(Config::default(), 7);
    let now = Instant::now();
    let step = AGENT_RELAY_ID_RANGE_STEP;
    let req = || ExecRequest::new("sleep");
    let input = wire(&[Message::new(1, req()), Message::new(step - 1, req()), Message::new(step + 1, req())]);
    agent.handle_input(&input, now).unwrap();
    events(&mut agent);
    let gone = RelayClientDisconnected { id_start: 0, id_end_exclusive: step, incarnation: None };
    agent.handle_input(&wire(&[Message::new(0, gone)]), now).unwrap();
    assert_eq!(events(&mut agent), vec![Event::ClientDisconnected { ids: 0..step, sessions: vec![1, step - 1] }]);
    assert_eq!(agent.sessions().ids().collect::<Vec<_>>(), vec![step + 1]);
    // A range that is not a slot's is refused and closes nothing.
    let odd = RelayClientDisconnected { id_start: step, id_end_exclusive: step + 5, incarnation: None };
    agent.handle_input(&wire(&[Message::new(0, odd)]), now).unwrap();
    assert_eq!(types(agent.poll_transmit()), vec![(0, MessageType::Error)]);
    assert_eq!(agent.sessions().len(), 1);
}

#[test]
fn a_broken_stream_closes_the_connection() {
    let mut agent = ready_agent(Config::default(), 7);
    let err = agent.handle_input(&[0, 0, 0, 2, 0, 0], Instant::now()).unwrap_err();
    assert!(matches!(err, ConnectionError::Stream(_)));
    assert_eq!(agent.phase(), Phase::Closed);
    assert!(!agent.wants_input());
    assert!(matches!(agent.send(0, agentwire::payload::core::Pong {}), Err(SendError::Closed)));
}

#[test]
fn a_bad_frame_gets_an_error_and_the_stream_goes_on() {
    let mut agent = ready_agent(Config::default(), 7);
    let mut input = agentwire_test_frame(5, 0, "demo.unknown");
    input.extend(wire(&[Message::new(6, Ping {})]));
    agent.handle_input(&input, Instant::now()).unwrap();
    let sent = frames(agent.poll_transmit());
    assert_eq!(sent.len(), 2);
    match &sent[0].payload {
        Payload::Error(e) => assert_eq!(e.kind, CoreErrorKind::UnsupportedMessageType),
        other => panic!("{other:?}"),
    }
    assert_eq!(sent[1].message_type(), MessageType::Pong);
}

/// A frame of any type name with an empty-map payload, written by hand.
fn agentwire_test_frame(id: u32, flags: u8, t: &str) -> Vec<u8> {
    let mut body = vec![0xa3, 0x61, b'v', 0x07, 0x61, b't', 0x60 | t.len() as u8];
    body.extend_from_slice(t.as_bytes());
    body.extend_from_slice(&[0x61, b'p', 0x41, 0xa0]);
    let mut f = ((body.len() + 5) as u32).to_be_bytes().to_vec();
    f.extend(id.to_be_bytes());
    f.push(flags);
    f.extend(body);
    f
}

#[test]
fn raw_requests_and_the_tap() {
    let now = Instant::now();
    let mut host = Connection::host(Config::default(), GuestBootstrap::default(), now);
    host.set_tap(true);
    let ready = wire(&[Message::new(0, Ready::default())]);
    // Half a frame is not tapped yet; the whole one is, once.
    host.handle_input(&ready[..3], now).unwrap();
    assert!(host.take_tapped().is_empty());
    host.handle_input(&ready[3..], now).unwrap();
    assert_eq!(&host.take_tapped()[..], &ready[..]);
    host.poll_transmit();
    let id = host.open_raw("demo.unknown", Bytes::from_static(b"\xa0")).unwrap();
    let sent = host.poll_transmit();
    let raw = agentwire::RawMessageCodec::new().decode(&mut BytesMut::from(&sent[..])).unwrap().unwrap().unwrap();
    assert_eq!((raw.id, raw.type_name.as_str()), (id, "demo.unknown"));
    assert!(host.sessions().contains(id));
}

#[test]
fn a_host_discards_unknown_frames_on_the_runtime_id_quietly() {
    let now = Instant::now();
    let mut host = Connection::host(Config::default(), GuestBootstrap::default(), now);
    host.handle_input(&wire(&[Message::new(0, Ready::default())]), now).unwrap();
    events(&mut host);
    let credit = agentwire_test_frame(u32::MAX, 0, "core.workload.transport.credit");
    let other = agentwire_test_frame(5, 0, "core.workload.transport.credit");
    host.handle_input(&credit, now).unwrap();
    assert!(events(&mut host).is_empty(), "discarded without an event");
    host.handle_input(&other, now).unwrap();
    assert!(matches!(&events(&mut host)[..], [Event::Rejected(_)]), "on another id it is reported");
}

#[test]
fn an_ack_before_init_resolved_counts_once_the_user_is_resolved() {
    let now = Instant::now();
    let mut agent = Connection::agent(Config::default(), now);
    let early = wire(&[Message::new(0, GuestBootstrap::default()), Message::new(0, InitAck::default())]);
    agent.handle_input(&early, now).unwrap();
    assert!(matches!(&events(&mut agent)[..], [Event::Bootstrap(_)]));
    agent.init_resolved(user()).unwrap();
    assert_eq!(events(&mut agent), vec![Event::InitAcked]);
    agent.ready(Ready::default()).unwrap();
    assert!(agent.is_established());
    // A second early ack is not one: it is a startup failure.
    let mut agent = Connection::agent(Config::default(), now);
    let twice = wire(&[
        Message::new(0, GuestBootstrap::default()),
        Message::new(0, InitAck::default()),
        Message::new(0, InitAck::default()),
    ]);
    assert!(agent.handle_input(&twice, now).is_err());
}

#[test]
fn the_tap_skips_an_oversized_frame_as_the_decoder_does() {
    let now = Instant::now();
    let config = Config { max_frame_len: 128, ..Config::default() };
    let mut host = Connection::host(config, GuestBootstrap::default(), now);
    host.set_tap(true);
    let ready = wire(&[Message::new(0, Ready::default())]);
    // A frame claiming 1,000 bytes, delivered in pieces, then a valid one.
    let mut big = 1_000u32.to_be_bytes().to_vec();
    big.extend(std::iter::repeat_n(0u8, 1_000));
    for piece in big.chunks(100) {
        host.handle_input(piece, now).unwrap();
        assert!(host.tap_held() <= 100, "the tap holds no more than a piece");
    }
    host.handle_input(&ready, now).unwrap();
    assert_eq!(&host.take_tapped()[..], &ready[..], "only the valid frame is tapped");
}

/// A host connected straight to an agent whose `core.ready` is `ready`.
fn ready_host(ready: Ready) -> Connection {
    let now = Instant::now();
    let mut host = Connection::host(Config::default(), GuestBootstrap::default(), now);
    host.handle_input(&wire(&[Message::new(0, ready)]), now).unwrap();
    let _ = events(&mut host);
    let _ = host.poll_transmit();
    host
}

#[test]
fn host_holds_input_beyond_a_metering_agents_credit_until_it_grows() {
    use agentwire::payload::core::ReadyCapabilities;
    use agentwire::payload::workload::TransportCredit;
    let mut ready = Ready::default();
    ready.set_capabilities(ReadyCapabilities { workload_transport_barrier_version: Some(2), ..Default::default() });
    let mut host = ready_host(ready);
    assert!(host.input_meter().is_enforcing());
    let id = host.open(ExecRequest::new("cat")).unwrap();
    // 400 stdin frames: the initial grant takes 256 data frames; the rest wait, in order.
    for i in 0..400u32 {
        host.send(id, ExecStdin { data: Bytes::from(i.to_be_bytes().to_vec()) }).unwrap();
    }
    let out = frames(host.poll_transmit());
    assert_eq!(out.len(), 1 + 256);
    assert!(host.pending_transmit() > 0);
    // The agent refunds 100 frames: 44 wait still.
    let mut credit = TransportCredit::INITIAL;
    credit.bulk_frames += 100;
    credit.bulk_bytes += 100 * 64;
    let now = Instant::now();
    host.handle_input(&wire(&[Message::new(u32::MAX, credit)]), now).unwrap();
    assert!(events(&mut host).is_empty(), "the credit is the connection's own business");
    let out = frames(host.poll_transmit());
    assert_eq!(out.len(), 100);
    assert_eq!(out[0].payload, Payload::from(ExecStdin { data: Bytes::from(256u32.to_be_bytes().to_vec()) }));
    credit.bulk_frames += 100;
    host.handle_input(&wire(&[Message::new(u32::MAX, credit)]), now).unwrap();
    assert_eq!(frames(host.poll_transmit()).len(), 44);
    assert_eq!(host.pending_transmit(), 0);
}

#[test]
fn host_does_not_meter_an_agent_that_grants_no_credit() {
    let mut host = ready_host(Ready::default());
    assert!(!host.input_meter().is_enforcing());
    let id = host.open(ExecRequest::new("cat")).unwrap();
    for _ in 0..300 {
        host.send(id, ExecStdin { data: Bytes::from_static(b"x") }).unwrap();
    }
    assert_eq!(frames(host.poll_transmit()).len(), 301);
}

#[test]
fn agent_answers_workload_and_root_disk_requests_it_cannot_serve() {
    use agentwire::payload::core::WorkloadFailureDisposition;
    use agentwire::payload::workload::{RootDiskGrow, WorkloadFreeze};
    let mut agent = ready_agent(Config::default(), 10);
    let _ = agent.poll_transmit();
    let freeze = WorkloadFreeze { attempt_id: "a1".into(), ..Default::default() };
    agent
        .handle_input(
            &wire(&[Message::new(5, freeze), Message::new(6, RootDiskGrow { size_bytes: 4096 })]),
            Instant::now(),
        )
        .unwrap();
    let out = frames(agent.poll_transmit());
    let [Message { id: 5, payload: Payload::Error(e1), .. }, Message { id: 6, payload: Payload::Error(e2), .. }] =
        &out[..]
    else {
        panic!("{out:?}")
    };
    assert_eq!(e1.kind, CoreErrorKind::CapabilityUnavailable);
    let failure = e1.workload_failure.as_ref().unwrap();
    assert_eq!((failure.attempt_id.as_str(), &failure.disposition), ("a1", &WorkloadFailureDisposition::Unavailable));
    assert_eq!(e2.kind, CoreErrorKind::CapabilityUnavailable);
    assert_eq!(e2.offending_type.as_deref(), Some("core.root_disk.grow"));
}

#[test]
fn bulk_frames_route_to_fs_and_tcp_sessions_and_unknown_ids_get_the_familys_failure() {
    use agentwire::payload::bulk::{BulkCancel, BulkCancelReason, BulkFlow, BulkKind, BulkRecord};
    use agentwire::payload::fs::{FsOp, FsRequest};
    let mut agent = ready_agent(Config::default(), 10);
    let _ = agent.poll_transmit();
    let now = Instant::now();
    let op = FsOp::Write { handle: 1, offset: 0, len: None };
    let record = BulkRecord::new(BulkKind::Filesystem, BulkFlow::HostToGuest, 0, Bytes::from_static(b"data"));
    agent.handle_input(&wire(&[Message::new(7, FsRequest::new(op)), Message::new(7, record.clone())]), now).unwrap();
    assert!(
        matches!(&events(&mut agent)[..], [Event::Request(_), Event::Input(m)] if m.payload == Payload::from(record.clone()))
    );
    assert_eq!(agent.sessions().get(7).unwrap().buffered, 4 + crate::table::FRAME_CHARGE);
    // On an id with nothing open: a cancel and the fs failure; a host's cancel gets the failure only.
    let cancel = BulkCancel { kind: BulkKind::Tcp, reason: BulkCancelReason::CallerCancelled, message: "stop".into() };
    agent.handle_input(&wire(&[Message::new(8, record), Message::new(9, cancel)]), now).unwrap();
    assert_eq!(
        types(agent.poll_transmit()),
        vec![(8, MessageType::BulkCancel), (8, MessageType::FsResponse), (9, MessageType::TcpFailed)]
    );
}

#[test]
fn exec_control_frames_longer_than_4096_bytes_are_refused() {
    use agentwire::payload::exec::ExecOutputAck;
    let mut agent = ready_agent(Config::default(), 10);
    let _ = agent.poll_transmit();
    let now = Instant::now();
    agent.handle_input(&wire(&[Message::new(4, ExecRequest::new("true"))]), now).unwrap();
    assert!(matches!(&events(&mut agent)[..], [Event::Request(_)]));
    // The same ack, plain and padded with an unknown key past 4096 bytes on the wire.
    let plain = wire(&[Message::new(4, ExecOutputAck { consumed: 10 })]);
    let mut padded_payload = b"\xa2\x68consumed\x0a\x61x\x59\x10\x00".to_vec();
    padded_payload.extend_from_slice(&[0; 4096]);
    let frame = agentwire::RawMessage {
        id: 4,
        flags: agentwire::Flags::NONE,
        version: 10,
        type_name: agentwire::TypeName::from_wire_name("core.exec.output.ack"),
        payload: Bytes::from(padded_payload),
    };
    let mut padded = BytesMut::new();
    agentwire::RawMessageCodec::new().encode(frame, &mut padded).unwrap();
    agent.handle_input(&plain, now).unwrap();
    agent.handle_input(&padded, now).unwrap();
    assert!(matches!(&events(&mut agent)[..], [Event::Input(m)] if m.message_type() == MessageType::ExecOutputAck));
    let out = frames(agent.poll_transmit());
    assert!(
        matches!(&out[..], [Message { id: 4, payload: Payload::Error(e), .. }] if e.kind == CoreErrorKind::InvalidPayload),
        "{out:?}"
    );
}

/// `data` in a new pipe (write end closed), as piped data claiming `claimed` bytes.
#[cfg(target_os = "linux")]
fn in_a_pipe(data: &[u8], claimed: usize) -> agentwire::PipedData {
    let (reader, writer) = rustix::pipe::pipe().unwrap();
    let mut rest = data;
    while !rest.is_empty() {
        rest = &rest[rustix::io::write(&writer, rest).unwrap()..];
    }
    agentwire::PipedData::new(reader, claimed)
}

#[cfg(target_os = "linux")]
#[test]
fn a_piped_record_goes_out_under_the_session_rules_and_a_short_pipe_ends_the_connection() {
    use crate::bulk::BulkSender;
    use agentwire::payload::bulk::{BulkFlow, BulkKind, BulkRecord};
    use agentwire::payload::fs::{FsOp, FsRequest};
    let mut agent = ready_agent(Config::default(), 10);
    let now = Instant::now();
    let read = FsRequest { op: FsOp::Read { handle: 1, offset: 0, len: None }, bulk: None };
    agent.handle_input(&wire(&[Message::new(5, read)]), now).unwrap();
    assert!(matches!(&events(&mut agent)[..], [Event::Request(m)] if m.id == 5));
    let mut tx = BulkSender::new(BulkKind::Filesystem, BulkFlow::GuestToHost, 1 << 20, 1 << 20);
    // On a session that is not open: refused, nothing queued.
    let stray = tx.clone().piped_record(in_a_pipe(b"xyz", 3)).unwrap();
    assert!(matches!(agent.send_piped(6, stray), Err(SendError::NoSession { id: 6, .. })));
    assert_eq!(agent.pending_transmit(), 0);
    // On the open one: the same record as one of those bytes.
    agent.send_piped(5, tx.piped_record(in_a_pipe(b"hello", 5)).unwrap()).unwrap();
    let sent = frames(agent.poll_transmit());
    let expected = BulkRecord::new(BulkKind::Filesystem, BulkFlow::GuestToHost, 0, Bytes::from_static(b"hello"));
    assert_eq!(sent, vec![Message::new(5, expected)]);
    // A pipe short of its length: what came before goes out, then nothing.
    agent.send(5, FsData { data: Bytes::from_static(b"before") }).unwrap();
    agent.send_piped(5, tx.piped_record(in_a_pipe(b"ab", 4)).unwrap()).unwrap();
    let before = agent.poll_transmit();
    let whole = wire(&[Message::new(5, FsData { data: Bytes::from_static(b"before") })]);
    assert_eq!(before.len(), whole.len() + agentwire::codec::BULK_WIRE_HEADER, "the record's headers, cut short");
    assert_eq!(before[..whole.len()], whole[..]);
    assert_eq!(agent.phase(), Phase::Closed);
    assert!(agent.poll_transmit().is_empty());
}
