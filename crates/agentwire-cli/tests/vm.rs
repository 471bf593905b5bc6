//! The agent as PID 1 of a real VM: `agentwire vm --boot-only` starts QEMU
//! (software emulation) with the image from `vm/build.sh`, and the test speaks
//! the protocol to the guest over the virtio-serial port's Unix socket, for
//! both machine types.
//!
//! The two VM tests are `#[ignore]`d, so a plain `cargo test` shows them as
//! ignored; run them with `cargo test -p agentwire-cli --test vm --
//! --include-ignored` after `vm/build.sh` (as CI does). Run so without QEMU or
//! the image, they fail and say what is missing.

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
        req.args = argv[1..].iter().map(|a| a.to_string()).collect();
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
        self.send(Message::new(id, FsRequest { op })).await;
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
    let ready = vm.recv().await;
    let running_ns = started.elapsed().as_nanos() as u64;
    let Payload::Ready(r) = ready.payload else { panic!("{ready:?}") };
    eprintln!("{machine}: {r:?}, {running_ns} ns after start");
    assert!(r.boot_time_ns > 0 && r.init_time_ns > 0, "{r:?}");
    assert!(r.ready_time_ns >= r.boot_time_ns + r.init_time_ns, "{r:?}");
    // The guest's boot clock starts after QEMU does.
    assert!(r.ready_time_ns < running_ns, "{r:?} but QEMU has run {running_ns} ns");
    assert!(r.agent_version.starts_with("agentwire "), "{r:?}");
    let resolved = vm.recv().await;
    assert!(matches!(resolved.payload, Payload::InitResolved(ref i) if i.default_user.uid == 0), "{resolved:?}");
    vm.send(Message::new(0, InitAck {})).await;
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
    vm.send(Message::new(id, FsRequest { op: FsOp::Write { handle: h, offset: 0, len: Some(data.len() as u64) } }))
        .await;
    for chunk in data.chunks(FS_CHUNK_SIZE).chain([&[][..]]) {
        vm.send(Message::new(id, FsData { data: Bytes::copy_from_slice(chunk) })).await;
    }
    vm.response(id).await;
    vm.fs(FsOp::CloseHandle { handle: h }).await;
    let h = vm.open("/tmp/big.bin", FsOpenOptions { read: true, ..Default::default() }).await;
    let id = vm.id();
    vm.send(Message::new(id, FsRequest { op: FsOp::Read { handle: h, offset: 0, len: None } })).await;
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

#[test]
fn vm_says_plainly_what_is_missing() {
    let out = common::agentwire(&["vm", "--image", "/nonexistent/agentwire-image"], b"");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vm/build.sh") && (err.contains("not installed") || err.contains("no /nonexistent")), "{err}");
}
