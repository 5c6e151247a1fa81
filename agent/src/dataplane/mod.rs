//! The dataplane: loads Sluice's eBPF programs, attaches them, and enrolls pod network
//! namespaces so that their traffic goes through ztunnel exactly as upstream's in-pod iptables
//! rules would send it.
//!
//! Lifecycle: `Dataplane::load` adopts what a previous agent pinned (or attaches it the first
//! time); `enroll`/`unenroll` act on a live namespace whose processes keep running. Everything
//! attached is pinned, so redirection keeps working while no agent runs.
mod attach;
pub mod bpf_sys;
mod cgroup;
mod error;
mod object;
mod pins;
pub mod pod_net;

use std::{
    net::IpAddr,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, SockHash},
};
use sluice_common::{
    Addr, Counter, GLOBAL_ACCELERATE, GlobalConfig, MAX_POD_IPS, OrigDst, POD_BYPASS_INBOUND,
    POD_DNS_CAPTURE, POD_NO_IPV6, PodConfig, SockKey, maps, progs,
};
use tracing::{debug, info, warn};

pub use cgroup::cgroup2_root;
pub use error::Error;
pub use object::object_id;
pub use pins::PinLayout;

use crate::netns::Netns;
use attach::{
    attach_cgroup_programs, attach_sk_msg, attach_tc, load_program, static_name, take_map,
};
use error::{io_err, is_not_found};
use object::OBJECT;
use pod_net::InterfaceKind;

/// Where the dataplane pins its state and which cgroup its programs watch.
#[derive(Debug, Clone)]
pub struct DataplaneConfig {
    /// A directory on bpffs (created if missing; bpffs is mounted at /sys/fs/bpf if needed).
    pub pin_root: PathBuf,
    /// The cgroup v2 directory whose processes' sockets are redirected when their netns is
    /// enrolled: the cgroup2 root in production, a test's own cgroup in tests.
    pub cgroup: PathBuf,
    /// Short-circuit app↔ztunnel bytes with sockmap (see `ebpf/src/sk_msg.rs`).
    pub accelerate: bool,
    /// Let the eBPF programs log (aya-log, at debug level). Fixed when programs are loaded:
    /// adopted programs keep the setting they were loaded with.
    pub ebpf_debug_log: bool,
}

pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/sluice";

/// Per-pod options (Istio annotations `ambient.istio.io/dns-capture` and
/// `ambient.istio.io/bypass-inbound-capture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnrollOptions {
    pub dns_capture: bool,
    pub bypass_inbound: bool,
    /// Redirect IPv6 too (Istio's `AMBIENT_IPV6`); IPv4 is always redirected.
    pub ipv6: bool,
}

impl Default for EnrollOptions {
    fn default() -> Self {
        EnrollOptions {
            dns_capture: true,
            bypass_inbound: false,
            ipv6: true,
        }
    }
}

/// How full a map is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MapFill {
    pub name: &'static str,
    pub used: usize,
    pub capacity: usize,
}

/// One pinned link, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinkStatus {
    /// The pin's name: the program (cgroup links) or `tc-<ifindex>` (pod links).
    pub pin: String,
    pub link_id: u32,
    pub prog_id: u32,
    /// `cgroup`, `tcx`, or the kernel's link type number.
    pub kind: String,
    /// For pod links: the netns cookie.
    pub netns_cookie: Option<u64>,
}

/// Points inside `enroll`, for tests that make the world change mid-way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollStage {
    /// Pod netns configured and TC programs attached; not yet published to the map.
    Attached,
}

/// A loaded dataplane. Dropping it leaves everything attached (that is the point of pinning).
pub struct Dataplane {
    layout: PinLayout,
    object_id: String,
    ebpf: Ebpf,
    pods: BpfHashMap<MapData, u64, PodConfig>,
    host_addrs: BpfHashMap<MapData, Addr, u8>,
    config: Array<MapData, GlobalConfig>,
    counters: PerCpuArray<MapData, u64>,
    flows: BpfHashMap<MapData, SockKey, OrigDst>,
    socks: SockHash<MapData, SockKey>,
    no_accel: BpfHashMap<MapData, SockKey, u8>,
    adopted: bool,
    hook: Option<Box<dyn Fn(EnrollStage) + Send + Sync>>,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("root", &self.layout.root())
            .field("object_id", &self.object_id)
            .finish()
    }
}

