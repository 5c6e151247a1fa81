//! The manifests as Kubernetes objects: YAML documents parsed into JSON values, checked
//! against the API types (k8s-openapi), compared with each other, created on and read back
//! from an API server.
//!
//! k8s-openapi's types ignore unknown fields when they deserialize, so "no unknown field" is
//! checked by a round trip: the value, deserialized into its type and serialized again, must
//! come back unchanged. A misspelt or misplaced field disappears on the way; a value of the
//! wrong type fails to deserialize.
use std::{collections::BTreeMap, path::Path};

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    batch::v1::Job,
    core::v1::{ConfigMap, Namespace, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, PostParams},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// The documents of a YAML stream, comments and empty documents dropped.
pub fn parse(yaml: &str) -> Result<Vec<Value>> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).context("parsing YAML")?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

pub fn read(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| path.display().to_string())
}

/// `Kind/name` (or `Kind/generateName*`), for messages and keys.
pub fn key(doc: &Value) -> String {
    let meta = &doc["metadata"];
    let name = meta["name"]
        .as_str()
        .map(str::to_string)
        .or_else(|| meta["generateName"].as_str().map(|g| format!("{g}*")))
        .unwrap_or_default();
    format!("{}/{name}", doc["kind"].as_str().unwrap_or("?"))
}

/// Deserializes `doc` into the type of its kind and back: the result must equal `doc`.
pub fn check_typed(doc: &Value) -> Result<()> {
    let again = match doc["kind"].as_str() {
        Some("Namespace") => round_trip::<Namespace>(doc),
        Some("ServiceAccount") => round_trip::<ServiceAccount>(doc),
        Some("ClusterRole") => round_trip::<ClusterRole>(doc),
        Some("ClusterRoleBinding") => round_trip::<ClusterRoleBinding>(doc),
        Some("ConfigMap") => round_trip::<ConfigMap>(doc),
        Some("DaemonSet") => round_trip::<DaemonSet>(doc),
        Some("Job") => round_trip::<Job>(doc),
        other => bail!("{}: no API type for kind {other:?} here", key(doc)),
    }
    .with_context(|| format!("{} does not deserialize into its API type", key(doc)))?;
    let lost = differences(doc, &again);
    if !lost.is_empty() {
        bail!("{}: fields the API type does not have: {lost:?}", key(doc));
    }
    Ok(())
}

fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<Value> {
    let typed: T = serde_json::from_value(doc.clone())?;
    Ok(serde_json::to_value(typed)?)
}

/// JSON paths where `a` and `b` differ.
pub fn differences(a: &Value, b: &Value) -> Vec<String> {
    let mut out = Vec::new();
    diff(a, b, "", &mut out);
    out
}

fn diff(a: &Value, b: &Value, at: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                diff(
                    v,
                    y.get(k).unwrap_or(&Value::Null),
                    &format!("{at}.{k}"),
                    out,
                );
            }
            for k in y.keys().filter(|k| !x.contains_key(*k)) {
                out.push(format!("{at}.{k}: only in the second"));
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                diff(v, w, &format!("{at}[{i}]"), out);
            }
        }
        _ if a == b => {}
        _ => out.push(format!("{at}: {a} != {b}")),
    }
}

/// Paths of `sent` that `live` does not hold with the same value: what a server dropped or
/// changed (it may add defaults; lists must keep their length).
pub fn not_kept(sent: &Value, live: &Value) -> Vec<String> {
    let mut out = Vec::new();
    subset(sent, live, "", &mut out);
    out
}

fn subset(sent: &Value, live: &Value, at: &str, out: &mut Vec<String>) {
    match (sent, live) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    Some(w) => subset(v, w, &format!("{at}.{k}"), out),
                    None => out.push(format!("{at}.{k}: dropped")),
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                subset(v, w, &format!("{at}[{i}]"), out);
            }
        }
        _ if sent == live => {}
        _ => out.push(format!("{at}: sent {sent}, kept {live}")),
    }
}

