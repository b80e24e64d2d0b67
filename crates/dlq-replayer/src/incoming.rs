//! The gRPC admin API's connections, held to the same `[http]` limits as the HTTP servers:
//! at most `max_connections` at once (each keeps its slot until it closes; more wait in the
//! listen backlog), and a connection that has not sent the whole HTTP/2 preface within
//! `header_read_timeout_ms` is closed before tonic ever sees it, so a half-opened
//! connection cannot hold a slot.

use enrich_common::config::HttpSettings;
use enrich_common::shutdown::Shutdown;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// What every HTTP/2 client sends first (RFC 9113, 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A connection that sent its preface, holding its slot; reads give the preface back
/// first.
pub struct Limited {
    stream: TcpStream,
    preface: usize,
    _slot: OwnedSemaphorePermit,
}

/// Accepts on `listener` until `shutdown`, within `limits`.
pub fn incoming(
    listener: TcpListener,
    limits: HttpSettings,
    shutdown: Shutdown,
) -> impl tokio_stream::Stream<Item = Result<Limited, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let max = limits.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(max));
    let preface_within = Duration::from_millis(limits.header_read_timeout_ms);
    tokio::spawn(async move {
        loop {
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => slot,
                () = shutdown.cancelled() => return,
            };
            let Ok(slot) = slot else { return };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = shutdown.cancelled() => return,
            };
            let mut stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a gRPC connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut first = [0u8; PREFACE.len()];
                match tokio::time::timeout(preface_within, stream.read_exact(&mut first)).await {
                    Ok(Ok(_)) if &first == PREFACE => {
                        let _ = tx.send(Ok(Limited { stream, preface: 0, _slot: slot })).await;
                    }
                    // Too slow, closed, or not HTTP/2: dropped, its slot freed.
                    _ => {}
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

impl AsyncRead for Limited {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.preface < PREFACE.len() {
            let rest = &PREFACE[self.preface..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.preface += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Limited {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Connected for Limited {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}
