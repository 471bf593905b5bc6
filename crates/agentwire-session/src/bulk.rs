//! The rules of a bulk correlation (generation 8, spec 7.2–7.4), sans-IO:
//! checking an offer and an acceptance, a sender's credit, a receiver's
//! window, finish. The agent and the host client both run on these, so the
//! two ends cannot read the rules differently.
//!
//! ```
//! use agentwire::payload::bulk::{BulkFlow, BulkKind};
//! use agentwire_session::bulk::{BulkReceiver, BulkSender};
//! use bytes::Bytes;
//!
//! // A flow of 16 KiB records with a 64 KiB window.
//! let mut rx = BulkReceiver::new(BulkKind::Filesystem, BulkFlow::GuestToHost, 16384, 65536, 65536);
//! let mut tx = BulkSender::new(BulkKind::Filesystem, BulkFlow::GuestToHost, 16384, 65536);
//! for _ in 0..2 {
//!     let record = tx.record(Bytes::from(vec![7; 16384]))?;
//!     rx.record(&record)?;
//! }
//! // Consuming half the window grants more.
//! assert!(rx.consumed(16384).is_none());
//! let credit = rx.consumed(16384).expect("half the window consumed");
//! assert!(tx.credit(&credit)?);
//! assert_eq!(tx.credit_limit(), 32768 + 65536);
//! let finish = tx.finish();
//! assert!(rx.finish(&finish)?);
//! # Ok::<(), agentwire_session::bulk::BulkViolation>(())
//! ```

use agentwire::payload::bulk::{
    BULK_RECORD_FORMAT, BulkAccepted, BulkCredit, BulkFinish, BulkFlow, BulkKind, BulkOffer, BulkRecord,
    DEFAULT_BULK_WINDOW, DEFAULT_FS_BULK_RECORD_PAYLOAD, DEFAULT_TCP_BULK_RECORD_PAYLOAD, FLOW_GUEST_TO_HOST,
    FLOW_HOST_TO_GUEST, MAX_BULK_RECORD_PAYLOAD, MAX_BULK_WINDOW, MIN_BULK_RECORD_PAYLOAD,
};
#[cfg(unix)]
use agentwire::{PipedData, payload::bulk::PipedRecord};
use bytes::Bytes;

/// A broken bulk rule: the correlation is cancelled (reason 5, protocol violation).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bulk {kind} {flow}: {reason}")]
pub struct BulkViolation {
    /// The correlation's kind.
    pub kind: BulkKind,
    /// The flow the rule concerns.
    pub flow: BulkFlow,
    /// Which rule, with the numbers.
    pub reason: String,
}

/// Which operation an offer is for: the kind and the flows it enables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BulkOperation {
    /// A file read: guest → host.
    FileRead,
    /// A file write: host → guest.
    FileWrite,
    /// A TCP connection: both ways.
    Tcp,
}

impl BulkOperation {
    /// The kind of its records.
    pub fn kind(self) -> BulkKind {
        match self {
            BulkOperation::FileRead | BulkOperation::FileWrite => BulkKind::Filesystem,
            BulkOperation::Tcp => BulkKind::Tcp,
        }
    }

    /// Its flow mask.
    pub fn flows(self) -> u8 {
        match self {
            BulkOperation::FileRead => FLOW_GUEST_TO_HOST,
            BulkOperation::FileWrite => FLOW_HOST_TO_GUEST,
            BulkOperation::Tcp => FLOW_HOST_TO_GUEST | FLOW_GUEST_TO_HOST,
        }
    }

    /// The largest record the guest allows for it.
    fn guest_max_record(self) -> u32 {
        let max =
            if self == BulkOperation::Tcp { DEFAULT_TCP_BULK_RECORD_PAYLOAD } else { DEFAULT_FS_BULK_RECORD_PAYLOAD };
        max as u32
    }

