//! Builds the eBPF object (nightly, bpf target) so that the agent can embed it.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let ebpf = Package {
        name: "sluice-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::Nightly)?;
    // The shared types are part of the eBPF object too.
    println!(
        "cargo:rerun-if-changed={}/../common/src",
        env!("CARGO_MANIFEST_DIR")
    );
    Ok(())
}
