//! The VM transport at the virtio-serial port's limit: `agentwire vm-bench`
//! boots the image from `vm/build.sh` once with `/bench-init`, times a raw
//! copy over the agent's port in both directions (the guest's side is the
//! agent binary's `vm-bench --guest`, before the agent starts), then the
//! agent's transfers over the same port through the host client (file write
//! and read, exec stdin and stdout, and an `exec cat` whose output is checked
//! byte for byte against its input), the guest's tmpfs alone, and prints MB/s
//! and the ratios. A lost or changed byte fails it.
//!
//! Ignored by default: it boots QEMU. Run it with
//! `cargo test -p agentwire-cli --test vm_transfer -- --include-ignored --nocapture`
//! after `vm/build.sh` (`AGENTWIRE_VM_DIR` says where the image is;
//! `AGENTWIRE_VM_BENCH_MIB`, default 32, how much each transfer moves;
//! `AGENTWIRE_VM_SMP`, default 1, the guest's vCPUs). It asserts no rates
//! (software emulation on a shared machine varies too much); `vm/bench.sh`
//! runs the same without cargo test.

use std::path::PathBuf;
use std::process::Command;

fn image_dir() -> PathBuf {
    std::env::var_os("AGENTWIRE_VM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/vm"))
}

#[test]
#[ignore = "needs QEMU and the image from vm/build.sh; run with --include-ignored"]
fn raw_port_copy_and_agent_transfers_over_virtio_serial() {
    let image = image_dir();
    for f in ["vmlinuz", "initramfs.cpio.gz"] {
        assert!(image.join(f).is_file(), "no {} (vm/build.sh builds the image)", image.join(f).display());
    }
    let mib = std::env::var("AGENTWIRE_VM_BENCH_MIB").unwrap_or_else(|_| "32".into());
    let out = Command::new(env!("CARGO_BIN_EXE_agentwire"))
        .args(["vm-bench", "--mib", &mib, "--image"])
        .arg(&image)
        .output()
        .expect("agentwire runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "agentwire vm-bench ended with {}", out.status);
    for line in [
        "raw port host->guest",
        "guest tmpfs alone",
        "agent fs write",
        "agent fs read",
        "agent exec stdin",
        "agent exec stdout",
        "agent exec cat",
    ] {
        assert!(stdout.contains(line), "no {line:?} in the summary");
    }
}
