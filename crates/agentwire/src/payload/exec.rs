//! Payloads of `core.exec.*`: running a command in the guest.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{Text, open_enum, serde_payload};

/// `core.exec.request`: run a command. Starts a session.
///
/// Its strings are [`Text`]: decoded from a frame, views of it, checked once
/// and not copied.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The program.
    pub cmd: Text,
    /// Its arguments, without the program name.
    #[serde(default)]
    pub args: Vec<Text>,
    /// Extra environment, as `KEY=VALUE`.
    #[serde(default)]
    pub env: Vec<Text>,
    /// Working directory; the guest's default when `None`.
    #[serde(default)]
    pub cwd: Option<Text>,
    /// User to run as; the guest's default when `None`.
    #[serde(default)]
    pub user: Option<Text>,
    /// Run on a pseudo-terminal.
    #[serde(default)]
    pub tty: bool,
    /// Terminal rows (default 24).
    #[serde(default = "default_rows")]
    pub rows: u16,
    /// Terminal columns (default 80).
    #[serde(default = "default_cols")]
    pub cols: u16,
    /// Resource limits for the process.
    #[serde(default)]
    pub rlimits: Vec<ExecRlimit>,
}

fn default_rows() -> u16 {
    24
}

fn default_cols() -> u16 {
    80
}

impl ExecRequest {
    /// A request for `cmd` with every other field at its default.
    ///
    /// ```
    /// use agentwire::payload::exec::ExecRequest;
    /// let req = ExecRequest::new("echo");
    /// assert_eq!((req.rows, req.cols, req.tty), (24, 80, false));
    /// ```
    pub fn new(cmd: impl Into<Text>) -> ExecRequest {
        ExecRequest {
            cmd: cmd.into(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
            user: None,
            tty: false,
            rows: default_rows(),
            cols: default_cols(),
            rlimits: Vec::new(),
        }
    }
}

/// One resource limit, as `setrlimit` takes it.
///
/// Parses from `RESOURCE=SOFT[:HARD]`: the name is lowercased, a missing hard
/// limit equals the soft one, and a soft limit above the hard one is refused.
///
/// ```
/// use agentwire::payload::exec::ExecRlimit;
/// let r: ExecRlimit = "NOFILE=1024:4096".parse()?;
/// assert_eq!((r.resource.as_str(), r.soft, r.hard), ("nofile", 1024, 4096));
/// assert_eq!("cpu=10".parse::<ExecRlimit>()?.hard, 10);
/// assert!("as=10:5".parse::<ExecRlimit>().is_err());
/// # Ok::<(), agentwire::payload::exec::RlimitParseError>(())
/// ```
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRlimit {
    /// Lowercase resource name: `nofile`, `nproc`, `as`, `cpu`, ...
    pub resource: Text,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// Why a `RESOURCE=SOFT[:HARD]` text did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RlimitParseError {
    /// No `=` between name and limits.
    #[error("rlimit {0:?}: expected RESOURCE=SOFT[:HARD]")]
    MissingEquals(String),
    /// Empty resource name.
    #[error("rlimit {0:?}: the resource name is empty")]
    EmptyResource(String),
    /// A limit is not a non-negative integer.
    #[error("rlimit {input:?}: {limit:?} is not a number")]
    BadNumber {
        /// The whole text.
        input: String,
        /// The part that is not a number.
        limit: String,
    },
    /// Soft above hard.
    #[error("rlimit {input:?}: soft limit {soft} is above hard limit {hard}")]
    SoftAboveHard {
        /// The whole text.
        input: String,
        /// Soft limit.
        soft: u64,
        /// Hard limit.
        hard: u64,
    },
}

impl FromStr for ExecRlimit {
    type Err = RlimitParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let (name, limits) = input.split_once('=').ok_or_else(|| RlimitParseError::MissingEquals(input.to_string()))?;
        let resource = name.trim().to_ascii_lowercase();
        if resource.is_empty() {
            return Err(RlimitParseError::EmptyResource(input.to_string()));
        }
        let number = |s: &str| {
            s.trim()
                .parse::<u64>()
                .map_err(|_| RlimitParseError::BadNumber { input: input.to_string(), limit: s.to_string() })
        };
        let (soft, hard) = match limits.split_once(':') {
            Some((soft, hard)) => (number(soft)?, number(hard)?),
            None => {
                let soft = number(limits)?;
                (soft, soft)
            }
        };
        if soft > hard {
            return Err(RlimitParseError::SoftAboveHard { input: input.to_string(), soft, hard });
        }
        Ok(ExecRlimit { resource: resource.into(), soft, hard })
    }
}

