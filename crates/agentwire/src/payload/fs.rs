//! Payloads of `core.fs.*`: file operations in the guest, with streamed data.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::bulk::BulkOffer;
use super::serde_payload;

/// The largest data chunk of one `core.fs.data`: 3 MiB, so that a chunk and its
/// envelope stay under [`MAX_FRAME_SIZE`](crate::MAX_FRAME_SIZE).
pub const FS_CHUNK_SIZE: usize = 3 * 1024 * 1024;

/// `core.fs.request`: one file operation. Starts a session.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsRequest {
    /// The operation.
    pub op: FsOp,
    /// Generation 8: move the data of a `Read` or `Write` as raw bulk records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulk: Option<BulkOffer>,
}

impl FsRequest {
    /// A request for `op` without a bulk offer.
    pub fn new(op: FsOp) -> FsRequest {
        FsRequest { op, bulk: None }
    }
}

impl From<FsOp> for FsRequest {
    fn from(op: FsOp) -> FsRequest {
        FsRequest::new(op)
    }
}

/// Whether a `user` key is left out: when it is `None` and the frame is
/// written as a peer below generation 10 writes it (generation 10 writes
/// `null`; spec section 4, fs).
fn user_left_out(user: &Option<String>) -> bool {
    user.is_none() && super::writer_generation() < 10
}

/// A file operation. Paths are text, as the guest sees them.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FsOp {
    /// Resolve to a canonical absolute path.
    RealPath {
        /// Path.
        path: String,
    },
    /// Metadata of a path.
    Stat {
        /// Path.
        path: String,
        /// Follow a final symlink.
        follow_symlink: bool,
    },
    /// Change metadata of a path.
    SetStat {
        /// Path.
        path: String,
        /// Follow a final symlink.
        follow_symlink: bool,
        /// What to change.
        attrs: FsSetAttrs,
    },
    /// Entries of a directory, in one response.
    List {
        /// Path.
        path: String,
    },
    /// Target of a symlink.
    ReadLink {
        /// Path.
        path: String,
    },
    /// Create a symlink.
    Symlink {
        /// What the link points to.
        target: String,
        /// Where the link is created.
        link_path: String,
        /// `user[:group]` to act as; root when `None`.
        #[serde(default, skip_serializing_if = "user_left_out")]
        user: Option<String>,
    },
    /// Create a directory.
    Mkdir {
        /// Path.
        path: String,
        /// Permission bits; the guest's default when `None`.
        #[serde(default)]
        mode: Option<u32>,
        /// `user[:group]` to act as; root when `None`.
        #[serde(default, skip_serializing_if = "user_left_out")]
        user: Option<String>,
    },
    /// Remove a file or symlink.
    Remove {
        /// Path.
        path: String,
    },
    /// Remove a directory.
    RemoveDir {
        /// Path.
        path: String,
        /// Remove its contents too.
        recursive: bool,
    },
    /// Copy a file.
    Copy {
        /// Source.
        src: String,
        /// Destination.
        dst: String,
    },
    /// Rename or move.
    Rename {
        /// Source.
        src: String,
        /// Destination.
        dst: String,
    },
    /// Open a file; the response carries a handle.
    OpenFile {
        /// Path.
        path: String,
        /// How to open it.
        options: FsOpenOptions,
    },
    /// Open a directory for `ReadDir`; the response carries a handle.
    OpenDir {
        /// Path.
        path: String,
    },
    /// Close a handle.
    CloseHandle {
        /// Handle.
        handle: u64,
    },
    /// Read from a handle; the data streams back as `core.fs.data`.
    Read {
        /// Handle.
        handle: u64,
        /// Where to start.
        offset: u64,
        /// How much; to the end when `None`.
        len: Option<u64>,
    },
    /// Write to a handle; the data streams in as `core.fs.data`, ending with an empty chunk.
    Write {
        /// Handle.
        handle: u64,
        /// Where to start.
        offset: u64,
        /// How much, when known in advance.
        len: Option<u64>,
    },
    /// Next entries of a directory handle.
    ReadDir {
        /// Handle.
        handle: u64,
        /// At most this many entries.
        limit: Option<u32>,
    },
    /// Metadata of a handle.
    FStat {
        /// Handle.
        handle: u64,
    },
    /// Change metadata of a handle.
    FSetStat {
        /// Handle.
        handle: u64,
        /// What to change.
        attrs: FsSetAttrs,
    },
}

