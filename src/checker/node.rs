//! Probing one node, round after round, from its probe thread: the `tcp`,
//! `handshake`, `role` or `patroni` probe, the check that the server still
//! takes new sessions, and what the kept session's socket says between
//! rounds.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use log::info;

use super::config::{Node, ProbeKind};
use crate::engines::patroni::{self, Api};
use crate::engines::{Engine, Observation, Role, Server, Session};
use crate::net::{self, Failure};

/// Back-off after a refused login: a wrong password must not become a login
/// attempt per round per process (and lock the account, or fill the log).
const AUTH_BACKOFF_FIRST: Duration = Duration::from_secs(2);
const AUTH_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// One node's prober, owned by its probe thread: it holds the `role`
/// probe's session from one round to the next.
pub struct NodeProbe {
    name: String,
    engine: Engine,
    kind: ProbeKind,
    server: Server,
    session: Option<Box<dyn Session>>,
    auth_backoff: Option<AuthBackoff>,
    patroni_api: Option<Api>,
    /// Made at the first `patroni` probe (it reads the CA file), then kept
    /// with its connection.
    patroni: Option<patroni::Client>,
}

/// After an authentication failure: when to try again, what to report until
/// then, and the current back-off.
struct AuthBackoff {
    until: Instant,
    failure: Failure,
    last: Duration,
}

impl NodeProbe {
    pub fn new(node: &Node) -> Self {
        Self {
            name: format!("{} ({})", node.alias, node.server.endpoint),
            engine: node.engine,
            kind: node.probe,
            server: node.server.clone(),
            session: None,
            auth_backoff: None,
            patroni_api: node.patroni.clone(),
            patroni: None,
        }
    }

    /// Probes once, every step within `timeout` from now. With
    /// `check_new_sessions`, a node probed over a kept session must also
    /// start a new one: the kept session answering proves only that the
    /// server answers.
    pub fn probe(
        &mut self,
        timeout: Duration,
        check_new_sessions: bool,
    ) -> Result<Observation, Failure> {
        let deadline = Instant::now() + timeout;
        match self.kind {
            ProbeKind::Tcp => {
                net::connect(&self.server.endpoint, deadline).map(|_| Observation::default())
            }
            ProbeKind::Handshake => self
                .engine
                .handshake(&self.server.endpoint, deadline)
                .map(|()| Observation::default()),
            ProbeKind::Role => self.role(deadline, check_new_sessions),
            ProbeKind::Patroni => self.ask_patroni(deadline),
            ProbeKind::PatroniAndRole => {
                let patroni = self.ask_patroni(deadline)?;
                let server = self.role(deadline, check_new_sessions)?;
                agree(&patroni, server)
            }
        }
    }

    /// The `role` probe: the kept session's answer, and with
    /// `check_new_sessions` a fresh connection's.
    fn role(
        &mut self,
        deadline: Instant,
        check_new_sessions: bool,
    ) -> Result<Observation, Failure> {
        let observation = self.observe(deadline)?;
        if check_new_sessions {
            self.engine
                .check_new_sessions(&self.server, deadline)
                .map_err(|e| Failure::NoNewSessions(Box::new(e)))?;
        }
        Ok(observation)
    }

    fn ask_patroni(&mut self, deadline: Instant) -> Result<Observation, Failure> {
        let client = match &mut self.patroni {
            Some(client) => client,
            None => {
                let api = self
                    .patroni_api
                    .as_ref()
                    .ok_or_else(|| Failure::Internal("no Patroni REST API for this node".into()))?;
                self.patroni.insert(patroni::Client::new(api)?)
            }
        };
        client.observe(deadline)
    }

    /// The kept session's socket, to watch between probes.
    pub fn watched_socket(&self) -> Option<RawFd> {
        self.session.as_ref().map(|session| session.socket())
    }

    /// The kept session's socket became readable between probes. `None`:
    /// nothing worth a report (a notice). Otherwise the server ended the
    /// session, and this is what a fresh session found at once: its
    /// observation, or a failure that two attempts agree on.
    pub fn on_readable(&mut self, timeout: Duration) -> Option<Result<Observation, Failure>> {
        let deadline = Instant::now() + timeout;
        let ended = self.session.as_mut()?.on_readable(deadline).err()?;
        self.session = None;
        info!(
            "{}: the server ended the probe's session ({ended}); reconnecting",
            self.name
        );
        Some(self.observe(deadline))
    }

