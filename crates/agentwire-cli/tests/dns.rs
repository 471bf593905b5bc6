//! Without `--allow-net`, a refused `core.tcp.connect` to a name sends no DNS
//! query; counted, not assumed.
//!
//! The test runs itself again under `unshare -rnm` (a user, network and
//! mount namespace of its own, where it is root): there, the only network is
//! loopback, `/etc/resolv.conf` is replaced (in that mount namespace only) by
//! one that names `nameserver 127.0.0.1`, and a small "DNS server" on
//! 127.0.0.1:53 counts the datagrams it gets and answers each with NXDOMAIN.
//! An `agentwire agent` started there is asked, through the host client, to
//! connect to `example.com:80`: without `--allow-net` the server must count
//! 0 datagrams; with it (the positive control, which shows that the count
//! would see a query) at least 1. Nothing is sent beyond loopback: the
//! namespace has no other interface, and the server only answers loopback
//! senders.
//!
//! Whether namespaces can be made here is decided by build.rs
//! (`cfg(user_namespaces)`); where they cannot, the test is `ignored`.

mod common;

use std::net::UdpSocket;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_agentwire");

/// Set in the environment of the run inside the namespaces.
const INNER: &str = "AGENTWIRE_DNS_TEST_INSIDE";

const TEST: &str = "without_allow_net_no_dns_query_leaves_for_a_refused_name";

#[test]
#[cfg_attr(
    not(user_namespaces),
    ignore = "needs unprivileged user, network and mount namespaces (`unshare -rnm`) and `ip`, as detected by build.rs"
)]
fn without_allow_net_no_dns_query_leaves_for_a_refused_name() {
    if std::env::var_os(INNER).is_some() {
        return inside();
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .args(["-rnm", "--"])
        .arg(exe)
        .args(["--exact", TEST, "--include-ignored", "--nocapture", "--test-threads=1"])
        .env(INNER, "1")
        .stdin(Stdio::null())
        .output()
        .expect("unshare runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("inside the namespaces:\n{stdout}{stderr}");
    assert!(out.status.success(), "the run inside the namespaces failed ({})", out.status);
    // It ran, rather than matching no test.
    assert!(stdout.contains("test result: ok. 1 passed"), "the test did not run inside the namespaces");
}

/// What the DNS server on 127.0.0.1:53 got.
#[derive(Default)]
struct Queries {
    datagrams: usize,
    names: Vec<String>,
}

/// The name a DNS query asks for (its first question), for the report.
fn qname(packet: &[u8]) -> String {
    let mut labels = Vec::new();
    let mut at = 12;
    while let Some(&len) = packet.get(at) {
        let len = len as usize;
        if len == 0 || len > 63 || at + 1 + len > packet.len() {
            break;
        }
        labels.push(String::from_utf8_lossy(&packet[at + 1..at + 1 + len]).into_owned());
        at += 1 + len;
    }
    labels.join(".")
}

/// Counts datagrams on 127.0.0.1:53 and answers each with NXDOMAIN (so that
/// a resolver that asks gives up at once), until `stop`.
fn dns_server(stop: Arc<AtomicBool>) -> (Arc<Mutex<Queries>>, std::thread::JoinHandle<()>) {
    let socket = UdpSocket::bind("127.0.0.1:53").expect("port 53 on loopback, as root of the namespace");
    socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let queries = Arc::new(Mutex::new(Queries::default()));
    let seen = queries.clone();
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, from)) = socket.recv_from(&mut buf) else { continue };
            let mut q = seen.lock().unwrap();
            q.datagrams += 1;
            q.names.push(qname(&buf[..n]));
            if n >= 12 && from.ip().is_loopback() {
                let mut answer = buf[..n].to_vec();
                answer[2] = 0x80 | (buf[2] & 0x79); // a response, same opcode and RD
                answer[3] = 0x83; // RA, NXDOMAIN
                let _ = socket.send_to(&answer, from);
            }
        }
    });
    (queries, thread)
}

