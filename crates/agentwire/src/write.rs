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
    pieces: VecDeque<Piece>,
    /// Small writes gathered after the last piece.
    tail: BytesMut,
    /// Bytes in `pieces`, piped ones included.
    pieces_len: usize,
    /// Frames ever pushed by [`WriteQueue::push_message`],
    /// [`WriteQueue::push_raw`] or [`WriteQueue::push_piped`], or appended with them.
    frames: u64,
}

/// One piece of a [`WriteQueue`]: bytes in memory, or data waiting in a pipe.
#[derive(Debug)]
enum Piece {
    Memory(Bytes),
    #[cfg(unix)]
    Piped(PipedData),
}

impl Piece {
    fn len(&self) -> usize {
        match self {
            Piece::Memory(b) => b.len(),
            #[cfg(unix)]
            Piece::Piped(p) => p.len(),
        }
    }

    fn memory(&self) -> Option<&Bytes> {
        match self {
            Piece::Memory(b) => Some(b),
            #[cfg(unix)]
            Piece::Piped(_) => None,
        }
    }

    fn into_memory(self) -> Option<Bytes> {
        match self {
            Piece::Memory(b) => Some(b),
            #[cfg(unix)]
            Piece::Piped(_) => None,
        }
    }
}

impl WriteQueue {
    /// An empty queue.
    pub fn new() -> WriteQueue {
        WriteQueue::default()
    }

    /// Bytes waiting to be written (piped data included).
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

    /// Queues bulk record `id` whose data waits in a pipe: its headers, then
    /// the pipe, for the writer to move on ([`WriteQueue::front_piped`]).
    /// Returns its size on the wire. On failure (a record below generation 8,
    /// or one that breaks the layout) nothing is queued and the pipe is closed.
    #[cfg(unix)]
    pub fn push_piped(
        &mut self,
        codec: &MessageCodec,
        id: u32,
        record: crate::payload::bulk::PipedRecord,
    ) -> Result<usize, EncodeError> {
        let header = codec.piped_record_header(id, &record)?;
        self.tail.extend_from_slice(&header);
        Ok(header.len() + self.push_piped_piece(record.data))
    }

    /// Queues a `{data: bytes}` frame of type `message_type` on `id` (see
    /// [`MessageCodec::encode_data_head`]) whose data waits in a pipe: its
    /// head, then the pipe, as [`WriteQueue::push_piped`] does for a record.
    /// Returns its size on the wire. On failure nothing is queued and the
    /// pipe is closed.
    #[cfg(unix)]
    pub fn push_piped_data(
        &mut self,
        codec: &MessageCodec,
        id: u32,
        message_type: crate::MessageType,
        data: PipedData,
    ) -> Result<usize, EncodeError> {
        let before = self.tail.len();
        codec.encode_data_head(id, message_type, data.len(), &mut self.tail)?;
        let head = self.tail.len() - before;
        Ok(head + self.push_piped_piece(data))
    }

    /// Queues piped data after everything queued, as one more frame; returns its length.
    #[cfg(unix)]
    fn push_piped_piece(&mut self, data: PipedData) -> usize {
        self.frames += 1;
        let len = data.len();
        if len == 0 {
            // Nothing to move: the frame is its head.
            return 0;
        }
        self.close_tail();
        self.pieces_len += len;
        self.pieces.push_back(Piece::Piped(data));
        len
    }

    /// How many frames have been pushed (and appended) so far, written or not.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// The bytes queued in memory, in order, as slices, up to the first piped
    /// data (all of them when nothing is piped).
    pub fn chunks(&self) -> impl Iterator<Item = &[u8]> {
        let memory = self.pieces.iter().map_while(Piece::memory).map(|b| &b[..]);
        let all_memory = self.pieces.iter().all(|p| p.memory().is_some());
        let tail = (all_memory && !self.tail.is_empty()).then_some(&self.tail[..]);
        memory.chain(tail)
    }

