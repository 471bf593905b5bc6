//! The `agentwire` command: inspect and craft captured byte streams of the
//! protocol, and a real guest agent and host client that speak it. It is its
//! own crate, so that users of the libraries never build its dependencies:
//!
//! ```text
//! cargo run --release -- demo
//! cargo run -- inspect capture.bin
//! cargo run -- encode frames.jsonl -o capture.bin
//! ```

mod addr;
mod agent;
mod demo;
mod encode;
mod host;
mod init;
mod inspect;
mod relay;
mod serial;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use agentwire_agent::sys;
use clap::{Parser, Subcommand};

// The guest agent is a static musl build (vm/build.sh builds it with this
// feature), and musl's malloc is slow. With mimalloc (and `tune_allocator`),
// vm/bench.sh --mib 32 --rounds 2, medians of 4 runs interleaved with 4 on
// musl's: fs write 32.1 -> 61.0 MB/s, fs read 54.3 -> 69.9, exec stdin
// 19.5 -> 29.8, exec stdout 22.1 -> 31.0, exec cat 12.9 -> 17.6; the raw
// port unchanged. Host builds keep the system allocator.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps mimalloc from purging the memory it frees. Its arenas are 2 MiB
/// aligned, so a guest kernel with transparent huge pages `always` (Debian's)
/// backs them with huge pages, and each purge split one that the next
/// allocation faulted in and zeroed again: with purging, fs write reached
/// 42 MB/s, not 61, and the raw port's guest->host copy (its own process)
/// lost a third; purging with `MADV_FREE` instead helped less. The agent
/// keeps its peak heap; its buffers are bounded in bytes. Not
/// `MIMALLOC_ALLOW_THP=0`: that disables huge pages for every command the
/// agent runs too. Not `MIMALLOC_PURGE_DELAY=-1` in the environment: as init,
/// the agent's environment is the kernel's command line.
#[cfg(feature = "mimalloc")]
fn tune_allocator() {
    /// `mi_option_purge_delay` of the mimalloc.h (v2 and v3) that
    /// libmimalloc-sys 0.1.49 builds (pinned in Cargo.toml), which has no
    /// constant for it; -1 is "never purge".
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: a foreign call with no memory-safety preconditions: the option
    // number is a valid one of this version's (checked against its header),
    // and mimalloc only stores the value.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Inspect and craft byte streams of the microVM host <-> guest agent protocol (generation 10),
/// and run a real agent and host that speak it.
#[derive(Parser)]
#[command(name = "agentwire", version)]
struct Cli {
    /// More log lines on standard error: -v connections, -vv sessions and
    /// frames the peer got wrong, -vvv everything (RUST_LOG, if set, decides instead).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Decode a captured byte stream: one line a frame.
    ///
    /// Raw bulk records (generation 8) are shown with their kind, flow, offset
    /// and size; with --json as `{"offset","id","flags","t":"bulk.record","payload":
    /// {"kind","flow","offset","data"}}` (no "v": a record has no envelope).
    ///
    /// Exit status: 0 when the stream ends at a frame boundary (even if some
    /// frames were rejected), 1 when it fails (length out of range, a bulk
    /// record that breaks the record layout, or it ends inside a frame), 2 for
    /// usage errors and unreadable files.
    Inspect {
        /// The capture; standard input when `-` or absent.
        file: Option<PathBuf>,
        /// One JSON object a line instead of text for a person.
        #[arg(long)]
        json: bool,
    },
    /// Write frames from JSON lines `{"id": N, "t": "wire.name", "payload": VALUE}`
    /// (optional `"v"`, default the current generation, `"flags"`, default the type's,
    /// and `"offset"`, ignored, so that `inspect --json` output can be fed back).
    /// A raw bulk record is `{"id": N, "t": "bulk.record", "payload": {"kind", "flow",
    /// "offset", "data": [bytes]}}`, without "v".
    ///
    /// Exit status 1 if any line was bad (each is reported with its number and nothing is
    /// written for it), 2 for unreadable or unwritable files.
    Encode {
        /// The JSON lines; standard input when `-` or absent.
        file: Option<PathBuf>,
        /// Where the frames go; standard output when absent.
        #[arg(short, long)]
        out: Option<PathBuf>,
    },
    /// Serve the protocol as a guest agent: exec, fs inside --root, tcp, ping.
    ///
    /// ADDR is a Unix socket path (`unix:PATH`, or any path with a `/`; created
    /// with mode 0600), a loopback TCP address (`127.0.0.1:PORT`, `[::1]:PORT`;
    /// any other is refused), `vsock:PORT`, or inside a VM a virtio-serial port
    /// by name (`port:NAME`) or a serial device (`serial:PATH`, e.g. /dev/hvc0).
    ///
    /// Each connection holds at most 1024 sessions, and at most 1024 open file
    /// handles per relay client and 4096 in all; one more is refused with an
    /// error naming the limit. A file write cut off by the host going away is
    /// logged (file, bytes written), and the file is removed if its handle
    /// created it and no write on it had finished.
    Agent {
        /// Where to listen.
        #[arg(long)]
        listen: String,
        /// The directory that `core.fs.*` paths are confined to.
        #[arg(long, default_value = ".")]
        root: PathBuf,
        /// Let `core.tcp.connect` reach addresses beyond loopback, and resolve
        /// names by DNS. Without it only loopback addresses and `localhost` are
        /// served, and no DNS query is sent.
        #[arg(long)]
        allow_net: bool,
        /// Seconds a connection may take for its start-up exchange (bootstrap, ack).
        #[arg(long, value_name = "SECS", default_value_t = 120)]
        handshake_timeout: u64,
        /// Close a connection on which nothing arrives for SECS (0: never).
        #[arg(long, value_name = "SECS", default_value_t = 0)]
        idle_timeout: u64,
        /// Write every frame from memory: no `splice` of file reads and
        /// command output from their pipes into the connection (for a
        /// transport that mishandles it, or to compare).
        #[arg(long)]
        no_splice: bool,
    },
    /// Talk to an agent as its host.
    Host {
        /// The agent's address (as for `agent --listen`, or `vsock:CID:PORT`).
        #[arg(long)]
        connect: String,
        #[command(subcommand)]
        action: host::Action,
    },
    /// Share one agent connection among many host clients: a relay that routes
    /// frames by their id without decoding them (spec sections 6 and 10.5–10.7).
    ///
    /// It connects to the agent, runs the start-up exchange once as its host
    /// (core.bootstrap, core.init.ack for core.init.resolved, then core.ready,
    /// which it keeps) and sends one core.clock.sync. It then listens on a Unix
    /// socket (created with mode 0600) for up to 128 clients; one more is closed
    /// at once. Each client gets the lowest free slot s, the ids s*33554431 up to
    /// (s+1)*33554431 (exclusive; id 0 excluded), and before any frame that range
    /// and the agent's core.ready. A client that sends a flags byte other than 0,
    /// 1, 2, 4, 8 or an id outside its range (other than core.shutdown on id 0) is
    /// disconnected. Agent frames go to the client whose range holds their id;
    /// those on id 0 or 0xFFFFFFFF and those for no connected client are dropped.
    /// When a client leaves, the agent is sent core.relay.client.disconnected for
    /// its range, which ends that client's sessions (a 0.7.13 agent, like
    /// `agentwire agent`, also kills their commands; a 0.6.14 one leaves them running).
    /// Clients connect with `via_relay` (agentwire-client) and send no
    /// core.clock.sync of their own: it is an id-0 frame.
    ///
    /// The relay never stops reading the agent for one client. A client is
    /// disconnected (a warning is logged and the agent is told, as when a
    /// client leaves) rather than holding up the agent's connection and with it
    /// every other client, when more than 8 MiB wait for it and it takes
    /// nothing for 5 s, when 40 MiB would wait for it, or when 256 MiB would
    /// wait for all clients together.
    ///
    /// Exit status: 0 on SIGINT or SIGTERM (the socket file is removed); 1 when
    /// the agent cannot be reached, its start-up exchange fails or its connection
    /// ends (every client is then closed); 2 for usage errors, an unreadable or
    /// invalid bootstrap file, or a socket that cannot be created (one that
    /// exists already included).
    Relay {
        /// The agent's address: `unix:PATH` (or a path with a `/`),
        /// `127.0.0.1:PORT` or another IP:PORT, or `vsock:CID:PORT`.
        #[arg(long, value_name = "ADDR")]
        agent: String,
        /// The Unix socket clients connect to: `unix:PATH` or a path with a `/`.
        /// It must not exist; it is removed when the relay stops.
        #[arg(long, value_name = "unix:PATH")]
        listen: String,
        /// The core.bootstrap to send, as JSON (the fields of GuestBootstrap,
        /// e.g. {"user": "root", "default_cwd": "/tmp"}); default: an empty one.
        #[arg(long, value_name = "FILE.json")]
        bootstrap: Option<PathBuf>,
    },
    /// Boot the VM image from vm/build.sh in QEMU with the agent as init, show
    /// its boot figures, run a command inside it (default `uname -a`), power it off.
    ///
    /// Exit status: the command's; 2 when QEMU or the image is missing.
    Vm {
        /// QEMU machine type.
        #[arg(long, value_enum, default_value = "q35")]
        machine: vm::Machine,
        /// Directory with vmlinuz and initramfs.cpio.gz.
        #[arg(long, default_value = "target/vm")]
        image: PathBuf,
        /// Serve the agent's port on this Unix socket (default: a temporary one).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Only boot, and wait for QEMU to end: a host connects to --socket.
        #[arg(long, requires = "socket")]
        boot_only: bool,
        /// Also measure a 16 MiB file transfer and ping round trips over virtio-serial.
        #[arg(long)]
        measure: bool,
        /// The command to run in the guest.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// The main job: an agent and a host over a real Unix socket, a scripted
    /// session checked at every step, and a summary. Exit status 0 only if
    /// every check held.
    Demo {
        /// Exec sessions to run at once on the one connection.
        #[arg(long, default_value_t = 8)]
        sessions: usize,
        /// Write both directions' frames to FILE, for `agentwire inspect`.
        #[arg(long, value_name = "FILE")]
        capture: Option<PathBuf>,
        /// Size of the file written and read back, in MiB.
        #[arg(long, default_value_t = 64)]
        file_mib: usize,
        /// Pings whose round trip is measured.
        #[arg(long, default_value_t = 1000)]
        pings: usize,
    },
    /// Diagnostics (hidden): boot the image with /bench-init, time a raw copy
    /// over the agent's virtio-serial port and then the agent's transfers over
    /// it, and print both. With --guest: the guest's side of the raw copy
    /// (run by /bench-init inside the VM).
    #[command(hide = true)]
    VmBench {
        /// QEMU machine type.
        #[arg(long, value_enum, default_value = "q35")]
        machine: vm::Machine,
        /// Directory with vmlinuz and initramfs.cpio.gz.
        #[arg(long, default_value = "target/vm")]
        image: PathBuf,
        /// MiB each transfer moves.
        #[arg(long, default_value_t = 32)]
        mib: usize,
        /// Times each transfer is measured.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Exec flow-control window in KiB for the exec transfers (0: the client's defaults).
        #[arg(long, default_value_t = 0)]
        exec_window_kib: u32,
        /// Be the guest's side: copy raw bytes on the port of this name as the host asks.
        #[arg(long, value_name = "PORT")]
        guest: Option<String>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `agentwire man | man -l -`.
    Man,
}

/// Logs go to standard error with timestamps; `RUST_LOG` overrides `-v`.
fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

fn main() -> ExitCode {
    let start_ns = sys::boottime_ns();
    #[cfg(feature = "mimalloc")]
    tune_allocator();
    if std::process::id() == 1 {
        for (key, value) in init::BASE_ENV {
            // SAFETY: no other thread exists yet: the runtime is built below.
            unsafe { std::env::set_var(key, value) };
        }
        // The VM's init: no command line to parse; settings come from the kernel's.
        init_logging(1);
        return runtime(init::run(start_ns));
    }
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let verbose = cli.verbose > 0;
    match cli.command {
        Command::Inspect { file, json } => inspect::run(file.as_deref(), json),
        Command::Encode { file, out } => encode::run(file.as_deref(), out.as_deref()),
        Command::Agent { listen, root, allow_net, handshake_timeout, idle_timeout, no_splice } => {
            let timeouts =
                (Duration::from_secs(handshake_timeout), (idle_timeout > 0).then(|| Duration::from_secs(idle_timeout)));
            let serving = agent::Serving { verbose, splice: !no_splice };
            runtime(async move { serve(&listen, root, allow_net, timeouts, serving, start_ns).await })
        }
        Command::Host { connect, action } => runtime(async move { host::run(&connect, action).await }),
        Command::Relay { agent, listen, bootstrap } => runtime(relay::run(relay::Options { agent, listen, bootstrap })),
        Command::Vm { machine, image, socket, boot_only, measure, command } => {
            runtime(vm::run(vm::Options { machine, image, socket, boot_only, measure, command }))
        }
        Command::Demo { sessions, capture, file_mib, pings } => {
            runtime(demo::run(demo::Options { sessions, capture, file_mib, pings }))
        }
        Command::VmBench { guest: Some(port), .. } => match serial::raw_copy_guest(&port) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("agentwire vm-bench --guest: {e}");
                ExitCode::FAILURE
            }
        },
        Command::VmBench { machine, image, mib, rounds, exec_window_kib, guest: None } => {
            runtime(vm::bench(vm::BenchOptions { machine, image, mib, rounds, exec_window_kib }))
        }
        Command::Completions { shell } => {
            let mut text = Vec::new();
            clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "agentwire", &mut text);
            print_quietly(&text)
        }
        Command::Man => {
            let mut text = Vec::new();
            match clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut text) {
                Ok(()) => print_quietly(&text),
                Err(e) => {
                    eprintln!("agentwire man: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Runs `f` on a multi-threaded runtime. The runtime is not waited for at the
/// end: a read of the terminal's standard input cannot be cancelled.
fn runtime(f: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => {
            let code = rt.block_on(f);
            rt.shutdown_timeout(std::time::Duration::from_millis(100));
            code
        }
        Err(e) => {
            eprintln!("agentwire: cannot start the runtime: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

async fn serve(
    listen: &str,
    root: PathBuf,
    allow_net: bool,
    (handshake_timeout, idle_timeout): (Duration, Option<Duration>),
    serving: agent::Serving,
    start_ns: u64,
) -> ExitCode {
    let usage = |m: String| {
        eprintln!("agentwire agent: {m}");
        ExitCode::from(EXIT_USAGE)
    };
    let addr = match addr::Addr::parse(listen).and_then(|a| a.check_listenable().map(|()| a)) {
        Ok(a) => a,
        Err(e) => return usage(e),
    };
    let root = match root.canonicalize() {
        Ok(r) if r.is_dir() => r,
        Ok(r) => return usage(format!("--root {}: not a directory", r.display())),
        Err(e) => return usage(format!("--root {}: {e}", root.display())),
    };
    let listener = match addr::Listener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => return usage(format!("cannot listen on {addr}: {e}")),
    };
    let bound = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| addr.to_string());
    eprintln!("agentwire agent: listening on {bound}, files under {}", root.display());
    let mut config = agent::Config::new(root);
    config.allow_net = allow_net;
    config.session.handshake_timeout = handshake_timeout;
    config.session.idle_timeout = idle_timeout;
    config.boot_time_ns = start_ns;
    config.init_time_ns = sys::boottime_ns().saturating_sub(start_ns);
    let served = agent::serve(listener, Arc::new(agent::Agent::new(config)), serving);
    // SIGINT or SIGTERM: the listener is dropped (its socket file removed), the
    // runtime's shutdown ends every session (killing their process groups).
    tokio::select! {
        result = served => match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("agentwire agent: {e}");
                ExitCode::FAILURE
            }
        },
        signal = terminated() => {
            eprintln!("agentwire agent: {signal}: stopping");
            ExitCode::SUCCESS
        }
    }
}

/// Resolves on SIGINT or SIGTERM, with the signal's name.
pub async fn terminated() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// Writes `text` to standard output; a reader that went away (`| head`) is no failure.
fn print_quietly(text: &[u8]) -> ExitCode {
    use std::io::Write;
    match std::io::stdout().write_all(text) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("agentwire: standard output: {e}");
            ExitCode::FAILURE
        }
        _ => ExitCode::SUCCESS,
    }
}

/// Opens `path` for reading, standard input for `-` or none.
fn open_input(path: Option<&std::path::Path>) -> Result<Box<dyn std::io::Read>, String> {
    match path {
        None => Ok(Box::new(std::io::stdin().lock())),
        Some(p) if p.as_os_str() == "-" => Ok(Box::new(std::io::stdin().lock())),
        Some(p) => std::fs::File::open(p)
            .map(|f| Box::new(f) as Box<dyn std::io::Read>)
            .map_err(|e| format!("cannot read {}: {e}", p.display())),
    }
}

/// Exit status for usage errors and unreadable or unwritable files.
const EXIT_USAGE: u8 = 2;
