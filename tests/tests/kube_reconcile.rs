//! Kubernetes-driven enrollment, end to end: the real agent in Kubernetes mode against a real
//! kube-apiserver v1.20.2 and etcd, pods that are real network namespaces with real processes
//! in kubelet-named cgroups, the ztunnel-like peer over ZDS, and the real `sluice-cni`.
//!
//! One API server is shared by every test here (a libtest-mimic main starts it before and
//! stops it after them); each test has its own node name, namespaces and agent. Outages, which
//! need a server of their own, are in `kube_reconcile_outage.rs`.
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    events::v1::Event as K8sEvent,
};
use kube::{
    Api, Client, ResourceExt as _,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::{Value, json};
use sluice_agent::k8s::{
    annotate::{REDIRECTION_ANNOTATION, reason},
    node_taint::DEFAULT_STARTUP_TAINT,
    policy::{
        BYPASS_INBOUND_ANNOTATION, DATAPLANE_MODE_LABEL, DNS_CAPTURE_ANNOTATION, MODE_AMBIENT,
        MODE_NONE, SIDECAR_CONTAINER, SIDECAR_STATUS_ANNOTATION,
    },
};
use sluice_tests::{
    cni_runtime::{PluginOutput, cni_bin, exec_plugin},
    harness::{ip, require_root},
    kube::{
        KubeServer,
        objects::{
            PodShape, create_namespace, create_node, create_pod, eventually, force_delete_pod,
            label_namespace, name, set_pod_status,
        },
    },
    kube_node::{KubeNode, NodeOptions, apply_agent_rbac},
    zds::{ZdsPeer, ZdsPeerOptions},
};

const TESTKIT: &str = env!("CARGO_BIN_EXE_sluice-testkit");
const WAIT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    sluice_tests::kube::shared::run(
        sluice_tests::kube_tests![
            labelling_a_namespace_enrolls_its_running_pods_live,
            pod_labels_every_exclusion_and_per_pod_options,
            cni_add_for_a_pod_the_cache_has_not_seen_yet,
            a_pod_deleted_while_being_enrolled,
            the_proc_scan_refuses_a_netns_without_the_pods_ips,
            the_startup_taint_is_removed_only_once_ready,
            a_restart_finds_moved_namespaces_and_drops_vanished_ones,
        ],
        require_root,
        start_server,
    )
}

async fn start_server() -> Result<Option<KubeServer>> {
    let Some(server) = KubeServer::start().await? else {
        return Ok(None);
    };
    apply_agent_rbac(&server.client().await?).await?;
    Ok(Some(server))
}

fn node(server: &KubeServer, opts: NodeOptions) -> Result<KubeNode> {
    KubeNode::start(server, Path::new(TESTKIT), opts)
}