    /// The offer a host makes: `max_record` bytes a record (clamped to the
    /// allowed range) and, for guest → host data, `window` bytes of credit
    /// up front (clamped to [`MAX_BULK_WINDOW`]).
    pub fn offer(self, max_record: u32, window: u64) -> BulkOffer {
        let max_record = max_record.clamp(MIN_BULK_RECORD_PAYLOAD as u32, MAX_BULK_RECORD_PAYLOAD as u32);
        let credit = if self.flows() & FLOW_GUEST_TO_HOST != 0 { window.clamp(1, MAX_BULK_WINDOW) } else { 0 };
        BulkOffer { format: BULK_RECORD_FORMAT, max_record_payload: max_record, guest_to_host_credit_limit: credit }
    }

    /// Guest: checks an offer and fills the acceptance as the deployed guest
    /// does (spec 7.2), or says what is wrong with the offer.
    pub fn accept(self, offer: &BulkOffer) -> Result<BulkAccepted, String> {
        if offer.format != BULK_RECORD_FORMAT {
            return Err(format!("bulk offer format {} (only {BULK_RECORD_FORMAT} exists)", offer.format));
        }
        let range = MIN_BULK_RECORD_PAYLOAD as u32..=MAX_BULK_RECORD_PAYLOAD as u32;
        if !range.contains(&offer.max_record_payload) {
            return Err(format!("bulk offer max_record_payload {} outside {range:?}", offer.max_record_payload));
        }
        let credit = offer.guest_to_host_credit_limit;
        if credit > MAX_BULK_WINDOW {
            return Err(format!("bulk offer credit {credit} above {MAX_BULK_WINDOW}"));
        }
        let reads = self.flows() & FLOW_GUEST_TO_HOST != 0;
        if reads && credit == 0 {
            return Err("bulk offer grants no guest-to-host credit for a flow that needs it".into());
        }
        if !reads && credit != 0 {
            return Err("bulk offer grants guest-to-host credit to a write".into());
        }
        let writes = self.flows() & FLOW_HOST_TO_GUEST != 0;
        Ok(BulkAccepted {
            kind: self.kind(),
            flows: self.flows(),
            format: offer.format,
            max_record_payload: offer.max_record_payload.min(self.guest_max_record()),
            host_to_guest_credit_limit: if writes { DEFAULT_BULK_WINDOW } else { 0 },
            guest_to_host_credit_limit: credit,
        })
    }

    /// Host: checks the guest's acceptance of `offer` (spec 7.2); a host
    /// abandons the operation when this fails.
    pub fn check_acceptance(self, offer: &BulkOffer, accepted: &BulkAccepted) -> Result<(), String> {
        let problem = if accepted.kind != self.kind() {
            format!("kind {} for a {} operation", accepted.kind, self.kind())
        } else if accepted.flows != self.flows() {
            format!("flows {:#04x} where {:#04x} were offered", accepted.flows, self.flows())
        } else if accepted.format != BULK_RECORD_FORMAT {
            format!("format {}", accepted.format)
        } else if !(MIN_BULK_RECORD_PAYLOAD as u32..=offer.max_record_payload).contains(&accepted.max_record_payload) {
            format!(
                "max_record_payload {} outside {MIN_BULK_RECORD_PAYLOAD}..={}",
                accepted.max_record_payload, offer.max_record_payload
            )
        } else if accepted.guest_to_host_credit_limit != offer.guest_to_host_credit_limit {
            format!(
                "guest-to-host credit {} where {} was offered",
                accepted.guest_to_host_credit_limit, offer.guest_to_host_credit_limit
            )
        } else if accepted.host_to_guest_credit_limit > MAX_BULK_WINDOW {
            format!("host-to-guest credit {} above {MAX_BULK_WINDOW}", accepted.host_to_guest_credit_limit)
        } else if (accepted.host_to_guest_credit_limit != 0) != (self.flows() & FLOW_HOST_TO_GUEST != 0) {
            format!("host-to-guest credit {} for this operation", accepted.host_to_guest_credit_limit)
        } else {
            return Ok(());
        };
        Err(format!("bulk acceptance refused: {problem}"))
    }
}

/// The sending end of one flow: the next offset, the credit limit it may not
/// pass, and the record size agreed.
#[derive(Clone, Debug)]
pub struct BulkSender {
    kind: BulkKind,
    flow: BulkFlow,
    max_record: usize,
    next_offset: u64,
    consumed_offset: u64,
    credit_limit: u64,
    finished: bool,
}

