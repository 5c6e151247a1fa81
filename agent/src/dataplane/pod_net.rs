//! Netlink and sysctl work inside a pod's network namespace: the rule and route that send
//! REPLY_MARK-ed sockets to the pod's `lo`, the sysctls the return path needs, and the pod's
//! addresses.
//!
//! Everything here must run on a thread that has entered the pod's netns (see `Netns::run`):
//! netlink sockets and `/proc/sys/net` both follow the calling thread's namespace.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures_util::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    route::{RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::proc_sys::SysctlRoot;
use sluice_common::{
    LOOPBACK_IFINDEX, MARK_MASK, REPLY_MARK, REPLY_ROUTE_TABLE, REPLY_RULE_PRIORITY, SYSCTL_ABSENT,
};

/// Runs a netlink conversation on a private single-threaded runtime (we are on a short-lived
/// thread inside the pod netns, not on the agent's runtime).
fn with_netlink<T>(f: impl AsyncFnOnce(Handle) -> io::Result<T>) -> io::Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        let task = tokio::spawn(conn);
        let out = f(handle).await;
        task.abort();
        out
    })
}

fn nl_err(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => match m.code {
            Some(code) => io::Error::from_raw_os_error(-code.get()),
            None => io::Error::other("netlink error without code"),
        },
        other => io::Error::other(other.to_string()),
    }
}

fn is_errno(e: &io::Error, errno: i32) -> bool {
    e.raw_os_error() == Some(errno)
}

/// Every address configured in the namespace (any interface, both families).
pub fn addresses() -> io::Result<Vec<IpAddr>> {
    with_netlink(async |handle| list_addresses(&handle).await)
}

async fn list_addresses(handle: &Handle) -> io::Result<Vec<IpAddr>> {
    let mut addrs = handle.address().get().execute();
    let mut out = Vec::new();
    while let Some(msg) = addrs.try_next().await.map_err(nl_err)? {
        for attr in &msg.attributes {
            if let netlink_packet_route::address::AddressAttribute::Address(ip) = attr {
                out.push(*ip);
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The pod's source address per family for connections routed to `lo` by their mark: without
/// one, the kernel would pick the destination itself as source for a local route.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplySources {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl ReplySources {
    /// The first address of each family in `ips`.
    pub fn of(ips: &[IpAddr]) -> Self {
        ReplySources {
            v4: ips.iter().find_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            }),
            v6: ips.iter().find_map(|ip| match ip {
                IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => Some(*v6),
                _ => None,
            }),
        }
    }
}

/// In one netlink conversation: lists the namespace's addresses (returned), then for each
/// family the pod has an address of, `ip rule add fwmark 0x111/0xfff lookup 100 pref 32764`
/// and `ip route replace local default dev lo table 100 src <pod IP>`. Idempotent: rules
/// already there are fine. A pod IP the namespace does not have is an error.
pub fn add_reply_route(src: ReplySources) -> io::Result<Vec<IpAddr>> {
    with_netlink(async |handle| {
        let addrs = list_addresses(&handle).await?;
        let missing = [src.v4.map(IpAddr::from), src.v6.map(IpAddr::from)]
            .into_iter()
            .flatten()
            .find(|ip| !addrs.contains(ip));
        if let Some(ip) = missing {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the pod IP {ip} is not an address of the network namespace"),
            ));
        }
        if let Some(v4) = src.v4 {
            add_rule(&handle, false).await?;
            add_route(&handle, local_default_v4(v4)).await?;
        }
        if let Some(v6) = src.v6 {
            add_rule(&handle, true).await?;
            add_route(&handle, local_default_v6(v6)).await?;
        }
        Ok(addrs)
    })
}

async fn add_rule(handle: &Handle, v6: bool) -> io::Result<()> {
    // Not `replace()`: for rules that would add a duplicate; EEXIST tells us it is there.
    let mut rule = handle.rule().add();
    *rule.message_mut() = reply_rule(v6);
    match rule.execute().await.map_err(nl_err) {
        Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
        other => other,
    }
}

async fn add_route(
    handle: &Handle,
    route: netlink_packet_route::route::RouteMessage,
) -> io::Result<()> {
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(nl_err)
}