fn peer(node: &KubeNode) -> Result<ZdsPeer> {
    node.fx.zds_peer(&ZdsPeerOptions::default())
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

async fn annotation(client: &Client, ns: &str, pod: &str) -> Result<Option<String>> {
    let p = Api::<Pod>::namespaced(client.clone(), ns).get(pod).await?;
    Ok(p.annotations().get(REDIRECTION_ANNOTATION).cloned())
}

/// Waits until the pod's `ambient.istio.io/redirection` annotation is `want` (None: absent).
async fn wait_annotation(client: &Client, ns: &str, pod: &str, want: Option<&str>) -> Result<()> {
    eventually(
        &format!("{ns}/{pod}'s annotation to be {want:?}"),
        WAIT,
        || async move {
            let got = annotation(client, ns, pod).await?;
            Ok((got.as_deref() == want).then_some(()))
        },
    )
    .await
}

/// Polls the agent's status (a CLI call each time) until `check` yields a value.
async fn wait_status<T>(
    node: &KubeNode,
    what: &str,
    check: impl Fn(&Value) -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + WAIT;
    loop {
        let status = node.status()?;
        if let Some(v) = check(&status) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!(
                "timed out after {WAIT:?} waiting for {what}; status: {}",
                serde_json::to_string_pretty(&status["kubernetes"]).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn enrolled_entry(status: &Value, uid: &str) -> Option<Value> {
    status["pods"]
        .as_array()?
        .iter()
        .find(|p| p["uid"] == uid)
        .cloned()
}

fn report_entry(status: &Value, uid: &str) -> Option<Value> {
    status["kubernetes"]["pods"]
        .as_array()?
        .iter()
        .find(|p| p["uid"] == uid)
        .cloned()
}

/// Waits until the reconciler's report on `uid` says `state` (and `reason`, if given) for
/// a decision made with `namespace_version` of its namespace (so: after that change).
async fn wait_report(
    node: &KubeNode,
    uid: &str,
    state: &str,
    reason: Option<&str>,
    namespace_version: Option<&str>,
) -> Result<Value> {
    wait_status(node, &format!("{uid} to be {state} ({reason:?})"), |s| {
        let r = report_entry(s, uid)?;
        let ok = r["state"] == state
            && reason.is_none_or(|want| r["reason"] == want)
            && namespace_version.is_none_or(|v| r["namespace_version"] == v);
        ok.then_some(r)
    })
    .await
}

async fn namespace_version(client: &Client, ns: &str) -> Result<String> {
    Api::<Namespace>::all(client.clone())
        .get(ns)
        .await?
        .resource_version()
        .context("a namespace without resourceVersion")
}

/// The peer proxied a connection of pod `uid` in `direction` to `dst`.
fn peer_saw(direction: &'static str, uid: String, dst: SocketAddr) -> impl Fn(&Value) -> bool {
    move |e| {
        e["event"] == direction
            && e["uid"] == uid
            && e["orig_dst"].as_str().and_then(|s| s.parse().ok()) == Some(dst)
    }
}

/// The connection reached the server directly: the server saw the client's own socket.
fn direct(r: &sluice_tests::harness::ConnectResult) -> Result<()> {
    r.ensure_ok()?;
    ensure!(
        r.banner_peer() == r.sockname,
        "not direct: the server saw {:?}, the client is {:?}",
        r.banner_peer(),
        r.sockname
    );
    Ok(())
}

/// Labelling a namespace enrolls its running pods without restarting them (a connection held
/// from before keeps working); their traffic goes through the peer, which got the Adds; the
/// annotation says `enabled`. Unlabelling undoes all of it.
async fn labelling_a_namespace_enrolls_its_running_pods_live(
    server: Arc<KubeServer>,
) -> Result<()> {
    let admin = server.client().await?;
    let mut node = node(&server, NodeOptions::new(3))?;
    let peer = peer(&node)?;
    let (ns, other) = (name("live"), name("plain"));
    create_namespace(&admin, &ns, &[]).await?;
    create_namespace(&admin, &other, &[]).await?;
    let shape = PodShape::default();
    let client = uid(&node.run_pod(&admin, 0, &ns, "client", &shape).await?);
    let server_pod = uid(&node.run_pod(&admin, 1, &ns, "server", &shape).await?);
    let bystander = uid(&node.run_pod(&admin, 2, &other, "bystander", &shape).await?);
    node.app(1).listen(8080)?;
    let dst = sa(node.fx.topo.pod(1).ipv4, 8080);
    let pids: Vec<u32> = (0..3).map(|i| node.app(i).pid()).collect();

    // Seen, and left alone.
    for u in [&client, &server_pod, &bystander] {
        wait_report(&node, u, "skipped", Some("not-ambient"), None).await?;
    }
    direct(&node.app(0).connect(dst, Some("before"))?)?;
    node.app(0).hold("held", dst)?.ensure_ok()?;

    label_namespace(&admin, &ns, DATAPLANE_MODE_LABEL, Some(MODE_AMBIENT)).await?;
    for u in [&client, &server_pod] {
        peer.wait_zds("add", Some(u), WAIT)?;
    }
    wait_annotation(&admin, &ns, "client", Some("enabled")).await?;
    wait_annotation(&admin, &ns, "server", Some("enabled")).await?;

    let r = node.app(0).connect(dst, Some("after"))?;
    r.ensure_ok()?;
    ensure!(
        r.banner_peer().map(|a| a.ip()) == Some(node.fx.topo.pod(0).ipv4.into()),
        "the server sees the client's address: {r:?}"
    );
    peer.wait_event(peer_saw("outbound", client.clone(), dst), WAIT)?;
    peer.wait_event(peer_saw("inbound", server_pod.clone(), dst), WAIT)?;
    // Nothing was restarted: the same processes, and the connection made before still works.
    for (i, pid) in pids.iter().enumerate() {
        ensure!(node.app(i).pid() == *pid && Path::new(&format!("/proc/{pid}")).exists());
    }
    let echo = node.app(0).ping("held", "still there")?;
    ensure!(
        echo.ok && echo.echo.as_deref() == Some("still there"),
        "{echo:?}"
    );
    let status = node.status()?;
    ensure!(enrolled_entry(&status, &bystander).is_none());
    ensure!(annotation(&admin, &other, "bystander").await?.is_none());

    label_namespace(&admin, &ns, DATAPLANE_MODE_LABEL, None).await?;
    for (u, pod) in [(&client, "client"), (&server_pod, "server")] {
        peer.wait_event(
            |e| e["event"] == "workload_stopped" && e["uid"] == **u,
            WAIT,
        )?;
        wait_annotation(&admin, &ns, pod, None).await?;
    }
    wait_status(&node, "no pod enrolled", |s| {
        (s["pods"].as_array().is_some_and(|p| p.is_empty())).then_some(())
    })
    .await?;
    ensure!(node.map_used("SL_PODS")? == 0);
    direct(&node.app(0).connect(dst, Some("unlabelled"))?)?;
    ensure!(peer.violations().is_empty(), "{:?}", peer.violations());
    Ok(())
}

/// (topology index, namespace, pod name, shape, expected: `Ok` enrolled, `Err(skip reason)`)
type Case<'a> = (usize, &'a str, &'a str, PodShape<'a>, Result<(), &'a str>);

/// Pod-level opt-in and `none` opt-out, every exclusion, and the per-pod options (their
/// effect on traffic, and a change applied in place, without re-enrolling).
async fn pod_labels_every_exclusion_and_per_pod_options(server: Arc<KubeServer>) -> Result<()> {
    let admin = server.client().await?;
    let (ambient, plain, system, excluded) =
        (name("amb"), name("plain"), name("sys"), name("excl"));
    let mut node = node(
        &server,
        NodeOptions {
            args: vec![
                "--pod-namespace".into(),
                system.clone(),
                "--exclude-namespaces".into(),
                format!("{excluded},other"),
            ],
            ..NodeOptions::new(13)
        },
    )?;
    let peer = peer(&node)?;
    let mode = [(DATAPLANE_MODE_LABEL, MODE_AMBIENT)];
    for ns in [&ambient, &system, &excluded] {
        create_namespace(&admin, ns, &mode).await?;
    }
    create_namespace(&admin, &plain, &[]).await?;
    match create_namespace(&admin, "kube-system", &[]).await {
        Ok(_) => {}
        Err(e) if format!("{e:#}").contains("already exists") => {}
        Err(e) => return Err(e),
    }
    label_namespace(
        &admin,
        "kube-system",
        DATAPLANE_MODE_LABEL,
        Some(MODE_AMBIENT),
    )
    .await?;

    let d = PodShape::default();
    let kube_system_pod = name("ks");
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        (0, &plain, "client", d.clone(), Err("not-ambient")),
        (1, &plain, "opted-in", PodShape { labels: &mode, ..d.clone() }, Ok(())),
        (2, &ambient, "opted-out", PodShape { labels: &[(DATAPLANE_MODE_LABEL, MODE_NONE)], ..d.clone() }, Err("opted-out")),
        (3, &ambient, "host-network", PodShape { host_network: true, ..d.clone() }, Err("host-network")),
        (4, &ambient, "sidecar-status", PodShape { annotations: &[(SIDECAR_STATUS_ANNOTATION, "{}")], ..d.clone() }, Err("sidecar")),
        (5, &ambient, "sidecar-container", PodShape { containers: &["app", SIDECAR_CONTAINER], ..d.clone() }, Err("sidecar")),
        (6, &system, "ztunnel-x", PodShape { labels: &[("app", "ztunnel")], ..d.clone() }, Err("ztunnel")),
        (7, "kube-system", &kube_system_pod, d.clone(), Err("excluded-namespace")),
        (8, &excluded, "excluded", d.clone(), Err("excluded-namespace")),
        (9, &ambient, "bypass", PodShape { annotations: &[(BYPASS_INBOUND_ANNOTATION, "true")], ..d.clone() }, Ok(())),
        (10, &ambient, "no-dns", PodShape { annotations: &[(DNS_CAPTURE_ANNOTATION, "false")], ..d.clone() }, Ok(())),
        (11, &ambient, "plain-enrolled", d.clone(), Ok(())),
        (12, &ambient, "terminal", d.clone(), Err("terminal")),
    ];
    let mut uids = Vec::new();
    for (i, ns, pod, shape, _) in &cases {
        if *pod == "terminal" {
            // Its processes ran and ended: never Running as far as the agent can tell.
            let p = create_pod(&admin, ns, pod, &node.name, shape).await?;
            node.start_processes(*i, &uid(&p))?;
            let ips = node.fx.topo.pod(*i).ips();
            uids.push(uid(
                &set_pod_status(&admin, ns, pod, "Succeeded", &ips).await?
            ));
            continue;
        }
        uids.push(uid(&node.run_pod(&admin, *i, ns, pod, shape).await?));
    }
    for ((i, ns, pod, _, want), u) in cases.iter().zip(&uids) {
        let version = namespace_version(&admin, ns).await?;
        match want {
            Ok(()) => {
                wait_annotation(&admin, ns, pod, Some("enabled")).await?;
                peer.wait_zds("add", Some(u), WAIT)?;
            }
            Err(why) => {
                // Decided with the namespace as labelled now; nothing done about it.
                wait_report(&node, u, "skipped", Some(why), Some(&version))
                    .await
                    .with_context(|| format!("pod {i} ({pod})"))?;
                ensure!(
                    annotation(&admin, ns, pod).await?.is_none(),
                    "{pod} annotated"
                );
            }
        }
    }
    let status = node.status()?;
    let enrolled: Vec<&String> = cases
        .iter()
        .zip(&uids)
        .filter(|(c, u)| c.4.is_ok() && enrolled_entry(&status, u).is_some())
        .map(|(_, u)| u)
        .collect();
    ensure!(
        enrolled.len() == 4 && status["pods"].as_array().map(Vec::len) == Some(4),
        "exactly the four wanted pods: {}",
        status["pods"]
    );
    let entry = |i: usize| enrolled_entry(&status, &uids[i]).expect("enrolled");
    ensure!(entry(9)["bypass_inbound"] == true && entry(9)["dns_capture"] == true);
    ensure!(entry(10)["dns_capture"] == false && entry(10)["bypass_inbound"] == false);
    ensure!(entry(11)["dns_capture"] == true && entry(11)["bypass_inbound"] == false);

    // Their effect: inbound to the bypassing pod is direct, to the plain one through the peer.
    let client = node.app(0);
    for i in [9, 11] {
        node.app(i).listen(8080)?;
    }
    let to_bypass = sa(node.fx.topo.pod(9).ipv4, 8080);
    direct(&client.connect(to_bypass, Some("x"))?)?;
    let to_plain = sa(node.fx.topo.pod(11).ipv4, 8080);
    let r = client.connect(to_plain, Some("x"))?;
    r.ensure_ok()?;
    peer.wait_event(peer_saw("inbound", uids[11].clone(), to_plain), WAIT)?;
    // DNS: captured by default (the peer answers), not where the annotation says false (the
    // node address it asks has no DNS server).
    let dns_server = sa(node.fx.topo.pod(10).node_ipv4, 53);
    let off = node.app(10).dns_udp(dns_server, true)?;
    ensure!(
        !off.valid && off.errno == Some(libc::ECONNREFUSED),
        "{off:?}"
    );
    let on = node
        .app(11)
        .dns_udp(sa(node.fx.topo.pod(11).node_ipv4, 53), true)?;
    ensure!(on.ok && on.valid, "{on:?}");

    // An option changed on an enrolled pod: applied in place. Same netns cookie, no Del to
    // ztunnel, and a connection held through the peer survives.
    let cookie = entry(11)["netns_cookie"].clone();
    client.hold("held", to_plain)?.ensure_ok()?;
    let _ = peer.events();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ambient);
    let patch = json!({"metadata": {"annotations": {BYPASS_INBOUND_ANNOTATION: "true"}}});
    pods.patch(
        "plain-enrolled",
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    let updated = wait_status(&node, "bypass_inbound on the updated pod", |s| {
        enrolled_entry(s, &uids[11]).filter(|p| p["bypass_inbound"] == true)
    })
    .await?;
    ensure!(updated["netns_cookie"] == cookie, "{updated}");
    direct(&client.connect(to_plain, Some("after"))?)?;
    let echo = client.ping("held", "through the update")?;
    ensure!(
        echo.ok && echo.echo.as_deref() == Some("through the update"),
        "{echo:?}"
    );
    let stopped = peer
        .events()
        .into_iter()
        .filter(|e| {
            e["uid"] == uids[11] && (e["event"] == "workload_stopped" || e["kind"] == "del")
        })
        .count();
    ensure!(stopped == 0, "the update re-enrolled the pod");

    // A pod that ends (phase Failed) is let go.
    set_pod_status(
        &admin,
        &ambient,
        "plain-enrolled",
        "Failed",
        &node.fx.topo.pod(11).ips(),
    )
    .await?;
    wait_annotation(&admin, &ambient, "plain-enrolled", None).await?;
    peer.wait_event(
        |e| e["event"] == "workload_stopped" && e["uid"] == uids[11],
        WAIT,
    )?;

    label_namespace(&admin, "kube-system", DATAPLANE_MODE_LABEL, None).await?;
    ensure!(peer.violations().is_empty(), "{:?}", peer.violations());
    Ok(())
}

/// `sluice-cni` as the runtime runs it, against the agent in Kubernetes mode.
fn cni_add(
    node: &KubeNode,
    i: usize,
    ns: &str,
    pod: &str,
    container: &str,
) -> Result<PluginOutput> {
    cni(node, "ADD", i, ns, pod, container)
}

fn cni(
    node: &KubeNode,
    command: &str,
    i: usize,
    ns: &str,
    pod: &str,
    container: &str,
) -> Result<PluginOutput> {
    let netns = node.fx.topo.pod(i).path();
    let ips: Vec<Value> = node
        .fx
        .topo
        .pod(i)
        .ips()
        .iter()
        .map(|ip| {
            let prefix = if ip.is_ipv4() { 24 } else { 64 };
            json!({"interface": 0, "address": format!("{ip}/{prefix}")})
        })
        .collect();
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "k8s",
        "type": "sluice-cni",
        "agent_socket": node.fx.agent.paths.control.display().to_string(),
        "timeout_ms": 15_000,
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": netns.display().to_string()}],
            "ips": ips,
        },
    });
    let env = vec![
        ("CNI_COMMAND", command.to_string()),
        ("CNI_CONTAINERID", container.to_string()),
        ("CNI_NETNS", netns.display().to_string()),
        ("CNI_IFNAME", "eth0".to_string()),
        (
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={container}"
            ),
        ),
        ("CNI_PATH", "/opt/cni/bin".to_string()),
    ];
    exec_plugin(&cni_bin(), &env, conf.to_string().as_bytes(), None)
}

