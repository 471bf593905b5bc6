//! `core.tcp.*`: a TCP connection opened by the agent for the host, to
//! loopback destinations unless the agent was started with `--allow-net`.

use std::time::Duration;

use agentwire::Message;
use agentwire::payload::tcp::{TcpClosed, TcpConnect, TcpConnected, TcpData, TcpEof, TcpFailed};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::Input;
use crate::wire::Outbox;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_CHUNK: usize = 64 * 1024;

/// Runs one `core.tcp.connect` to its `core.tcp.closed` or `core.tcp.failed`.
pub async fn run(id: u32, req: TcpConnect, allow_net: bool, out: Outbox, input: mpsc::Receiver<Input>) {
    let end = match relay(id, &req, allow_net, &out, input).await {
        Ok(true) => Message::new(id, TcpClosed {}),
        Ok(false) => return,
        Err(error) => Message::new(id, TcpFailed { error }),
    };
    let _ = out.send(end).await;
}

/// Ok(true) when the connection ended, Ok(false) when the agent's connection went away.
async fn relay(
    id: u32,
    req: &TcpConnect,
    allow_net: bool,
    out: &Outbox,
    mut input: mpsc::Receiver<Input>,
) -> Result<bool, String> {
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
    if out.send(Message::new(id, TcpConnected {})).await.is_err() {
        return Ok(false);
    }
    let (mut rd, mut wr) = stream.into_split();
    let (mut their_eof, mut our_eof) = (false, false);
    let mut buf = BytesMut::new();
    while !(their_eof && our_eof) {
        buf.reserve(READ_CHUNK);
        tokio::select! {
            read = rd.read_buf(&mut buf), if !their_eof => {
                let frame = match read.map_err(|e| format!("{target}: {e}"))? {
                    0 => { their_eof = true; Message::new(id, TcpEof {}) }
                    _ => Message::new(id, TcpData { data: buf.split().freeze() }),
                };
                if out.send(frame).await.is_err() {
                    return Ok(false);
                }
            }
            next = input.recv() => match next {
                Some(Input::TcpData(data)) => wr.write_all(&data).await.map_err(|e| format!("{target}: {e}"))?,
                Some(Input::TcpEof) => {
                    our_eof = true;
                    wr.shutdown().await.map_err(|e| format!("{target}: {e}"))?;
                }
                Some(Input::TcpClose) => break,
                Some(_) => {}
                None => return Ok(false),
            },
        }
    }
    Ok(true)
}
