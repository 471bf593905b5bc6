//! `agentwire vm`: boot the image that `vm/build.sh` writes in QEMU (software
//! emulation), with the agent as the guest's init and its virtio-serial port
//! on a Unix socket; show the guest's boot figures, run a command inside it,
//! and power it off.
//!
//! An image from `vm/build-reference.sh` (a `reference` file beside the
//! kernel) has the reference agent, microsandbox-agentd, as init. It mounts a
//! virtiofs share (tag `msb_runtime`) at init and fails without it, so for it
//! a virtiofsd serves a temporary directory and the guest's memory is a
//! shared memfd (vhost-user needs it); and it reads its port once at start and
//! takes a port with no host behind it as closed, so QEMU waits for the host
//! to connect before it starts the guest (`wait=on`).

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use agentwire::payload::Text;
use agentwire::payload::bootstrap::GuestBootstrap;
use agentwire::payload::exec::ExecRequest;

use crate::demo::{checksum, mb_per_s, pattern, percentile, temp_dir, us};
use agentwire_client::Client;

/// The QEMU machine type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Machine {
    /// PC with PCIe: the port on virtio-serial-pci.
    Q35,
    /// The minimal microvm machine: the port on virtio-serial-device (virtio-mmio).
    Microvm,
}

/// Settings of one run.
pub struct Options {
    /// Machine type.
    pub machine: Machine,
    /// Directory with vmlinuz and initramfs.cpio.gz.
    pub image: PathBuf,
    /// Where the agent's port is served; a temporary path when absent.
    pub socket: Option<PathBuf>,
    /// Only boot and wait for QEMU to end (a host connects to --socket itself).
    pub boot_only: bool,
    /// Also measure a file transfer and ping round trips over the port.
    pub measure: bool,
    /// The command to run in the guest.
    pub command: Vec<String>,
}

const QEMU: &str = "qemu-system-x86_64";
/// How long a booting VM may take to greet (software emulation on a loaded machine).
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// What a reference image says about itself (its `reference` file, lines of `key=value`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reference {
    /// The agent's package version, e.g. "0.6.14".
    version: String,
    /// The virtiofs tag the agent mounts at init.
    runtime_fs_tag: String,
}

impl Reference {
    /// `Some` for an image from `vm/build-reference.sh`.
    fn of(image: &Path) -> Option<Reference> {
        let text = std::fs::read_to_string(image.join("reference")).ok()?;
        let get =
            |key: &str| text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('=')).map(|v| v.trim().to_string());
        Some(Reference {
            version: get("version").unwrap_or_default(),
            runtime_fs_tag: get("runtime_fs_tag").unwrap_or_else(|| "msb_runtime".into()),
        })
    }
}

/// Where a virtiofsd is: Debian 12's QEMU ships the C one in /usr/lib/qemu,
/// later releases the Rust one as a package of its own.
fn virtiofsd() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("virtiofsd")).find(|f| f.is_file()));
    ["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"].iter().map(PathBuf::from).find(|f| f.is_file()).or(on_path)
}

/// A virtiofsd serving `dir` on `socket` (it ends when QEMU disconnects), its output to `log`.
fn virtiofsd_command(bin: &Path, socket: &Path, dir: &Path, log: std::fs::File) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg(format!("--socket-path={}", socket.display()));
    if bin.starts_with("/usr/lib/qemu") {
        // The C virtiofsd of QEMU <= 7.2: options in -o; no namespaces needed.
        cmd.args(["-o", &format!("source={}", dir.display()), "-o", "cache=none", "-o", "sandbox=chroot"]);
    } else {
        cmd.arg(format!("--shared-dir={}", dir.display())).args(["--cache=never", "--sandbox=chroot"]);
    }
    let log2 = log.try_clone().map(Stdio::from).unwrap_or_else(|_| Stdio::null());
    cmd.stdin(Stdio::null()).stdout(log2).stderr(log).kill_on_drop(true);
    crate::sys::kill_with_parent(&mut cmd);
    cmd
}

/// The guest's virtual CPUs: `AGENTWIRE_VM_SMP` (1 to 8), default 1.
fn vcpus() -> u32 {
    std::env::var("AGENTWIRE_VM_SMP").ok().and_then(|v| v.parse().ok()).filter(|n| (1..=8).contains(n)).unwrap_or(1)
}

/// The guest's memory size in MiB.
const MEMORY_MIB: u32 = 512;

