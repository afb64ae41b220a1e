//! A TCP proxy that can cut a service off, for the Pub/Sub emulator.
//!
//! The HTTP/1.1 fault proxy of the integration tests cannot carry the
//! Pub/Sub client's gRPC (HTTP/2). This one copies bytes: [`TcpProxy::cut`]
//! closes every connection through it and closes new ones at once, as if the
//! service had become unreachable; [`TcpProxy::restore`] lets connections
//! through again. The emulator behind it keeps its state, so messages
//! published during a cut (directly to the emulator) are still there after it.
//! [`TcpProxy::close_opened_before`] ends the older connections only.
//!
//! It runs as tasks on the runtime of whoever starts it, and stops on drop.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use anyhow::{Context as _, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A proxy on `127.0.0.1:<free port>` in front of one upstream address.
pub struct TcpProxy {
    port: u16,
    open: Arc<AtomicBool>,
    /// Connections accepted before this instant end.
    ends: watch::Sender<SystemTime>,
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
        let open = Arc::new(AtomicBool::new(open));
        let (ends, _) = watch::channel(SystemTime::UNIX_EPOCH);
        let accepting = tokio::spawn(accept(listener, upstream, open.clone(), ends.clone()));
        Ok(TcpProxy {
            port,
            open,
            ends,
            accepting,
        })
    }

    /// `127.0.0.1:PORT`, for `PUBSUB_EMULATOR_HOST`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Closes every connection and every new one until [`restore`](TcpProxy::restore).
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.close_opened_before(SystemTime::now());
    }

    /// Closes the connections accepted before `instant`; later ones go on.
    pub fn close_opened_before(&self, instant: SystemTime) {
        self.ends.send_if_modified(|before| {
            let later = instant > *before;
            if later {
                *before = instant;
            }
            later
        });
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accepting.abort();
        // Ends the connections too.
        self.cut();
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    open: Arc<AtomicBool>,
    ends: watch::Sender<SystemTime>,
) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            continue;
        };
        if !open.load(Ordering::SeqCst) {
            continue;
        }
        let accepted = SystemTime::now();
        let mut ends = ends.subscribe();
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(upstream).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = ends.wait_for(|before| *before > accepted) => {}
            }
        });
    }
}
