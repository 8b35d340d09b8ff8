//! The PostgreSQL `role` probe: logs in once (TLS and authentication as libpq
//! would) and then asks the same connection, every round, for role, lag and timeline.

use std::fmt;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::{DataRowBody, ErrorFields, Message};
use postgres_protocol::message::frontend;
use rustls::{ClientConnection, StreamOwned};
use socket2::Socket;

use crate::config::{Endpoint, Login, Node, Secret, SslMode};
use crate::probe::{self, remaining, Failure, Observation, Role, Session};
use crate::tls::{self, ClientTls};

/// Role, replay lag (seconds) and timeline, in one round trip.
///
/// `pg_is_in_recovery()` is read once (a volatile function keeps the
/// subquery from being flattened), so a promotion mid-statement cannot mix
/// answers. A standby is caught up (lag 0) while its WAL receiver is connected
/// and has replayed all it received; otherwise its lag is the age of the last
/// replayed commit, which keeps growing while it is cut off from its primary,
/// and is NULL (unknown) if it has replayed nothing since it started. A
/// primary's lag is 0: reads there are never stale. Its timeline is the one in
/// the name of the WAL file it writes. PostgreSQL 10 or later.
const ROLE_QUERY: &str = "\
SELECT standby,
       CASE WHEN NOT standby THEN 0
            WHEN pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn()
                 AND EXISTS (SELECT FROM pg_stat_wal_receiver) THEN 0
            ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())
       END,
       CASE WHEN NOT standby
            THEN ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint
       END
FROM (SELECT pg_is_in_recovery() AS standby) AS recovery";

/// No answer to our queries comes near this; a bigger length means we are
/// not talking to PostgreSQL (or the stream is out of step).
const MAX_MESSAGE: usize = 1 << 20;

/// How long dropping a session may spend saying goodbye.
const TERMINATE_WAIT: Duration = Duration::from_millis(50);

/// Server messages are quoted in status lines: one line, bounded.
const MAX_QUOTE: usize = 300;

pub fn connect(node: &Node, deadline: Instant) -> Result<Box<dyn Session>, Failure> {
    let connection = match (&node.endpoint, node.tls.mode) {
        // PostgreSQL has no TLS over unix sockets; libpq ignores sslmode there.
        (Endpoint::Unix(_), _) | (_, SslMode::Disable) => start(node, deadline, Encryption::Off),
        (Endpoint::Tcp { host, .. }, mode) => {
            let plan = tls::client(&node.tls, host, "sslrootcert")?;
            let (first, fallback) = match mode {
                SslMode::Allow => (Encryption::PlainFirst, Some(Encryption::Require(&plan))),
                SslMode::Prefer => (Encryption::Prefer(&plan), Some(Encryption::Off)),
                _ => (Encryption::Require(&plan), None),
            };
            match (start(node, deadline, first), fallback) {
                (Err(refused), Some(fallback)) if refused.retry => {
                    match start(node, deadline, fallback) {
                        // "Server does not support TLS" would hide why the
                        // plain attempt failed (say, a wrong password).
                        Err(again) if matches!(again.failure, Failure::Tls(_)) => Err(refused),
                        again => again,
                    }
                }
                (first, _) => first,
            }
        }
    }
    .map_err(|refused| refused.failure)?;
    Ok(Box::new(PgSession { connection }))
}

struct PgSession {
    connection: Connection,
}

impl Session for PgSession {
    fn observe(&mut self, deadline: Instant) -> Result<Observation, Failure> {
        let row = self.connection.query_row(ROLE_QUERY, deadline)?;
        parse_role_row(&row)
    }
}

impl Drop for PgSession {
    fn drop(&mut self) {
        // Without a Terminate the server logs "unexpected EOF on client
        // connection". Best effort: a server that is gone gets nothing.
        let _ = self.connection.terminate(Instant::now() + TERMINATE_WAIT);
    }
}

