//! Writing frames without copying their data: a queue of encoded bytes for
//! vectored writes ([`WriteQueue`]), and a [`Sink`] of messages over any
//! [`AsyncWrite`] built on it ([`MessageSink`]).
//!
//! `tokio_util::codec::FramedWrite` copies every frame, data included, into
//! one buffer before writing it. Here the small parts of frames (headers,
//! envelopes, whole control messages) are gathered in one buffer, and the data
//! of a large data frame or bulk record stays the [`Bytes`] it was given,
//! written from where it lies by one `writev` with the headers around it.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use futures_sink::Sink;
use tokio::io::AsyncWrite;

use crate::codec::{MessageCodec, RawMessageCodec};
use crate::frame::EncodeError;
use crate::message::{Message, RawMessage};

/// The most slices handed to one vectored write (Linux takes up to 1024;
/// beyond a few dozen, more slices per call gain nothing measurable).
pub const MAX_WRITE_SLICES: usize = 64;

/// Encoded frames waiting to be written, as a list of [`Bytes`] for vectored
/// writes: sans-IO, so a driver of its own or [`MessageSink`] writes them.
///
/// ```
/// use agentwire::write::WriteQueue;
/// use agentwire::{Message, MessageCodec, payload::exec::ExecStdout, payload::core::Ping};
/// let mut queue = WriteQueue::new();
/// let mut codec = MessageCodec::new();
/// queue.push_message(&mut codec, &Message::new(1, Ping {}))?;
/// queue.push_message(&mut codec, &Message::new(2, ExecStdout { data: vec![0; 10_000].into() }))?;
/// let mut slices = [std::io::IoSlice::new(&[]); 8];
/// let n = queue.io_slices(&mut slices);
/// assert_eq!(n, 2); // the ping and the stdout frame's head, then its data
/// assert_eq!(slices[..n].iter().map(|s| s.len()).sum::<usize>(), queue.len());
/// queue.advance(queue.len());
/// assert!(queue.is_empty());
/// # Ok::<(), agentwire::EncodeError>(())
/// ```
#[derive(Debug, Default)]
pub struct WriteQueue {
    /// Whole pieces, in order, before `tail`.
    pieces: VecDeque<Bytes>,
    /// Small writes gathered after the last piece.
    tail: BytesMut,
    /// Bytes in `pieces`.
    pieces_len: usize,
    /// Frames ever pushed by [`WriteQueue::push_message`] or
    /// [`WriteQueue::push_raw`], or appended with them.
    frames: u64,
}

