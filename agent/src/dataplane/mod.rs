//! The dataplane: loads Sluice's eBPF programs, attaches them, and enrolls pod network
//! namespaces so that their traffic goes through ztunnel exactly as upstream's in-pod iptables
//! rules would send it.
//!
//! Everything but one link per pod is attached once, at the cgroup level. A pod gets: three
//! sysctls, a rule and a route per family, its `sk_lookup` link, and map entries. Enrollments
//! are independent of each other: `Dataplane` is `Sync` and its methods take `&self`, so several
//! threads may enroll at once (the kernel serialises each map update by itself).
//!
//! Lifecycle: `Dataplane::load` adopts what a previous agent pinned (or attaches it the first
//! time; a new build takes over running pods in place); `enroll`/`unenroll` act on a live
//! namespace whose processes keep running. Everything attached is pinned, so redirection keeps
//! working while no agent runs.
mod attach;
mod blackhole;
pub mod bpf_sys;
mod cgroup;
mod error;
pub mod features;
mod listeners;
mod object;
mod pins;
pub mod pod_net;
mod proc_sys;
mod table;
pub mod trace;

use std::{
    collections::HashSet,
    net::IpAddr,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
    time::Instant,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray},
};
use sluice_common::{
    Addr, Counter, Endpoint, GLOBAL_ACCELERATE, GLOBAL_TRACE, GlobalConfig, ListenerKey,
    MAX_POD_IPS, POD_BYPASS_INBOUND, POD_DNS_CAPTURE, POD_NO_IPV6, PodAddr, PodConfig, SockKey,
    maps, progs,
};
use tracing::{debug, info, warn};

pub use cgroup::cgroup2_root;
pub use error::Error;
pub use object::object_id;
pub use pins::PinLayout;

use crate::netns::{Netns, current_cookie};
use attach::{
    attach_cgroup_programs, attach_sk_lookup, attach_sk_msg, load_program, remove_other_builds,
    sk_lookup_program, static_name, take_map,
};
use error::io_err;
use object::OBJECT;
use pod_net::{ReplySources, Sysctls};
use table::Table;
pub use trace::{TraceReader, TraceRecord};

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
    /// without it the verifier drops the log calls. Adopted programs keep their setting.
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
    /// The pin's name: the program (cgroup links) or `sk_lookup` (pod links).
    pub pin: String,
    pub link_id: u32,
    pub prog_id: u32,
    /// `cgroup`, `netns`, or the kernel's link type number.
    pub kind: String,
    /// For pod links: the netns cookie.
    pub netns_cookie: Option<u64>,
}

/// Points inside `enroll`, for tests that make the world change mid-way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollStage {
    /// Pod netns configured and its sk_lookup link attached; not yet published to the map.
    Attached,
}

/// A loaded dataplane. Dropping it leaves everything attached (that is the point of pinning).
pub struct Dataplane {
    layout: PinLayout,
    object_id: String,
    /// Keeps this load's programs in the kernel while they may be attached from here.
    _ebpf: Mutex<Ebpf>,
    loggers: Mutex<Vec<aya_log::EbpfLogger<&'static dyn log::Log>>>,
    /// The sk_lookup program pods' links point at, and its id.
    sk_lookup: OwnedFd,
    sk_lookup_id: u32,
    pods: Table<u64, PodConfig>,
    pod_addrs: Table<Addr, PodAddr>,
    listeners: Table<ListenerKey, u32>,
    node_conns: Table<Endpoint, u8>,
    return_conns: Table<SockKey, u8>,
    socks: Table<SockKey, u64>,
    no_accel: Table<SockKey, u8>,
    config_map: Table<u32, GlobalConfig>,
    /// What `config_map` holds; changed under this lock (read-modify-write of one entry).
    config: Mutex<GlobalConfig>,
    counters: PerCpuArray<MapData, u64>,
    /// This process's netns cookie: never enrolled.
    agent_netns: u64,
    /// Where inbound SYNs without a ztunnel listener go to be dropped silently, per family
    /// (none if it could not be made: they are then dropped with a reset).
    _black_holes: Vec<blackhole::BlackHole>,
    /// Netns cookies being enrolled or unenrolled right now.
    busy: Mutex<HashSet<u64>>,
    /// Where pods' sysctls are opened (a procfs of our own: see `proc_sys`).
    proc_sys: proc_sys::ProcSys,
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

/// A pod's `POD_*` flags for `opts`.
fn pod_flags(opts: EnrollOptions) -> u32 {
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
    flags
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Marks a netns cookie busy for the life of the guard.
struct BusyGuard<'a> {
    set: &'a Mutex<HashSet<u64>>,
    cookie: u64,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        lock(self.set).remove(&self.cookie);
    }
}

