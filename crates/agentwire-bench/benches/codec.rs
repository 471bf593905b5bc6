//! Criterion benchmarks: agentwire against the deployed reference,
//! `microsandbox-protocol` 0.6.14 (`ref6`, generation 7) and 0.7.13 (`ref7`,
//! generation 10), and against the codec a user would otherwise write
//! (`baseline`), all measured in the same run, plus `memcpy` of the same bytes
//! as the physical reference for bulk data.
//!
//! The reference is driven through its public API as an application does
//! (`support/reference.rs`): encode is `Message::with_payload` and
//! `codec::encode_to_buf`; decode is its streaming decoder on a fresh read
//! buffer and `Message::payload`. Its frames equal ours byte for byte (checked
//! before measuring; 0.6.14 writes `v = 7`, the rest `v = 10`).
//!
//! The baseline (`support/baseline.rs`): `tokio_util::codec::LengthDelimitedCodec`
//! for framing, the id and flags as the first five bytes of its frame, and the
//! envelope and the payload each serialized through ciborium's serde path into
//! a `Vec`.
//!
//! ```text
//! cargo bench --bench codec                 # full run (about 2.5 minutes here)
//! cargo bench --bench codec -- --quick      # quick mode (under a minute)
//! python3 benches/report.py                 # the table of medians and ratios
//! ```

use std::hint::black_box;
use std::time::Duration;

mod support;

use agentwire::payload::core::Ready;
use agentwire::payload::exec::{ExecExited, ExecRequest, ExecRlimit, ExecStdout};
use agentwire::payload::fs::FsData;
use agentwire::{Frame, FrameCodec, Message, MessageCodec, Payload, TypedPayload};
use bytes::{BufMut, Bytes, BytesMut};
use criterion::{BatchSize, BenchmarkGroup, Criterion, criterion_group, criterion_main, measurement::WallTime};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use support::baseline::{baseline_codec, baseline_decode, baseline_encode};
use support::reference::{convert, decode_ref6, decode_ref7, encode_ref6, encode_ref7, r6, r7};
use tokio_util::codec::{Decoder, Encoder};

fn wire(m: &Message) -> Bytes {
    let mut b = BytesMut::new();
    MessageCodec::new().encode_message(m, &mut b).unwrap();
    b.freeze()
}

/// Inputs of small messages are made, and the results dropped, 64 at a time.
///
/// With criterion's `SmallInput` a batch is a tenth of a sample's iterations,
/// up to tens of thousands here, and every result is kept until its batch
/// ends: each decode's allocation then reuses a block freed that many
/// allocations earlier, cold in cache. That costs agentwire, which allocates
/// once a decode and frees nothing, about 40 ns a `core.ready` decode, and
/// the baseline nothing measurable, since it frees and reuses two of its own
/// allocations in every decode (`examples/batch_effect.rs` measures both;
/// BENCHMARKS.md has the figures). An application that decodes and drops
/// messages reuses warm blocks, as batches of 64 do.
const SMALL_BATCH: BatchSize = BatchSize::NumIterations(64);

/// A fresh input buffer holding `frame`, with its first bytes read once.
///
/// A streaming decoder has the header in cache when it decodes a frame (it
/// arrived first and was looked at then). Copying a large frame into a new
/// buffer evicts its own beginning, and without this read a 1 MiB decode
/// measures that cache miss, not the decoder (about 190 ns here, measured
/// both ways: see BENCHMARKS.md). Both codecs get the same inputs.
fn fresh_input(frame: &[u8]) -> BytesMut {
    let src = BytesMut::from(frame);
    black_box(src.iter().take(64).fold(0u8, |a, &b| a ^ b));
    src
}

/// [`fresh_input`] as the `Vec` that 0.6.14's streaming decoder reads from.
fn fresh_vec(frame: &[u8]) -> Vec<u8> {
    let src = frame.to_vec();
    black_box(src.iter().take(64).fold(0u8, |a, &b| a ^ b));
    src
}

