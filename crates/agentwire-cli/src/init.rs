//! The agent as PID 1 of a VM: mount what a Linux userland needs, load the
//! modules the initramfs lists (the virtio transport), then serve the host on
//! the virtio-serial port, and power the VM off on `core.shutdown`.
//!
//! Settings come from the kernel command line: `agentwire.listen=ADDR`
//! (default `port:agent`).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use crate::addr::{Addr, Listener};
use crate::{agent, sys};

/// Where the initramfs lists the modules to load, one path a line, in order.
const MODULE_LIST: &str = "/etc/agentwire/modules";

/// The environment of the init process and so of every command it runs.
pub const BASE_ENV: [(&str, &str); 3] =
    [("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"), ("HOME", "/root"), ("TERM", "linux")];

/// Runs init; returns only if the VM could not be powered off.
pub async fn run(start_ns: u64) -> ExitCode {
    for (source, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("tmpfs", "/tmp", "tmpfs"),
        ("tmpfs", "/run", "tmpfs"),
    ] {
        if let Err(e) = sys::mount(source, target, fstype) {
            eprintln!("agentwire init: mount {fstype} on {target}: {e}");
        }
    }
    for module in std::fs::read_to_string(MODULE_LIST).unwrap_or_default().lines().filter(|l| !l.trim().is_empty()) {
        match sys::load_module(Path::new(module.trim())) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => eprintln!("agentwire init: module {module}: {e}"),
        }
    }
    let init_time_ns = sys::boottime_ns().saturating_sub(start_ns);
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let listen = cmdline.split_whitespace().find_map(|w| w.strip_prefix("agentwire.listen=")).unwrap_or("port:agent");
    let result = match Addr::parse(listen) {
        Ok(addr) => match Listener::bind(&addr).await {
            Ok(listener) => {
                eprintln!("agentwire init: serving on {addr} ({init_time_ns} ns to mount and load modules)");
                let mut config = agent::Config::new("/".into());
                config.boot_time_ns = start_ns;
                config.init_time_ns = init_time_ns;
                config.init_mode = true;
                // Orphans are re-parented to init: collect them, or they stay zombies.
                tokio::spawn(async {
                    loop {
                        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                        tokio::task::spawn_blocking(agent::reap_orphans);
                    }
                });
                agent::serve(
                    listener,
                    Arc::new(agent::Agent::new(config)),
                    agent::Serving { verbose: true, splice: true },
                )
                .await
                .map_err(|e| e.to_string())
            }
            Err(e) => Err(format!("{addr}: {e}")),
        },
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        eprintln!("agentwire init: {e}");
    }
    eprintln!("agentwire init: powering off: {}", sys::power_off());
    ExitCode::FAILURE
}