/// How one start-up attempt uses TLS, after libpq's sslmode.
#[derive(Clone, Copy)]
enum Encryption<'a> {
    Off,
    /// sslmode=allow: plain; TLS only if the server refuses us.
    PlainFirst,
    /// sslmode=prefer: TLS if the server has it; plain if that fails.
    Prefer(&'a ClientTls),
    Require(&'a ClientTls),
}

/// A failed start-up attempt.
struct Refused {
    failure: Failure,
    /// libpq tries once more with the other choice of encryption: after a
    /// failed TLS handshake under `prefer`, and when the server refuses the
    /// login (before authentication completes) under `allow`, or under
    /// `prefer` over TLS (`pg_hba.conf` `hostssl`/`hostnossl` lines).
    retry: bool,
}

impl From<Failure> for Refused {
    fn from(failure: Failure) -> Self {
        Self {
            failure,
            retry: false,
        }
    }
}

fn start(
    node: &Node,
    deadline: Instant,
    encryption: Encryption<'_>,
) -> Result<Connection, Refused> {
    let socket = probe::connect(&node.endpoint, deadline)?;
    #[cfg(target_vendor = "apple")]
    socket.set_nosigpipe(true).map_err(Failure::from)?;
    let mut wire = Wire { socket, deadline };
    let (transport, tls) = match encryption {
        Encryption::Off | Encryption::PlainFirst => (Transport::Plain(wire), false),
        Encryption::Prefer(plan) | Encryption::Require(plan) => {
            let prefer = matches!(encryption, Encryption::Prefer(_));
            let mut request = BytesMut::new();
            frontend::ssl_request(&mut request);
            wire.write_all(&request).map_err(io_failure)?;
            // Exactly one byte: anything after it is the TLS handshake's.
            let mut answer = [0u8; 1];
            wire.read_exact(&mut answer).map_err(io_failure)?;
            match answer[0] {
                b'S' => match handshake(wire, plan) {
                    Ok(stream) => (Transport::Tls(stream), true),
                    Err(failure) => {
                        return Err(Refused {
                            failure,
                            retry: prefer,
                        })
                    }
                },
                b'N' if prefer => (Transport::Plain(wire), false),
                b'N' => return Err(Failure::Tls("server does not support TLS".into()).into()),
                // A postmaster that cannot fork a backend says so in the old
                // protocol's format and hangs up.
                b'E' => {
                    return Err(Failure::ServerError("server refused the connection".into()).into())
                }
                other => {
                    return Err(Failure::BadHandshake(format!(
                        "expected 'S' or 'N' to an SSLRequest, got byte 0x{other:02x}"
                    ))
                    .into())
                }
            }
        }
    };
    let mut connection = Connection {
        transport,
        inbox: BytesMut::with_capacity(4096),
    };
    let retry_refusal = match encryption {
        Encryption::PlainFirst => true,
        Encryption::Prefer(_) => tls,
        Encryption::Off | Encryption::Require(_) => false,
    };
    connection.start_up(&node.login, retry_refusal)?;
    Ok(connection)
}

/// A socket and the deadline of the step under way: every read and write,
/// including those rustls makes, waits at most what is left of it.
struct Wire {
    socket: Socket,
    deadline: Instant,
}

/// socket2 turns a timeout under 1 µs into 0, which means "wait forever".
const MIN_WAIT: Duration = Duration::from_micros(1);

/// Writing to a socket the server has closed must not raise SIGPIPE in the
/// host process (Django runs under servers that do not ignore it).
#[cfg(any(
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd",
    target_os = "netbsd",
    target_os = "openbsd"
))]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(any(
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd",
    target_os = "netbsd",
    target_os = "openbsd"
)))]
const SEND_FLAGS: libc::c_int = 0;

impl Wire {
    fn time_left(&self) -> io::Result<Duration> {
        remaining(self.deadline)
            .map(|left| left.max(MIN_WAIT))
            .map_err(|_| io::ErrorKind::TimedOut.into())
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.socket.set_read_timeout(Some(self.time_left()?))?;
            match self.socket.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                result => return result,
            }
        }
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            self.socket.set_write_timeout(Some(self.time_left()?))?;
            match self.socket.send_with_flags(buf, SEND_FLAGS) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                result => return result,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Transport {
    Plain(Wire),
    Tls(Box<StreamOwned<ClientConnection, Wire>>),
}

impl Transport {
    fn wire(&mut self) -> &mut Wire {
        match self {
            Self::Plain(wire) => wire,
            Self::Tls(stream) => &mut stream.sock,
        }
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(wire) => wire.read(buf),
            Self::Tls(stream) => stream.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(wire) => wire.write(buf),
            Self::Tls(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(wire) => wire.flush(),
            Self::Tls(stream) => stream.flush(),
        }
    }
}

/// rustls reports its own errors (a certificate that does not verify, an
/// alert) inside `io::Error`s.
fn io_failure(e: io::Error) -> Failure {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => Failure::Tls(one_line(&tls.to_string())),
        None => e.into(),
    }
}

