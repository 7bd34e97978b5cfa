//! The one error type of the `discovery` library.

use std::fmt;
use std::time::Duration;

/// What went wrong talking to a Consul agent.
#[derive(Debug)]
pub enum Error {
    /// The configuration was unusable (bad `CONSUL_HTTP_ADDR`, unreadable token file).
    Config(String),
    /// Could not connect, or the connection broke before an answer came.
    Transport(Box<dyn std::error::Error + Send + Sync>),
    /// No full answer within the call's deadline.
    Timeout(Duration),
    /// The agent answered with a non-200 status; `body` is Consul's plain-text reason.
    Status { status: u16, body: String },
    /// The agent answered 200 with a body that is not the expected JSON.
    Decode(serde_json::Error),
}

impl Error {
    /// True when the agent could not be reached at all (refused, reset, unreachable): the
    /// situation in which Consul's clients reset their blocking index, as the agent may have
    /// restarted.
    pub fn is_connect(&self) -> bool {
        match self {
            Self::Transport(e) => {
                // hyper-util reports connect failures with `is_connect()`; walk the chain for
                // the io error kinds that mean "nobody is listening".
                if let Some(legacy) = e.downcast_ref::<hyper_util::client::legacy::Error>() {
                    if legacy.is_connect() {
                        return true;
                    }
                }
                let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e.as_ref());
                while let Some(err) = src {
                    if let Some(io) = err.downcast_ref::<std::io::Error>() {
                        use std::io::ErrorKind::*;
                        if matches!(
                            io.kind(),
                            ConnectionRefused | ConnectionReset | NotConnected
                        ) {
                            return true;
                        }
                    }
                    src = err.source();
                }
                false
            }
            _ => false,
        }
    }

    /// The HTTP status when the agent answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(msg) => write!(f, "invalid Consul client configuration: {msg}"),
            Self::Transport(_) => f.write_str("could not talk to the Consul agent"),
            Self::Timeout(d) => write!(f, "the Consul agent did not answer within {d:?}"),
            // The same words the Go client uses, so operators recognise them.
            Self::Status { status, body } => {
                write!(
                    f,
                    "Unexpected response code: {status} ({})",
                    body.trim_end()
                )
            }
            Self::Decode(_) => f.write_str("could not decode the Consul agent's answer"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Transport(e) => Some(e.as_ref()),
            Self::Decode(e) => Some(e),
            _ => None,
        }
    }
}

/// Renders an error with its whole `source()` chain, for logs.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut src = err.source();
    while let Some(e) = src {
        out.push_str(": ");
        out.push_str(&e.to_string());
        src = e.source();
    }
    out
}