/// A CNI ADD for a pod the agent's cache has not seen: it waits for the cache, and then the
/// same worker as the watcher enrolls the pod in the ADD's netns. A pod the cache never shows
/// fails the ADD in an ambient namespace (the runtime retries) and passes elsewhere.
async fn cni_add_for_a_pod_the_cache_has_not_seen_yet(server: Arc<KubeServer>) -> Result<()> {
    let admin = server.client().await?;
    let node = node(
        &server,
        NodeOptions {
            args: vec!["--cni-pod-lookup-ms".into(), "3000".into()],
            ..NodeOptions::new(2)
        },
    )?;
    let peer = peer(&node)?;
    let (ns, plain) = (name("cni"), name("plain"));
    create_namespace(&admin, &ns, &[(DATAPLANE_MODE_LABEL, MODE_AMBIENT)]).await?;
    create_namespace(&admin, &plain, &[]).await?;

    let node = Arc::new(node);
    let add = tokio::task::spawn_blocking({
        let (node, ns) = (Arc::clone(&node), ns.clone());
        move || cni_add(&node, 0, &ns, "late", "sandbox-1")
    });
    // The ADD is waiting for the pod (the agent says so), then the pod appears.
    eventually("the ADD to wait for its pod", WAIT, || {
        let log = node.fx.agent.log();
        async move {
            Ok(log
                .contains("the pod is not in the cache yet")
                .then_some(()))
        }
    })
    .await?;
    let pod = create_pod(&admin, &ns, "late", &node.name, &PodShape::default()).await?;
    let out = add.await??;
    ensure!(out.status.success(), "ADD failed: {out:?}");
    ensure!(
        out.json()?["ips"].as_array().map(Vec::len) == Some(2),
        "prints prevResult: {}",
        out.stdout
    );
    let entry = enrolled_entry(&node.status()?, &uid(&pod)).context("enrolled")?;
    ensure!(entry["container_id"] == "sandbox-1", "{entry}");
    peer.wait_zds("add", Some(&uid(&pod)), WAIT)?;
    wait_annotation(&admin, &ns, "late", Some("enabled")).await?;
    // Its traffic goes through the peer.
    let listener = node.extra_app(1)?;
    listener.listen(8080)?;
    let dst = sa(node.fx.topo.pod(1).ipv4, 8080);
    node.extra_app(0)?.connect(dst, Some("x"))?.ensure_ok()?;
    peer.wait_event(peer_saw("outbound", uid(&pod), dst), WAIT)?;

    // DEL lets go at once (the pod object may stay for its grace period).
    let del = cni(&node, "DEL", 0, &ns, "late", "sandbox-1")?;
    ensure!(del.status.success(), "{del:?}");
    ensure!(
        enrolled_entry(&node.status()?, &uid(&pod)).is_none(),
        "DEL unenrolled it"
    );
    peer.wait_event(
        |e| e["event"] == "workload_stopped" && e["uid"] == uid(&pod),
        WAIT,
    )?;
    wait_annotation(&admin, &ns, "late", None).await?;

    // Never in the cache: ambient namespace fails (code 11: try again), another passes.
    let started = Instant::now();
    let ghost = cni_add(&node, 1, &ns, "ghost", "sandbox-2")?;
    ensure!(!ghost.status.success(), "{ghost:?}");
    ensure!(ghost.json()?["code"] == 11, "{}", ghost.stdout);
    ensure!(
        started.elapsed() >= Duration::from_secs(3),
        "it waited for the cache first"
    );
    let passed = cni_add(&node, 1, &plain, "ghost", "sandbox-3")?;
    ensure!(passed.status.success(), "{passed:?}");
    ensure!(
        node.status()?["pods"]
            .as_array()
            .is_some_and(|p| p.is_empty())
    );
    Ok(())
}