fn handshake(
    wire: Wire,
    plan: &ClientTls,
) -> Result<Box<StreamOwned<ClientConnection, Wire>>, Failure> {
    let client = ClientConnection::new(Arc::clone(&plan.config), plan.name.clone())
        .map_err(|e| Failure::Tls(one_line(&e.to_string())))?;
    let mut stream = Box::new(StreamOwned::new(client, wire));
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(io_failure)?;
    }
    Ok(stream)
}

struct Connection {
    transport: Transport,
    /// Received bytes not yet parsed into a message.
    inbox: BytesMut,
}

impl Connection {
    fn send(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        self.transport.write_all(bytes).map_err(io_failure)?;
        self.transport.flush().map_err(io_failure)
    }

    /// The next message and its type byte.
    fn receive(&mut self) -> Result<(u8, Message), Failure> {
        loop {
            if let Some(&[tag, a, b, c, d]) = self.inbox.get(..5) {
                let length = u32::from_be_bytes([a, b, c, d]);
                if usize::try_from(length).map_or(true, |length| length > MAX_MESSAGE) {
                    return Err(Failure::BadHandshake(format!(
                        "message '{}' of {length} bytes",
                        char::from(tag).escape_default()
                    )));
                }
                match Message::parse(&mut self.inbox) {
                    Ok(Some(message)) => return Ok((tag, message)),
                    Ok(None) => {}
                    Err(e) => {
                        return Err(Failure::BadHandshake(format!(
                            "malformed message '{}': {e}",
                            char::from(tag).escape_default()
                        )))
                    }
                }
            }
            let mut chunk = [0u8; 4096];
            match self.transport.read(&mut chunk).map_err(io_failure)? {
                0 => return Err(Failure::Closed),
                n => self.inbox.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Startup, authentication and the server's greeting, up to the first
    /// `ReadyForQuery`. `retry_refusal` marks a refused login as one libpq
    /// would retry.
    fn start_up(&mut self, login: &Login, retry_refusal: bool) -> Result<(), Refused> {
        let mut out = BytesMut::new();
        frontend::startup_message(
            [
                ("user", login.user.as_str()),
                ("database", login.database.as_str()),
                ("application_name", "dbha"),
                // Error messages are then UTF-8 whatever the database's encoding.
                ("client_encoding", "UTF8"),
            ],
            &mut out,
        )
        .map_err(|_| Failure::Auth("user or database name contains a NUL byte".into()))?;
        self.send(&out)?;
        self.authenticate(login).map_err(|refused| Refused {
            retry: refused.retry && retry_refusal,
            ..refused
        })?;
        loop {
            match self.receive()? {
                (_, Message::ReadyForQuery(_)) => return Ok(()),
                // `in_hot_standby` (PostgreSQL 14+) is among the parameters,
                // but only the role query is asked every round.
                (
                    _,
                    Message::ParameterStatus(_)
                    | Message::BackendKeyData(_)
                    | Message::NoticeResponse(_),
                ) => {}
                // For example 3D000 (no such database) or 53300 (too many connections).
                (_, Message::ErrorResponse(body)) => {
                    return Err(startup_failure(body.fields()).into())
                }
                (tag, _) => return Err(unexpected(tag).into()),
            }
        }
    }

    /// Up to `AuthenticationOk`; `Refused::retry` is set for an error
    /// response from the server.
    fn authenticate(&mut self, login: &Login) -> Result<(), Refused> {
        let refusal = |fields: ErrorFields<'_>| Refused {
            failure: startup_failure(fields),
            retry: true,
        };
        let mut out = BytesMut::new();
        loop {
            out.clear();
            match self.receive()? {
                (_, Message::AuthenticationOk) => return Ok(()),
                (_, Message::AuthenticationCleartextPassword) => {
                    frontend::password_message(password(login)?.as_bytes(), &mut out)
                        .map_err(|_| nul_in_password())?;
                    self.send(&out)?;
                }
                (_, Message::AuthenticationMd5Password(body)) => {
                    let hash = md5_hash(
                        login.user.as_bytes(),
                        password(login)?.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut out)
                        .map_err(|_| nul_in_password())?;
                    self.send(&out)?;
                }
                (_, Message::AuthenticationSasl(body)) => {
                    let mut mechanisms = body.mechanisms();
                    let mut scram = false;
                    while let Some(mechanism) = mechanisms
                        .next()
                        .map_err(|e| malformed("SASL mechanisms", &e))?
                    {
                        scram |= mechanism == SCRAM_SHA_256;
                    }
                    if !scram {
                        return Err(Failure::Auth(
                            "server offers no SASL mechanism but SCRAM-SHA-256-PLUS".into(),
                        )
                        .into());
                    }
                    self.scram(login, &refusal)?;
                }
                (_, Message::ErrorResponse(body)) => return Err(refusal(body.fields())),
                (_, Message::NoticeResponse(_)) => {}
                (
                    _,
                    Message::AuthenticationGss
                    | Message::AuthenticationGssContinue(_)
                    | Message::AuthenticationSspi
                    | Message::AuthenticationKerberosV5
                    | Message::AuthenticationScmCredential,
                ) => {
                    return Err(Failure::Auth(
                        "server asks for GSSAPI/SSPI/Kerberos, which dbha does not do".into(),
                    )
                    .into())
                }
                (tag, _) => return Err(unexpected(tag).into()),
            }
        }
    }

    /// SCRAM-SHA-256 without channel binding ("n": the client does not
    /// support it), which servers accept over TLS as well.
    fn scram(
        &mut self,
        login: &Login,
        refusal: &dyn Fn(ErrorFields<'_>) -> Refused,
    ) -> Result<(), Refused> {
        let mut scram =
            ScramSha256::new(password(login)?.as_bytes(), ChannelBinding::unsupported());
        let mut out = BytesMut::new();
        frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), &mut out)
            .map_err(|e| malformed("SCRAM", &e))?;
        self.send(&out)?;
        match self.receive()? {
            (_, Message::AuthenticationSaslContinue(body)) => {
                scram
                    .update(body.data())
                    .map_err(|e| Failure::Auth(format!("SCRAM: {e}")))?;
            }
            (_, Message::ErrorResponse(body)) => return Err(refusal(body.fields())),
            (tag, _) => return Err(unexpected(tag).into()),
        }
        out.clear();
        frontend::sasl_response(scram.message(), &mut out).map_err(|e| malformed("SCRAM", &e))?;
        self.send(&out)?;
        match self.receive()? {
            // Proves the server knows the password too.
            (_, Message::AuthenticationSaslFinal(body)) => scram
                .finish(body.data())
                .map_err(|e| Failure::Auth(format!("SCRAM: server not verified: {e}")).into()),
            // A wrong password is refused here.
            (_, Message::ErrorResponse(body)) => Err(refusal(body.fields())),
            (tag, _) => Err(unexpected(tag).into()),
        }
    }

    /// Runs `sql` (simple protocol) and returns its first row as text.
    fn query_row(&mut self, sql: &str, deadline: Instant) -> Result<Vec<Option<String>>, Failure> {
        self.transport.wire().deadline = deadline;
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(|e| malformed("query", &e))?;
        self.send(&out)?;
        let mut row = None;
        loop {
            match self.receive()? {
                (_, Message::DataRow(body)) => {
                    if row.is_none() {
                        row = Some(text_values(&body)?);
                    }
                }
                (
                    _,
                    Message::RowDescription(_)
                    | Message::CommandComplete(_)
                    | Message::EmptyQueryResponse
                    // Asynchronous: may come at any time.
                    | Message::NoticeResponse(_)
                    | Message::ParameterStatus(_)
                    | Message::NotificationResponse(_),
                ) => {}
                // A FATAL one (57P01, admin shutdown) is followed by the
                // server hanging up: report it now, the caller drops us.
                (_, Message::ErrorResponse(body)) => return Err(server_error(body.fields())),
                (_, Message::ReadyForQuery(_)) => {
                    return row.ok_or_else(|| Failure::BadHandshake("the query returned no row".into()))
                }
                (tag, _) => return Err(unexpected(tag)),
            }
        }
    }

    fn terminate(&mut self, deadline: Instant) -> Result<(), Failure> {
        self.transport.wire().deadline = deadline;
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        self.send(&out)?;
        if let Transport::Tls(stream) = &mut self.transport {
            stream.conn.send_close_notify();
            stream.flush().map_err(io_failure)?;
        }
        Ok(())
    }
}

fn password(login: &Login) -> Result<&str, Failure> {
    login
        .password
        .as_ref()
        .map(Secret::expose)
        .ok_or_else(|| Failure::Auth("password required but none configured".into()))
}

fn nul_in_password() -> Failure {
    Failure::Auth("password contains a NUL byte".into())
}

fn malformed(what: &str, e: &dyn fmt::Display) -> Failure {
    Failure::BadHandshake(format!("{what}: {e}"))
}

fn unexpected(tag: u8) -> Failure {
    Failure::BadHandshake(format!(
        "unexpected message '{}'",
        char::from(tag).escape_default()
    ))
}

/// SQLSTATE and message of an `ErrorResponse`.
fn error_parts(mut fields: ErrorFields<'_>) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    while let Ok(Some(field)) = fields.next() {
        match field.type_() {
            b'C' => code = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            b'M' => message = one_line(&String::from_utf8_lossy(field.value_bytes())),
            _ => {}
        }
    }
    (code, message)
}