impl WriteQueue {
    /// An empty queue.
    pub fn new() -> WriteQueue {
        WriteQueue::default()
    }

    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.pieces_len + self.tail.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Encodes `m` at the end of the queue (its large data not copied, see
    /// [`MessageCodec::encode_vectored`]) and returns its size on the wire.
    /// On failure the queue is as it was.
    pub fn push_message(&mut self, codec: &mut MessageCodec, m: &Message) -> Result<usize, EncodeError> {
        let before = self.tail.len();
        let data = codec.encode_vectored(m, &mut self.tail)?;
        let head = self.tail.len() - before;
        self.frames += 1;
        Ok(head + data.map_or(0, |data| self.push_piece(data)))
    }

    /// Encodes a raw message (payload already encoded) at the end of the
    /// queue and returns its size on the wire. On failure the queue is as it was.
    pub fn push_raw(&mut self, codec: &mut RawMessageCodec, m: &RawMessage) -> Result<usize, EncodeError> {
        let before = self.tail.len();
        codec.encode_raw(m, &mut self.tail)?;
        self.frames += 1;
        Ok(self.tail.len() - before)
    }

    /// How many frames have been pushed (and appended) so far, written or not.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// The bytes queued, in order, as slices.
    pub fn chunks(&self) -> impl Iterator<Item = &[u8]> {
        let tail = (!self.tail.is_empty()).then_some(&self.tail[..]);
        self.pieces.iter().map(|p| &p[..]).chain(tail)
    }

    /// The buffer small writes go into: bytes appended here are written after
    /// everything queued before them.
    pub fn tail_mut(&mut self) -> &mut BytesMut {
        &mut self.tail
    }

    /// Queues `bytes` as they are, after everything queued; returns their length.
    pub fn push_piece(&mut self, bytes: Bytes) -> usize {
        let len = bytes.len();
        if len == 0 {
            return 0;
        }
        if !self.tail.is_empty() {
            self.pieces_len += self.tail.len();
            self.pieces.push_back(self.tail.split().freeze());
        }
        self.pieces_len += len;
        self.pieces.push_back(bytes);
        len
    }

    /// Moves everything from `other` to the end of this queue, copying no data.
    pub fn append(&mut self, other: &mut WriteQueue) {
        self.frames += std::mem::take(&mut other.frames);
        for piece in other.pieces.drain(..) {
            self.push_piece(piece);
        }
        other.pieces_len = 0;
        if self.pieces.is_empty() {
            self.tail.unsplit(other.tail.split());
        } else {
            self.push_piece(other.tail.split().freeze());
        }
    }

    /// Fills `dst` with the next slices to write, in order; returns how many.
    pub fn io_slices<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for piece in self.chunks() {
            let Some(slot) = dst.get_mut(n) else { break };
            *slot = IoSlice::new(piece);
            n += 1;
        }
        n
    }

    /// Drops the first `n` bytes (those a write took).
    ///
    /// # Panics
    /// When `n` is more than [`WriteQueue::len`].
    pub fn advance(&mut self, mut n: usize) {
        assert!(n <= self.len(), "advancing {n} bytes past the {} queued", self.len());
        while n > 0 {
            let Some(front) = self.pieces.front_mut() else {
                self.tail.advance(n);
                return;
            };
            let step = n.min(front.len());
            front.advance(step);
            self.pieces_len -= step;
            n -= step;
            if front.is_empty() {
                self.pieces.pop_front();
            }
        }
    }

    /// Takes everything queued as one buffer (copying when it is in pieces),
    /// for a writer that does not write vectored.
    pub fn take_all(&mut self) -> Bytes {
        match (self.pieces.len(), self.tail.is_empty()) {
            (0, _) => self.tail.split().freeze(),
            (1, true) => {
                self.pieces_len = 0;
                self.pieces.pop_front().expect("one piece")
            }
            _ => {
                let mut all = BytesMut::with_capacity(self.len());
                for piece in self.pieces.drain(..) {
                    all.extend_from_slice(&piece);
                }
                all.extend_from_slice(&self.tail);
                self.tail.clear();
                self.pieces_len = 0;
                all.freeze()
            }
        }
    }

    /// Writes from the front of the queue with one vectored write; `Ready(Ok(0))`
    /// only when the queue is empty. A writer that is not vectored gets the
    /// first slice, as [`AsyncWrite::poll_write_vectored`] does by default.
    pub fn poll_write_to<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<usize>> {
        if self.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut slices = [IoSlice::new(&[]); MAX_WRITE_SLICES];
        let n = self.io_slices(&mut slices);
        let written = ready!(writer.as_mut().poll_write_vectored(cx, &slices[..n]))?;
        if written == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        self.advance(written);
        Poll::Ready(Ok(written))
    }

    /// Writes everything queued to `writer`.
    pub async fn write_all_to<W: AsyncWrite + Unpin + ?Sized>(&mut self, writer: &mut W) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            while !self.is_empty() {
                ready!(self.poll_write_to(cx, Pin::new(&mut *writer)))?;
            }
            Poll::Ready(Ok(()))
        })
        .await
    }
}

