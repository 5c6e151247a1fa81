//! Netlink and sysctl work inside a pod's network namespace: the return route for connections
//! ztunnel opens towards the app, and the pod's interface list.
//!
//! Everything here must run on a thread that has entered the pod's netns (see `Netns::run`):
//! netlink sockets and `/proc/sys/net` both follow the calling thread's namespace.
use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr},
};

use futures_util::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    link::{LinkAttribute, LinkLayerType},
    route::{RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
};
use rtnetlink::{Handle, RouteMessageBuilder};
use sluice_common::{MARK_MASK, REPLY_MARK, REPLY_ROUTE_TABLE, REPLY_RULE_PRIORITY};

const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";

/// A pod interface and whether it carries an Ethernet header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub kind: InterfaceKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterfaceKind {
    Loopback,
    Ethernet,
    /// No link-layer header (tun, wireguard, ip tunnels).
    Layer3,
}

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

/// Lists the namespace's interfaces.
pub fn interfaces() -> io::Result<Vec<Interface>> {
    with_netlink(async |handle| {
        let mut links = handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(link) = links.try_next().await.map_err(nl_err)? {
            let name = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            });
            let Some(name) = name else { continue };
            let kind = match link.header.link_layer_type {
                LinkLayerType::Loopback => InterfaceKind::Loopback,
                LinkLayerType::Ether => InterfaceKind::Ethernet,
                _ => InterfaceKind::Layer3,
            };
            out.push(Interface {
                name,
                index: link.header.index,
                kind,
            });
        }
        Ok(out)
    })
}

/// Every address configured in the namespace (any interface, both families).
pub fn addresses() -> io::Result<Vec<std::net::IpAddr>> {
    with_netlink(async |handle| {
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
    })
}

/// `ip rule add fwmark 0x111/0xfff lookup 100 pref 32764` and
/// `ip route add local default dev lo table 100`, for IPv4 and (if available) IPv6.
/// Idempotent: rules or routes already there are fine.
pub fn add_reply_route(lo_index: u32) -> io::Result<()> {
    with_netlink(async |handle| {
        for v6 in [false, true] {
            // Not `replace()`: for rules that would add a duplicate; EEXIST tells us it is there.
            let mut rule = handle.rule().add();
            *rule.message_mut() = reply_rule(v6);
            match rule.execute().await.map_err(nl_err) {
                Ok(()) => {}
                Err(e) if is_errno(&e, libc::EEXIST) => {}
                // A kernel or namespace without IPv6.
                Err(e) if v6 && is_errno(&e, libc::EAFNOSUPPORT) => continue,
                Err(e) => return Err(e),
            }
            match handle
                .route()
                .add(local_default(v6, lo_index))
                .replace()
                .execute()
                .await
                .map_err(nl_err)
            {
                Ok(()) => {}
                Err(e)
                    if v6 && (is_errno(&e, libc::EAFNOSUPPORT) || is_errno(&e, libc::EACCES)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
}

/// Removes what `add_reply_route` added; missing pieces are fine.
pub fn remove_reply_route(lo_index: u32) -> io::Result<()> {
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
            match handle
                .route()
                .del(local_default(v6, lo_index))
                .execute()
                .await
                .map_err(nl_err)
            {
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

fn local_default(v6: bool, lo_index: u32) -> netlink_packet_route::route::RouteMessage {
    if v6 {
        RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .table_id(REPLY_ROUTE_TABLE)
            .output_interface(lo_index)
            .build()
    } else {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .table_id(REPLY_ROUTE_TABLE)
            .output_interface(lo_index)
            .build()
    }
}

/// `net.ipv4.tcp_fwmark_accept` (it applies to IPv6 TCP too): makes an accepted socket inherit
/// the SYN's mark, which is how the app's side of a ztunnel→app connection gets REPLY_MARK.
pub fn fwmark_accept() -> io::Result<u32> {
    let v = std::fs::read_to_string(FWMARK_ACCEPT)?;
    v.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{FWMARK_ACCEPT}: {v:?}"),
        )
    })
}

pub fn set_fwmark_accept(value: u32) -> io::Result<()> {
    std::fs::write(FWMARK_ACCEPT, value.to_string())
}