/// Refusals that only a change of credentials or settings cures are `Auth`,
/// which the caller backs off from instead of retrying every round.
fn startup_failure(fields: ErrorFields<'_>) -> Failure {
    let (code, message) = error_parts(fields);
    if is_auth_code(&code) {
        Failure::Auth(message)
    } else {
        Failure::ServerError(format!("{code} {message}"))
    }
}

/// Class 28 is "invalid authorization specification" (28P01 wrong
/// password, 28000 no `pg_hba.conf` entry); 3D000 is an unknown database.
fn is_auth_code(code: &str) -> bool {
    code.starts_with("28") || code == "3D000"
}

fn server_error(fields: ErrorFields<'_>) -> Failure {
    let (code, message) = error_parts(fields);
    Failure::ServerError(format!("{code} {message}"))
}

/// `text` on one line, at most `MAX_QUOTE` characters.
fn one_line(text: &str) -> String {
    let mut line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some((cut, _)) = line.char_indices().nth(MAX_QUOTE) {
        line.truncate(cut);
        line.push('…');
    }
    line
}

fn text_values(row: &DataRowBody) -> Result<Vec<Option<String>>, Failure> {
    let buffer = row.buffer();
    row.ranges()
        .map(|range| {
            Ok(range
                .and_then(|range| buffer.get(range))
                .map(|bytes| String::from_utf8_lossy(bytes).into_owned()))
        })
        .collect()
        .map_err(|e| malformed("data row", &e))
}

