//! Our host and our agent at generation 10 moving 256 MiB each way and a
//! command writing 256 MiB to stdout, with the receiver reading slowly: each
//! process stays under 64 MiB of resident memory above its idle size, and the
//! data arrives intact. Figures are `VmHWM` (peak) against `VmRSS` at idle,
//! from `/proc/PID/status`, printed for the record.

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{RunningAgent as Agent, peak_rss_kib};

const BIN: &str = env!("CARGO_BIN_EXE_agentwire");
const SIZE: usize = 256 << 20;
const BOUND_KIB: u64 = 64 * 1024;

/// Resident memory of `pid` now (`VmRSS`), in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap();
    line.split_whitespace().next().unwrap().parse().unwrap()
}

/// The bytes of the test file: position-dependent, so a lost or moved chunk shows.
fn byte_at(i: usize) -> u8 {
    (i ^ (i >> 11) ^ (i >> 23)) as u8
}

/// Reads all of `r` at about `rate` bytes a second, checking each byte, and
/// watching the peak memory of `pid` meanwhile (it is gone once `r` ends).
fn read_slowly(r: &mut impl Read, rate: usize, pid: u32, check: impl Fn(usize, u8) -> bool) -> (usize, u64) {
    let start = Instant::now();
    let (mut n, mut peak) = (0usize, 0u64);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let got = r.read(&mut buf).unwrap();
        if got == 0 {
            break;
        }
        for (k, b) in buf[..got].iter().enumerate() {
            assert!(check(n + k, *b), "byte {} differs", n + k);
        }
        n += got;
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            && let Some(v) = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))
        {
            peak = peak.max(v.split_whitespace().next().unwrap().parse().unwrap());
        }
        let due = Duration::from_secs_f64(n as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    (n, peak)
}

/// A host command's idle size: the peak of `agentwire host ping` (connected,
/// moving no data), watched while it runs.
fn host_idle_kib(agent: &Agent) -> u64 {
    let mut ping = Command::new(BIN)
        .args(["host", "--connect", agent.socket.to_str().unwrap(), "ping", "--count", "2000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut peak = 0;
    while ping.try_wait().unwrap().is_none() {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", ping.id()))
            && let Some(v) = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))
        {
            peak = peak.max(v.split_whitespace().next().unwrap().parse().unwrap());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    peak
}

fn host(agent: &Agent, args: &[&str]) -> Child {
    let mut all = vec!["host", "--connect", agent.socket.to_str().unwrap()];
    all.extend_from_slice(args);
    Command::new(BIN).args(all).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

#[test]
fn two_hundred_fifty_six_mib_each_way_and_from_stdout_stay_within_64_mib_above_idle() {
    let agent = Agent::start("transfer-mem");
    std::thread::sleep(Duration::from_millis(200));
    let agent_idle = rss_kib(agent.child.id());
    let host_idle = host_idle_kib(&agent);
    eprintln!("idle: agent {agent_idle} KiB, host {host_idle} KiB");

    // Guest -> host: a 256 MiB file read by a host whose reader takes 64 MiB/s.
    let data: Vec<u8> = (0..SIZE).map(byte_at).collect();
    std::fs::write(agent.root().join("big.bin"), &data).unwrap();
    let mut get = host(&agent, &["fs-get", "/big.bin"]);
    let pid = get.id();
    let (n, get_peak) = read_slowly(get.stdout.as_mut().unwrap(), 64 << 20, pid, |i, b| b == byte_at(i));
    assert!(get.wait().unwrap().success());
    assert_eq!(n, SIZE);

    // Host -> guest: 256 MiB from a local file.
    std::fs::create_dir_all(agent.outside()).unwrap();
    let local = agent.outside().join("upload.bin");
    std::fs::write(&local, &data).unwrap();
    let put = host(&agent, &["fs-put", local.to_str().unwrap(), "/up.bin"]);
    let pid = put.id();
    let mut put_peak = 0;
    let out = std::thread::scope(|s| {
        let waiter = s.spawn(|| put.wait_with_output().unwrap());
        while !waiter.is_finished() {
            if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                && let Some(v) = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))
            {
                put_peak = put_peak.max(v.split_whitespace().next().unwrap().parse().unwrap());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        waiter.join().unwrap()
    });
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read(agent.root().join("up.bin")).unwrap() == data, "the upload arrived intact");
    let _ = std::fs::remove_file(&local);
    drop(data);

    // A command writing 256 MiB to stdout, read at 64 MiB/s.
    let mut exec = host(&agent, &["exec", "head", "-c", &SIZE.to_string(), "/dev/zero"]);
    let pid = exec.id();
    let (n, exec_peak) = read_slowly(exec.stdout.as_mut().unwrap(), 64 << 20, pid, |_, b| b == 0);
    assert!(exec.wait().unwrap().success());
    assert_eq!(n, SIZE);

    let agent_peak = peak_rss_kib(agent.child.id());
    eprintln!(
        "peaks: agent {agent_peak} KiB (idle {agent_idle}); host fs-get {get_peak}, fs-put {put_peak}, exec {exec_peak} KiB (idle {host_idle})"
    );
    assert!(agent_peak < agent_idle + BOUND_KIB, "agent peak {agent_peak} KiB, idle {agent_idle} KiB");
    for (what, peak) in [("fs-get", get_peak), ("fs-put", put_peak), ("exec", exec_peak)] {
        assert!(peak < host_idle + BOUND_KIB, "host {what} peak {peak} KiB, idle {host_idle} KiB");
    }
}