impl Dataplane {
    /// Loads the embedded eBPF object, adopting pinned maps and links of a previous agent, or
    /// attaching them the first time. A new build attaches its cgroup programs, moves every
    /// pod's sk_lookup link to its own program in place (`BPF_LINK_UPDATE`), and only then
    /// removes the old build's: there is no moment without redirection.
    pub fn load(cfg: &DataplaneConfig) -> Result<Self, Error> {
        Self::load_as(cfg, &object_id())
    }

    #[doc(hidden)]
    /// `load`, naming this build `object_id` (tests use it to stand for another build of the
    /// same object).
    pub fn load_as(cfg: &DataplaneConfig, object_id: &str) -> Result<Self, Error> {
        let layout = PinLayout::new(&cfg.pin_root);
        layout.create().map_err(io_err(format!(
            "preparing pin directory {}",
            cfg.pin_root.display()
        )))?;
        // Off: the verifier removes every log call. Debug: they cost a ring buffer write each.
        let log_level: u8 = if cfg.ebpf_debug_log {
            aya_log::Level::Debug as u8
        } else {
            0
        };
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(layout.maps())
            .override_global(aya_log::LEVEL, &log_level, true)
            .load(OBJECT)
            .map_err(|e| Error::Unsupported {
                what: "the eBPF object's maps",
                needs: features::describe(features::MAPS),
                kernel: features::kernel_release(),
                source: Box::new(e),
            })?;
        for (name, program) in ebpf.programs_mut() {
            load_program(program).map_err(|source| {
                let name = static_name(name);
                Error::Unsupported {
                    what: name,
                    needs: features::describe(features::of_program(name)),
                    kernel: features::kernel_release(),
                    source: Box::new(source),
                }
            })?;
        }
        let loggers = if cfg.ebpf_debug_log {
            aya_log::EbpfLogger::init(&mut ebpf)
                .ok()
                .into_iter()
                .collect()
        } else {
            Vec::new()
        };
        let adopted = attach_cgroup_programs(&ebpf, &layout, object_id, &cfg.cgroup)?;
        let (sk_lookup, sk_lookup_id) = sk_lookup_program(&ebpf, &layout, object_id)?;
        attach_sk_msg(&mut ebpf)?;
        let agent_netns = current_cookie().map_err(io_err("reading the agent's netns cookie"))?;
        let listeners: Table<ListenerKey, u32> = Table::take(&mut ebpf, maps::LISTENERS)?;
        let black_holes = [
            (false, ListenerKey::BLACK_HOLE_V4),
            (true, ListenerKey::BLACK_HOLE_V6),
        ]
        .into_iter()
        .filter_map(|(v6, key)| {
            let made = blackhole::BlackHole::new(v6).and_then(|bh| {
                let fd = std::os::fd::AsRawFd::as_raw_fd(&bh.listener()) as u32;
                listeners.put(&key, &fd).map_err(std::io::Error::other)?;
                Ok(bh)
            });
            made.inspect_err(|e| warn!(v6, error = %e, "no black hole: inbound SYNs without a ztunnel listener will be reset, not dropped silently"))
                .ok()
        })
        .collect();
        let dp = Dataplane {
            pods: Table::take(&mut ebpf, maps::PODS)?,
            pod_addrs: Table::take(&mut ebpf, maps::POD_ADDRS)?,
            listeners,
            _black_holes: black_holes,
            node_conns: Table::take(&mut ebpf, maps::NODE_CONNS)?,
            return_conns: Table::take(&mut ebpf, maps::RETURN_CONNS)?,
            socks: Table::take(&mut ebpf, maps::SOCKS)?,
            no_accel: Table::take(&mut ebpf, maps::NO_ACCEL)?,
            config_map: Table::take(&mut ebpf, maps::CONFIG)?,
            counters: take_map(&mut ebpf, maps::COUNTERS)?,
            config: Mutex::new(GlobalConfig {
                flags: 0,
                _pad: 0,
                // The node's connections are the agent's netns's until told otherwise.
                node_netns: agent_netns,
            }),
            layout,
            object_id: object_id.to_string(),
            _ebpf: Mutex::new(ebpf),
            loggers: Mutex::new(loggers),
            sk_lookup,
            sk_lookup_id,
            agent_netns,
            busy: Mutex::new(HashSet::new()),
            proc_sys: proc_sys::ProcSys::default(),
            adopted,
            hook: None,
        };
        // No trace client is attached to a freshly loaded agent.
        dp.update_config(|c| {
            c.flags = if cfg.accelerate { GLOBAL_ACCELERATE } else { 0 };
        })?;
        dp.take_over_pods();
        remove_other_builds(&dp.layout, object_id)?;
        info!(root = %cfg.pin_root.display(), cgroup = %cfg.cgroup.display(), adopted, "dataplane loaded");
        Ok(dp)
    }

