//! Execution flow control (generation 10, spec section 8) as the client
//! speaks it, against a scripted agent: the session core's agent role over
//! an in-memory stream, whose exec requests the test answers frame by frame
//! and whose received frames it records.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentwire::payload::bootstrap::GuestBootstrap;
use agentwire::payload::core::{Ready, ReadyCapabilities, ResolvedUser};
use agentwire::payload::exec::{
    EXEC_OUTPUT_EVENT_OVERHEAD, ExecExited, ExecLimits, ExecStarted, ExecStderr, ExecStdinAck, ExecStdinError,
    ExecStdout,
};
use agentwire::{Message, MessageType, Payload};
use agentwire_client::{Builder, Client, Command, ExecEvent};
use agentwire_session::driver::{self, Driver, Handle, Incoming, Route};
use agentwire_session::{Config, Connection, Event};
use bytes::Bytes;
use tokio::sync::mpsc;

/// A scripted agent: it runs the start-up exchange, advertising `limits`,
/// and hands each request to the test.
struct FakeAgent {
    _driver: Driver,
    _handle: Handle,
    requests: mpsc::UnboundedReceiver<(Message, Route)>,
    bootstrap: GuestBootstrap,
}

impl FakeAgent {
    async fn request(&mut self) -> (Message, Route) {
        within(self.requests.recv()).await.expect("a request")
    }
}

/// Waits at most 10 s for `f`.
async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f).await.expect("within 10 s")
}

/// A client connected through `builder` to a scripted agent that advertises `limits`.
async fn connect(builder: Builder, limits: Option<ExecLimits>) -> (Client, FakeAgent) {
    let (host_io, agent_io) = tokio::io::duplex(64 * 1024);
    let conn = Connection::agent(Config::default(), std::time::Instant::now());
    let (driver, handle, mut incoming) = driver::spawn(conn, agent_io, None);
    let (bootstrap_tx, bootstrap_rx) = tokio::sync::oneshot::channel();
    let (tx, requests) = mpsc::unbounded_channel();
    let agent = handle.clone();
    tokio::spawn(async move {
        let mut bootstrap_tx = Some(bootstrap_tx);
        while let Some(item) = incoming.recv().await {
            match item {
                Incoming::Event(Event::Bootstrap(b)) => {
                    if let Some(t) = bootstrap_tx.take() {
                        let _ = t.send(*b);
                    }
                    agent.send_now(|c| c.init_resolved(ResolvedUser { uid: 0, gid: 0 })).unwrap();
                }
                Incoming::Event(Event::InitAcked) => {
                    let mut ready = Ready { agent_version: "scripted".into(), ..Ready::default() };
                    ready.set_capabilities(ReadyCapabilities { exec_limits: limits, ..ReadyCapabilities::default() });
                    agent.send_now(|c| c.ready(ready)).unwrap();
                }
                Incoming::Request { message, route } => {
                    let _ = tx.send((message, route));
                }
                _ => {}
            }
        }
    });
    let client = within(builder.connect(host_io)).await.expect("the client connects");
    let bootstrap = bootstrap_rx.await.expect("the agent got a bootstrap");
    (client, FakeAgent { _driver: driver, _handle: handle, requests, bootstrap })
}

/// What each output chunk costs.
fn charge(len: usize) -> u64 {
    len as u64 + EXEC_OUTPUT_EVENT_OVERHEAD
}

/// What the scripted agent saw on an execution.
#[derive(Default, Debug)]
struct Seen {
    /// `consumed` of every `core.exec.output.ack`, in order.
    acks: Vec<u64>,
    /// The output charge published so far.
    published: u64,
    /// Every stdin frame's length (0: the end of input).
    stdin: Vec<usize>,
    /// Stdin bytes, in order.
    stdin_data: Vec<u8>,
    /// Signals.
    signals: Vec<i32>,
    /// Any other frame's type.
    other: Vec<MessageType>,
}

type Log = Arc<Mutex<Seen>>;

fn record(log: &Log, m: Message) {
    let mut seen = log.lock().unwrap();
    match m.payload {
        Payload::ExecOutputAck(a) => seen.acks.push(a.consumed),
        Payload::ExecStdin(d) => {
            seen.stdin.push(d.data.len());
            seen.stdin_data.extend_from_slice(&d.data);
        }
        Payload::ExecSignal(s) => seen.signals.push(s.signal),
        other => seen.other.push(other.message_type()),
    }
}

