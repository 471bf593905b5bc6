//! Execution flow control (generation 10, spec section 8) in our agent,
//! driven by a raw framed host over a Unix socket: each test starts its own
//! `agentwire agent` in a temporary directory and bootstraps it with an
//! `ExecLimits` policy. Output is bounded by the allowance and acknowledged,
//! the exit waits for the last acknowledgement, admission stops at
//! `max_executions`, stdin is bounded and acknowledged; requests of an older
//! generation (or on a connection without a policy) keep the legacy behaviour.

mod common;

use common::RunningAgent as Agent;

use std::time::Duration;

use agentwire::payload::bootstrap::GuestBootstrap;
use agentwire::payload::core::{InitAck, Ready};
use agentwire::payload::exec::{
    EXEC_OUTPUT_EVENT_OVERHEAD, ExecFailureKind, ExecLimits, ExecOutputAck, ExecRequest, ExecSignal, ExecStdin,
};
use agentwire::{Message, MessageCodec, Payload};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

type Wire = Framed<UnixStream, MessageCodec>;

const OVERHEAD: u64 = EXEC_OUTPUT_EVENT_OVERHEAD;

/// A connection after the start-up exchange, its bootstrap carrying
/// `limits`; and the agent's `core.ready`.
async fn connect(agent: &Agent, limits: Option<ExecLimits>) -> (Wire, Ready) {
    let mut wire = Framed::new(UnixStream::connect(&agent.socket).await.unwrap(), MessageCodec::new());
    let bootstrap = GuestBootstrap { exec_limits: limits, ..Default::default() };
    wire.send(Message::new(0, bootstrap)).await.unwrap();
    assert_eq!(next(&mut wire).await.message_type().wire_name(), "core.init.resolved");
    wire.send(Message::new(0, InitAck::default())).await.unwrap();
    match next(&mut wire).await.payload {
        Payload::Ready(ready) => (wire, ready),
        other => panic!("expected core.ready: {other:?}"),
    }
}

/// The next frame, within 20 s.
async fn next(wire: &mut Wire) -> Message {
    maybe_next(wire, Duration::from_secs(20)).await.expect("a frame within 20 s")
}

/// The next frame if one comes within `wait`.
async fn maybe_next(wire: &mut Wire, wait: Duration) -> Option<Message> {
    let item = tokio::time::timeout(wait, wire.next()).await.ok()?;
    Some(item.expect("the connection is open").expect("the stream is intact").expect("the frame decodes"))
}

/// `sh -c SCRIPT`, sent on `id` with envelope generation `v`.
async fn start(wire: &mut Wire, id: u32, v: u8, script: &str, tty: bool) {
    let mut req = ExecRequest::new("sh");
    req.args = vec!["-c".into(), script.into()];
    req.tty = tty;
    wire.send(Message::new(id, req).with_version(v)).await.unwrap();
}

/// Waits for `core.exec.started` on `id`.
async fn started(wire: &mut Wire, id: u32) {
    let m = next(wire).await;
    assert!(m.id == id && matches!(m.payload, Payload::ExecStarted(_)), "expected core.exec.started on {id}: {m:?}");
}

async fn ack(wire: &mut Wire, id: u32, consumed: u64) {
    wire.send(Message::new(id, ExecOutputAck { consumed })).await.unwrap();
}

async fn stdin(wire: &mut Wire, id: u32, data: &[u8]) {
    wire.send(Message::new(id, ExecStdin { data: Bytes::copy_from_slice(data) })).await.unwrap();
}

/// The output data of a frame, if it is output.
fn output(m: &Message) -> Option<&Bytes> {
    match &m.payload {
        Payload::ExecStdout(d) => Some(&d.data),
        Payload::ExecStderr(d) => Some(&d.data),
        _ => None,
    }
}

/// A small policy: 256 KiB of output allowance in 16 KiB chunks, stdin in
/// 1 KiB chunks with 4 KiB in flight, two executions.
fn policy() -> ExecLimits {
    ExecLimits {
        max_executions: 2,
        input_limit: 4096,
        output_limit: 256 * 1024,
        stdin_chunk_size: 1024,
        output_chunk_size: 16 * 1024,
    }
}

/// What a host has seen of one controlled execution's output.
#[derive(Debug, Default)]
struct Seen {
    bytes: u64,
    /// Σ (len + 256) over the output chunks.
    charge: u64,
    /// The last acknowledgement sent.
    acked: u64,
}

