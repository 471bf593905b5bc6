//! Memory stays bounded in bytes when a reader falls behind: the figures are
//! peaks of resident memory (`VmHWM` in `/proc/PID/status`) of the real
//! processes, on a Unix socket in a temporary directory.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_agentwire");

/// How long the slow reader is held back (`AGENTWIRE_MEMORY_SECONDS`, default 15).
fn duration() -> Duration {
    let secs = std::env::var("AGENTWIRE_MEMORY_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    Duration::from_secs(secs)
}

use common::{RunningAgent as Agent, peak_rss_kib};

/// `agentwire host exec yes` with its standard output a pipe that nobody
/// reads: the host stops reading from the agent, the agent stops reading
/// from `yes`, and neither grows. The host stays under 64 MiB, the agent
/// under 256 MiB, and the agent still answers a second host's ping.
#[test]
fn host_and_agent_stay_bounded_when_output_is_never_read() {
    let agent = Agent::start("mem-yes");
    let mut host = Command::new(BIN)
        .args(["host", "--connect", agent.socket.to_str().unwrap(), "exec", "yes"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped()) // never read
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let held = duration();
    std::thread::sleep(held);
    let host_kib = peak_rss_kib(host.id());
    let agent_kib = peak_rss_kib(agent.child.id());
    // The agent serves others meanwhile.
    let ping = Command::new(BIN)
        .args(["host", "--connect", agent.socket.to_str().unwrap(), "ping", "--count", "1"])
        .output()
        .unwrap();
    let _ = host.kill();
    let _ = host.wait();
    eprintln!("after {held:?}: host peak RSS {host_kib} KiB, agent peak RSS {agent_kib} KiB");
    assert!(host_kib < 64 * 1024, "host peak RSS {host_kib} KiB");
    assert!(agent_kib < 256 * 1024, "agent peak RSS {agent_kib} KiB");
    assert!(ping.status.success(), "{}", String::from_utf8_lossy(&ping.stderr));
}

/// 1,000 streamed reads of a 64 MiB file on one connection whose host never
/// reads: the agent holds a bounded budget of file data for all of them, not
/// a chunk (or a thread) each, and still serves another connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_stays_bounded_when_many_reads_are_never_taken() {
    use agentwire::payload::bootstrap::GuestBootstrap;
    use agentwire::payload::core::InitAck;
    use agentwire::payload::fs::{FsOp, FsOpenOptions, FsRequest, FsResponseData};
    use agentwire::{Message, MessageCodec, Payload};
    use futures::SinkExt;

    let agent = Agent::start("mem-reads");
    let file = agent.root().join("big.bin");
    std::fs::write(&file, vec![7u8; 64 << 20]).unwrap();
    let stream = tokio::net::UnixStream::connect(&agent.socket).await.unwrap();
    let mut framed = tokio_util::codec::Framed::new(stream, MessageCodec::new());
    framed.send(Message::new(0, GuestBootstrap::default())).await.unwrap();
    assert_eq!(framed_next(&mut framed).await.message_type().wire_name(), "core.init.resolved");
    framed.send(Message::new(0, InitAck::default())).await.unwrap();
    assert_eq!(framed_next(&mut framed).await.message_type().wire_name(), "core.ready");
    let open = FsOp::OpenFile { path: "/big.bin".into(), options: FsOpenOptions { read: true, ..Default::default() } };
    framed.send(Message::new(1, FsRequest::new(open))).await.unwrap();
    let handle = match framed_next(&mut framed).await.payload {
        Payload::FsResponse(r) => match r.data {
            Some(FsResponseData::Handle(h)) => h,
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    for id in 2..1002 {
        let read = FsOp::Read { handle, offset: 0, len: None };
        framed.send(Message::new(id, FsRequest::new(read))).await.unwrap();
    }
    // Nothing is read from here on.
    tokio::time::sleep(duration().min(Duration::from_secs(10))).await;
    let agent_kib = peak_rss_kib(agent.child.id());
    let threads = std::fs::read_to_string(format!("/proc/{}/status", agent.child.id()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:").map(|t| t.trim().parse::<u64>().unwrap()))
        .unwrap();
    let ping = Command::new(BIN)
        .args(["host", "--connect", agent.socket.to_str().unwrap(), "ping", "--count", "1"])
        .output()
        .unwrap();
    eprintln!("1000 reads never taken: agent peak RSS {agent_kib} KiB, {threads} threads");
    assert!(agent_kib < 256 * 1024, "agent peak RSS {agent_kib} KiB");
    assert!(threads < 100, "{threads} threads");
    assert!(ping.status.success(), "{}", String::from_utf8_lossy(&ping.stderr));
    drop(framed);
}

async fn framed_next(
    framed: &mut tokio_util::codec::Framed<tokio::net::UnixStream, agentwire::MessageCodec>,
) -> agentwire::Message {
    use futures::StreamExt;
    let item = tokio::time::timeout(Duration::from_secs(20), framed.next()).await.expect("a frame within 20 s");
    item.expect("open").expect("intact").expect("decodes")
}

/// 30 directory handles on a directory of 20,000 entries (the attack used 300): the handles of a
/// connection hold at most 100,000 entries between them; the rest are refused
/// by name, and the agent stays small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_handles_hold_a_bounded_number_of_entries() {
    use agentwire::payload::fs::{FsOp, FsResponseData};
    let agent = Agent::start("mem-dirs");
    let big = agent.root().join("big");
    std::fs::create_dir(&big).unwrap();
    for i in 0..20_000 {
        std::fs::File::create(big.join(format!("entry-with-a-long-name-{i:06}"))).unwrap();
    }
    let stream = tokio::net::UnixStream::connect(&agent.socket).await.unwrap();
    let client = agentwire_client::Client::connect(stream).await.unwrap();
    let (mut opened, mut refused) = (0, 0);
    for _ in 0..30 {
        match client.fs(FsOp::OpenDir { path: "/big".into() }).await {
            Ok(Some(FsResponseData::Handle(_))) => opened += 1,
            Err(e) => {
                assert!(e.to_string().contains("entries would pass"), "{e}");
                refused += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    let agent_kib = peak_rss_kib(agent.child.id());
    eprintln!("30 OpenDir of 20,000 entries: {opened} opened, {refused} refused, agent peak RSS {agent_kib} KiB");
    assert_eq!((opened, refused), (5, 25));
    assert!(agent_kib < 256 * 1024, "agent peak RSS {agent_kib} KiB");
    client.ping().await.unwrap();
}
