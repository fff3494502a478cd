//! The HTTP server: hyper's HTTP/1.1 connections with the limits `axum::serve` does not
//! set, and a shutdown that ends on time whatever the clients do.
//!
//! - Headers must arrive within `--http-header-timeout-ms`, and an idle keep-alive
//!   connection waits at most as long for its next request (hyper starts the same
//!   timer whenever it waits for a request head).
//! - A body must arrive within `--http-body-timeout-ms` ([`super::http::AppJson`] reads
//!   it under [`HttpLimits`], found in the request's extensions).
//! - At most `--http-connections-max` connections are served at once; more wait in
//!   the kernel's accept queue.
//! - A client that does not read its answer for `--http-body-timeout-ms` (a write
//!   that makes no progress that long) loses its connection, so that it cannot hold a
//!   connection slot forever.
//! - A client that half-closes after sending its request still gets its answer
//!   (hyper's `half_close`): the write it asked for may have been committed.
//! - On shutdown the listener closes, requests in progress finish and get their
//!   answers, idle connections are closed; whatever is still open after
//!   `--shutdown-timeout-ms` is dropped.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use edge_outbox::retry::LogLimiter;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The limits of every connection, from the service's flags.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Time allowed for a request's headers, and for an idle connection's next request.
    pub header_timeout: Duration,
    /// Time allowed for a request's body.
    pub body_timeout: Duration,
    /// Connections served at once.
    pub connections_max: usize,
}

/// Serves `app` on `listener` until `shutdown` fires, then stops within `grace`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let app = app.layer(axum::Extension(limits));
    let permits = Arc::new(Semaphore::new(limits.connections_max.max(1)));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut accept_log = LogLimiter::new(Duration::from_secs(60));
    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: wait instead of spinning.
                    if let Some(suppressed) = accept_log.allow() {
                        tracing::warn!(error = %e, suppressed, "cannot accept an HTTP connection; retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .half_close(true)
            .serve_connection(
                TokioIo::new(WriteDeadline::new(stream, limits.body_timeout)),
                TowerToHyperService::new(app.clone()),
            );
        let conn = graceful.watch(conn);
        connections.spawn(async move {
            let _permit = permit;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "HTTP connections still open after --shutdown-timeout-ms: closing them"
        );
    }
    connections.shutdown().await;
}

/// A stream whose writes fail with `TimedOut` when one makes no progress for `limit`:
/// hyper has no write timeout, and a client that never reads would hold its
/// connection (and its slot under the cap) forever.
struct WriteDeadline<T> {
    inner: T,
    limit: Duration,
    /// Running while a write or flush is pending.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteDeadline<T> {
    fn new(inner: T, limit: Duration) -> WriteDeadline<T> {
        WriteDeadline {
            inner,
            limit,
            stalled: None,
        }
    }

    /// After the inner write returned `poll`: progress resets the deadline; a pending
    /// write starts it or fails once it has passed.
    fn check<R>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client has not read its answer within --http-body-timeout-ms",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