impl Seen {
    /// Counts an output frame of at most `chunk` bytes; its charge must fit in `limit`.
    fn take(&mut self, data: &Bytes, chunk: u64, limit: u64) {
        assert!(!data.is_empty() && data.len() as u64 <= chunk, "a chunk of {} bytes (at most {chunk})", data.len());
        self.bytes += data.len() as u64;
        self.charge += data.len() as u64 + OVERHEAD;
        assert!(
            self.charge - self.acked <= limit,
            "{} of charge unacknowledged, above the output limit {limit}",
            self.charge - self.acked
        );
    }
}

/// With no acknowledgement, the agent publishes output until the allowance
/// is used up (within one chunk's charge of `limit`) and then stops.
async fn until_the_allowance_is_used(wire: &mut Wire, id: u32, limit: u64, chunk: u64, seen: &mut Seen) {
    while seen.charge + chunk + OVERHEAD <= limit {
        let m = next(wire).await;
        assert_eq!(m.id, id, "{m:?}");
        let data = output(&m).unwrap_or_else(|| panic!("output before the allowance is used: {m:?}"));
        seen.take(data, chunk, limit);
    }
    // Then nothing more: not another chunk, not the exit.
    while let Some(m) = maybe_next(wire, Duration::from_secs(1)).await {
        let data = output(&m).unwrap_or_else(|| panic!("nothing but output may come while unacknowledged: {m:?}"));
        seen.take(data, chunk, limit);
    }
    assert!(seen.charge <= limit && seen.charge > limit - chunk - OVERHEAD, "stopped at a charge of {}", seen.charge);
}

#[tokio::test]
async fn ready_advertises_the_bootstraps_policy_and_nothing_without_one() {
    let agent = Agent::start("flow-ready");
    let (_wire, ready) = connect(&agent, Some(policy())).await;
    assert_eq!(ready.capabilities().exec_limits, Some(policy()));
    let (_wire, ready) = connect(&agent, None).await;
    assert_eq!(ready.capabilities().exec_limits, None);
    assert!(ready.capabilities.is_none(), "a legacy agent advertises nothing: {ready:?}");
}

#[tokio::test]
async fn an_invalid_policy_is_a_startup_failure() {
    let agent = Agent::start("flow-invalid");
    let mut wire = Framed::new(UnixStream::connect(&agent.socket).await.unwrap(), MessageCodec::new());
    // No room for a chunk's 256-byte overhead in the allowance.
    let exec_limits = Some(ExecLimits { output_limit: 16 * 1024, ..policy() });
    let bootstrap = GuestBootstrap { exec_limits, ..Default::default() };
    wire.send(Message::new(0, bootstrap)).await.unwrap();
    let m = next(&mut wire).await;
    match &m.payload {
        Payload::Error(e) => {
            assert_eq!((m.id, e.kind.as_str()), (0, "initialization_failed"), "{m:?}");
            assert!(e.message.starts_with("bootstrap failed: ") && e.message.contains("exec limits"), "{e:?}");
        }
        other => panic!("expected core.error initialization_failed, got {other:?}"),
    }
    // The connection goes no further: no core.init.resolved, no core.ready.
    wire.send(Message::new(0, InitAck::default())).await.unwrap();
    if let Some(m) = maybe_next(&mut wire, Duration::from_secs(1)).await {
        panic!("nothing after the startup failure: {m:?}");
    }
    // Another connection with a valid policy is served.
    let (_wire, ready) = connect(&agent, Some(policy())).await;
    assert_eq!(ready.capabilities().exec_limits, Some(policy()));
}