impl Dataplane {
    /// Loads the embedded eBPF object, adopting pinned maps and links of a previous agent, or
    /// attaching them the first time. Links of another build of the object are replaced after
    /// this build's are attached, so there is no moment without redirection.
    pub fn load(cfg: &DataplaneConfig) -> Result<Self, Error> {
        let layout = PinLayout::new(&cfg.pin_root);
        layout.create().map_err(io_err(format!(
            "preparing pin directory {}",
            cfg.pin_root.display()
        )))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(layout.maps())
            .load(OBJECT)?;
        for (name, program) in ebpf.programs_mut() {
            load_program(program).map_err(|source| Error::Program {
                name: static_name(name),
                source,
            })?;
        }
        let object_id = object_id();
        let adopted = attach_cgroup_programs(&ebpf, &layout, &object_id, &cfg.cgroup)?;
        attach_sk_msg(&mut ebpf)?;
        let mut dp = Dataplane {
            pods: take_map(&mut ebpf, maps::PODS)?,
            host_addrs: take_map(&mut ebpf, maps::HOST_ADDRS)?,
            config: take_map(&mut ebpf, maps::CONFIG)?,
            counters: take_map(&mut ebpf, maps::COUNTERS)?,
            flows: take_map(&mut ebpf, maps::FLOW_ORIG)?,
            socks: take_map(&mut ebpf, maps::SOCKS)?,
            no_accel: take_map(&mut ebpf, maps::NO_ACCEL)?,
            layout,
            object_id,
            ebpf,
            adopted,
            hook: None,
        };
        dp.set_accelerate(cfg.accelerate)?;
        info!(root = %cfg.pin_root.display(), cgroup = %cfg.cgroup.display(), adopted, "dataplane loaded");
        Ok(dp)
    }