/// The pod is deleted while its enrollment is in progress (held by a failpoint): the agent
/// finishes, sees the pod gone, and lets go; nothing stays redirected.
async fn a_pod_deleted_while_being_enrolled(server: Arc<KubeServer>) -> Result<()> {
    let admin = server.client().await?;
    let mut node = node(
        &server,
        NodeOptions {
            env: vec![("FAILPOINTS".into(), "enroll-pause=return(*:1500)".into())],
            ..NodeOptions::new(2)
        },
    )?;
    let peer = peer(&node)?;
    let ns = name("deleted");
    create_namespace(&admin, &ns, &[(DATAPLANE_MODE_LABEL, MODE_AMBIENT)]).await?;
    let pod = node
        .run_pod(&admin, 0, &ns, "doomed", &PodShape::default())
        .await?;
    eventually("the enrollment to start", WAIT, || {
        let log = node.fx.agent.log();
        async move {
            Ok(log
                .contains("failpoint enroll-pause: pausing")
                .then_some(()))
        }
    })
    .await?;
    force_delete_pod(&admin, &ns, "doomed").await?;

    wait_status(&node, "the deleted pod let go", |s| {
        let gone = enrolled_entry(s, &uid(&pod)).is_none() && report_entry(s, &uid(&pod)).is_none();
        gone.then_some(())
    })
    .await?;
    ensure!(
        node.map_used("SL_PODS")? == 0,
        "nothing left in the dataplane"
    );
    // If ztunnel was told about the pod, it was told to let go too.
    let told = peer
        .wait_zds("add", Some(&uid(&pod)), Duration::from_millis(100))
        .is_ok();
    if told {
        peer.wait_event(
            |e| e["event"] == "workload_stopped" && e["uid"] == uid(&pod),
            WAIT,
        )?;
    }
    let listener = node.extra_app(1)?;
    listener.listen(8080)?;
    direct(
        &node
            .app(0)
            .connect(sa(node.fx.topo.pod(1).ipv4, 8080), Some("x"))?,
    )?;
    Ok(())
}

