use sluice_agent::{dataplane::*, netns::Netns};
fn main() {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let args: Vec<String> = std::env::args().collect();
    let cg = std::path::PathBuf::from("/sys/fs/cgroup/unified/sluice-scratch");
    let _ = std::fs::create_dir_all(&cg);
    let cfg = DataplaneConfig {
        pin_root: "/sys/fs/bpf/sluice-scratch".into(),
        cgroup: cg,
        accelerate: args.iter().any(|a| a == "accel"),
    };
    let mut dp = match Dataplane::load(&cfg) {
        Ok(dp) => dp,
        Err(e) => {
            println!("ERR: {e}");
            let mut s: &dyn std::error::Error = &e;
            while let Some(src) = s.source() {
                println!("  caused by: {src}");
                s = src;
            }
            return;
        }
    };
    match args.get(1).map(String::as_str) {
        Some("enroll") => {
            let ns = Netns::open(&args[2]).unwrap();
            let ips: Vec<std::net::IpAddr> =
                args[3].split(',').map(|s| s.parse().unwrap()).collect();
            println!("{:?}", dp.enroll(&ns, &ips, EnrollOptions::default()));
        }
        Some("unenroll") => {
            let ns = Netns::open(&args[2]).unwrap();
            println!("{:?}", dp.unenroll(&ns));
        }
        Some("hosts") => {
            let ips: Vec<std::net::IpAddr> =
                args[2].split(',').map(|s| s.parse().unwrap()).collect();
            println!("{:?}", dp.set_host_addrs(&ips));
        }
        Some("uninstall") => {
            println!("{:?}", dp.uninstall(|_| None));
            return;
        }
        _ => {}
    }
    println!("{:?}", dp.counters());
}
