//! `core.fs.*` stays inside `--root`, whatever moves under it while it works.
//!
//! Each test starts `agentwire agent --listen SOCKET --root DIR` (as
//! tests/agent.rs does) with a directory `outside/` beside the root that holds
//! sentinel files, and drives the agent with `agentwire_client::Client` (or raw
//! frames where ids of another relay slot are needed). Nothing outside the
//! root may be created, read, changed or deleted, and no file type may block
//! the agent.
//!
//! `AGENTWIRE_RACE_SECS` sets how long the race of the first test runs
//! (default 20 s, what CI uses).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agentwire::payload::bootstrap::GuestBootstrap;
use agentwire::payload::core::{InitAck, RelayClientDisconnected};
use agentwire::payload::fs::{FsOp, FsOpenOptions, FsRequest, FsResponse, FsResponseData, FsSetAttrs};
use agentwire::relay::AGENT_RELAY_ID_RANGE_STEP as STEP;
use agentwire::{Message, MessageCodec, Payload};
use agentwire_client::Client;
use futures::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

/// The agent of these tests.
use common::RunningAgent as Agent;

impl Agent {
    async fn client(&self, limit: Duration) -> Client {
        let io = UnixStream::connect(&self.socket).await.unwrap();
        Client::builder().request_timeout(limit).connect(io).await.unwrap()
    }

    /// A raw connection after the start-up exchange, to send ids of any relay slot.
    async fn raw(&self) -> Framed<UnixStream, MessageCodec> {
        let mut framed = Framed::new(UnixStream::connect(&self.socket).await.unwrap(), MessageCodec::new());
        framed.send(Message::new(0, GuestBootstrap::default())).await.unwrap();
        assert_eq!(next(&mut framed).await.message_type().wire_name(), "core.init.resolved");
        framed.send(Message::new(0, InitAck::default())).await.unwrap();
        assert_eq!(next(&mut framed).await.message_type().wire_name(), "core.ready");
        framed
    }
}

async fn next(framed: &mut Framed<UnixStream, MessageCodec>) -> Message {
    let item = tokio::time::timeout(Duration::from_secs(20), framed.next()).await.expect("a frame within 20 s");
    item.expect("the connection is open").expect("the stream is intact").expect("the frame decodes")
}

/// One raw request on `id` and its `core.fs.response`.
async fn raw_fs(framed: &mut Framed<UnixStream, MessageCodec>, id: u32, op: FsOp) -> FsResponse {
    framed.send(Message::new(id, FsRequest::new(op))).await.unwrap();
    loop {
        let m = next(framed).await;
        if let Payload::FsResponse(r) = m.payload {
            assert_eq!(m.id, id);
            return *r;
        }
    }
}

/// Every file and directory under `dir` (not following links), with its
/// content (files), `<dir>` or `-> target`, and its mode.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (String, u32)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let what = if md.is_symlink() {
                format!("-> {}", std::fs::read_link(&p).unwrap().display())
            } else if md.is_dir() {
                todo.push(p.clone());
                "<dir>".into()
            } else {
                String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned()
            };
            out.insert(p.strip_prefix(dir).unwrap().to_path_buf(), (what, md.permissions().mode()));
        }
    }
    out
}

/// What changed between two snapshots: created, deleted, changed entries.
fn differences(before: &BTreeMap<PathBuf, (String, u32)>, after: &BTreeMap<PathBuf, (String, u32)>) -> Vec<String> {
    let mut d = Vec::new();
    for (p, v) in after {
        match before.get(p) {
            None => d.push(format!("created {}", p.display())),
            Some(old) if old != v => d.push(format!("changed {}: {old:?} -> {v:?}", p.display())),
            Some(_) => {}
        }
    }
    for p in before.keys().filter(|p| !after.contains_key(*p)) {
        d.push(format!("deleted {}", p.display()));
    }
    d
}

