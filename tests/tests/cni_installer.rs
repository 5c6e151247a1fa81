//! The CNI installer: `sluice-agent run --cni-conf-dir` chains sluice-cni into the primary
//! CNI's configuration and keeps it there, with readiness following; `install-cni` does it once;
//! `uninstall` takes it out.
use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use serde_json::{Value, json};
use sluice_tests::{
    agent_proc::{AGENT_START, AgentFixture, HEALTH_PORT, Workdir, agent_bin},
    cni_runtime::cni_bin,
    harness::require_root,
};

const TESTKIT: &str = env!("CARGO_BIN_EXE_sluice-testkit");
const WAIT: Duration = Duration::from_secs(10);

fn primary(name: &str) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.85.0.0/24"}},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
}

/// Writes `v` as the primary CNI would: a new file renamed into place.
fn write_as_primary(path: &Path, v: &Value, mode: u32) {
    let tmp = path.with_extension("primary-tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(v).unwrap()).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn read(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// The plugin types in `path`, in order.
fn types(path: &Path) -> Vec<String> {
    read(path)
        .and_then(|v| v["plugins"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|p| p["type"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Polls `f` until it holds (state on disk or over HTTP changes under us; there is no event
/// to wait on from outside the agent).
fn wait_until(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn readyz(fx: &AgentFixture) -> (u16, String) {
    fx.agent
        .http_get(HEALTH_PORT, "/readyz")
        .unwrap_or((0, String::new()))
}

#[test]
fn installer_chains_restores_and_readiness_follows() {
    if !require_root() {
        return;
    }
    let fx =
        AgentFixture::spawn_cni(Path::new(TESTKIT), 0, &["--ambient-namespaces", "mesh"]).unwrap();
    let cni = fx.agent.paths.cni.clone().unwrap();
    let conflist = cni.conf_dir.join("10-bridge.conflist");
    let installed = cni.bin_dir.join("sluice-cni");

    // No primary CNI yet: alive, not ready, and saying why.
    wait_until("/readyz says it waits for a CNI config", || {
        let (code, body) = readyz(&fx);
        code == 503 && body.contains("no CNI network configuration")
    })
    .unwrap();

    write_as_primary(&conflist, &primary("k8s"), 0o640);
    wait_until("ready", || readyz(&fx).0 == 200).unwrap();
    assert_eq!(types(&conflist), ["bridge", "portmap", "sluice-cni"]);
    let entry = read(&conflist).unwrap()["plugins"][2].clone();
    assert_eq!(
        entry["agent_socket"],
        fx.agent.paths.control.display().to_string()
    );
    assert_eq!(entry["ambient_namespaces"], json!(["mesh"]));
    assert_eq!(entry["exclude_namespaces"], json!(["kube-system"]));
    let mode = std::fs::metadata(&conflist).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "the file mode is kept");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(cni_bin()).unwrap()
    );

    // The primary CNI rewrites its file, without our entry: put back.
    for round in 1..=3 {
        write_as_primary(&conflist, &primary("k8s"), 0o640);
        wait_until("the entry is restored", || {
            types(&conflist).last().map(String::as_str) == Some("sluice-cni")
        })
        .unwrap();
        wait_until("restoration logged", || {
            fx.agent
                .log()
                .matches("restored the sluice-cni entry")
                .count()
                >= round
        })
        .unwrap();
    }
    let log = fx.agent.log();
    assert!(
        log.contains("was rewritten without the sluice-cni entry"),
        "{log}"
    );
    assert!(log.contains("3 times in the last 60 s"), "{log}");

    // The primary CNI removes its config (restarting), and comes back with a .conf: not ready
    // in between, then chained into a conflist made from the .conf.
    std::fs::remove_file(&conflist).unwrap();
    wait_until("not ready while there is no config", || {
        let (code, body) = readyz(&fx);
        code == 503 && body.contains("cni-config")
    })
    .unwrap();
    let conf = cni.conf_dir.join("10-bridge.conf");
    let mut single = primary("k8s")["plugins"][0].clone();
    single["cniVersion"] = "1.0.0".into();
    single["name"] = "k8s".into();
    write_as_primary(&conf, &single, 0o600);
    wait_until("ready again", || readyz(&fx).0 == 200).unwrap();
    assert!(!conf.exists(), "the .conf is replaced by a .conflist");
    assert_eq!(types(&conflist), ["bridge", "sluice-cni"]);
    let mode = std::fs::metadata(&conflist).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // A new config that ranks first gets the entry; the binary is put back if removed.
    let first = cni.conf_dir.join("05-other.conflist");
    write_as_primary(&first, &primary("other"), 0o644);
    wait_until("chained into the new first config", || {
        types(&first).last().map(String::as_str) == Some("sluice-cni")
    })
    .unwrap();
    std::fs::remove_file(&installed).unwrap();
    wait_until("the binary is back", || installed.exists()).unwrap();
    wait_until("ready", || readyz(&fx).0 == 200).unwrap();
    assert!(
        fx.agent.log().contains("a new configuration"),
        "{}",
        fx.agent.log()
    );
}

/// Stopping the agent (upgrade, restart) leaves the entry and binary, so new pods fail closed
/// until it is back; `uninstall` removes both and leaves the primary's config as it was.
#[test]
fn stop_leaves_the_entry_and_uninstall_removes_it() {
    if !require_root() {
        return;
    }
    let mut fx = AgentFixture::spawn_cni(Path::new(TESTKIT), 0, &[]).unwrap();
    let cni = fx.agent.paths.cni.clone().unwrap();
    let conflist = cni.conf_dir.join("10-bridge.conflist");
    write_as_primary(&conflist, &primary("k8s"), 0o644);
    fx.agent.wait_ready(AGENT_START).unwrap();
    assert_eq!(types(&conflist), ["bridge", "portmap", "sluice-cni"]);
    // No ambient namespaces set: the list is written, empty (the plugin passes other pods
    // while the agent is down).
    assert_eq!(
        read(&conflist).unwrap()["plugins"][2]["ambient_namespaces"],
        json!([])
    );

    let status = fx.agent.terminate().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(types(&conflist), ["bridge", "portmap", "sluice-cni"]);
    assert!(cni.bin_dir.join("sluice-cni").exists());

    fx.agent.restart().unwrap();
    fx.agent.wait_ready(AGENT_START).unwrap();
    fx.agent.uninstall().unwrap();
    assert_eq!(read(&conflist).unwrap(), primary("k8s"));
    assert!(!cni.bin_dir.join("sluice-cni").exists());
}

fn install_cni(work: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(agent_bin());
    c.arg("--control-socket")
        .arg(work.join("agent.sock"))
        .args(["install-cni", "--cni-conf-dir"])
        .arg(work.join("net.d"))
        .arg("--cni-bin-dir")
        .arg(work.join("bin"))
        .args(extra);
    c
}

/// `sluice-agent install-cni` (no privilege needed): fails without a primary config, chains
/// into one, waits for one with `--wait`.
#[test]
fn install_cni_runs_once() {
    let work = Workdir::new().unwrap();
    let out = install_cni(work.path(), &[]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no CNI network configuration"), "{err}");

    let mut waiting = install_cni(work.path(), &["--wait"]).spawn().unwrap();
    let conflist: PathBuf = work.path().join("net.d/20-ptp.conflist");
    write_as_primary(&conflist, &primary("ptp"), 0o644);
    let status = waiting.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(types(&conflist), ["bridge", "portmap", "sluice-cni"]);
    assert!(work.path().join("bin/sluice-cni").exists());

    // Once more: nothing to do, same answer.
    let out = install_cni(work.path(), &[]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        conflist.display().to_string()
    );
}
