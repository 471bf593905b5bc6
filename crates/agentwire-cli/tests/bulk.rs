//! Generation-8 bulk file and TCP transfers with `agentwire agent`, driven by a raw
//! framed host over a Unix socket (spec 7): offers accepted as the deployed
//! guest fills them, records within credit in both directions, finish and
//! response in order, and each broken rule answered with a cancel and the
//! failed response.

mod common;

use std::time::Duration;

use agentwire::payload::bootstrap::GuestBootstrap;
use agentwire::payload::bulk::{
    BulkAccepted, BulkCancel, BulkCancelReason, BulkCredit, BulkFinish, BulkFlow, BulkKind, BulkOffer, BulkRecord,
    DEFAULT_BULK_WINDOW,
};
use agentwire::payload::core::InitAck;
use agentwire::payload::fs::{FsOp, FsOpenOptions, FsRequest, FsResponseData};
use agentwire::payload::tcp::TcpConnect;
use agentwire::{Message, MessageCodec, Payload};
use bytes::Bytes;
use common::RunningAgent as Agent;
use futures::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

type Conn = Framed<UnixStream, MessageCodec>;

async fn connect(agent: &Agent) -> Conn {
    let mut framed = Framed::new(UnixStream::connect(&agent.socket).await.unwrap(), MessageCodec::new());
    framed.send(Message::new(0, GuestBootstrap::default())).await.unwrap();
    assert_eq!(next(&mut framed).await.message_type().wire_name(), "core.init.resolved");
    framed.send(Message::new(0, InitAck::default())).await.unwrap();
    let ready = next(&mut framed).await;
    assert_eq!((ready.message_type().wire_name(), ready.version), ("core.ready", 10));
    framed
}

async fn next(framed: &mut Conn) -> Message {
    let item = tokio::time::timeout(Duration::from_secs(20), framed.next()).await.expect("a frame within 20 s");
    item.expect("the connection is open").expect("the stream is intact").expect("the frame decodes")
}

async fn open(framed: &mut Conn, id: u32, path: &str, options: FsOpenOptions) -> u64 {
    let op = FsOp::OpenFile { path: path.into(), options };
    framed.send(Message::new(id, FsRequest::new(op))).await.unwrap();
    match next(framed).await.payload {
        Payload::FsResponse(r) if r.ok => match r.data {
            Some(FsResponseData::Handle(h)) => h,
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 + i / 4096) as u8).collect()
}

fn offer_read(credit: u64) -> BulkOffer {
    BulkOffer { format: 1, max_record_payload: 65536, guest_to_host_credit_limit: credit }
}