/// Sentinels outside the root: files to read or clobber, and trees to delete.
fn plant_outside(outside: &Path) {
    std::fs::write(outside.join("secret"), "OUTSIDE-SECRET").unwrap();
    std::fs::write(outside.join("victim"), "OUTSIDE-VICTIM").unwrap();
    for t in ["tree", "tree2"] {
        std::fs::create_dir_all(outside.join(t).join("sub")).unwrap();
        std::fs::write(outside.join(t).join("a"), "OUTSIDE-A").unwrap();
        std::fs::write(outside.join(t).join("sub/b"), "OUTSIDE-B").unwrap();
    }
}

fn race_duration() -> Duration {
    let secs = std::env::var("AGENTWIRE_RACE_SECS").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(20.0);
    Duration::from_secs_f64(secs)
}

/// A guest process swaps `/d` between a real directory and a symlink to a
/// directory outside the root (renameat2 RENAME_EXCHANGE of `d` and `d.alt`,
/// so that `/d` always exists), while the host writes, creates, reads,
/// copies, changes and removes trees through `/d`. Nothing outside changes,
/// and no read returns outside data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_a_directory_for_a_symlink_never_lets_an_operation_out_of_the_root() {
    race(Agent::start("race"), race_duration()).await;
}

/// The same race against the agent's fallback for kernels without openat2
/// (`AGENTWIRE_FS_WALK=1`: a component-by-component walk by fds), for a
/// quarter of the time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_walk_without_openat2_holds_the_same_race() {
    race(Agent::start_with("race-walk", &[("AGENTWIRE_FS_WALK", "1")]), race_duration() / 4).await;
}

const RACE_OPS: [&str; 8] = [
    "create",
    "read",
    "overwrite",
    "mkdir+write+rmdir -r",
    "mkdir",
    "copy",
    "setstat",
    "rmdir -r of a tree only outside (success = escape)",
];