/// Removes what `add_reply_route` added, for both families; missing pieces are fine.
pub fn remove_reply_route() -> io::Result<()> {
    with_netlink(async |handle| {
        for v6 in [false, true] {
            match handle
                .rule()
                .del(reply_rule(v6))
                .execute()
                .await
                .map_err(nl_err)
            {
                Ok(()) => {}
                Err(e) if is_errno(&e, libc::ENOENT) || is_errno(&e, libc::EAFNOSUPPORT) => {}
                Err(e) => return Err(e),
            }
            // Deleting without `src` matches the route whatever its source.
            let route = if v6 {
                local_default(
                    RouteMessageBuilder::<Ipv6Addr>::new()
                        .destination_prefix(Ipv6Addr::UNSPECIFIED, 0),
                )
            } else {
                local_default(
                    RouteMessageBuilder::<Ipv4Addr>::new()
                        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0),
                )
            };
            match handle.route().del(route).execute().await.map_err(nl_err) {
                Ok(()) => {}
                Err(e)
                    if is_errno(&e, libc::ESRCH)
                        || is_errno(&e, libc::ENOENT)
                        || is_errno(&e, libc::EAFNOSUPPORT) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
}

/// Whether the reply rule is present (for status and tests).
pub fn has_reply_rule(v6: bool) -> io::Result<bool> {
    with_netlink(async |handle| {
        let version = if v6 {
            rtnetlink::IpVersion::V6
        } else {
            rtnetlink::IpVersion::V4
        };
        let mut rules = handle.rule().get(version).execute();
        while let Some(rule) = rules.try_next().await.map_err(nl_err)? {
            let has = |want: &RuleAttribute| rule.attributes.iter().any(|a| a == want);
            if has(&RuleAttribute::FwMark(REPLY_MARK))
                && has(&RuleAttribute::Table(REPLY_ROUTE_TABLE))
            {
                return Ok(true);
            }
        }
        Ok(false)
    })
}

fn reply_rule(v6: bool) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    msg.header.action = RuleAction::ToTable;
    // Tables above 255 only fit the attribute; 100 fits both, set both like iproute2.
    msg.header.table = REPLY_ROUTE_TABLE as u8;
    msg.attributes = vec![
        RuleAttribute::Priority(REPLY_RULE_PRIORITY),
        RuleAttribute::FwMark(REPLY_MARK),
        RuleAttribute::FwMask(MARK_MASK),
        RuleAttribute::Table(REPLY_ROUTE_TABLE),
    ];
    msg
}

/// `local default dev lo table 100` (`scope host`).
fn local_default<T>(b: RouteMessageBuilder<T>) -> netlink_packet_route::route::RouteMessage {
    b.kind(RouteType::Local)
        .scope(RouteScope::Host)
        .table_id(REPLY_ROUTE_TABLE)
        .output_interface(LOOPBACK_IFINDEX)
        .build()
}

fn local_default_v4(src: Ipv4Addr) -> netlink_packet_route::route::RouteMessage {
    local_default(
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .pref_source(src),
    )
}

fn local_default_v6(src: Ipv6Addr) -> netlink_packet_route::route::RouteMessage {
    local_default(
        RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .pref_source(src),
    )
}

/// The sysctls enrollment sets in a pod netns, with their values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sysctls {
    /// `net.ipv4.tcp_fwmark_accept` (it applies to IPv6 TCP too): an accepted socket inherits
    /// the SYN's mark, which is how the app's side of a ztunnel→app connection (and ztunnel's
    /// side of an app→ztunnel one) gets REPLY_MARK.
    pub fwmark_accept: u32,
    /// `net.ipv4.fwmark_reflect`, `net.ipv6.fwmark_reflect`: the kernel's own replies (a RST
    /// from a closed port, ICMP errors) carry the mark of what they answer, so that they follow
    /// REPLY_MARK back to ztunnel too. [`SYSCTL_ABSENT`]: the netns has no IPv6.
    pub reflect4: u32,
    pub reflect6: u32,
}

const FWMARK_ACCEPT: &str = "net/ipv4/tcp_fwmark_accept";
const REFLECT4: &str = "net/ipv4/fwmark_reflect";
const REFLECT6: &str = "net/ipv6/fwmark_reflect";

impl Sysctls {
    /// What enrollment wants.
    pub const ENROLLED: Sysctls = Sysctls {
        fwmark_accept: 1,
        reflect4: 1,
        reflect6: 1,
    };

    /// The calling thread's netns's values, read under `root` (see `proc_sys`).
    pub fn read(root: &SysctlRoot) -> io::Result<Sysctls> {
        Ok(Sysctls {
            fwmark_accept: read_sysctl(root, FWMARK_ACCEPT)?,
            reflect4: read_sysctl(root, REFLECT4)?,
            reflect6: match read_sysctl(root, REFLECT6) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => SYSCTL_ABSENT,
                other => other?,
            },
        })
    }

    /// Writes these values in the calling thread's netns (an absent IPv6 sysctl is left
    /// absent).
    pub fn write(&self, root: &SysctlRoot) -> io::Result<()> {
        root.write(FWMARK_ACCEPT, &self.fwmark_accept.to_string())?;
        root.write(REFLECT4, &self.reflect4.to_string())?;
        if self.reflect6 != SYSCTL_ABSENT {
            match root.write(REFLECT6, &self.reflect6.to_string()) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                other => other?,
            }
        }
        Ok(())
    }
}

fn read_sysctl(root: &SysctlRoot, rel: &str) -> io::Result<u32> {
    let v = root.read(rel)?;
    v.trim()
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("{rel}: {v:?}")))
}
