//! Payload of `core.bootstrap` (generation 7): the guest's configuration,
//! placed in front of the agent's input before the VM boots.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::de::MapAccess;
use serde::{Deserialize, Deserializer, Serialize};

use super::exec::{ExecLimits, ExecRlimit};
use super::tagged::{self, TagFirst};
use super::{open_enum, serde_payload};

/// `core.bootstrap`: everything the guest needs before `core.ready`. Every key
/// may be missing on decode; empty lists and `None`s are not written.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestBootstrap {
    /// The host answers a startup failure with `core.init.ack {failure: true}`
    /// (added after generation 7; left out when false).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub init_failure_ack: bool,
    /// The root filesystem, when it is not the initramfs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_root: Option<BootstrapBlockRoot>,
    /// Host directories shared into the guest.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dir_mounts: Vec<BootstrapDirMount>,
    /// Single host files shared into the guest.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub file_mounts: Vec<BootstrapFileMount>,
    /// Block devices to mount.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disk_mounts: Vec<BootstrapDiskMount>,
    /// tmpfs mounts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tmpfs_mounts: Vec<BootstrapTmpfsMount>,
    /// Host name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// A name under which the guest reaches the host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_alias: Option<String>,
    /// Network configuration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<BootstrapNetwork>,
    /// Resource limits for everything the agent starts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rlimits: Vec<ExecRlimit>,
    /// Default user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Default working directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_cwd: Option<String>,
    /// Default environment.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub default_env: Vec<BootstrapEnvVar>,
    /// Security profile; always written.
    pub security_profile: BootstrapSecurityProfile,
    /// Hand PID 1 over to another init after setting up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handoff_init: Option<BootstrapHandoffInit>,
    /// Generation 10: the execution flow-control policy, which the agent
    /// advertises in `core.ready`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exec_limits: Option<ExecLimits>,
}

/// The root filesystem (tagged by `kind`).
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum BootstrapBlockRoot {
    /// A whole disk image.
    DiskImage {
        /// Device path.
        device: String,
        /// Filesystem type; probed when `None`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fstype: Option<String>,
    },
    /// An OCI image as a read-only erofs lower layer with a writable upper layer.
    OciErofs {
        /// Device of the erofs image.
        lower: String,
        /// The writable layer.
        upper: BootstrapBlockRootUpper,
    },
}

/// The writable upper layer of an overlay root (tagged by `kind`).
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum BootstrapBlockRootUpper {
    /// A block device.
    Device {
        /// Device path.
        device: String,
        /// Filesystem type.
        fstype: String,
    },
    /// Memory.
    Tmpfs {
        /// Size limit in MiB.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size_mib: Option<u32>,
    },
}

// Reading the two root enums: the derive's (which buffers the map) and the
// tag-first one (see `super::tagged`). The field attributes below repeat the
// enums' own, and the tests hold the readings to each other.

#[derive(Deserialize)]
#[serde(remote = "BootstrapBlockRoot", tag = "kind", rename_all = "kebab-case")]
enum BlockRootDerived {
    DiskImage {
        device: String,
        #[serde(default)]
        fstype: Option<String>,
    },
    OciErofs {
        lower: String,
        upper: BootstrapBlockRootUpper,
    },
}

#[derive(Deserialize)]
#[serde(variant_identifier, rename_all = "kebab-case")]
pub(crate) enum BlockRootKind {
    DiskImage,
    OciErofs,
}

#[derive(Deserialize)]
struct DiskImageFields {
    device: String,
    #[serde(default)]
    fstype: Option<String>,
    #[serde(default, rename = "kind")]
    repeated_tag: tagged::RepeatedTag,
}

#[derive(Deserialize)]
struct OciErofsFields {
    lower: String,
    upper: BootstrapBlockRootUpper,
    #[serde(default, rename = "kind")]
    repeated_tag: tagged::RepeatedTag,
}

impl<'de> TagFirst<'de> for BootstrapBlockRoot {
    const TAG: &'static str = "kind";
    type Kind = BlockRootKind;
    fn rest<A: MapAccess<'de>>(kind: BlockRootKind, rest: A) -> Result<Self, A::Error> {
        Ok(match kind {
            BlockRootKind::DiskImage => {
                let f: DiskImageFields = tagged::fields(rest)?;
                BootstrapBlockRoot::DiskImage { device: f.device, fstype: f.fstype }
            }
            BlockRootKind::OciErofs => {
                let f: OciErofsFields = tagged::fields(rest)?;
                BootstrapBlockRoot::OciErofs { lower: f.lower, upper: f.upper }
            }
        })
    }
    fn derived<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BlockRootDerived::deserialize(d)
    }
}