    /// The kept session's answer; a session the server has ended (closed,
    /// or ended with a fatal error: `pg_terminate_backend`, a restart) is
    /// replaced at once by a fresh one, within the same deadline.
    fn observe(&mut self, deadline: Instant) -> Result<Observation, Failure> {
        if let Some(session) = &mut self.session {
            match session.observe(deadline) {
                Ok(observation) => return Ok(observation),
                Err(failure) => {
                    self.session = None;
                    if !matches!(failure, Failure::Closed | Failure::ServerError(_)) {
                        return Err(failure);
                    }
                }
            }
        }
        self.open(deadline)?
            .observe(deadline)
            .inspect_err(|_| self.session = None)
    }

    fn open(&mut self, deadline: Instant) -> Result<&mut Box<dyn Session>, Failure> {
        if let Some(backoff) = &self.auth_backoff {
            if Instant::now() < backoff.until {
                return Err(backoff.failure.clone());
            }
        }
        match self.engine.open_session(&self.server, deadline) {
            Ok(session) => {
                self.auth_backoff = None;
                Ok(self.session.insert(session))
            }
            Err(failure) => {
                if matches!(failure, Failure::Auth(_)) {
                    let last = self
                        .auth_backoff
                        .as_ref()
                        .map_or(AUTH_BACKOFF_FIRST, |b| (b.last * 2).min(AUTH_BACKOFF_MAX));
                    self.auth_backoff = Some(AuthBackoff {
                        until: Instant::now() + last,
                        failure: failure.clone(),
                        last,
                    });
                }
                Err(failure)
            }
        }
    }
}

