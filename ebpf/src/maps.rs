//! The maps. Pinned ones outlive the agent process and are shared across agent restarts and
//! builds with the same layout (`MAP_ABI`).
use aya_ebpf::{
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
};
use sluice_common::{
    Addr, Counter, DnsDests, Endpoint, GlobalConfig, ListenerKey, PodAddr, PodConfig, SockKey, maps,
};

/// Enrolled pod network namespaces, by netns cookie.
#[map(name = "SL_PODS")]
pub static PODS: HashMap<u64, PodConfig> = HashMap::pinned(maps::PODS_CAPACITY, 0);

/// Every address of every enrolled pod: `sk_lookup` cannot read a netns cookie, so it finds
/// its pod by address (unique on a node).
#[map(name = "SL_POD_ADDRS")]
pub static POD_ADDRS: HashMap<Addr, PodAddr> = HashMap::pinned(maps::POD_ADDRS_CAPACITY, 0);

/// Listening sockets on 15001/15006/15008 in enrolled pods, filled by sockops at listen. Which
/// of them are ztunnel's is decided by their mark when a connection arrives. The kernel drops
/// a socket from the map when it closes.
#[map(name = "SL_LISTENERS")]
pub static LISTENERS: SockHash<ListenerKey> = SockHash::pinned(maps::LISTENERS_CAPACITY, 0);

/// Source (address, port) of TCP connects by sockets in the node's network namespace, from
/// connect until established (or closed): the SYNs that are exempt from inbound capture.
#[map(name = "SL_NODE_CONNS")]
pub static NODE_CONNS: LruHashMap<Endpoint, u8> = LruHashMap::pinned(maps::NODE_CONNS_CAPACITY, 0);

/// ztunnel's connects to an app from a client's address (the return path), by their 4-tuple as
/// ztunnel's socket sees it, from connect until established (or closed). Their SYN reaches the
/// app through the pod's own address, like inbound traffic does, and must not be captured.
#[map(name = "SL_RETURN_CONNS")]
pub static RETURN_CONNS: LruHashMap<SockKey, u8> =
    LruHashMap::pinned(maps::RETURN_CONNS_CAPACITY, 0);

/// Where each redirected DNS socket's queries really went, for as long as the socket lives.
#[btf_map(name = "SL_DNS_DESTS")]
pub static DNS_DESTS: SkStorage<DnsDests> = SkStorage::new();

/// app↔ztunnel sockets of enrolled pods, for same-node acceleration.
#[map(name = "SL_SOCKS")]
pub static SOCKS: SockHash<SockKey> = SockHash::pinned(maps::SOCKS_CAPACITY, 0);

/// Sockets that already sent bytes the normal way: they never switch to the short-circuit,
/// which would let later bytes overtake earlier ones.
#[map(name = "SL_NO_ACCEL")]
pub static NO_ACCEL: LruHashMap<SockKey, u8> = LruHashMap::pinned(maps::NO_ACCEL_CAPACITY, 0);

#[map(name = "SL_CONFIG")]
pub static CONFIG: Array<GlobalConfig> = Array::pinned(1, 0);

#[map(name = "SL_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT, 0);

/// Decisions for `sluice-agent trace`; written only while a trace client is attached.
#[map(name = "SL_TRACE")]
pub static TRACE: RingBuf = RingBuf::pinned(maps::TRACE_BYTES, 0);

#[inline(always)]
pub fn global_config() -> GlobalConfig {
    CONFIG.get(0).copied().unwrap_or_default()
}
