//! The host client's execution flow control (generation 10, spec section 8)
//! against our own agent: each test starts an `agentwire agent` on a Unix
//! socket in a temporary directory and drives it with `agentwire_client`,
//! whose default bootstrap offers the agent an execution policy.

mod common;

use common::RunningAgent;

use std::future::Future;
use std::time::Duration;

use agentwire::payload::exec::ExecLimits;
use agentwire_client::{Builder, Client, Command, ExecEvent};
use bytes::Bytes;

/// A connection to `agent` through `builder`, after the start-up exchange.
async fn connect(agent: &RunningAgent, builder: Builder) -> Client {
    let stream = tokio::net::UnixStream::connect(&agent.socket).await.unwrap();
    within(20, "the start-up exchange", builder.connect(stream)).await.unwrap()
}

/// `f` within `secs` seconds, or the test fails saying `what`.
async fn within<T>(secs: u64, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not within {secs} s"),
    }
}

/// What `seq 1 n` writes.
fn seq(n: u32) -> Vec<u8> {
    (1..=n).flat_map(|i| format!("{i}\n").into_bytes()).collect()
}

/// Whichever way the agent runs executions (under the policy the client
/// offers, or the legacy way of an agent that does not advertise one), large
/// output, a slow reader and large input all arrive intact, through `next`,
/// `output` and `pipe`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_output_and_input_arrive_intact_with_the_default_policy() {
    let agent = RunningAgent::start("client-flow");
    let client = connect(&agent, Client::builder()).await;

    // Output on both streams, read slowly at first.
    let script = "seq 1 200000; seq 1 50000 >&2";
    let mut exec = within(20, "exec", client.exec(Command::new("sh").args(["-c", script]))).await.unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = loop {
        match within(60, "the next event", exec.next()).await.unwrap() {
            Some(ExecEvent::Stdout(d)) => out.extend_from_slice(&d),
            Some(ExecEvent::Stderr(d)) => err.extend_from_slice(&d),
            Some(ExecEvent::Exited(status)) => break status,
            Some(_) => {}
            None => panic!("no exit"),
        }
        if out.len() < 64 * 1024 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    assert!(status.success());
    assert!(out == seq(200_000), "stdout: {} bytes", out.len());
    assert!(err == seq(50_000), "stderr: {} bytes", err.len());

    // Input through pipe(), echoed while it is fed.
    let input: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let exec = within(20, "exec", client.exec(Command::new("cat"))).await.unwrap();
    let (mut echoed, mut err) = (Vec::new(), Vec::new());
    let status = within(120, "cat", exec.pipe(&input[..], &mut echoed, &mut err)).await.unwrap();
    assert!(status.success() && err.is_empty());
    assert!(echoed == input, "{} bytes echoed of {}", echoed.len(), input.len());

    // Input written by another task, well past any stdin allowance, while output() collects.
    let exec = within(20, "exec", client.exec(Command::new("wc").arg("-c"))).await.unwrap();
    let writer = exec.input();
    let data = Bytes::from(vec![b'w'; 3 * 1024 * 1024 + 5]);
    let writing = tokio::spawn(async move { writer.write(data).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let out = within(120, "wc -c", exec.output()).await.unwrap();
    within(20, "the writer", writing).await.unwrap().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), (3 * 1024 * 1024 + 5).to_string());

    // A dropped execution does not stop the next ones.
    let exec = within(20, "exec", client.exec(Command::new("sh").args(["-c", "seq 1 300000"]))).await.unwrap();
    drop(exec);
    let out = within(60, "echo", async { client.exec(Command::new("echo").arg("next")).await?.output().await })
        .await
        .unwrap();
    assert_eq!(out.stdout, b"next\n");
}

/// The policy the tests offer: small, so that a reader that stops is seen at once.
fn small_policy() -> ExecLimits {
    ExecLimits { output_limit: 256 * 1024, output_chunk_size: 16 * 1024, ..ExecLimits::default() }
}

