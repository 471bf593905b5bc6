//! `agentwire vm`: boot the image that `vm/build.sh` writes in QEMU (software
//! emulation), with the agent as the guest's init and its virtio-serial port
//! on a Unix socket; show the guest's boot figures, run a command inside it,
//! and power it off.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

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

fn qemu_command(machine: Machine, image: &Path, socket: &Path, console: &Path) -> tokio::process::Command {
    let (machine, bus) = match machine {
        Machine::Q35 => ("q35,accel=tcg", "virtio-serial-pci"),
        Machine::Microvm => ("microvm,accel=tcg", "virtio-serial-device"),
    };
    let mut cmd = tokio::process::Command::new(QEMU);
    cmd.args(["-machine", machine, "-cpu", "max", "-m", "512", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(image.join("vmlinuz"))
        .arg("-initrd")
        .arg(image.join("initramfs.cpio.gz"))
        .arg("-append")
        .arg(kernel_command_line())
        .args(["-device", bus])
        .arg("-chardev")
        .arg(format!("socket,id=agent,path={},server=on,wait=off", socket.display()))
        .args(["-device", "virtserialport,chardev=agent,name=agent"])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    // A host killed outright must not leave a VM spinning.
    crate::sys::kill_with_parent(&mut cmd);
    cmd
}

/// The guest kernel's command line. Under software emulation the kernel's
/// calibration of the TSC against the PIT fails now and then, and the microvm
/// machine has no other timer to fall back on (it hangs in early boot): the
/// emulated TSC runs at the host's rate, so tell the kernel that rate.
fn kernel_command_line() -> String {
    let mut line = String::from("console=ttyS0 panic=-1 quiet");
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
    None
}

fn console_tail(console: &Path) -> String {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
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
    let started = Instant::now();
    let mut qemu = match qemu_command(opts.machine, &opts.image, &socket, &console).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agentwire vm: cannot start {QEMU}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if opts.boot_only {
        eprintln!("agentwire vm: QEMU ({:?}) booting; the agent's port is on {}", opts.machine, socket.display());
        let status = qemu.wait().await;
        eprintln!("agentwire vm: QEMU ended: {status:?}; guest console:\n{}", console_tail(&console));
        return match status {
            Ok(s) if s.success() => ExitCode::SUCCESS,
            _ => ExitCode::FAILURE,
        };
    }
    match session(&opts, &socket, started, &mut qemu).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("agentwire vm: {e}\nguest console:\n{}", console_tail(&console));
            let _ = qemu.kill().await;
            ExitCode::FAILURE
        }
    }
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
    req.args = command[1..].to_vec();
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
