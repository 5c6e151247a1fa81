//! Userspace-only impls: map value marker traits and conversions from `std::net` types.
extern crate std;

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::{
    Addr, DnsDests, Endpoint, GlobalConfig, ListenerKey, PodAddr, PodConfig, SockKey, TraceEvent,
};

// SAFETY: all of these are #[repr(C)] plain data with explicit padding, valid for any bit pattern.
unsafe impl aya::Pod for Addr {}
unsafe impl aya::Pod for PodConfig {}
unsafe impl aya::Pod for PodAddr {}
unsafe impl aya::Pod for Endpoint {}
unsafe impl aya::Pod for ListenerKey {}
unsafe impl aya::Pod for DnsDests {}
unsafe impl aya::Pod for SockKey {}
unsafe impl aya::Pod for GlobalConfig {}
unsafe impl aya::Pod for TraceEvent {}

impl From<IpAddr> for Addr {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Addr::v4(u32::from_ne_bytes(v4.octets())),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Addr::from(IpAddr::V4(v4)),
                None => {
                    let o = v6.octets();
                    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                    Addr::v6([w(0), w(4), w(8), w(12)])
                }
            },
        }
    }
}

impl From<Addr> for IpAddr {
    fn from(a: Addr) -> Self {
        if a.is_v4() {
            IpAddr::V4(Ipv4Addr::from(a.words[3].to_ne_bytes()))
        } else {
            let mut o = [0u8; 16];
            for (i, w) in a.words.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
    }
}

impl From<Endpoint> for SocketAddr {
    fn from(o: Endpoint) -> Self {
        SocketAddr::new(IpAddr::from(o.addr), o.port)
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(sa: SocketAddr) -> Self {
        Endpoint {
            addr: Addr::from(sa.ip()),
            port: sa.port(),
            _pad: 0,
        }
    }
}

impl PodConfig {
    /// Builds a pod config; at most [`crate::MAX_POD_ADDRS`] addresses are kept.
    pub fn new(flags: u32, ips: &[IpAddr]) -> Self {
        let mut cfg = PodConfig {
            flags,
            ..Default::default()
        };
        for ip in ips {
            cfg.add_ip(*ip);
        }
        cfg
    }

    /// Adds an address of the pod, unless it is known already or there is no room left.
    /// Returns whether it is known now.
    pub fn add_ip(&mut self, ip: IpAddr) -> bool {
        let addr = Addr::from(ip);
        if self.has_ip(&addr) {
            return true;
        }
        let n = self.ip_count as usize;
        if n >= crate::MAX_POD_ADDRS {
            return false;
        }
        self.ips[n] = addr;
        self.ip_count += 1;
        true
    }

    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ips[..(self.ip_count as usize).min(crate::MAX_POD_ADDRS)]
            .iter()
            .map(|a| IpAddr::from(*a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_round_trips_and_is_mapped() {
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let a = Addr::from(ip);
        assert!(a.is_v4());
        assert_eq!(IpAddr::from(a), ip);
        // A v4-mapped v6 address is the same key as the plain v4 address.
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(Addr::from(mapped), a);
    }

    #[test]
    fn v6_round_trips() {
        let ip: IpAddr = "fd00::1:2".parse().unwrap();
        let a = Addr::from(ip);
        assert!(!a.is_v4());
        assert_eq!(IpAddr::from(a), ip);
    }

    #[test]
    fn loopback_and_unspecified() {
        for s in ["127.0.0.1", "127.9.9.9", "::1"] {
            assert!(
                Addr::from(s.parse::<IpAddr>().unwrap()).is_loopback(),
                "{s}"
            );
        }
        for s in ["10.0.0.1", "::2", "fd00::1", "128.0.0.1"] {
            assert!(
                !Addr::from(s.parse::<IpAddr>().unwrap()).is_loopback(),
                "{s}"
            );
        }
        assert!(Addr::from("0.0.0.0".parse::<IpAddr>().unwrap()).is_unspecified());
        assert!(Addr::from("::".parse::<IpAddr>().unwrap()).is_unspecified());
        assert!(!Addr::from("::1".parse::<IpAddr>().unwrap()).is_unspecified());
    }

    #[test]
    fn pod_config_keeps_distinct_addresses_up_to_its_capacity() {
        let ips: std::vec::Vec<IpAddr> = (1..=10)
            .chain([1, 2])
            .map(|i| IpAddr::from([10, 0, 0, i as u8]))
            .collect();
        let cfg = PodConfig::new(0, &ips);
        assert_eq!(cfg.ip_count as usize, crate::MAX_POD_ADDRS);
        assert_eq!(cfg.ips().count(), crate::MAX_POD_ADDRS);
        let mut cfg = PodConfig::new(0, &ips[..2]);
        assert!(cfg.add_ip(ips[0]), "a known address is known");
        assert_eq!(cfg.ip_count, 2, "and not added twice");
    }
}
