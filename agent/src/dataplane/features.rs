//! What each program needs from the kernel, so that a kernel without it gets a one-line error
//! naming the feature and the first Linux release that has it, instead of a verifier dump.
//!
//! Every feature is exercised when the programs load (the verifier refuses an unknown helper,
//! context field or map type), so loading is the check: a failure is reported with this table.
use sluice_common::progs;

/// A kernel feature and the first mainline release with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    pub what: &'static str,
    pub since: &'static str,
}

const fn f(what: &'static str, since: &'static str) -> Feature {
    Feature { what, since }
}

/// The newest feature Sluice relies on: `sk_lookup`'s `ingress_ifindex`.
pub const MIN_KERNEL: &str = "5.17";

/// Features of each program, newest last (a load failure names the newest first).
pub fn of_program(name: &str) -> &'static [Feature] {
    const CONNECT: &[Feature] = &[
        f("cgroup connect hooks", "4.17"),
        f("socket storage maps", "5.2"),
        f("bpf_get_netns_cookie in sock_addr programs", "5.7"),
        f("bpf_setsockopt in cgroup connect hooks", "5.8"),
    ];
    const SENDMSG: &[Feature] = &[
        f("cgroup UDP sendmsg hooks", "4.18"),
        f("bpf_get_netns_cookie in sock_addr programs", "5.7"),
    ];
    const RECVMSG: &[Feature] = &[
        f("cgroup UDP recvmsg hooks", "5.2"),
        f("socket storage maps", "5.2"),
    ];
    const GETPEERNAME: &[Feature] = &[f("cgroup getpeername hooks", "5.8")];
    const GETSOCKOPT: &[Feature] = &[
        f("cgroup getsockopt hooks", "5.3"),
        f("bpf_get_netns_cookie in cgroup sockopt programs", "5.8"),
    ];
    const SOCKOPS: &[Feature] = &[
        f("sockops TCP_LISTEN_CB", "4.17"),
        f("listening sockets in a sockhash", "5.7"),
        f("bpf_get_netns_cookie in sockops programs", "5.15"),
    ];
    const SK_MSG: &[Feature] = &[
        f("sk_msg programs", "4.17"),
        f("bpf_get_netns_cookie in sk_msg programs", "5.15"),
    ];
    const SK_LOOKUP: &[Feature] = &[
        f("sk_lookup programs", "5.9"),
        f("sk_lookup ingress_ifindex", "5.17"),
    ];
    match name {
        progs::CONNECT4 | progs::CONNECT6 => CONNECT,
        progs::SENDMSG4 | progs::SENDMSG6 => SENDMSG,
        progs::RECVMSG4 | progs::RECVMSG6 => RECVMSG,
        progs::GETPEERNAME4 | progs::GETPEERNAME6 => GETPEERNAME,
        progs::GETSOCKOPT => GETSOCKOPT,
        progs::SOCKOPS => SOCKOPS,
        progs::SK_MSG => SK_MSG,
        progs::SK_LOOKUP => SK_LOOKUP,
        _ => &[],
    }
}

/// Features of the maps, checked when the object loads.
pub const MAPS: &[Feature] = &[
    f("socket storage maps", "5.2"),
    f("BPF ring buffers", "5.8"),
];

/// "needs X (Linux ≥ a), Y (Linux ≥ b)", newest first.
pub fn describe(features: &[Feature]) -> String {
    features
        .iter()
        .rev()
        .map(|f| format!("{} (Linux ≥ {})", f.what, f.since))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    // SAFETY: uname fills the struct it is given.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    // SAFETY: the kernel NUL-terminates the release.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_has_its_features_and_the_newest_is_the_floor() {
        let all = [
            progs::CONNECT4,
            progs::CONNECT6,
            progs::SENDMSG4,
            progs::SENDMSG6,
            progs::RECVMSG4,
            progs::RECVMSG6,
            progs::GETPEERNAME4,
            progs::GETPEERNAME6,
            progs::GETSOCKOPT,
            progs::SOCKOPS,
            progs::SK_MSG,
            progs::SK_LOOKUP,
        ];
        let version = |s: &str| -> (u32, u32) {
            let (a, b) = s.split_once('.').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        };
        let mut newest = (0, 0);
        for p in all {
            let fs = of_program(p);
            assert!(!fs.is_empty(), "{p}");
            for f in fs {
                newest = newest.max(version(f.since));
            }
        }
        assert_eq!(newest, version(MIN_KERNEL));
        assert_eq!(
            describe(of_program(progs::SK_LOOKUP)),
            "sk_lookup ingress_ifindex (Linux ≥ 5.17), sk_lookup programs (Linux ≥ 5.9)"
        );
    }
}