    /// Readers of the programs' log ring buffers: this load's (TC programs attached from now
    /// on), and, after a restart, the one of the adopted cgroup programs. Each is an fd to
    /// poll; `flush` forwards records to the `log` crate (and so to tracing).
    pub fn take_loggers(&mut self) -> Vec<aya_log::EbpfLogger<&'static dyn log::Log>> {
        let mut loggers: Vec<_> = aya_log::EbpfLogger::init(&mut self.ebpf)
            .ok()
            .into_iter()
            .collect();
        if self.adopted {
            let pin = self
                .layout
                .cgroup_links(&self.object_id)
                .join(progs::CONNECT4);
            let prog_id = bpf_sys::obj_get(&pin)
                .and_then(|fd| bpf_sys::link_info(fd.as_fd()))
                .map(|i| i.prog_id);
            if let Ok(Ok(logger)) = prog_id.map(aya_log::EbpfLogger::init_from_id) {
                loggers.push(logger);
            }
        }
        loggers
    }

    /// Whether `load` found this build's programs already attached (an agent restart).
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    pub fn object_id(&self) -> &str {
        &self.object_id
    }

    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    #[doc(hidden)]
    /// Called at `EnrollStage`s: lets tests change the world in the middle of an enrollment.
    pub fn set_enroll_hook(&mut self, hook: impl Fn(EnrollStage) + Send + Sync + 'static) {
        self.hook = Some(Box::new(hook));
    }

    pub fn set_accelerate(&mut self, on: bool) -> Result<(), Error> {
        let cfg = GlobalConfig {
            flags: if on { GLOBAL_ACCELERATE } else { 0 },
            _pad: 0,
        };
        self.config.set(0, cfg, 0).map_err(|source| Error::Map {
            name: maps::CONFIG,
            source,
        })
    }

    /// Replaces the set of this node's own addresses: inbound TCP from them (kubelet probes)
    /// is not redirected.
    pub fn set_host_addrs(&mut self, addrs: &[IpAddr]) -> Result<(), Error> {
        let want: Vec<Addr> = addrs.iter().map(|ip| Addr::from(*ip)).collect();
        let have: Vec<Addr> = self.host_addrs.keys().filter_map(Result::ok).collect();
        for old in have.iter().filter(|a| !want.contains(a)) {
            self.host_addrs.remove(old).map_err(|source| Error::Map {
                name: maps::HOST_ADDRS,
                source,
            })?;
        }
        for new in want.iter().filter(|a| !have.contains(a)) {
            self.host_addrs
                .insert(new, 1, 0)
                .map_err(|source| Error::Map {
                    name: maps::HOST_ADDRS,
                    source,
                })?;
        }
        Ok(())
    }

    /// Enrolls the pod network namespace `netns` whose addresses are `ips`. Returns its netns
    /// cookie. On error nothing of the attempt is left behind.
    pub fn enroll(
        &mut self,
        netns: &Netns,
        ips: &[IpAddr],
        opts: EnrollOptions,
    ) -> Result<u64, Error> {
        if ips.len() > MAX_POD_IPS {
            return Err(Error::TooManyIps(ips.len()));
        }
        let cookie = netns.cookie()?;
        if self.pods.get(&cookie, 0).is_ok() {
            return Err(Error::AlreadyEnrolled(netns.path().to_path_buf()));
        }
        let mut flags = 0;
        if opts.dns_capture {
            flags |= POD_DNS_CAPTURE;
        }
        if opts.bypass_inbound {
            flags |= POD_BYPASS_INBOUND;
        }
        if !opts.ipv6 {
            flags |= POD_NO_IPV6;
        }
        let mut cfg = PodConfig::new(flags, ips);
        match self.enroll_steps(netns, cookie, &mut cfg, opts) {
            Ok(()) => {
                info!(netns = %netns.path().display(), cookie, ?ips, ?opts, "pod enrolled");
                Ok(cookie)
            }
            Err(e) => {
                warn!(netns = %netns.path().display(), error = %e, "enrollment failed; rolling back");
                let _ = self.pods.remove(&cookie);
                if let Err(rb) = self.teardown(netns, cookie, cfg.saved_fwmark_accept) {
                    warn!(netns = %netns.path().display(), error = %rb, "rollback incomplete");
                }
                Err(e)
            }
        }
    }

    fn enroll_steps(
        &mut self,
        netns: &Netns,
        cookie: u64,
        cfg: &mut PodConfig,
        opts: EnrollOptions,
    ) -> Result<(), Error> {
        let pod_dir = self.layout.pod(cookie);
        // Leftovers of an attempt interrupted by a crash.
        pins::detach_and_remove(&pod_dir)
            .map_err(io_err(format!("removing {}", pod_dir.display())))?;
        std::fs::create_dir_all(&pod_dir)
            .map_err(io_err(format!("creating {}", pod_dir.display())))?;
        let lo_prog = self.prog_fd(progs::TC_LO_INGRESS)?;
        let (eth, l3) = if opts.ipv6 {
            (progs::TC_POD_INGRESS, progs::TC_POD_INGRESS_L3)
        } else {
            (progs::TC_POD_INGRESS_V4, progs::TC_POD_INGRESS_V4_L3)
        };
        let eth_prog = self.prog_fd(eth)?;
        let l3_prog = self.prog_fd(l3)?;
        let path = netns.path().to_path_buf();

        let (saved, result) = netns.run(|| {
            let saved = match pod_net::fwmark_accept() {
                Ok(v) => v,
                Err(e) => return (None, Err(io_err("reading tcp_fwmark_accept")(e))),
            };
            let result = (|| {
                pod_net::set_fwmark_accept(1).map_err(io_err("setting tcp_fwmark_accept"))?;
                let ifs = pod_net::interfaces().map_err(io_err("listing interfaces"))?;
                let lo = ifs
                    .iter()
                    .find(|i| i.kind == InterfaceKind::Loopback)
                    .ok_or(Error::NoLoopback(path.clone()))?;
                pod_net::add_reply_route(lo.index).map_err(io_err("adding the reply route"))?;
                attach_tc(lo_prog.as_fd(), lo.index, &pod_dir)?;
                if !opts.bypass_inbound {
                    for i in ifs.iter().filter(|i| i.kind != InterfaceKind::Loopback) {
                        let prog = if i.kind == InterfaceKind::Ethernet {
                            eth_prog.as_fd()
                        } else {
                            l3_prog.as_fd()
                        };
                        attach_tc(prog, i.index, &pod_dir)?;
                        debug!(interface = %i.name, "inbound redirection attached");
                    }
                }
                Ok(())
            })();
            (Some(saved), result)
        })?;
        if let Some(saved) = saved {
            cfg.saved_fwmark_accept = saved;
        }
        result?;
        if let Some(hook) = &self.hook {
            hook(EnrollStage::Attached);
        }
        // We hold the namespace open, so it cannot disappear under us; but if its path is gone
        // the pod is gone, and enrolling it would leave state nobody will clean up.
        if !netns.still_at_path() {
            return Err(Error::NetnsVanished(netns.path().to_path_buf()));
        }
        // Publishing the config is what starts outbound redirection: last.
        self.pods
            .insert(cookie, *cfg, 0)
            .map_err(|source| Error::Map {
                name: maps::PODS,
                source,
            })?;
        Ok(())
    }

    /// Stops redirecting `netns` and removes everything enrollment put there. New connections
    /// are plain at once; established ones are left alone.
    pub fn unenroll(&mut self, netns: &Netns) -> Result<(), Error> {
        let cookie = netns.cookie()?;
        let cfg = self
            .pods
            .get(&cookie, 0)
            .map_err(|_| Error::NotEnrolled(netns.path().to_path_buf()))?;
        self.pods.remove(&cookie).map_err(|source| Error::Map {
            name: maps::PODS,
            source,
        })?;
        self.teardown(netns, cookie, cfg.saved_fwmark_accept)?;
        info!(netns = %netns.path().display(), cookie, "pod unenrolled");
        Ok(())
    }

    /// Drops what is kept for a netns that no longer exists (its interfaces, rules and TC
    /// programs went with it). Harmless if it was never enrolled.
    pub fn forget(&mut self, cookie: u64) -> Result<(), Error> {
        match self.pods.remove(&cookie) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(source) => {
                return Err(Error::Map {
                    name: maps::PODS,
                    source,
                });
            }
        }
        let dir = self.layout.pod(cookie);
        pins::detach_and_remove(&dir).map_err(io_err(format!("removing {}", dir.display())))
    }

    /// Undoes a pod's configuration: TC links (by unpinning), reply route, sysctl.
    fn teardown(
        &mut self,
        netns: &Netns,
        cookie: u64,
        saved_fwmark_accept: u32,
    ) -> Result<(), Error> {
        let dir = self.layout.pod(cookie);
        pins::detach_and_remove(&dir).map_err(io_err(format!("removing {}", dir.display())))?;
        netns.run(|| -> Result<(), Error> {
            let ifs = pod_net::interfaces().map_err(io_err("listing interfaces"))?;
            if let Some(lo) = ifs.iter().find(|i| i.kind == InterfaceKind::Loopback) {
                pod_net::remove_reply_route(lo.index)
                    .map_err(io_err("removing the reply route"))?;
            }
            pod_net::set_fwmark_accept(saved_fwmark_accept)
                .map_err(io_err("restoring tcp_fwmark_accept"))
        })?
    }

    /// Enrolled namespaces by netns cookie.
    pub fn enrolled(&self) -> Vec<(u64, PodConfig)> {
        self.pods.iter().filter_map(Result::ok).collect()
    }

    pub fn is_enrolled(&self, cookie: u64) -> bool {
        self.pods.get(&cookie, 0).is_ok()
    }

    /// Whether the namespace with this cookie still exists, judged by the TC link on its `lo`
    /// (a TCX link loses its device when the namespace is destroyed). None if there is no link
    /// to tell by.
    pub fn netns_alive(&self, cookie: u64) -> Option<bool> {
        let dir = self.layout.pod(cookie);
        let entries = std::fs::read_dir(&dir).ok()?;
        let mut any = None;
        for entry in entries.flatten() {
            let fd = bpf_sys::obj_get(&entry.path()).ok()?;
            let info = bpf_sys::link_info(fd.as_fd()).ok()?;
            if info.link_type == bpf_sys::BPF_LINK_TYPE_TCX {
                any = Some(any.unwrap_or(false) || info.tcx_ifindex != 0);
            }
        }
        any
    }

    /// Sum over CPUs of each redirect counter.
    pub fn counters(&self) -> Vec<(Counter, u64)> {
        Counter::ALL
            .iter()
            .map(|c| {
                let total = self
                    .counters
                    .get(&(*c as u32), 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                (*c, total)
            })
            .collect()
    }

    /// Every pinned link: this build's cgroup links and each pod's TC links.
    pub fn links(&self) -> Vec<LinkStatus> {
        let mut out = Vec::new();
        let mut scan = |dir: &Path, cookie: Option<u64>| {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            let mut entries: Vec<_> = entries.flatten().collect();
            entries.sort_by_key(|e| e.file_name());
            for entry in entries {
                let Ok(fd) = bpf_sys::obj_get(&entry.path()) else {
                    continue;
                };
                let Ok(info) = bpf_sys::link_info(fd.as_fd()) else {
                    continue;
                };
                let kind = match info.link_type {
                    bpf_sys::BPF_LINK_TYPE_CGROUP => "cgroup".to_string(),
                    bpf_sys::BPF_LINK_TYPE_TCX => "tcx".to_string(),
                    other => other.to_string(),
                };
                out.push(LinkStatus {
                    pin: entry.file_name().to_string_lossy().into_owned(),
                    link_id: info.id,
                    prog_id: info.prog_id,
                    kind,
                    netns_cookie: cookie,
                });
            }
        };
        scan(&self.layout.cgroup_links(&self.object_id), None);
        if let Ok(pods) = std::fs::read_dir(self.layout.pods()) {
            for pod in pods.flatten() {
                let cookie = pod.file_name().to_string_lossy().parse().ok();
                scan(&pod.path(), cookie);
            }
        }
        out
    }

    /// Entries in use and capacity per map (for status and metrics).
    pub fn map_fill(&self) -> Vec<MapFill> {
        let fill = |name, used, capacity: u32| MapFill {
            name,
            used,
            capacity: capacity as usize,
        };
        vec![
            fill(maps::PODS, self.pods.keys().count(), maps::PODS_CAPACITY),
            fill(
                maps::HOST_ADDRS,
                self.host_addrs.keys().count(),
                maps::HOST_ADDRS_CAPACITY,
            ),
            fill(
                maps::FLOW_ORIG,
                self.flows.keys().count(),
                maps::FLOW_ORIG_CAPACITY,
            ),
            fill(maps::SOCKS, self.socks.keys().count(), maps::SOCKS_CAPACITY),
            fill(
                maps::NO_ACCEL,
                self.no_accel.keys().count(),
                maps::NO_ACCEL_CAPACITY,
            ),
        ]
    }

    /// Removes everything the dataplane put on this node: every enrolled pod's configuration
    /// (`netns_of` opens a pod's namespace by cookie; pods it cannot open are forgotten), the
    /// cgroup links, the sockmap program, the maps and the pin directory.
    pub fn uninstall(mut self, netns_of: impl Fn(u64) -> Option<Netns>) -> Result<(), Error> {
        for (cookie, cfg) in self.enrolled() {
            let _ = self.pods.remove(&cookie);
            match netns_of(cookie) {
                Some(ns) => {
                    if let Err(e) = self.teardown(&ns, cookie, cfg.saved_fwmark_accept) {
                        warn!(cookie, error = %e, "pod cleanup incomplete");
                    }
                }
                None => self.forget(cookie)?,
            }
        }
        // Pods dirs of namespaces that are gone but were never unenrolled.
        let root = self.layout.root().to_path_buf();
        drop(self);
        pins::detach_and_remove(&root).map_err(io_err(format!("removing {}", root.display())))?;
        info!(root = %root.display(), "dataplane uninstalled");
        Ok(())
    }

    fn prog_fd(&self, name: &'static str) -> Result<OwnedFd, Error> {
        attach::program_fd(&self.ebpf, name)?
            .as_fd()
            .try_clone_to_owned()
            .map_err(io_err(format!("duplicating the fd of {name}")))
    }
}
