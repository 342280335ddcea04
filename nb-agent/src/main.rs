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
        /// Take over from the agent running with this config: its listening sockets, health
        /// and flow sync; it then finishes its requests and exits (README "Upgrading").
        #[arg(long)]
        upgrade: bool,
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
        Command::Run {
            config,
            detach_xdp,
            upgrade,
        } => {
            // Before anything opens descriptors: the client budget follows the limit.
            nb_agent::fds::init();
            // The control loop (sweeps, reloads) runs on this thread and the tasks it starts
            // (checks, the API) on one worker beside it, so a long sweep delays no check; the
            // ports are served by runtimes of their own, `workers` of them. A config that
            // does not load is reported by `agent::run` below.
            let workers = config::load(&config).map_or(0, |c| c.balancer.workers);
            let serving = match serving_runtimes(workers) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("tokio runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            nb_agent::proxy::set_runtimes(serving);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("nb-control")
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("tokio runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = rt.block_on(agent::run(&config, upgrade));
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

/// `workers` current-thread runtimes, each on a thread of its own (thread per core, as
/// HAProxy's threads and nginx's workers; no work stealing, no cross-thread wake-ups); 0 is
/// one per CPU. Each runtime is owned by its thread and runs until the process exits.
fn serving_runtimes(workers: u32) -> std::io::Result<Vec<tokio::runtime::Handle>> {
    let n = match workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n as usize,
    };
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        handles.push(rt.handle().clone());
        // Tasks spawned through the handle run while the thread waits here.
        std::thread::Builder::new()
            .name(format!("nb-serve-{i}"))
            .spawn(move || {
                nb_agent::proxy::enter_worker(i);
                rt.block_on(std::future::pending::<()>())
            })?;
    }
    Ok(handles)
}

fn detach(path: &std::path::Path) -> anyhow::Result<()> {
    let cfg = config::load(path)?;
    let dir = nb_agent::pins::location(&cfg.balancer.bpf_pin_path)?;
    for iface in &cfg.balancer.interfaces {
        if Dataplane::detach(&dir, iface)? {
            log::info!("{iface}: XDP detached");
        }
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
