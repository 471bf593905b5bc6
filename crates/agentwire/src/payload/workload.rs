//! Generation 9: workload freeze and thaw, transport credit, and root-disk
//! growth (spec section 9).

use serde::{Deserialize, Serialize};

use super::serde_payload;

/// What a host has written to the agent, counted as the agent meters it
/// (spec 9.1): wire bytes and frames, control and data (bulk) apart.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportPosition {
    /// Control bytes.
    pub control_bytes: u64,
    /// Control frames.
    pub control_frames: u64,
    /// Data bytes (stdin, fs and tcp data, raw records).
    pub bulk_bytes: u64,
    /// Data frames.
    pub bulk_frames: u64,
}

/// `core.workload.transport.credit`: the cumulative grant of host input the
/// agent accepts (sent on id `0xFFFFFFFF`). Same shape as [`TransportPosition`].
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportCredit {
    /// Control bytes the host may have written in all.
    pub control_bytes: u64,
    /// Control frames.
    pub control_frames: u64,
    /// Data bytes.
    pub bulk_bytes: u64,
    /// Data frames.
    pub bulk_frames: u64,
}

impl TransportCredit {
    /// The grant every metering agent starts with (never reported): control
    /// 8 MiB / 256 frames, data 32 MiB / 256 frames.
    pub const INITIAL: TransportCredit = TransportCredit {
        control_bytes: 8 * 1024 * 1024,
        control_frames: 256,
        bulk_bytes: 32 * 1024 * 1024,
        bulk_frames: 256,
    };
}

/// `core.workload.freeze`: pause every process the agent started.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadFreeze {
    /// External mounts to sync before answering.
    #[serde(default)]
    pub external_mount_tags: Vec<String>,
    /// 1 to 128 printable ASCII bytes without spaces.
    pub attempt_id: String,
    /// What the host has written so far.
    pub host_input: TransportPosition,
}

/// `core.workload.frozen`: the workload is paused.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadFrozen {
    /// The freeze's attempt.
    pub attempt_id: String,
    /// Wire bytes already written on the dedicated bulk lane (0 without one).
    pub guest_bulk_bytes_target: u64,
    /// The current input grant.
    pub input_credit: TransportCredit,
    /// Whether the external mounts were synced (true when none were listed).
    #[serde(default)]
    pub external_mounts_synced: bool,
}

/// How a thaw resumes.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadThawMode {
    /// Just resume.
    #[default]
    Continue,
    /// A resumed snapshot: detach every client-owned resource first.
    Restore,
}

/// `core.workload.thaw`: release a freeze.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadThaw {
    /// The freeze's attempt.
    pub attempt_id: String,
    /// How to resume.
    pub mode: WorkloadThawMode,
}

/// `core.workload.thawed`: the workload runs again.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadThawed {
    /// The thaw's attempt.
    pub attempt_id: String,
}

/// `core.root_disk.prepare`: can the root filesystem grow online to this size?
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootDiskPrepare {
    /// The target size: nonzero, a multiple of 4096, not below the current one.
    pub size_bytes: u64,
}

/// `core.root_disk.grow`: the device was enlarged; grow the filesystem.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootDiskGrow {
    /// The new size.
    pub size_bytes: u64,
}

/// `core.root_disk.state`: the root filesystem's and device's sizes.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootDiskState {
    /// Size of the filesystem.
    pub filesystem_bytes: u64,
    /// Size of the block device.
    pub device_bytes: u64,
}

serde_payload!(
    TransportCredit,
    WorkloadFreeze,
    WorkloadFrozen,
    WorkloadThaw,
    WorkloadThawed,
    RootDiskPrepare,
    RootDiskGrow,
    RootDiskState
);