impl BulkSender {
    /// A flow with `max_record` bytes a record and the initial `credit_limit`.
    pub fn new(kind: BulkKind, flow: BulkFlow, max_record: u32, credit_limit: u64) -> BulkSender {
        BulkSender {
            kind,
            flow,
            max_record: max_record as usize,
            next_offset: 0,
            consumed_offset: 0,
            credit_limit,
            finished: false,
        }
    }

    fn violation(&self, reason: String) -> BulkViolation {
        BulkViolation { kind: self.kind, flow: self.flow, reason }
    }

    /// Bytes sent so far.
    pub fn sent(&self) -> u64 {
        self.next_offset
    }

    /// The current credit limit.
    pub fn credit_limit(&self) -> u64 {
        self.credit_limit
    }

    /// How many bytes the next record may carry now (0: wait for credit).
    pub fn window(&self) -> usize {
        let credit = self.credit_limit.saturating_sub(self.next_offset);
        credit.min(self.max_record as u64) as usize
    }

    /// The record of `data` at the next offset, within the record size and
    /// the credit; the caller cuts `data` to [`BulkSender::window`] first.
    pub fn record(&mut self, data: Bytes) -> Result<BulkRecord, BulkViolation> {
        let offset = self.take(data.len())?;
        Ok(BulkRecord::new(self.kind, self.flow, offset, data))
    }

    /// [`BulkSender::record`] for data that waits in a pipe.
    #[cfg(unix)]
    pub fn piped_record(&mut self, data: PipedData) -> Result<PipedRecord, BulkViolation> {
        let offset = self.take(data.len())?;
        Ok(PipedRecord { kind: self.kind, flow: self.flow, offset, data })
    }

    /// Takes `n` bytes of the window for a record; returns its offset.
    fn take(&mut self, n: usize) -> Result<u64, BulkViolation> {
        if self.finished {
            return Err(self.violation("a record after the finish".into()));
        }
        if n == 0 || n > self.window() {
            return Err(self.violation(format!("a record of {n} bytes where {} may go", self.window())));
        }
        let offset = self.next_offset;
        self.next_offset += n as u64;
        Ok(offset)
    }

    /// Applies the receiver's credit (spec 7.3). `Ok(true)` when it granted
    /// more, `Ok(false)` for a duplicate or late one.
    pub fn credit(&mut self, c: &BulkCredit) -> Result<bool, BulkViolation> {
        if c.kind != self.kind || c.flow != self.flow {
            return Err(self.violation(format!("a credit for {} {}", c.kind, c.flow)));
        }
        if c.consumed_offset > self.next_offset {
            return Err(self.violation(format!("consumed {} beyond the {} sent", c.consumed_offset, self.next_offset)));
        }
        if c.credit_limit < c.consumed_offset || c.credit_limit - c.consumed_offset > MAX_BULK_WINDOW {
            return Err(self.violation(format!("limit {} for consumed {}", c.credit_limit, c.consumed_offset)));
        }
        let (more_consumed, more_limit) =
            (c.consumed_offset > self.consumed_offset, c.credit_limit > self.credit_limit);
        if !more_consumed && !more_limit {
            return Ok(false);
        }
        if c.consumed_offset < self.consumed_offset
            || c.credit_limit < self.credit_limit
            || c.credit_limit < self.next_offset
        {
            return Err(self.violation(format!(
                "credit ({}, {}) goes back from ({}, {}) with {} sent",
                c.consumed_offset, c.credit_limit, self.consumed_offset, self.credit_limit, self.next_offset
            )));
        }
        self.consumed_offset = c.consumed_offset;
        self.credit_limit = c.credit_limit;
        Ok(more_limit)
    }

    /// Ends the flow: its finish, with the bytes sent.
    pub fn finish(&mut self) -> BulkFinish {
        self.finished = true;
        BulkFinish { kind: self.kind, flow: self.flow, final_offset: self.next_offset }
    }
}

/// The receiving end of one flow: the offset expected next, what was handed
/// on, and the credit granted.
#[derive(Clone, Debug)]
pub struct BulkReceiver {
    kind: BulkKind,
    flow: BulkFlow,
    max_record: usize,
    window: u64,
    received: u64,
    consumed: u64,
    credit_limit: u64,
    finished: Option<u64>,
}