    /// The buffer small writes go into: bytes appended here are written after
    /// everything queued before them.
    pub fn tail_mut(&mut self) -> &mut BytesMut {
        &mut self.tail
    }

    /// Ends the tail as a piece, so that what comes next follows it.
    fn close_tail(&mut self) {
        if !self.tail.is_empty() {
            self.pieces_len += self.tail.len();
            self.pieces.push_back(Piece::Memory(self.tail.split().freeze()));
        }
    }

    /// Queues `bytes` as they are, after everything queued; returns their length.
    pub fn push_piece(&mut self, bytes: Bytes) -> usize {
        let len = bytes.len();
        if len == 0 {
            return 0;
        }
        self.close_tail();
        self.pieces_len += len;
        self.pieces.push_back(Piece::Memory(bytes));
        len
    }

    /// Moves everything from `other` to the end of this queue, copying no data.
    pub fn append(&mut self, other: &mut WriteQueue) {
        self.frames += std::mem::take(&mut other.frames);
        if !other.pieces.is_empty() {
            self.close_tail();
            self.pieces_len += std::mem::take(&mut other.pieces_len);
            self.pieces.append(&mut other.pieces);
        }
        if self.pieces.is_empty() {
            self.tail.unsplit(other.tail.split());
        } else {
            self.push_piece(other.tail.split().freeze());
        }
    }