/// Metadata to change; `None` leaves a field as it is.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsSetAttrs {
    /// Permission bits.
    pub mode: Option<u32>,
    /// Owner.
    pub uid: Option<u32>,
    /// Group.
    pub gid: Option<u32>,
    /// Size (truncate or extend).
    pub size: Option<u64>,
    /// Access time, seconds since the epoch.
    pub atime: Option<i64>,
    /// Modification time, seconds since the epoch.
    pub mtime: Option<i64>,
}

/// How to open a file, as `std::fs::OpenOptions`.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsOpenOptions {
    /// Open for reading.
    pub read: bool,
    /// Open for writing.
    pub write: bool,
    /// Append.
    pub append: bool,
    /// Create if missing.
    pub create: bool,
    /// Truncate.
    pub truncate: bool,
    /// Create, failing if it exists.
    pub create_new: bool,
    /// Permission bits for a created file.
    pub mode: Option<u32>,
    /// `user[:group]` to act as; root when `None`.
    #[serde(default, skip_serializing_if = "user_left_out")]
    pub user: Option<String>,
}

/// Metadata of one file.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsEntryInfo {
    /// Path (or name, in a listing).
    pub path: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    /// Size in bytes.
    pub size: u64,
    /// Mode bits.
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub modified: Option<i64>,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Access time, seconds since the epoch.
    pub atime: Option<i64>,
    /// Modification time, seconds since the epoch.
    pub mtime: Option<i64>,
}

/// What a successful operation returns.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FsResponseData {
    /// Metadata.
    Stat(FsEntryInfo),
    /// Directory entries.
    List(Vec<FsEntryInfo>),
    /// An open handle.
    Handle(u64),
    /// A path.
    Path(String),
}

/// `core.fs.response`: the result of the session's operation. Ends the session.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsResponse {
    /// Whether the operation succeeded.
    pub ok: bool,
    /// What went wrong, when it did not.
    #[serde(default)]
    pub error: Option<String>,
    /// What it returned.
    #[serde(default)]
    pub data: Option<FsResponseData>,
}

impl FsResponse {
    /// A successful response carrying `data`.
    ///
    /// ```
    /// use agentwire::payload::fs::{FsResponse, FsResponseData};
    /// assert!(FsResponse::success(Some(FsResponseData::Handle(3))).ok);
    /// ```
    pub fn success(data: Option<FsResponseData>) -> FsResponse {
        FsResponse { ok: true, error: None, data }
    }

    /// A failed response explaining why.
    pub fn failure(error: impl Into<String>) -> FsResponse {
        FsResponse { ok: false, error: Some(error.into()), data: None }
    }
}

/// `core.fs.data`: one chunk of a streamed read or write. Empty means EOF.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsData {
    /// The bytes, at most [`FS_CHUNK_SIZE`]; decoded as a view of the frame, not a copy.
    #[cfg_attr(feature = "arbitrary", arbitrary(with = crate::payload::arbitrary_bytes))]
    pub data: Bytes,
}

impl super::CborPayload for FsRequest {
    fn encoded_len_at(&self, generation: u8) -> Result<usize, super::PayloadError> {
        super::as_generation(generation, || super::fast_encoded_len(self))
    }

    fn encode_at(&self, generation: u8, dst: &mut bytes::BytesMut) -> Result<(), super::PayloadError> {
        super::as_generation(generation, || super::fast_encode(self, dst))
    }
}

// FsData has a hand-written path (payload::fast).
serde_payload!(FsResponse);
