//! A host's metering of what it writes to an agent that grants transport
//! credit (generation 9, spec 9.1): frames that would pass the grant wait,
//! in order, until the agent reports a larger one.

use std::collections::VecDeque;

use agentwire::WriteQueue;
use agentwire::payload::workload::{TransportCredit, TransportPosition};

/// Counts what was written in the two classes the agent meters, and holds
/// back encoded frames that would pass its grant.
#[derive(Debug)]
pub struct InputMeter {
    sent: TransportPosition,
    grant: TransportCredit,
    /// Whether the grant applies (the agent said barrier version 2); until
    /// then frames are only counted.
    enforcing: bool,
    held: VecDeque<(WriteQueue, bool)>,
    held_bytes: usize,
}

impl Default for InputMeter {
    fn default() -> InputMeter {
        InputMeter {
            sent: TransportPosition::default(),
            grant: TransportCredit::INITIAL,
            enforcing: false,
            held: VecDeque::new(),
            held_bytes: 0,
        }
    }
}

impl InputMeter {
    /// From now on frames wait for the grant (everything sent so far counts).
    pub fn enforce(&mut self) {
        self.enforcing = true;
    }

    /// Whether the grant applies.
    pub fn is_enforcing(&self) -> bool {
        self.enforcing
    }

    /// What has been written so far.
    pub fn sent(&self) -> TransportPosition {
        self.sent
    }

    /// The current grant.
    pub fn grant(&self) -> TransportCredit {
        self.grant
    }

    /// Bytes of frames waiting for credit.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    fn fits(&self, len: usize, data: bool) -> bool {
        let (s, g) = (&self.sent, &self.grant);
        let len = len as u64;
        if data {
            s.bulk_bytes + len <= g.bulk_bytes && s.bulk_frames < g.bulk_frames
        } else {
            s.control_bytes + len <= g.control_bytes && s.control_frames < g.control_frames
        }
    }

    fn count(&mut self, len: usize, data: bool) {
        let len = len as u64;
        if data {
            self.sent.bulk_bytes += len;
            self.sent.bulk_frames += 1;
        } else {
            self.sent.control_bytes += len;
            self.sent.control_frames += 1;
        }
    }

    /// Counts a frame of `len` bytes written without going through
    /// [`InputMeter::admit`] (nothing is enforced yet).
    pub fn count_sent(&mut self, len: usize, data: bool) {
        self.count(len, data);
    }

    /// Takes one encoded frame: counts it and moves it to `send`, or keeps it
    /// to wait when it would pass the grant or frames already wait.
    pub fn admit(&mut self, mut frame: WriteQueue, data: bool, send: &mut WriteQueue) {
        let len = frame.len();
        if !self.enforcing || (self.held.is_empty() && self.fits(len, data)) {
            self.count(len, data);
            send.append(&mut frame);
            return;
        }
        self.held_bytes += len;
        self.held.push_back((frame, data));
    }

    /// Takes a report of the agent's grant (only ever larger; a smaller or
    /// equal field is kept as it was) and moves the frames that now fit, in
    /// order, to `send`.
    pub fn granted(&mut self, credit: TransportCredit, send: &mut WriteQueue) {
        let g = &mut self.grant;
        g.control_bytes = g.control_bytes.max(credit.control_bytes);
        g.control_frames = g.control_frames.max(credit.control_frames);
        g.bulk_bytes = g.bulk_bytes.max(credit.bulk_bytes);
        g.bulk_frames = g.bulk_frames.max(credit.bulk_frames);
        while let Some((frame, data)) = self.held.front() {
            if !self.fits(frame.len(), *data) {
                break;
            }
            let (mut frame, data) = self.held.pop_front().expect("front exists");
            self.held_bytes -= frame.len();
            self.count(frame.len(), data);
            send.append(&mut frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn frame(byte: u8, len: usize) -> WriteQueue {
        let mut q = WriteQueue::new();
        q.push_piece(Bytes::from(vec![byte; len]));
        q
    }

    #[test]
    fn frames_wait_in_order_for_the_grant_and_move_when_it_grows() {
        let mut m = InputMeter::default();
        let mut send = WriteQueue::new();
        // Not enforcing: counted only.
        m.admit(frame(0, 100), false, &mut send);
        assert_eq!((m.sent().control_bytes, m.sent().control_frames), (100, 1));
        m.enforce();
        // 255 more data frames of 128 KiB fit (32 MiB / 256 frames), the 256th too; the 257th waits.
        let mut written = 100;
        for _ in 0..256 {
            m.admit(frame(1, 128 * 1024), true, &mut send);
        }
        assert_eq!(m.sent().bulk_frames, 256);
        written += 256 * 128 * 1024;
        m.admit(frame(2, 10), true, &mut send);
        // A control frame behind it waits too: order is kept.
        m.admit(frame(3, 10), false, &mut send);
        assert_eq!((send.len(), m.held_bytes()), (written, 20));
        // A report that grants nothing new moves nothing.
        m.granted(TransportCredit::INITIAL, &mut send);
        assert_eq!(m.held_bytes(), 20);
        // One more data frame granted: both move, in order.
        let more = TransportCredit { bulk_frames: 257, bulk_bytes: 33 * 1024 * 1024, ..TransportCredit::INITIAL };
        m.granted(more, &mut send);
        assert_eq!((m.held_bytes(), send.len()), (0, written + 20));
        assert_eq!(&send.take_all()[written..], &[2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]);
        assert_eq!((m.sent().bulk_frames, m.sent().control_frames), (257, 2));
    }
}