/// 4 MiB on stdout and stderr together: the agent stops at the allowance,
/// goes on as it is acknowledged, never has more than the limit out, and
/// reports the exit only once the last chunk is acknowledged.
#[tokio::test]
async fn output_stops_at_the_allowance_and_the_exit_waits_for_the_last_ack() {
    let agent = Agent::start("flow-output");
    let limits = policy();
    let (limit, chunk) = (u64::from(limits.output_limit), u64::from(limits.output_chunk_size));
    let (mut wire, _) = connect(&agent, Some(limits)).await;
    let total = 4u64 << 20;
    let script = "head -c 2097152 /dev/zero >&2 & head -c 2097152 /dev/zero; wait; exit 3";
    start(&mut wire, 1, 10, script, false).await;
    started(&mut wire, 1).await;
    let mut seen = Seen::default();
    until_the_allowance_is_used(&mut wire, 1, limit, chunk, &mut seen).await;
    assert!(seen.bytes < total / 8, "{} bytes came without an acknowledgement", seen.bytes);
    eprintln!("without acknowledgements: {} bytes, a charge of {} of {limit}", seen.bytes, seen.charge);

    // Acknowledged as a host that acks when half the allowance is out.
    let mut frames = 0u32;
    while seen.bytes < total {
        if seen.charge - seen.acked >= limit / 2 {
            seen.acked = seen.charge;
            ack(&mut wire, 1, seen.acked).await;
        }
        let m = next(&mut wire).await;
        assert_eq!(m.id, 1, "{m:?}");
        let data = output(&m).unwrap_or_else(|| panic!("output until all {total} bytes: {m:?}"));
        seen.take(data, chunk, limit);
        frames += 1;
    }
    assert_eq!(seen.bytes, total);
    eprintln!("4 MiB in {frames} frames after the first stop");
    assert!(seen.acked < seen.charge, "the last chunks are not acknowledged yet");

    // Unacknowledged output holds the exit back; invalid acks change nothing,
    // and a partial one is not enough.
    for consumed in [None, Some(seen.charge + 1), Some(seen.acked.saturating_sub(1)), Some(seen.charge - 1)] {
        if let Some(c) = consumed {
            ack(&mut wire, 1, c).await;
        }
        if let Some(m) = maybe_next(&mut wire, Duration::from_millis(700)).await {
            panic!(
                "no exit before the last acknowledgement (after an ack of {consumed:?}, {} sent): {m:?}",
                seen.charge
            );
        }
    }
    ack(&mut wire, 1, seen.charge).await;
    let m = next(&mut wire).await;
    match m.payload {
        Payload::ExecExited(e) if m.id == 1 => assert_eq!(e.code, 3),
        other => panic!("expected the exit after the last ack: {other:?}"),
    }
}

/// At `max_executions` held (running, or exited with output not yet
/// acknowledged) a controlled request is refused; a legacy one is not.
#[tokio::test]
async fn admission_stops_at_max_executions() {
    let agent = Agent::start("flow-admission");
    let (mut wire, _) = connect(&agent, Some(policy())).await;
    start(&mut wire, 1, 10, "exec sleep 30", false).await;
    started(&mut wire, 1).await;
    start(&mut wire, 2, 10, "echo hi", false).await;
    started(&mut wire, 2).await;
    let m = next(&mut wire).await;
    assert_eq!((m.id, output(&m).map(|d| d.to_vec())), (2, Some(b"hi\n".to_vec())), "{m:?}");
    // Its output is not acknowledged: it holds its slot after its exit.
    assert!(maybe_next(&mut wire, Duration::from_millis(500)).await.is_none(), "no exit before the ack");

    start(&mut wire, 3, 10, "true", false).await;
    let m = next(&mut wire).await;
    match &m.payload {
        Payload::ExecFailed(f) if m.id == 3 => {
            assert_eq!(f.kind, ExecFailureKind::ResourceLimit, "{f:?}");
            assert_eq!(f.stage.as_deref(), Some("execution_admission"), "{f:?}");
            assert_eq!((f.errno, f.errno_name.as_deref()), (None, None), "{f:?}");
        }
        other => panic!("expected core.exec.failed on 3: {other:?}"),
    }

    // A generation-7 request is legacy: admitted, and its exit needs no ack.
    start(&mut wire, 4, 7, "echo legacy", false).await;
    started(&mut wire, 4).await;
    let m = next(&mut wire).await;
    assert_eq!((m.id, output(&m).map(|d| d.to_vec())), (4, Some(b"legacy\n".to_vec())), "{m:?}");
    let m = next(&mut wire).await;
    assert!(m.id == 4 && matches!(m.payload, Payload::ExecExited(ref e) if e.code == 0), "{m:?}");

    // The acknowledgement releases the exit, and with it the slot.
    ack(&mut wire, 2, 3 + OVERHEAD).await;
    let m = next(&mut wire).await;
    assert!(m.id == 2 && matches!(m.payload, Payload::ExecExited(ref e) if e.code == 0), "{m:?}");
    start(&mut wire, 5, 10, "exit 4", false).await;
    started(&mut wire, 5).await;
    let m = next(&mut wire).await;
    assert!(m.id == 5 && matches!(m.payload, Payload::ExecExited(ref e) if e.code == 4), "{m:?}");

    wire.send(Message::new(1, ExecSignal { signal: 9 })).await.unwrap();
    let m = next(&mut wire).await;
    assert!(m.id == 1 && matches!(m.payload, Payload::ExecExited(ref e) if e.code == -1), "{m:?}");
}

