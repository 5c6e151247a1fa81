//! `deploy/`: the Helm chart through the real Helm engine (v4.3.0, `xtask/src/helm.rs`) and
//! the plain manifests, against the real kube-apiserver v1.20.2 of the Kubernetes tests.
//!
//! Every object must be its API type with no unknown field (a k8s-openapi round trip), be
//! accepted by the server with every field kept, and the chart's default rendering must be
//! the plain manifests (Helm's bookkeeping labels aside). Then what the values change, the
//! uninstall mode's per-node Jobs, and `helm uninstall`.
use std::{collections::BTreeSet, path::PathBuf, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::core::v1::Node;
use kube::{Api, api::PostParams};
use serde_json::{Value, json};
use sluice_tests::{
    agent_proc::agent_bin,
    deploy::{
        helm::{Helm, HelmClient},
        manifests::{
            by_key, check_typed, create, differences, get, key, not_kept, parse, read,
            without_helm_bookkeeping,
        },
        repo_root,
    },
    kube::{KubeServer, User, objects::name},
};

const NAMESPACE: &str = "istio-system";
const RELEASE: &str = "sluice";

fn chart() -> PathBuf {
    repo_root().join("deploy/helm/sluice")
}

fn manifest(file: &str) -> Result<Vec<Value>> {
    read(&repo_root().join("deploy/manifests").join(file))
}

/// The plain uninstall Job for `node`.
fn plain_job(node: &str) -> Result<Value> {
    let text =
        std::fs::read_to_string(repo_root().join("deploy/manifests/sluice-uninstall-job.yaml"))?;
    let docs = parse(&text.replace("__NODE__", node))?;
    ensure!(docs.len() == 1, "one Job in sluice-uninstall-job.yaml");
    Ok(docs[0].clone())
}

/// Runs a blocking Helm call on this worker thread (the library's errors are per thread).
fn helm<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    tokio::task::block_in_place(f)
}

fn rendered(release: &Value) -> Result<Vec<Value>> {
    parse(
        release["manifest"]
            .as_str()
            .context("a release without a manifest")?,
    )
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .with_context(|| format!("no {kind} rendered"))
}

/// The environment variables `sluice-agent <command> --help` says it reads.
fn agent_env(command: &str) -> Result<BTreeSet<String>> {
    let out = Command::new(agent_bin())
        .args([command, "--help"])
        .output()?;
    ensure!(out.status.success(), "sluice-agent {command} --help failed");
    let help = String::from_utf8(out.stdout)?;
    Ok(help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split('=').next())
        .map(str::to_string)
        .collect())
}