/// The reference's message types of one of our types, in 0.6.14 and 0.7.13.
type RefTypes = (r6::MessageType, r7::MessageType);

/// Encode and decode of one message type: ours, 0.6.14's, 0.7.13's and the baseline's.
///
/// Decoding takes a fresh input buffer each time (made outside the timing).
/// For bulk data that buffer is made right before each decode
/// (`BatchSize::PerIteration`), so that it is as warm in cache as the memcpy it
/// is compared with; small inputs are made in batches of 64 ([`SMALL_BATCH`]).
/// `also` are other inputs agentwire decodes (the first frame of each) right
/// after this one, each under its own name, so that they are measured back to
/// back, in the same state of a shared machine.
/// `R6` and `R7` are the reference's payload types, `(t6, t7)` its message types.
fn encode_decode<T, R6, R7>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    value: T,
    (t6, t7): RefTypes,
    batch: BatchSize,
    also: &[(&str, Bytes)],
) where
    T: TypedPayload + Clone + Serialize + DeserializeOwned + 'static,
    R6: Serialize + DeserializeOwned + Debug,
    R7: Serialize + DeserializeOwned + Debug,
{
    let t = T::MESSAGE_TYPE;
    let message = Message::new(7, value.clone());
    let frame = wire(&message);
    let mut base = baseline_codec();
    let mut dst = BytesMut::new();
    baseline_encode(&mut base, 7, t.flags().bits(), t.wire_name(), &value, &mut dst);
    assert_eq!(&dst[..], &frame[..], "the baseline writes the same bytes");
    let mut dst = BytesMut::with_capacity(frame.len() * 2);

    // The reference's equal values and its frames: 0.6.14's is ours at v = 7.
    let v6: R6 = convert(&value);
    let v7: R7 = convert(&value);
    let frame6 = wire(&message.clone().with_version(7));
    let mut out6 = Vec::with_capacity(frame.len() * 2);
    encode_ref6(t6, 7, &v6, &mut out6);
    assert_eq!(out6[..], frame6[..], "0.6.14 writes the same bytes");
    let mut out7 = Vec::with_capacity(frame.len() * 2);
    encode_ref7(t7, 7, &v7, &mut out7);
    assert_eq!(out7[..], frame[..], "0.7.13 writes the same bytes");

    let mut codec = MessageCodec::new();
    group.bench_function("encode/agentwire", |b| {
        b.iter(|| {
            dst.clear();
            codec.encode_message(black_box(&message), &mut dst).unwrap();
        })
    });
    group.bench_function("encode/baseline", |b| {
        b.iter(|| {
            dst.clear();
            baseline_encode(&mut base, 7, t.flags().bits(), t.wire_name(), black_box(&value), &mut dst);
        })
    });
    group.bench_function("encode/ref6", |b| {
        b.iter(|| {
            out6.clear();
            encode_ref6(t6, 7, black_box(&v6), &mut out6);
        })
    });
    group.bench_function("encode/ref7", |b| {
        b.iter(|| {
            out7.clear();
            encode_ref7(t7, 7, black_box(&v7), &mut out7);
        })
    });

    let mut decode_ours = |name: &str, frame: &[u8], batch: BatchSize| {
        group.bench_function(name, |b| {
            b.iter_batched(
                || fresh_input(frame),
                |mut src| {
                    let m = codec.decode(&mut src).unwrap().unwrap().unwrap();
                    (src, m)
                },
                batch,
            )
        });
    };
    decode_ours("decode/agentwire", &frame, batch);
    for (name, input) in also {
        decode_ours(name, input, batch);
    }
    group.bench_function("decode/baseline", |b| {
        b.iter_batched(
            || fresh_input(&frame),
            |mut src| {
                let m: (u32, u8, T) = baseline_decode(&mut base, &mut src).unwrap();
                (src, m)
            },
            batch,
        )
    });
    group.bench_function("decode/ref6", |b| {
        b.iter_batched(
            || fresh_vec(&frame6),
            |mut src| {
                let m: (r6::Message, R6) = decode_ref6(&mut src);
                (src, m)
            },
            batch,
        )
    });
    group.bench_function("decode/ref7", |b| {
        b.iter_batched(
            || fresh_input(&frame),
            |mut src| {
                let m: (r7::Message, R7) = decode_ref7(&mut src);
                (src, m)
            },
            batch,
        )
    });
}

