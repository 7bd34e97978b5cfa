//! `worker`: parses the command line, installs logging, binds, and runs [`worker::run`] until
//! SIGTERM or Ctrl-C.
//!
//! Exit codes (`sysexits.h`, the README's table): 0 after a clean shutdown (and for `--help` /
//! `--version`), 64 (`EX_USAGE`) for a bad flag or configuration, 69 (`EX_UNAVAILABLE`) when
//! the address is taken, 70 (`EX_SOFTWARE`) for a failure after starting, 71 (`EX_OSERR`) when
//! the runtime cannot start.

use std::process::ExitCode;

use discovery::cli::{init_tracing, parse_or_exit, shutdown_signal};

use worker::cli::Cli;

fn main() -> ExitCode {
    let cli: Cli = parse_or_exit();
    init_tracing();
    worker::cli::main(cli, shutdown_signal())
}
