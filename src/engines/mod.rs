//! Database protocols, on top of [`crate::net`]: for each engine the session
//! the `role` probe keeps, the `handshake` probe, and the check that the
//! server still takes new sessions.

pub mod mysql;
pub mod patroni;
pub mod postgres;

use std::fmt;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crate::net::{Endpoint, Failure, Tls};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    PostgreSql,
    MySql,
    /// Any other server engine; it has no protocol-aware probe.
    Other,
}

/// A password: never printed, not even by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Who the `role` probe logs in as, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    pub password: Option<Secret>,
    /// The database to connect to; empty for none (MySQL).
    pub database: String,
    /// Connected to instead when the server refuses `database` (PostgreSQL).
    pub fallback_database: Option<String>,
}

/// Everything needed to reach one server and log in to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Server {
    pub endpoint: Endpoint,
    pub login: Login,
    pub tls: Tls,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    /// Read-only: a streaming standby (PostgreSQL in recovery) or a MySQL
    /// server with `read_only`/`super_read_only` on.
    Standby,
}

/// What a successful probe learned. The `tcp` and `handshake` probes learn
/// nothing but that the server answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Observation {
    pub role: Option<Role>,
    /// A standby's replication lag; `None` when unknown.
    pub lag: Option<Duration>,
    /// On a primary, how recent its promotion is: of two primaries, the one
    /// promoted later has the higher value. PostgreSQL's timeline; MariaDB's
    /// GTID sequence number at which it began taking writes.
    pub timeline: Option<u64>,
    /// Where the server's data stands, comparable between the primary and
    /// its standbys: a standby whose position is at least a primary's has
    /// every commit that primary had made when it reported it (PostgreSQL:
    /// WAL insert or replay LSN; MariaDB: GTID sequence number).
    pub position: Option<u64>,
    /// On a standby, the timeline of the WAL it receives (PostgreSQL): one
    /// older than the writer's means it follows a primary a promotion left
    /// behind. `None` when unknown.
    pub upstream_timeline: Option<u64>,
}

impl fmt::Display for Observation {
    /// `primary, timeline 2` or `standby, lag 0.012 s`: a debug log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.role {
            Some(Role::Primary) => f.write_str("primary")?,
            Some(Role::Standby) => f.write_str("standby")?,
            None => f.write_str("answers")?,
        }
        if let Some(timeline) = self.timeline {
            write!(f, ", timeline {timeline}")?;
        }
        if let Some(lag) = self.lag {
            write!(f, ", lag {:.3} s", lag.as_secs_f64())?;
        }
        Ok(())
    }
}

/// A logged-in connection the `role` probe keeps open and asks again every
/// round, so that steady-state probing opens no server connection.
pub trait Session: Send {
    /// Asks the server its role and lag, all within `deadline`. After an
    /// error the session is dropped and a new one opened.
    fn observe(&mut self, deadline: Instant) -> Result<Observation, Failure>;

    /// The socket to watch between probes.
    fn socket(&self) -> RawFd;

    /// The socket became readable between probes: takes in what the server
    /// sent (a notice, a parameter change) and fails if the server ended the
    /// session (it closed the connection or sent a fatal error).
    fn on_readable(&mut self, deadline: Instant) -> Result<(), Failure>;
}

impl Engine {
    /// Opens the session the `role` probe keeps: connect, TLS, login.
    pub fn open_session(
        self,
        server: &Server,
        deadline: Instant,
    ) -> Result<Box<dyn Session>, Failure> {
        match self {
            Self::PostgreSql => postgres::open_session(server, deadline),
            Self::MySql => mysql::open_session(server, deadline),
            Self::Other => Err(Failure::Internal("no role probe for this engine".into())),
        }
    }

    /// The `handshake` probe: a fresh connection on which the server itself
    /// must answer (a kernel completes TCP connects for a hung process).
    pub fn handshake(self, endpoint: &Endpoint, deadline: Instant) -> Result<(), Failure> {
        match self {
            Self::PostgreSql => postgres::handshake(endpoint, deadline),
            Self::MySql => mysql::handshake(endpoint, deadline),
            Self::Other => crate::net::connect(endpoint, deadline).map(drop),
        }
    }

    /// Whether the server still starts new sessions, on a fresh connection:
    /// a kept session answering proves only that the server answers.
    pub fn check_new_sessions(self, server: &Server, deadline: Instant) -> Result<(), Failure> {
        match self {
            Self::PostgreSql => postgres::check_new_sessions(server, deadline),
            // A login, not just the greeting: MySQL blocks a client host
            // after `max_connect_errors` aborted handshakes.
            Self::MySql => mysql::open_session(server, deadline).map(drop),
            Self::Other => crate::net::connect(&server.endpoint, deadline).map(drop),
        }
    }
}