/// Output chunks of varied sizes (empty and one-byte ones included), on
/// both streams, that the agent side of section 8 would publish.
fn chunks(n: usize, max: usize) -> Vec<(bool, Bytes)> {
    (0..n)
        .map(|i| {
            let len = match i % 5 {
                0 => max,
                1 => 1,
                2 => 0,
                3 => max / 3,
                _ => max - 7,
            };
            let byte = b'a' + (i % 26) as u8;
            (i % 3 == 1, Bytes::from(vec![byte; len]))
        })
        .collect()
}

/// Plays an execution that publishes `chunks` within `limits.output_limit`,
/// the way section 8 says, and exits with `code` once all is acknowledged.
async fn publish(mut route: Route, log: Log, chunks: Vec<(bool, Bytes)>, limit: u64, code: i32) {
    route.send(ExecStarted { pid: 42 }).await.unwrap();
    let total: u64 = chunks.iter().map(|(_, d)| charge(d.len())).sum();
    let mut acked = 0;
    let mut chunks = chunks.into_iter().peekable();
    loop {
        while let Some((_, d)) = chunks.peek() {
            let published = log.lock().unwrap().published;
            if published - acked + charge(d.len()) > limit {
                break;
            }
            let (stderr, d) = chunks.next().unwrap();
            log.lock().unwrap().published += charge(d.len());
            if stderr {
                route.send(ExecStderr { data: d }).await.unwrap();
            } else {
                route.send(ExecStdout { data: d }).await.unwrap();
            }
        }
        if chunks.peek().is_none() && acked == total {
            // The exit is withheld until every chunk is acknowledged.
            route.send(ExecExited { code }).await.unwrap();
            return;
        }
        let Some(m) = route.recv().await else { return };
        if let Payload::ExecOutputAck(a) = &m.payload {
            acked = acked.max(a.consumed);
        }
        record(&log, m);
    }
}

fn small_limits() -> ExecLimits {
    ExecLimits {
        max_executions: 4,
        input_limit: 1000,
        output_limit: 4096,
        stdin_chunk_size: 300,
        output_chunk_size: 1024,
    }
}

/// The output charge of what the application has been handed.
fn consumed(event: &ExecEvent) -> u64 {
    match event {
        ExecEvent::Stdout(d) | ExecEvent::Stderr(d) => charge(d.len()),
        _ => 0,
    }
}

#[tokio::test]
async fn output_acks_are_cumulative_charges_sent_as_the_application_consumes() {
    let limits = small_limits();
    let (client, mut agent) = connect(Client::builder(), Some(limits)).await;
    assert_eq!(client.exec_limits(), Some(&limits));
    let script = chunks(40, limits.output_chunk_size as usize);
    let prefix: Vec<u64> = script
        .iter()
        .scan(0, |sum, (_, d)| {
            *sum += charge(d.len());
            Some(*sum)
        })
        .collect();
    let total = *prefix.last().unwrap();
    let (mut expect_out, mut expect_err) = (Vec::new(), Vec::new());
    for (stderr, d) in &script {
        if *stderr { &mut expect_err } else { &mut expect_out }.extend_from_slice(d);
    }

    let exec_fut = client.exec(Command::new("scripted"));
    let serve = async {
        let (request, route) = agent.request().await;
        assert_eq!(request.version, agentwire::PROTOCOL_VERSION, "a controlled request has v >= 10");
        let log = Log::default();
        tokio::spawn(publish(route, log.clone(), script.clone(), limits.output_limit.into(), 3));
        log
    };
    let (exec, log) = tokio::join!(exec_fut, serve);
    let mut exec = exec.unwrap();

    // A client that does not read acknowledges nothing: the agent has
    // published its allowance and waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    {
        let seen = log.lock().unwrap();
        assert!(seen.acks.is_empty(), "acks before anything was consumed: {:?}", seen.acks);
        assert!(seen.published > 0 && seen.published <= limits.output_limit.into());
    }

    let (mut out, mut err, mut app) = (Vec::new(), Vec::new(), 0u64);
    let mut events = 0;
    let status = loop {
        // Every ack so far is at most what the application has been handed.
        let seen_max = log.lock().unwrap().acks.last().copied().unwrap_or(0);
        assert!(seen_max <= app, "ack {seen_max} beyond the {app} consumed");
        let event = within(exec.next()).await.unwrap().expect("an event");
        app += consumed(&event);
        events += 1;
        match event {
            ExecEvent::Stdout(d) => out.extend_from_slice(&d),
            ExecEvent::Stderr(d) => err.extend_from_slice(&d),
            ExecEvent::Exited(status) => break status,
            ExecEvent::Started(pid) => assert_eq!((pid, events), (42, 1)),
            other => panic!("{other:?}"),
        }
        // A slow reader, at times: nothing beyond what it consumed is acknowledged.
        if events % 7 == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let seen = log.lock().unwrap();
            let max = seen.acks.last().copied().unwrap_or(0);
            assert!(max <= app, "ack {max} beyond the {app} consumed, after a pause");
            assert!(seen.published - max <= limits.output_limit.into());
        }
    };
    assert_eq!(status.code(), Some(3));
    assert_eq!((out, err), (expect_out, expect_err));
    assert!(within(exec.next()).await.unwrap().is_none());

    let seen = log.lock().unwrap();
    // Cumulative, strictly increasing, each one the charge of a prefix of
    // the chunks (Σ len + 256 over stdout and stderr), the last one all of it.
    assert!(seen.acks.windows(2).all(|w| w[0] < w[1]), "{:?}", seen.acks);
    for ack in &seen.acks {
        assert!(prefix.contains(ack), "ack {ack} is no prefix charge of {prefix:?}");
    }
    assert_eq!(seen.acks.last(), Some(&total));
    // Coalesced: fewer acks than chunks.
    assert!(seen.acks.len() < script.len(), "{} acks for {} chunks", seen.acks.len(), script.len());
    assert!(seen.other.is_empty(), "{:?}", seen.other);
}

