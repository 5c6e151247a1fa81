//! The 4-tuple of a socket as sockops and sk_msg contexts describe it. Both context structs
//! have the same field names and conventions, so one macro serves both.
//!
//! Every field is read with its own constant-offset load (the verifier refuses a computed ctx
//! offset); `remote_port` holds the network-order port in its upper half on little endian.

/// `sock_key!(ctx_ptr, netns_cookie)` → `Option<SockKey>`, `None` for non-IP families.
macro_rules! sock_key {
    ($ctx:expr, $netns:expr) => {{
        use core::ptr::{addr_of, read_volatile};
        use sluice_common::{AF_INET, AF_INET6, Addr, SockKey};
        let c = $ctx;
        // SAFETY: 4-byte loads of readable context fields.
        let (family, l4, r4, l6, r6, lport, rport) = unsafe {
            (
                read_volatile(addr_of!((*c).family)),
                read_volatile(addr_of!((*c).local_ip4)),
                read_volatile(addr_of!((*c).remote_ip4)),
                [
                    read_volatile(addr_of!((*c).local_ip6[0])),
                    read_volatile(addr_of!((*c).local_ip6[1])),
                    read_volatile(addr_of!((*c).local_ip6[2])),
                    read_volatile(addr_of!((*c).local_ip6[3])),
                ],
                [
                    read_volatile(addr_of!((*c).remote_ip6[0])),
                    read_volatile(addr_of!((*c).remote_ip6[1])),
                    read_volatile(addr_of!((*c).remote_ip6[2])),
                    read_volatile(addr_of!((*c).remote_ip6[3])),
                ],
                read_volatile(addr_of!((*c).local_port)),
                read_volatile(addr_of!((*c).remote_port)),
            )
        };
        let addrs = if family == u32::from(AF_INET) {
            Some((Addr::v4(l4), Addr::v4(r4)))
        } else if family == u32::from(AF_INET6) {
            Some((Addr::v6(l6), Addr::v6(r6)))
        } else {
            None
        };
        addrs.map(|(local, remote)| SockKey {
            netns: $netns,
            local,
            remote,
            local_port: lport as u16,
            remote_port: u32::from_be(rport) as u16,
            _pad: 0,
        })
    }};
}

pub(crate) use sock_key;