/// Labels and annotations only Helm sets (release bookkeeping, the config checksum).
const HELM_ONLY_LABELS: &[&str] = &[
    "helm.sh/chart",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
];
const HELM_ONLY_ANNOTATIONS: &[&str] = &["checksum/config"];

/// `doc` without what only Helm adds, and with a generated name instead of a name (so that
/// the chart's per-node Jobs compare with the plain Job template).
pub fn without_helm_bookkeeping(doc: &Value) -> Value {
    let mut doc = doc.clone();
    for path in ["/metadata", "/spec/template/metadata"] {
        if let Some(meta) = doc.pointer_mut(path).and_then(Value::as_object_mut) {
            strip_bookkeeping(meta);
        }
    }
    doc
}

fn strip_bookkeeping(meta: &mut serde_json::Map<String, Value>) {
    for (field, keys) in [
        ("labels", HELM_ONLY_LABELS),
        ("annotations", HELM_ONLY_ANNOTATIONS),
    ] {
        if let Some(map) = meta.get_mut(field).and_then(Value::as_object_mut) {
            map.retain(|k, _| !keys.contains(&k.as_str()));
            if map.is_empty() {
                meta.remove(field);
            }
        }
    }
    if doc_is_job_meta(meta) {
        meta.remove("name");
        meta.insert("generateName".into(), "sluice-uninstall-".into());
    }
}

fn doc_is_job_meta(meta: &serde_json::Map<String, Value>) -> bool {
    meta.get("name")
        .and_then(Value::as_str)
        .is_some_and(|n| n.starts_with("sluice-uninstall-"))
}

/// Documents by [`key`], failing on duplicates.
pub fn by_key(docs: &[Value]) -> Result<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    for d in docs {
        if out.insert(key(d), d.clone()).is_some() {
            bail!("{} twice", key(d));
        }
    }
    Ok(out)
}

/// The API resource of `doc`'s kind, and whether it is namespaced.
fn resource(doc: &Value) -> Result<(ApiResource, bool)> {
    Ok(match doc["kind"].as_str() {
        Some("Namespace") => (ApiResource::erase::<Namespace>(&()), false),
        Some("ServiceAccount") => (ApiResource::erase::<ServiceAccount>(&()), true),
        Some("ClusterRole") => (ApiResource::erase::<ClusterRole>(&()), false),
        Some("ClusterRoleBinding") => (ApiResource::erase::<ClusterRoleBinding>(&()), false),
        Some("ConfigMap") => (ApiResource::erase::<ConfigMap>(&()), true),
        Some("DaemonSet") => (ApiResource::erase::<DaemonSet>(&()), true),
        Some("Job") => (ApiResource::erase::<Job>(&()), true),
        other => bail!("{}: no API resource for kind {other:?} here", key(doc)),
    })
}

fn api(client: &Client, doc: &Value) -> Result<Api<DynamicObject>> {
    let (ar, namespaced) = resource(doc)?;
    Ok(if namespaced {
        let ns = doc["metadata"]["namespace"]
            .as_str()
            .with_context(|| format!("{} has no namespace", key(doc)))?;
        Api::namespaced_with(client.clone(), ns, &ar)
    } else {
        Api::all_with(client.clone(), &ar)
    })
}

/// Creates `doc` (as `kubectl create` would) and returns the object the server stored.
pub async fn create(client: &Client, doc: &Value) -> Result<Value> {
    let obj: DynamicObject = serde_json::from_value(doc.clone())?;
    let created = api(client, doc)?
        .create(&PostParams::default(), &obj)
        .await
        .with_context(|| format!("the API server refused {}", key(doc)))?;
    Ok(serde_json::to_value(created)?)
}

/// The stored object named like `doc`, if there is one.
pub async fn get(client: &Client, doc: &Value) -> Result<Option<Value>> {
    let name = doc["metadata"]["name"]
        .as_str()
        .with_context(|| format!("{} has no name", key(doc)))?;
    let got = api(client, doc)?.get_opt(name).await?;
    Ok(got.map(serde_json::to_value).transpose()?)
}
