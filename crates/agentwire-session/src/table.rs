//! The sessions open on one connection, and what each has buffered.

use std::collections::HashMap;

use agentwire::{MessageType, Payload};

/// The family of a session: what opened it and which frames belong to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Family {
    /// `core.exec.*`.
    Exec,
    /// `core.fs.*`.
    Fs,
    /// `core.tcp.*`.
    Tcp,
    /// A request answered by one reply on its id (`core.ping`, `core.touch`, ...).
    Reply,
}

impl Family {
    /// The family a type belongs to, from its wire name.
    pub fn of(t: MessageType) -> Family {
        let name = t.wire_name();
        if name.starts_with("core.exec.") {
            Family::Exec
        } else if name.starts_with("core.fs.") {
            Family::Fs
        } else if name.starts_with("core.tcp.") {
            Family::Tcp
        } else {
            Family::Reply
        }
    }

    /// Whether a frame of type `t` belongs to a session of this family. The
    /// bulk frames (`core.bulk.*` and raw records, generation 8) belong to the
    /// fs or tcp session whose data they carry.
    pub fn accepts(self, t: MessageType) -> bool {
        if is_bulk(t) {
            return matches!(self, Family::Fs | Family::Tcp);
        }
        Family::of(t) == self
    }

    /// The family's prefix, for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Exec => "core.exec",
            Family::Fs => "core.fs",
            Family::Tcp => "core.tcp",
            Family::Reply => "reply",
        }
    }
}

/// Whether `t` is one of generation 8's bulk frames: `core.bulk.*` or a raw record.
pub fn is_bulk(t: MessageType) -> bool {
    t == MessageType::BulkRecord || t.wire_name().starts_with("core.bulk.")
}

/// Whether a frame of type `t` is *data* in the deployed agent's metering of
/// host input (spec 9.1): process, file and socket bytes; everything else is control.
pub fn is_data(t: MessageType) -> bool {
    matches!(
        t,
        MessageType::ExecStdin
            | MessageType::FsData
            | MessageType::TcpData
            | MessageType::TcpEof
            | MessageType::BulkRecord
    )
}

/// The bytes of file, socket or process data a payload carries: what a
/// receiver buffers for a session, and so what is accounted.
pub fn data_len(p: &Payload) -> usize {
    match p {
        Payload::BulkRecord(r) => r.data.len(),
        Payload::ExecStdin(d) => d.data.len(),
        Payload::ExecStdout(d) => d.data.len(),
        Payload::ExecStderr(d) => d.data.len(),
        Payload::FsData(d) => d.data.len(),
        Payload::TcpData(d) => d.data.len(),
        _ => 0,
    }
}

/// What every frame costs in the accounting besides its data: so that a
/// peer cannot make a receiver hold unbounded frames that carry no data.
pub const FRAME_CHARGE: usize = 64;

/// What a frame counts for while a receiver holds it: its data and [`FRAME_CHARGE`].
pub fn charge(p: &Payload) -> usize {
    data_len(p) + FRAME_CHARGE
}

/// One open session.
#[derive(Clone, Debug)]
pub struct Entry {
    /// What it is.
    pub family: Family,
    /// Data bytes handed to the application and not yet reported consumed.
    pub buffered: usize,
}

/// The open sessions of a connection, by id, with the data each has buffered.
#[derive(Debug, Default)]
pub struct SessionTable {
    sessions: HashMap<u32, Entry>,
    buffered: usize,
}

impl SessionTable {
    /// Opens `id`; false if it is open already.
    pub fn open(&mut self, id: u32, family: Family) -> bool {
        if self.sessions.contains_key(&id) {
            return false;
        }
        self.sessions.insert(id, Entry { family, buffered: 0 });
        true
    }

    /// Closes `id`; its buffered bytes no longer count. Its entry, if it was open.
    pub fn close(&mut self, id: u32) -> Option<Entry> {
        let entry = self.sessions.remove(&id)?;
        self.buffered -= entry.buffered;
        Some(entry)
    }

    /// The session on `id`.
    pub fn get(&self, id: u32) -> Option<&Entry> {
        self.sessions.get(&id)
    }

    /// Whether `id` is open.
    pub fn contains(&self, id: u32) -> bool {
        self.sessions.contains_key(&id)
    }

    /// How many are open.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// The open ids, in no order.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.sessions.keys().copied()
    }

    /// Counts `n` more bytes buffered for `id` (nothing if it is not open).
    pub fn add_buffered(&mut self, id: u32, n: usize) {
        if let Some(e) = self.sessions.get_mut(&id) {
            e.buffered += n;
            self.buffered += n;
        }
    }

    /// Counts `n` bytes of `id` as consumed (at most what it had buffered).
    pub fn consumed(&mut self, id: u32, n: usize) {
        if let Some(e) = self.sessions.get_mut(&id) {
            let n = n.min(e.buffered);
            e.buffered -= n;
            self.buffered -= n;
        }
    }

    /// Data bytes buffered over all sessions.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// The largest amount one session has buffered.
    pub fn most_buffered(&self) -> usize {
        self.sessions.values().map(|e| e.buffered).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounting_follows_open_and_close() {
        let mut t = SessionTable::default();
        assert!(t.open(1, Family::Exec));
        assert!(!t.open(1, Family::Fs));
        t.add_buffered(1, 100);
        t.add_buffered(2, 50); // not open: not counted
        assert_eq!(t.buffered(), 100);
        t.consumed(1, 30);
        assert_eq!((t.buffered(), t.most_buffered()), (70, 70));
        t.consumed(1, 1000);
        assert_eq!(t.buffered(), 0);
        t.add_buffered(1, 10);
        t.close(1);
        assert_eq!((t.buffered(), t.len()), (0, 0));
    }

    #[test]
    fn families_by_name() {
        assert_eq!(Family::of(MessageType::ExecStdin), Family::Exec);
        assert_eq!(Family::of(MessageType::FsData), Family::Fs);
        assert_eq!(Family::of(MessageType::TcpEof), Family::Tcp);
        assert_eq!(Family::of(MessageType::Ping), Family::Reply);
        assert_eq!(Family::of(MessageType::ExecOutputAck), Family::Exec);
        assert!(Family::Fs.accepts(MessageType::BulkRecord) && Family::Tcp.accepts(MessageType::BulkCredit));
        assert!(!Family::Exec.accepts(MessageType::BulkFinish) && !Family::Reply.accepts(MessageType::BulkCancel));
        assert!(is_data(MessageType::TcpEof) && !is_data(MessageType::TcpClose));
    }
}