#[tokio::test]
async fn a_reader_that_stops_acknowledges_only_what_it_consumed() {
    let limits = small_limits();
    let (client, mut agent) = connect(Client::builder(), Some(limits)).await;
    let script: Vec<(bool, Bytes)> = (0..12).map(|i| (false, Bytes::from(vec![b'x'; 500 + i]))).collect();
    let (exec, log) = tokio::join!(client.exec(Command::new("scripted")), async {
        let (_, route) = agent.request().await;
        let log = Log::default();
        tokio::spawn(publish(route, log.clone(), script.clone(), limits.output_limit.into(), 0));
        log
    });
    let mut exec = exec.unwrap();
    assert!(matches!(within(exec.next()).await.unwrap(), Some(ExecEvent::Started(42))));
    let (mut app, mut bytes) = (0, 0);
    for _ in 0..3 {
        let event = within(exec.next()).await.unwrap().unwrap();
        app += consumed(&event);
        if let ExecEvent::Stdout(d) = &event {
            bytes += d.len();
        }
    }
    // Stops reading, but holds on to the execution.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (acks, published) = {
        let seen = log.lock().unwrap();
        (seen.acks.clone(), seen.published)
    };
    assert!(acks.iter().all(|a| *a <= app), "acks {acks:?} beyond the {app} consumed");
    // The agent is held back: at most its allowance is unacknowledged.
    let total: u64 = script.iter().map(|(_, d)| charge(d.len())).sum();
    assert!(published < total, "everything was published without being consumed");
    assert!(published - acks.last().copied().unwrap_or(0) <= limits.output_limit.into());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(log.lock().unwrap().acks, acks, "acks while the application reads nothing");

    // Reading on gets everything, and the exit.
    let out = within(exec.output()).await.unwrap();
    assert!(out.status.success());
    assert_eq!(bytes + out.stdout.len(), script.iter().map(|(_, d)| d.len()).sum::<usize>());
    assert_eq!(log.lock().unwrap().acks.last(), Some(&total));
}