#[tokio::test]
async fn a_bulk_read_goes_within_the_hosts_credit_then_finishes_and_answers() {
    let agent = Agent::start("bulk-read");
    let data = pattern(5 * 1024 * 1024 + 123);
    std::fs::write(agent.root().join("big.bin"), &data).unwrap();
    let mut c = connect(&agent).await;
    let h = open(&mut c, 1, "/big.bin", FsOpenOptions { read: true, ..Default::default() }).await;
    // 1 MiB of credit up front; more only as the host says it consumed.
    let req = FsRequest { op: FsOp::Read { handle: h, offset: 0, len: None }, bulk: Some(offer_read(1 << 20)) };
    c.send(Message::new(2, req)).await.unwrap();
    let accepted = match next(&mut c).await.payload {
        Payload::BulkAccepted(a) => a,
        other => panic!("the acceptance comes first: {other:?}"),
    };
    assert_eq!(
        accepted,
        BulkAccepted {
            kind: BulkKind::Filesystem,
            flows: 2,
            format: 1,
            max_record_payload: 65536,
            host_to_guest_credit_limit: 0,
            guest_to_host_credit_limit: 1 << 20
        }
    );
    let (mut got, mut limit) = (Vec::new(), 1u64 << 20);
    loop {
        // Nothing may pass the credit: wait a little for a frame that would.
        if got.len() as u64 == limit {
            let early = tokio::time::timeout(Duration::from_millis(300), c.next()).await;
            assert!(early.is_err(), "a frame came past the credit limit: {early:?}");
            limit += 1 << 20;
            let credit = BulkCredit {
                kind: BulkKind::Filesystem,
                flow: BulkFlow::GuestToHost,
                consumed_offset: got.len() as u64,
                credit_limit: limit,
            };
            c.send(Message::new(2, credit)).await.unwrap();
        }
        let m = next(&mut c).await;
        assert_eq!(m.id, 2);
        match m.payload {
            Payload::BulkRecord(r) => {
                assert_eq!((r.kind, r.flow, r.offset), (BulkKind::Filesystem, BulkFlow::GuestToHost, got.len() as u64));
                assert!(r.data.len() <= 65536 && got.len() as u64 + r.data.len() as u64 <= limit);
                got.extend_from_slice(&r.data);
            }
            Payload::BulkFinish(f) => {
                assert_eq!(f.final_offset, data.len() as u64);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(got == data, "the file arrives intact");
    assert!(matches!(next(&mut c).await.payload, Payload::FsResponse(r) if r.ok), "the response follows the finish");
}

#[tokio::test]
async fn a_bulk_write_is_credited_as_it_reaches_the_file_and_answered_after_the_finish() {
    let agent = Agent::start("bulk-write");
    let data = pattern(20 * 1024 * 1024 + 7);
    let mut c = connect(&agent).await;
    let options = FsOpenOptions { write: true, create: true, truncate: true, ..Default::default() };
    let h = open(&mut c, 1, "/up.bin", options).await;
    let offer = BulkOffer { format: 1, max_record_payload: 3 << 20, guest_to_host_credit_limit: 0 };
    let req = FsRequest { op: FsOp::Write { handle: h, offset: 0, len: Some(data.len() as u64) }, bulk: Some(offer) };
    c.send(Message::new(2, req)).await.unwrap();
    let accepted = match next(&mut c).await.payload {
        Payload::BulkAccepted(a) => a,
        other => panic!("{other:?}"),
    };
    assert_eq!((accepted.flows, accepted.host_to_guest_credit_limit), (1, DEFAULT_BULK_WINDOW));
    let (mut sent, mut limit, mut credits) = (0usize, accepted.host_to_guest_credit_limit, 0);
    while sent < data.len() {
        if sent as u64 == limit {
            match next(&mut c).await.payload {
                Payload::BulkCredit(cr) => {
                    assert!(cr.consumed_offset <= sent as u64 && cr.credit_limit > limit);
                    limit = cr.credit_limit;
                    credits += 1;
                }
                other => panic!("{other:?}"),
            }
            continue;
        }
        let n = (data.len() - sent).min(accepted.max_record_payload as usize).min((limit - sent as u64) as usize);
        let record = BulkRecord::new(
            BulkKind::Filesystem,
            BulkFlow::HostToGuest,
            sent as u64,
            Bytes::copy_from_slice(&data[sent..sent + n]),
        );
        c.send(Message::new(2, record)).await.unwrap();
        sent += n;
    }
    let finish = BulkFinish { kind: BulkKind::Filesystem, flow: BulkFlow::HostToGuest, final_offset: sent as u64 };
    c.send(Message::new(2, finish)).await.unwrap();
    loop {
        match next(&mut c).await.payload {
            Payload::BulkCredit(_) => credits += 1,
            Payload::FsResponse(r) => {
                assert!(r.ok, "{r:?}");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(credits >= 2, "20 MiB through an 8 MiB window needs credit: {credits}");
    assert!(std::fs::read(agent.root().join("up.bin")).unwrap() == data);
}

#[tokio::test]
async fn broken_bulk_rules_get_a_cancel_and_the_failed_response() {
    let agent = Agent::start("bulk-rules");
    std::fs::write(agent.root().join("f"), pattern(100_000)).unwrap();
    let mut c = connect(&agent).await;
    let h = open(&mut c, 1, "/f", FsOpenOptions { read: true, write: true, ..Default::default() }).await;
    // A record at the wrong offset.
    let offer = BulkOffer { format: 1, max_record_payload: 16384, guest_to_host_credit_limit: 0 };
    let req = FsRequest { op: FsOp::Write { handle: h, offset: 0, len: None }, bulk: Some(offer) };
    c.send(Message::new(2, req)).await.unwrap();
    assert!(matches!(next(&mut c).await.payload, Payload::BulkAccepted(_)));
    let wrong = BulkRecord::new(BulkKind::Filesystem, BulkFlow::HostToGuest, 5, Bytes::from_static(b"abc"));
    c.send(Message::new(2, wrong)).await.unwrap();
    match next(&mut c).await.payload {
        Payload::BulkCancel(BulkCancel { reason: BulkCancelReason::ProtocolViolation, message, .. }) => {
            assert!(message.contains("at 5 where 0"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(next(&mut c).await.payload, Payload::FsResponse(r) if !r.ok));
    // A host's cancel of a read: the failed response carries its message, and no cancel comes back.
    let req = FsRequest { op: FsOp::Read { handle: h, offset: 0, len: None }, bulk: Some(offer_read(16384)) };
    c.send(Message::new(3, req)).await.unwrap();
    assert!(matches!(next(&mut c).await.payload, Payload::BulkAccepted(_)));
    assert!(matches!(next(&mut c).await.payload, Payload::BulkRecord(r) if r.data.len() == 16384));
    let cancel =
        BulkCancel { kind: BulkKind::Filesystem, reason: BulkCancelReason::CallerCancelled, message: "enough".into() };
    c.send(Message::new(3, cancel)).await.unwrap();
    match next(&mut c).await.payload {
        Payload::FsResponse(r) => assert_eq!((r.ok, r.error.as_deref()), (false, Some("enough"))),
        other => panic!("{other:?}"),
    }
    // An offer on another operation, an invalid offer, and one at generation 7: refused with the reason.
    let stat = FsRequest { op: FsOp::Stat { path: "/f".into(), follow_symlink: true }, bulk: Some(offer_read(16384)) };
    c.send(Message::new(4, stat)).await.unwrap();
    assert!(
        matches!(next(&mut c).await.payload, Payload::FsResponse(r) if !r.ok && r.error.as_deref().unwrap_or("").contains("only for Read and Write"))
    );
    let bad = FsRequest { op: FsOp::Read { handle: h, offset: 0, len: None }, bulk: Some(offer_read(0)) };
    c.send(Message::new(5, bad)).await.unwrap();
    assert!(
        matches!(next(&mut c).await.payload, Payload::FsResponse(r) if !r.ok && r.error.as_deref().unwrap_or("").contains("credit"))
    );
    let old = FsRequest { op: FsOp::Read { handle: h, offset: 0, len: None }, bulk: Some(offer_read(16384)) };
    c.send(Message::new(6, old).with_version(7)).await.unwrap();
    assert!(
        matches!(next(&mut c).await.payload, Payload::FsResponse(r) if !r.ok && r.error.as_deref().unwrap_or("").contains("generation 8"))
    );
    // Without an offer, the same read is generation 7's: fs.data chunks, then the response.
    let plain = FsRequest::new(FsOp::Read { handle: h, offset: 0, len: Some(10) });
    c.send(Message::new(7, plain)).await.unwrap();
    assert!(matches!(next(&mut c).await.payload, Payload::FsData(d) if d.data.len() == 10));
    assert!(matches!(next(&mut c).await.payload, Payload::FsResponse(r) if r.ok));
}

#[tokio::test]
async fn a_bulk_tcp_connection_moves_records_both_ways_within_credit_and_closes_after_both_finishes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An echo server on loopback.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 65536];
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).await.unwrap();
        }
        s.shutdown().await.unwrap();
    });
    let agent = Agent::start("bulk-tcp");
    let mut c = connect(&agent).await;
    // 64 KiB of guest-to-host credit up front.
    let offer = BulkOffer { format: 1, max_record_payload: 1 << 20, guest_to_host_credit_limit: 65536 };
    let mut connect = TcpConnect::new("127.0.0.1", port);
    connect.bulk = Some(offer);
    c.send(Message::new(3, connect)).await.unwrap();
    assert!(matches!(next(&mut c).await.payload, Payload::TcpConnected(_)));
    let accepted = match next(&mut c).await.payload {
        Payload::BulkAccepted(a) => a,
        other => panic!("{other:?}"),
    };
    assert_eq!((accepted.kind, accepted.flows, accepted.max_record_payload), (BulkKind::Tcp, 3, 256 * 1024));
    assert_eq!(accepted.guest_to_host_credit_limit, 65536);
    let data = pattern(3 * 1024 * 1024);
    let (mut sent, mut send_limit) = (0usize, accepted.host_to_guest_credit_limit);
    let (mut got, mut recv_limit, mut their_finish) = (Vec::new(), 65536u64, false);
    let mut our_finish_sent = false;
    loop {
        // Send what the credit allows.
        while sent < data.len() && (sent as u64) < send_limit {
            let n =
                (data.len() - sent).min(accepted.max_record_payload as usize).min((send_limit - sent as u64) as usize);
            let r = BulkRecord::new(
                BulkKind::Tcp,
                BulkFlow::HostToGuest,
                sent as u64,
                Bytes::copy_from_slice(&data[sent..sent + n]),
            );
            c.send(Message::new(3, r)).await.unwrap();
            sent += n;
        }
        if sent == data.len() && !our_finish_sent {
            let f = BulkFinish { kind: BulkKind::Tcp, flow: BulkFlow::HostToGuest, final_offset: sent as u64 };
            c.send(Message::new(3, f)).await.unwrap();
            our_finish_sent = true;
        }
        let m = next(&mut c).await;
        match m.payload {
            Payload::BulkRecord(r) => {
                assert_eq!((r.flow, r.offset), (BulkFlow::GuestToHost, got.len() as u64));
                assert!(r.offset + r.data.len() as u64 <= recv_limit, "past our credit");
                got.extend_from_slice(&r.data);
                // Grant more once half of it is used.
                if recv_limit - got.len() as u64 <= 32768 {
                    recv_limit = got.len() as u64 + 65536;
                    let credit = BulkCredit {
                        kind: BulkKind::Tcp,
                        flow: BulkFlow::GuestToHost,
                        consumed_offset: got.len() as u64,
                        credit_limit: recv_limit,
                    };
                    c.send(Message::new(3, credit)).await.unwrap();
                }
            }
            Payload::BulkCredit(cr) => {
                assert_eq!(cr.flow, BulkFlow::HostToGuest);
                send_limit = send_limit.max(cr.credit_limit);
            }
            Payload::BulkFinish(f) => {
                assert_eq!((f.flow, f.final_offset), (BulkFlow::GuestToHost, got.len() as u64));
                their_finish = true;
            }
            Payload::TcpClosed(_) => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(their_finish, "the guest's finish precedes core.tcp.closed");
    assert!(got == data, "the echo arrives intact: {} of {} bytes", got.len(), data.len());
}
