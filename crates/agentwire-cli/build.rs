//! Detects vsock loopback (CID 1, `VMADDR_CID_LOCAL`): when an `AF_VSOCK`
//! socket can be bound to it, the kernel routes vsock between local sockets,
//! and the vsock end-to-end test runs (`cfg(vsock_loopback)`); otherwise that
//! test is `ignored` in `cargo test`'s summary. Only binds, never connects:
//! nothing is sent to a hypervisor (CID 2) or anywhere else.
//!
//! Also detects whether this user can make its own user, network and mount
//! namespaces and bring loopback up in them (`unshare -rnm ip link set lo
//! up`): then the test that counts DNS packets in such a namespace runs
//! (`cfg(user_namespaces)`, tests/dns.rs); otherwise it is `ignored`. The
//! namespace is thrown away at once; nothing outside it is touched.
//!
//! Detected when the build script runs (at the first build, or when this file
//! changes): `cargo clean -p agentwire-cli` after loading `vsock_loopback`,
//! or after allowing unprivileged user namespaces.

use std::os::fd::AsRawFd;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, VsockAddr, bind, socket};

/// `VMADDR_CID_LOCAL`: this machine, by vsock loopback.
const CID_LOCAL: u32 = 1;
/// `VMADDR_PORT_ANY`: any free port.
const PORT_ANY: u32 = u32::MAX;

fn vsock_loopback() -> bool {
    let Ok(fd) = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None) else {
        return false;
    };
    bind(fd.as_raw_fd(), &VsockAddr::new(CID_LOCAL, PORT_ANY)).is_ok()
}

/// Whether `unshare -rnm` works here and `ip` brings loopback up inside.
fn user_namespaces() -> bool {
    use std::process::{Command, Stdio};
    ["ip", "/usr/sbin/ip", "/sbin/ip"].iter().any(|ip| {
        Command::new("unshare")
            .args(["-rnm", "--", ip, "link", "set", "lo", "up"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rustc-check-cfg=cfg(vsock_loopback)");
    println!("cargo::rustc-check-cfg=cfg(user_namespaces)");
    if vsock_loopback() {
        println!("cargo::rustc-cfg=vsock_loopback");
    }
    if user_namespaces() {
        println!("cargo::rustc-cfg=user_namespaces");
    }
}