/// Under `limits`, a reader that stops holds the command back (what the
/// client receives stays within the output allowance); reading on gets all
/// of it, in chunks of at most the advertised size, then the exit; stdin
/// goes through `cat` intact.
async fn held_back_then_intact(client: &Client, limits: ExecLimits) {
    assert_eq!(client.exec_limits(), Some(&limits), "the agent advertises the bootstrap's policy");
    let size = 16 * 1024 * 1024;
    let before = client.counters().received.get().1;
    let mut exec = within(20, "exec", client.exec(Command::new("head").args(["-c", &size.to_string(), "/dev/zero"])))
        .await
        .unwrap();
    // Nothing read for a while: the agent publishes its allowance and waits.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let received = client.counters().received.get().1 - before;
    let slack = 64 * 1024;
    assert!(
        received <= u64::from(limits.output_limit) + slack,
        "{received} bytes received while nothing was read (allowance {})",
        limits.output_limit
    );

    let (mut total, mut largest) = (0usize, 0usize);
    let status = loop {
        match within(120, "the next event", exec.next()).await.unwrap() {
            Some(ExecEvent::Stdout(d)) => {
                total += d.len();
                largest = largest.max(d.len());
            }
            Some(ExecEvent::Exited(status)) => break status,
            Some(_) => {}
            None => panic!("no exit"),
        }
    };
    assert!(status.success());
    assert_eq!(total, size);
    assert!(largest <= limits.output_chunk_size as usize, "a {largest}-byte chunk");

    // Stdin in the advertised chunks, within the advertised allowance: cat echoes it all.
    let input: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 241) as u8).collect();
    let exec = within(20, "exec", client.exec(Command::new("cat"))).await.unwrap();
    let (mut echoed, mut err) = (Vec::new(), Vec::new());
    let status = within(120, "cat", exec.pipe(&input[..], &mut echoed, &mut err)).await.unwrap();
    assert!(status.success());
    assert!(echoed == input, "{} bytes echoed of {}", echoed.len(), input.len());
}

/// Stdin that a command never reads: the writer waits once the allowance
/// is in flight (it neither fails nor floods the agent), while pings and
/// signals go on; when the command ends, the waiting write fails.
async fn unread_stdin_holds_the_writer_back(client: &Client) {
    let mut exec = within(20, "exec", client.exec(Command::new("sleep").arg("100"))).await.unwrap();
    let input = exec.input();
    let before = client.counters().sent.get().1;
    let flood = tokio::spawn({
        let input = input.clone();
        async move { input.write(Bytes::from(vec![b'x'; 8 * 1024 * 1024])).await }
    });
    for _ in 0..10 {
        within(5, "a pong while the writer waits", client.ping()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!flood.is_finished(), "the write ended although the command reads nothing");
    // The allowance, what the child's pipe took, and the pings' frames.
    let sent = client.counters().sent.get().1 - before;
    assert!(sent <= 512 * 1024, "{sent} bytes sent to a command that reads nothing");

    within(5, "the signal", input.signal(9)).await.unwrap();
    let status = loop {
        match within(10, "the end after SIGKILL", exec.next()).await.unwrap() {
            Some(ExecEvent::Exited(status)) => break status,
            Some(_) => {}
            None => panic!("no exit"),
        }
    };
    assert!(status.signaled(), "{status:?}");
    let written = within(10, "the waiting write", flood).await.unwrap();
    assert!(written.is_err(), "the write of a command that ended succeeded");
}

/// With the agent side of section 8, our agent advertises the policy the
/// client offered in its bootstrap, and the client runs every execution
/// under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_holds_output_back_for_a_client_that_does_not_read() {
    let agent = RunningAgent::start("client-flow-held");
    let client = connect(&agent, Client::builder().exec_limits(Some(small_policy()))).await;
    held_back_then_intact(&client, small_policy()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_a_command_never_reads_holds_the_writer_back_but_not_pings_or_signals() {
    let agent = RunningAgent::start("client-flow-stdin");
    let client = connect(&agent, Client::builder()).await;
    assert_eq!(client.exec_limits(), Some(&ExecLimits::default()));
    unread_stdin_holds_the_writer_back(&client).await;
}

/// The same against the deployed agent, microsandbox-agentd 0.7.13, as PID 1
/// of a QEMU guest (`agentwire vm --boot-only` with the image that
/// `vm/build-reference.sh 0.7.13` writes to `target/vm-ref-0.7.13`, or under
/// `$AGENTWIRE_VM_REF_DIR`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots QEMU: build the image with vm/build-reference.sh 0.7.13, then run with --include-ignored"]
async fn the_deployed_agent_0_7_13_runs_our_executions_under_flow_control() {
    let (_tmp, mut vm, stream) = common::boot_reference_0_7_13("client-flow-vm").await;
    let builder = Client::builder().exec_limits(Some(small_policy())).handshake_timeout(Duration::from_secs(120));
    let client = within(150, "the start-up exchange", builder.connect(stream)).await.unwrap();
    assert_eq!((client.ready().agent_version.as_str(), client.negotiated()), ("0.7.13", 10));

    held_back_then_intact(&client, small_policy()).await;
    unread_stdin_holds_the_writer_back(&client).await;
    let out = within(20, "echo", async { client.exec(Command::new("echo").arg("still")).await?.output().await })
        .await
        .unwrap();
    assert_eq!(out.stdout, b"still\n");

    within(30, "the shutdown", client.shutdown(Duration::from_secs(30))).await.unwrap();
    let status = within(30, "QEMU's end", vm.wait()).await.unwrap();
    assert!(status.success(), "{status}");
}
