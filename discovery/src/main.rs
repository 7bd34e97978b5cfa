//! The `discovery` binary: see `discovery --help`.

use std::process::ExitCode;

use discovery::cli::{init_tracing, parse_or_exit, run, shutdown_signal, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = parse_or_exit();
    init_tracing();
    run(cli, shutdown_signal()).await
}
