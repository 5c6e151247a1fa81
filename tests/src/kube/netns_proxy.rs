//! A TCP forwarder from loopback inside a network namespace to the test's own loopback: how an
//! agent that runs in a test's node namespace reaches the API server, which listens on the
//! host's loopback (nothing is ever routed between the two). A test can also drop every
//! connection through it at once: a watch cut mid-stream, as a broken connection would.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
};

use anyhow::{Context, Result};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::harness::run_in_netns;

pub struct NetnsProxy {
    port: u16,
    cut: watch::Sender<u64>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl NetnsProxy {
    /// Listens on `127.0.0.1:<port>` in `netns` and forwards each connection to `target`.
    /// The proxy's own threads stay in the caller's (the host's) namespace, so the outbound
    /// side reaches `target`; the listening socket keeps the namespace it was made in.
    pub fn start(netns: &Path, target: SocketAddr) -> Result<NetnsProxy> {
        let listener = run_in_netns(netns, || {
            std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        })??;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("netns-proxy")
            .enable_all()
            .build()
            .context("the proxy's runtime")?;
        let (cut, cut_rx) = watch::channel(0u64);
        runtime.spawn(async move {
            let Ok(listener) = TcpListener::from_std(listener) else {
                return;
            };
            while let Ok((inbound, _)) = listener.accept().await {
                tokio::spawn(forward(inbound, target, cut_rx.clone()));
            }
        });
        Ok(NetnsProxy {
            port,
            cut,
            runtime: Some(runtime),
        })
    }

    /// The port on the namespace's loopback.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes every connection open now (new ones are forwarded as before).
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

async fn forward(mut inbound: TcpStream, target: SocketAddr, mut cut: watch::Receiver<u64>) {
    // Target down: the client sees its connection closed at once, as with a refused one.
    let Ok(mut outbound) = TcpStream::connect(target).await else {
        return;
    };
    cut.borrow_and_update();
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
        _ = cut.changed() => {}
    }
}

impl Drop for NetnsProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            // Allowed from inside another runtime, unlike a plain drop.
            rt.shutdown_background();
        }
    }
}
