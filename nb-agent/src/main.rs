//! `nb-agent`: the nb daemon (`run`) and config validator (`check`).

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use nb_agent::{agent, config, dataplane::Dataplane};

#[derive(Parser)]
#[command(name = "nb-agent", version, about = "nb load balancer agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        #[arg(long, default_value = "/etc/nb/nb.toml")]
        config: PathBuf,
        /// On exit, detach the XDP program and remove its pins instead of leaving them.
        #[arg(long)]
        detach_xdp: bool,
    },
    /// Validate a config file: exit 0, or 1 with every error as PATH:LINE: message.
    Check {
        #[arg(long, default_value = "/etc/nb/nb.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match config::load(&config) {
            Ok(c) => {
                println!("{}: ok ({} port(s))", config.display(), c.ports.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config, detach_xdp } => {
            // `workers` sizes the runtime that serves http/https ports (0: one per CPU). A
            // config that does not load is reported by `agent::run` below.
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if let Ok(c) = config::load(&config)
                && c.balancer.workers > 0
            {
                builder.worker_threads(c.balancer.workers as usize);
            }
            let rt = match builder.enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("tokio runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = rt.block_on(agent::run(&config));
            if let Err(e) = result {
                eprintln!("nb-agent: {e}");
                return ExitCode::FAILURE;
            }
            if detach_xdp && let Err(e) = detach(&config) {
                eprintln!("nb-agent: detaching XDP: {e:#}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
    }
}

fn detach(path: &std::path::Path) -> anyhow::Result<()> {
    let cfg = config::load(path)?;
    for iface in &cfg.balancer.interfaces {
        if Dataplane::detach(&cfg.balancer.bpf_pin_path, iface)? {
            log::info!("{iface}: XDP detached");
        }
    }
    std::fs::remove_dir_all(&cfg.balancer.bpf_pin_path)?;
    Ok(())
}
