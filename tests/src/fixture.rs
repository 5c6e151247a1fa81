//! A dataplane under test: a topology of pod namespaces, a cgroup of its own holding every
//! process of the test (the programs attach there, never to the machine's cgroup root), a
//! unique bpffs pin directory, and the loaded `Dataplane`.
//!
//! Dropping the fixture uninstalls the dataplane before the guards remove the namespaces,
//! the cgroup and the pin directory, so a failing test leaves nothing behind either.
use std::{collections::HashMap, path::Path};

use anyhow::{Context, Result};
use sluice_agent::{
    dataplane::{Dataplane, DataplaneConfig, EnrollOptions},
    netns::Netns,
};

use crate::harness::{App, Bpffs, Cgroup, Peer, Pod, Topology, ensure_bpffs_mounted};

pub struct DataplaneFixture {
    // Field order is drop order: the dataplane first (it needs the namespaces to clean up).
    dp: Option<Dataplane>,
    cookies: HashMap<u64, std::path::PathBuf>,
    pub topo: Topology,
    pub cgroup: Cgroup,
    pub bpffs: Bpffs,
    testkit: std::path::PathBuf,
}

impl DataplaneFixture {
    /// `pods` pod namespaces and a loaded dataplane watching the fixture's cgroup.
    pub fn new(testkit: &Path, pods: usize, accelerate: bool) -> Result<Self> {
        ensure_bpffs_mounted()?;
        let topo = Topology::new(pods)?;
        let cgroup = Cgroup::new("sltest")?;
        let bpffs = Bpffs::new()?;
        let mut fx = DataplaneFixture {
            dp: None,
            cookies: HashMap::new(),
            topo,
            cgroup,
            bpffs,
            testkit: testkit.to_path_buf(),
        };
        fx.dp = Some(fx.load(accelerate).context("loading the dataplane")?);
        Ok(fx)
    }

    /// Loads the dataplane as an agent running in the topology's node namespace would see it:
    /// connections opened there are the node's own.
    fn load(&self, accelerate: bool) -> Result<Dataplane> {
        let dp = Dataplane::load(&self.config(accelerate))?;
        dp.set_node_netns(&Netns::open(self.topo.node().path())?)?;
        Ok(dp)
    }

    /// Like a restart with another build of the object: the same programs, loaded under
    /// another object id, take over from the running ones.
    pub fn reload_as(&mut self, object_id: &str) -> Result<&mut Dataplane> {
        self.dp = None;
        let dp = Dataplane::load_as(&self.config(false), object_id)?;
        dp.set_node_netns(&Netns::open(self.topo.node().path())?)?;
        self.dp = Some(dp);
        Ok(self.dp())
    }

    pub fn config(&self, accelerate: bool) -> DataplaneConfig {
        DataplaneConfig {
            pin_root: self.bpffs.path().to_path_buf(),
            cgroup: self.cgroup.path().to_path_buf(),
            accelerate,
            ebpf_debug_log: false,
        }
    }

    pub fn dp(&mut self) -> &mut Dataplane {
        self.dp.as_mut().expect("dataplane loaded")
    }

    /// The dataplane, for use from several threads at once.
    pub fn dp_shared(&self) -> &Dataplane {
        self.dp.as_ref().expect("dataplane loaded")
    }

    /// Drops the `Dataplane` (as an agent exiting would): everything stays attached.
    pub fn drop_dataplane(&mut self) {
        self.dp = None;
    }

    /// Loads the dataplane again (as a restarted agent would).
    pub fn reload(&mut self, accelerate: bool) -> Result<&mut Dataplane> {
        self.dp = None;
        self.dp = Some(self.load(accelerate)?);
        Ok(self.dp())
    }

    pub fn pod(&self, i: usize) -> &Pod {
        self.topo.pod(i)
    }

    pub fn enroll(&mut self, i: usize, opts: EnrollOptions) -> Result<u64> {
        let pod = self.topo.pod(i);
        let ips = pod.ips();
        let path = pod.path().to_path_buf();
        let ns = Netns::open(&path)?;
        let cookie = self.dp().enroll(&ns, &ips, opts)?;
        self.cookies.insert(cookie, path);
        Ok(cookie)
    }

    pub fn unenroll(&mut self, i: usize) -> Result<()> {
        let ns = Netns::open(self.topo.pod(i).path())?;
        self.dp().unenroll(&ns)?;
        Ok(())
    }

    /// An app command server inside pod `i`, in the fixture's cgroup.
    pub fn app(&self, i: usize) -> Result<App> {
        App::spawn(
            &self.testkit,
            Some(self.topo.pod(i).path()),
            Some(&self.cgroup),
        )
    }

    /// An app command server in the node namespace (the "host"), in the fixture's cgroup.
    pub fn node_app(&self) -> Result<App> {
        App::spawn(
            &self.testkit,
            Some(self.topo.node().path()),
            Some(&self.cgroup),
        )
    }

    /// The ztunnel-like peer inside pod `i`, in the fixture's cgroup.
    pub fn peer(&self, i: usize) -> Result<Peer> {
        Peer::start(
            &self.testkit,
            Some(self.topo.pod(i).path()),
            Some(&self.cgroup),
        )
    }

    /// Removes everything the dataplane installed, checking the pin directory is gone.
    pub fn uninstall(&mut self) -> Result<()> {
        if let Some(dp) = self.dp.take() {
            let cookies = self.cookies.clone();
            dp.uninstall(|c| cookies.get(&c).and_then(|p| Netns::open(p).ok()))?;
        }
        Ok(())
    }
}

impl Drop for DataplaneFixture {
    fn drop(&mut self) {
        if let Err(e) = self.uninstall() {
            eprintln!("fixture: uninstall failed: {e:#}");
        }
    }
}