fn qemu_command(
    machine: Machine,
    image: &Path,
    socket: &Path,
    console: &Path,
    virtiofs: Option<(&Path, &str)>,
    append: &str,
) -> tokio::process::Command {
    let (machine, bus, fs_device) = match machine {
        Machine::Q35 => ("q35,accel=tcg", "virtio-serial-pci", "vhost-user-fs-pci"),
        Machine::Microvm => ("microvm,accel=tcg", "virtio-serial-device", "vhost-user-fs-device"),
    };
    let mut cmd = tokio::process::Command::new(QEMU);
    let machine = match virtiofs {
        // vhost-user maps the guest's memory into virtiofsd: it must be shared.
        Some(_) => format!("{machine},memory-backend=mem"),
        None => machine.to_string(),
    };
    cmd.args(["-machine", &machine, "-cpu", "max", "-m", &MEMORY_MIB.to_string(), "-smp", &vcpus().to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(image.join("vmlinuz"))
        .arg("-initrd")
        .arg(image.join("initramfs.cpio.gz"))
        .arg("-append")
        .arg(kernel_command_line(append))
        .args(["-device", bus])
        .arg("-chardev")
        // The reference agent reads its port once at start: the host must be there by then.
        .arg(format!(
            "socket,id=agent,path={},server=on,wait={}",
            socket.display(),
            if virtiofs.is_some() { "on" } else { "off" }
        ))
        .args(["-device", "virtserialport,chardev=agent,name=agent"])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some((vfs_socket, tag)) = virtiofs {
        if machine.starts_with("microvm") {
            // virtio-mmio is legacy (version 1) by default, which vhost-user
            // (libvhost-user in virtiofsd) refuses.
            cmd.args(["-global", "virtio-mmio.force-legacy=false"]);
        }
        cmd.arg("-object")
            .arg(format!("memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on"))
            .arg("-chardev")
            .arg(format!("socket,id=vfs,path={}", vfs_socket.display()))
            .arg("-device")
            .arg(format!("{fs_device},chardev=vfs,tag={tag}"));
    }
    // A host killed outright must not leave a VM spinning.
    crate::sys::kill_with_parent(&mut cmd);
    cmd
}

/// The guest kernel's command line. Under software emulation the kernel's
/// calibration of the TSC against the PIT fails now and then, and the microvm
/// machine has no other timer to fall back on (it hangs in early boot): the
/// emulated TSC runs at the host's rate, so tell the kernel that rate.
///
/// `AGENTWIRE_VM_APPEND` adds words of its own (a `NAME=value` word the
/// kernel does not know goes to init's environment).
fn kernel_command_line(append: &str) -> String {
    let mut line = String::from("console=ttyS0 panic=-1 quiet");
    let extra = std::env::var("AGENTWIRE_VM_APPEND").unwrap_or_default();
    for words in [append, extra.trim()] {
        if !words.is_empty() {
            line.push(' ');
            line.push_str(words);
        }
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mhz = cpuinfo.lines().find_map(|l| l.strip_prefix("cpu MHz")?.split(':').nth(1)?.trim().parse::<f64>().ok());
    if let Some(mhz) = mhz.filter(|m| *m > 0.0) {
        line.push_str(&format!(" tsc_early_khz={}", (mhz * 1000.0).round() as u64));
    }
    line
}

/// What is missing to boot, said plainly.
fn missing(image: &Path) -> Option<String> {
    let on_path =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(QEMU).is_file())).unwrap_or(false);
    if !on_path {
        return Some(format!("{QEMU} is not installed (Debian package qemu-system-x86; vm/build.sh installs it)"));
    }
    for f in ["vmlinuz", "initramfs.cpio.gz"] {
        if !image.join(f).is_file() {
            return Some(format!("no {} : build the VM image first with vm/build.sh", image.join(f).display()));
        }
    }
    if Reference::of(image).is_some() && virtiofsd().is_none() {
        return Some(
            "virtiofsd is not installed (the reference agent mounts a virtiofs share; Debian 12's \
             qemu-system-common ships /usr/lib/qemu/virtiofsd, later releases the package virtiofsd; \
             vm/build-reference.sh installs it)"
                .into(),
        );
    }
    None
}

/// Starts virtiofsd on `tmp/runtime` and waits for its socket.
async fn start_virtiofsd(tmp: &Path) -> Result<(tokio::process::Child, PathBuf), String> {
    let bin = virtiofsd().ok_or("virtiofsd is not installed")?;
    let dir = tmp.join("runtime");
    let socket = tmp.join("virtiofs.sock");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let log_path = tmp.join("virtiofsd.log");
    let log = std::fs::File::create(&log_path).map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    let mut child = virtiofsd_command(&bin, &socket, &dir, log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let started = Instant::now();
    while !socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "{} exited with {status} before serving {}:\n{}",
                bin.display(),
                socket.display(),
                console_tail(&log_path)
            ));
        }
        if started.elapsed() > Duration::from_secs(10) {
            return Err(format!("{} made no socket {} within 10 s", bin.display(), socket.display()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok((child, socket))
}

/// The last lines of a log; for a guest console that ends in a kernel panic
/// (init exited), the lines up to the panic, which say why, not its trace.
fn console_tail(console: &Path) -> String {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    let mut lines: Vec<&str> = text.lines().collect();
    if let Some(panic) = lines.iter().position(|l| l.contains("Kernel panic - not syncing")) {
        lines.truncate(panic + 1);
    }
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Boots, runs, powers off. Exit status: the guest command's, 2 when something
/// to boot with is missing, 1 when the VM fails.
pub async fn run(opts: Options) -> ExitCode {
    if let Some(what) = missing(&opts.image) {
        eprintln!("agentwire vm: {what}");
        return ExitCode::from(crate::EXIT_USAGE);
    }
    // Removed, with QEMU's socket and console log, when the run ends.
    let tmp = match temp_dir("vm") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("agentwire vm: cannot create a temporary directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    let socket = opts.socket.clone().unwrap_or_else(|| tmp.path().join("agent.sock"));
    let console = tmp.path().join("console.log");
    let reference = Reference::of(&opts.image);
    // Lives as long as the VM; killed when dropped.
    let mut _virtiofsd = None;
    let mut virtiofs_socket = None;
    if let Some(r) = &reference {
        eprintln!(
            "agentwire vm: reference image: microsandbox-agentd {} as init; virtiofs tag {} served by virtiofsd",
            r.version, r.runtime_fs_tag
        );
        match start_virtiofsd(tmp.path()).await {
            Ok((child, path)) => {
                _virtiofsd = Some(child);
                virtiofs_socket = Some(path);
            }
            Err(e) => {
                eprintln!("agentwire vm: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let virtiofs = reference.as_ref().zip(virtiofs_socket.as_deref()).map(|(r, s)| (s, r.runtime_fs_tag.as_str()));
    let started = Instant::now();
    let mut qemu = match qemu_command(opts.machine, &opts.image, &socket, &console, virtiofs, "").spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agentwire vm: cannot start {QEMU}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if opts.boot_only {
        eprintln!("agentwire vm: QEMU ({:?}) booting; the agent's port is on {}", opts.machine, socket.display());
        let status = tokio::select! {
            status = qemu.wait() => status,
            signal = crate::terminated() => return interrupted(signal, &mut qemu).await,
        };
        eprintln!("agentwire vm: QEMU ended: {status:?}; guest console:\n{}", console_tail(&console));
        if reference.is_some() && !matches!(&status, Ok(s) if s.success()) {
            eprintln!("virtiofsd:\n{}", console_tail(&tmp.path().join("virtiofsd.log")));
        }
        return match status {
            Ok(s) if s.success() => ExitCode::SUCCESS,
            _ => ExitCode::FAILURE,
        };
    }
    let outcome = tokio::select! {
        outcome = session(&opts, &socket, started, &mut qemu) => outcome,
        signal = crate::terminated() => Err(format!("{signal}: stopped")),
    };
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("agentwire vm: {e}\nguest console:\n{}", console_tail(&console));
            if reference.is_some() {
                eprintln!("virtiofsd:\n{}", console_tail(&tmp.path().join("virtiofsd.log")));
            }
            let _ = qemu.kill().await;
            ExitCode::FAILURE
        }
    }
}

/// SIGINT or SIGTERM during `--boot-only`: QEMU is stopped, and the
/// temporary directory is removed as the caller returns.
async fn interrupted(signal: &str, qemu: &mut tokio::process::Child) -> ExitCode {
    eprintln!("agentwire vm: {signal}: stopping QEMU");
    let _ = qemu.kill().await;
    ExitCode::FAILURE
}

async fn session(
    opts: &Options,
    socket: &Path,
    started: Instant,
    qemu: &mut tokio::process::Child,
) -> Result<u8, String> {
    let stream = loop {
        match tokio::net::UnixStream::connect(socket).await {
            Ok(s) => break s,
            Err(_) if started.elapsed() < BOOT_TIMEOUT => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => return Err(format!("cannot connect to QEMU's socket {}: {e}", socket.display())),
        }
    };
    let bootstrap = GuestBootstrap { hostname: Some("agentwire-vm".into()), ..GuestBootstrap::default() };
    // A VM under software emulation boots first: the start-up exchange may take long.
    let client = Client::builder()
        .bootstrap(bootstrap)
        .handshake_timeout(BOOT_TIMEOUT)
        .connect(stream)
        .await
        .map_err(|e| e.to_string())?;
    let greeted = started.elapsed();
    let r = client.ready();
    let ms = |ns: u64| ns as f64 / 1e6;
    eprintln!(
        "agentwire vm: {:?} guest ready: agent started {:.0} ms after the kernel, init took {:.1} ms, core.ready at {:.0} ms; {:.0} ms after QEMU started; {} (generation {})",
        opts.machine,
        ms(r.boot_time_ns),
        ms(r.init_time_ns),
        ms(r.ready_time_ns),
        greeted.as_secs_f64() * 1e3,
        r.agent_version,
        client.agent_generation()
    );
    let command =
        if opts.command.is_empty() { vec!["uname".to_string(), "-a".to_string()] } else { opts.command.clone() };
    let mut req = ExecRequest::new(&command[0]);
    req.args = command[1..].iter().map(Text::from).collect();
    let code = crate::host::exec_with_stdio(&client, req, "agentwire vm").await?;
    if opts.measure {
        measure(&client).await?;
    }
    let shutdown_at = Instant::now();
    client.shutdown(SHUTDOWN_TIMEOUT).await.map_err(|e| e.to_string())?;
    let status = tokio::time::timeout(SHUTDOWN_TIMEOUT, qemu.wait())
        .await
        .map_err(|_| format!("QEMU still runs {SHUTDOWN_TIMEOUT:?} after core.shutdown"))?
        .map_err(|e| e.to_string())?;
    eprintln!(
        "agentwire vm: powered off: QEMU exited with {status} {:.0} ms after core.shutdown",
        shutdown_at.elapsed().as_secs_f64() * 1e3
    );
    if !status.success() {
        return Err(format!("QEMU exited with {status}"));
    }
    Ok(code)
}

/// A 16 MiB file written and read back through `/tmp`, and 200 pings.
async fn measure(client: &Client) -> Result<(), String> {
    const SIZE: usize = 16 << 20;
    let data = pattern(SIZE, 5);
    let t = Instant::now();
    client.write_file("/tmp/agentwire-measure.bin", &data[..], Some(SIZE as u64)).await.map_err(|e| e.to_string())?;
    let put = t.elapsed();
    let mut back = Vec::with_capacity(SIZE);
    let t = Instant::now();
    client.read_file("/tmp/agentwire-measure.bin", &mut back).await.map_err(|e| e.to_string())?;
    let get = t.elapsed();
    if checksum(&back) != checksum(&data) {
        return Err("the file read back differs from the one written".into());
    }
    let mut rtts = Vec::new();
    for _ in 0..200 {
        rtts.push(client.ping().await.map_err(|e| e.to_string())?);
    }
    rtts.sort();
    eprintln!(
        "agentwire vm: over virtio-serial: 16 MiB written at {:.0} MB/s and read back at {:.0} MB/s (checksums equal); ping p50 {:.0} µs, p99 {:.0} µs over 200",
        mb_per_s(SIZE, put),
        mb_per_s(SIZE, get),
        us(percentile(&rtts, 50)),
        us(percentile(&rtts, 99))
    );
    Ok(())
}

/// Settings of `agentwire vm-bench`.
pub struct BenchOptions {
    /// Machine type.
    pub machine: Machine,
    /// Directory with vmlinuz and initramfs.cpio.gz (from `vm/build.sh`).
    pub image: PathBuf,
    /// MiB moved by each transfer.
    pub mib: usize,
    /// How many times each transfer is measured (the best is kept).
    pub rounds: usize,
    /// The exec flow-control window in KiB (input and output limit; chunks a
    /// quarter of it, at most 1 MiB); the client's defaults when 0.
    pub exec_window_kib: u32,
}

/// The raw copies measured, as (operation, mode, guest read or write size):
/// operation 1 host → guest, 2 guest → host; mode 0 blocking, 1 non-blocking
/// with poll, 2 `splice` (see [`crate::serial::raw_copy_guest`]). A port's
/// read gives at most one of its 4 KiB receive buffers; a write takes at most
/// 32 KiB; a splice takes the whole pipe as one buffer.
const RAW_COPIES: [(u8, u8, usize); 8] = [
    (1, 0, 4096),
    (1, 0, 64 << 10),
    (1, 1, 64 << 10),
    (2, 0, 4096),
    (2, 0, 32 << 10),
    (2, 1, 32 << 10),
    (2, 1, 256 << 10),
    // `splice` of 1 MiB pipes, as the agent's file reads go out.
    (2, 2, 1 << 20),
];

/// Boots the image with `/bench-init` as the initramfs's init: first a raw
/// copy over the agent's port, each direction at several read and write
/// sizes, then the agent as init on the same port, through which the same
/// amount is moved with the host client (file write and read, exec stdin and
/// stdout). Prints MB/s of each and the agent's over the best raw copy of its
/// direction.
pub async fn bench(opts: BenchOptions) -> ExitCode {
    if let Some(what) = missing(&opts.image) {
        eprintln!("agentwire vm-bench: {what}");
        return ExitCode::from(crate::EXIT_USAGE);
    }
    let tmp = match temp_dir("vm-bench") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("agentwire vm-bench: cannot create a temporary directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    let socket = tmp.path().join("agent.sock");
    let console = tmp.path().join("console.log");
    let started = Instant::now();
    let mut qemu = match qemu_command(opts.machine, &opts.image, &socket, &console, None, "rdinit=/bench-init").spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agentwire vm-bench: cannot start {QEMU}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = tokio::select! {
        outcome = bench_session(&opts, &socket, started, &mut qemu) => outcome,
        signal = crate::terminated() => Err(format!("{signal}: stopped")),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentwire vm-bench: {e}\nguest console:\n{}", console_tail(&console));
            let _ = qemu.kill().await;
            ExitCode::FAILURE
        }
    }
}

/// One raw copy of `n` bytes: the host writes or reads the socket in 256 KiB
/// pieces; host → guest ends when the guest has read all and said so.
async fn raw_copy(
    stream: &mut tokio::net::UnixStream,
    (op, mode, size): (u8, u8, usize),
    n: usize,
    data: &[u8],
) -> Result<Duration, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut command = [0u8; crate::serial::RAW_COMMAND_LEN];
    command[0] = op;
    command[1] = mode;
    command[2..10].copy_from_slice(&(n as u64).to_le_bytes());
    command[10..18].copy_from_slice(&(size as u64).to_le_bytes());
    let io = |e: std::io::Error| format!("raw copy: {e}");
    let t = Instant::now();
    stream.write_all(&command).await.map_err(io)?;
    if op == 1 {
        let mut sent = 0;
        while sent < n {
            let k = data.len().min(n - sent);
            stream.write_all(&data[..k]).await.map_err(io)?;
            sent += k;
        }
        let mut ack = [0u8];
        stream.read_exact(&mut ack).await.map_err(io)?;
    } else {
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0;
        while got < n {
            let k = stream.read(&mut buf[..(n - got).min(256 << 10)]).await.map_err(io)?;
            if k == 0 {
                return Err("raw copy: the guest closed the port".into());
            }
            got += k;
        }
    }
    Ok(t.elapsed())
}

/// Counts what is written to it.
#[derive(Default)]
struct Counter(u64);

impl tokio::io::AsyncWrite for Counter {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0 += buf.len() as u64;
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Compares what is written to it with the bytes expected, as they come.
struct Check<'a> {
    expected: &'a [u8],
    got: usize,
    /// The offset of the first byte that differs.
    differs: Option<usize>,
    /// The output from there on (64 bytes), to find where in the input it is.
    after: Vec<u8>,
}

impl Check<'_> {
    /// Where the output that differs is found in the input, said in words.
    fn explain(&self) -> String {
        let Some(at) = self.differs else { return String::new() };
        let found = (self.after.len() >= 16)
            .then(|| self.expected.windows(self.after.len()).position(|w| w == &self.after[..]))
            .flatten();
        let zeros = self.after.iter().all(|b| *b == 0);
        match found {
            Some(p) if p > at => format!("input bytes {at}..{p} are missing ({} bytes lost)", p - at),
            Some(p) => format!("input bytes {p}..{at} come again ({} bytes repeated)", at - p),
            None if zeros => "zeros that were never sent come instead".into(),
            None => format!(
                "bytes that are nowhere in the input come instead: {:02x?}",
                &self.after[..16.min(self.after.len())]
            ),
        }
    }
}

impl tokio::io::AsyncWrite for Check<'_> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let at = self.got;
        let want = self.expected.get(at..).unwrap_or_default();
        if self.differs.is_none() {
            let same = want.iter().zip(buf).take_while(|(a, b)| a == b).count();
            if same < buf.len() {
                self.differs = Some(at + same);
                self.after.extend_from_slice(&buf[same..]);
            }
        } else if self.after.len() < 64 {
            self.after.extend_from_slice(buf);
        }
        self.after.truncate(64);
        self.got += buf.len();
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The agent's transfers, each of `data.len()` bytes: the name, and the
/// direction of the raw copy it is compared with (0 host → guest, 1 guest →
/// host). See [`agent_transfer`].
const TRANSFERS: [(&str, usize); 6] = [
    ("fs write to /tmp (host->guest)", 0),
    ("fs read from /tmp (guest->host)", 1),
    ("exec stdin to dd (host->guest)", 0),
    ("exec stdout from dd (guest->host)", 1),
    ("exec cat, stdin echoed to stdout, checked byte for byte (both ways)", 1),
    ("exec stdout from cat of the /tmp file (guest->host)", 1),
];

/// One agent transfer of `data.len()` bytes: 0 file write to /tmp (tmpfs), 1
/// file read of it, 2 exec stdin into `dd of=/dev/null`, 3 exec stdout of
/// `dd if=/dev/zero` (dd, not busybox's head: it copies at under 20 MB/s
/// under software emulation by itself), 4 exec `cat` with `data` as its
/// input, its output compared with it byte for byte (each byte crosses the
/// port both ways; a byte lost or changed is an error), 5 exec stdout of
/// `cat` of the file of 0 (busybox's `cat` moves it into the pipe with
/// `sendfile`, without a copy: the exec path when the command is not the
/// limit). The time is the host's, from the request to the last reply.
async fn agent_transfer(client: &Client, which: usize, data: &[u8]) -> Result<Duration, String> {
    let n = data.len();
    let path = "/tmp/agentwire-bench.bin";
    let block = 64 << 10;
    let t = Instant::now();
    let moved = match which {
        0 => client.write_file(path, data, Some(n as u64)).await.map_err(|e| e.to_string())?,
        1 => {
            let mut out = Counter::default();
            client.read_file(path, &mut out).await.map_err(|e| e.to_string())?;
            out.0
        }
        2 => {
            let exec = client.exec(command("dd", &["of=/dev/null".into(), format!("bs={block}")])).await;
            let exec = exec.map_err(|e| e.to_string())?;
            let (mut out, mut err) = (Counter::default(), Vec::new());
            let status = exec.pipe(data, &mut out, &mut err).await.map_err(|e| e.to_string())?;
            if !status.success() {
                return Err(format!("dd of=/dev/null: {status:?}: {}", String::from_utf8_lossy(&err)));
            }
            n as u64
        }
        3 => {
            let args = ["if=/dev/zero".into(), format!("bs={block}"), format!("count={}", n / block)];
            let exec = client.exec(command("dd", &args)).await.map_err(|e| e.to_string())?;
            let (mut out, mut err) = (Counter::default(), Counter::default());
            exec.pipe(tokio::io::empty(), &mut out, &mut err).await.map_err(|e| e.to_string())?;
            out.0 + (n % block) as u64
        }
        5 => {
            let exec = client.exec(command("cat", &[path.into()])).await.map_err(|e| e.to_string())?;
            let (mut out, mut err) = (Counter::default(), Vec::new());
            let status = exec.pipe(tokio::io::empty(), &mut out, &mut err).await.map_err(|e| e.to_string())?;
            if !status.success() {
                return Err(format!("cat {path}: {status:?}: {}", String::from_utf8_lossy(&err)));
            }
            out.0
        }
        _ => {
            let exec = client.exec(command("cat", &[])).await.map_err(|e| e.to_string())?;
            let mut out = Check { expected: data, got: 0, differs: None, after: Vec::new() };
            let mut err = Vec::new();
            let status = exec.pipe(data, &mut out, &mut err).await.map_err(|e| e.to_string())?;
            if let Some(at) = out.differs {
                return Err(format!(
                    "exec cat: the output ({} bytes of {n}) differs from the input from byte {at} on: {}",
                    out.got,
                    out.explain()
                ));
            }
            if !status.success() || out.got != n {
                return Err(format!(
                    "exec cat: {} bytes of output for {n} of input (LOST BYTES), {status:?}: {}",
                    out.got,
                    String::from_utf8_lossy(&err)
                ));
            }
            n as u64
        }
    };
    let took = t.elapsed();
    if moved != n as u64 {
        return Err(format!("transfer {which}: {moved} bytes of {n}"));
    }
    Ok(took)
}

/// The command `cmd` with `args`.
fn command(cmd: &str, args: &[String]) -> ExecRequest {
    let mut req = ExecRequest::new(cmd);
    req.args = args.iter().map(Text::from).collect();
    req
}

/// What the guest's tmpfs takes and gives alone, as MB/s of `dd` inside the
/// guest (its own figure when it prints one, else the host's time of the
/// exec): writing `mib` MiB to /tmp, and reading that file back.
async fn tmpfs_alone(client: &Client, mib: usize) -> Result<[f64; 2], String> {
    let mut rates = [0f64; 2];
    let runs = [
        vec![
            "if=/dev/zero".to_string(),
            "of=/tmp/agentwire-cap.bin".into(),
            "bs=64k".into(),
            format!("count={}", mib * 16),
        ],
        vec!["if=/tmp/agentwire-cap.bin".to_string(), "of=/dev/null".into(), "bs=64k".into()],
    ];
    for (rate, args) in rates.iter_mut().zip(runs) {
        let t = Instant::now();
        let exec = client.exec(command("dd", &args)).await.map_err(|e| e.to_string())?;
        let (mut out, mut err) = (Counter::default(), Vec::new());
        let status = exec.pipe(tokio::io::empty(), &mut out, &mut err).await.map_err(|e| e.to_string())?;
        let took = t.elapsed();
        let text = String::from_utf8_lossy(&err);
        if !status.success() {
            return Err(format!("dd {}: {status:?}: {text}", args.join(" ")));
        }
        // busybox: "N bytes (X MB) copied, S seconds, R MB/s".
        let seconds = text
            .split_once("copied, ")
            .and_then(|(_, r)| r.split_whitespace().next()?.parse::<f64>().ok())
            .filter(|s| *s > 0.0);
        *rate = match seconds {
            Some(s) => (mib << 20) as f64 / s / 1e6,
            None => mb_per_s(mib << 20, took),
        };
    }
    let exec = client.exec(command("rm", &["-f".into(), "/tmp/agentwire-cap.bin".into()])).await;
    exec.map_err(|e| e.to_string())?.output().await.map_err(|e| e.to_string())?;
    Ok(rates)
}

/// The guest's CPU time in ticks (USER_HZ): user, system, idle, irq+softirq of
/// all, user and system of the agent (PID 1, all its threads), and the
/// agent's minor page faults, from /proc.
async fn guest_cpu(client: &Client) -> Result<[u64; 7], String> {
    let mut req = ExecRequest::new("cat");
    req.args = vec!["/proc/stat".into(), "/proc/1/stat".into()];
    let exec = client.exec(req).await.map_err(|e| e.to_string())?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    exec.pipe(tokio::io::empty(), &mut out, &mut err).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out);
    let num = |s: Option<&str>| s.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let cpu: Vec<&str> = text.lines().next().unwrap_or_default().split_whitespace().collect();
    let (user, system, idle) = (
        num(cpu.get(1).copied()) + num(cpu.get(2).copied()),
        num(cpu.get(3).copied()),
        num(cpu.get(4).copied()) + num(cpu.get(5).copied()),
    );
    let irq = num(cpu.get(6).copied()) + num(cpu.get(7).copied());
    // /proc/1/stat: after the ")" that ends the name, minflt is field 8, utime and stime 12 and 13.
    let own = text.lines().find(|l| l.starts_with("1 (")).unwrap_or_default();
    let after: Vec<&str> = own.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    Ok([user, system, idle, irq, num(after.get(11).copied()), num(after.get(12).copied()), num(after.get(7).copied())])
}

async fn bench_session(
    opts: &BenchOptions,
    socket: &Path,
    started: Instant,
    qemu: &mut tokio::process::Child,
) -> Result<(), String> {
    let mut stream = loop {
        match tokio::net::UnixStream::connect(socket).await {
            Ok(s) => break s,
            Err(_) if started.elapsed() < BOOT_TIMEOUT => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => return Err(format!("cannot connect to QEMU's socket {}: {e}", socket.display())),
        }
    };
    {
        use tokio::io::AsyncReadExt;
        let mut ready = [0u8];
        tokio::time::timeout(BOOT_TIMEOUT, stream.read_exact(&mut ready))
            .await
            .map_err(|_| format!("the guest's raw copy did not start within {BOOT_TIMEOUT:?}"))?
            .map_err(|e| format!("raw copy: {e}"))?;
        if ready[0] != crate::serial::RAW_READY {
            return Err(format!("raw copy: the guest began with {:#x}", ready[0]));
        }
    }
    let n = opts.mib << 20;
    let rounds = opts.rounds.max(1);
    let data = pattern(n, 7);
    let mode = |m: u8| match m {
        0 => "blocking",
        1 => "non-blocking+poll",
        _ => "splice",
    };
    let mut best_raw = [0f64; 2];
    for round in 0..rounds {
        for copy in RAW_COPIES {
            if std::env::var_os("AGENTWIRE_VM_BENCH_ONLY").is_some() {
                break;
            }
            let took = tokio::time::timeout(BOOT_TIMEOUT * 2, raw_copy(&mut stream, copy, n, &data[..256 << 10]))
                .await
                .map_err(|_| format!("raw copy {copy:?}: nothing within {:?}", BOOT_TIMEOUT * 2))??;
            let rate = mb_per_s(n, took);
            let dir = (copy.0 - 1) as usize;
            best_raw[dir] = best_raw[dir].max(rate);
            println!(
                "round {round}: raw port {}: {} MiB, guest {} {} of {} B: {rate:.1} MB/s",
                if dir == 0 { "host->guest" } else { "guest->host" },
                opts.mib,
                mode(copy.1),
                if dir == 0 { "reads" } else { "writes" },
                copy.2
            );
        }
    }
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let end = [0u8; crate::serial::RAW_COMMAND_LEN];
        stream.write_all(&end).await.map_err(|e| e.to_string())?;
        let mut done = [0u8];
        stream.read_exact(&mut done).await.map_err(|e| format!("raw copy: {e}"))?;
    }
    // The guest closes the port once this hangs up; then /bench-init starts the
    // agent as init, which opens it. What is sent before that close is lost,
    // so a connection whose start-up exchange gets no answer is made again.
    drop(stream);
    let mut attempt = 0;
    // AGENTWIRE_VM_BENCH_LEGACY=1: no exec policy, every execution a legacy
    // (generation 7) one: stdin is not flow-controlled, and what the agent
    // cannot queue it drops (the exec cat check then fails).
    let legacy = std::env::var_os("AGENTWIRE_VM_BENCH_LEGACY").is_some_and(|v| v == "1");
    let limits = (opts.exec_window_kib > 0 && !legacy).then(|| {
        let window = opts.exec_window_kib.saturating_mul(1024);
        let chunk = (window / 4).clamp(4096, 1 << 20);
        agentwire::payload::exec::ExecLimits {
            input_limit: window,
            output_limit: window,
            stdin_chunk_size: chunk,
            output_chunk_size: chunk,
            ..Default::default()
        }
    });
    let client = loop {
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| e.to_string())?;
        let mut builder = Client::builder()
            .bootstrap(GuestBootstrap { hostname: Some("agentwire-bench".into()), ..GuestBootstrap::default() })
            .handshake_timeout(Duration::from_secs(15));
        // `exec_limits(None)` would send no policy and make every execution a
        // legacy one, whose stdin beyond the agent's 1 MiB queue is dropped
        // (an earlier version of this bench did so, and lost bytes):
        // the client's default policy unless a window is given.
        if limits.is_some() || legacy {
            builder = builder.exec_limits(limits);
        }
        let connected = builder.connect(stream).await;
        match connected {
            Ok(c) => break c,
            Err(e) if attempt < 4 => eprintln!("agentwire vm-bench: connecting to the agent: {e}; again"),
            Err(e) => return Err(e.to_string()),
        }
    };
    let mut best = [0f64; TRANSFERS.len()];
    // AGENTWIRE_VM_BENCH_ONLY=2,4: only these transfers (numbers as in agent_transfer).
    let only: Option<Vec<usize>> = std::env::var("AGENTWIRE_VM_BENCH_ONLY")
        .ok()
        .map(|v| v.split(',').filter_map(|w| w.trim().parse().ok()).collect());
    let mut best_alone = [0f64; 2];
    for round in 0..rounds {
        for (which, (name, _)) in TRANSFERS.iter().enumerate() {
            if !only.as_ref().is_none_or(|o| o.contains(&which)) {
                continue;
            }
            let before = guest_cpu(&client).await?;
            let took = tokio::time::timeout(BOOT_TIMEOUT * 2, agent_transfer(&client, which, &data))
                .await
                .map_err(|_| format!("{name}: nothing within {:?}", BOOT_TIMEOUT * 2))??;
            let after = guest_cpu(&client).await?;
            let d: Vec<u64> = after.iter().zip(before).map(|(a, b)| a.saturating_sub(b)).collect();
            let rate = mb_per_s(n, took);
            best[which] = best[which].max(rate);
            println!(
                "round {round}: agent {name}: {} MiB: {rate:.1} MB/s (guest ticks of 10 ms: user {} system {} idle {} irq {}; the agent: user {} system {}, {} minor faults)",
                opts.mib, d[0], d[1], d[2], d[3], d[4], d[5], d[6]
            );
        }
        let alone = tmpfs_alone(&client, opts.mib).await?;
        println!(
            "round {round}: guest tmpfs alone (dd in the guest, bs 64k): write {:.1} MB/s, read {:.1} MB/s",
            alone[0], alone[1]
        );
        best_alone = [best_alone[0].max(alone[0]), best_alone[1].max(alone[1])];
    }
    println!(
        "summary ({:?}, {} vCPU, {} MiB, best of {rounds}, one boot; exec limits {}; kernel: {}):",
        opts.machine,
        vcpus(),
        opts.mib,
        limits.as_ref().map_or(
            if legacy { "none (legacy executions)" } else { "the client's defaults" }.to_string(),
            |l| format!("window {} KiB, chunks {} KiB", l.input_limit / 1024, l.stdin_chunk_size / 1024)
        ),
        kernel_command_line("")
    );
    println!("  raw port host->guest {:.1} MB/s, guest->host {:.1} MB/s", best_raw[0], best_raw[1]);
    println!("  guest tmpfs alone: write {:.1} MB/s, read {:.1} MB/s", best_alone[0], best_alone[1]);
    for (which, (name, dir)) in TRANSFERS.iter().enumerate() {
        let raw = best_raw[*dir];
        let mut line = format!("  agent {name}: {:.1} MB/s, {:.2} of the raw port", best[which], best[which] / raw);
        // A file transfer can go no faster than tmpfs alone either.
        if which < 2 && best_alone[which] < raw {
            line.push_str(&format!(
                ", {:.2} of min(raw port, tmpfs {})",
                best[which] / best_alone[which],
                if which == 0 { "write" } else { "read" }
            ));
        }
        println!("{line}");
    }
    client.shutdown(SHUTDOWN_TIMEOUT).await.map_err(|e| e.to_string())?;
    let status = tokio::time::timeout(SHUTDOWN_TIMEOUT, qemu.wait())
        .await
        .map_err(|_| format!("QEMU still runs {SHUTDOWN_TIMEOUT:?} after core.shutdown"))?
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("QEMU exited with {status}"));
    }
    Ok(())
}
