//! Types and constants shared by the eBPF programs and the agent.
//!
//! Everything here is `#[repr(C)]` plain data: it is the layout of the eBPF maps. Addresses are
//! kept exactly as the kernel hands them to eBPF programs: 16 bytes in network byte order, seen
//! as four `u32` words, with IPv4 stored IPv4-mapped (`::ffff:a.b.c.d`) so that one key type
//! serves both families. Ports are kept in host byte order.
#![no_std]

#[cfg(feature = "user")]
mod user;

/// Bump when a map's layout or meaning changes: pinned maps live under a directory named after it,
/// so an upgraded agent never reads a map written with another layout.
pub const MAP_ABI: u32 = 1;

/// ztunnel marks every socket it makes inside a pod with this mark (`SO_MARK`).
pub const ZTUNNEL_MARK: u32 = 0x539;
/// Mark given to the app's side of connections that ztunnel opened towards the app, so that the
/// app's replies are routed back to ztunnel locally (upstream's connmark value).
pub const REPLY_MARK: u32 = 0x111;
/// Only these bits of a mark are ours (upstream's mask).
pub const MARK_MASK: u32 = 0xfff;
/// Routing table holding `local default dev lo` in the pod netns, and the rule's priority.
pub const REPLY_ROUTE_TABLE: u32 = 100;
pub const REPLY_RULE_PRIORITY: u32 = 32764;

/// ztunnel's listeners inside each pod network namespace.
pub const PORT_OUTBOUND: u16 = 15001;
pub const PORT_INBOUND: u16 = 15006;
pub const PORT_HBONE: u16 = 15008;
pub const PORT_DNS: u16 = 15053;
pub const DNS_PORT: u16 = 53;

/// Upstream SNATs kubelet probes to this address; traffic from it is never redirected.
pub const PROBE_SNAT_V4: [u8; 4] = [169, 254, 7, 127];

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Per-pod flags in [`PodConfig::flags`].
pub const POD_DNS_CAPTURE: u32 = 1 << 0;
pub const POD_BYPASS_INBOUND: u32 = 1 << 1;
/// IPv6 traffic is left alone (Istio's `AMBIENT_IPV6=false`); IPv4-mapped stays IPv4.
pub const POD_NO_IPV6: u32 = 1 << 2;

/// Global flags in [`GlobalConfig::flags`].
pub const GLOBAL_ACCELERATE: u32 = 1 << 0;

pub const MAX_POD_IPS: usize = 4;

/// Map names (the names of the map statics in the eBPF object, and of their pins). Kernel
/// object names are cut at 15 characters, so these stay shorter.
pub mod maps {
    pub const PODS: &str = "SL_PODS";
    pub const HOST_ADDRS: &str = "SL_HOST_ADDRS";
    pub const SOCK_ORIG: &str = "SL_SOCK_ORIG";
    pub const FLOW_ORIG: &str = "SL_FLOW_ORIG";
    pub const SOCKS: &str = "SL_SOCKS";
    pub const NO_ACCEL: &str = "SL_NO_ACCEL";
    pub const CONFIG: &str = "SL_CONFIG";
    pub const COUNTERS: &str = "SL_COUNTERS";

    /// Capacities (max entries), shared by the map definitions and the fill-level reports.
    pub const PODS_CAPACITY: u32 = 8192;
    pub const HOST_ADDRS_CAPACITY: u32 = 1024;
    pub const FLOW_ORIG_CAPACITY: u32 = 65536;
    pub const SOCKS_CAPACITY: u32 = 65536;
    pub const NO_ACCEL_CAPACITY: u32 = 65536;
}

/// Program names in the eBPF object (all start with `sl_`, which is how `bpftool` shows ours).
pub mod progs {
    pub const CONNECT4: &str = "sl_connect4";
    pub const CONNECT6: &str = "sl_connect6";
    pub const SENDMSG4: &str = "sl_sendmsg4";
    pub const SENDMSG6: &str = "sl_sendmsg6";
    pub const RECVMSG4: &str = "sl_recvmsg4";
    pub const RECVMSG6: &str = "sl_recvmsg6";
    pub const GETPEERNAME4: &str = "sl_getpeer4";
    pub const GETPEERNAME6: &str = "sl_getpeer6";
    pub const GETSOCKOPT: &str = "sl_getsockopt";
    pub const SOCKOPS: &str = "sl_sockops";
    pub const SK_MSG: &str = "sl_sk_msg";
    pub const TC_POD_INGRESS: &str = "sl_pod_ingress";
    pub const TC_POD_INGRESS_L3: &str = "sl_pod_ingr_l3";
    pub const TC_POD_INGRESS_V4: &str = "sl_pod_ingr4";
    pub const TC_POD_INGRESS_V4_L3: &str = "sl_pod_ingr4_l3";
    pub const TC_LO_INGRESS: &str = "sl_lo_ingress";
}

/// An IPv6 address, or an IPv4 address in IPv4-mapped form, in network byte order.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug, Hash)]
pub struct Addr {
    pub words: [u32; 4],
}

impl Addr {
    /// The third word of an IPv4-mapped address (`::ffff:0:0/96`), in network byte order.
    pub const MAPPED_WORD: u32 = u32::from_be(0x0000_ffff);

    /// `ip4` in network byte order, as the kernel stores it.
    #[inline(always)]
    pub const fn v4(ip4: u32) -> Self {
        Addr {
            words: [0, 0, Self::MAPPED_WORD, ip4],
        }
    }

    #[inline(always)]
    pub const fn v6(words: [u32; 4]) -> Self {
        Addr { words }
    }

