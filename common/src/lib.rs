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
pub const MAP_ABI: u32 = 2;

/// ztunnel marks every socket it makes inside a pod with this mark (`SO_MARK`).
pub const ZTUNNEL_MARK: u32 = 0x539;
/// Upstream's connmark value. A socket carrying it is routed to the pod's `lo` (rule + table
/// 100): the app's redirected outbound sockets, and both ends of ztunnel's connections to the app.
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

/// `lo` has this ifindex in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Per-pod flags in [`PodConfig::flags`] and [`PodAddr::flags`].
pub const POD_DNS_CAPTURE: u32 = 1 << 0;
pub const POD_BYPASS_INBOUND: u32 = 1 << 1;
/// IPv6 traffic is left alone (Istio's `AMBIENT_IPV6=false`); IPv4-mapped stays IPv4.
pub const POD_NO_IPV6: u32 = 1 << 2;

/// Global flags in [`GlobalConfig::flags`].
pub const GLOBAL_ACCELERATE: u32 = 1 << 0;
/// A trace client is attached: decisions go to the trace ring buffer.
pub const GLOBAL_TRACE: u32 = 1 << 1;

/// Pod IPs an enrollment may name.
pub const MAX_POD_IPS: usize = 4;
/// Addresses kept per pod: its IPs, then the other addresses its netns had at enrollment
/// (link-local ones, say).
pub const MAX_POD_ADDRS: usize = 8;
/// Unconnected DNS destinations remembered per socket (see [`DnsDests`]).
pub const DNS_DESTS: usize = 8;

/// Map names (the names of the map statics in the eBPF object, and of their pins). Kernel
/// object names are cut at 15 characters, so these stay shorter.
pub mod maps {
    pub const PODS: &str = "SL_PODS";
    pub const POD_ADDRS: &str = "SL_POD_ADDRS";
    pub const LISTENERS: &str = "SL_LISTENERS";
    pub const NODE_CONNS: &str = "SL_NODE_CONNS";
    pub const RETURN_CONNS: &str = "SL_RETURN_CONNS";
    pub const DNS_DESTS: &str = "SL_DNS_DESTS";
    pub const SOCKS: &str = "SL_SOCKS";
    pub const NO_ACCEL: &str = "SL_NO_ACCEL";
    pub const CONFIG: &str = "SL_CONFIG";
    pub const COUNTERS: &str = "SL_COUNTERS";
    pub const TRACE: &str = "SL_TRACE";

    /// Capacities (max entries), shared by the map definitions and the fill-level reports.
    pub const PODS_CAPACITY: u32 = 8192;
    pub const POD_ADDRS_CAPACITY: u32 = PODS_CAPACITY * super::MAX_POD_ADDRS as u32;
    /// Three listeners (15001, 15006, 15008) per pod.
    pub const LISTENERS_CAPACITY: u32 = PODS_CAPACITY * 4;
    /// Node-netns connects whose SYN may still be on its way.
    pub const NODE_CONNS_CAPACITY: u32 = 65536;
    /// ztunnel's connects to apps from a client's address whose SYN may still be on its way.
    pub const RETURN_CONNS_CAPACITY: u32 = 65536;
    pub const SOCKS_CAPACITY: u32 = 65536;
    pub const NO_ACCEL_CAPACITY: u32 = 65536;
    pub const TRACE_BYTES: u32 = 1 << 20;
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
    pub const SK_LOOKUP: &str = "sl_sk_lookup";
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
    /// The pod's own addresses (its IPs first): traffic to them stays inside the pod.
    pub ips: [Addr; MAX_POD_ADDRS],
    /// The netns's sysctls before enrollment (userspace bookkeeping, kept here so that it
    /// survives an agent restart): `tcp_fwmark_accept`, `ipv4.fwmark_reflect`,
    /// `ipv6.fwmark_reflect` ([`SYSCTL_ABSENT`] if the netns has no IPv6).
    pub saved_fwmark_accept: u32,
    pub saved_reflect4: u32,
    pub saved_reflect6: u32,
    pub _pad: u32,
}

/// A sysctl the netns did not have (IPv6 disabled).
pub const SYSCTL_ABSENT: u32 = u32::MAX;

impl PodConfig {
    /// Whether `addr` is one of the pod's own addresses.
    #[inline(always)]
    pub fn has_ip(&self, addr: &Addr) -> bool {
        // A counted loop over the fixed array: the verifier needs the bound.
        let mut i = 0;
        while i < MAX_POD_ADDRS {
            if (i as u32) < self.ip_count && self.ips[i] == *addr {
                return true;
            }
            i += 1;
        }
        false
    }

    /// Addresses that stay inside the pod: loopback and the pod's own.
    #[inline(always)]
    pub fn is_local(&self, addr: &Addr) -> bool {
        addr.is_loopback() || self.has_ip(addr)
    }
}

/// What the programs that cannot see a netns cookie (`sk_lookup`) know about a pod, by each of
/// its addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodAddr {
    /// The pod's netns cookie.
    pub netns: u64,
    /// `POD_*` flags.
    pub flags: u32,
    pub _pad: u32,
}

/// One end of a connection: an address and a port (host byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: Addr,
    pub port: u16,
    pub _pad: u16,
}

/// Key of ztunnel's listeners in `SL_LISTENERS`: the pod's netns cookie and the port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub netns: u64,
    pub port: u32,
    pub _pad: u32,
}

impl ListenerKey {
    /// The agent's black holes, one per family: listeners whose accept queue is always full,
    /// so that a SYN handed to one is dropped without an answer (see `dataplane/blackhole.rs`).
    pub const BLACK_HOLE_V4: ListenerKey = ListenerKey {
        netns: 0,
        port: 4,
        _pad: 0,
    };
    pub const BLACK_HOLE_V6: ListenerKey = ListenerKey {
        netns: 0,
        port: 6,
        _pad: 0,
    };
}