    /// Points every pod's sk_lookup link at this build's program, in place.
    fn take_over_pods(&self) {
        let Ok(pods) = std::fs::read_dir(self.layout.pods()) else {
            return;
        };
        for pod in pods.flatten() {
            let pin = pod.path().join("sk_lookup");
            let Ok(link) = bpf_sys::obj_get(&pin) else {
                continue;
            };
            let Ok(info) = bpf_sys::link_info(link.as_fd()) else {
                continue;
            };
            if info.prog_id == self.sk_lookup_id {
                continue;
            }
            match bpf_sys::link_update(link.as_fd(), self.sk_lookup.as_fd()) {
                Ok(()) => {
                    info!(pod = ?pod.file_name(), "pod moved to this build's sk_lookup program")
                }
                Err(e) => {
                    warn!(pod = ?pod.file_name(), error = %e, "could not update a pod's sk_lookup link")
                }
            }
        }
    }

    /// Readers of the programs' log ring buffers (only when loaded with `ebpf_debug_log`), each
    /// an fd to poll; `flush` forwards records to the `log` crate (and so to tracing). After a
    /// restart, adopted programs keep writing to their own load's buffer: it is read too.
    pub fn take_loggers(&self) -> Vec<aya_log::EbpfLogger<&'static dyn log::Log>> {
        let mut loggers = std::mem::take(&mut *lock(&self.loggers));
        if self.adopted && !loggers.is_empty() {
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

    /// The id of the sk_lookup program pods are (or will be) linked to.
    pub fn sk_lookup_prog_id(&self) -> u32 {
        self.sk_lookup_id
    }

    #[doc(hidden)]
    /// Called at `EnrollStage`s: lets tests change the world in the middle of an enrollment.
    pub fn set_enroll_hook(&mut self, hook: impl Fn(EnrollStage) + Send + Sync + 'static) {
        self.hook = Some(Box::new(hook));
    }

    fn update_config(&self, f: impl FnOnce(&mut GlobalConfig)) -> Result<(), Error> {
        let mut cfg = lock(&self.config);
        f(&mut cfg);
        self.config_map.put(&0, &cfg)
    }

    pub fn set_accelerate(&self, on: bool) -> Result<(), Error> {
        self.update_config(|c| {
            c.flags = (c.flags & !GLOBAL_ACCELERATE) | if on { GLOBAL_ACCELERATE } else { 0 };
        })
    }

    /// Turns decision tracing on or off (see [`trace`]). Off costs the programs one array
    /// lookup per decision.
    pub fn set_trace(&self, on: bool) -> Result<(), Error> {
        self.update_config(|c| {
            c.flags = (c.flags & !GLOBAL_TRACE) | if on { GLOBAL_TRACE } else { 0 };
        })
    }

    /// Names the node's network namespace: TCP connections its sockets open are exempt from
    /// inbound capture (kubelet probes, hostNetwork processes), and it cannot be enrolled.
    /// By default it is the agent's own.
    pub fn set_node_netns(&self, netns: &Netns) -> Result<(), Error> {
        let cookie = netns.cookie()?;
        self.update_config(|c| c.node_netns = cookie)
    }

    fn node_netns(&self) -> u64 {
        lock(&self.config).node_netns
    }

    fn mark_busy(&self, cookie: u64, path: &Path) -> Result<BusyGuard<'_>, Error> {
        if !lock(&self.busy).insert(cookie) {
            return Err(Error::Busy(path.to_path_buf()));
        }
        Ok(BusyGuard {
            set: &self.busy,
            cookie,
        })
    }