impl fmt::Display for ExecRlimit {
    /// The `RESOURCE=SOFT:HARD` form, which parses back to the same value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}:{}", self.resource, self.soft, self.hard)
    }
}

/// `core.exec.started`: the process is running.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStarted {
    /// Its pid in the guest.
    pub pid: u32,
}

/// `core.exec.stdin`: bytes for the process's standard input. Empty means EOF.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStdin {
    /// The bytes; decoded as a view of the frame, not a copy.
    #[cfg_attr(feature = "arbitrary", arbitrary(with = crate::payload::arbitrary_bytes))]
    pub data: Bytes,
}

/// `core.exec.stdout`: bytes the process wrote to standard output.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStdout {
    /// The bytes; decoded as a view of the frame, not a copy.
    #[cfg_attr(feature = "arbitrary", arbitrary(with = crate::payload::arbitrary_bytes))]
    pub data: Bytes,
}

/// `core.exec.stderr`: bytes the process wrote to standard error.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStderr {
    /// The bytes; decoded as a view of the frame, not a copy.
    #[cfg_attr(feature = "arbitrary", arbitrary(with = crate::payload::arbitrary_bytes))]
    pub data: Bytes,
}

/// `core.exec.stdin.error`: writing to the process's stdin failed.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStdinError {
    /// The errno, when there was one.
    #[serde(default)]
    pub errno: Option<i32>,
    /// Its symbolic name, e.g. `EPIPE`.
    #[serde(default)]
    pub errno_name: Option<String>,
    /// A readable explanation.
    pub message: String,
}

/// `core.exec.exited`: the process exited. Ends the session.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecExited {
    /// The exit status, or -1 when a signal killed the command (the deployed
    /// agent's convention, which agentwire's agent follows; the signal is not told).
    pub code: i32,
}

/// `core.exec.failed`: the process could not be started. Ends the session.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecFailed {
    /// What kind of failure.
    pub kind: ExecFailureKind,
    /// The errno, when there was one.
    #[serde(default)]
    pub errno: Option<i32>,
    /// Its symbolic name.
    #[serde(default)]
    pub errno_name: Option<String>,
    /// A readable explanation.
    pub message: String,
    /// Which step of the start failed, e.g. `chdir`.
    #[serde(default)]
    pub stage: Option<String>,
}

open_enum! {
    /// Why a process could not be started.
    ExecFailureKind {
        /// The program does not exist.
        NotFound = "not_found",
        /// Not allowed to run it.
        PermissionDenied = "permission_denied",
        /// It exists but cannot be executed.
        NotExecutable = "not_executable",
        /// The working directory is unusable.
        BadCwd = "bad_cwd",
        /// The arguments or environment are unusable.
        BadArgs = "bad_args",
        /// A resource limit could not be applied or was hit.
        ResourceLimit = "resource_limit",
        /// Switching to the requested user failed.
        UserSetupFailed = "user_setup_failed",
        /// Out of memory.
        OutOfMemory = "out_of_memory",
        /// The pseudo-terminal could not be set up.
        PtySetupFailed = "pty_setup_failed",
        /// Anything else.
        Other = "other",
    }
}

/// `core.exec.resize`: the terminal changed size.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// `core.exec.signal`: deliver a signal to the process.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSignal {
    /// Signal number.
    pub signal: i32,
}

/// `core.exec.output.ack` (generation 10): the host has consumed this much
/// output of a controlled execution (spec section 8).
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutputAck {
    /// The cumulative charge consumed: the sum of `len + 256` over every stdout
    /// and stderr chunk since the request ([`EXEC_OUTPUT_EVENT_OVERHEAD`]).
    pub consumed: u64,
}

/// `core.exec.stdin.ack` (generation 10): the guest has written this much
/// stdin into the child (spec section 8).
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStdinAck {
    /// The cumulative number of stdin bytes written into the child's pipe or terminal.
    pub consumed: u64,
}

/// What each output chunk costs on top of its bytes in the output allowance.
pub const EXEC_OUTPUT_EVENT_OVERHEAD: u64 = 256;

/// The largest chunk size a valid [`ExecLimits`] may set.
pub const MAX_EXEC_CHUNK_SIZE: u32 = 4_193_280;

/// The largest exec-control frame (`core.exec.output.ack`, `core.exec.stdin.ack`,
/// `core.exec.signal`, `core.exec.resize`) on the wire; a longer one is answered
/// with `core.error` `invalid_payload`.
pub const MAX_EXEC_CONTROL_FRAME: usize = 4096;

