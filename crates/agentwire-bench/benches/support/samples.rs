//! One representative value of each of the 32 message types of generation 7,
//! as an application sends them: a command with its arguments, environment and
//! limits, file paths, 64-byte data chunks, a guest bootstrap with mounts and a
//! network. Used by `examples/profile_types.rs` (instructions per type, ours
//! against the reference) and by `benches/codec.rs`.
//!
//! Every value is what a generation-7 writer can hold (no field added after
//! generation 7 is set), so that the reference 0.6.14 holds the equal value
//! and writes the same bytes.
#![allow(dead_code)] // each user takes what it needs

use std::net::Ipv4Addr;

use agentwire::payload::Text;
use agentwire::payload::bootstrap::{
    BootstrapBlockRoot, BootstrapBlockRootUpper, BootstrapDirMount, BootstrapEnvVar, BootstrapIpv4,
    BootstrapMountFlags, BootstrapNetwork, BootstrapSecurityProfile, BootstrapTmpfsMount, GuestBootstrap,
};
use agentwire::payload::core::{
    ClockSync, CoreError, CoreErrorKind, InitAck, InitResolved, Ping, Pong, Ready, RelayClientDisconnected,
    ResolvedUser, Shutdown, Touch, Touched,
};
use agentwire::payload::exec::{
    ExecExited, ExecFailed, ExecFailureKind, ExecRequest, ExecResize, ExecRlimit, ExecSignal, ExecStarted, ExecStderr,
    ExecStdin, ExecStdinError, ExecStdout,
};
use agentwire::payload::fs::{FsData, FsEntryInfo, FsOp, FsOpenOptions, FsRequest, FsResponse, FsResponseData};
use agentwire::payload::tcp::{TcpClose, TcpClosed, TcpConnect, TcpConnected, TcpData, TcpEof, TcpFailed};
use agentwire::{MessageType, Payload};
use bytes::Bytes;

/// The generation whose types are measured against both references.
pub const GENERATION: u8 = 7;

/// The message types of generation 7 that have an envelope (all 32 of them).
pub fn gen7_types() -> Vec<MessageType> {
    MessageType::ALL.iter().copied().filter(|t| t.generation() <= GENERATION && t.has_envelope()).collect()
}

/// 64 bytes of output, as a data frame of a chatty process carries.
pub fn chunk64() -> Bytes {
    Bytes::from((0..64u8).map(|i| b' ' + i % 94).collect::<Vec<u8>>())
}

/// `core.ready` as the agent sends it (also the `ready` criterion group's value).
pub fn ready() -> Ready {
    Ready {
        boot_time_ns: 1_234_567_890,
        init_time_ns: 45_678_901,
        ready_time_ns: 1_300_000_000,
        agent_version: "agentwire 0.1.0".into(),
        capabilities: None,
    }
}

/// `core.exec.request`: a command, 4 arguments, 6 environment entries, a
/// working directory, a user and 2 resource limits.
pub fn exec_request() -> ExecRequest {
    ExecRequest {
        args: ["-m", "pytest", "-q", "tests/"].map(Text::from).to_vec(),
        env: [
            "PATH=/usr/local/bin:/usr/bin:/bin",
            "HOME=/home/sandbox",
            "LANG=C.UTF-8",
            "TERM=xterm-256color",
            "PYTHONUNBUFFERED=1",
            "VIRTUAL_ENV=/workspace/.venv",
        ]
        .map(Text::from)
        .to_vec(),
        cwd: Some("/workspace".into()),
        user: Some("sandbox".into()),
        rlimits: vec![
            ExecRlimit { resource: "nofile".into(), soft: 1024, hard: 4096 },
            ExecRlimit { resource: "nproc".into(), soft: 512, hard: 1024 },
        ],
        ..ExecRequest::new("/usr/bin/python3")
    }
}