/// The stdin errors of a controlled execution: `(errno, errno_name, message)`.
fn stdin_error(m: &Message) -> Option<(Option<i32>, Option<String>, String)> {
    match &m.payload {
        Payload::ExecStdinError(e) => Some((e.errno, e.errno_name.clone(), e.message.clone())),
        _ => None,
    }
}

fn stdin_ack(m: &Message) -> Option<u64> {
    match &m.payload {
        Payload::ExecStdinAck(a) => Some(a.consumed),
        _ => None,
    }
}

/// Stdin acknowledgements are cumulative and come as the child reads; a
/// chunk above `stdin_chunk_size`, or data after the end, is dropped and
/// answered with `core.exec.stdin.error` (errno null), and the execution goes on.
#[tokio::test]
async fn stdin_is_acknowledged_cumulatively_and_oversized_or_late_stdin_is_refused() {
    let agent = Agent::start("flow-stdin");
    let limits = policy();
    let (mut wire, _) = connect(&agent, Some(limits)).await;
    // Reads all its stdin, then stays until killed (so that the stdin after the end finds it running).
    start(&mut wire, 1, 10, "cat >/dev/null; exec sleep 30", false).await;
    started(&mut wire, 1).await;

    stdin(&mut wire, 1, &vec![b'x'; limits.stdin_chunk_size as usize + 1]).await;
    let m = next(&mut wire).await;
    let (errno, errno_name, message) = stdin_error(&m).unwrap_or_else(|| panic!("expected a stdin error: {m:?}"));
    assert_eq!((m.id, errno, errno_name), (1, None, None), "{message}");
    assert!(message.contains("stdin_chunk_size"), "{message}");

    let (mut sent, mut last) = (0u64, 0u64);
    let mut acks = Vec::new();
    for i in 0..10u8 {
        stdin(&mut wire, 1, &[i; 1000]).await;
        sent += 1000;
        while last < sent {
            let m = next(&mut wire).await;
            let consumed = stdin_ack(&m).unwrap_or_else(|| panic!("expected a stdin ack: {m:?}"));
            assert!(m.id == 1 && consumed > last && consumed <= sent, "ack {consumed} after {last}, {sent} sent");
            last = consumed;
            acks.push(consumed);
        }
    }
    assert_eq!(last, 10_000, "{acks:?}");
    eprintln!("stdin acks: {acks:?}");

    // The end, then data after it: refused.
    stdin(&mut wire, 1, b"").await;
    stdin(&mut wire, 1, b"late").await;
    let m = next(&mut wire).await;
    let (errno, errno_name, message) = stdin_error(&m).unwrap_or_else(|| panic!("expected a stdin error: {m:?}"));
    assert_eq!((m.id, errno, errno_name), (1, None, None), "{message}");
    // Nothing changed the count: no ack.
    assert!(maybe_next(&mut wire, Duration::from_millis(500)).await.is_none());
    wire.send(Message::new(1, ExecSignal { signal: 9 })).await.unwrap();
    let m = next(&mut wire).await;
    assert!(m.id == 1 && matches!(m.payload, Payload::ExecExited(ref e) if e.code == -1), "{m:?}");
}