/// Bind-mounts `file` over `target` (in this mount namespace only).
fn bind(file: &Path, target: &str) {
    use nix::mount::{MsFlags, mount};
    mount(Some(file), target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .unwrap_or_else(|e| panic!("bind-mounting {} over {target}: {e}", file.display()));
}

/// Starts an agent (with `--allow-net` or not), asks it to connect to
/// `host:80` through the host client, stops it; the error it gave.
fn refused_connect(tmp: &Path, host: &str, allow_net: bool) -> String {
    let socket = tmp.join(format!("agent-{allow_net}.sock"));
    let mut command = Command::new(BIN);
    command.args(["agent", "--listen"]).arg(&socket).arg("--root").arg(tmp.join("root"));
    if allow_net {
        command.arg("--allow-net");
    }
    let mut agent = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    common::wait_listening(&socket);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let result = runtime.block_on(async {
        let io = tokio::net::UnixStream::connect(&socket).await.unwrap();
        let client = agentwire_client::Client::connect(io).await.unwrap();
        let connect = tokio::time::timeout(Duration::from_secs(30), client.tcp_connect(host, 80)).await;
        match connect.expect("an answer within 30 s") {
            Ok(_) => panic!("{host}:80 was connected to (allow_net: {allow_net}): there is no network here"),
            Err(e) => e.to_string(),
        }
    });
    let _ = agent.kill();
    let _ = agent.wait();
    result
}

/// The test proper, as root of its own user, network and mount namespaces.
fn inside() {
    let ip = ["ip", "/usr/sbin/ip", "/sbin/ip"]
        .iter()
        .find(|ip| Command::new(ip).args(["link", "set", "lo", "up"]).status().is_ok_and(|s| s.success()))
        .expect("`ip link set lo up` in the new network namespace");
    let links = Command::new(ip).args(["-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert_eq!(links.lines().count(), 1, "a new network namespace has loopback only:\n{links}");

    let tmp = TempDir::new("dns");
    std::fs::create_dir(tmp.0.join("root")).unwrap();
    let resolv = tmp.0.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n").unwrap();
    bind(&resolv, "/etc/resolv.conf");
    // Names are looked up in /etc/hosts, then by DNS, nowhere else (no
    // resolver daemon reached over a Unix socket, which would ask from outside).
    if Path::new("/etc/nsswitch.conf").exists() {
        let nsswitch = tmp.0.join("nsswitch.conf");
        std::fs::write(&nsswitch, "hosts: files dns\n").unwrap();
        bind(&nsswitch, "/etc/nsswitch.conf");
    }
    for nscd in ["/run/nscd", "/var/run/nscd"] {
        if Path::new(nscd).is_dir() {
            let empty = tmp.0.join("empty");
            let _ = std::fs::create_dir(&empty);
            bind(&empty, nscd);
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let (queries, server) = dns_server(stop.clone());
    let count = || queries.lock().unwrap().datagrams;
    let settle = || std::thread::sleep(Duration::from_millis(500));

    let mut refusals = Vec::new();
    for host in ["example.com", "example.com.", "db.internal"] {
        refusals.push(refused_connect(&tmp.0, host, false));
    }
    settle();
    let without = count();

    let answered = refused_connect(&tmp.0, "example.com", true);
    settle();
    let with = count() - without;
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
    let names = queries.lock().unwrap().names.clone();
    println!(
        "DNS datagrams on 127.0.0.1:53: {without} for 3 refused names without --allow-net; {with} for example.com \
         with --allow-net (names asked: {names:?})"
    );
    println!("refusals: {refusals:?}; with --allow-net: {answered:?}");
    assert_eq!(without, 0, "DNS queries left for refused names: {names:?}");
    for r in &refusals {
        assert!(r.contains("no DNS query was sent"), "{r}");
    }
    assert!(with >= 1, "with --allow-net no query was counted: the count shows nothing ({answered})");
    assert!(names.iter().all(|n| n == "example.com"), "{names:?}");
}
