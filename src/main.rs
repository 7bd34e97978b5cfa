//! `cluster`: with no subcommand, runs the local cluster (see `cluster --help`); with
//! `agent|members|services`, `worker` or `balancer`, runs that one component with the flags of
//! the `discovery`, `worker` or `balancer` binary.

use std::process::ExitCode;

use clap::Parser;
use discovery::cli::{exit_on_clap_error, init_tracing, parse_or_exit, runtime_or_exit};

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().collect();
    let sub = args.get(1).cloned().unwrap_or_default();
    match sub.as_str() {
        "agent" | "members" | "services" => {
            // Parse exactly as the `discovery` binary does.
            args[0] = "discovery".into();
            let cli = match discovery::cli::Cli::try_parse_from(&args) {
                Ok(c) => c,
                Err(e) => exit_on_clap_error(e),
            };
            init_tracing();
            runtime_or_exit().block_on(discovery::cli::run(cli, cluster::component_shutdown()))
        }
        "worker" => {
            args.remove(0);
            let cli = match worker::cli::Cli::try_parse_from(&args) {
                Ok(c) => c,
                Err(e) => exit_on_clap_error(e),
            };
            init_tracing();
            worker::cli::main(cli, cluster::component_shutdown())
        }
        "balancer" => {
            args.remove(0);
            let cli = match balancer::cli::Args::try_parse_from(&args) {
                Ok(c) => c,
                Err(e) => exit_on_clap_error(e),
            };
            init_tracing();
            balancer::cli::main(cli, cluster::component_shutdown())
        }
        _ => {
            let launch: cluster::LaunchArgs = parse_or_exit();
            runtime_or_exit().block_on(cluster::launch(launch, discovery::cli::shutdown_signal()))
        }
    }
}
