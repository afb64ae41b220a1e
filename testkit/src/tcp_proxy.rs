//! A TCP proxy that can cut a service off, for the Pub/Sub emulator.
//!
//! The HTTP/1.1 fault proxy of the integration tests cannot carry the
//! Pub/Sub client's gRPC (HTTP/2). This one copies bytes: [`TcpProxy::cut`]
//! closes every connection through it and closes new ones at once, as if the
//! service had become unreachable; [`TcpProxy::restore`] lets connections
//! through again. The emulator behind it keeps its state, so messages
//! published during a cut (directly to the emulator) are still there after it.
//!
//! Runs on its own thread with its own tokio runtime, like the fault proxy,
//! and stops on drop.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, Result, anyhow};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A proxy on `127.0.0.1:<free port>` in front of one upstream address.
pub struct TcpProxy {
    port: u16,
    open: Arc<AtomicBool>,
    /// Bumped by every cut; connections end when it changes.
    cuts: watch::Sender<u64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TcpProxy {
    /// Starts a proxy for `upstream` (`127.0.0.1:PORT`); `open` says whether
    /// connections get through from the start.
    pub fn start(upstream: &str, open: bool) -> Result<TcpProxy> {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .parse()
            .with_context(|| format!("the upstream address {upstream:?}"))?;
        let listener =
            std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the tcp proxy")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let open = Arc::new(AtomicBool::new(open));
        let (cuts, _) = watch::channel(0u64);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the tcp proxy's runtime")?;
        let (thread_open, thread_cuts) = (open.clone(), cuts.clone());
        let (started, ready) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("tcp-proxy-{port}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(error) => {
                            let _ = started.send(Err(error));
                            return;
                        }
                    };
                    let _ = started.send(Ok(()));
                    tokio::select! {
                        _ = stopped => {}
                        () = accept(listener, upstream, thread_open, thread_cuts) => {}
                    }
                });
            })
            .context("spawning the tcp proxy's thread")?;
        match ready.recv() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(error).context("registering the tcp proxy's listener"),
            Err(_) => return Err(anyhow!("the tcp proxy's thread ended while starting")),
        }
        Ok(TcpProxy {
            port,
            open,
            cuts,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// `127.0.0.1:PORT`, for `PUBSUB_EMULATOR_HOST`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Closes every connection and every new one until [`restore`](TcpProxy::restore).
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|cuts| *cuts += 1);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    open: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if !open.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let mut cut = cuts.subscribe();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let (mut client, mut server) = (client, server);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = cut.changed() => {}
            }
        });
    }
}
