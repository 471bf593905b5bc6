//! `core.tcp.*`: a TCP connection opened by the agent for the host, to
//! loopback destinations unless the agent was started with `--allow-net`.

use std::time::Duration;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use agentwire::payload::bulk::{BulkAccepted, BulkFlow, BulkKind, DEFAULT_BULK_WINDOW};
use agentwire::payload::tcp::{TcpClosed, TcpConnect, TcpConnected, TcpData, TcpEof, TcpFailed};
use agentwire::{Message, Payload};
use agentwire_session::bulk::{BulkOperation, BulkReceiver, BulkSender, BulkViolation};
use agentwire_session::driver::Route;
use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::fs::violation;
use crate::{Defaults, Service, SessionTask};

/// `core.tcp.*`: connections to loopback destinations, or anywhere with `allow_net`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpService {
    /// Whether destinations beyond loopback may be reached.
    pub allow_net: bool,
}

impl Service for TcpService {
    fn serve(&self, request: Message, route: Route, _: Arc<Defaults>) -> SessionTask {
        let allow_net = self.allow_net;
        Box::pin(async move {
            if let Payload::TcpConnect(req) = request.payload {
                run(*req, request.version, allow_net, route).await
            }
        })
    }
}

/// How long a connect may take (as the deployed agent).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const READ_CHUNK: usize = 64 * 1024;

/// The addresses to try for `host:port`. Without `allow_net` nothing leaves
/// the machine, DNS included: an address must be loopback, and the only name
/// is `localhost` (resolved here, not asked of a resolver).
async fn destinations(host: &str, port: u16, allow_net: bool) -> Result<Vec<SocketAddr>, String> {
    let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if let Ok(ip) = literal.parse::<IpAddr>() {
        if !allow_net && !ip.is_loopback() {
            return Err(format!("{ip} is not loopback; the agent reaches other hosts only with --allow-net"));
        }
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    if !allow_net {
        if name == "localhost" || name.ends_with(".localhost") {
            return Ok(vec![
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port),
            ]);
        }
        return Err(format!(
            "{host} is a name, and without --allow-net the agent resolves none but localhost (no DNS query was sent)"
        ));
    }
    let found = tokio::net::lookup_host((host, port)).await.map_err(|e| e.to_string())?;
    Ok(found.collect())
}

/// Runs one `core.tcp.connect` to its end: `core.tcp.closed` once both
/// halves are closed, `core.tcp.failed`, or nothing after the host's
/// `core.tcp.close` (as the deployed agent). `version` is the request's `v`:
/// a bulk offer needs 8.
async fn run(req: TcpConnect, version: u8, allow_net: bool, mut route: Route) {
    if req.bulk.is_some() && version < 8 {
        let error = format!("a bulk offer needs generation 8; the request is generation {version}");
        return drop(route.send(TcpFailed { error }).await);
    }
    let end: Payload = match relay(&req, allow_net, &mut route).await {
        Ok(true) => TcpClosed {}.into(),
        Ok(false) => return,
        Err(error) => TcpFailed { error }.into(),
    };
    let _ = route.send(end).await;
}

/// Ok(true) when both halves closed; Ok(false) when the host closed the
/// connection or went away (nothing is owed then).
async fn relay(req: &TcpConnect, allow_net: bool, route: &mut Route) -> Result<bool, String> {
    let target = format!("{}:{}", req.host, req.port);
    let addrs = destinations(&req.host, req.port, allow_net).await.map_err(|e| format!("{target}: {e}"))?;
    let mut last = format!("{target}: no address");
    let mut stream = None;
    for a in addrs {
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                stream = Some(s);
                break;
            }
            Ok(Err(e)) => last = format!("{target} ({a}): {e}"),
            Err(_) => last = format!("{target} ({a}): no answer within {CONNECT_TIMEOUT:?}"),
        }
    }
    let stream = stream.ok_or(last)?;
    let _ = stream.set_nodelay(true);
    if route.send(TcpConnected {}).await.is_err() {
        return Ok(false);
    }
    if let Some(offer) = &req.bulk {
        // An offer is checked once the connection is up, as the deployed agent does.
        let accepted = BulkOperation::Tcp.accept(offer).map_err(|e| format!("{target}: {e}"))?;
        return relay_bulk(stream, accepted, &target, route).await;
    }
    let (mut rd, mut wr) = stream.into_split();
    let out = route.sender();
    let (mut their_eof, mut our_eof) = (false, false);
    let mut buf = BytesMut::new();
    while !(their_eof && our_eof) {
        buf.reserve(READ_CHUNK);
        tokio::select! {
            read = rd.read_buf(&mut buf), if !their_eof => {
                let frame: Payload = match read.map_err(|e| format!("{target}: {e}"))? {
                    0 => { their_eof = true; TcpEof {}.into() }
                    _ => TcpData { data: buf.split().freeze() }.into(),
                };
                if out.send(frame).await.is_err() {
                    return Ok(false);
                }
            }
            next = route.recv() => match next.map(|m| m.payload) {
                // An empty data frame is not an end of file (spec 10.6).
                Some(Payload::TcpData(d)) => wr.write_all(&d.data).await.map_err(|e| format!("{target}: {e}"))?,
                Some(Payload::TcpEof(_)) => {
                    our_eof = true;
                    wr.shutdown().await.map_err(|e| format!("{target}: {e}"))?;
                }
                Some(Payload::TcpClose(_)) | None => return Ok(false),
                Some(_) => {}
            },
        }
    }
    Ok(true)
}

