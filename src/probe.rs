//! Probes: one attempt, bounded by a hard deadline, to learn whether a
//! database server answers, and (the `role` probe) what it is.
//!
//! `tcp` only connects. `handshake` also makes the server itself speak: a
//! SIGSTOPped or wedged postmaster still completes TCP connects (the kernel
//! does that), but it never answers an SSLRequest. `role` logs in once, keeps
//! the connection, and asks for role and lag every round (see `postgres` and
//! `mysql`).

use std::fmt;
use std::io::{self, Read};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::config::{Endpoint, Engine, Node, ProbeKind};
use crate::{mysql, postgres};

/// Why a probe failed, short enough for a status line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    Dns(String),
    Refused,
    Timeout,
    /// Any other connect or I/O error, as the OS words it.
    Network(String),
    /// The server closed the connection before it answered.
    Closed,
    /// The server answered something that is not its protocol.
    BadHandshake(String),
    /// The server answered with an error (e.g. too many connections).
    ServerError(String),
    /// The server refused our credentials (the message is the server's; it
    /// never contains the password).
    Auth(String),
    /// TLS could not be set up or the certificate did not verify.
    Tls(String),
    /// A bug: the probe panicked. Reported rather than hidden.
    Internal(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dns(e) => write!(f, "DNS failure: {e}"),
            Self::Refused => f.write_str("connection refused"),
            Self::Timeout => f.write_str("timeout"),
            Self::Network(e) => write!(f, "network error: {e}"),
            Self::Closed => f.write_str("closed by server before answering"),
            Self::BadHandshake(e) => write!(f, "bad handshake: {e}"),
            Self::ServerError(e) => write!(f, "server error: {e}"),
            Self::Auth(e) => write!(f, "authentication failed: {e}"),
            Self::Tls(e) => write!(f, "TLS: {e}"),
            Self::Internal(e) => write!(f, "internal error: {e}"),
        }
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Self::Refused,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Self::Timeout,
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe => Self::Closed,
            _ => Self::Network(e.to_string()),
        }
    }
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
    /// PostgreSQL's timeline on a primary: the most recently promoted of two
    /// primaries has the higher one.
    pub timeline: Option<u32>,
}

/// A logged-in connection the `role` probe keeps open and asks again every
/// round, so that steady-state probing opens no server connection.
pub trait Session: Send {
    /// Asks the server its role and lag, all within `deadline`. After an
    /// error the session is dropped and a new one opened next round.
    fn observe(&mut self, deadline: Instant) -> Result<Observation, Failure>;
}

/// Probes one node, round after round, from its probe thread: holds the
/// `role` probe's connection and backs off after authentication failures.
pub struct NodeProbe {
    node: Node,
    session: Option<Box<dyn Session>>,
    /// After an authentication failure: when to try again, what to report
    /// until then, and the current back-off.
    auth_backoff: Option<(Instant, Failure, Duration)>,
}

/// Back-off after a refused login: a wrong password must not become a login
/// attempt per round per process (and lock the account, or fill the log).
const AUTH_BACKOFF_FIRST: Duration = Duration::from_secs(2);
const AUTH_BACKOFF_MAX: Duration = Duration::from_secs(60);

impl NodeProbe {
    pub fn new(node: Node) -> Self {
        Self {
            node,
            session: None,
            auth_backoff: None,
        }
    }

    /// Probes once; every step shares one deadline `timeout` from now. Only
    /// name resolution can overrun it (the C library gives no way to bound
    /// it); the checker bounds that from outside.
    pub fn probe(&mut self, timeout: Duration) -> Result<Observation, Failure> {
        let deadline = Instant::now() + timeout;
        match self.node.probe {
            ProbeKind::Role => self.observe(deadline),
            ProbeKind::Tcp | ProbeKind::Handshake => {
                probe(&self.node, deadline).map(|()| Observation::default())
            }
        }
    }

