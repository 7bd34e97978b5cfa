//! The `balancer` binary: see `balancer --help`.

use std::process::ExitCode;

use discovery::cli::{init_tracing, parse_or_exit, shutdown_signal};

fn main() -> ExitCode {
    let args: balancer::cli::Args = parse_or_exit();
    init_tracing();
    balancer::cli::main(args, shutdown_signal())
}