fn ready(c: &mut Criterion) {
    let mut g = c.benchmark_group("ready");
    let value = Ready {
        boot_time_ns: 1_234_567_890,
        init_time_ns: 45_678_901,
        ready_time_ns: 1_300_000_000,
        agent_version: "agentwire 0.1.0".into(),
        capabilities: None,
    };
    let types = (r6::MessageType::Ready, r7::MessageType::Ready);
    encode_decode::<_, r6::core::Ready, r7::core::Ready>(&mut g, value, types, SMALL_BATCH, &[]);
    g.finish();
}

fn exited(c: &mut Criterion) {
    let mut g = c.benchmark_group("exited");
    let types = (r6::MessageType::ExecExited, r7::MessageType::ExecExited);
    encode_decode::<_, r6::exec::ExecExited, r7::exec::ExecExited>(
        &mut g,
        ExecExited { code: 42 },
        types,
        SMALL_BATCH,
        &[],
    );
    g.finish();
}

fn exec_request(c: &mut Criterion) {
    let mut g = c.benchmark_group("exec_request");
    let value = ExecRequest {
        args: vec!["-c".into(), "make -j2 test".into()],
        env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into(), "HOME=/root".into(), "TERM=xterm".into()],
        cwd: Some("/workspace".into()),
        rlimits: vec![ExecRlimit { resource: "nofile".into(), soft: 1024, hard: 4096 }],
        ..ExecRequest::new("/bin/sh")
    };
    let types = (r6::MessageType::ExecRequest, r7::MessageType::ExecRequest);
    encode_decode::<_, r6::exec::ExecRequest, r7::exec::ExecRequest>(&mut g, value, types, SMALL_BATCH, &[]);
    g.finish();
}

/// Encode and decode of one data frame of `size` bytes, and memcpy of the same bytes.
fn bulk<T, R6, R7>(c: &mut Criterion, name: &str, size: usize, types: RefTypes, make: fn(Bytes) -> T)
where
    T: TypedPayload + Clone + Serialize + DeserializeOwned + 'static,
    R6: Serialize + DeserializeOwned + Debug,
    R7: Serialize + DeserializeOwned + Debug,
{
    let mut g = c.benchmark_group(name);
    g.throughput(criterion::Throughput::Bytes(size as u64));
    let data = Bytes::from((0..size).map(|i| (i * 7) as u8).collect::<Vec<u8>>());
    let mut also = Vec::new();
    if name == "fs_data_1m" {
        // The same decode of a 100-byte chunk: decode cost must not grow with
        // the data. Once from a buffer of its own, and once at the start of a
        // buffer that also holds the 1 MiB frame, so that making the input
        // copies as many bytes, and leaves the caches as cold, as for the
        // 1 MiB decode (BENCHMARKS.md, "Methodology").
        let small = wire(&Message::new(7, make(data.slice(..100))));
        let big = wire(&Message::new(7, make(data.clone())));
        also.push(("decode_100b/agentwire", small.clone()));
        also.push(("decode_100b_before_1m/agentwire", [small, big].concat().into()));
    }
    // The physical reference first, right before the encode it is compared with.
    let mut copy = vec![0u8; size];
    g.bench_function("memcpy", |b| b.iter(|| copy.copy_from_slice(black_box(&data))));
    encode_decode::<T, R6, R7>(&mut g, make(data.clone()), types, BatchSize::PerIteration, &also);
    g.finish();
}

fn stdout_64k(c: &mut Criterion) {
    let types = (r6::MessageType::ExecStdout, r7::MessageType::ExecStdout);
    bulk::<_, r6::exec::ExecStdout, r7::exec::ExecStdout>(c, "stdout_64k", 64 * 1024, types, |data| ExecStdout {
        data,
    });
}

