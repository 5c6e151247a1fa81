//! Upstream's rule set: what istio-cni's node agent applies inside every ambient pod's network
//! namespace with `iptables-restore` (and in the node's namespace, the one POSTROUTING rule),
//! copied from istio-cni's in-pod rules (`cni/pkg/iptables`, recent releases with ztunnel's mark
//! 0x539). The iptables setup applies exactly these, in this order, with Debian's nft-backed
//! `iptables-nft-restore --noflush`, as istio-cni does; plus the routing istio-cni adds through
//! netlink: `ip rule add fwmark 0x111/0xfff pref 32764 lookup 100`,
//! `ip route add local 0.0.0.0/0 dev lo table 100` (v6 alike) and `net.ipv4.tcp_fwmark_accept=1`.

/// Source address istio-cni SNATs node-originated (kubelet probe) traffic to.
pub const HOST_PROBE_SNAT_V4: &str = "169.254.7.127";
/// Its IPv6 twin in istio-cni.
pub const HOST_PROBE_SNAT_V6: &str = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff";

/// The in-pod rule set for `iptables-restore` (`v6`: for `ip6tables-restore`, with `::1` and
/// the IPv6 probe address).
pub fn pod_rules(v6: bool) -> String {
    let (probe, lo) = if v6 {
        (HOST_PROBE_SNAT_V6, "::1/128")
    } else {
        (HOST_PROBE_SNAT_V4, "127.0.0.1/32")
    };
    // M = ztunnel's mark, 0x539/0xfff
    let m = "0x539/0xfff";
    format!(
        "\
*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_PRERT -m mark --mark {m} -j CONNMARK --set-xmark 0x111/0xfff
-A ISTIO_PRERT -s {probe} -p tcp -m tcp -j ACCEPT
-A ISTIO_PRERT -p tcp -m tcp --dport 15008 -m mark ! --mark {m} -j TPROXY --on-port 15008 --tproxy-mark 0x111/0xfff
-A ISTIO_PRERT -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A ISTIO_PRERT ! -d {lo} -p tcp -m mark ! --mark {m} -j TPROXY --on-port 15006 --tproxy-mark 0x111/0xfff
-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
*nat
:OUTPUT ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -d {probe} -p tcp -m tcp -j ACCEPT
-A ISTIO_OUTPUT ! -o lo -p udp -m udp --dport 53 -j REDIRECT --to-port 15053
-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
-A ISTIO_OUTPUT ! -d {lo} -p tcp -m mark ! --mark {m} -j REDIRECT --to-ports 15001
COMMIT
"
    )
}

/// The node-namespace half: SNAT connections a process on the node opened to the probe address.
pub fn host_rules() -> String {
    format!(
        "\
*nat
:POSTROUTING ACCEPT [0:0]
:ISTIO_POSTRT - [0:0]
-A POSTROUTING -j ISTIO_POSTRT
-A ISTIO_POSTRT -m owner --socket-exists -p tcp -j SNAT --to-source {HOST_PROBE_SNAT_V4}
COMMIT
"
    )
}

/// `ip -batch` lines of the routing half; run once with `-4` and once with `-6`.
pub fn pod_routing(v6: bool) -> [String; 2] {
    let any = if v6 { "::/0" } else { "0.0.0.0/0" };
    [
        "rule add fwmark 0x111/0xfff pref 32764 lookup 100".to_string(),
        format!("route add local {any} dev lo table 100"),
    ]
}