    #[inline(always)]
    pub const fn is_v4(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == Self::MAPPED_WORD
    }

    /// True for 127.0.0.0/8 (plain or mapped) and ::1: destinations that stay on the pod's `lo`.
    #[inline(always)]
    pub const fn is_loopback(&self) -> bool {
        if self.is_v4() {
            // First byte in network order is the lowest byte of the native word on little endian.
            self.words[3].to_ne_bytes()[0] == 127
        } else {
            self.words[0] == 0
                && self.words[1] == 0
                && self.words[2] == 0
                && self.words[3] == u32::from_be(1)
        }
    }

    /// 127.0.0.1 or ::1, in the family of `self`.
    #[inline(always)]
    pub const fn loopback_like(&self) -> Self {
        if self.is_v4() {
            Addr::v4(u32::from_ne_bytes([127, 0, 0, 1]))
        } else {
            Addr::v6([0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])])
        }
    }

    #[inline(always)]
    pub const fn is_unspecified(&self) -> bool {
        (self.words[0] | self.words[1] | self.words[3]) == 0
            && (self.words[2] == 0 || self.words[2] == Self::MAPPED_WORD)
    }
}

/// What the agent configures per enrolled pod network namespace (key: the netns cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PodConfig {
    /// `POD_*` flags.
    pub flags: u32,
    /// How many entries of `ips` are used.
    pub ip_count: u32,
    /// The pod's own addresses: traffic to them stays local, and the first one of each family is
    /// where redirected outbound connections land (as iptables REDIRECT keeps the pod IP as peer).
    pub ips: [Addr; MAX_POD_IPS],
    /// Value of `net.ipv4.tcp_fwmark_accept` in the netns before enrollment (userspace bookkeeping,
    /// kept here so that it survives an agent restart).
    pub saved_fwmark_accept: u32,
    pub _pad: u32,
}

impl PodConfig {
    /// Whether `addr` is one of the pod's own addresses.
    #[inline(always)]
    pub fn has_ip(&self, addr: &Addr) -> bool {
        // A counted loop over the fixed array: the verifier needs the bound.
        let mut i = 0;
        while i < MAX_POD_IPS {
            if (i as u32) < self.ip_count && self.ips[i] == *addr {
                return true;
            }
            i += 1;
        }
        false
    }

    /// The pod's first address of the same family as `like`, if it has one.
    #[inline(always)]
    pub fn first_ip_like(&self, like: &Addr) -> Option<Addr> {
        let v4 = like.is_v4();
        let mut i = 0;
        while i < MAX_POD_IPS {
            if (i as u32) < self.ip_count && self.ips[i].is_v4() == v4 {
                return Some(self.ips[i]);
            }
            i += 1;
        }
        None
    }

    /// Addresses that stay inside the pod: loopback and the pod's own.
    #[inline(always)]
    pub fn is_local(&self, addr: &Addr) -> bool {
        addr.is_loopback() || self.has_ip(addr)
    }
}

/// An original destination (as the app asked for it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// One end of a connection inside one network namespace: the key under which the app's side of a
/// redirected connection is remembered, looked up from ztunnel's accepted socket by its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub netns: u64,
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Key of a socket in the acceleration sockhash: its netns and 4-tuple as seen from that socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns: u64,
    pub local: Addr,
    pub remote: Addr,
    /// Host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u32,
}

impl SockKey {
    /// The key the peer socket of this connection has.
    #[inline(always)]
    pub const fn reversed(&self) -> Self {
        SockKey {
            netns: self.netns,
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
        }
    }
}

/// Node-wide settings (single entry, index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GlobalConfig {
    pub flags: u32,
    pub _pad: u32,
}

/// Indexes of the per-CPU counters array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    OutboundRedirected = 0,
    InboundRedirected,
    DnsUdpRedirected,
    DnsTcpRedirected,
    OrigDstAnswered,
    PeernameRewritten,
    RecvmsgRewritten,
    InboundNoListener,
    ReplyMarked,
    SocketsAccelerated,
    MessagesAccelerated,
    AccelFallback,
    FlowTableFull,
}

impl Counter {
    pub const COUNT: u32 = 13;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::OutboundRedirected,
        Counter::InboundRedirected,
        Counter::DnsUdpRedirected,
        Counter::DnsTcpRedirected,
        Counter::OrigDstAnswered,
        Counter::PeernameRewritten,
        Counter::RecvmsgRewritten,
        Counter::InboundNoListener,
        Counter::ReplyMarked,
        Counter::SocketsAccelerated,
        Counter::MessagesAccelerated,
        Counter::AccelFallback,
        Counter::FlowTableFull,
    ];

    /// Stable name used in metrics and `status`.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::OutboundRedirected => "outbound_redirected",
            Counter::InboundRedirected => "inbound_redirected",
            Counter::DnsUdpRedirected => "dns_udp_redirected",
            Counter::DnsTcpRedirected => "dns_tcp_redirected",
            Counter::OrigDstAnswered => "orig_dst_answered",
            Counter::PeernameRewritten => "peername_rewritten",
            Counter::RecvmsgRewritten => "recvmsg_rewritten",
            Counter::InboundNoListener => "inbound_no_listener_dropped",
            Counter::ReplyMarked => "reply_marked",
            Counter::SocketsAccelerated => "sockets_accelerated",
            Counter::MessagesAccelerated => "messages_accelerated",
            Counter::AccelFallback => "accel_fallback",
            Counter::FlowTableFull => "flow_table_full",
        }
    }
}