    fn observe(&mut self, deadline: Instant) -> Result<Observation, Failure> {
        if let Some((until, failure, _)) = &self.auth_backoff {
            if Instant::now() < *until {
                return Err(failure.clone());
            }
        }
        let session = match &mut self.session {
            Some(session) => session,
            None => {
                let opened = match self.node.engine {
                    Engine::PostgreSql => postgres::connect(&self.node, deadline),
                    Engine::MySql => mysql::connect(&self.node, deadline),
                    Engine::Other => Err(Failure::Internal("no role probe for this engine".into())),
                };
                match opened {
                    Ok(session) => {
                        self.auth_backoff = None;
                        self.session.insert(session)
                    }
                    Err(failure) => {
                        if matches!(failure, Failure::Auth(_)) {
                            let backoff = self
                                .auth_backoff
                                .as_ref()
                                .map_or(AUTH_BACKOFF_FIRST, |(_, _, last)| {
                                    (*last * 2).min(AUTH_BACKOFF_MAX)
                                });
                            self.auth_backoff =
                                Some((Instant::now() + backoff, failure.clone(), backoff));
                        }
                        return Err(failure);
                    }
                }
            }
        };
        session
            .observe(deadline)
            .inspect_err(|_| self.session = None)
    }
}

/// The `tcp` and `handshake` probes: a fresh connection each time.
pub fn probe(node: &Node, deadline: Instant) -> Result<(), Failure> {
    let mut socket = connect(&node.endpoint, deadline)?;
    match (node.probe, node.engine) {
        (ProbeKind::Handshake, Engine::PostgreSql) => postgres_ssl_request(&mut socket, deadline),
        (ProbeKind::Handshake, Engine::MySql) => mysql_greeting(&mut socket, deadline),
        _ => Ok(()),
    }
}

/// What is left of `deadline`; a `Timeout` once less than a millisecond is.
/// (A socket timeout that rounds down to zero would mean "wait forever".)
pub fn remaining(deadline: Instant) -> Result<Duration, Failure> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|left| *left >= Duration::from_millis(1))
        .ok_or(Failure::Timeout)
}

/// Connects to the endpoint. A host name is resolved now (DNS changes are
/// followed) and every address is tried, IPv6 and IPv4, sharing the time
/// left so that one black-holed address cannot use up the whole deadline.
pub fn connect(endpoint: &Endpoint, deadline: Instant) -> Result<Socket, Failure> {
    match endpoint {
        Endpoint::Unix(path) => connect_unix(path, deadline),
        Endpoint::Tcp { host, port } => {
            let addresses: Vec<SocketAddr> = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|e| Failure::Dns(e.to_string()))?
                .collect();
            if addresses.is_empty() {
                return Err(Failure::Dns(format!("no address for {host}")));
            }
            let mut last_failure = Failure::Timeout;
            for (tried, address) in addresses.iter().enumerate() {
                let left = remaining(deadline)?;
                let share = left / u32::try_from(addresses.len() - tried).unwrap_or(1);
                match connect_tcp(*address, share) {
                    Ok(socket) => return Ok(socket),
                    Err(failure) => last_failure = failure,
                }
            }
            Err(last_failure)
        }
    }
}

fn connect_tcp(address: SocketAddr, timeout: Duration) -> Result<Socket, Failure> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    socket.connect_timeout(&address.into(), timeout)?;
    Ok(socket)
}

fn connect_unix(path: &Path, deadline: Instant) -> Result<Socket, Failure> {
    let address = SockAddr::unix(path)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    match socket.connect_timeout(&address, remaining(deadline)?) {
        Ok(()) => Ok(socket),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(Failure::Network(format!("no socket at {}", path.display())))
        }
        Err(e) => Err(e.into()),
    }
}

