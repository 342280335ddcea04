//! `cargo xtask build | test | fuzz | demo | bench | install`: nb's workflows.

mod bench;
mod demo;
mod packages;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install missing prerequisites, build the eBPF object and the release binaries.
    Build,
    /// Every test: unit, eBPF packet tests, end-to-end tests in network namespaces (root).
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
    /// Long runs of the parser fuzz targets (nb-agent's `src/fuzz`, proptest): the same
    /// tests `cargo test` runs briefly, with many more cases; no root needed.
    Fuzz {
        /// One target (proxy_header, cookie, config, api, h1, request_heads); default: all.
        target: Option<String>,
        /// Cases per property test.
        #[arg(long, default_value_t = 100_000)]
        cases: u32,
    },
    /// Build, start a test network with nb in front of three backends, show it working.
    Demo,
    /// Side-by-side benchmarks (README "Benchmarks"): `xdp`, `l4`, `l7`, `fleet`, or all.
    Bench {
        /// Which part: xdp, l4, l7, fleet (default: all, ending with one table of every ratio).
        part: Option<String>,
        /// Worker threads of each L7 contender (nb `workers`, HAProxy `nbthread`, nginx
        /// `worker_processes`); 1 leaves the other cores to the client and the backends.
        #[arg(long, default_value_t = 1)]
        workers: u32,
    },
    /// Install binaries, config and the systemd unit.
    Install {
        /// Install under this root instead of / (packaging).
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
}

/// Errors end in one line on stderr (the cause chain joined), never a backtrace: what went
/// wrong and what to do is all a person needs from a workflow command.
fn main() -> ExitCode {
    match xtask(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn xtask(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Build => build(),
        Cmd::Test { filter } => test(filter.as_deref()),
        Cmd::Fuzz { target, cases } => fuzz(target.as_deref(), cases),
        Cmd::Demo => {
            packages::ensure("cargo xtask demo", &[packages::DEMO])?;
            build()?;
            demo::run(&workspace().join("target/release/nb-agent"))
        }
        Cmd::Bench { part, workers } => {
            packages::ensure(
                "cargo xtask bench",
                &[packages::DEMO, packages::TEST, packages::BENCH],
            )?;
            build()?;
            bench::run(&workspace(), part.as_deref(), workers)
        }
        Cmd::Install { root } => {
            build()?;
            install(&root)
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// Runs a command, failing with its command line if it does not succeed.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// rust-src for nightly and bpf-linker 0.10.1, each installed only when missing.
fn prerequisites() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let linker = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !linker.contains("0.10.1") {
        // 0.11+ links a system LLVM that these machines lack; 0.10.1 borrows rustc's.
        run(Command::new("cargo").args(["install", "bpf-linker@0.10.1", "--locked", "--force"]))?;
    }
    Ok(())
}

fn build() -> Result<()> {
    prerequisites()?;
    run(Command::new("cargo").current_dir(workspace()).args([
        "build",
        "--release",
        "-p",
        "nb-agent",
        "--bins",
    ]))
}

fn test(filter: Option<&str>) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the packet and end-to-end tests need root (BPF, network namespaces): run as root");
    }
    packages::ensure("cargo xtask test", &[packages::DEMO, packages::TEST])?;
    build()?;
    let ws = workspace();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&ws)
        .args([
            "test",
            "--release",
            "--workspace",
            "--exclude",
            "nb-ebpf",
            "--no-fail-fast",
        ])
        .env("NB_AGENT_BIN", ws.join("target/release/nb-agent"))
        .env("NB_REQUIRE_ROOT_TESTS", "1");
    cmd.arg("--");
    if let Some(f) = filter {
        cmd.arg(f);
    }
    run(&mut cmd)
}

/// The modules of nb-agent's `src/fuzz`, each a fuzz target.
const FUZZ_TARGETS: &[&str] = &[
    "proxy_header",
    "cookie",
    "config",
    "api",
    "h1",
    "relay",
    "request_heads",
];

/// Runs the fuzz targets' tests in release mode (a case costs a tenth of a debug build's)
/// with `cases` cases each, through the variable the tests read. A failure prints proptest's
/// shrunk input, to be kept as a regression test beside its target;
/// `PROPTEST_RNG_SEED=N` in the environment replays a run.
fn fuzz(target: Option<&str>, cases: u32) -> Result<()> {
    if let Some(t) = target
        && !FUZZ_TARGETS.contains(&t)
    {
        bail!(
            "unknown fuzz target '{t}' (targets: {})",
            FUZZ_TARGETS.join(", ")
        );
    }
    // nb-agent's build script builds the XDP object, which needs them.
    prerequisites()?;
    let filter = match target {
        Some(t) => format!("fuzz::{t}::"),
        None => "fuzz::".to_string(),
    };
    run(Command::new("cargo")
        .current_dir(workspace())
        .args(["test", "--release", "-p", "nb-agent", "--lib", &filter])
        .env("NB_FUZZ_CASES", cases.to_string()))
}

fn install(root: &Path) -> Result<()> {
    let ws = workspace();
    let bin = root.join("usr/local/bin");
    let etc = root.join("etc/nb");
    let unit_dir = root.join("etc/systemd/system");
    for d in [&bin, &etc, &unit_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    for b in ["nb-agent", "nbctl"] {
        let from = ws.join("target/release").join(b);
        let to = bin.join(b);
        // Copied beside it and renamed over it: a running agent keeps its old file, and the
        // upgrade (`systemctl kill -s SIGUSR2 nb-agent`) starts the new one.
        let tmp = bin.join(format!(".{b}.new"));
        std::fs::copy(&from, &tmp)
            .and_then(|_| std::fs::rename(&tmp, &to))
            .with_context(|| format!("{} -> {}", from.display(), to.display()))?;
    }
    let config = etc.join("nb.toml");
    if !config.exists() {
        std::fs::copy(ws.join("packaging/nb.toml"), &config)
            .with_context(|| format!("writing {}", config.display()))?;
    }
    let unit = unit_dir.join("nb-agent.service");
    std::fs::copy(ws.join("packaging/nb-agent.service"), &unit)
        .with_context(|| format!("writing {}", unit.display()))?;
    println!(
        "installed nb-agent to {}, config {}, unit {}",
        bin.display(),
        config.display(),
        unit.display()
    );
    if root == Path::new("/") && output(Command::new("systemctl").arg("--version")).is_some() {
        let _ = run(Command::new("systemctl").arg("daemon-reload"));
        println!("start it with: systemctl enable --now nb-agent");
    }
    Ok(())
}