/// A pod whose process sits in a netns lacking the pod's IPs is not enrolled there: the agent
/// says why (status, an Event on the pod), and enrolls it once the IPs match.
async fn the_proc_scan_refuses_a_netns_without_the_pods_ips(server: Arc<KubeServer>) -> Result<()> {
    let admin = server.client().await?;
    let mut node = node(&server, NodeOptions::new(2))?;
    let peer = peer(&node)?;
    let ns = name("refuse");
    create_namespace(&admin, &ns, &[(DATAPLANE_MODE_LABEL, MODE_AMBIENT)]).await?;
    let wrong: [IpAddr; 1] = ["10.99.9.9".parse()?];
    let pod = node
        .run_pod_with_ips(&admin, 0, &ns, "mismatch", &PodShape::default(), &wrong)
        .await?;
    let report = wait_report(&node, &uid(&pod), "failed", None, None).await?;
    ensure!(
        report["reason"]
            .as_str()
            .is_some_and(|r| r.contains("refused") && r.contains("10.99.9.9")),
        "{report}"
    );
    let events: Api<K8sEvent> = Api::namespaced(admin.clone(), &ns);
    let event = eventually("an Event on the pod", WAIT, || {
        let events = events.clone();
        let u = uid(&pod);
        async move {
            Ok(events
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .find(|e| {
                    e.regarding.as_ref().and_then(|r| r.uid.as_deref()) == Some(u.as_str())
                        && e.reason.as_deref() == Some(reason::ENROLL_FAILED)
                }))
        }
    })
    .await?;
    ensure!(
        event.note.as_deref().is_some_and(|n| n.contains("lacks")),
        "{event:?}"
    );
    ensure!(
        node.map_used("SL_PODS")? == 0 && enrolled_entry(&node.status()?, &uid(&pod)).is_none()
    );
    ensure!(annotation(&admin, &ns, "mismatch").await?.is_none());
    let listener = node.extra_app(1)?;
    listener.listen(8080)?;
    let dst = sa(node.fx.topo.pod(1).ipv4, 8080);
    direct(&node.app(0).connect(dst, Some("x"))?)?;

    // The kubelet reports the real IPs: enrolled.
    set_pod_status(
        &admin,
        &ns,
        "mismatch",
        "Running",
        &node.fx.topo.pod(0).ips(),
    )
    .await?;
    wait_annotation(&admin, &ns, "mismatch", Some("enabled")).await?;
    node.app(0).connect(dst, Some("x"))?.ensure_ok()?;
    peer.wait_event(peer_saw("outbound", uid(&pod), dst), WAIT)?;
    Ok(())
}