fn fs_data_1m(c: &mut Criterion) {
    let types = (r6::MessageType::FsData, r7::MessageType::FsData);
    bulk::<_, r6::fs::FsData, r7::fs::FsData>(c, "fs_data_1m", 1024 * 1024, types, |data| FsData { data });
}

fn fs_data_3m(c: &mut Criterion) {
    let types = (r6::MessageType::FsData, r7::MessageType::FsData);
    bulk::<_, r6::fs::FsData, r7::fs::FsData>(c, "fs_data_3m", 3 * 1024 * 1024, types, |data| FsData { data });
}

/// Raw bulk records (generation 8) of 16 KiB, 256 KiB and 3 MiB against the
/// reference 0.7.13's own bulk codec in the same run, and memcpy of the data:
/// encode whole (header and one copy of the data), encode of the header alone
/// (for a vectored write that copies nothing), and decode (a view of the
/// frame: its cost must not grow with the data). 0.6.14 (generation 7) has no
/// bulk lane; its way to move file data is `core.fs.data`, measured in the
/// `fs_data_*` groups.
fn bulk_record(c: &mut Criterion) {
    use agentwire::codec::bulk_record_header;
    use agentwire::payload::bulk::{BulkFlow, BulkKind, BulkRecord};
    for (name, size) in [("bulk_record_16k", 16 * 1024), ("bulk_record_256k", 256 * 1024), ("bulk_record_3m", 3 << 20)]
    {
        let mut g = c.benchmark_group(name);
        g.throughput(criterion::Throughput::Bytes(size as u64));
        let data = Bytes::from((0..size).map(|i| (i * 7) as u8).collect::<Vec<u8>>());
        let record = BulkRecord::new(BulkKind::Filesystem, BulkFlow::GuestToHost, 1 << 40, data.clone());
        let message = Message::new(7, record.clone());
        let theirs = ref7::bulk::BulkRecord {
            id: 7,
            kind: ref7::bulk::BulkKind::Filesystem,
            flow: ref7::bulk::BulkFlow::GuestToHost,
            offset: 1 << 40,
            payload: data.clone(),
        };
        let frame = wire(&message);
        let mut reference = Vec::new();
        ref7::codec::encode_bulk_to_buf(&theirs, &mut reference).unwrap();
        assert_eq!(&reference[..], &frame[..], "the reference writes the same bytes");

        // Both encoders, and the memcpy they are compared with, write into the
        // same allocation (a `BytesMut`, then the `Vec` made of it without a
        // copy), the data at the same place (after the 21-byte header): where
        // the data lands relative to a cache line changes a copy's speed by a
        // third at 16 KiB, and separate allocations would give each different luck.
        let mut codec = MessageCodec::new();
        let mut dst = BytesMut::with_capacity(frame.len() * 2);
        let at = dst.as_ptr();
        g.bench_function("encode/agentwire", |b| {
            b.iter(|| {
                dst.clear();
                codec.encode_message(black_box(&message), &mut dst).unwrap();
            })
        });
        let mut vec = Vec::from(dst);
        assert_eq!(vec.as_ptr(), at, "the same allocation");
        let header = agentwire::codec::BULK_WIRE_HEADER;
        vec.resize(header + size, 0);
        g.bench_function("memcpy", |b| b.iter(|| vec[header..].copy_from_slice(black_box(&data))));
        g.bench_function("encode/ref7", |b| {
            b.iter(|| {
                vec.clear();
                ref7::codec::encode_bulk_to_buf(black_box(&theirs), &mut vec).unwrap();
            })
        });
        g.bench_function("encode_header/agentwire", |b| {
            b.iter(|| bulk_record_header(7, black_box(&record), agentwire::MAX_FRAME_SIZE).unwrap())
        });
        g.bench_function("encode_header/ref7", |b| {
            b.iter(|| ref7::codec::encode_bulk_header(black_box(&theirs)).unwrap())
        });
        g.bench_function("decode/agentwire", |b| {
            b.iter_batched(
                || fresh_input(&frame),
                |mut src| {
                    let m = codec.decode(&mut src).unwrap().unwrap().unwrap();
                    (src, m)
                },
                BatchSize::PerIteration,
            )
        });
        g.bench_function("decode/ref7", |b| {
            b.iter_batched(
                || fresh_input(&frame),
                |mut src| {
                    let m = ref7::codec::try_decode_frame_from_bytes(&mut src).unwrap().unwrap();
                    (src, m)
                },
                BatchSize::PerIteration,
            )
        });
        g.finish();
    }
}