pub fn write_all_by(
    socket: &mut Socket,
    mut bytes: &[u8],
    deadline: Instant,
) -> Result<(), Failure> {
    while !bytes.is_empty() {
        socket.set_write_timeout(Some(remaining(deadline)?))?;
        // MSG_NOSIGNAL: a server that hung up must not kill the process with
        // SIGPIPE when the host application does not ignore it.
        match socket.send_with_flags(bytes, libc::MSG_NOSIGNAL) {
            Ok(0) => return Err(Failure::Closed),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Fills `buf`, each read bounded by what is left of the deadline, so a
/// server trickling bytes cannot stretch the probe.
pub fn read_exact_by(
    socket: &mut Socket,
    buf: &mut [u8],
    deadline: Instant,
) -> Result<(), Failure> {
    let mut filled = 0;
    while filled < buf.len() {
        socket.set_read_timeout(Some(remaining(deadline)?))?;
        match socket.read(&mut buf[filled..]) {
            Ok(0) => return Err(Failure::Closed),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// PostgreSQL's SSLRequest: length 8, code 1234.5679. The postmaster answers
/// `S` or `N` itself before any authentication, and a client that then hangs
/// up leaves no complaint in the server log.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

fn postgres_ssl_request(socket: &mut Socket, deadline: Instant) -> Result<(), Failure> {
    write_all_by(socket, &SSL_REQUEST, deadline)?;
    let mut answer = [0u8; 1];
    read_exact_by(socket, &mut answer, deadline)?;
    match answer[0] {
        b'S' | b'N' => Ok(()),
        other => Err(Failure::BadHandshake(format!(
            "expected 'S' or 'N' to an SSLRequest, got byte 0x{other:02x}"
        ))),
    }
}

/// Greetings are small; anything bigger is not a MySQL server.
const MAX_GREETING: usize = 16 * 1024;

/// Reads the server greeting (protocol v10) that MySQL and MariaDB send on
/// connect. An error packet in its place (too many connections, host blocked)
/// means the server will not serve us.
fn mysql_greeting(socket: &mut Socket, deadline: Instant) -> Result<(), Failure> {
    let mut header = [0u8; 4];
    read_exact_by(socket, &mut header, deadline)?;
    let length =
        usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
    if length == 0 || length > MAX_GREETING {
        return Err(Failure::BadHandshake(format!("greeting of {length} bytes")));
    }
    let mut payload = vec![0u8; length];
    read_exact_by(socket, &mut payload, deadline)?;
    parse_mysql_greeting(&payload)
}

fn parse_mysql_greeting(payload: &[u8]) -> Result<(), Failure> {
    match payload.first() {
        Some(0x0a) => {
            // Protocol 10: a NUL-terminated server version follows.
            let version = &payload[1..];
            if version.contains(&0) {
                Ok(())
            } else {
                Err(Failure::BadHandshake("truncated greeting".into()))
            }
        }
        Some(0xff) if payload.len() >= 3 => {
            let code = u16::from_le_bytes([payload[1], payload[2]]);
            let mut message = &payload[3..];
            // Protocol 4.1 adds '#' and a five-character SQLSTATE.
            if message.first() == Some(&b'#') && message.len() >= 6 {
                message = &message[6..];
            }
            Err(Failure::ServerError(format!(
                "{code} {}",
                String::from_utf8_lossy(message).trim()
            )))
        }
        Some(other) => Err(Failure::BadHandshake(format!(
            "expected a MySQL greeting, got first byte 0x{other:02x}"
        ))),
        None => Err(Failure::BadHandshake("empty greeting".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Login, SslMode, Tls};
    use std::io::Write;
    use std::net::TcpListener;
    use std::os::unix::net::UnixListener;
    use std::thread;

    fn node(engine: Engine, probe: ProbeKind, endpoint: Endpoint) -> Node {
        Node {
            alias: "db".into(),
            group: 0,
            engine,
            endpoint,
            probe,
            login: Login {
                user: "u".into(),
                password: None,
                database: String::new(),
            },
            tls: Tls {
                mode: SslMode::Disable,
                root_cert: None,
            },
        }
    }

    fn probe(node: &Node, timeout: Duration) -> Result<(), Failure> {
        super::probe(node, Instant::now() + timeout)
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
        let greeting: &[u8] = b"\x0e\x00\x00\x00\x0a11.0.2-Maria\x00";
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
    fn greeting_parser_cases() {
        assert!(parse_mysql_greeting(b"\x0a5.7").is_err());
        assert_eq!(
            parse_mysql_greeting(b"\xff\x69\x04#HY000Host 'x' is blocked"),
            Err(Failure::ServerError("1129 Host 'x' is blocked".into()))
        );
        assert!(parse_mysql_greeting(b"").is_err());
        assert!(parse_mysql_greeting(b"\xff").is_err());
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
    fn every_resolved_address_is_tried() {
        // "localhost" may resolve to ::1 first; the server is on IPv4 only.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let local = Endpoint::Tcp {
            host: "localhost".into(),
            port,
        };
        assert_eq!(
            probe(&node(Engine::Other, ProbeKind::Tcp, local), SHORT),
            Ok(())
        );
    }

    #[test]
    fn unresolvable_host_is_a_dns_failure() {
        // A name with an empty label is rejected by the resolver itself,
        // without asking any DNS server.
        let bad = Endpoint::Tcp {
            host: "bad..name".into(),
            port: 5432,
        };
        let result = probe(&node(Engine::PostgreSql, ProbeKind::Tcp, bad), SHORT);
        assert!(matches!(result, Err(Failure::Dns(_))), "{result:?}");
    }
}
