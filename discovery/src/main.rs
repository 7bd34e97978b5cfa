//! The `discovery` binary: see `discovery --help`.

use std::process::ExitCode;

use discovery::cli::{init_tracing, parse_or_exit, run, runtime_or_exit, shutdown_signal, Cli};

fn main() -> ExitCode {
    let cli: Cli = parse_or_exit();
    init_tracing();
    runtime_or_exit().block_on(run(cli, shutdown_signal()))
}