/// Decoding a buffer of `frames` stdout frames of 100 bytes each, to typed payloads.
///
/// agentwire's two stream lengths are measured back to back, then the
/// baseline's and the reference's, so that the ratio of the two lengths, a
/// target of its own, is taken in one state of a shared machine.
///
/// 0.7.13 reads with its cursor decoder (`try_decode_from_bytes`, which
/// advances the `BytesMut`). 0.6.14's streaming decoder (`try_decode_from_buf`)
/// drains each frame from the front of its `Vec`, moving the rest of the buffer
/// every frame: quadratic in the frames held (about 10^11 bytes moved for the
/// 100,000-frame buffer), so it is given its borrowed decoder instead,
/// `decode_message_frame`, with the offset kept by the caller: its best case.
/// Its stream carries `v = 7`, as a generation-7 writer's does.
fn stream(c: &mut Criterion) {
    let mut g = c.benchmark_group("stream");
    g.sample_size(10);
    let streams: Vec<(usize, Bytes)> = [10_000usize, 100_000]
        .into_iter()
        .map(|frames| {
            let mut buf = BytesMut::new();
            let mut codec = MessageCodec::new();
            for i in 0..frames {
                let data = Bytes::from(vec![(i % 251) as u8; 100]);
                codec.encode(Message::new(i as u32, ExecStdout { data }), &mut buf).unwrap();
            }
            (frames, buf.freeze())
        })
        .collect();
    for (frames, stream) in &streams {
        let frames = *frames;
        g.throughput(criterion::Throughput::Elements(frames as u64));
        g.bench_function(format!("{frames}/agentwire"), |b| {
            b.iter_batched(
                || BytesMut::from(&stream[..]),
                |mut src| {
                    let mut codec = MessageCodec::new();
                    let mut bytes = 0;
                    while let Some(item) = codec.decode(&mut src).unwrap() {
                        if let Payload::ExecStdout(o) = item.unwrap().payload {
                            bytes += o.data.len();
                        }
                    }
                    assert_eq!(bytes, frames * 100);
                    src
                },
                BatchSize::LargeInput,
            )
        });
    }
    for (frames, stream) in &streams {
        let frames = *frames;
        g.throughput(criterion::Throughput::Elements(frames as u64));
        g.bench_function(format!("{frames}/baseline"), |b| {
            b.iter_batched(
                || BytesMut::from(&stream[..]),
                |mut src| {
                    let mut codec = baseline_codec();
                    let mut bytes = 0;
                    while let Some((_, _, o)) = baseline_decode::<ExecStdout>(&mut codec, &mut src) {
                        bytes += o.data.len();
                    }
                    assert_eq!(bytes, frames * 100);
                    src
                },
                BatchSize::LargeInput,
            )
        });
    }
    for (frames, stream) in &streams {
        let frames = *frames;
        // The same frames at v = 7.
        let mut stream6 = BytesMut::new();
        let mut codec = MessageCodec::new();
        for i in 0..frames {
            let data = Bytes::from(vec![(i % 251) as u8; 100]);
            codec.encode(Message::new(i as u32, ExecStdout { data }).with_version(7), &mut stream6).unwrap();
        }
        let stream6 = stream6.to_vec();
        g.throughput(criterion::Throughput::Elements(frames as u64));
        g.bench_function(format!("{frames}/ref6"), |b| {
            b.iter_batched(
                || stream6.clone(),
                |src| {
                    let (mut at, mut bytes) = (0, 0);
                    while at < src.len() {
                        let len = 4 + u32::from_be_bytes(src[at..at + 4].try_into().unwrap()) as usize;
                        let m = ref6::codec::decode_message_frame(&src[at..at + len]).unwrap();
                        bytes += m.payload::<r6::exec::ExecStdout>().unwrap().data.len();
                        at += len;
                    }
                    assert_eq!(bytes, frames * 100);
                    src
                },
                BatchSize::LargeInput,
            )
        });
        g.bench_function(format!("{frames}/ref7"), |b| {
            b.iter_batched(
                || BytesMut::from(&stream[..]),
                |mut src| {
                    let mut bytes = 0;
                    while let Some(m) = ref7::codec::try_decode_from_bytes(&mut src).unwrap() {
                        bytes += m.payload::<r7::exec::ExecStdout>().unwrap().data.len();
                    }
                    assert_eq!(bytes, frames * 100);
                    src
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

/// What a relay does with a 64 KiB frame: read the header, cut the frame out,
/// write it to the client's buffer.
///
/// The reference's equivalent is its CBOR-blind raw frame path, the same in
/// both versions: `codec::try_decode_raw_from_buf` (which copies the body into a
/// `RawFrame` of its own and drains the read `Vec`) and `codec::encode_raw_to_buf`.
fn relay(c: &mut Criterion) {
    let mut g = c.benchmark_group("relay");
    let size = 64 * 1024;
    g.throughput(criterion::Throughput::Bytes(size as u64));
    let frame = wire(&Message::new(9, ExecStdout { data: Bytes::from(vec![3u8; size]) }));
    let mut codec = FrameCodec::new();
    let mut out = BytesMut::with_capacity(frame.len() * 2);
    g.bench_function("decode_encode/agentwire", |b| {
        b.iter_batched(
            || fresh_input(&frame),
            |mut src| {
                let f: Frame = codec.decode(&mut src).unwrap().unwrap().unwrap();
                out.clear();
                codec.encode_frame(&f, &mut out).unwrap();
                (src, f)
            },
            BatchSize::PerIteration,
        )
    });
    let mut copy = vec![0u8; frame.len()];
    g.bench_function("memcpy", |b| b.iter(|| copy.copy_from_slice(black_box(&frame))));
    let mut base = baseline_codec();
    g.bench_function("decode_encode/baseline", |b| {
        b.iter_batched(
            || fresh_input(&frame),
            |mut src| {
                let f = base.decode(&mut src).unwrap().unwrap();
                out.clear();
                out.reserve(4 + f.len());
                out.put_u32(f.len() as u32);
                out.put_slice(&f);
                (src, f)
            },
            BatchSize::PerIteration,
        )
    });
    let mut out = Vec::with_capacity(frame.len() * 2);
    g.bench_function("decode_encode/ref6", |b| {
        b.iter_batched(
            || fresh_vec(&frame),
            |mut src| {
                let f = ref6::codec::try_decode_raw_from_buf(&mut src).unwrap().unwrap();
                out.clear();
                ref6::codec::encode_raw_to_buf(&f, &mut out).unwrap();
                (src, f)
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("decode_encode/ref7", |b| {
        b.iter_batched(
            || fresh_vec(&frame),
            |mut src| {
                let f = ref7::codec::try_decode_raw_from_buf(&mut src).unwrap().unwrap();
                out.clear();
                ref7::codec::encode_raw_to_buf(&f, &mut out).unwrap();
                (src, f)
            },
            BatchSize::PerIteration,
        )
    });
    // Empty when a filter left the group out.
    assert!(out.is_empty() || out[..] == frame[..], "the reference relays the frame unchanged");
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = ready, stdout_64k, fs_data_1m, fs_data_3m, stream, relay, exited, exec_request, bulk_record
}
criterion_main!(benches);