async fn race(agent: Agent, duration: Duration) {
    let (root, outside) = (agent.root(), agent.outside());
    plant_outside(&outside);
    std::fs::create_dir(root.join("d")).unwrap();
    std::fs::write(root.join("d/secret"), "inside").unwrap();
    std::fs::write(root.join("d/victim"), "inside").unwrap();
    std::os::unix::fs::symlink(&outside, root.join("d.alt")).unwrap();
    let before = snapshot(&outside);

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let swapper = {
        let (stop, swaps, root) = (stop.clone(), swaps.clone(), root.clone());
        std::thread::spawn(move || {
            use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
            let (d, alt) = (root.join("d"), root.join("d.alt"));
            while !stop.load(Ordering::Relaxed) {
                renameat2(AT_FDCWD, &d, AT_FDCWD, &alt, RenameFlags::RENAME_EXCHANGE).unwrap();
                swaps.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let attempted = Arc::new(AtomicU64::new(0));
    let succeeded: Arc<[AtomicU64; 8]> = Arc::new(Default::default());
    let outside_reads = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..4u64 {
        let client = Arc::new(agent.client(Duration::from_secs(30)).await);
        let (attempted, succeeded, outside_reads) = (attempted.clone(), succeeded.clone(), outside_reads.clone());
        workers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while started.elapsed() < duration {
                i += 1;
                let n = w * 1_000_000 + i;
                let kind = (i % 8) as usize;
                let ok = match kind {
                    0 => client.write_file(&format!("/d/new-{n}"), &b"planted"[..], Some(7)).await.is_ok(),
                    1 => {
                        let mut got = Vec::new();
                        let ok = client.read_file("/d/secret", &mut got).await.is_ok();
                        if got.windows(7).any(|w| w == b"OUTSIDE") {
                            outside_reads.fetch_add(1, Ordering::Relaxed);
                        }
                        ok
                    }
                    2 => client.write_file("/d/victim", &b"clobbered"[..], None).await.is_ok(),
                    3 => {
                        // A tree inside, then its recursive removal: outside, `tree` has the same name.
                        let _ = client.mkdir("/d/tree", None).await;
                        let _ = client.mkdir("/d/tree/sub", None).await;
                        let _ = client.write_file("/d/tree/sub/f", &b"x"[..], None).await;
                        client.remove_dir("/d/tree", true).await.is_ok()
                    }
                    4 => client.mkdir(&format!("/d/dir-{n}"), None).await.is_ok(),
                    5 => client.fs(FsOp::Copy { src: "/d/secret".into(), dst: format!("/d/copy-{n}") }).await.is_ok(),
                    6 => {
                        let attrs = FsSetAttrs { mode: Some(0o600), ..FsSetAttrs::default() };
                        client.set_stat("/d/victim", true, attrs).await.is_ok()
                    }
                    _ => {
                        let _ = client
                            .fs(FsOp::Symlink { target: "x".into(), link_path: format!("/d/l-{n}"), user: None })
                            .await;
                        client.remove_dir("/d/tree2", true).await.is_ok()
                    }
                };
                attempted.fetch_add(1, Ordering::Relaxed);
                if ok {
                    succeeded[kind].fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();

    let after = snapshot(&outside);
    let escapes = differences(&before, &after);
    let attempted = attempted.load(Ordering::Relaxed);
    let per_kind: Vec<u64> = succeeded.iter().map(|n| n.load(Ordering::Relaxed)).collect();
    let succeeded: u64 = per_kind.iter().sum();
    let per_kind: Vec<String> = RACE_OPS.iter().zip(&per_kind).map(|(k, n)| format!("{k} {n}")).collect();
    let outside_reads = outside_reads.load(Ordering::Relaxed);
    eprintln!(
        "race: {:.1} s, {attempted} operations ({succeeded} succeeded: {}), {} swaps; escapes: {} outside changes, \
         {outside_reads} outside reads",
        started.elapsed().as_secs_f64(),
        per_kind.join(", "),
        swaps.load(Ordering::Relaxed),
        escapes.len(),
    );
    assert!(attempted > 100, "only {attempted} operations ran");
    assert!(succeeded > 0, "no operation succeeded: the race tested nothing");
    assert_eq!(outside_reads, 0, "reads returned data from outside the root");
    assert!(
        escapes.is_empty(),
        "{} changes outside the root, e.g. {:?}",
        escapes.len(),
        &escapes[..escapes.len().min(10)]
    );
}

/// The host alone races itself: `OpenFile /tN` (create) and `Symlink /tN ->
/// outside` sent back to back, so that the agent runs both at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_and_symlink_back_to_back_create_nothing_outside() {
    let agent = Agent::start("open-symlink");
    let outside = agent.outside();
    plant_outside(&outside);
    let before = snapshot(&outside);
    let client = agent.client(Duration::from_secs(30)).await;
    let write = FsOpenOptions { write: true, create: true, truncate: true, ..FsOpenOptions::default() };
    let started = Instant::now();
    let (mut rounds, mut opened) = (0u32, 0u32);
    while rounds < 3000 && started.elapsed() < Duration::from_secs(10) {
        rounds += 1;
        let (path, target) = (format!("/t{rounds}"), outside.join(format!("t{rounds}")).display().to_string());
        // Half of the rounds link to a file that does not exist yet, half to the outside directory.
        let (open_path, target) =
            if rounds % 2 == 0 { (path.clone(), target) } else { (format!("{path}/f"), outside.display().to_string()) };
        let open = client.fs(FsOp::OpenFile { path: open_path, options: write.clone() });
        let link = client.fs(FsOp::Symlink { target, link_path: path.clone(), user: None });
        let (opened_now, _) = tokio::join!(open, link);
        if let Ok(Some(FsResponseData::Handle(h))) = opened_now {
            opened += 1;
            let _ = client.fs(FsOp::CloseHandle { handle: h }).await;
        }
    }
    let escapes = differences(&before, &snapshot(&outside));
    eprintln!("open/symlink: {rounds} rounds, {opened} opens succeeded, {} changes outside", escapes.len());
    assert!(
        escapes.is_empty(),
        "{} changes outside the root, e.g. {:?}",
        escapes.len(),
        &escapes[..escapes.len().min(10)]
    );
}

/// A FIFO (and a socket) inside the root: opening, reading or copying them
/// is refused at once with the file type named, and the connection, the
/// agent's workers and later operations are unaffected, even after 520 tries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifos_and_sockets_are_refused_at_once_and_block_nothing() {
    let agent = Agent::start("fifo");
    let root = agent.root();
    nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
    std::fs::write(root.join("plain"), "plain").unwrap();
    let client = Arc::new(agent.client(Duration::from_secs(5)).await);

    let read = FsOpenOptions { read: true, ..FsOpenOptions::default() };
    let write = FsOpenOptions { write: true, ..FsOpenOptions::default() };
    let t = Instant::now();
    let refused = client.fs(FsOp::OpenFile { path: "/fifo".into(), options: read.clone() }).await;
    let message = format!("{:?}", refused.as_ref().err());
    assert!(refused.is_err() && message.contains("FIFO") && message.contains("/fifo"), "{refused:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "the refusal took {:?}", t.elapsed());
    client.ping().await.expect("a ping on the same connection is answered");

    let refused = client.fs(FsOp::OpenFile { path: "/sock".into(), options: read.clone() }).await;
    assert!(format!("{refused:?}").contains("socket"), "{refused:?}");
    let refused = client.fs(FsOp::Copy { src: "/fifo".into(), dst: "/copy".into() }).await;
    assert!(format!("{refused:?}").contains("FIFO"), "{refused:?}");
    let refused = client.fs(FsOp::Copy { src: "/plain".into(), dst: "/fifo".into() }).await;
    assert!(format!("{refused:?}").contains("FIFO"), "{refused:?}");

    // 520 at once: more than tokio's 512 blocking threads.
    let t = Instant::now();
    let mut tries = Vec::new();
    for i in 0..520 {
        let client = client.clone();
        let options = if i % 2 == 0 { read.clone() } else { write.clone() };
        tries.push(tokio::spawn(async move { client.fs(FsOp::OpenFile { path: "/fifo".into(), options }).await }));
    }
    let mut refusals = 0;
    for t in tries {
        let r = t.await.unwrap();
        assert!(format!("{r:?}").contains("FIFO"), "{r:?}");
        refusals += 1;
    }
    eprintln!("fifo: {refusals} opens refused in {:?}", t.elapsed());
    client.ping().await.expect("a ping after the FIFO opens");
    let mut got = Vec::new();
    client.read_file("/plain", &mut got).await.expect("a plain file still reads");
    assert_eq!(got, b"plain");
}

/// At most 1024 open handles per relay slot; a handle serves only ids of the
/// slot that opened it; a relay client's leaving closes its handles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_are_limited_and_scoped_to_the_relay_slot_that_opened_them() {
    let agent = Agent::start("handles");
    std::fs::write(agent.root().join("f"), "data").unwrap();
    let client = agent.client(Duration::from_secs(20)).await;
    let read = FsOpenOptions { read: true, ..FsOpenOptions::default() };
    let mut handles = Vec::new();
    for i in 0..1024 {
        match client.fs(FsOp::OpenFile { path: "/f".into(), options: read.clone() }).await {
            Ok(Some(FsResponseData::Handle(h))) => handles.push(h),
            other => panic!("open {i}: {other:?}"),
        }
    }
    let refused = client.fs(FsOp::OpenFile { path: "/f".into(), options: read.clone() }).await;
    assert!(refused.is_err(), "the 1025th handle was opened: {refused:?}");
    let message = format!("{}", refused.unwrap_err());
    assert!(message.contains("1024"), "{message}");
    let refused = client.fs(FsOp::OpenDir { path: "/".into() }).await;
    assert!(format!("{refused:?}").contains("1024"), "{refused:?}");
    client.fs(FsOp::CloseHandle { handle: handles.pop().unwrap() }).await.unwrap();
    let again = client.fs(FsOp::OpenFile { path: "/f".into(), options: read.clone() }).await;
    assert!(matches!(again, Ok(Some(FsResponseData::Handle(_)))), "{again:?}");
    drop(client);

    // Another connection has its own table; ids of slot 1 cannot use slot 2's handle.
    let mut raw = agent.raw().await;
    let (slot1, slot2) = (STEP + 7, 2 * STEP + 7);
    let r = raw_fs(&mut raw, slot1, FsOp::OpenFile { path: "/f".into(), options: read.clone() }).await;
    let Some(FsResponseData::Handle(h)) = r.data else { panic!("{r:?}") };
    let r = raw_fs(&mut raw, slot2, FsOp::FStat { handle: h }).await;
    assert!(!r.ok, "a handle of slot 1 served slot 2: {r:?}");
    assert!(r.error.as_deref().unwrap_or("").contains("slot"), "{r:?}");
    let r = raw_fs(&mut raw, slot2, FsOp::CloseHandle { handle: h }).await;
    assert!(!r.ok, "slot 2 closed slot 1's handle: {r:?}");
    let r = raw_fs(&mut raw, slot1 + 1, FsOp::FStat { handle: h }).await;
    assert!(r.ok, "{r:?}");

    // Slot 1's client leaves: its handle is closed.
    raw.send(Message::new(
        0,
        RelayClientDisconnected { id_start: STEP, id_end_exclusive: 2 * STEP, incarnation: None },
    ))
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut id = slot1 + 100;
    loop {
        id += 1;
        let r = raw_fs(&mut raw, id, FsOp::FStat { handle: h }).await;
        if !r.ok {
            assert!(r.error.as_deref().unwrap_or("").contains("no open handle"), "{r:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the handle of a client that left stayed open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// At most 4096 open handles per connection over all its relay slots: with
/// four slots full (1024 each), an open from a fifth slot is refused with an
/// error that names the limit, the agent goes on (a ping, an open on another
/// connection), and closing one handle makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_holds_at_most_4096_handles_over_all_its_slots() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    // 4096 handles are 4096 descriptors of the agent, which inherits this limit.
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let want = 8192.min(hard);
    assert!(want >= 4096 + 256, "RLIMIT_NOFILE's hard limit is {hard}: too low for 4096 open handles");
    if soft < want {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard).unwrap();
    }
    let agent = Agent::start("handles-total");
    std::fs::write(agent.root().join("f"), "data").unwrap();
    let mut raw = agent.raw().await;
    let read = FsOpenOptions { read: true, ..FsOpenOptions::default() };
    let open = FsOp::OpenFile { path: "/f".into(), options: read.clone() };
    let t = Instant::now();
    let mut first = None;
    for slot in 1..=4u32 {
        for i in 0..1024 {
            let r = raw_fs(&mut raw, slot * STEP + 1 + i, open.clone()).await;
            match r.data {
                Some(FsResponseData::Handle(h)) => _ = first.get_or_insert((slot * STEP + 1, h)),
                _ => panic!("slot {slot}, open {i}: {r:?}"),
            }
        }
    }
    let opened = t.elapsed();
    let refused = raw_fs(&mut raw, 5 * STEP + 1, open.clone()).await;
    let message = refused.error.clone().unwrap_or_default();
    eprintln!("4096 handles opened in {opened:?}; the 4097th (slot 5): {message:?}");
    assert!(!refused.ok, "a 4097th handle was opened: {refused:?}");
    assert!(message.contains("4096") && message.contains("connection"), "{message}");
    let refused = raw_fs(&mut raw, 5 * STEP + 2, FsOp::OpenDir { path: "/".into() }).await;
    assert!(!refused.ok && refused.error.unwrap_or_default().contains("4096"));
    // The agent goes on: this connection answers, and another has a table of its own.
    raw.send(Message::new(5 * STEP + 3, agentwire::payload::core::Ping {})).await.unwrap();
    assert_eq!(next(&mut raw).await.message_type().wire_name(), "core.pong");
    let other = agent.client(Duration::from_secs(20)).await;
    let h = other.fs(open.clone()).await.expect("another connection opens a file");
    assert!(matches!(h, Some(FsResponseData::Handle(_))), "{h:?}");
    // One closed, one more fits.
    let (id, h) = first.unwrap();
    let r = raw_fs(&mut raw, id + 2000, FsOp::CloseHandle { handle: h }).await;
    assert!(r.ok, "{r:?}");
    let r = raw_fs(&mut raw, 5 * STEP + 4, open).await;
    assert!(matches!(r.data, Some(FsResponseData::Handle(_))), "{r:?}");
}
