//! HTTP endpoints: health on `:8000` (`/healthz`, `/readyz`) and Prometheus metrics on
//! `:15014/metrics`, the ports istio-cni uses.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio::{net::TcpListener, sync::watch};
use tracing::info;

use crate::metrics::Metrics;

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// `/healthz`: the process is alive. `/readyz`: dataplane loaded, state restored, sockets
/// listening, and not stopping.
pub async fn serve_health(
    listener: TcpListener,
    ready: Arc<AtomicBool>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(ready);
    info!(addr = %listener.local_addr()?, "health endpoint listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(stopped(shutdown))
        .await
}

async fn readyz(State(ready): State<Arc<AtomicBool>>) -> impl IntoResponse {
    if ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render))
        .with_state(metrics);
    info!(addr = %listener.local_addr()?, "metrics endpoint listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(stopped(shutdown))
        .await
}

async fn render(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    // A scrape reads eBPF maps and counters (syscalls): off the async workers.
    let body = tokio::task::spawn_blocking(move || metrics.encode())
        .await
        .unwrap_or_default();
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
}

async fn stopped(mut shutdown: watch::Receiver<bool>) {
    let _ = crate::shutdown::stopped(&mut shutdown).await;
}