/// [`relay`] over raw records (spec 7.4): `core.bulk.accepted`, records and
/// credits both ways, each side's `core.bulk.finish` in place of `core.tcp.eof`.
/// The socket is read only as far as the host's credit allows, and the
/// host's records are credited as they are written to the socket.
async fn relay_bulk(
    stream: TcpStream,
    accepted: BulkAccepted,
    target: &str,
    route: &mut Route,
) -> Result<bool, String> {
    if route.send(accepted).await.is_err() {
        return Ok(false);
    }
    let kind = BulkKind::Tcp;
    let max = accepted.max_record_payload;
    let mut tx = BulkSender::new(kind, BulkFlow::GuestToHost, max, accepted.guest_to_host_credit_limit);
    let window = DEFAULT_BULK_WINDOW;
    let mut rx = BulkReceiver::new(kind, BulkFlow::HostToGuest, max, accepted.host_to_guest_credit_limit, window);
    let (mut rd, mut wr) = stream.into_split();
    // Read into spare room here, each record's bytes split off as they are
    // (no copy); the room left over serves the next read.
    let mut buf = BytesMut::new();
    let (mut their_eof, mut our_eof) = (false, false);
    while !(their_eof && our_eof) {
        let window = tx.window();
        if !their_eof && window > 0 {
            buf.reserve(window);
        }
        let mut room = (&mut buf).limit(window.max(1));
        tokio::select! {
            read = rd.read_buf(&mut room), if !their_eof && window > 0 => {
                match read.map_err(|e| format!("{target}: {e}"))? {
                    0 => {
                        their_eof = true;
                        if route.send(tx.finish()).await.is_err() {
                            return Ok(false);
                        }
                    }
                    n => {
                        debug_assert_eq!(room.get_ref().len(), n);
                        let record = tx.record(room.get_mut().split().freeze()).map_err(|v| v.to_string())?;
                        if route.send(record).await.is_err() {
                            return Ok(false);
                        }
                    }
                }
            }
            next = route.recv() => match next.map(|m| m.payload) {
                Some(Payload::BulkRecord(r)) => {
                    if let Err(v) = rx.record(&r) {
                        return Err(violation(route, v).await);
                    }
                    wr.write_all(&r.data).await.map_err(|e| format!("{target}: {e}"))?;
                    if let Some(credit) = rx.consumed(r.data.len())
                        && route.send(credit).await.is_err()
                    {
                        return Ok(false);
                    }
                }
                Some(Payload::BulkCredit(c)) => {
                    if let Err(v) = tx.credit(&c) {
                        return Err(violation(route, v).await);
                    }
                }
                Some(Payload::BulkFinish(f)) => {
                    if let Err(v) = rx.finish(&f) {
                        return Err(violation(route, v).await);
                    }
                    our_eof = true;
                    wr.shutdown().await.map_err(|e| format!("{target}: {e}"))?;
                }
                // The host's cancel ends it with the failure carrying its message.
                Some(Payload::BulkCancel(c)) => return Err(c.message),
                Some(Payload::TcpData(_) | Payload::TcpEof(_)) => {
                    let reason = "CBOR tcp data on a connection whose data goes as bulk records".to_string();
                    return Err(violation(route, BulkViolation { kind, flow: BulkFlow::HostToGuest, reason }).await);
                }
                Some(Payload::TcpClose(_)) | None => return Ok(false),
                Some(_) => {}
            },
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_allow_net_no_name_but_localhost_is_resolved() {
        let refused = destinations("example.com", 80, false).await.unwrap_err();
        assert!(refused.contains("no DNS query was sent"), "{refused}");
        let refused = destinations("192.0.2.1", 80, false).await.unwrap_err();
        assert!(refused.contains("not loopback"), "{refused}");
        let local = destinations("LocalHost.", 7, false).await.unwrap();
        assert!(local.iter().all(|a| a.ip().is_loopback() && a.port() == 7), "{local:?}");
        assert_eq!(destinations("[::1]", 9, false).await.unwrap(), vec!["[::1]:9".parse().unwrap()]);
        assert_eq!(destinations("127.0.0.2", 9, false).await.unwrap(), vec!["127.0.0.2:9".parse().unwrap()]);
    }
}