impl<'de> Deserialize<'de> for BootstrapBlockRoot {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        tagged::deserialize(d)
    }
}

#[derive(Deserialize)]
#[serde(remote = "BootstrapBlockRootUpper", tag = "kind", rename_all = "kebab-case")]
enum BlockRootUpperDerived {
    Device {
        device: String,
        fstype: String,
    },
    Tmpfs {
        #[serde(default)]
        size_mib: Option<u32>,
    },
}

#[derive(Deserialize)]
#[serde(variant_identifier, rename_all = "kebab-case")]
pub(crate) enum BlockRootUpperKind {
    Device,
    Tmpfs,
}

#[derive(Deserialize)]
struct DeviceFields {
    device: String,
    fstype: String,
    #[serde(default, rename = "kind")]
    repeated_tag: tagged::RepeatedTag,
}

#[derive(Deserialize)]
struct TmpfsFields {
    #[serde(default)]
    size_mib: Option<u32>,
    #[serde(default, rename = "kind")]
    repeated_tag: tagged::RepeatedTag,
}

impl<'de> TagFirst<'de> for BootstrapBlockRootUpper {
    const TAG: &'static str = "kind";
    type Kind = BlockRootUpperKind;
    fn rest<A: MapAccess<'de>>(kind: BlockRootUpperKind, rest: A) -> Result<Self, A::Error> {
        Ok(match kind {
            BlockRootUpperKind::Device => {
                let f: DeviceFields = tagged::fields(rest)?;
                BootstrapBlockRootUpper::Device { device: f.device, fstype: f.fstype }
            }
            BlockRootUpperKind::Tmpfs => {
                let f: TmpfsFields = tagged::fields(rest)?;
                BootstrapBlockRootUpper::Tmpfs { size_mib: f.size_mib }
            }
        })
    }
    fn derived<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BlockRootUpperDerived::deserialize(d)
    }
}

impl<'de> Deserialize<'de> for BootstrapBlockRootUpper {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        tagged::deserialize(d)
    }
}

tagged::repeated_tag!(DiskImageFields, OciErofsFields, DeviceFields, TmpfsFields);

/// Mount flags; each defaults to false.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapMountFlags {
    /// Read-only.
    #[serde(default)]
    pub readonly: bool,
    /// No execution.
    #[serde(default)]
    pub noexec: bool,
    /// No set-uid.
    #[serde(default)]
    pub nosuid: bool,
    /// No device files.
    #[serde(default)]
    pub nodev: bool,
}

/// A host directory shared into the guest.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapDirMount {
    /// The share's tag.
    pub tag: String,
    /// Where it is mounted.
    pub guest_path: String,
    /// Mount flags.
    #[serde(default)]
    pub flags: BootstrapMountFlags,
}

/// A single host file shared into the guest.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapFileMount {
    /// The share's tag.
    pub tag: String,
    /// The file's name inside the share.
    pub filename: String,
    /// Where it appears.
    pub guest_path: String,
    /// Mount flags.
    #[serde(default)]
    pub flags: BootstrapMountFlags,
}

/// A block device to mount.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapDiskMount {
    /// The disk's id.
    pub id: String,
    /// Where it is mounted.
    pub guest_path: String,
    /// Filesystem type; probed when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fstype: Option<String>,
    /// Mount flags.
    #[serde(default)]
    pub flags: BootstrapMountFlags,
}

/// A tmpfs mount.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapTmpfsMount {
    /// Where it is mounted.
    pub path: String,
    /// Size limit in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_mib: Option<u32>,
    /// Permission bits of its root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Mount flags.
    #[serde(default)]
    pub flags: BootstrapMountFlags,
}

/// The guest's network interface.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapNetwork {
    /// Interface name.
    pub interface: String,
    /// MAC address (six integers on the wire).
    pub mac: [u8; 6],
    /// MTU.
    pub mtu: u16,
    /// IPv4 configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<BootstrapIpv4>,
    /// IPv6 configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<BootstrapIpv6>,
}

