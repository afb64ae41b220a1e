//! A TCP proxy that can cut a service off, for the Pub/Sub emulator.
//!
//! The HTTP/1.1 fault proxy of the integration tests cannot carry the
//! Pub/Sub client's gRPC (HTTP/2). This one copies bytes: [`TcpProxy::cut`]
//! closes every connection through it and closes new ones at once, as if the
//! service had become unreachable; [`TcpProxy::restore`] lets connections
//! through again, [`TcpProxy::restore_http1`] only those that do not open
//! with the HTTP/2 preface (the REST calls, not the gRPC streams). The
//! emulator behind it keeps its state, so messages published during a cut
//! (directly to the emulator) are still there after it.
//!
//! It runs as tasks on the runtime of whoever starts it, and stops on drop.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Nothing gets through.
const CLOSED: u8 = 0;
/// Connections that do not begin with HTTP/2's preface get through.
const HTTP1: u8 = 1;
/// Everything gets through.
const OPEN: u8 = 2;

/// A proxy on `127.0.0.1:<free port>` in front of one upstream address.
pub struct TcpProxy {
    port: u16,
    /// [`CLOSED`], [`HTTP1`] or [`OPEN`].
    open: Arc<AtomicU8>,
    /// Bumped by every cut; connections end when it changes.
    cuts: watch::Sender<u64>,
    accepting: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Starts a proxy for `upstream` (`127.0.0.1:PORT`) on the current tokio
    /// runtime; `open` says whether connections get through from the start.
    pub fn start(upstream: &str, open: bool) -> Result<TcpProxy> {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .parse()
            .with_context(|| format!("the upstream address {upstream:?}"))?;
        let listener =
            std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the tcp proxy")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let listener = TcpListener::from_std(listener).context("registering the tcp proxy's listener")?;
        let open = Arc::new(AtomicU8::new(if open { OPEN } else { CLOSED }));
        let (cuts, _) = watch::channel(0u64);
        let accepting = tokio::spawn(accept(listener, upstream, open.clone(), cuts.clone()));
        Ok(TcpProxy {
            port,
            open,
            cuts,
            accepting,
        })
    }

    /// `127.0.0.1:PORT`, for `PUBSUB_EMULATOR_HOST`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Closes every connection and every new one until [`restore`](TcpProxy::restore).
    pub fn cut(&self) {
        self.open.store(CLOSED, Ordering::SeqCst);
        self.cuts.send_modify(|cuts| *cuts += 1);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.open.store(OPEN, Ordering::SeqCst);
    }

    /// Lets new connections through again unless they open with HTTP/2's preface.
    pub fn restore_http1(&self) {
        self.open.store(HTTP1, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accepting.abort();
        // Ends the connections too.
        self.cut();
    }
}

async fn accept(listener: TcpListener, upstream: SocketAddr, open: Arc<AtomicU8>, cuts: watch::Sender<u64>) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            continue;
        };
        let mode = open.load(Ordering::SeqCst);
        if mode == CLOSED {
            continue;
        }
        let mut cut = cuts.subscribe();
        tokio::spawn(async move {
            if mode == HTTP1 && opens_http2(&client).await {
                return;
            }
            let Ok(mut server) = TcpStream::connect(upstream).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = cut.changed() => {}
            }
        });
    }
}

/// Whether the client's first bytes are HTTP/2's preface (`PRI * HTTP/2.0`);
/// waits up to a second for them.
async fn opens_http2(client: &TcpStream) -> bool {
    let mut first = [0u8; 3];
    let peeked = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match client.peek(&mut first).await {
                Ok(read) if read > 0 && read < first.len() => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                other => return other,
            }
        }
    });
    matches!(peeked.await, Ok(Ok(3))) && &first == b"PRI"
}
