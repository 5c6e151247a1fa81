/// Capability bits in /proc/self/status `CapEff`.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// True when this process may create namespaces, veths, cgroups and BPF programs.
/// Otherwise prints a skip notice and returns false — except under `CI=true`, where a
/// missing capability is a broken runner and panics instead of silently skipping.
///
/// Use as `if !require_root() { return; }` at the top of each privileged test.
pub fn require_root() -> bool {
    if privileged() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but the test lacks root/CAP_NET_ADMIN+CAP_SYS_ADMIN+CAP_BPF");
    }
    eprintln!("skipping: needs root/CAP_NET_ADMIN+CAP_SYS_ADMIN+CAP_BPF");
    false
}

fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return false;
    }
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    [CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF]
        .iter()
        .all(|&bit| caps & (1 << bit) != 0)
}