/// A [`Sink`] of [`Message`]s over an [`AsyncWrite`]: the writing half of a
/// framed transport, beside `tokio_util::codec::FramedRead` for reading, that
/// writes large data from where it is ([`WriteQueue`]).
///
/// Up to [`MessageSink::with_backpressure`] bytes (default 1 MiB) are queued
/// before `poll_ready` writes; `poll_flush` writes everything.
///
/// ```
/// use agentwire::{MessageCodec, Message, payload::exec::ExecStdout, write::MessageSink};
/// use futures::{SinkExt, StreamExt};
/// use tokio_util::codec::FramedRead;
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let (a, b) = tokio::io::duplex(1 << 16);
/// let mut sink = MessageSink::new(a, MessageCodec::new());
/// let mut stream = FramedRead::new(b, MessageCodec::new());
/// let data = bytes::Bytes::from(vec![1u8; 100_000]);
/// tokio::spawn(async move { sink.send(Message::new(4, ExecStdout { data })).await });
/// let m = stream.next().await.unwrap()?.unwrap();
/// assert_eq!(m.id, 4);
/// # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
/// ```
#[derive(Debug)]
pub struct MessageSink<W> {
    writer: W,
    codec: MessageCodec,
    queue: WriteQueue,
    backpressure: usize,
}

/// Why a [`MessageSink`] could not take or write a message.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The message could not be encoded (nothing of it was queued).
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The writer failed.
    #[error("writing: {0}")]
    Io(#[from] io::Error),
}

impl<W: AsyncWrite + Unpin> MessageSink<W> {
    /// A sink writing to `writer` with `codec`'s limits and generation.
    pub fn new(writer: W, codec: MessageCodec) -> MessageSink<W> {
        MessageSink { writer, codec, queue: WriteQueue::new(), backpressure: 1 << 20 }
    }

    /// Queues up to `bytes` before `poll_ready` writes (at least one frame is
    /// always taken).
    pub fn with_backpressure(mut self, bytes: usize) -> MessageSink<W> {
        self.backpressure = bytes;
        self
    }

    /// The codec, to set its negotiated generation.
    pub fn codec_mut(&mut self) -> &mut MessageCodec {
        &mut self.codec
    }

