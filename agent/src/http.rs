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

use crate::{metrics::Metrics, readiness::Readiness};

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// `/healthz`: the process is alive. `/readyz`: dataplane loaded, state restored, sockets
/// listening, not stopping, and no unmet `readiness` condition (listed in the body).
pub async fn serve_health(
    listener: TcpListener,
    ready: Arc<AtomicBool>,
    readiness: Arc<Readiness>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state((ready, readiness));
    info!(addr = %listener.local_addr()?, "health endpoint listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(stopped(shutdown))
        .await
}

async fn readyz(
    State((ready, readiness)): State<(Arc<AtomicBool>, Arc<Readiness>)>,
) -> impl IntoResponse {
    let blockers = readiness.blockers();
    if !ready.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_string())
    } else if !blockers.is_empty() {
        let body = format!("not ready\n{}\n", blockers.join("\n"));
        (StatusCode::SERVICE_UNAVAILABLE, body)
    } else {
        (StatusCode::OK, "ready\n".to_string())
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
