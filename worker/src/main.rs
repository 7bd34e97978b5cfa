//! `worker`: parses the command line, installs logging, binds, and runs [`worker::run`] until
//! SIGTERM or Ctrl-C.
//!
//! Exit codes: 0 after a clean shutdown (and for `--help` / `--version`), 64 (`EX_USAGE`) for a
//! bad flag or configuration, 1 for anything else (the address is taken, the runtime failed).

use std::process::ExitCode;

use discovery::cli::{init_tracing, parse_or_exit};

use worker::cli::Cli;

fn main() -> ExitCode {
    let cli: Cli = parse_or_exit();
    init_tracing();
    worker::cli::main(cli, shutdown_signal())
}

/// Completes on the first SIGTERM or Ctrl-C. A second one ends the process at once, for an
/// operator who does not want to wait for the drain.
async fn shutdown_signal() {
    wait_for_signal().await;
    tokio::spawn(async {
        wait_for_signal().await;
        tracing::warn!("second signal: exiting without finishing the drain");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
                    () = ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    ctrl_c().await;
}

/// Completes on Ctrl-C; never, if no handler can be installed (SIGTERM still works).
async fn ctrl_c() {
    match tokio::signal::ctrl_c().await {
        Ok(()) => tracing::info!(signal = "SIGINT", "signal received"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    }
}
