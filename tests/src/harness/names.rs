use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `<prefix><pid hex>-<counter hex>`: unique among concurrently running test processes
/// and within one. With a prefix of up to 5 characters it fits an interface name
/// (15 characters) for the first 4096 names of a process (pid_max ≤ 2^22).
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:x}-{n:x}", std::process::id())
}

#[cfg(test)]
mod tests {
    #[test]
    fn unique_names_differ_and_stay_short() {
        let a = super::unique("sl");
        let b = super::unique("sl");
        assert_ne!(a, b);
        assert!(a.len() <= 15, "{a}");
    }
}