fn has_taint(node: &Node, key: &str) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == key))
}

/// The startup taint stays while the agent is not ready (here: no CNI config to chain into
/// yet, though it already enrolls pods), and goes once it is.
async fn the_startup_taint_is_removed_only_once_ready(server: Arc<KubeServer>) -> Result<()> {
    let admin = server.client().await?;
    let node_name = name("node");
    create_node(
        &admin,
        &node_name,
        &[
            (DEFAULT_STARTUP_TAINT, "NoSchedule"),
            ("keep/me", "NoSchedule"),
        ],
    )
    .await?;
    let mut node = KubeNode::start_named(
        &server,
        Path::new(TESTKIT),
        &node_name,
        NodeOptions {
            cni: true,
            wait_ready: false,
            ..NodeOptions::new(1)
        },
    )?;
    let ns = name("taint");
    create_namespace(&admin, &ns, &[(DATAPLANE_MODE_LABEL, MODE_AMBIENT)]).await?;
    node.run_pod(&admin, 0, &ns, "early", &PodShape::default())
        .await?;
    // Working (the pod is redirected), but not ready: the CNI entry is not installed.
    wait_annotation(&admin, &ns, "early", Some("pending")).await?;
    let nodes: Api<Node> = Api::all(admin.clone());
    let (code, body) = node
        .fx
        .agent
        .http_get(sluice_tests::agent_proc::HEALTH_PORT, "/readyz")?;
    ensure!(code == 503 && body.contains("cni-config"), "{code} {body}");
    ensure!(
        has_taint(&nodes.get(&node_name).await?, DEFAULT_STARTUP_TAINT),
        "removed before ready"
    );

    let cni = node.fx.agent.paths.cni.clone().context("CNI directories")?;
    std::fs::write(
        cni.conf_dir.join("10-bridge.conflist"),
        json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge"}]}).to_string(),
    )?;
    let removed = eventually("the startup taint to go", WAIT, || {
        let nodes = nodes.clone();
        let name = node_name.clone();
        async move {
            let n = nodes.get(&name).await?;
            Ok((!has_taint(&n, DEFAULT_STARTUP_TAINT)).then_some(n))
        }
    })
    .await?;
    let (code, _) = node
        .fx
        .agent
        .http_get(sluice_tests::agent_proc::HEALTH_PORT, "/readyz")?;
    ensure!(code == 200, "ready by the time the taint is gone");
    ensure!(has_taint(&removed, "keep/me"), "other taints stay");
    node.fx.agent.wait_ready(WAIT)?;
    Ok(())
}