/// The sandbox-wide execution flow-control policy (generation 10), set in the
/// bootstrap and advertised in `core.ready` (spec section 8). Every key is
/// written; a missing key reads as its default.
///
/// ```
/// use agentwire::payload::exec::ExecLimits;
/// let limits = ExecLimits::default();
/// assert_eq!((limits.max_executions, limits.output_limit), (128, 1_048_576));
/// assert!(limits.validate().is_ok());
/// assert!(ExecLimits { output_chunk_size: 1_048_576, ..limits }.validate().is_err());
/// ```
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecLimits {
    /// Executions the agent holds at once.
    #[serde(default = "ExecLimits::default_max_executions")]
    pub max_executions: u32,
    /// Stdin bytes accepted but not yet written into the child.
    #[serde(default = "ExecLimits::default_input_limit")]
    pub input_limit: u32,
    /// Output charge published but not yet acknowledged.
    #[serde(default = "ExecLimits::default_output_limit")]
    pub output_limit: u32,
    /// The largest `core.exec.stdin` chunk.
    #[serde(default = "ExecLimits::default_chunk_size")]
    pub stdin_chunk_size: u32,
    /// The largest `core.exec.stdout`/`stderr` chunk.
    #[serde(default = "ExecLimits::default_chunk_size")]
    pub output_chunk_size: u32,
}

impl ExecLimits {
    fn default_max_executions() -> u32 {
        128
    }
    fn default_input_limit() -> u32 {
        65_536
    }
    fn default_output_limit() -> u32 {
        1_048_576
    }
    fn default_chunk_size() -> u32 {
        16_384
    }

    /// Checks the policy as the agent does before accepting it: executions
    /// above zero, `1 <= stdin_chunk_size <= input_limit`, a nonzero output
    /// chunk with room for its 256-byte overhead in the output limit, and both
    /// chunks at most [`MAX_EXEC_CHUNK_SIZE`].
    pub fn validate(&self) -> Result<(), String> {
        let problem = if self.max_executions == 0 {
            "max_executions is 0"
        } else if self.stdin_chunk_size == 0 || self.stdin_chunk_size > self.input_limit {
            "stdin_chunk_size must be 1 to input_limit"
        } else if self.output_chunk_size == 0 {
            "output_chunk_size is 0"
        } else if u64::from(self.output_chunk_size) + EXEC_OUTPUT_EVENT_OVERHEAD > u64::from(self.output_limit) {
            "output_chunk_size + 256 exceeds output_limit"
        } else if self.stdin_chunk_size > MAX_EXEC_CHUNK_SIZE || self.output_chunk_size > MAX_EXEC_CHUNK_SIZE {
            "a chunk size exceeds 4193280"
        } else {
            return Ok(());
        };
        Err(format!("invalid exec limits: {problem}"))
    }
}

impl Default for ExecLimits {
    fn default() -> ExecLimits {
        ExecLimits {
            max_executions: Self::default_max_executions(),
            input_limit: Self::default_input_limit(),
            output_limit: Self::default_output_limit(),
            stdin_chunk_size: Self::default_chunk_size(),
            output_chunk_size: Self::default_chunk_size(),
        }
    }
}

// ExecRequest, ExecStdin, ExecStdout, ExecStderr and ExecExited have hand-written paths (payload::fast).
serde_payload!(ExecStarted, ExecStdinError, ExecFailed, ExecResize, ExecSignal, ExecOutputAck, ExecStdinAck);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rlimit_text_form() {
        let r: ExecRlimit = " NoFile = 10 : 20 ".parse().unwrap();
        assert_eq!(r, ExecRlimit { resource: "nofile".into(), soft: 10, hard: 20 });
        assert_eq!(r.to_string().parse::<ExecRlimit>().unwrap(), r);
        assert!(matches!("nofile".parse::<ExecRlimit>(), Err(RlimitParseError::MissingEquals(_))));
        assert!(matches!("=1".parse::<ExecRlimit>(), Err(RlimitParseError::EmptyResource(_))));
        assert!(matches!("cpu=x".parse::<ExecRlimit>(), Err(RlimitParseError::BadNumber { .. })));
        assert!(matches!("cpu=-1".parse::<ExecRlimit>(), Err(RlimitParseError::BadNumber { .. })));
        assert!(matches!("cpu=1:".parse::<ExecRlimit>(), Err(RlimitParseError::BadNumber { .. })));
        assert!(matches!(
            "cpu=2:1".parse::<ExecRlimit>(),
            Err(RlimitParseError::SoftAboveHard { soft: 2, hard: 1, .. })
        ));
        assert_eq!("as=18446744073709551615".parse::<ExecRlimit>().unwrap().hard, u64::MAX);
    }
}