/// Patroni's view and the server's own must name the same role: a leader
/// still in recovery, or a primary Patroni has not given the lock, takes
/// no writes (the moment of a switchover, or a server Patroni does not
/// control). The server's observation is the finer one.
fn agree(patroni: &Observation, server: Observation) -> Result<Observation, Failure> {
    let name = |role| match role {
        Some(Role::Primary) => "primary",
        Some(Role::Standby) => "standby",
        None => "unknown",
    };
    if patroni.role == server.role {
        return Ok(server);
    }
    Err(Failure::Conflict(format!(
        "Patroni says {}, the server says {}",
        if patroni.role == Some(Role::Primary) {
            "leader"
        } else {
            name(patroni.role)
        },
        name(server.role)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engines::Login;
    use crate::net::{Endpoint, Tls};
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::os::unix::net::UnixListener;
    use std::thread;

    fn node(engine: Engine, probe: ProbeKind, endpoint: Endpoint) -> Node {
        Node {
            alias: "db".into(),
            group: 0,
            engine,
            probe,
            server: Server {
                endpoint,
                login: Login {
                    user: "u".into(),
                    password: None,
                    database: String::new(),
                    fallback_database: None,
                },
                tls: Tls::DISABLED,
            },
            patroni: None,
        }
    }

    fn probe(node: &Node, timeout: Duration) -> Result<(), Failure> {
        NodeProbe::new(node).probe(timeout, false).map(drop)
    }

    fn tcp(port: u16) -> Endpoint {
        Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port,
        }
    }

    /// A listener that accepts one connection and answers it with `reply`
    /// (after reading `expect` bytes), then waits for the client to leave.
    fn answering(expect: usize, reply: &'static [u8]) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = vec![0u8; expect];
            stream.read_exact(&mut request).unwrap();
            stream.write_all(reply).unwrap();
            let _ = stream.read(&mut [0u8; 1]);
        });
        port
    }

    /// A port with nothing listening on it.
    fn refusing() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    const SHORT: Duration = Duration::from_millis(300);

    #[test]
    fn tcp_probe_sees_listening_and_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(
            probe(&node(Engine::PostgreSql, ProbeKind::Tcp, tcp(port)), SHORT),
            Ok(())
        );
        let dead = node(Engine::PostgreSql, ProbeKind::Tcp, tcp(refusing()));
        assert_eq!(probe(&dead, SHORT), Err(Failure::Refused));
    }

    #[test]
    fn postgres_answers_s_or_n() {
        for reply in [b"N", b"S"] {
            let port = answering(8, reply);
            let pg = node(Engine::PostgreSql, ProbeKind::Handshake, tcp(port));
            assert_eq!(probe(&pg, SHORT), Ok(()));
        }
    }

    #[test]
    fn a_listener_that_never_answers_is_a_timeout_within_the_deadline() {
        // Never accepted: the kernel completes the TCP handshake from the
        // backlog, exactly like a SIGSTOPped postmaster.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hung = node(Engine::PostgreSql, ProbeKind::Handshake, tcp(port));
        let started = Instant::now();
        assert_eq!(probe(&hung, SHORT), Err(Failure::Timeout));
        let took = started.elapsed();
        assert!(took >= SHORT && took < SHORT * 3, "took {took:?}");
        // The tcp probe is fooled by the same listener: its documented weakness.
        assert_eq!(
            probe(&node(Engine::PostgreSql, ProbeKind::Tcp, tcp(port)), SHORT),
            Ok(())
        );
        drop(listener);
    }

    #[test]
    fn garbage_and_early_close_are_down() {
        let port = answering(8, b"HTTP/1.1 400 Bad Request\r\n\r\n");
        let pg = node(Engine::PostgreSql, ProbeKind::Handshake, tcp(port));
        assert!(matches!(probe(&pg, SHORT), Err(Failure::BadHandshake(_))));

        let port = answering(8, b"");
        let pg = node(Engine::PostgreSql, ProbeKind::Handshake, tcp(port));
        assert_eq!(probe(&pg, SHORT), Err(Failure::Timeout));

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        thread::spawn(move || drop(listener.accept().unwrap()));
        let pg = node(Engine::PostgreSql, ProbeKind::Handshake, tcp(port));
        assert_eq!(probe(&pg, SHORT), Err(Failure::Closed));
    }

    #[test]
    fn mysql_greeting_and_error_packet() {
        // A real MariaDB 11 greeting: version, connection id, scramble,
        // capabilities, character set, status, plugin.
        let greeting: &[u8] = b"\x53\x00\x00\x00\x0a11.0.2-MariaDB\x00\x07\x00\x00\x00\
            01234567\x00\xfe\xff\x2d\x02\x00\xff\x81\x15\x00\x00\x00\x00\x00\x00\x00\x00\
            \x00\x00\x0089ABCDEFGHIJ\x00mysql_native_password\x00";
        let port = answering(0, greeting);
        let my = node(Engine::MySql, ProbeKind::Handshake, tcp(port));
        assert_eq!(probe(&my, SHORT), Ok(()));

        let too_many: &[u8] = b"\x17\x00\x00\x00\xff\x10\x04Too many connections";
        let port = answering(0, too_many);
        let my = node(Engine::MySql, ProbeKind::Handshake, tcp(port));
        assert_eq!(
            probe(&my, SHORT),
            Err(Failure::ServerError("1040 Too many connections".into()))
        );

        let port = answering(0, b"\xff\xff\xff\x00");
        let my = node(Engine::MySql, ProbeKind::Handshake, tcp(port));
        assert!(matches!(probe(&my, SHORT), Err(Failure::BadHandshake(_))));
    }

    #[test]
    fn unix_sockets() {
        let dir = std::env::temp_dir().join(format!("dbha-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(".s.PGSQL.5432");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.read_exact(&mut [0u8; 8]).unwrap();
            stream.write_all(b"N").unwrap();
        });
        let pg = node(
            Engine::PostgreSql,
            ProbeKind::Handshake,
            Endpoint::Unix(path.clone()),
        );
        assert_eq!(probe(&pg, SHORT), Ok(()));

        let missing = node(
            Engine::PostgreSql,
            ProbeKind::Tcp,
            Endpoint::Unix(dir.join("nope")),
        );
        assert!(matches!(probe(&missing, SHORT), Err(Failure::Network(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn patroni_and_the_server_must_agree_on_the_role() {
        let primary = Observation {
            role: Some(Role::Primary),
            timeline: Some(2),
            ..Observation::default()
        };
        let standby = Observation {
            role: Some(Role::Standby),
            lag: Some(Duration::from_millis(30)),
            ..Observation::default()
        };
        assert_eq!(agree(&primary, primary), Ok(primary));
        assert_eq!(agree(&standby, standby), Ok(standby), "the server's lag");
        let promoting = agree(&primary, standby).unwrap_err();
        assert_eq!(
            promoting.to_string(),
            "conflict: Patroni says leader, the server says standby"
        );
        let rogue = agree(&standby, primary).unwrap_err();
        assert_eq!(
            rogue.to_string(),
            "conflict: Patroni says standby, the server says primary"
        );
    }
}
