//! `core.tcp.*`: a TCP connection opened by the agent for the host, to
//! loopback destinations unless the agent was started with `--allow-net`.

use std::time::Duration;

use std::sync::Arc;

use agentwire::payload::tcp::{TcpClosed, TcpConnect, TcpConnected, TcpData, TcpEof, TcpFailed};
use agentwire::{Message, Payload};
use agentwire_session::driver::Route;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
                run(req, allow_net, route).await
            }
        })
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_CHUNK: usize = 64 * 1024;

/// Runs one `core.tcp.connect` to its end: `core.tcp.closed` once both
/// halves are closed, `core.tcp.failed`, or nothing after the host's
/// `core.tcp.close` (as the deployed agent).
async fn run(req: TcpConnect, allow_net: bool, mut route: Route) {
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
    let addrs: Vec<_> =
        tokio::net::lookup_host((req.host.as_str(), req.port)).await.map_err(|e| format!("{target}: {e}"))?.collect();
    if !allow_net && let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        return Err(format!(
            "{target} resolves to {}, which is not loopback; the agent reaches other hosts only with --allow-net",
            a.ip()
        ));
    }
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