/// IPv4 configuration (addresses are arrays of 4 octets on the wire).
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapIpv4 {
    /// Address.
    pub address: Ipv4Addr,
    /// Prefix length.
    pub prefix_len: u8,
    /// Default gateway.
    pub gateway: Ipv4Addr,
    /// DNS server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Ipv4Addr>,
}

/// IPv6 configuration (addresses are arrays of 16 octets on the wire).
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapIpv6 {
    /// Address.
    pub address: Ipv6Addr,
    /// Prefix length.
    pub prefix_len: u8,
    /// Default gateway.
    pub gateway: Ipv6Addr,
    /// DNS server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Ipv6Addr>,
}

/// An environment variable.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapEnvVar {
    /// Name.
    pub key: String,
    /// Value.
    pub value: String,
}

open_enum! {
    /// How much the guest locks itself down.
    #[derive(Default)]
    BootstrapSecurityProfile {
        /// The default profile.
        #[default]
        Default = "default",
        /// A restricted profile.
        Restricted = "restricted",
    }
}

/// Another init to hand PID 1 over to.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapHandoffInit {
    /// Absolute path, or `auto`.
    pub cmd: String,
    /// Arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<BootstrapEnvVar>,
}

serde_payload!(GuestBootstrap);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{CborPayload, serde_decode, serde_fast};
    use ciborium::Value;

    fn cbor(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(v, &mut out).unwrap();
        out
    }

    fn map(entries: &[(&str, Value)]) -> Value {
        Value::Map(entries.iter().map(|(k, v)| (Value::Text((*k).into()), v.clone())).collect())
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    /// The tag-first reading answers what the derive answers, for the forms
    /// it reads and for those it leaves to the serde path.
    #[test]
    fn the_tag_first_reading_agrees_with_the_derive() {
        let upper = map(&[("kind", text("tmpfs")), ("size_mib", Value::Integer(64.into()))]);
        let cases = [
            // (root, read by the fast reader itself)
            (map(&[("kind", text("oci-erofs")), ("lower", text("/dev/vdb")), ("upper", upper.clone())]), true),
            (map(&[("kind", text("disk-image")), ("device", text("/dev/vda"))]), true),
            (map(&[("kind", text("disk-image")), ("device", text("/dev/vda")), ("extra", Value::Null)]), true),
            // A variant index, the tag elsewhere, twice, unknown, missing; a
            // missing field.
            (map(&[("kind", Value::Integer(0.into())), ("device", text("/dev/vda"))]), false),
            (map(&[("device", text("/dev/vda")), ("kind", text("disk-image"))]), false),
            (map(&[("kind", text("disk-image")), ("device", text("/dev/vda")), ("kind", text("disk-image"))]), false),
            (map(&[("kind", text("floppy")), ("device", text("/dev/vda"))]), false),
            (map(&[("device", text("/dev/vda"))]), false),
            (map(&[("kind", text("disk-image"))]), false),
            (
                map(&[
                    ("kind", text("oci-erofs")),
                    ("lower", text("/dev/vdb")),
                    ("upper", map(&[("size_mib", Value::Integer(1.into())), ("kind", text("tmpfs"))])),
                ]),
                false,
            ),
        ];
        for (root, fast) in cases {
            let p = cbor(&map(&[("block_root", root.clone())]));
            let slow = serde_decode::<GuestBootstrap>(&p);
            let quick = serde_fast::from_slice::<GuestBootstrap>(&p);
            assert_eq!(quick.is_ok(), fast, "{root:?}");
            if let Ok(value) = quick {
                assert_eq!(Some(value), slow.clone().ok(), "{root:?}");
            }
            assert_eq!(GuestBootstrap::decode_slice(&p), slow, "{root:?}");
        }
        // The derive reads the tag anywhere, and refuses it twice.
        let later = cbor(&map(&[("block_root", map(&[("device", text("/d")), ("kind", text("disk-image"))]))]));
        let root = GuestBootstrap::decode_slice(&later).unwrap().block_root;
        assert_eq!(root, Some(BootstrapBlockRoot::DiskImage { device: "/d".into(), fstype: None }));
        let twice = cbor(&map(&[(
            "block_root",
            map(&[("kind", text("disk-image")), ("device", text("/d")), ("kind", text("disk-image"))]),
        )]));
        assert!(GuestBootstrap::decode_slice(&twice).is_err());
    }
}
