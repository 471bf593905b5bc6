//! The agent as PID 1 of a real VM: `agentwire vm --boot-only` starts QEMU
//! (software emulation) with the image from `vm/build.sh`, and the test speaks
//! the protocol to the guest over the virtio-serial port's Unix socket, for
//! both machine types.
//!
//! The two VM tests are `#[ignore]`d, so a plain `cargo test` shows them as
//! ignored; run them with `cargo test -p agentwire-cli --test vm --
//! --include-ignored` after `vm/build.sh` (as CI does). Run so without QEMU or
//! the image, they fail and say what is missing.
//!
//! The `reference_*` tests boot the reference guest agent, microsandbox-agentd
//! 0.6.14 (generation 7) and 0.7.13 (generation 10) from crates.io, as PID 1
//! of the guest (images from `vm/build-reference.sh VERSION`, in
//! target/vm-ref-VERSION or $AGENTWIRE_VM_REF_DIR/vm-ref-VERSION) and drive
//! it with our host client (agentwire-client). docs/INTEROP.md has the results.
//!
//! The `their_host_client_*` tests boot our image and drive our agent through
//! `agentwire relay` with the reference host client, microsandbox-agent-client
//! 0.7.13 (as tests/reference_host.rs does against a host agent).

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentwire::payload::bootstrap::{BootstrapEnvVar, GuestBootstrap};
use agentwire::payload::core::{ClockSync, InitAck, Ping, Shutdown};
use agentwire::payload::exec::{ExecRequest, ExecStdin};
use agentwire::payload::fs::{FS_CHUNK_SIZE, FsData, FsOp, FsOpenOptions, FsRequest, FsResponseData};
use agentwire::{Message, MessageCodec, Payload};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

const WAIT: Duration = Duration::from_secs(90);

fn image_dir() -> PathBuf {
    std::env::var_os("AGENTWIRE_VM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/vm"))
}

/// Fails the test, saying what is missing, unless a VM can be booted here.
fn require_vm(test: &str) {
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(qemu, "{test}: qemu-system-x86_64 is not installed (vm/build.sh installs it)");
    let image = image_dir();
    for f in ["vmlinuz", "initramfs.cpio.gz"] {
        assert!(image.join(f).is_file(), "{test}: no {} (vm/build.sh builds the image)", image.join(f).display());
    }
}

struct Vm {
    qemu: Child,
    framed: Framed<UnixStream, MessageCodec>,
    next_id: u32,
    _tmp: common::TempDir,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f).await.unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
}

impl Vm {
    async fn recv(&mut self) -> Message {
        let item = within("a frame from the guest", self.framed.next()).await;
        item.expect("the connection is open").expect("the stream is intact").expect("the frame decodes")
    }

    async fn send(&mut self, m: Message) {
        self.framed.send(m).await.unwrap();
    }

    fn id(&mut self) -> u32 {
        self.next_id += 1;
        self.next_id
    }

    /// Runs a command in the guest: its stdout and exit status.
    async fn exec(&mut self, argv: &[&str], stdin: &[u8]) -> (Vec<u8>, i32) {
        let id = self.id();
        let mut req = ExecRequest::new(argv[0]);
        req.args = argv[1..].iter().map(|&a| a.into()).collect();
        self.send(Message::new(id, req)).await;
        for data in [stdin, b""] {
            self.send(Message::new(id, ExecStdin { data: Bytes::copy_from_slice(data) })).await;
        }
        let mut out = Vec::new();
        loop {
            let m = self.recv().await;
            assert_eq!(m.id, id, "{m:?}");
            match m.payload {
                Payload::ExecStarted(_) | Payload::ExecStderr(_) | Payload::ExecStdinError(_) => {}
                Payload::ExecStdout(o) => out.extend_from_slice(&o.data),
                Payload::ExecExited(e) => return (out, e.code),
                other => panic!("{argv:?}: {other:?}"),
            }
        }
    }

    async fn fs(&mut self, op: FsOp) -> Option<FsResponseData> {
        let id = self.id();
        self.send(Message::new(id, FsRequest::new(op))).await;
        self.response(id).await
    }

    async fn response(&mut self, id: u32) -> Option<FsResponseData> {
        let m = self.recv().await;
        match m.payload {
            Payload::FsResponse(r) if r.ok && m.id == id => r.data,
            other => panic!("{other:?}"),
        }
    }

    async fn open(&mut self, path: &str, options: FsOpenOptions) -> u64 {
        match self.fs(FsOp::OpenFile { path: path.into(), options }).await {
            Some(FsResponseData::Handle(h)) => h,
            other => panic!("{other:?}"),
        }
    }

    fn guest_now(out: &[u8]) -> i64 {
        String::from_utf8_lossy(out).trim().parse().unwrap()
    }
}

