//! What the guest runs: every test executable `cargo test` builds (except xtask's own, which
//! drives the host) and every binary of the workspace the tests may exec, found from cargo's
//! JSON messages so that tests added or renamed need no change here.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::{cmd, workspace_root};

/// A libtest executable and the tests it holds (from `--list` on the host).
pub struct TestBinary {
    /// `agent_e2e`, or `sluice_agent[lib]` for a crate's unit tests.
    pub label: String,
    pub path: PathBuf,
    pub tests: Vec<String>,
}

pub struct Artifacts {
    /// `target/<profile>/<bin>`: the agent, the testkit... (tests find them there).
    pub bins: Vec<PathBuf>,
    /// Only executables that hold at least one test.
    pub tests: Vec<TestBinary>,
}

/// The fields of cargo's `compiler-artifact` message this needs.
#[derive(Deserialize)]
struct Message {
    reason: String,
    #[serde(default)]
    executable: Option<PathBuf>,
    #[serde(default)]
    manifest_path: PathBuf,
    #[serde(default)]
    profile: Profile,
    #[serde(default)]
    target: Target,
}

#[derive(Deserialize, Default)]
struct Profile {
    test: bool,
}

#[derive(Deserialize, Default)]
struct Target {
    name: String,
    kind: Vec<String>,
}

/// Test executables about what the node runs rather than the kernel (a real containerd, a
/// real kube-apiserver with etcd, the Helm library, the image): they run on the host
/// only, which keeps their binaries (hundreds of MiB) out of the initramfs.
const HOST_ONLY: &[&str] = &[
    "cni_containerd",
    "kube_api",
    "kube_outage",
    "kube_reconcile",
    "kube_reconcile_outage",
    "deploy_chart",
    "deploy_image",
    "deploy_upgrade",
];

/// Builds the binaries and test executables (the same ones `cargo xtask test` runs on the
/// host, so nothing is rebuilt) and lists each executable's tests, as `test_args` (a
/// libtest filter, if any) select them in the guest.
pub fn build(test_args: &[String]) -> Result<Artifacts> {
    let bins = executables(
        cmd::cargo()
            .args(["build", "--bins"])
            .args(crate::test::TEST_FEATURES),
    )?
    .into_iter()
    .filter(|m| !m.profile.test && m.target.kind.iter().any(|k| k == "bin"))
    .filter_map(|m| m.executable)
    .collect();
    let xtask_manifest = workspace_root().join("xtask/Cargo.toml");
    let mut tests = Vec::new();
    for m in executables(
        cmd::cargo()
            .args(["test", "--no-run"])
            .args(crate::test::TEST_FEATURES),
    )? {
        if !m.profile.test
            || m.manifest_path == xtask_manifest
            || HOST_ONLY.contains(&m.target.name.as_str())
        {
            continue;
        }
        let Some(path) = m.executable else { continue };
        let names = list_tests(&path, test_args)?;
        if names.is_empty() {
            continue;
        }
        let label = if m.target.kind.iter().any(|k| k == "test") {
            m.target.name.clone()
        } else {
            format!("{}[{}]", m.target.name, m.target.kind.join(","))
        };
        tests.push(TestBinary {
            label,
            path,
            tests: names,
        });
    }
    Ok(Artifacts { bins, tests })
}

fn executables(cargo: &mut Command) -> Result<Vec<Message>> {
    // Diagnostics stay human-readable on stderr; stdout carries one JSON message a line.
    let out = cmd::stdout(cargo.arg("--message-format=json-render-diagnostics"))?;
    out.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str::<Message>(l).context("parsing a cargo message"))
        .filter(|m| {
            m.as_ref().map_or(true, |m| {
                m.reason == "compiler-artifact" && m.executable.is_some()
            })
        })
        .collect()
}

/// The test names of a libtest executable (`--list --format terse`: `name: test`).
fn list_tests(exe: &Path, test_args: &[String]) -> Result<Vec<String>> {
    let out = cmd::query(
        Command::new(exe)
            .args(["--list", "--format", "terse"])
            .args(test_args),
    )?;
    Ok(out
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect())
}