/// The representative value of `t`, a type of generation 7.
pub fn sample(t: MessageType) -> Payload {
    use MessageType as T;
    match t {
        T::Ready => ready().into(),
        T::InitResolved => InitResolved { default_user: ResolvedUser { uid: 1000, gid: 1000 } }.into(),
        T::InitAck => InitAck::default().into(),
        T::Shutdown => Shutdown.into(),
        T::RelayClientDisconnected => {
            RelayClientDisconnected { id_start: 0x1000_0000, id_end_exclusive: 0x1001_0000, incarnation: None }.into()
        }
        T::ClockSync => ClockSync { unix_time_nanos: 1_765_000_000_123_456_789 }.into(),
        T::Ping => Ping {}.into(),
        T::Pong => Pong {}.into(),
        T::Touch => Touch {}.into(),
        T::Touched => Touched { activity_seq: 4242 }.into(),
        T::Error => CoreError::new(CoreErrorKind::InvalidSession, "no open session for id 268435457")
            .with_offending_type("core.exec.stdin")
            .into(),
        T::ExecRequest => exec_request().into(),
        T::ExecStarted => ExecStarted { pid: 4242 }.into(),
        T::ExecStdin => ExecStdin { data: chunk64() }.into(),
        T::ExecStdinError => ExecStdinError {
            errno: Some(32),
            errno_name: Some("EPIPE".into()),
            message: "Broken pipe (os error 32)".into(),
        }
        .into(),
        T::ExecStdout => ExecStdout { data: chunk64() }.into(),
        T::ExecStderr => ExecStderr { data: chunk64() }.into(),
        T::ExecExited => ExecExited { code: 1 }.into(),
        T::ExecFailed => ExecFailed {
            kind: ExecFailureKind::NotFound,
            errno: Some(2),
            errno_name: Some("ENOENT".into()),
            message: "No such file or directory (os error 2)".into(),
            stage: Some("execve".into()),
        }
        .into(),
        T::ExecResize => ExecResize { rows: 50, cols: 200 }.into(),
        T::ExecSignal => ExecSignal { signal: 15 }.into(),
        T::FsRequest => FsRequest::new(FsOp::OpenFile {
            path: "/workspace/src/agent/main.rs".into(),
            options: FsOpenOptions {
                write: true,
                create: true,
                truncate: true,
                mode: Some(0o644),
                ..FsOpenOptions::default()
            },
        })
        .into(),
        T::FsResponse => FsResponse::success(Some(FsResponseData::Stat(FsEntryInfo {
            path: "/workspace/src/agent/main.rs".into(),
            kind: "file".into(),
            size: 12_345,
            mode: 0o100_644,
            modified: Some(1_765_000_000),
            uid: 1000,
            gid: 1000,
            atime: Some(1_765_000_100),
            mtime: Some(1_765_000_000),
        })))
        .into(),
        T::FsData => FsData { data: chunk64() }.into(),
        T::TcpConnect => TcpConnect::new("db.internal", 5432).into(),
        T::TcpConnected => TcpConnected {}.into(),
        T::TcpData => TcpData { data: chunk64() }.into(),
        T::TcpEof => TcpEof {}.into(),
        T::TcpClose => TcpClose {}.into(),
        T::TcpClosed => TcpClosed {}.into(),
        T::TcpFailed => TcpFailed { error: "Connection refused (os error 111)".into() }.into(),
        T::Bootstrap => bootstrap().into(),
        other => panic!("{other} is not a type of generation 7"),
    }
}

/// `core.bootstrap`: an OCI root on erofs with a tmpfs upper layer, a shared
/// directory, `/tmp`, a network with IPv4, a user, a working directory, an
/// environment and a limit.
fn bootstrap() -> GuestBootstrap {
    let env = |key: &str, value: &str| BootstrapEnvVar { key: key.into(), value: value.into() };
    GuestBootstrap {
        block_root: Some(BootstrapBlockRoot::OciErofs {
            lower: "/dev/vdb".into(),
            upper: BootstrapBlockRootUpper::Tmpfs { size_mib: Some(1024) },
        }),
        dir_mounts: vec![BootstrapDirMount {
            tag: "workspace".into(),
            guest_path: "/workspace".into(),
            flags: BootstrapMountFlags::default(),
        }],
        tmpfs_mounts: vec![BootstrapTmpfsMount {
            path: "/tmp".into(),
            size_mib: Some(256),
            mode: Some(0o1777),
            flags: BootstrapMountFlags { nosuid: true, nodev: true, ..BootstrapMountFlags::default() },
        }],
        hostname: Some("sandbox-7f3a".into()),
        network: Some(BootstrapNetwork {
            interface: "eth0".into(),
            mac: [0x02, 0x00, 0x00, 0x7f, 0x3a, 0x01],
            mtu: 1500,
            ipv4: Some(BootstrapIpv4 {
                address: Ipv4Addr::new(10, 0, 2, 15),
                prefix_len: 24,
                gateway: Ipv4Addr::new(10, 0, 2, 2),
                dns: Some(Ipv4Addr::new(10, 0, 2, 3)),
            }),
            ipv6: None,
        }),
        rlimits: vec![ExecRlimit { resource: "nofile".into(), soft: 65_536, hard: 65_536 }],
        user: Some("sandbox".into()),
        default_cwd: Some("/workspace".into()),
        default_env: vec![env("PATH", "/usr/local/bin:/usr/bin:/bin"), env("LANG", "C.UTF-8"), env("HOME", "/root")],
        security_profile: BootstrapSecurityProfile::Default,
        ..GuestBootstrap::default()
    }
}