#[tokio::test]
async fn stdin_is_chunked_and_waits_for_the_agents_acknowledgements() {
    let limits = small_limits();
    let (client, mut agent) = connect(Client::builder(), Some(limits)).await;
    let (exec, (mut route, log)) = tokio::join!(client.exec(Command::new("scripted")), async {
        let (_, route) = agent.request().await;
        route.send(ExecStarted { pid: 7 }).await.unwrap();
        (route, Log::default())
    });
    let mut exec = exec.unwrap();
    let input = exec.input();
    let data: Vec<u8> = (0..2500u32).map(|i| (i % 251) as u8).collect();
    let writer = {
        let input = input.clone();
        let data = Bytes::from(data.clone());
        tokio::spawn(async move { input.write(data).await })
    };
    // The agent takes stdin frames as they come, for a while, without acknowledging.
    let drain = async |route: &mut Route, log: &Log, ms: u64| {
        let until = tokio::time::Instant::now() + Duration::from_millis(ms);
        while let Ok(Some(m)) = tokio::time::timeout_at(until, route.recv()).await {
            record(log, m);
        }
        log.lock().unwrap().stdin_data.len() as u64
    };
    let got = drain(&mut route, &log, 300).await;
    assert!(got > 0 && got <= limits.input_limit.into(), "{got} bytes without an acknowledgement");
    assert!(!writer.is_finished(), "the write ended without room for it");
    // A signal is not held behind the waiting stdin.
    within(input.signal(15)).await.unwrap();

    // Room for 600 more bytes.
    route.send(ExecStdinAck { consumed: 600 }).await.unwrap();
    let got2 = drain(&mut route, &log, 300).await;
    assert!(got2 > got && got2 <= 600 + u64::from(limits.input_limit), "{got} then {got2}");
    assert!(!writer.is_finished());
    assert_eq!(log.lock().unwrap().signals, [15]);

    // Acknowledging what arrives lets the rest through.
    let mut acked = 600;
    while !writer.is_finished() || acked < log.lock().unwrap().stdin_data.len() as u64 {
        let have = log.lock().unwrap().stdin_data.len() as u64;
        if have > acked {
            acked = have;
            route.send(ExecStdinAck { consumed: acked }).await.unwrap();
        }
        drain(&mut route, &log, 50).await;
        assert!(log.lock().unwrap().stdin_data.len() as u64 <= acked + u64::from(limits.input_limit));
    }
    within(writer).await.unwrap().unwrap();
    within(input.close()).await.unwrap();
    drain(&mut route, &log, 100).await;
    {
        let seen = log.lock().unwrap();
        assert_eq!(seen.stdin_data, data);
        assert!(seen.stdin.iter().all(|n| *n <= limits.stdin_chunk_size as usize), "{:?}", seen.stdin);
        assert_eq!(seen.stdin.last(), Some(&0), "the end of input comes last: {:?}", seen.stdin);
        assert_eq!(seen.stdin.iter().filter(|n| **n == 0).count(), 1);
        assert!(seen.acks.is_empty() && seen.other.is_empty(), "{seen:?}");
    }
    route.send(ExecExited { code: 0 }).await.unwrap();
    assert!(matches!(within(exec.next()).await.unwrap(), Some(ExecEvent::Started(7))));
    assert!(matches!(within(exec.next()).await.unwrap(), Some(ExecEvent::Exited(s)) if s.success()));
    // Input to an execution that is over fails; it does not wait.
    assert!(within(input.write(Bytes::from_static(b"late"))).await.is_err());
}

