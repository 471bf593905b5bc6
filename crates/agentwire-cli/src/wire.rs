//! One connection's two directions: an inbox that reads frames and decodes
//! them, and an outbox that many tasks send through, written by one task.
//! Both count frames and bytes and may copy every frame, whole, to a capture.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use agentwire::{FrameCodec, Message, MessageCodec, RawMessage, RawMessageCodec, Rejected, StreamError};
use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;

use crate::addr::Stream;

/// Frames and bytes of one direction.
#[derive(Default, Debug)]
pub struct Count {
    /// Frames.
    pub frames: AtomicU64,
    /// Bytes, length prefixes included.
    pub bytes: AtomicU64,
}

impl Count {
    fn add(&self, bytes: usize) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// (frames, bytes) so far.
    pub fn get(&self) -> (u64, u64) {
        (self.frames.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed))
    }
}

/// Counters of both directions, as seen from this side.
#[derive(Default, Debug)]
pub struct Counters {
    /// What this side sent.
    pub sent: Count,
    /// What this side received.
    pub received: Count,
}

/// A file that gets every frame of both directions, whole, in the order this
/// side saw them: a byte stream that `agentwire inspect` reads back.
pub type Capture = Arc<Mutex<std::io::BufWriter<std::fs::File>>>;

fn capture_frame(capture: &Option<Capture>, bytes: &[&[u8]]) {
    if let Some(c) = capture {
        let mut w = c.lock().unwrap_or_else(|e| e.into_inner());
        for b in bytes {
            // A capture that cannot be written must not stop the session; it is checked at the end.
            let _ = w.write_all(b);
        }
    }
}

/// What an outbox carries.
pub enum Outgoing {
    /// A typed message.
    Message(Message),
    /// A message whose payload is already encoded (an unknown type, say).
    Raw(RawMessage),
    /// Answered once everything queued before it has been written.
    Flushed(tokio::sync::oneshot::Sender<()>),
}

/// The sending side of a connection; cheap to clone.
#[derive(Clone)]
pub struct Outbox(mpsc::Sender<Outgoing>);

/// The connection's writer has stopped.
#[derive(Debug)]
pub struct Closed;

impl Outbox {
    /// Queues a message.
    pub async fn send(&self, m: Message) -> Result<(), Closed> {
        self.0.send(Outgoing::Message(m)).await.map_err(|_| Closed)
    }

    /// Waits until everything queued so far has been written to the stream.
    pub async fn flushed(&self) -> Result<(), Closed> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.0.send(Outgoing::Flushed(tx)).await.map_err(|_| Closed)?;
        rx.await.map_err(|_| Closed)
    }

    /// Queues a raw message.
    pub async fn send_raw(&self, m: RawMessage) -> Result<(), Closed> {
        self.0.send(Outgoing::Raw(m)).await.map_err(|_| Closed)
    }
}

/// The receiving side of a connection.
pub struct Inbox {
    frames: FramedRead<ReadHalf<Stream>, FrameCodec>,
    messages: MessageCodec,
    counters: Arc<Counters>,
    capture: Option<Capture>,
}

impl Inbox {
    /// The next message or rejected frame; `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<Result<Result<Message, Rejected>, StreamError>> {
        let item = match self.frames.next().await? {
            Ok(item) => item,
            Err(e) => return Some(Err(e)),
        };
        let offset = self.frames.decoder().last_frame_offset();
        Some(Ok(match item {
            Ok(frame) => {
                let wire_len = frame.wire_len();
                self.counters.received.add(wire_len);
                let head = frame.header();
                capture_frame(&self.capture, &[&head, &frame.body]);
                self.messages.decode_frame(frame).map_err(|mut r| {
                    r.offset = offset;
                    r
                })
            }
            Err(oversized) => {
                self.counters.received.add(oversized.len as usize + agentwire::LENGTH_FIELD_SIZE);
                Err(Rejected::from(oversized))
            }
        }))
    }
}

/// Splits a stream into an inbox and an outbox whose writer runs as a task;
/// the task ends when every outbox clone is gone, after writing what was queued,
/// and shuts the stream's write side down.
pub fn split(
    stream: Stream,
    counters: Arc<Counters>,
    capture: Option<Capture>,
) -> (Inbox, Outbox, tokio::task::JoinHandle<std::io::Result<()>>) {
    let (read, write) = tokio::io::split(stream);
    let inbox = Inbox {
        frames: FramedRead::with_capacity(read, FrameCodec::new(), 256 * 1024),
        messages: MessageCodec::new(),
        counters: counters.clone(),
        capture: capture.clone(),
    };
    let (tx, rx) = mpsc::channel(256);
    let writer = tokio::spawn(write_loop(write, rx, counters, capture));
    (inbox, Outbox(tx), writer)
}

/// Encodes what is queued into one buffer and writes it with one call: a burst
/// of small frames costs one system call, and the socket is never written while
/// a frame is half-encoded.
async fn write_loop(
    mut write: WriteHalf<Stream>,
    mut rx: mpsc::Receiver<Outgoing>,
    counters: Arc<Counters>,
    capture: Option<Capture>,
) -> std::io::Result<()> {
    const BATCH: usize = 256 * 1024;
    let mut messages = MessageCodec::new();
    let mut raw = RawMessageCodec::new();
    let mut buf = BytesMut::with_capacity(BATCH);
    let mut flushed = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(out) = next.take() {
            let start = buf.len();
            let encoded = match out {
                Outgoing::Message(m) => messages.encode_message(&m, &mut buf),
                Outgoing::Raw(m) => raw.encode_raw(&m, &mut buf),
                Outgoing::Flushed(ack) => {
                    flushed.push(ack);
                    Ok(())
                }
            };
            match encoded {
                Ok(()) if buf.len() == start => {}
                Ok(()) => {
                    counters.sent.add(buf.len() - start);
                    capture_frame(&capture, &[&buf[start..]]);
                }
                // The frame is not sent: the one who queued it cannot be told any more, so say it here.
                Err(e) => eprintln!("agentwire: not sent: {e}"),
            }
            if buf.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        write.write_all(&buf).await?;
        write.flush().await?;
        buf.clear();
        for ack in flushed.drain(..) {
            let _ = ack.send(());
        }
    }
    write.shutdown().await
}