/// Where a DNS socket's queries really went (socket storage): for `getpeername` and `recvmsg`.
/// A connected socket has one destination; an unconnected one may ask several servers in a row
/// (musl asks every nameserver at once), kept in order so that each reply is attributed to a
/// server that was asked.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DnsDests {
    /// The destination given to `connect`, if any (port 0: none).
    pub connected: Endpoint,
    /// Index of the oldest unanswered `sendmsg` destination, and how many there are.
    pub head: u32,
    pub len: u32,
    pub sent: [Endpoint; DNS_DESTS],
    /// The destination the last reply was attributed to (replies beyond the queries asked).
    pub last: Endpoint,
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
    /// Cookie of the node's network namespace: connections its sockets open are exempt from
    /// inbound capture (upstream's `-m owner --socket-exists`).
    pub node_netns: u64,
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
    OutboundNoListener,
    NodeExempt,
    UnknownAddress,
    HboneDelivered,
    TraceLost,
}

impl Counter {
    pub const COUNT: u32 = 17;
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
        Counter::OutboundNoListener,
        Counter::NodeExempt,
        Counter::UnknownAddress,
        Counter::HboneDelivered,
        Counter::TraceLost,
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
            Counter::OutboundNoListener => "outbound_no_listener_dropped",
            Counter::NodeExempt => "inbound_node_exempt",
            Counter::UnknownAddress => "inbound_unknown_address_dropped",
            Counter::HboneDelivered => "hbone_delivered",
            Counter::TraceLost => "trace_lost",
        }
    }
}

/// One redirect decision, as the programs report it to `sluice-agent trace` (only while a
/// trace client is attached).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceEvent {
    /// The pod's netns cookie (0 where the hook cannot tell: see `pod_addr`).
    pub netns: u64,
    /// The connection's pod-side address, by which `sk_lookup` events name their pod.
    pub pod_addr: Addr,
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    /// A [`Decision`].
    pub decision: u32,
    /// For `sk_lookup`: the interface the connection arrived on.
    pub ifindex: u32,
    pub _pad: u32,
}

/// What a program decided, and why.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// connect: the app's outbound TCP socket is marked for ztunnel's 15001.
    OutboundMarked = 1,
    /// connect/sendmsg: DNS sent to ztunnel's 15053.
    DnsRedirected,
    /// connect: ztunnel's connection to the app (client's address) marked for the return path.
    ReplyMarked,
    /// connect: ztunnel's own socket.
    ExemptZtunnel,
    /// connect: the destination is inside the pod.
    ExemptLocal,
    /// connect: IPv6 capture is off for the pod.
    ExemptIpv6Off,
    /// sk_lookup: delivered to ztunnel's 15001.
    ToOutbound,
    /// sk_lookup: delivered to ztunnel's 15006.
    ToInbound,
    /// sk_lookup: delivered to ztunnel's 15008.
    ToHbone,
    /// sk_lookup: opened by a socket in the node's network namespace.
    ExemptNode,
    /// sk_lookup: the pod has inbound capture bypassed.
    ExemptBypass,
    /// sk_lookup: ztunnel has no (marked) listener for it.
    DroppedNoListener,
    /// sk_lookup: an address of the netns that was not there at enrollment.
    DroppedUnknownAddress,
}

impl Decision {
    pub const fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Decision::OutboundMarked,
            2 => Decision::DnsRedirected,
            3 => Decision::ReplyMarked,
            4 => Decision::ExemptZtunnel,
            5 => Decision::ExemptLocal,
            6 => Decision::ExemptIpv6Off,
            7 => Decision::ToOutbound,
            8 => Decision::ToInbound,
            9 => Decision::ToHbone,
            10 => Decision::ExemptNode,
            11 => Decision::ExemptBypass,
            12 => Decision::DroppedNoListener,
            13 => Decision::DroppedUnknownAddress,
            _ => return None,
        })
    }

    /// `redirected`, `exempt` or `dropped`.
    pub const fn verdict(self) -> &'static str {
        match self {
            Decision::OutboundMarked
            | Decision::DnsRedirected
            | Decision::ReplyMarked
            | Decision::ToOutbound
            | Decision::ToInbound
            | Decision::ToHbone => "redirected",
            Decision::ExemptZtunnel
            | Decision::ExemptLocal
            | Decision::ExemptIpv6Off
            | Decision::ExemptNode
            | Decision::ExemptBypass => "exempt",
            Decision::DroppedNoListener | Decision::DroppedUnknownAddress => "dropped",
        }
    }

    /// Why, in a word or three.
    pub const fn reason(self) -> &'static str {
        match self {
            Decision::OutboundMarked => "outbound, routed to ztunnel 15001",
            Decision::DnsRedirected => "dns, to ztunnel 15053",
            Decision::ReplyMarked => "ztunnel to app, return path marked",
            Decision::ToOutbound => "outbound, delivered to ztunnel 15001",
            Decision::ToInbound => "inbound, delivered to ztunnel 15006",
            Decision::ToHbone => "hbone, delivered to ztunnel 15008",
            Decision::ExemptZtunnel => "ztunnel's own socket",
            Decision::ExemptLocal => "destination inside the pod",
            Decision::ExemptIpv6Off => "ipv6 capture off",
            Decision::ExemptNode => "opened by a node process",
            Decision::ExemptBypass => "inbound capture bypassed",
            Decision::DroppedNoListener => "no ztunnel listener",
            Decision::DroppedUnknownAddress => "address unknown at enrollment",
        }
    }
}