    /// Enrolls the pod network namespace `netns` whose addresses are `ips`. Returns its netns
    /// cookie. On error nothing of the attempt is left behind.
    pub fn enroll(&self, netns: &Netns, ips: &[IpAddr], opts: EnrollOptions) -> Result<u64, Error> {
        let started = Instant::now();
        if ips.len() > MAX_POD_IPS {
            return Err(Error::TooManyIps(ips.len()));
        }
        let cookie = netns.cookie()?;
        let path = netns.path();
        if cookie == self.node_netns() {
            return Err(Error::NodeNetns(path.to_path_buf()));
        }
        if cookie == self.agent_netns {
            return Err(Error::AgentNetns(path.to_path_buf()));
        }
        let _busy = self.mark_busy(cookie, path)?;
        if self.pods.get(&cookie)?.is_some() {
            return Err(Error::AlreadyEnrolled(path.to_path_buf()));
        }
        let mut cfg = PodConfig::new(pod_flags(opts), ips);
        match self.enroll_steps(netns, cookie, &mut cfg, ips) {
            Ok(()) => {
                info!(netns = %path.display(), cookie, ?ips, ?opts, elapsed_us = started.elapsed().as_micros() as u64, "pod enrolled");
                Ok(cookie)
            }
            Err(e) => {
                warn!(netns = %path.display(), error = %e, "enrollment failed; rolling back");
                if let Err(rb) = self.teardown(Some(netns), cookie, &cfg) {
                    warn!(netns = %path.display(), error = %rb, "rollback incomplete");
                }
                Err(e)
            }
        }
    }

    fn enroll_steps(
        &self,
        netns: &Netns,
        cookie: u64,
        cfg: &mut PodConfig,
        ips: &[IpAddr],
    ) -> Result<(), Error> {
        let pod_dir = self.layout.pod(cookie);
        // Leftovers of an attempt interrupted by a crash (or of a previous build's layout).
        pins::detach_and_remove(&pod_dir)
            .map_err(io_err(format!("removing {}", pod_dir.display())))?;
        std::fs::create_dir_all(&pod_dir)
            .map_err(io_err(format!("creating {}", pod_dir.display())))?;

        // Inside the pod: sysctls (saved first, so that they can be restored), then the rule and
        // route, and the addresses the netns has.
        let sources = ReplySources::of(ips);
        let sysctl_root = self.proc_sys.root();
        let (saved, result) = netns.run(|| {
            let saved = match Sysctls::read(&sysctl_root) {
                Ok(v) => v,
                Err(e) => return (None, Err(io_err("reading the pod's sysctls")(e))),
            };
            let result = Sysctls::ENROLLED
                .write(&sysctl_root)
                .map_err(io_err("setting the pod's sysctls"))
                .and_then(|()| {
                    pod_net::add_reply_route(sources).map_err(io_err("adding the reply route"))
                })
                .and_then(|addrs| {
                    let listening = listeners::ztunnel_port_listeners(&addrs)
                        .map_err(io_err("reading the pod's TCP listeners"))?;
                    Ok((addrs, listening))
                });
            (Some(saved), result)
        })?;
        if let Some(s) = saved {
            cfg.saved_fwmark_accept = s.fwmark_accept;
            cfg.saved_reflect4 = s.reflect4;
            cfg.saved_reflect6 = s.reflect6;
        }
        let (addrs, listening) = result?;
        for addr in addrs {
            if !cfg.add_ip(addr) {
                debug!(%addr, "more addresses than a pod keeps; inbound to this one is dropped");
            }
        }

        // sk_lookup finds the pod by address: the addresses first, then the link.
        let pod_addr = PodAddr {
            netns: cookie,
            flags: cfg.flags,
            _pad: 0,
        };
        for ip in cfg.ips() {
            self.pod_addrs.put(&Addr::from(ip), &pod_addr)?;
        }
        attach_sk_lookup(
            self.sk_lookup.as_fd(),
            netns.as_fd(),
            &self.layout.pod_link(cookie),
        )?;
        if let Some(hook) = &self.hook {
            hook(EnrollStage::Attached);
        }
        // We hold the namespace open, so it cannot disappear under us; but if its path is gone
        // the pod is gone, and enrolling it would leave state nobody will clean up.
        if !netns.still_at_path() {
            return Err(Error::NetnsVanished(netns.path().to_path_buf()));
        }
        // Publishing the config is what starts outbound redirection (and the listener
        // bookkeeping): last. Listeners that were there before are taken in after it, so that
        // none can slip between the two.
        self.pods.put(&cookie, cfg)?;
        self.adopt_listeners(cookie, &listening);
        Ok(())
    }

