//! `sluice-agent run`: bring the agent up in an order that makes `/readyz` mean something,
//! serve until SIGTERM (or a `shutdown` request), then stop gracefully with redirection left
//! in place.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{signal::unix::SignalKind, sync::watch};
use tracing::{info, warn};

use crate::{
    agent::{Agent, AgentSettings},
    cli::RunArgs,
    cni_install, control, dataplane,
    dataplane::DataplaneConfig,
    http, k8s,
    metrics::Metrics,
    preflight,
    readiness::Readiness,
    reconcile::{self, Reconciler},
    state::StateStore,
    zds::{self, ConnConfig, Hub, RetryPolicy},
};

/// The agent's own namespace when `POD_NAMESPACE` is not set (Istio's default).
const DEFAULT_SYSTEM_NAMESPACE: &str = "istio-system";

pub async fn run(args: RunArgs, control_socket: std::path::PathBuf) -> anyhow::Result<()> {
    let kube_mode = args.kubernetes_mode();
    info!(
        node = args.node_name.as_deref().unwrap_or(""),
        mode = if kube_mode {
            "kubernetes"
        } else {
            "standalone"
        },
        "sluice agent starting"
    );
    let node_name = match (&args.node_name, kube_mode) {
        (Some(n), true) if !n.is_empty() => Some(n.clone()),
        (_, true) => {
            anyhow::bail!("Kubernetes mode needs this node's name: set NODE_NAME (or --node-name)")
        }
        (_, false) => None,
    };
    let metrics = Arc::new(Metrics::new());
    let hub = Hub::new(RetryPolicy {
        first: Duration::from_millis(args.zds_retry_ms.0),
        max: Duration::from_millis(args.zds_retry_ms.1),
    });
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readiness = Arc::new(Readiness::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();

    let cgroup = match &args.node.cgroup {
        Some(c) => c.clone(),
        None => dataplane::cgroup2_root().context("finding the cgroup2 mount")?,
    };
    // Everything the agent needs, checked before anything is touched.
    preflight::check(&args.node.pin_root, &cgroup)?;

    // One agent per node: during a rolling update the new agent waits here for the old one to
    // exit, before it binds the node's health and metrics ports (a hostNetwork pod that bound
    // first would crash-loop on "address in use").
    let state_dir = args.node.state_dir.clone();
    let store = tokio::task::spawn_blocking(move || StateStore::open(&state_dir))
        .await?
        .context("opening the state directory")?;

    // Health and metrics next: /readyz answers "not ready" while the state is restored.
    let health = http::bind(args.health_addr)
        .await
        .with_context(|| format!("binding {}", args.health_addr))?;
    tasks.spawn(http::serve_health(
        health,
        Arc::clone(&ready),
        Arc::clone(&readiness),
        stop_rx.clone(),
    ));
    let metrics_addr = SocketAddr::new(args.metrics_bind, args.metrics_port);
    let metrics_listener = http::bind(metrics_addr)
        .await
        .with_context(|| format!("binding {metrics_addr}"))?;
    tasks.spawn(http::serve_metrics(
        metrics_listener,
        Arc::clone(&metrics),
        stop_rx.clone(),
    ));

    let dp_config = DataplaneConfig {
        pin_root: args.node.pin_root.clone(),
        cgroup,
        accelerate: args.accelerate,
        ebpf_debug_log: tracing::enabled!(tracing::Level::DEBUG),
    };
    let system_namespace = args
        .pod_namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or(DEFAULT_SYSTEM_NAMESPACE);
    let policy = cni_install::setup::policy(&args.cni, kube_mode.then_some(system_namespace));
    if kube_mode && !args.cni.ambient_namespaces.is_empty() {
        warn!("--ambient-namespaces is ignored in Kubernetes mode: labels decide");
    }
    let settings = AgentSettings {
        dns_capture: args.dns_capture,
        ipv6: args.ipv6,
        ack_wait: Duration::from_millis(args.enroll_wait_ms),
        policy: policy.clone(),
    };
    let (h, m, r) = (Arc::clone(&hub), Arc::clone(&metrics), Arc::clone(&ready));
    let agent =
        tokio::task::spawn_blocking(move || Agent::start(&dp_config, store, settings, h, m, r))
            .await?
            .context("starting the agent")?;
    let kept = preflight::drop_capabilities().context("dropping capabilities")?;
    info!(
        capabilities = preflight::cap_names(&kept),
        "dropped every capability not needed from now on"
    );
    for logger in agent.take_ebpf_loggers() {
        tasks.spawn(forward_ebpf_logs(logger, stop_rx.clone()));
    }

    let zds_server = zds::Server::bind(&args.node.zds_socket).context("binding the ZDS socket")?;
    let mut control_server =
        control::server::Server::bind(&control_socket).context("binding the control socket")?;
    let conn_cfg = ConnConfig {
        ack_timeout: Duration::from_secs(args.zds_ack_timeout),
        ..Default::default()
    };
    // Kubernetes mode: the reconciler owns enrollment, CNI requests included.
    let kube = match node_name {
        Some(node) => {
            let client = match &args.kubeconfig {
                Some(path) => k8s::connect_with(path).await?,
                None => k8s::connect()
                    .await
                    .context("connecting to the Kubernetes API")?,
            };
            let mut settings = reconcile::Settings::new(node);
            settings.resync = Duration::from_secs(args.gc_interval.max(1));
            settings.cni_pod_lookup = Duration::from_millis(args.cni_pod_lookup_ms);
            let starting = Reconciler::setup(Arc::clone(&agent), client.clone(), settings)
                .context("setting up the reconciler")?;
            control_server = control_server.with_reconciler(Arc::clone(starting.reconciler()));
            Some((starting.run(stop_rx.clone()), client))
        }
        None => None,
    };
    let control_task =
        tokio::spawn(control_server.run(Arc::clone(&agent), stop_rx.clone(), stop_tx.clone()));
    if let Some((reconciler, _)) = &kube {
        // Before ztunnel gets its snapshot: the table must say what the cluster wants.
        info!("waiting for the Kubernetes caches, then reconciling every pod");
        reconciler
            .initial_sync()
            .await
            .context("watching Kubernetes")?;
    } else {
        tasks.spawn(gc_loop(
            Arc::clone(&agent),
            Duration::from_secs(args.gc_interval.max(1)),
            stop_rx.clone(),
        ));
    }
    let zds_task = tokio::spawn(zds_server.run(
        Arc::clone(&hub),
        conn_cfg,
        Arc::clone(&metrics),
        stop_rx.clone(),
    ));
    // Chained only once the agent can answer the plugin.
    if let Some(installer) =
        cni_install::setup::installer(&args.node, &args.cni, &policy, &control_socket)?
    {
        // Unmet until the installer's first pass (held here, before its task first runs).
        readiness.block(
            cni_install::watch::CONFIG_CONDITION,
            "the CNI installer has not run yet",
        );
        tasks.spawn(cni_install::watch::start(
            installer,
            Arc::clone(&readiness),
            stop_rx.clone(),
        ));
    }
    agent.set_ready();
    info!(control = %control_socket.display(), zds = %args.node.zds_socket.display(), "agent ready");
    if let Some((_, client)) = kube
        && !args.startup_taint.is_empty()
        && let Some(node) = args.node_name.clone()
    {
        tasks.spawn(remove_startup_taint(
            client,
            node,
            args.startup_taint.clone(),
            Arc::clone(&readiness),
            stop_rx.clone(),
        ));
    }

    wait_for_stop(stop_rx.clone()).await;
    info!(
        "stopping: no new requests; finishing in-flight ZDS requests; redirection stays in place"
    );
    agent.begin_shutdown();
    let _ = stop_tx.send(true);
    let grace = Duration::from_secs(args.zds_ack_timeout + 5);
    if tokio::time::timeout(grace, async {
        let _ = zds_task.await;
        let _ = control_task.await;
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        warn!("some tasks did not finish in time");
    }
    info!("agent stopped");
    Ok(())
}

async fn wait_for_stop(mut stop: watch::Receiver<bool>) {
    let mut term = tokio::signal::unix::signal(SignalKind::terminate()).ok();
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).ok();
    let sig = async {
        match (&mut term, &mut int) {
            (Some(t), Some(i)) => {
                tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
            }
            _ => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = sig => info!("signal received"),
        _ = crate::shutdown::stopped(&mut stop) => info!("shutdown requested"),
    }
}

/// Forwards what the eBPF programs log (debug level only) into our logs.
async fn forward_ebpf_logs(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd lives.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)?;
    loop {
        tokio::select! {
            _ = crate::shutdown::stopped(&mut stop) => return Ok(()),
            ready = fd.readable_mut() => {
                let mut guard = ready?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        }
    }
}

/// Removes the node's startup taint once nothing holds readiness back any more (the agent is
/// ready when this starts; the CNI entry may still be missing).
async fn remove_startup_taint(
    client: kube::Client,
    node: String,
    taint: String,
    readiness: Arc<Readiness>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let ready = async move { readiness.until_clear().await };
    tokio::select! {
        _ = crate::shutdown::stopped(&mut stop) => {}
        _ = k8s::node_taint::remove_when_ready(client, node, taint, ready) => {}
    }
    Ok(())
}

/// Lets go of pods whose netns vanished (the safety net for a missed unenroll).
async fn gc_loop(
    agent: Arc<Agent>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    loop {
        tokio::select! {
            _ = crate::shutdown::stopped(&mut stop) => return Ok(()),
            _ = tokio::time::sleep(every) => {
                agent.collect_vanished().await;
            }
        }
    }
}