fn unix_seconds() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Boots a VM, sends a bootstrap, takes the handshake; checks the boot figures.
async fn boot(machine: &str) -> Vm {
    let tmp = common::TempDir::new(&format!("vm-{machine}"));
    let socket = tmp.0.join("agent.sock");
    let started = Instant::now();
    let qemu = Command::new(env!("CARGO_BIN_EXE_agentwire"))
        .args(["vm", "--boot-only", "--machine", machine, "--image"])
        .arg(image_dir())
        .arg("--socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let stream = loop {
        match UnixStream::connect(&socket).await {
            Ok(s) => break s,
            Err(e) => {
                assert!(started.elapsed() < WAIT, "no socket from QEMU: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let mut vm = Vm { qemu, framed: Framed::new(stream, MessageCodec::new()), next_id: 0, _tmp: tmp };
    let bootstrap = GuestBootstrap {
        hostname: Some(format!("vmtest-{machine}")),
        default_env: vec![BootstrapEnvVar { key: "FROM_BOOTSTRAP".into(), value: "yes".into() }],
        default_cwd: Some("/tmp".into()),
        ..GuestBootstrap::default()
    };
    vm.send(Message::new(0, bootstrap)).await;
    // The deployed order (spec 10.2): core.init.resolved, our ack, then core.ready.
    let resolved = vm.recv().await;
    assert!(matches!(resolved.payload, Payload::InitResolved(ref i) if i.default_user.uid == 0), "{resolved:?}");
    vm.send(Message::new(0, InitAck::default())).await;
    let ready = vm.recv().await;
    let running_ns = started.elapsed().as_nanos() as u64;
    let Payload::Ready(r) = ready.payload else { panic!("{ready:?}") };
    eprintln!("{machine}: {r:?}, {running_ns} ns after start");
    assert!(r.boot_time_ns > 0 && r.init_time_ns > 0, "{r:?}");
    assert!(r.ready_time_ns >= r.boot_time_ns + r.init_time_ns, "{r:?}");
    // The guest's boot clock starts after QEMU does.
    assert!(r.ready_time_ns < running_ns, "{r:?} but QEMU has run {running_ns} ns");
    assert!(r.agent_version.starts_with("agentwire "), "{r:?}");
    vm
}

async fn full_session(machine: &str) {
    let mut vm = boot(machine).await;

    // The guest's own kernel, not the host's.
    let (out, code) = vm.exec(&["uname", "-r"], b"").await;
    let guest_release = String::from_utf8(out).unwrap();
    let image_release = std::fs::read_to_string(image_dir().join("kernel-release")).unwrap();
    let host_release = String::from_utf8(Command::new("uname").arg("-r").output().unwrap().stdout).unwrap();
    assert_eq!((code, guest_release.trim()), (0, image_release.trim()));
    assert_ne!(guest_release.trim(), host_release.trim());

    // The bootstrap's hostname, environment and working directory.
    let (out, _) = vm.exec(&["sh", "-c", "echo $(hostname) $FROM_BOOTSTRAP $(pwd)"], b"").await;
    assert_eq!(String::from_utf8_lossy(&out), format!("vmtest-{machine} yes /tmp\n"));

    // Orphans are reaped by init: a background child outlives its shell, then ends.
    let (_, code) = vm.exec(&["sh", "-c", "sleep 0.2 & exit 0"], b"").await;
    assert_eq!(code, 0);
    let zombies = "sleep 1; grep -l '^State:.Z' /proc/[0-9]*/status | wc -l";
    let (out, _) = vm.exec(&["sh", "-c", zombies], b"").await;
    assert_eq!(String::from_utf8_lossy(&out).trim(), "0", "zombies left in the guest");

    // stdin through cat.
    let input = b"through virtio-serial and back\n".repeat(1000);
    let (out, code) = vm.exec(&["cat"], &input).await;
    assert_eq!((code, out.len()), (0, input.len()));
    assert!(out == input);

    // 16 MiB written with core.fs.data and read back.
    let data: Vec<u8> = (0..16u32 << 20).map(|i| (i ^ (i >> 9) ^ (i >> 17)) as u8).collect();
    let h = vm
        .open("/tmp/big.bin", FsOpenOptions { write: true, create: true, truncate: true, ..Default::default() })
        .await;
    let id = vm.id();
    vm.send(Message::new(id, FsRequest::new(FsOp::Write { handle: h, offset: 0, len: Some(data.len() as u64) }))).await;
    for chunk in data.chunks(FS_CHUNK_SIZE).chain([&[][..]]) {
        vm.send(Message::new(id, FsData { data: Bytes::copy_from_slice(chunk) })).await;
    }
    vm.response(id).await;
    vm.fs(FsOp::CloseHandle { handle: h }).await;
    let h = vm.open("/tmp/big.bin", FsOpenOptions { read: true, ..Default::default() }).await;
    let id = vm.id();
    vm.send(Message::new(id, FsRequest::new(FsOp::Read { handle: h, offset: 0, len: None }))).await;
    let mut back = Vec::with_capacity(data.len());
    loop {
        let m = vm.recv().await;
        match m.payload {
            Payload::FsData(d) => back.extend_from_slice(&d.data),
            Payload::FsResponse(r) => {
                assert!(r.ok, "{r:?}");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(back == data, "{} bytes came back", back.len());

    // The guest clock follows core.clock.sync: a day back, then to the host's time.
    for offset in [-86_400i64, 0] {
        let before = unix_seconds();
        let target = (before + offset) as u64 * 1_000_000_000;
        vm.send(Message::new(0, ClockSync { unix_time_nanos: target })).await;
        let (out, _) = vm.exec(&["date", "+%s"], b"").await;
        let (guest, after) = (Vm::guest_now(&out), unix_seconds());
        assert!(
            guest >= before + offset - 1 && guest <= after + offset + 1,
            "offset {offset}: guest {guest}, host {before}..{after}"
        );
    }

    // An unknown type: core.error on its id, and the session goes on.
    let id = vm.id();
    vm.framed.get_mut().write_all(&common::frame(id, 0, "core.future.thing", b"\xa0")).await.unwrap();
    let m = vm.recv().await;
    assert!(matches!(&m.payload, Payload::Error(e) if e.kind.as_str() == "unsupported_message_type"), "{m:?}");
    assert_eq!(m.id, id);
    let id = vm.id();
    vm.send(Message::new(id, Ping {})).await;
    assert!(matches!(vm.recv().await.payload, Payload::Pong(_)));

    // Shutdown powers the VM off: QEMU ends with status 0 within 10 s.
    let asked = Instant::now();
    vm.send(Message::new(0, Shutdown)).await;
    assert!(within("the connection to close", vm.framed.next()).await.is_none());
    let status = loop {
        if let Some(status) = vm.qemu.try_wait().unwrap() {
            break status;
        }
        assert!(asked.elapsed() < Duration::from_secs(10), "QEMU still runs 10 s after core.shutdown");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
}

#[tokio::test]
#[ignore = "boots QEMU: build the image with vm/build.sh, then run with --include-ignored"]
async fn q35_guest_serves_the_protocol_over_virtio_serial_pci() {
    require_vm("q35");
    full_session("q35").await;
}

#[tokio::test]
#[ignore = "boots QEMU: build the image with vm/build.sh, then run with --include-ignored"]
async fn microvm_guest_serves_the_protocol_over_virtio_mmio() {
    require_vm("microvm");
    full_session("microvm").await;
}

// ---- the reference agent (microsandbox-agentd) as init, our host client --

fn reference_image(version: &str) -> PathBuf {
    let base = std::env::var_os("AGENTWIRE_VM_REF_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    base.join(format!("vm-ref-{version}"))
}

/// Fails the test, saying what is missing, unless the reference image can be booted here.
fn require_reference(version: &str) {
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(qemu, "reference {version}: qemu-system-x86_64 is not installed (vm/build-reference.sh installs it)");
    let image = reference_image(version);
    for f in ["vmlinuz", "initramfs.cpio.gz", "reference"] {
        assert!(
            image.join(f).is_file(),
            "reference {version}: no {} (vm/build-reference.sh {version} builds it)",
            image.join(f).display()
        );
    }
}

/// `agentwire vm --boot-only` with a reference image: QEMU (and virtiofsd)
/// killed when dropped.
struct ReferenceVm {
    vm: Child,
    _tmp: common::TempDir,
}

impl Drop for ReferenceVm {
    fn drop(&mut self) {
        let _ = self.vm.kill();
        let _ = self.vm.wait();
    }
}

/// Every frame of both directions, whole (the client's capture).
#[derive(Clone, Default)]
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    /// How many frames carry the type `name` (its CBOR text string; the host
    /// sends none of the types counted here).
    fn count(&self, name: &str) -> usize {
        let mut needle = vec![if name.len() < 24 { 0x60 + name.len() as u8 } else { 0x78 }];
        if name.len() >= 24 {
            needle.push(name.len() as u8);
        }
        needle.extend_from_slice(name.as_bytes());
        self.0.lock().unwrap().windows(needle.len()).filter(|w| *w == &needle[..]).count()
    }
}

/// Starts `agentwire vm --boot-only` with the reference image and connects to
/// the agent's port (QEMU listens with wait=on: the guest starts once this connects).
async fn start_reference(version: &str, machine: &str) -> (ReferenceVm, UnixStream, Instant) {
    let tmp = common::TempDir::new(&format!("vm-ref-{version}-{machine}"));
    let socket = tmp.0.join("agent.sock");
    let started = Instant::now();
    let vm = Command::new(env!("CARGO_BIN_EXE_agentwire"))
        .args(["vm", "--boot-only", "--machine", machine, "--image"])
        .arg(reference_image(version))
        .arg("--socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut vm = ReferenceVm { vm, _tmp: tmp };
    let stream = loop {
        match UnixStream::connect(&socket).await {
            Ok(s) => break s,
            Err(e) => {
                assert!(vm.vm.try_wait().unwrap().is_none(), "agentwire vm ended before QEMU listened");
                assert!(started.elapsed() < WAIT, "no socket from QEMU: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    (vm, stream, started)
}

async fn boot_reference(
    version: &str,
    machine: &str,
    capture: Capture,
) -> (ReferenceVm, agentwire_client::Client, Duration) {
    let (vm, stream, started) = start_reference(version, machine).await;
    let bootstrap = GuestBootstrap {
        hostname: Some("interop".into()),
        default_env: vec![BootstrapEnvVar { key: "FROM_BOOTSTRAP".into(), value: "yes".into() }],
        default_cwd: Some("/tmp".into()),
        ..GuestBootstrap::default()
    };
    let client = within(
        "the start-up exchange",
        agentwire_client::Client::builder()
            .bootstrap(bootstrap)
            .handshake_timeout(WAIT)
            .request_timeout(WAIT)
            .capture(capture)
            .connect(stream),
    )
    .await
    .unwrap_or_else(|e| panic!("reference {version}: start-up exchange: {e}"));
    (vm, client, started.elapsed())
}

/// Runs `argv` with `stdin`: (stdout, stderr, exit code). The input is written
/// by a task of its own while the output is read, as a controlled execution
/// needs (its writer waits for the agent's stdin acks; the agent waits for
/// output acks).
async fn run(client: &agentwire_client::Client, argv: &[&str], stdin: &[u8]) -> (Vec<u8>, Vec<u8>, i32) {
    use agentwire_client::ExecEvent;
    let mut exec = within("exec", client.exec(agentwire_client::Command::new(argv[0]).args(argv[1..].iter().copied())))
        .await
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let input = exec.input();
    let data = Bytes::copy_from_slice(stdin);
    let writer = tokio::spawn(async move {
        for at in (0..data.len()).step_by(64 << 10) {
            input.write(data.slice(at..(at + (64 << 10)).min(data.len()))).await?;
        }
        input.close().await
    });
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = loop {
        match within("the command's output", exec.next()).await.unwrap_or_else(|e| panic!("{argv:?}: {e}")) {
            Some(ExecEvent::Stdout(d)) => out.extend_from_slice(&d),
            Some(ExecEvent::Stderr(d)) => err.extend_from_slice(&d),
            Some(ExecEvent::Exited(status)) => break status.code().unwrap_or(-1),
            Some(_) => {}
            None => panic!("{argv:?}: no exit"),
        }
    };
    let written = writer.await.unwrap();
    assert!(written.is_ok() || code != 0, "{argv:?}: stdin: {written:?}");
    (out, err, code)
}

async fn reference_session(version: &str, generation: u8, machine: &str) {
    require_reference(version);
    let capture = Capture::default();
    let (mut vm, client, greeted) = boot_reference(version, machine, capture.clone()).await;
    let r = client.ready().clone();
    eprintln!("reference {version} on {machine}: {r:?}; core.ready {greeted:?} after QEMU started");

    // The versions: the agent's generation, and the lower of it and ours (10) on the wire.
    assert_eq!(r.agent_version, version, "{r:?}");
    assert_eq!((client.agent_generation(), client.negotiated()), (generation, generation.min(10)));
    // A generation-10 agent takes our bootstrap's execution policy (the client's
    // default) and advertises it; executions are then controlled (spec 8).
    let limits = r.capabilities().exec_limits;
    assert_eq!(limits.is_some(), generation >= 10, "{r:?}");
    assert_eq!(client.exec_limits().is_some(), generation >= 10);
    assert!(r.boot_time_ns > 0 && r.ready_time_ns >= r.boot_time_ns + r.init_time_ns, "{r:?}");
    assert_eq!(client.default_user().map(|u| (u.uid, u.gid)), Some((0, 0)));

    // The guest's own kernel, and the bootstrap's hostname, environment and working directory.
    let (out, _, code) = run(&client, &["uname", "-r"], b"").await;
    let release = std::fs::read_to_string(reference_image(version).join("kernel-release")).unwrap();
    assert_eq!((code, String::from_utf8_lossy(&out).trim()), (0, release.trim()));
    let (out, _, _) = run(&client, &["sh", "-c", "echo $(hostname) $FROM_BOOTSTRAP $(pwd) $$"], b"").await;
    let said = String::from_utf8_lossy(&out);
    assert!(said.starts_with("interop yes /tmp "), "{said}");

    // The agent is PID 1, and has mounted the virtiofs share.
    let (out, _, _) =
        run(&client, &["sh", "-c", "cat /proc/1/comm; grep -c ' /.msb virtiofs ' /proc/mounts"], b"").await;
    assert_eq!(String::from_utf8_lossy(&out), "agentd\n1\n");

    // core.clock.sync steps the guest's clock (no reply): a day back, then to the host's time.
    for offset in [-86_400i64, 0] {
        let before = unix_seconds();
        client.clock_sync(UNIX_EPOCH + Duration::from_secs((before + offset) as u64)).await.unwrap();
        let (out, _, _) = run(&client, &["date", "+%s"], b"").await;
        let (guest, after) = (Vm::guest_now(&out), unix_seconds());
        assert!(
            guest >= before + offset - 1 && guest <= after + offset + 1,
            "offset {offset}: guest {guest}, host {before}..{after}"
        );
    }

    // stdin, stdout, stderr and the exit code.
    // 4.4 MB: past the default output allowance (1 MiB) and stdin allowance
    // (64 KiB), so that a generation-10 agent waits for our acks both ways.
    let input = b"our host, their agent\n".repeat(200_000);
    let (out, err, code) = run(&client, &["sh", "-c", "cat; echo to-stderr >&2; exit 3"], &input).await;
    assert_eq!((code, out.len(), String::from_utf8_lossy(&err).as_ref()), (3, input.len(), "to-stderr\n"));
    assert!(out == input, "stdout differs from stdin");

    // A program that does not exist: core.exec.failed, kind not_found.
    match within("exec", client.exec(agentwire_client::Command::new("/no/such/program"))).await {
        Err(agentwire_client::ClientError::ExecFailed(f)) => {
            eprintln!("reference {version}: {f:?}");
            assert_eq!(f.kind.as_str(), "not_found", "{f:?}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("/no/such/program started"),
    }

    // A signal: the exit code is -1.
    let mut exec = within("exec", client.exec(agentwire_client::Command::new("sleep").arg("60"))).await.unwrap();
    assert!(matches!(exec.next().await.unwrap(), Some(agentwire_client::ExecEvent::Started(pid)) if pid > 1));
    exec.input().signal(15).await.unwrap();
    let status = loop {
        match within("core.exec.exited", exec.next()).await.unwrap() {
            Some(agentwire_client::ExecEvent::Exited(status)) => break status,
            Some(_) => {}
            None => panic!("no exit"),
        }
    };
    assert!(status.signaled() && status.code().is_none(), "{status:?}");

    // Files: mkdir, a 5 MiB write, stat, list, read back, remove.
    const SIZE: usize = 5 << 20;
    let data: Vec<u8> = (0..SIZE as u32).map(|i| (i ^ (i >> 9) ^ (i >> 17)) as u8).collect();
    client.mkdir("/tmp/interop", None).await.unwrap();
    let written = within("write", client.write_file("/tmp/interop/big.bin", &data[..], Some(SIZE as u64))).await;
    assert_eq!(written.unwrap(), SIZE as u64);
    let st = client.stat("/tmp/interop/big.bin", true).await.unwrap();
    assert_eq!((st.kind.as_str(), st.size), ("file", SIZE as u64), "{st:?}");
    let names: Vec<String> = client.list("/tmp/interop").await.unwrap().into_iter().map(|e| e.path).collect();
    assert!(names.iter().any(|n| n.ends_with("big.bin")), "{names:?}");
    let mut back = Vec::with_capacity(SIZE);
    let read = within("read", client.read_file("/tmp/interop/big.bin", &mut back)).await;
    assert_eq!(read.unwrap(), SIZE as u64);
    assert!(back == data, "the file read back differs");
    let (out, _, _) = run(&client, &["sh", "-c", "wc -c < /tmp/interop/big.bin"], b"").await;
    assert_eq!(String::from_utf8_lossy(&out).trim(), SIZE.to_string());
    client.remove("/tmp/interop/big.bin").await.unwrap();
    assert!(client.stat("/tmp/interop/big.bin", true).await.is_err(), "removed, yet stat works");
    client.remove_dir("/tmp/interop", false).await.unwrap();

    // TCP from the guest to an echo server inside it (busybox nc running cat, on loopback).
    let server =
        within("exec", client.exec(agentwire_client::Command::new("nc").args(["-l", "-p", "7777", "-e", "cat"])))
            .await
            .unwrap();
    let t = Instant::now();
    let mut tcp = loop {
        match client.tcp_connect("127.0.0.1", 7777).await {
            Ok(s) => break s,
            Err(agentwire_client::ClientError::TcpFailed(e)) if t.elapsed() < Duration::from_secs(20) => {
                eprintln!("reference {version}: tcp: {e}; again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    let payload = b"echo through their agent\n".repeat(4000);
    for chunk in payload.chunks(16 << 10) {
        tcp.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    tcp.shutdown_write().await.unwrap();
    let mut echoed = Vec::new();
    while let Some(d) = within("tcp data", tcp.read()).await.unwrap() {
        echoed.extend_from_slice(&d);
    }
    assert!(echoed == payload, "{} of {} bytes echoed", echoed.len(), payload.len());
    if generation >= 10 {
        // 0.7.13 ends the id with core.tcp.closed (TERMINAL) once both halves
        // are closed: the session is then over, and core.tcp.close has no id to go on.
        let t = Instant::now();
        while capture.count("core.tcp.closed") == 0 {
            assert!(t.elapsed() < Duration::from_secs(10), "no core.tcp.closed from 0.7.13");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Closing what the agent already closed is done, not an error.
        let closed = tcp.close().await;
        assert!(closed.is_ok(), "{closed:?}");
    } else {
        // 0.6.14 sends no core.tcp.closed: core.tcp.close ends the connection (no reply).
        tcp.close().await.unwrap();
    }
    let served = within("the echo server's end", server.output()).await.unwrap();
    assert!(served.status.success(), "{served:?}");

    // Ping.
    for _ in 0..20 {
        within("pong", client.ping()).await.unwrap();
    }

    // What only 0.7.13 sends (spec 9.1, 10.6): input-credit reports on id
    // 0xFFFFFFFF, which a generation-7 host discards, and core.tcp.closed once
    // both halves of a connection are closed.
    let (credits, tcp_closed) = (capture.count("core.workload.transport.credit"), capture.count("core.tcp.closed"));
    eprintln!("reference {version}: {credits} core.workload.transport.credit, {tcp_closed} core.tcp.closed");
    let (output_acks, stdin_acks) = (capture.count("core.exec.output.ack"), capture.count("core.exec.stdin.ack"));
    eprintln!("reference {version}: {output_acks} core.exec.output.ack, {stdin_acks} core.exec.stdin.ack");
    if generation >= 10 {
        assert!(credits > 0 && tcp_closed == 1, "{credits} credit reports, {tcp_closed} core.tcp.closed");
        assert!(output_acks > 0 && stdin_acks > 0, "{output_acks} output acks, {stdin_acks} stdin acks");
    } else {
        assert_eq!((credits, tcp_closed, output_acks, stdin_acks), (0, 0, 0, 0));
    }

    // Shutdown powers the guest off: QEMU, and so `agentwire vm`, end with status 0.
    let asked = Instant::now();
    within("the agent to close the port", client.shutdown(Duration::from_secs(30))).await.unwrap();
    let status = loop {
        if let Some(status) = vm.vm.try_wait().unwrap() {
            break status;
        }
        assert!(asked.elapsed() < Duration::from_secs(30), "QEMU still runs 30 s after core.shutdown");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
    eprintln!("reference {version}: powered off {:?} after core.shutdown", asked.elapsed());
}

#[tokio::test]
#[ignore = "boots QEMU: build the image with vm/build-reference.sh 0.6.14, then run with --include-ignored"]
async fn reference_0_6_14_generation_7_serves_our_host_client_q35() {
    reference_session("0.6.14", 7, "q35").await;
}

#[tokio::test]
#[ignore = "boots QEMU: build the image with vm/build-reference.sh 0.6.14, then run with --include-ignored"]
async fn reference_0_6_14_generation_7_serves_our_host_client_microvm() {
    reference_session("0.6.14", 7, "microvm").await;
}

#[tokio::test]
#[ignore = "boots QEMU: build the image with vm/build-reference.sh 0.7.13, then run with --include-ignored"]
async fn reference_0_7_13_generation_10_serves_our_host_client_q35() {
    reference_session("0.7.13", 10, "q35").await;
}

#[tokio::test]
#[ignore = "boots QEMU: build the image with vm/build-reference.sh 0.7.13, then run with --include-ignored"]
async fn reference_0_7_13_generation_10_serves_our_host_client_microvm() {
    reference_session("0.7.13", 10, "microvm").await;
}

/// A start-up failure (the bootstrap names a user the guest lacks): 0.7.13
/// says why with core.error initialization_failed, 0.6.14 exits without a
/// word (spec 10.10); either way the agent, PID 1, ends and so does the VM.
#[tokio::test]
#[ignore = "boots QEMU: build the images with vm/build-reference.sh 0.6.14 0.7.13, then run with --include-ignored"]
async fn reference_startup_failure_reaches_our_host_client() {
    for version in ["0.6.14", "0.7.13"] {
        require_reference(version);
        let (mut vm, stream, _) = start_reference(version, "q35").await;
        let bootstrap = GuestBootstrap { user: Some("nosuchuser".into()), ..GuestBootstrap::default() };
        let result = within(
            "the start-up exchange",
            agentwire_client::Client::builder().bootstrap(bootstrap).handshake_timeout(WAIT).connect(stream),
        )
        .await;
        let Err(e) = result else { panic!("reference {version}: started with a user that does not exist") };
        let said = e.to_string();
        eprintln!("reference {version}: {said}");
        if version == "0.6.14" {
            assert!(said.contains("closed"), "{said}");
        } else {
            assert!(said.contains("initialization_failed") && said.contains("nosuchuser"), "{said}");
        }
        let t = Instant::now();
        while vm.vm.try_wait().unwrap().is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "reference {version}: the VM runs on 30 s after the failure"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `agentwire vm` itself against the reference agent: the command's output
/// and exit status, then power-off.
#[test]
#[ignore = "boots QEMU: build the images with vm/build-reference.sh 0.6.14 0.7.13, then run with --include-ignored"]
fn reference_agentwire_vm_runs_a_command_and_powers_off() {
    for version in ["0.6.14", "0.7.13"] {
        require_reference(version);
        let image = reference_image(version);
        let image = image.to_str().unwrap();
        let out =
            common::agentwire(&["vm", "--image", image, "--", "sh", "-c", "uname -s; echo oops >&2; exit 7"], b"");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(7), "{version}: {err}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "Linux\n", "{version}: {err}");
        assert!(err.contains("oops\n"), "{err}");
        assert!(err.contains(&format!("{version} (generation")) && err.contains("powered off"), "{err}");
    }
}

#[test]
fn vm_says_plainly_what_is_missing() {
    let out = common::agentwire(&["vm", "--image", "/nonexistent/agentwire-image"], b"");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vm/build.sh") && (err.contains("not installed") || err.contains("no /nonexistent")), "{err}");
}

// ---- their host client (microsandbox-agent-client 0.7.13) through our relay to our guest --

/// Our agent as PID 1 of a VM, `agentwire relay` in front of its port, and the
/// reference host client on the relay's socket. The helpers are those of
/// tests/reference_host.rs, which runs the same client against a host agent.
#[path = "common/their_client.rs"]
mod shared_client;

mod their_client {

    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use microsandbox_agent_client::{AgentClient, TypedMessage};
    use microsandbox_protocol::core::Ping;
    use microsandbox_protocol::exec::{ExecFailureKind, ExecSignal};
    use microsandbox_protocol::fs::{
        FS_CHUNK_SIZE, FsData, FsOp, FsOpenOptions, FsRequest, FsResponse, FsResponseData,
    };
    use microsandbox_protocol::message::{FLAG_TERMINAL, Message as WireMessage, MessageType};

    use super::shared_client::{Exec, exec_request, fs, fs_ok, open, run};
    use super::{WAIT, common, image_dir, require_vm, within};

    /// `agentwire vm --boot-only` and `agentwire relay` on its port; both killed on drop.
    struct RelayedVm {
        vm: Child,
        relay: Child,
        socket: PathBuf,
        /// What the relay wrote on standard error (it runs with `-v`).
        log: Arc<Mutex<String>>,
        _tmp: common::TempDir,
    }

    impl Drop for RelayedVm {
        fn drop(&mut self) {
            for child in [&mut self.relay, &mut self.vm] {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    impl RelayedVm {
        fn log(&self) -> String {
            self.log.lock().unwrap().clone()
        }
    }

    /// Boots our image, waits for QEMU's socket, and starts the relay on it
    /// (which runs the start-up exchange with the guest as its host).
    fn start(machine: &str) -> (RelayedVm, Duration) {
        require_vm(machine);
        let tmp = common::TempDir::new(&format!("vm-theirs-{machine}"));
        let agent = tmp.0.join("agent.sock");
        let socket = tmp.0.join("relay.sock");
        let started = Instant::now();
        let mut vm = Command::new(env!("CARGO_BIN_EXE_agentwire"))
            .args(["vm", "--boot-only", "--machine", machine, "--image"])
            .arg(image_dir())
            .arg("--socket")
            .arg(&agent)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        // QEMU listens with wait=off: the guest boots at once, and its agent
        // waits for a host. Between QEMU's bind and listen a connection is
        // refused, so the relay is started again while it says so.
        let (relay, log) = loop {
            while !agent.exists() {
                if let Some(status) = vm.try_wait().unwrap() {
                    panic!("{machine}: agentwire vm ended with {status} before QEMU listened");
                }
                assert!(started.elapsed() < WAIT, "{machine}: no socket from QEMU within {WAIT:?}");
                std::thread::sleep(Duration::from_millis(20));
            }
            match common::start_relay(&agent, &socket, None, WAIT) {
                Ok(r) => break r,
                Err(log) if log.contains("cannot connect") && started.elapsed() < WAIT => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(log) => {
                    let _ = vm.kill();
                    let _ = vm.wait();
                    panic!("{machine}: the relay did not become ready:\n{log}");
                }
            }
        };
        let ready = started.elapsed();
        (RelayedVm { vm, relay, socket, log, _tmp: tmp }, ready)
    }

    async fn ping(client: &AgentClient) {
        let pong = within("a ping", client.request(TypedMessage::new(MessageType::Ping, Ping {}))).await.unwrap();
        assert_eq!(pong.t, "core.pong");
        assert_ne!(pong.flags & FLAG_TERMINAL, 0);
    }

    pub(super) async fn session(machine: &str) {
        let t0 = Instant::now();
        let (mut vm, ready) = start(machine);
        let connect = AgentClient::connect_with(&vm.socket, |o| o.setup_timeout(WAIT));
        let client = match within("connecting", connect).await {
            Ok(client) => client,
            Err(e) => panic!("{machine}: their client cannot connect to our relay: {e}\n{}", vm.log()),
        };
        let r = client.ready();
        eprintln!(
            "{machine}: relay ready {ready:?} after start; their client negotiated generation {} with {:?}",
            r.negotiated_version,
            r.agent_version()
        );
        assert!(r.agent_version().starts_with("agentwire "), "{:?}", r.agent_version());

        // Ping.
        for _ in 0..3 {
            ping(&client).await;
        }

        // stdin, stdout, stderr and the exit code, in the guest.
        let mut exec = Exec::start(&client, &exec_request("sh", &["-c", "cat; uname -s >&2; exit 3"])).await;
        let pid = exec.started(&client).await;
        assert!(pid > 1, "pid {pid}");
        let input = b"their host, our relay, our guest\n".repeat(10_000);
        for chunk in input.chunks(32 << 10) {
            exec.stdin(&client, chunk).await;
        }
        exec.stdin(&client, b"").await; // EOF
        let out = exec.finish(&client).await;
        assert_eq!((out.exit, out.stdout.len()), (Some(3), input.len()), "stderr {:?}", out.stderr);
        assert!(out.stdout == input, "stdout differs from stdin");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "Linux\n");
        assert!(out.failed.is_none() && out.other.is_empty() && out.stdin_errors.is_empty(), "{:?}", out.other);

        // A program that does not exist: core.exec.failed, kind not_found.
        for cmd in ["agentwire-no-such-program", "/nonexistent/agentwire-no-such-program"] {
            let out = Exec::start(&client, &exec_request(cmd, &["x"])).await.finish(&client).await;
            let failed = out.failed.as_ref().unwrap_or_else(|| panic!("{cmd}: no core.exec.failed: {out:?}"));
            assert_eq!(failed.kind, ExecFailureKind::NotFound, "{cmd}: {failed:?}");
            assert!(out.pid.is_none() && out.exit.is_none(), "{cmd}: {out:?}");
        }

        // A signal to a running command: exit code -1.
        let mut exec = Exec::start(&client, &exec_request("sleep", &["60"])).await;
        let pid = exec.started(&client).await;
        let signal = TypedMessage::new(MessageType::ExecSignal, ExecSignal { signal: 15 });
        client.send(exec.id, signal).await.expect("core.exec.signal goes out");
        let asked = Instant::now();
        let out = exec.finish(&client).await;
        assert_eq!(out.exit, Some(-1), "killed by a signal: {out:?}");
        assert!(asked.elapsed() < Duration::from_secs(30), "sleep 60 ended by itself?");
        let gone = run(&client, &["sh", "-c", &format!("test -e /proc/{pid} && echo alive || echo gone")]).await;
        assert_eq!(String::from_utf8_lossy(&gone.stdout), "gone\n", "pid {pid} in the guest");

        // A 5 MiB file under /tmp: write, stat, read back, remove.
        const SIZE: usize = 5 << 20;
        const PATH: &str = "/tmp/their-client.bin";
        let content: Vec<u8> = (0..SIZE).map(|i| (i * 31 % 251) as u8).collect();
        let t = Instant::now();
        let write =
            FsOpenOptions { write: true, create: true, truncate: true, mode: Some(0o644), ..Default::default() };
        let handle = open(&client, PATH, write).await;
        let op = FsOp::Write { handle, offset: 0, len: Some(SIZE as u64) };
        let open_write = client.stream(TypedMessage::new(MessageType::FsRequest, FsRequest { op, bulk: None }));
        let (sender, mut rx) = within("opening the write", open_write).await.unwrap().into_parts();
        for chunk in content.chunks(FS_CHUNK_SIZE).chain([&[][..]]) {
            let m = TypedMessage::new(MessageType::FsData, FsData { data: chunk.to_vec() });
            within("a core.fs.data", sender.send(m)).await.expect("core.fs.data goes out");
        }
        let reply = within("the write's response", rx.recv()).await.unwrap().expect("a core.fs.response");
        assert_eq!(reply.t, "core.fs.response");
        let response = reply.payload::<FsResponse>().unwrap();
        assert!(response.ok, "the write: {:?}", response.error);
        fs_ok(&client, FsOp::CloseHandle { handle }).await;
        let wrote = t.elapsed();

        match fs_ok(&client, FsOp::Stat { path: PATH.into(), follow_symlink: true }).await {
            Some(FsResponseData::Stat(info)) => {
                assert_eq!((info.kind.as_str(), info.size), ("file", SIZE as u64), "{info:?}")
            }
            other => panic!("Stat: {other:?}"),
        }
        let counted = run(&client, &["sh", "-c", &format!("wc -c < {PATH}")]).await;
        assert_eq!(String::from_utf8_lossy(&counted.stdout).trim(), SIZE.to_string(), "the guest's wc -c");

        let t = Instant::now();
        let handle = open(&client, PATH, FsOpenOptions { read: true, ..Default::default() }).await;
        let op = FsOp::Read { handle, offset: 0, len: None };
        let open_read = client.stream(TypedMessage::new(MessageType::FsRequest, FsRequest { op, bulk: None }));
        let (_sender, mut rx) = within("opening the read", open_read).await.unwrap().into_parts();
        let mut read = Vec::with_capacity(SIZE);
        let response = within("the read", async {
            loop {
                let m = rx.recv().await.unwrap().expect("the read's frames");
                match m.t.as_str() {
                    "core.fs.data" => read.extend(m.payload::<FsData>().unwrap().data),
                    "core.fs.response" => break m.payload::<FsResponse>().unwrap(),
                    other => panic!("{other} in a read"),
                }
            }
        })
        .await;
        assert!(response.ok, "the read: {:?}", response.error);
        assert_eq!(read.len(), SIZE);
        assert!(read == content, "the bytes read back differ");
        fs_ok(&client, FsOp::CloseHandle { handle }).await;
        eprintln!("{machine}: 5 MiB written in {wrote:?}, read back in {:?}", t.elapsed());

        fs_ok(&client, FsOp::Remove { path: PATH.into() }).await;
        let gone = fs(&client, FsOp::Stat { path: PATH.into(), follow_symlink: true }).await;
        assert!(!gone.ok && gone.error.is_some(), "{gone:?}");
        ping(&client).await;

        // core.shutdown: id 0, flags SHUTDOWN, payload CBOR null, sent as
        // exact bytes (the one id-0 frame a client may send). The guest powers
        // off: the connection, the relay and QEMU end, QEMU with status 0.
        let mut packet = Vec::new();
        let shutdown = WireMessage::new(MessageType::Shutdown, 0, vec![0xf6]);
        microsandbox_protocol::codec::encode_to_buf(&shutdown, &mut packet).unwrap();
        assert_eq!(packet[8], 0x04, "flags SHUTDOWN");
        let asked = Instant::now();
        client.write_unchecked(packet).await.expect("core.shutdown goes out");
        within("the connection's end", client.closed()).await;
        let status = loop {
            if let Some(status) = vm.vm.try_wait().unwrap() {
                break status;
            }
            assert!(asked.elapsed() < Duration::from_secs(30), "QEMU still runs 30 s after core.shutdown");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(status.success(), "{machine}: agentwire vm --boot-only ended with {status}");
        let powered_off = asked.elapsed();
        let relay_end = loop {
            if let Some(status) = vm.relay.try_wait().unwrap() {
                break status;
            }
            assert!(asked.elapsed() < Duration::from_secs(30), "the relay runs on after the guest powered off");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        eprintln!(
            "{machine}: powered off {powered_off:?} after core.shutdown (relay: {relay_end}); {:?} in all",
            t0.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots QEMU: build the image with vm/build.sh, then run with --include-ignored"]
async fn their_host_client_through_our_relay_drives_our_q35_guest() {
    their_client::session("q35").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots QEMU: build the image with vm/build.sh, then run with --include-ignored"]
async fn their_host_client_through_our_relay_drives_our_microvm_guest() {
    their_client::session("microvm").await;
}