    /// The writer.
    pub fn get_ref(&self) -> &W {
        &self.writer
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The writer, with anything still queued dropped.
    pub fn into_inner(self) -> W {
        self.writer
    }

    fn poll_write_down_to(&mut self, cx: &mut Context<'_>, keep: usize) -> Poll<Result<(), SinkError>> {
        while self.queue.len() > keep {
            ready!(self.queue.poll_write_to(cx, Pin::new(&mut self.writer)))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> Sink<Message> for MessageSink<W> {
    type Error = SinkError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), SinkError>> {
        let this = self.get_mut();
        let keep = this.backpressure.saturating_sub(1);
        this.poll_write_down_to(cx, keep)
    }

    fn start_send(self: Pin<&mut Self>, m: Message) -> Result<(), SinkError> {
        let this = self.get_mut();
        this.queue.push_message(&mut this.codec, &m)?;
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), SinkError>> {
        let this = self.get_mut();
        ready!(this.poll_write_down_to(cx, 0))?;
        Pin::new(&mut this.writer).poll_flush(cx).map_err(SinkError::Io)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), SinkError>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.get_mut().writer).poll_shutdown(cx).map_err(SinkError::Io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::bulk::{BulkFlow, BulkKind, BulkRecord};
    use crate::payload::core::Ping;
    use crate::payload::exec::ExecStdout;
    use crate::payload::fs::FsData;

    fn messages() -> Vec<Message> {
        let big = Bytes::from((0..200_000u32).map(|i| i as u8).collect::<Vec<_>>());
        vec![
            Message::new(1, Ping {}),
            Message::new(2, ExecStdout { data: big.slice(..10) }),
            Message::new(3, ExecStdout { data: big.slice(..100_000) }),
            Message::new(4, FsData { data: big.slice(5..4096 + 5) }),
            Message::new(5, Ping {}),
            Message::new(6, BulkRecord::new(BulkKind::Filesystem, BulkFlow::GuestToHost, 9, big.clone())),
            Message::new(7, BulkRecord::new(BulkKind::Filesystem, BulkFlow::GuestToHost, 9, big.slice(..3))),
        ]
    }

    fn whole(ms: &[Message]) -> Vec<u8> {
        let mut out = BytesMut::new();
        let mut codec = MessageCodec::new();
        for m in ms {
            codec.encode_message(m, &mut out).unwrap();
        }
        out.to_vec()
    }

    #[test]
    fn pieces_in_order_are_the_frames_byte_for_byte_and_data_is_not_copied() {
        let ms = messages();
        let mut q = WriteQueue::new();
        let mut codec = MessageCodec::new();
        let mut sum = 0;
        for m in &ms {
            sum += q.push_message(&mut codec, m).unwrap();
        }
        assert_eq!(sum, q.len());
        let mut slices = [IoSlice::new(&[]); MAX_WRITE_SLICES];
        let n = q.io_slices(&mut slices);
        // Stdout 100 000 and 4096, the 200 000-byte record: three data pieces
        // not copied, each after the small bytes before it.
        assert_eq!(n, 7);
        let Message { payload: crate::Payload::ExecStdout(big), .. } = &ms[2] else { unreachable!() };
        assert!(slices.iter().any(|s| s.as_ptr() == big.data.as_ptr()));
        let joined: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
        assert_eq!(joined, whole(&ms));
    }

    #[test]
    fn advancing_by_odd_steps_and_take_all_give_the_same_bytes() {
        let ms = messages();
        let expected = whole(&ms);
        for step in [13usize, 4096, 100_001] {
            let mut q = WriteQueue::new();
            let mut codec = MessageCodec::new();
            for m in &ms {
                q.push_message(&mut codec, m).unwrap();
            }
            let mut got = Vec::new();
            while !q.is_empty() {
                let mut slices = [IoSlice::new(&[]); 3];
                let n = q.io_slices(&mut slices);
                // Take `step` bytes across the slices, as a short write would.
                let mut take = 0;
                for s in &slices[..n] {
                    let part = (step - take).min(s.len());
                    got.extend_from_slice(&s[..part]);
                    take += part;
                }
                q.advance(take);
            }
            assert_eq!(got, expected, "step {step}");
        }
        let mut q = WriteQueue::new();
        let mut codec = MessageCodec::new();
        for m in &ms {
            q.push_message(&mut codec, m).unwrap();
        }
        let mut other = WriteQueue::new();
        other.append(&mut q);
        assert!(q.is_empty());
        assert_eq!(other.take_all(), expected);
        assert!(other.is_empty());
    }

    #[test]
    fn a_frame_that_cannot_be_encoded_leaves_the_queue_as_it_was() {
        let mut q = WriteQueue::new();
        let mut codec = MessageCodec::with_frame_codec(crate::FrameCodec::builder().max_frame_len(1000).build());
        q.push_message(&mut codec, &Message::new(1, Ping {})).unwrap();
        let before = q.len();
        let big = ExecStdout { data: Bytes::from(vec![0; 5000]) };
        assert!(q.push_message(&mut codec, &Message::new(2, big)).is_err());
        assert_eq!(q.len(), before);
    }

    #[tokio::test]
    async fn the_sink_writes_what_the_codec_writes() {
        use futures::SinkExt;
        let ms = messages();
        let (a, mut b) = tokio::io::duplex(4096);
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut b, &mut all).await.unwrap();
            all
        });
        let mut sink = MessageSink::new(a, MessageCodec::new()).with_backpressure(50_000);
        for m in ms.clone() {
            sink.feed(m).await.unwrap();
        }
        sink.close().await.unwrap();
        assert_eq!(reader.await.unwrap(), whole(&ms));
    }
}