/// The role query's row: `[in recovery, lag seconds, timeline]`.
fn parse_role_row(row: &[Option<String>]) -> Result<Observation, Failure> {
    let bad = |what: &str| Failure::BadHandshake(format!("role query returned {what}: {row:?}"));
    let [standby, lag, timeline] = row else {
        return Err(bad("the wrong number of columns"));
    };
    let role = match standby.as_deref() {
        Some("f") => Role::Primary,
        Some("t") => Role::Standby,
        _ => return Err(bad("no boolean for pg_is_in_recovery()")),
    };
    let lag = match lag.as_deref() {
        None => None,
        Some(text) => {
            let seconds = text
                .parse::<f64>()
                .ok()
                .filter(|seconds| !seconds.is_nan())
                .ok_or_else(|| bad("a lag that is not a number"))?;
            // Clocks of primary and standby may disagree by a little.
            Some(
                Duration::try_from_secs_f64(seconds.max(0.0))
                    .map_err(|_| bad("an impossible lag"))?,
            )
        }
    };
    let timeline = match timeline.as_deref() {
        None => None,
        Some(text) => Some(
            text.parse::<u32>()
                .map_err(|_| bad("a timeline that is not a number"))?,
        ),
    };
    Ok(Observation {
        role: Some(role),
        lag,
        timeline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Engine, ProbeKind, Tls};
    use std::net::{TcpListener, TcpStream};
    use std::sync::mpsc;
    use std::thread;

    fn node(port: u16, mode: SslMode, password: Option<&str>) -> Node {
        Node {
            alias: "db".into(),
            group: 0,
            engine: Engine::PostgreSql,
            endpoint: Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
            probe: ProbeKind::Role,
            login: Login {
                user: "u".into(),
                password: password.map(Secret::new),
                database: "postgres".into(),
            },
            tls: Tls {
                mode,
                root_cert: None,
            },
        }
    }

    fn soon(millis: u64) -> Instant {
        Instant::now() + Duration::from_millis(millis)
    }

    fn row(values: &[Option<&str>]) -> Vec<Option<String>> {
        values.iter().map(|v| v.map(str::to_owned)).collect()
    }

    #[test]
    fn role_rows() {
        let primary = parse_role_row(&row(&[Some("f"), Some("0"), Some("3")])).unwrap();
        assert_eq!(
            primary,
            Observation {
                role: Some(Role::Primary),
                lag: Some(Duration::ZERO),
                timeline: Some(3),
            }
        );
        let standby = parse_role_row(&row(&[Some("t"), Some("2.500000"), None])).unwrap();
        assert_eq!(standby.role, Some(Role::Standby));
        assert_eq!(standby.lag, Some(Duration::from_millis(2500)));
        assert_eq!(standby.timeline, None);
        // Nothing replayed yet: unknown; clock skew: clamped.
        assert_eq!(
            parse_role_row(&row(&[Some("t"), None, None])).unwrap().lag,
            None
        );
        assert_eq!(
            parse_role_row(&row(&[Some("t"), Some("-0.004"), None]))
                .unwrap()
                .lag,
            Some(Duration::ZERO)
        );
        // Timelines go up to 2^32 - 1.
        assert_eq!(
            parse_role_row(&row(&[Some("f"), Some("0"), Some("4294967295")]))
                .unwrap()
                .timeline,
            Some(u32::MAX)
        );
        for bad in [
            row(&[Some("x"), Some("0"), None]),
            row(&[None, Some("0"), None]),
            row(&[Some("t"), Some("soon"), None]),
            row(&[Some("t"), Some("NaN"), None]),
            row(&[Some("f"), Some("0"), Some("-1")]),
            row(&[Some("f"), Some("0")]),
        ] {
            assert!(
                matches!(parse_role_row(&bad), Err(Failure::BadHandshake(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn one_line_quotes() {
        assert_eq!(one_line("a\n  b\tc "), "a b c");
        let long = "é".repeat(MAX_QUOTE + 10);
        assert_eq!(one_line(&long).chars().count(), MAX_QUOTE + 1);
    }

    #[test]
    fn auth_codes() {
        assert!(is_auth_code("28P01"));
        assert!(is_auth_code("28000"));
        assert!(is_auth_code("3D000"));
        assert!(!is_auth_code("57P03"));
        assert!(!is_auth_code("53300"));
        assert!(!is_auth_code(""));
    }

    #[test]
    fn verify_modes_need_a_root_cert() {
        for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
            let failure = connect(&node(1, mode, None), soon(500)).err().unwrap();
            assert_eq!(
                failure,
                Failure::Tls(
                    "verifying the server certificate needs a CA file (sslrootcert)".into()
                )
            );
        }
        let mut missing = node(1, SslMode::Require, None);
        missing.tls.root_cert = Some("/nonexistent/root.crt".into());
        let failure = connect(&missing, soon(500)).err().unwrap();
        assert!(
            matches!(&failure, Failure::Tls(e) if e.starts_with("cannot read sslrootcert /nonexistent/root.crt")),
            "{failure:?}"
        );
        let junk = std::env::temp_dir().join(format!("dbha-junk-{}.pem", std::process::id()));
        std::fs::write(&junk, "not a certificate\n").unwrap();
        missing.tls.root_cert = Some(junk.clone());
        let failure = connect(&missing, soon(500)).err().unwrap();
        std::fs::remove_file(&junk).unwrap();
        assert!(matches!(failure, Failure::Tls(_)), "{failure:?}");
    }

    // --- a scripted server speaking the wire protocol ----------------------

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn auth(code: u32, extra: &[u8]) -> Vec<u8> {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(extra);
        message(b'R', &body)
    }

    fn error(code: &str, text: &str) -> Vec<u8> {
        let body = format!("SFATAL\0C{code}\0M{text}\0\0");
        message(b'E', body.as_bytes())
    }

    fn ready() -> Vec<u8> {
        message(b'Z', b"I")
    }

    fn data_row(values: &[Option<&str>]) -> Vec<u8> {
        let mut body = u16::try_from(values.len()).unwrap().to_be_bytes().to_vec();
        for value in values {
            match value {
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    body.extend_from_slice(&u32::try_from(v.len()).unwrap().to_be_bytes());
                    body.extend_from_slice(v.as_bytes());
                }
            }
        }
        message(b'D', &body)
    }

    /// The startup packet: length-prefixed, no type byte.
    fn read_startup(stream: &mut TcpStream) -> Vec<u8> {
        let mut length = [0u8; 4];
        stream.read_exact(&mut length).unwrap();
        let mut body = vec![0u8; usize::try_from(u32::from_be_bytes(length)).unwrap() - 4];
        stream.read_exact(&mut body).unwrap();
        body
    }

    fn read_message(stream: &mut TcpStream) -> (u8, Vec<u8>) {
        let mut header = [0u8; 5];
        stream.read_exact(&mut header).unwrap();
        let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let mut body = vec![0u8; usize::try_from(length).unwrap() - 4];
        stream.read_exact(&mut body).unwrap();
        (header[0], body)
    }

    /// Serves one connection with `script`; what it received comes back on
    /// the channel once the client has left.
    fn serve(
        script: impl FnOnce(&mut TcpStream) + Send + 'static,
    ) -> (u16, mpsc::Receiver<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (sender, receiver) = mpsc::channel();
        thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            script(&mut stream);
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest);
            let _ = sender.send(rest);
        });
        (port, receiver)
    }

    fn greet(stream: &mut TcpStream) {
        let startup = read_startup(stream);
        let text = String::from_utf8_lossy(&startup);
        assert!(text.contains("user\0u\0database\0postgres\0application_name\0dbha\0"));
        let mut reply = auth(0, b"");
        reply.extend(message(b'S', b"in_hot_standby\0off\0"));
        reply.extend(message(b'K', &[0, 0, 0, 7, 0, 0, 0, 9]));
        reply.extend(ready());
        stream.write_all(&reply).unwrap();
    }

    #[test]
    fn one_connection_answers_every_round_and_says_goodbye() {
        let (port, received) = serve(|stream| {
            greet(stream);
            for answer in [
                [Some("f"), Some("0"), Some("2")],
                [Some("t"), Some("1.25"), None],
            ] {
                let (tag, sql) = read_message(stream);
                assert_eq!(
                    (tag, sql.as_slice()),
                    (b'Q', format!("{ROLE_QUERY}\0").as_bytes())
                );
                let mut reply = message(b'T', &[0, 0]);
                // Asynchronous messages may come in between.
                reply.extend(message(b'N', b"SWARNING\0C01000\0Mhello\0\0"));
                reply.extend(message(b'S', b"TimeZone\0UTC\0"));
                reply.extend(data_row(&answer));
                reply.extend(message(b'C', b"SELECT 1\0"));
                reply.extend(ready());
                stream.write_all(&reply).unwrap();
            }
        });
        let mut session = connect(&node(port, SslMode::Disable, None), soon(2000)).unwrap();
        let first = session.observe(soon(2000)).unwrap();
        assert_eq!((first.role, first.timeline), (Some(Role::Primary), Some(2)));
        let second = session.observe(soon(2000)).unwrap();
        assert_eq!(second.role, Some(Role::Standby));
        assert_eq!(second.lag, Some(Duration::from_millis(1250)));
        drop(session);
        assert_eq!(received.recv().unwrap(), message(b'X', b""));
    }

    #[test]
    fn passwords_cleartext_and_md5() {
        let (port, _) = serve(|stream| {
            read_startup(stream);
            stream.write_all(&auth(3, b"")).unwrap();
            assert_eq!(read_message(stream), (b'p', b"hunter2\0".to_vec()));
            stream.write_all(&auth(0, b"")).unwrap();
            stream.write_all(&ready()).unwrap();
        });
        assert!(connect(&node(port, SslMode::Disable, Some("hunter2")), soon(2000)).is_ok());

        let (port, _) = serve(|stream| {
            read_startup(stream);
            stream.write_all(&auth(5, &[1, 2, 3, 4])).unwrap();
            let expected = md5_hash(b"u", b"hunter2", [1, 2, 3, 4]);
            assert_eq!(
                read_message(stream),
                (b'p', format!("{expected}\0").into_bytes())
            );
            stream
                .write_all(&error(
                    "28P01",
                    "password authentication failed for user \"u\"",
                ))
                .unwrap();
        });
        let failure = connect(&node(port, SslMode::Disable, Some("hunter2")), soon(2000))
            .err()
            .unwrap();
        assert_eq!(
            failure,
            Failure::Auth("password authentication failed for user \"u\"".into())
        );
        assert!(!format!("{failure} {failure:?}").contains("hunter2"));
    }

    #[test]
    fn password_asked_but_none_configured() {
        let (port, _) = serve(|stream| {
            read_startup(stream);
            stream.write_all(&auth(10, b"SCRAM-SHA-256\0\0")).unwrap();
        });
        let failure = connect(&node(port, SslMode::Disable, None), soon(2000))
            .err()
            .unwrap();
        assert_eq!(
            failure,
            Failure::Auth("password required but none configured".into())
        );
    }

    #[test]
    fn startup_errors() {
        for (code, expected) in [
            ("3D000", Failure::Auth("nope".into())),
            ("28000", Failure::Auth("nope".into())),
            ("57P03", Failure::ServerError("57P03 nope".into())),
            ("53300", Failure::ServerError("53300 nope".into())),
        ] {
            let (port, _) = serve(move |stream| {
                read_startup(stream);
                let mut reply = auth(0, b"");
                reply.extend(error(code, "nope"));
                stream.write_all(&reply).unwrap();
            });
            let failure = connect(&node(port, SslMode::Disable, None), soon(2000)).err();
            assert_eq!(failure, Some(expected));
        }
    }

    #[test]
    fn query_errors_closes_and_garbage() {
        let (port, _) = serve(|stream| {
            greet(stream);
            read_message(stream);
            stream
                .write_all(&error(
                    "57P01",
                    "terminating connection due to administrator command",
                ))
                .unwrap();
        });
        let mut session = connect(&node(port, SslMode::Disable, None), soon(2000)).unwrap();
        assert_eq!(
            session.observe(soon(2000)),
            Err(Failure::ServerError(
                "57P01 terminating connection due to administrator command".into()
            ))
        );

        let (port, _) = serve(|stream| {
            greet(stream);
            read_message(stream);
            stream.shutdown(std::net::Shutdown::Both).unwrap();
        });
        let mut session = connect(&node(port, SslMode::Disable, None), soon(2000)).unwrap();
        assert_eq!(session.observe(soon(2000)), Err(Failure::Closed));

        let (port, _) = serve(|stream| {
            read_startup(stream);
            stream
                .write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                .unwrap();
        });
        let failure = connect(&node(port, SslMode::Disable, None), soon(2000))
            .err()
            .unwrap();
        assert!(matches!(failure, Failure::BadHandshake(_)), "{failure:?}");
    }

    #[test]
    fn silent_server_times_out_at_the_deadline() {
        // Accepts (the kernel does that) and never answers, like a SIGSTOPped postmaster.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        for mode in [SslMode::Disable, SslMode::Prefer] {
            let began = Instant::now();
            let failure = connect(&node(port, mode, None), soon(300)).err();
            assert_eq!(failure, Some(Failure::Timeout));
            let took = began.elapsed();
            assert!(
                took >= Duration::from_millis(290) && took < Duration::from_millis(600),
                "{took:?}"
            );
        }

        // Logged in, then hung mid-session.
        let (port, _) = serve(|stream| {
            greet(stream);
            read_message(stream);
            thread::sleep(Duration::from_secs(2));
        });
        let mut session = connect(&node(port, SslMode::Disable, None), soon(2000)).unwrap();
        let began = Instant::now();
        assert_eq!(session.observe(soon(300)), Err(Failure::Timeout));
        assert!(began.elapsed() < Duration::from_millis(600));
    }

    #[test]
    fn sslrequest_answers() {
        let refusing = |answer: &'static [u8]| {
            serve(move |stream| {
                let mut request = [0u8; 8];
                stream.read_exact(&mut request).unwrap();
                assert_eq!(request, [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
                stream.write_all(answer).unwrap();
            })
            .0
        };
        let port = refusing(b"N");
        assert_eq!(
            connect(&node(port, SslMode::Require, None), soon(2000)).err(),
            Some(Failure::Tls("server does not support TLS".into()))
        );
        let port = refusing(b"X");
        assert!(matches!(
            connect(&node(port, SslMode::Require, None), soon(2000)).err(),
            Some(Failure::BadHandshake(_))
        ));

        // prefer: 'N' means carry on in plain text on the same connection.
        let (port, _) = serve(|stream| {
            let mut request = [0u8; 8];
            stream.read_exact(&mut request).unwrap();
            stream.write_all(b"N").unwrap();
            greet(stream);
        });
        assert!(connect(&node(port, SslMode::Prefer, None), soon(2000)).is_ok());
    }

    #[test]
    fn oversized_message_is_refused() {
        let (port, _) = serve(|stream| {
            read_startup(stream);
            stream.write_all(&[b'R', 0x7f, 0xff, 0xff, 0xff]).unwrap();
        });
        let failure = connect(&node(port, SslMode::Disable, None), soon(2000))
            .err()
            .unwrap();
        assert!(matches!(failure, Failure::BadHandshake(_)), "{failure:?}");
    }
}