/// After a restart (as after a node reboot, or a crash while pods changed): a pod whose netns
/// lost its path but still runs is found again through /proc and stays redirected; a pod whose
/// netns is gone is dropped, not left half-enrolled. Only then does ztunnel get its snapshot.
async fn a_restart_finds_moved_namespaces_and_drops_vanished_ones(
    server: Arc<KubeServer>,
) -> Result<()> {
    let admin = server.client().await?;
    let mut node = node(&server, NodeOptions::new(3))?;
    let peer = peer(&node)?;
    let ns = name("restart");
    create_namespace(&admin, &ns, &[(DATAPLANE_MODE_LABEL, MODE_AMBIENT)]).await?;
    let moved = uid(&node
        .run_pod(&admin, 0, &ns, "moved", &PodShape::default())
        .await?);
    let vanished = uid(&node
        .run_pod(&admin, 1, &ns, "vanished", &PodShape::default())
        .await?);
    for pod in ["moved", "vanished"] {
        wait_annotation(&admin, &ns, pod, Some("enabled")).await?;
    }

    node.fx.agent.kill();
    // "moved": its runtime mount goes (`ip netns del`); its process keeps the netns alive.
    // "vanished": its process ends and its netns goes too.
    let moved_pid = node.app(0).pid();
    let _restore = RestoreNetns {
        moved: (node.fx.topo.pod(0).netns.name().to_string(), moved_pid),
        vanished: node.fx.topo.pod(1).netns.name().to_string(),
    };
    ip(&["netns", "del", &_restore.moved.0])?;
    node.stop_processes(1);
    ip(&["netns", "del", &_restore.vanished])?;
    let _ = peer.events();

    node.fx.agent.restart()?;
    node.fx.agent.wait_ready(WAIT)?;
    // By the time ztunnel gets its snapshot, the table is reconciled: "moved" is in it with
    // its netns (an Add, not a Keep), "vanished" is not.
    let snapshot = peer.wait_event(|e| e["event"] == "snapshot_done", WAIT)?;
    ensure!(snapshot["uids"] == json!([moved]), "{snapshot}");
    let events = peer.events();
    ensure!(
        events
            .iter()
            .any(|e| e["kind"] == "add" && e["uid"] == moved)
            && !events.iter().any(|e| e["kind"] == "keep"),
        "{events:?}"
    );
    let status = node.status()?;
    let entry = enrolled_entry(&status, &moved).context("moved stays enrolled")?;
    ensure!(
        entry["netns"] == format!("/proc/{moved_pid}/ns/net"),
        "{entry}"
    );
    ensure!(enrolled_entry(&status, &vanished).is_none());
    ensure!(node.map_used("SL_PODS")? == 1, "nothing half-enrolled");
    let listener = node.extra_app(2)?;
    listener.listen(8080)?;
    let dst = sa(node.fx.topo.pod(2).ipv4, 8080);
    node.app(0).connect(dst, Some("x"))?.ensure_ok()?;
    peer.wait_event(peer_saw("outbound", moved.clone(), dst), WAIT)?;
    wait_report(&node, &vanished, "failed", None, None).await?;
    wait_annotation(&admin, &ns, "vanished", None).await?;
    Ok(())
}

/// Gives the topology the namespace names it will delete: the moved netns under its name
/// again, and a fresh one for the vanished.
struct RestoreNetns {
    moved: (String, u32),
    vanished: String,
}

impl Drop for RestoreNetns {
    fn drop(&mut self) {
        let (name, pid) = &self.moved;
        let _ = ip(&["netns", "attach", name, &pid.to_string()]);
        let _ = ip(&["netns", "add", &self.vanished]);
    }
}