/// A scripted `cat`: stdin goes back as stdout, within both allowances. The
/// "child" reads its input only as it can write it out, so that stdin is
/// acknowledged only as output is.
async fn cat(mut route: Route, limits: ExecLimits, violations: Arc<Mutex<Vec<String>>>) {
    route.send(ExecStarted { pid: 1 }).await.unwrap();
    let (mut received, mut written, mut published, mut acked, mut eof) = (0u64, 0u64, 0u64, 0u64, false);
    // Stdin accepted and not yet read by the child.
    let mut queued: std::collections::VecDeque<Bytes> = Default::default();
    loop {
        // The child reads what it can write out.
        let mut read_some = false;
        while let Some(d) = queued.front_mut() {
            let room = u64::from(limits.output_limit) - (published - acked);
            if room <= EXEC_OUTPUT_EVENT_OVERHEAD {
                break;
            }
            let max = (room - EXEC_OUTPUT_EVENT_OVERHEAD).min(u64::from(limits.output_chunk_size)) as usize;
            let out = d.split_to(d.len().min(max));
            if d.is_empty() {
                queued.pop_front();
            }
            written += out.len() as u64;
            published += charge(out.len());
            read_some = true;
            route.send(ExecStdout { data: out }).await.unwrap();
        }
        if read_some {
            route.send(ExecStdinAck { consumed: written }).await.unwrap();
        }
        if eof && queued.is_empty() && acked == published {
            route.send(ExecExited { code: 0 }).await.unwrap();
            return;
        }
        let Some(m) = route.recv().await else { return };
        match m.payload {
            Payload::ExecStdin(d) if d.data.is_empty() => eof = true,
            Payload::ExecStdin(d) => {
                if d.data.len() > limits.stdin_chunk_size as usize {
                    violations.lock().unwrap().push(format!("a stdin chunk of {}", d.data.len()));
                }
                received += d.data.len() as u64;
                if received - written > u64::from(limits.input_limit) {
                    violations.lock().unwrap().push(format!("{received} stdin bytes with {written} written"));
                }
                queued.push_back(d.data);
            }
            Payload::ExecOutputAck(a) => {
                if a.consumed > published || a.consumed < acked {
                    violations.lock().unwrap().push(format!("ack {} with {published} published", a.consumed));
                }
                acked = acked.max(a.consumed);
            }
            other => violations.lock().unwrap().push(format!("{}", other.message_type())),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipe_and_output_acknowledge_through_a_scripted_cat() {
    let limits = ExecLimits { output_chunk_size: 700, ..small_limits() };
    let (client, mut agent) = connect(Client::builder(), Some(limits)).await;
    let violations = Arc::new(Mutex::new(Vec::new()));
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 253) as u8).collect();

    // pipe(): stdin fed while output is written out.
    let (exec, _) = tokio::join!(client.exec(Command::new("cat")), async {
        let (_, route) = agent.request().await;
        tokio::spawn(cat(route, limits, violations.clone()));
    });
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = within(exec.unwrap().pipe(&data[..], &mut out, &mut err)).await.unwrap();
    assert!(status.success());
    assert!(out == data, "{} bytes back of {}", out.len(), data.len());

    // output(): input written by another task while output is collected.
    let (exec, _) = tokio::join!(client.exec(Command::new("cat")), async {
        let (_, route) = agent.request().await;
        tokio::spawn(cat(route, limits, violations.clone()));
    });
    let exec = exec.unwrap();
    let input = exec.input();
    let writer = tokio::spawn({
        let data = Bytes::from(data.clone());
        async move { input.write(data).await }
    });
    // The writer is held back: nobody reads the output.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!writer.is_finished());
    // output() reads while its end of input waits for the writer.
    let out = within(exec.output()).await.unwrap();
    within(writer).await.unwrap().unwrap();
    assert!(out.status.success());
    assert!(out.stdout == data, "{} bytes back of {}", out.stdout.len(), data.len());
    assert!(violations.lock().unwrap().is_empty(), "{:?}", violations.lock().unwrap());
}

#[tokio::test]
async fn a_dropped_exec_gives_its_output_back_so_the_command_can_end() {
    let limits = small_limits();
    let (client, mut agent) = connect(Client::builder(), Some(limits)).await;
    let script = chunks(20, limits.output_chunk_size as usize);
    let total: u64 = script.iter().map(|(_, d)| charge(d.len())).sum();
    let (exec, (log, done)) = tokio::join!(client.exec(Command::new("scripted")), async {
        let (_, route) = agent.request().await;
        let log = Log::default();
        let done = tokio::spawn(publish(route, log.clone(), script.clone(), limits.output_limit.into(), 0));
        (log, done)
    });
    let exec = exec.unwrap();
    let input = exec.input();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(log.lock().unwrap().acks.is_empty());
    drop(exec);
    // The publisher gets everything acknowledged and sends its exit.
    within(done).await.unwrap();
    assert_eq!(log.lock().unwrap().acks.last(), Some(&total));
    assert!(input.write(Bytes::from_static(b"x")).await.is_err(), "input to an abandoned execution");
}

#[tokio::test]
async fn a_legacy_agent_gets_no_acks_and_stdin_as_written() {
    // The agent advertises no policy (as a generation-7 one).
    let (client, mut agent) = connect(Client::builder(), None).await;
    assert_eq!(agent.bootstrap.exec_limits, Some(ExecLimits::default()), "the default policy is offered");
    let (exec, mut route) = tokio::join!(client.exec(Command::new("legacy")), async {
        let (_, route) = agent.request().await;
        route.send(ExecStarted { pid: 9 }).await.unwrap();
        route
    });
    let exec = exec.unwrap();
    let input = exec.input();
    // Stdin goes as written: one frame, without waiting for any acknowledgement.
    let big = Bytes::from(vec![b'i'; 100_000]);
    within(input.write(big.clone())).await.unwrap();
    within(input.close()).await.unwrap();
    let log = Log::default();
    for _ in 0..2 {
        let m = within(route.recv()).await.unwrap();
        record(&log, m);
    }
    assert_eq!(log.lock().unwrap().stdin, [100_000, 0]);
    // Plenty of output without any acknowledgement, then the exit.
    for i in 0..64 {
        let data = Bytes::from(vec![b'o'; 4096]);
        if i % 2 == 0 {
            route.send(ExecStdout { data }).await.unwrap();
        } else {
            route.send(ExecStderr { data }).await.unwrap();
        }
    }
    route.send(ExecExited { code: 0 }).await.unwrap();
    let out = within(exec.output()).await.unwrap();
    assert_eq!((out.stdout.len(), out.stderr.len()), (32 * 4096, 32 * 4096));
    // Whatever else the client sent on the execution: the end of input only.
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), route.recv()).await {
        record(&log, m);
    }
    let seen = log.lock().unwrap();
    assert!(seen.acks.is_empty(), "acks to a legacy agent: {:?}", seen.acks);
    assert_eq!(seen.stdin, [100_000, 0]);
    assert!(seen.other.is_empty(), "{:?}", seen.other);
    assert_eq!(client.exec_limits(), None);
}