    /// Puts listeners on ztunnel's ports that predate the enrollment into `SL_LISTENERS`
    /// (see `listeners.rs`). Whether they are ztunnel's is decided by their mark, later.
    fn adopt_listeners(&self, cookie: u64, listening: &[listeners::Listener]) {
        for l in listening {
            let key = ListenerKey {
                netns: cookie,
                port: u32::from(l.port),
                _pad: 0,
            };
            if matches!(self.listeners.get(&key), Ok(Some(_))) {
                continue;
            }
            match listeners::socket_by_inode(l.inode) {
                Ok(Some(fd)) => {
                    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd) as u32;
                    match self.listeners.put(&key, &raw) {
                        Ok(()) => info!(
                            cookie,
                            port = l.port,
                            "adopted a listener that was there before enrollment"
                        ),
                        Err(e) => {
                            warn!(cookie, port = l.port, error = %e, "could not adopt a listener")
                        }
                    }
                }
                Ok(None) => debug!(
                    cookie,
                    port = l.port,
                    "a listener went away before it could be adopted"
                ),
                Err(e) => warn!(cookie, port = l.port, error = %e, "could not adopt a listener"),
            }
        }
    }

    /// Stops redirecting `netns` and removes everything enrollment put there. New connections
    /// are plain at once; established ones are left alone.
    pub fn unenroll(&self, netns: &Netns) -> Result<(), Error> {
        let cookie = netns.cookie()?;
        let _busy = self.mark_busy(cookie, netns.path())?;
        let cfg = self
            .pods
            .get(&cookie)?
            .ok_or_else(|| Error::NotEnrolled(netns.path().to_path_buf()))?;
        self.teardown(Some(netns), cookie, &cfg)?;
        info!(netns = %netns.path().display(), cookie, "pod unenrolled");
        Ok(())
    }

    /// Changes an enrolled netns's options in place: they are flags in its `SL_PODS` entry and
    /// its addresses' `SL_POD_ADDRS` entries, read by the programs on every decision, so the
    /// next connection follows them and nothing is detached (no moment un-redirected).
    pub fn update_options(&self, netns: &Netns, opts: EnrollOptions) -> Result<(), Error> {
        let cookie = netns.cookie()?;
        let _busy = self.mark_busy(cookie, netns.path())?;
        let mut cfg = self
            .pods
            .get(&cookie)?
            .ok_or_else(|| Error::NotEnrolled(netns.path().to_path_buf()))?;
        cfg.flags = pod_flags(opts);
        for ip in cfg.ips() {
            let addr = Addr::from(ip);
            if let Some(mut a) = self.pod_addrs.get(&addr)?
                && a.netns == cookie
            {
                a.flags = cfg.flags;
                self.pod_addrs.put(&addr, &a)?;
            }
        }
        self.pods.put(&cookie, &cfg)?;
        info!(netns = %netns.path().display(), cookie, ?opts, "pod options updated in place");
        Ok(())
    }

    /// Drops what is kept for a netns that no longer exists (its rules and link went with it).
    /// Harmless if it was never enrolled.
    pub fn forget(&self, cookie: u64) -> Result<(), Error> {
        let cfg = self.pods.get(&cookie)?.unwrap_or_default();
        self.teardown(None, cookie, &cfg)
    }

    /// Undoes a pod's configuration, in the reverse order of enrollment: the map entry (outbound
    /// stops), the link (inbound stops), addresses, then inside the netns (if it still exists)
    /// the rule, route and sysctls. ztunnel's listener entries are left to the kernel, which
    /// drops them when the sockets close (ztunnel closes them on the Del that follows).
    fn teardown(&self, netns: Option<&Netns>, cookie: u64, cfg: &PodConfig) -> Result<(), Error> {
        self.pods.delete(&cookie)?;
        let dir = self.layout.pod(cookie);
        pins::detach_and_remove(&dir).map_err(io_err(format!("removing {}", dir.display())))?;
        for ip in cfg.ips() {
            let addr = Addr::from(ip);
            // Only if it is still this pod's (addresses move between pods over time).
            if self
                .pod_addrs
                .get(&addr)?
                .is_some_and(|a| a.netns == cookie)
            {
                self.pod_addrs.delete(&addr)?;
            }
        }
        let Some(netns) = netns else {
            return Ok(());
        };
        // A netns enrolled before its sysctls were recorded has zeros: the kernel defaults.
        let saved = Sysctls {
            fwmark_accept: cfg.saved_fwmark_accept,
            reflect4: cfg.saved_reflect4,
            reflect6: cfg.saved_reflect6,
        };
        let sysctl_root = self.proc_sys.root();
        netns.run(|| -> Result<(), Error> {
            pod_net::remove_reply_route().map_err(io_err("removing the reply route"))?;
            saved
                .write(&sysctl_root)
                .map_err(io_err("restoring the pod's sysctls"))
        })?
    }

    /// Enrolled namespaces by netns cookie.
    pub fn enrolled(&self) -> Vec<(u64, PodConfig)> {
        self.pods.entries().unwrap_or_default()
    }

    pub fn is_enrolled(&self, cookie: u64) -> bool {
        matches!(self.pods.get(&cookie), Ok(Some(_)))
    }

    /// Whether the namespace with this cookie still exists, judged by its sk_lookup link (a
    /// netns link loses its namespace when the namespace is destroyed). None if there is no
    /// link to tell by.
    pub fn netns_alive(&self, cookie: u64) -> Option<bool> {
        let fd = bpf_sys::obj_get(&self.layout.pod_link(cookie)).ok()?;
        let info = bpf_sys::link_info(fd.as_fd()).ok()?;
        (info.link_type == bpf_sys::BPF_LINK_TYPE_NETNS).then_some(info.netns_ino != 0)
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

    /// Every pinned link: this build's cgroup links and each pod's sk_lookup link.
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
                    bpf_sys::BPF_LINK_TYPE_NETNS => "netns".to_string(),
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
            fill(maps::PODS, self.pods.count(), maps::PODS_CAPACITY),
            fill(
                maps::POD_ADDRS,
                self.pod_addrs.count(),
                maps::POD_ADDRS_CAPACITY,
            ),
            fill(
                maps::LISTENERS,
                self.listeners.count(),
                maps::LISTENERS_CAPACITY,
            ),
            fill(
                maps::NODE_CONNS,
                self.node_conns.count(),
                maps::NODE_CONNS_CAPACITY,
            ),
            fill(
                maps::RETURN_CONNS,
                self.return_conns.count(),
                maps::RETURN_CONNS_CAPACITY,
            ),
            fill(maps::SOCKS, self.socks.count(), maps::SOCKS_CAPACITY),
            fill(
                maps::NO_ACCEL,
                self.no_accel.count(),
                maps::NO_ACCEL_CAPACITY,
            ),
        ]
    }

    /// Removes everything the dataplane put on this node: every enrolled pod's configuration
    /// (`netns_of` opens a pod's namespace by cookie; pods it cannot open are forgotten), the
    /// cgroup links, the programs, the sockmap program, the maps and the pin directory.
    pub fn uninstall(self, netns_of: impl Fn(u64) -> Option<Netns>) -> Result<(), Error> {
        for (cookie, cfg) in self.enrolled() {
            let ns = netns_of(cookie);
            if let Err(e) = self.teardown(ns.as_ref(), cookie, &cfg) {
                warn!(cookie, error = %e, "pod cleanup incomplete");
            }
        }
        // Pod dirs of namespaces that are gone but were never unenrolled go with the root.
        let root = self.layout.root().to_path_buf();
        drop(self);
        pins::detach_and_remove(&root).map_err(io_err(format!("removing {}", root.display())))?;
        info!(root = %root.display(), "dataplane uninstalled");
        Ok(())
    }
}

impl Dataplane {
    /// A reader of the trace ring buffer (see [`Dataplane::set_trace`]).
    pub fn trace_reader(&self) -> Result<TraceReader, Error> {
        TraceReader::open(&self.layout)
    }
}