/// Every variable a container of `doc` sets, and with `config` every key of the ConfigMap it
/// takes through `envFrom`, is one the agent's `command` reads.
fn env_is_read_by_the_agent(doc: &Value, config: Option<&Value>, command: &str) -> Result<()> {
    let known = agent_env(command)?;
    let pod = doc
        .pointer("/spec/template/spec")
        .context("no pod template")?;
    for c in pod["containers"].as_array().context("no containers")? {
        let mut names: Vec<String> = c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["name"].as_str().map(str::to_string))
            .collect();
        if let Some(config) = config.filter(|_| !c["envFrom"].is_null()) {
            names.extend(
                config["data"]
                    .as_object()
                    .context("ConfigMap without data")?
                    .keys()
                    .cloned(),
            );
        }
        for n in names {
            ensure!(
                known.contains(&n),
                "{}: {n} is not a variable `sluice-agent {command}` reads ({known:?})",
                key(doc)
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_and_manifests_are_valid_agree_and_install() -> Result<()> {
    let started = std::time::Instant::now();
    let phase = |what: &str| eprintln!("{:>6.2}s {what}", started.elapsed().as_secs_f64());
    let Some(helm_lib) = Helm::locate()? else {
        return Ok(());
    };
    let Some(server) = KubeServer::start().await? else {
        return Ok(());
    };
    let client = server.client().await?;
    let kubeconfig = server.kubeconfig(User::Admin, 0)?;
    let helm_client: HelmClient<'_> = helm(|| helm_lib.client(NAMESPACE, &kubeconfig))?;
    phase("kube-apiserver ready, Helm loaded");

    // `helm lint`: nothing above Info (Helm's severities: 1 Info, 2 Warning, 3 Error).
    let lint = helm(|| helm_client.lint(&chart()))?;
    ensure!(lint["TotalChartsLinted"] == 1, "helm lint: {lint}");
    let worst = lint["Messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["Severity"].as_u64())
        .max();
    ensure!(
        worst.unwrap_or(0) < 2 && lint["Errors"].as_array().is_none_or(Vec::is_empty),
        "helm lint: {lint}"
    );
    // The chart's version is the agent's.
    let chart_meta = parse(&std::fs::read_to_string(chart().join("Chart.yaml"))?)?;
    ensure!(
        chart_meta[0]["appVersion"] == env!("CARGO_PKG_VERSION"),
        "Chart.yaml appVersion"
    );

    // The plain manifests: API types, created as `kubectl create -f` would, every field kept.
    let namespace = manifest("namespace.yaml")?;
    let plain = manifest("sluice.yaml")?;
    let node = name("node");
    let job = plain_job(&node)?;
    for doc in namespace.iter().chain(&plain).chain([&job]) {
        check_typed(doc)?;
        let live = create(&client, doc).await?;
        let lost = not_kept(doc, &live);
        ensure!(
            lost.is_empty(),
            "{}: the server did not keep {lost:?}",
            key(doc)
        );
    }
    let config = find(&plain, "ConfigMap")?;
    env_is_read_by_the_agent(find(&plain, "DaemonSet")?, Some(config), "run")?;
    // The Job takes the agent's ConfigMap too (uninstall reads the paths in it).
    env_is_read_by_the_agent(&job, None, "uninstall")?;
    phase("plain manifests typed and created");

    // `helm install` with the default values, taking over what kubectl created (as a move from
    // the plain manifests to the chart would).
    let release = helm(|| {
        helm_client.install(
            RELEASE,
            &chart(),
            &json!({}),
            &json!({"take_ownership": true}),
        )
    })?;
    ensure!(
        release["info"]["status"] == "deployed",
        "{}",
        release["info"]
    );
    let docs = rendered(&release)?;
    for doc in &docs {
        check_typed(doc)?;
        let live = get(&client, doc)
            .await?
            .with_context(|| format!("{} not created", key(doc)))?;
        let lost = not_kept(doc, &live);
        ensure!(
            lost.is_empty(),
            "{}: the server did not keep {lost:?}",
            key(doc)
        );
    }
    // The chart with its defaults renders the plain manifests.
    let chart_objects = by_key(
        &docs
            .iter()
            .map(without_helm_bookkeeping)
            .collect::<Vec<_>>(),
    )?;
    let plain_objects = by_key(&plain)?;
    ensure!(
        chart_objects.keys().eq(plain_objects.keys()),
        "chart renders {:?}, the manifests hold {:?}",
        chart_objects.keys(),
        plain_objects.keys()
    );
    for (k, doc) in &chart_objects {
        let diff = differences(doc, &plain_objects[k]);
        ensure!(diff.is_empty(), "{k}: chart and manifest differ: {diff:#?}");
    }
    let default_checksum = find(&docs, "DaemonSet")?
        .pointer("/spec/template/metadata/annotations/checksum~1config")
        .cloned();
    phase("helm install: typed, accepted, equal to the manifests");

    // Every value people set reaches the objects.
    let values = json!({
        "image": {"repository": "registry.invalid/mesh/sluice-agent", "tag": "9.9.9", "pullPolicy": "Always"},
        "nodeSelector": {"mesh": "ambient"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "mesh", "effect": "NoSchedule"}],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "agent": {
            "logLevel": "debug", "dnsCapture": false, "ipv6": false, "accelerate": true,
            "startupTaint": "mesh.invalid/not-ready", "controlSocket": "/var/run/sluice/ctl.sock",
        },
        "ztunnel": {"udsAddress": "/var/run/zt/zds.sock"},
        "cni": {"excludeNamespaces": ["kube-system", "legacy"], "ambientNamespaces": ["shop"]},
    });
    let release = helm(|| helm_client.upgrade(RELEASE, &chart(), &values, &json!({})))?;
    let docs = rendered(&release)?;
    let cm = find(&docs, "ConfigMap")?;
    for (k, want) in [
        ("SLUICE_LOG_LEVEL", "debug"),
        ("AMBIENT_DNS_CAPTURE", "false"),
        ("AMBIENT_IPV6", "false"),
        ("SLUICE_ACCELERATE", "true"),
        ("SLUICE_STARTUP_TAINT", "mesh.invalid/not-ready"),
        ("SLUICE_CONTROL_SOCKET", "/var/run/sluice/ctl.sock"),
        ("ZTUNNEL_UDS_ADDRESS", "/var/run/zt/zds.sock"),
        ("EXCLUDE_NAMESPACES", "kube-system,legacy"),
        ("SLUICE_AMBIENT_NAMESPACES", "shop"),
    ] {
        ensure!(cm["data"][k] == want, "{k}: {}", cm["data"][k]);
    }
    let ds = find(&docs, "DaemonSet")?;
    let pod = &ds["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    ensure!(container["image"] == "registry.invalid/mesh/sluice-agent:9.9.9");
    ensure!(container["imagePullPolicy"] == "Always");
    ensure!(
        container["resources"] == values["resources"],
        "{}",
        container["resources"]
    );
    // Helm merges maps with the defaults' (kubernetes.io/os stays), and replaces lists.
    ensure!(
        pod["nodeSelector"] == json!({"kubernetes.io/os": "linux", "mesh": "ambient"}),
        "{}",
        pod["nodeSelector"]
    );
    ensure!(pod["tolerations"] == values["tolerations"]);
    let ztunnel_mount = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == "ztunnel")
        .context("no ztunnel mount")?;
    ensure!(
        ztunnel_mount["mountPath"] == "/var/run/zt",
        "{ztunnel_mount}"
    );
    ensure!(
        ds.pointer("/spec/template/metadata/annotations/checksum~1config")
            .cloned()
            != default_checksum,
        "new settings must restart the agents"
    );
    let live = get(&client, ds).await?.context("DaemonSet")?;
    let lost = not_kept(ds, &live);
    ensure!(lost.is_empty(), "the server did not keep {lost:?}");
    // A setting the mounts cannot serve is refused with a message.
    let bad = json!({"agent": {"stateDir": "/tmp/state"}});
    match helm(|| helm_client.upgrade(RELEASE, &chart(), &bad, &json!({}))) {
        Err(e) if format!("{e:#}").contains("agent.stateDir must be under agent.runDir") => {}
        other => bail!("a state dir outside the mounts: {other:?}"),
    }
    phase("helm upgrade: every value reaches the objects");

    // Uninstall mode: no agent, one Job per node (from the cluster's nodes), each the plain
    // Job for that node.
    let nodes = [name("node"), name("node")];
    for n in &nodes {
        let node = Node {
            metadata: kube::api::ObjectMeta {
                name: Some(n.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Node>::all(client.clone())
            .create(&PostParams::default(), &node)
            .await?;
    }
    let release = helm(|| {
        helm_client.upgrade(
            RELEASE,
            &chart(),
            &json!({"uninstall": {"enabled": true}}),
            &json!({}),
        )
    })?;
    let docs = rendered(&release)?;
    ensure!(
        !docs.iter().any(|d| d["kind"] == "DaemonSet"),
        "uninstall mode still renders the agent"
    );
    let ds_doc =
        json!({"kind": "DaemonSet", "metadata": {"name": "sluice-agent", "namespace": NAMESPACE}});
    ensure!(
        get(&client, &ds_doc).await?.is_none(),
        "the DaemonSet is still there"
    );
    let jobs: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Job").collect();
    let mut job_nodes = BTreeSet::new();
    for job in &jobs {
        check_typed(job)?;
        let on = job
            .pointer("/spec/template/spec/nodeName")
            .and_then(Value::as_str)
            .context("a Job without nodeName")?;
        job_nodes.insert(on.to_string());
        let diff = differences(&without_helm_bookkeeping(job), &plain_job(on)?);
        ensure!(
            diff.is_empty(),
            "the chart's Job for {on} differs from the plain one: {diff:#?}"
        );
        let live = get(&client, job).await?.context("Job not created")?;
        let lost = not_kept(job, &live);
        ensure!(lost.is_empty(), "the server did not keep {lost:?}");
    }
    let cluster_nodes: BTreeSet<String> = Api::<Node>::all(client.clone())
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    ensure!(
        job_nodes == cluster_nodes,
        "Jobs for {job_nodes:?}, nodes {cluster_nodes:?}"
    );
    ensure!(nodes.iter().all(|n| job_nodes.contains(n)));
    phase("uninstall mode: one Job per node, the plain Job");

    // `helm uninstall` removes what it installed (the namespace is Istio's: it stays).
    helm(|| helm_client.uninstall(RELEASE))?;
    for doc in &docs {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while get(&client, doc)
            .await?
            .is_some_and(|o| o["metadata"]["deletionTimestamp"].is_null())
        {
            ensure!(
                std::time::Instant::now() < deadline,
                "{} still there",
                key(doc)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    ensure!(get(&client, &namespace[0]).await?.is_some());
    phase("helm uninstall");
    Ok(())
}