#[tokio::test]
async fn the_bootstrap_carries_the_builders_policy() {
    let custom = ExecLimits { output_limit: 1 << 22, ..ExecLimits::default() };
    let (_, agent) = connect(Client::builder().exec_limits(None), None).await;
    assert_eq!(agent.bootstrap.exec_limits, None);
    let (_, agent) = connect(Client::builder().exec_limits(Some(custom)), None).await;
    assert_eq!(agent.bootstrap.exec_limits, Some(custom));
    // A bootstrap's own policy stays unless the builder sets one.
    let own = GuestBootstrap { exec_limits: Some(custom), hostname: Some("h".into()), ..GuestBootstrap::default() };
    let (_, agent) = connect(Client::builder().bootstrap(own.clone()), None).await;
    assert_eq!(agent.bootstrap, own);
    let (_, agent) = connect(Client::builder().bootstrap(own).exec_limits(None), None).await;
    assert_eq!((agent.bootstrap.exec_limits, agent.bootstrap.hostname.as_deref()), (None, Some("h")));
}

/// A scripted legacy command (already started) that answers its first stdin
/// frame with `core.exec.stdin.error` carrying `errno`, and exits once the
/// input ends.
async fn refuse_first_input(mut route: Route, errno: Option<i32>) {
    let mut refused = false;
    while let Some(m) = route.recv().await {
        let Payload::ExecStdin(stdin) = m.payload else { continue };
        if !refused {
            refused = true;
            let error =
                ExecStdinError { errno, errno_name: errno.map(|_| "EPIPE".into()), message: "scripted refusal".into() };
            route.send(error).await.unwrap();
        }
        if stdin.data.is_empty() {
            let _ = route.send(ExecExited { code: 0 }).await;
            return;
        }
    }
}

/// `pipe` of 10,000 bytes into a scripted legacy command that refuses its
/// first input frame with `errno`.
async fn pipe_into_a_refusal(
    errno: Option<i32>,
) -> Result<agentwire_client::ExitStatus, agentwire_client::ClientError> {
    let (client, mut agent) = connect(Client::builder(), None).await;
    let (exec, route) = tokio::join!(client.exec(Command::new("legacy")), async {
        let (_, route) = agent.request().await;
        route.send(ExecStarted { pid: 9 }).await.unwrap();
        route
    });
    tokio::spawn(refuse_first_input(route, errno));
    let input: &[u8] = &[b'i'; 10_000];
    let (mut out, mut err) = (Vec::new(), Vec::new());
    within(exec.unwrap().pipe(input, &mut out, &mut err)).await
}

#[tokio::test]
async fn pipe_fails_when_the_agent_drops_input() {
    match pipe_into_a_refusal(None).await {
        Err(agentwire_client::ClientError::InputDropped(message)) => assert!(message.contains("scripted refusal")),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn pipe_goes_on_when_the_command_closed_its_input() {
    let status = pipe_into_a_refusal(Some(32)).await.expect("a closed input is the command's business");
    assert!(status.success());
}