impl BulkReceiver {
    /// A flow of records up to `max_record` bytes whose sender was granted
    /// `credit_limit`; later grants keep `window` bytes ahead of what was consumed.
    pub fn new(kind: BulkKind, flow: BulkFlow, max_record: u32, credit_limit: u64, window: u64) -> BulkReceiver {
        BulkReceiver {
            kind,
            flow,
            max_record: max_record as usize,
            window: window.clamp(1, MAX_BULK_WINDOW),
            received: 0,
            consumed: 0,
            credit_limit,
            finished: None,
        }
    }

    fn violation(&self, reason: String) -> BulkViolation {
        BulkViolation { kind: self.kind, flow: self.flow, reason }
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Whether the finish has come (and with it every record).
    pub fn is_finished(&self) -> bool {
        self.finished.is_some()
    }

    /// Checks a record: this kind and flow, at the expected offset, within
    /// the record size and the credit, not after the finish.
    pub fn record(&mut self, r: &BulkRecord) -> Result<(), BulkViolation> {
        let n = r.data.len();
        let problem = if r.kind != self.kind || r.flow != self.flow {
            format!("a record of {} {}", r.kind, r.flow)
        } else if self.finished.is_some() {
            "a record after the finish".to_string()
        } else if r.offset != self.received {
            format!("a record at {} where {} was expected", r.offset, self.received)
        } else if n > self.max_record {
            format!("a record of {n} bytes above the agreed {}", self.max_record)
        } else if r.offset + n as u64 > self.credit_limit {
            format!("a record ending at {} past the credit limit {}", r.offset + n as u64, self.credit_limit)
        } else {
            self.received += n as u64;
            return Ok(());
        };
        Err(self.violation(problem))
    }

    /// `n` more bytes were handed to their destination: a credit to send
    /// when what is left of the grant has fallen to half the window.
    pub fn consumed(&mut self, n: usize) -> Option<BulkCredit> {
        self.consumed = (self.consumed + n as u64).min(self.received);
        if self.finished.is_some() || self.credit_limit.saturating_sub(self.consumed) > self.window / 2 {
            return None;
        }
        self.credit_limit = self.consumed + self.window;
        Some(BulkCredit {
            kind: self.kind,
            flow: self.flow,
            consumed_offset: self.consumed,
            credit_limit: self.credit_limit,
        })
    }

    /// Takes the sender's finish: `Ok(true)` when every byte it names has
    /// arrived (one lane keeps order, so it must have).
    pub fn finish(&mut self, f: &BulkFinish) -> Result<bool, BulkViolation> {
        let problem = if f.kind != self.kind || f.flow != self.flow {
            format!("a finish of {} {}", f.kind, f.flow)
        } else if self.finished.is_some() {
            "a second finish".to_string()
        } else if f.final_offset != self.received {
            format!("a finish at {} after {} bytes", f.final_offset, self.received)
        } else {
            self.finished = Some(f.final_offset);
            return Ok(true);
        };
        Err(self.violation(problem))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credit(consumed_offset: u64, credit_limit: u64) -> BulkCredit {
        BulkCredit { kind: BulkKind::Tcp, flow: BulkFlow::HostToGuest, consumed_offset, credit_limit }
    }

    #[test]
    fn the_guest_fills_acceptances_as_the_table_says_and_the_host_checks_them() {
        let read = BulkOperation::FileRead.offer(1 << 20, 1 << 20);
        let a = BulkOperation::FileRead.accept(&read).unwrap();
        assert_eq!((a.flows, a.host_to_guest_credit_limit, a.guest_to_host_credit_limit), (2, 0, 1 << 20));
        BulkOperation::FileRead.check_acceptance(&read, &a).unwrap();
        let write = BulkOperation::FileWrite.offer(MAX_BULK_RECORD_PAYLOAD as u32, 1);
        let a = BulkOperation::FileWrite.accept(&write).unwrap();
        assert_eq!((a.flows, a.host_to_guest_credit_limit, a.guest_to_host_credit_limit), (1, DEFAULT_BULK_WINDOW, 0));
        let tcp = BulkOperation::Tcp.offer(MAX_BULK_RECORD_PAYLOAD as u32, 1 << 20);
        let a = BulkOperation::Tcp.accept(&tcp).unwrap();
        assert_eq!((a.flows, a.max_record_payload), (3, DEFAULT_TCP_BULK_RECORD_PAYLOAD as u32));
        BulkOperation::Tcp.check_acceptance(&tcp, &a).unwrap();
        // What a guest refuses, and what a host refuses.
        assert!(BulkOperation::FileRead.accept(&BulkOffer { format: 2, ..read }).is_err());
        assert!(BulkOperation::FileRead.accept(&BulkOffer { guest_to_host_credit_limit: 0, ..read }).is_err());
        assert!(BulkOperation::FileWrite.accept(&BulkOffer { guest_to_host_credit_limit: 5, ..write }).is_err());
        assert!(BulkOperation::Tcp.accept(&BulkOffer { max_record_payload: 100, ..tcp }).is_err());
        let bad = BulkAccepted { flows: 1, ..a };
        assert!(BulkOperation::Tcp.check_acceptance(&tcp, &bad).unwrap_err().contains("flows"));
        let bad = BulkAccepted { guest_to_host_credit_limit: 1, ..a };
        assert!(BulkOperation::Tcp.check_acceptance(&tcp, &bad).is_err());
    }

    #[test]
    fn a_sender_applies_credit_by_the_rules() {
        let mut tx = BulkSender::new(BulkKind::Tcp, BulkFlow::HostToGuest, 16384, 20000);
        assert_eq!(tx.window(), 16384);
        tx.record(Bytes::from(vec![0; 16384])).unwrap();
        assert_eq!(tx.window(), 20000 - 16384);
        assert!(tx.record(Bytes::from(vec![0; 4000])).is_err(), "past the credit");
        assert!(tx.credit(&credit(100, 50_000)).unwrap());
        assert!(!tx.credit(&credit(100, 50_000)).unwrap(), "a repeat grants nothing");
        assert!(!tx.credit(&credit(50, 40_000)).unwrap(), "a late one grants nothing");
        assert!(tx.credit(&credit(20_000, 30_000)).is_err(), "consumed beyond what was sent");
        assert!(tx.credit(&credit(200, 45_000)).is_err(), "the limit goes back");
        assert!(tx.credit(&credit(100, 100 + MAX_BULK_WINDOW + 1)).is_err(), "too far ahead");
        let wrong = BulkCredit { flow: BulkFlow::GuestToHost, ..credit(100, 60_000) };
        assert!(tx.credit(&wrong).is_err());
        assert_eq!(tx.finish().final_offset, 16384);
        assert!(tx.record(Bytes::from_static(b"x")).is_err(), "nothing after the finish");
    }

    #[test]
    fn a_receiver_checks_records_grants_by_half_windows_and_checks_the_finish() {
        let mut rx = BulkReceiver::new(BulkKind::Filesystem, BulkFlow::HostToGuest, 16384, 32768, 32768);
        let at =
            |offset, n| BulkRecord::new(BulkKind::Filesystem, BulkFlow::HostToGuest, offset, Bytes::from(vec![1; n]));
        rx.record(&at(0, 16384)).unwrap();
        assert!(rx.record(&at(0, 10)).is_err(), "not at the expected offset");
        assert!(rx.record(&at(16384, 16385)).is_err(), "above the record size");
        rx.record(&at(16384, 16384)).unwrap();
        assert!(rx.record(&at(32768, 1)).is_err(), "past the credit");
        assert_eq!(rx.consumed(10_000), None);
        let c = rx.consumed(10_000).unwrap();
        assert_eq!((c.consumed_offset, c.credit_limit), (20_000, 20_000 + 32768));
        let f = |final_offset| BulkFinish { kind: BulkKind::Filesystem, flow: BulkFlow::HostToGuest, final_offset };
        assert!(rx.finish(&f(1)).is_err());
        assert!(rx.finish(&f(32768)).unwrap());
        assert!(rx.finish(&f(32768)).is_err(), "a second finish");
        assert!(rx.record(&at(32768, 1)).is_err(), "nothing after the finish");
    }
}
