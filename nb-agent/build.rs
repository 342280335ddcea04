//! Builds the XDP program (nb-ebpf, nightly, bpfel-unknown-none) into OUT_DIR so that
//! `nb-agent` embeds it: the binary alone is the install.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest
        .parent()
        .ok_or("nb-agent has no parent directory")?;
    let ebpf = workspace.join("nb-ebpf");
    let common = workspace.join("nb-common");
    println!("cargo:rerun-if-changed={}", common.display());
    let root_dir = ebpf.to_str().ok_or("non-UTF-8 path")?;
    let package = aya_build::Package {
        name: "nb-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())?;
    Ok(())
}