    /// Fills `dst` with the next slices to write, in order, up to the first
    /// piped data; returns how many.
    pub fn io_slices<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for piece in self.chunks() {
            let Some(slot) = dst.get_mut(n) else { break };
            *slot = IoSlice::new(piece);
            n += 1;
        }
        n
    }

    /// Drops the first `n` bytes (those a write took), or the piped data's
    /// first `n` (those moved out of its pipe) when it is at the front.
    ///
    /// # Panics
    /// When `n` is more than the slices of [`WriteQueue::io_slices`] hold
    /// (at most all of [`WriteQueue::chunks`]), or than the piped data at the
    /// front holds.
    pub fn advance(&mut self, mut n: usize) {
        assert!(n <= self.len(), "advancing {n} bytes past the {} queued", self.len());
        let asked = n;
        while n > 0 {
            let Some(front) = self.pieces.front_mut() else {
                self.tail.advance(n);
                return;
            };
            let step = n.min(front.len());
            match front {
                Piece::Memory(b) => b.advance(step),
                #[cfg(unix)]
                Piece::Piped(p) => {
                    // Bytes written from memory and bytes moved out of a pipe
                    // are never one write: counting one as the other would
                    // lose or repeat data.
                    assert!(n == asked, "advancing {asked} bytes past the bytes in memory into piped data");
                    assert!(step == n, "advancing {n} bytes past the {} of the piped data", p.len());
                    p.moved(step);
                }
            }
            self.pieces_len -= step;
            n -= step;
            if front.len() == 0 {
                self.pieces.pop_front();
            }
        }
    }

    /// The piped data at the front of the queue, if the front is piped: the
    /// writer moves its bytes out of the pipe and then calls
    /// [`WriteQueue::advance`] with their number.
    #[cfg(unix)]
    pub fn front_piped(&self) -> Option<&PipedData> {
        match self.pieces.front() {
            Some(Piece::Piped(p)) => Some(p),
            _ => None,
        }
    }

    /// Reads all piped data into memory, for a writer without a descriptor
    /// to splice into (or one that must see every byte, as a capture). An
    /// error leaves the queue unfit to write (the frame of the failed pipe
    /// would be cut short): the caller ends the connection.
    #[cfg(unix)]
    pub fn load_piped(&mut self) -> io::Result<()> {
        for piece in self.pieces.iter_mut() {
            if let Piece::Piped(p) = piece {
                *piece = Piece::Memory(p.read_all()?);
            }
        }
        Ok(())
    }

    /// Takes everything queued in memory as one buffer (copying when it is in
    /// pieces), for a writer that does not write vectored: all of it when
    /// nothing is piped, otherwise what precedes the first piped data (the
    /// rest stays; [`WriteQueue::load_piped`] first reads it into memory).
    pub fn take_all(&mut self) -> Bytes {
        let memory = self.pieces.iter().take_while(|p| p.memory().is_some()).count();
        let all_memory = memory == self.pieces.len();
        // Nothing to join: the tail, or the one piece, as it is.
        match (all_memory, memory, self.tail.is_empty()) {
            (true, 0, _) => return self.tail.split().freeze(),
            (true, 1, true) => {
                self.pieces_len = 0;
                return self.pieces.pop_front().and_then(Piece::into_memory).unwrap_or_default();
            }
            _ => {}
        }
        let mut taken = BytesMut::with_capacity(self.chunks().map(<[u8]>::len).sum());
        for bytes in self.pieces.drain(..memory).filter_map(Piece::into_memory) {
            self.pieces_len -= bytes.len();
            taken.extend_from_slice(&bytes);
        }
        if all_memory {
            taken.extend_from_slice(&self.tail);
            self.tail.clear();
        }
        taken.freeze()
    }

    /// Writes from the front of the queue with one vectored write; `Ready(Ok(0))`
    /// only when the queue is empty. A writer that is not vectored gets the
    /// first slice, as [`AsyncWrite::poll_write_vectored`] does by default.
    /// Piped data at the front is read into memory first.
    pub fn poll_write_to<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<usize>> {
        if self.is_empty() {
            return Poll::Ready(Ok(0));
        }
        #[cfg(unix)]
        if let Some(Piece::Piped(_)) = self.pieces.front() {
            self.load_piped()?;
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

    /// Writes everything queued to `writer` (piped data read into memory).
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

/// Data of a frame that waits in a pipe rather than in memory: a file's pages
/// that `splice` put there, for a writer to move to its transport with
/// `splice`, never copied through this process. The pipe holds exactly
/// [`PipedData::len`] bytes, so the frame's length is known before its
/// header is written (a file that shrinks meanwhile cannot cut it short).
#[cfg(unix)]
#[derive(Debug)]
pub struct PipedData {
    /// The read end (a `File` for its `Read`).
    pipe: std::fs::File,
    len: usize,
}

#[cfg(unix)]
impl PipedData {
    /// The `len` bytes waiting in the pipe whose read end is `pipe`. The
    /// caller has put exactly that many there and closed every write end, so
    /// that the pipe ends after them: fewer then make the writer fail (and
    /// the connection end, its frame cut short) rather than wait; more are
    /// never read. A write end left open makes a short pipe a wait for the
    /// rest, which holds up the connection's writer.
    pub fn new(pipe: std::os::fd::OwnedFd, len: usize) -> PipedData {
        PipedData { pipe: pipe.into(), len }
    }

    /// Bytes still in the pipe.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pipe's read end, to splice from.
    pub fn pipe(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.pipe.as_fd()
    }

    /// `n` bytes were moved out of the pipe.
    fn moved(&mut self, n: usize) {
        self.len -= n;
    }

    /// Reads what is left into memory (its size is the caller's, at most
    /// one record's); a pipe with fewer bytes is an error naming both counts.
    fn read_all(&mut self) -> io::Result<Bytes> {
        use std::io::Read;
        let mut data = vec![0; self.len];
        let mut got = 0;
        while got < data.len() {
            match (&self.pipe).read(&mut data[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if got < data.len() {
            let msg = format!("a pipe gave {got} of the {} bytes of its frame's data", data.len());
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, msg));
        }
        self.len = 0;
        Ok(Bytes::from(data))
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
    use crate::codec::BULK_WIRE_HEADER;
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

    /// `data` in a new pipe, its write end closed (`data` within the
    /// default 64 KiB), as piped data claiming `claimed` bytes.
    fn piped(data: &[u8], claimed: usize) -> PipedData {
        let (reader, writer) = rustix::pipe::pipe().unwrap();
        let mut rest = data;
        while !rest.is_empty() {
            rest = &rest[rustix::io::write(&writer, rest).unwrap()..];
        }
        PipedData::new(reader, claimed)
    }

    fn piped_record(offset: u64, data: PipedData) -> crate::payload::bulk::PipedRecord {
        crate::payload::bulk::PipedRecord { kind: BulkKind::Filesystem, flow: BulkFlow::GuestToHost, offset, data }
    }

    #[test]
    fn a_piped_record_is_the_same_record_on_the_wire() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let record = BulkRecord::new(BulkKind::Filesystem, BulkFlow::GuestToHost, 9, Bytes::from(data.clone()));
        let expected = whole(&[Message::new(1, Ping {}), Message::new(6, record), Message::new(2, Ping {})]);

        let mut q = WriteQueue::new();
        let mut codec = MessageCodec::new();
        q.push_message(&mut codec, &Message::new(1, Ping {})).unwrap();
        let n = q.push_piped(&codec, 6, piped_record(9, piped(&data, data.len()))).unwrap();
        q.push_message(&mut codec, &Message::new(2, Ping {})).unwrap();
        assert_eq!(n, BULK_WIRE_HEADER + data.len());
        assert_eq!(q.len(), expected.len());
        assert_eq!(q.frames(), 3);
        // The slices stop before the pipe: the ping and the record's headers.
        let mut slices = [IoSlice::new(&[]); 8];
        let k = q.io_slices(&mut slices);
        let before: Vec<u8> = slices[..k].iter().flat_map(|s| s.iter().copied()).collect();
        assert_eq!(before, expected[..before.len()]);
        let ping = whole(&[Message::new(1, Ping {})]).len();
        assert_eq!(before.len(), ping + BULK_WIRE_HEADER, "up to the data");
        assert!(q.front_piped().is_none());
        q.advance(before.len());
        assert_eq!(q.front_piped().map(PipedData::len), Some(data.len()));
        // Read into memory, the queue is the record's bytes, and what follows.
        q.load_piped().unwrap();
        assert!(q.front_piped().is_none());
        assert_eq!(q.take_all(), expected[before.len()..]);
    }

    #[test]
    fn take_all_stops_at_piped_data_and_a_short_pipe_is_an_error_naming_both_counts() {
        let mut q = WriteQueue::new();
        let codec = MessageCodec::new();
        q.tail_mut().extend_from_slice(b"head");
        q.push_piped(&codec, 6, piped_record(0, piped(&[1; 500], 1000))).unwrap();
        q.tail_mut().extend_from_slice(b"after");
        assert_eq!(q.len(), 4 + BULK_WIRE_HEADER + 1000 + 5);
        assert_eq!(q.chunks().map(<[u8]>::len).sum::<usize>(), 4 + BULK_WIRE_HEADER, "in memory up to the pipe");
        let front = q.take_all();
        assert_eq!(front.len(), 4 + BULK_WIRE_HEADER);
        assert_eq!(q.len(), 1000 + 5, "the pipe and what follows stay");
        let e = q.load_piped().unwrap_err();
        assert!(e.to_string().contains("500 of the 1000"), "{e}");
    }

    /// One frame of the property below: in memory, or with its data piped.
    #[derive(Clone, Debug)]
    enum Item {
        Ping,
        Stdout(usize),
        Record(usize),
        PipedRecord(usize),
        PipedStdout(usize),
    }

    fn item() -> impl proptest::strategy::Strategy<Value = Item> {
        use proptest::prelude::*;
        prop_oneof![
            Just(Item::Ping),
            (0..20_000usize).prop_map(Item::Stdout),
            (1..20_000usize).prop_map(Item::Record),
            (1..60_000usize).prop_map(Item::PipedRecord),
            (0..60_000usize).prop_map(Item::PipedStdout),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(48))]

        /// Frames in memory and piped, queued across appends and written by
        /// short writes and short moves out of the pipes, are the frames of
        /// the same data in memory, byte for byte.
        #[test]
        fn piped_and_memory_frames_written_piecemeal_are_the_frames_in_memory(
            items in proptest::collection::vec(item(), 1..12),
            split in 0..12usize,
            steps in proptest::collection::vec(1..70_000usize, 1..8),
        ) {
            let data = |n: usize, seed: usize| Bytes::from((0..n).map(|i| (i * 31 + seed) as u8).collect::<Vec<_>>());
            let (kind, flow) = (BulkKind::Filesystem, BulkFlow::GuestToHost);
            let mut expected = Vec::new();
            let (mut first, mut second) = (WriteQueue::new(), WriteQueue::new());
            let mut codec = MessageCodec::new();
            for (k, item) in items.iter().enumerate() {
                let q = if k < split { &mut first } else { &mut second };
                let m = match *item {
                    Item::Ping => Message::new(1, Ping {}),
                    Item::Stdout(n) | Item::PipedStdout(n) => Message::new(2, ExecStdout { data: data(n, k) }),
                    Item::Record(n) | Item::PipedRecord(n) => {
                        Message::new(3, BulkRecord::new(kind, flow, k as u64, data(n, k)))
                    }
                };
                expected.extend_from_slice(&whole(std::slice::from_ref(&m)));
                match *item {
                    Item::PipedRecord(n) => {
                        q.push_piped(&codec, 3, piped_record(k as u64, piped(&data(n, k), n))).unwrap();
                    }
                    Item::PipedStdout(n) => {
                        q.push_piped_data(&codec, 2, crate::MessageType::ExecStdout, piped(&data(n, k), n)).unwrap();
                    }
                    _ => {
                        q.push_message(&mut codec, &m).unwrap();
                    }
                }
            }
            first.append(&mut second);
            proptest::prop_assert_eq!(first.len(), expected.len());
            proptest::prop_assert_eq!(first.frames(), items.len() as u64);
            let mut got = Vec::new();
            let mut step = steps.iter().cycle();
            while !first.is_empty() {
                let want = *step.next().unwrap();
                if let Some(p) = first.front_piped() {
                    let mut buf = vec![0; want.min(p.len())];
                    let n = rustix::io::read(p.pipe(), &mut buf).unwrap();
                    got.extend_from_slice(&buf[..n]);
                    first.advance(n);
                    continue;
                }
                let mut slices = [IoSlice::new(&[]); 4];
                let n = first.io_slices(&mut slices);
                let mut took = 0;
                for s in &slices[..n] {
                    let part = (want - took).min(s.len());
                    got.extend_from_slice(&s[..part]);
                    took += part;
                }
                first.advance(took);
            }
            proptest::prop_assert!(got == expected, "{} bytes written of {}", got.len(), expected.len());
        }
    }

    #[test]
    #[should_panic(expected = "into piped data")]
    fn one_advance_never_counts_bytes_in_memory_and_in_a_pipe_together() {
        let mut q = WriteQueue::new();
        q.tail_mut().extend_from_slice(&[0; 10]);
        q.push_piped(&MessageCodec::new(), 6, piped_record(0, piped(&[1; 100], 100))).unwrap();
        q.advance(50);
    }

    #[test]
    fn a_piped_record_below_generation_8_or_empty_is_refused_and_nothing_queued() {
        let mut q = WriteQueue::new();
        let mut old = MessageCodec::new();
        old.set_peer_generation(7);
        assert!(q.push_piped(&old, 6, piped_record(0, piped(&[1; 10], 10))).is_err());
        assert!(q.push_piped(&MessageCodec::new(), 6, piped_record(0, piped(&[], 0))).is_err());
        assert!(q.is_empty());
        assert_eq!(q.frames(), 0);
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
