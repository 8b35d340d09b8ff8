//! The network layer every engine speaks through: deadline-bounded
//! connections and socket I/O, one plain-or-TLS transport, a wait on a
//! session socket, and the failures all of them report. It knows no database
//! protocol.

mod failure;
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;
mod socket;
pub mod tls;
mod transport;
pub mod wait;

use std::fmt;
use std::path::PathBuf;

pub use failure::{one_line, Failure, MAX_QUOTE};
pub use socket::{block_sigpipe, connect, remaining, Wire};
pub use transport::Transport;

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// Host name or IP literal (resolved at every connect, so DNS changes are
    /// followed) and port.
    Tcp {
        host: String,
        port: u16,
    },
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "{host}:{port}"),
            Self::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// TLS use, with libpq's `sslmode` meanings (MySQL's `ssl_mode` maps onto
/// them: `DISABLED`, `PREFERRED`, `REQUIRED`, `VERIFY_CA`, `VERIFY_IDENTITY`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    pub mode: SslMode,
    /// CA certificates (PEM) to verify the server with.
    pub root_cert: Option<PathBuf>,
}

impl Tls {
    pub const DISABLED: Self = Self {
        mode: SslMode::Disable,
        root_cert: None,
    };
}
