//! A host's metering of what it writes to an agent that grants transport
//! credit (generation 9, spec 9.1): frames that would pass the grant wait,
//! in order, until the agent reports a larger one.

use std::collections::VecDeque;

use agentwire::payload::workload::{TransportCredit, TransportPosition};
use bytes::{Bytes, BytesMut};

/// Counts what was written in the two classes the agent meters, and holds
/// back encoded frames that would pass its grant.
#[derive(Debug)]
pub struct InputMeter {
    sent: TransportPosition,
    grant: TransportCredit,
    /// Whether the grant applies (the agent said barrier version 2); until
    /// then frames are only counted.
    enforcing: bool,
    held: VecDeque<(Bytes, bool)>,
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

    /// A frame was just encoded at `send[start..]`: counts it, or moves it
    /// out of `send` to wait when it would pass the grant or frames already wait.
    pub fn admit(&mut self, send: &mut BytesMut, start: usize, data: bool) {
        let len = send.len() - start;
        if !self.enforcing || (self.held.is_empty() && self.fits(len, data)) {
            self.count(len, data);
            return;
        }
        let frame = send.split_off(start).freeze();
        self.held_bytes += frame.len();
        self.held.push_back((frame, data));
    }

    /// Takes a report of the agent's grant (only ever larger; a smaller or
    /// equal field is kept as it was) and moves the frames that now fit, in
    /// order, to `send`.
    pub fn granted(&mut self, credit: TransportCredit, send: &mut BytesMut) {
        let g = &mut self.grant;
        g.control_bytes = g.control_bytes.max(credit.control_bytes);
        g.control_frames = g.control_frames.max(credit.control_frames);
        g.bulk_bytes = g.bulk_bytes.max(credit.bulk_bytes);
        g.bulk_frames = g.bulk_frames.max(credit.bulk_frames);
        while let Some((frame, data)) = self.held.front() {
            if !self.fits(frame.len(), *data) {
                break;
            }
            let (frame, data) = self.held.pop_front().expect("front exists");
            self.held_bytes -= frame.len();
            self.count(frame.len(), data);
            send.extend_from_slice(&frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_wait_in_order_for_the_grant_and_move_when_it_grows() {
        let mut m = InputMeter::default();
        let mut send = BytesMut::new();
        // Not enforcing: counted only.
        send.extend_from_slice(&[0; 100]);
        m.admit(&mut send, 0, false);
        assert_eq!((m.sent().control_bytes, m.sent().control_frames), (100, 1));
        m.enforce();
        // 255 more data frames of 128 KiB fit (32 MiB / 256 frames), the 256th too; the 257th waits.
        let mut written = 100;
        for _ in 0..256 {
            let start = send.len();
            send.extend_from_slice(&[1; 128 * 1024]);
            m.admit(&mut send, start, true);
        }
        assert_eq!(m.sent().bulk_frames, 256);
        written += 256 * 128 * 1024;
        let start = send.len();
        send.extend_from_slice(&[2; 10]);
        m.admit(&mut send, start, true);
        // A control frame behind it waits too: order is kept.
        let start = send.len();
        send.extend_from_slice(&[3; 10]);
        m.admit(&mut send, start, false);
        assert_eq!((send.len(), m.held_bytes()), (written, 20));
        // A report that grants nothing new moves nothing.
        m.granted(TransportCredit::INITIAL, &mut send);
        assert_eq!(m.held_bytes(), 20);
        // One more data frame granted: both move, in order.
        let more = TransportCredit { bulk_frames: 257, bulk_bytes: 33 * 1024 * 1024, ..TransportCredit::INITIAL };
        m.granted(more, &mut send);
        assert_eq!((m.held_bytes(), send.len()), (0, written + 20));
        assert_eq!(&send[written..], &[2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]);
        assert_eq!((m.sent().bulk_frames, m.sent().control_frames), (257, 2));
    }
}
