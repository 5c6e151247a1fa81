//! The maps. Pinned ones outlive the agent process and are shared across agent restarts.
use aya_ebpf::{
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
};
use sluice_common::{Addr, Counter, GlobalConfig, OrigDst, PodConfig, SockKey, maps};

/// Enrolled pod network namespaces, by netns cookie.
#[map(name = "SL_PODS")]
pub static PODS: HashMap<u64, PodConfig> = HashMap::pinned(maps::PODS_CAPACITY, 0);

/// This node's own addresses: inbound traffic from them (kubelet probes) is not redirected.
#[map(name = "SL_HOST_ADDRS")]
pub static HOST_ADDRS: HashMap<Addr, u8> = HashMap::pinned(maps::HOST_ADDRS_CAPACITY, 0);

/// Original destination of each redirected app socket, for as long as the socket lives.
#[btf_map(name = "SL_SOCK_ORIG")]
pub static SOCK_ORIG: SkStorage<OrigDst> = SkStorage::new();

/// Original destination by the app socket's 4-tuple (as the app sees it), for SO_ORIGINAL_DST
/// asked on ztunnel's accepted socket. ztunnel asks right after accept, so LRU eviction only
/// ever drops entries nobody will ask for.
#[map(name = "SL_FLOW_ORIG")]
pub static FLOW_ORIG: LruHashMap<SockKey, OrigDst> =
    LruHashMap::pinned(maps::FLOW_ORIG_CAPACITY, 0);

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

#[inline(always)]
pub fn global_flags() -> u32 {
    CONFIG.get(0).map(|c| c.flags).unwrap_or(0)
}