/// A child that does not read: its pipe fills, then at most `input_limit`
/// bytes wait in the agent, and a frame beyond it gets `core.exec.stdin.error`.
#[tokio::test]
async fn stdin_beyond_the_input_limit_is_refused() {
    let agent = Agent::start("flow-input-limit");
    let limits = policy();
    let (mut wire, _) = connect(&agent, Some(limits)).await;
    start(&mut wire, 1, 10, "exec sleep 30", false).await;
    started(&mut wire, 1).await;
    // Fill the pipe, one chunk at a time, until the acknowledgements stop.
    let (mut sent, mut consumed) = (0u64, 0u64);
    for _ in 0..4096 {
        stdin(&mut wire, 1, &[7; 1000]).await;
        sent += 1000;
        while consumed < sent {
            let Some(m) = maybe_next(&mut wire, Duration::from_millis(1000)).await else { break };
            let c = stdin_ack(&m).unwrap_or_else(|| panic!("expected a stdin ack: {m:?}"));
            assert!(c > consumed && c <= sent, "ack {c} after {consumed}, {sent} sent");
            consumed = c;
        }
        if consumed < sent {
            break;
        }
    }
    assert!(consumed < sent, "the pipe never filled: {sent} bytes written");
    eprintln!("the pipe took {consumed} bytes");
    // Up to input_limit may wait: accepted without a word.
    let limit = u64::from(limits.input_limit);
    while sent - consumed + 1000 <= limit {
        stdin(&mut wire, 1, &[8; 1000]).await;
        sent += 1000;
    }
    if let Some(m) = maybe_next(&mut wire, Duration::from_secs(1)).await {
        panic!("stdin within the input limit ({} waiting) is accepted quietly: {m:?}", sent - consumed);
    }
    // One more is too much.
    stdin(&mut wire, 1, &[9; 1000]).await;
    let m = next(&mut wire).await;
    let (errno, errno_name, message) = stdin_error(&m).unwrap_or_else(|| panic!("expected a stdin error: {m:?}"));
    assert_eq!((m.id, errno, errno_name), (1, None, None), "{message}");
    assert!(message.contains("4096"), "{message}");
    wire.send(Message::new(1, ExecSignal { signal: 9 })).await.unwrap();
    // The write in progress may fail (EPIPE) as the command dies, before its exit.
    loop {
        let m = next(&mut wire).await;
        match m.payload {
            Payload::ExecExited(e) if m.id == 1 => break assert_eq!(e.code, -1),
            Payload::ExecStdinError(_) | Payload::ExecStdinAck(_) if m.id == 1 => {}
            other => panic!("{other:?}"),
        }
    }
}

/// Legacy executions next to the policy: a generation-7 request on a
/// connection with one, and a generation-10 request on a connection
/// without one, get 4096-byte chunks, no acknowledgements, stdin beyond
/// the policy's chunk size, and their exit without any ack.
#[tokio::test]
async fn legacy_requests_need_no_acknowledgements() {
    let agent = Agent::start("flow-legacy");
    let small = ExecLimits { output_limit: 65536, ..policy() };
    let (mut with_policy, _) = connect(&agent, Some(small)).await;
    let (mut without, _) = connect(&agent, None).await;
    for (wire, v) in [(&mut with_policy, 7u8), (&mut without, 10)] {
        start(wire, 1, v, "cat; head -c 300000 /dev/zero", false).await;
        started(wire, 1).await;
        stdin(wire, 1, &[b'i'; 5000]).await;
        stdin(wire, 1, b"").await;
        let (mut bytes, mut frames) = (0usize, 0u32);
        loop {
            let m = next(wire).await;
            assert_eq!(m.id, 1, "{m:?}");
            match &m.payload {
                Payload::ExecStdout(d) => {
                    assert!(!d.data.is_empty() && d.data.len() <= 4096, "a legacy chunk of {}", d.data.len());
                    bytes += d.data.len();
                    frames += 1;
                }
                Payload::ExecExited(e) => {
                    assert_eq!(e.code, 0);
                    break;
                }
                other => panic!("v {v}: nothing else for a legacy execution: {other:?}"),
            }
        }
        assert_eq!(bytes, 305_000, "v {v}");
        eprintln!("v {v}: {bytes} bytes in {frames} frames");
    }
}

/// A terminal's output is controlled the same way.
#[tokio::test]
async fn terminal_output_is_controlled_too() {
    let agent = Agent::start("flow-pty");
    let limits = ExecLimits { output_limit: 65536, output_chunk_size: 4096, ..policy() };
    let (limit, chunk) = (u64::from(limits.output_limit), u64::from(limits.output_chunk_size));
    let (mut wire, _) = connect(&agent, Some(limits)).await;
    start(&mut wire, 1, 10, "head -c 300000 /dev/zero; exit 5", true).await;
    started(&mut wire, 1).await;
    let mut seen = Seen::default();
    until_the_allowance_is_used(&mut wire, 1, limit, chunk, &mut seen).await;
    // Acknowledged chunk by chunk from here on, as the reference host does.
    seen.acked = seen.charge;
    ack(&mut wire, 1, seen.acked).await;
    loop {
        let m = next(&mut wire).await;
        assert_eq!(m.id, 1, "{m:?}");
        match &m.payload {
            Payload::ExecStdout(d) => {
                seen.take(&d.data, chunk, limit);
                seen.acked = seen.charge;
                ack(&mut wire, 1, seen.acked).await;
            }
            Payload::ExecExited(e) => {
                assert_eq!(e.code, 5);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen.bytes, 300_000);
}
