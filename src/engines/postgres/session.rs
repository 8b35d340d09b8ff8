//! A PostgreSQL connection: TLS negotiation after libpq's `sslmode`, start-up
//! and authentication (trust, password, md5, SCRAM-SHA-256), and simple
//! queries, all bounded by one deadline per step.

use std::time::Instant;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::SCRAM_SHA_256;
use postgres_protocol::message::backend::{DataRowBody, ErrorFields, Message};
use postgres_protocol::message::frontend;

use super::scram::Scram;
use crate::engines::{Login, Server};
use crate::net::tls::{self, ClientTls};
use crate::net::{self, one_line, Endpoint, Failure, SslMode, Transport, Wire};

/// No answer to our queries comes near this; a bigger length means we are
/// not talking to PostgreSQL (or the stream is out of step).
const MAX_MESSAGE: usize = 1 << 20;

/// PostgreSQL's SSLRequest: length 8, code 1234.5679.
pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Connects and logs in to the login's database, negotiating TLS as libpq
/// does for the server's `sslmode`; to its fallback database if the server
/// refuses the first one (missing, or not for this user), as Django's own
/// `_nodb_cursor` falls back from `postgres` to the application's database.
pub fn log_in(server: &Server, deadline: Instant) -> Result<Connection, Failure> {
    match log_in_to(server, deadline) {
        Err(refused) if refused.about_database => match &server.login.fallback_database {
            Some(fallback) => {
                let mut second = server.clone();
                second.login.database.clone_from(fallback);
                second.login.fallback_database = None;
                log_in_to(&second, deadline).map_err(|refused| refused.failure)
            }
            None => Err(refused.failure),
        },
        result => result.map_err(|refused| refused.failure),
    }
}

fn log_in_to(server: &Server, deadline: Instant) -> Result<Connection, Refused> {
    match (&server.endpoint, server.tls.mode) {
        // PostgreSQL has no TLS over unix sockets; libpq ignores sslmode there.
        (Endpoint::Unix(_), _) | (_, SslMode::Disable) => start(server, deadline, Encryption::Off),
        (Endpoint::Tcp { host, .. }, mode) => {
            let plan = tls::client(&server.tls, host, "sslrootcert")?;
            let (first, fallback) = match mode {
                SslMode::Allow => (Encryption::PlainFirst, Some(Encryption::Require(&plan))),
                SslMode::Prefer => (Encryption::Prefer(&plan), Some(Encryption::Off)),
                _ => (Encryption::Require(&plan), None),
            };
            match (start(server, deadline, first), fallback) {
                (Err(refused), Some(fallback)) if refused.retry => {
                    match start(server, deadline, fallback) {
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
    /// The server refused the database, not the user: it does not exist,
    /// the user may not connect to it, or `pg_hba.conf` has no line for it.
    about_database: bool,
}

impl From<Failure> for Refused {
    fn from(failure: Failure) -> Self {
        Self {
            failure,
            retry: false,
            about_database: false,
        }
    }
}

impl Refused {
    /// The server's refusal, an `ErrorResponse` during start-up.
    fn by_server(fields: ErrorFields<'_>, retry: bool) -> Self {
        let (code, message) = error_parts(fields);
        Self {
            about_database: matches!(code.as_str(), "3D000" | "42501" | "28000"),
            failure: startup_failure_of(&code, message),
            retry,
        }
    }
}

fn start(
    server: &Server,
    deadline: Instant,
    encryption: Encryption<'_>,
) -> Result<Connection, Refused> {
    let mut wire = net::connect(&server.endpoint, deadline)?;
    let transport = match encryption {
        Encryption::Off | Encryption::PlainFirst => Transport::Plain(wire),
        Encryption::Prefer(plan) | Encryption::Require(plan) => {
            let prefer = matches!(encryption, Encryption::Prefer(_));
            wire.send(&SSL_REQUEST)?;
            // Exactly one byte: anything after it is the TLS handshake's.
            let mut answer = [0u8; 1];
            wire.receive_exact(&mut answer)?;
            match answer[0] {
                b'S' => Transport::start_tls(wire, plan).map_err(|failure| Refused {
                    failure,
                    retry: prefer,
                    about_database: false,
                })?,
                b'N' if prefer => Transport::Plain(wire),
                b'N' => return Err(Failure::Tls("server does not support TLS".into()).into()),
                other => return Err(ssl_request_answer(other).into()),
            }
        }
    };
    let retry_refusal = match encryption {
        Encryption::PlainFirst => true,
        Encryption::Prefer(_) => transport.is_tls(),
        Encryption::Off | Encryption::Require(_) => false,
    };
    let mut connection = Connection::new(transport);
    connection.start_up(&server.login, retry_refusal)?;
    Ok(connection)
}

/// What a server's answer to an SSLRequest other than `S`/`N` means.
pub fn ssl_request_answer(byte: u8) -> Failure {
    match byte {
        // A postmaster that cannot fork a backend says so in the old
        // protocol's format and hangs up.
        b'E' => Failure::ServerError("server refused the connection".into()),
        other => Failure::BadHandshake(format!(
            "expected 'S' or 'N' to an SSLRequest, got byte 0x{other:02x}"
        )),
    }
}

/// The start-up packet dbha sends: who, where, and UTF-8 error messages
/// whatever the database's encoding.
pub fn startup_message(login: &Login) -> Result<BytesMut, Failure> {
    let mut out = BytesMut::new();
    frontend::startup_message(
        [
            ("user", login.user.as_str()),
            ("database", login.database.as_str()),
            ("application_name", "dbha"),
            ("client_encoding", "UTF8"),
        ],
        &mut out,
    )
    .map_err(|_| Failure::Auth("user or database name contains a NUL byte".into()))?;
    Ok(out)
}

pub struct Connection {
    transport: Transport,
    /// Received bytes not yet parsed into a message.
    inbox: BytesMut,
}

impl Connection {
    pub fn new(transport: Transport) -> Self {
        Self {
            transport,
            inbox: BytesMut::with_capacity(4096),
        }
    }

    pub fn plain(wire: Wire) -> Self {
        Self::new(Transport::Plain(wire))
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    pub fn set_deadline(&mut self, deadline: Instant) {
        self.transport.set_deadline(deadline);
    }

    pub fn send(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        self.transport.send(bytes)
    }

    /// A whole message already received, if any.
    fn parsed(&mut self) -> Result<Option<(u8, Message)>, Failure> {
        let Some(&[tag, a, b, c, d]) = self.inbox.get(..5) else {
            return Ok(None);
        };
        let length = u32::from_be_bytes([a, b, c, d]);
        if usize::try_from(length).map_or(true, |length| length > MAX_MESSAGE) {
            return Err(Failure::BadHandshake(format!(
                "message '{}' of {length} bytes",
                char::from(tag).escape_default()
            )));
        }
        Message::parse(&mut self.inbox)
            .map(|message| message.map(|m| (tag, m)))
            .map_err(|e| {
                Failure::BadHandshake(format!(
                    "malformed message '{}': {}",
                    char::from(tag).escape_default(),
                    one_line(&e.to_string())
                ))
            })
    }

    /// Reads once from the socket into the inbox.
    fn fill(&mut self) -> Result<(), Failure> {
        let mut chunk = [0u8; 4096];
        let n = self.transport.receive(&mut chunk)?;
        self.inbox.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// The next message and its type byte.
    pub fn receive(&mut self) -> Result<(u8, Message), Failure> {
        loop {
            if let Some(message) = self.parsed()? {
                return Ok(message);
            }
            self.fill()?;
        }
    }

    /// Takes in what arrived while the session was idle. The server speaks
    /// unasked only to notify (notices, parameter changes) or to end the
    /// session (a FATAL error, then it hangs up): the latter fails.
    pub fn take_unsolicited(&mut self) -> Result<(), Failure> {
        // What came in with the last answer first: a FATAL error read along
        // with it must not be hidden behind the hang-up that follows.
        self.take_parsed()?;
        match self.fill() {
            // Only a TLS record with nothing for us (a session ticket) came.
            Err(Failure::Timeout) => return Ok(()),
            result => result?,
        }
        self.take_parsed()
    }

    /// Takes in the unsolicited messages already received whole.
    fn take_parsed(&mut self) -> Result<(), Failure> {
        while let Some((tag, message)) = self.parsed()? {
            match message {
                Message::NoticeResponse(_)
                | Message::ParameterStatus(_)
                | Message::NotificationResponse(_) => {}
                Message::ErrorResponse(body) => return Err(server_error(body.fields())),
                _ => return Err(unexpected(tag)),
            }
        }
        Ok(())
    }

    /// Startup, authentication and the server's greeting, up to the first
    /// `ReadyForQuery`. `retry_refusal` marks a refused login as one libpq
    /// would retry.
    fn start_up(&mut self, login: &Login, retry_refusal: bool) -> Result<(), Refused> {
        let out = startup_message(login)?;
        self.send(&out)?;
        self.authenticate(login).map_err(|refused| Refused {
            retry: refused.retry && retry_refusal,
            ..refused
        })?;
        loop {
            match self.receive()? {
                (_, Message::ReadyForQuery(_)) => return Ok(()),
                (
                    _,
                    Message::ParameterStatus(_)
                    | Message::BackendKeyData(_)
                    | Message::NoticeResponse(_),
                ) => {}
                // For example 3D000 (no such database) or 53300 (too many connections).
                (_, Message::ErrorResponse(body)) => {
                    return Err(Refused::by_server(body.fields(), false))
                }
                (tag, _) => return Err(unexpected(tag).into()),
            }
        }
    }

    /// Up to `AuthenticationOk`; `Refused::retry` is set for an error
    /// response from the server.
    fn authenticate(&mut self, login: &Login) -> Result<(), Refused> {
        let refusal = |fields: ErrorFields<'_>| Refused::by_server(fields, true);
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
        let (mut scram, first) = Scram::start(password(login)?)?;
        let mut out = BytesMut::new();
        frontend::sasl_initial_response(SCRAM_SHA_256, &first, &mut out)
            .map_err(|e| malformed("SCRAM", &e))?;
        self.send(&out)?;
        let answer = match self.receive()? {
            (_, Message::AuthenticationSaslContinue(body)) => {
                // The key derivation may take a while: the deadline bounds it.
                scram.respond(body.data(), self.transport.deadline())?
            }
            (_, Message::ErrorResponse(body)) => return Err(refusal(body.fields())),
            (tag, _) => return Err(unexpected(tag).into()),
        };
        out.clear();
        frontend::sasl_response(&answer, &mut out).map_err(|e| malformed("SCRAM", &e))?;
        self.send(&out)?;
        match self.receive()? {
            // Proves the server knows the password too.
            (_, Message::AuthenticationSaslFinal(body)) => Ok(scram.finish(body.data())?),
            // A wrong password is refused here.
            (_, Message::ErrorResponse(body)) => Err(refusal(body.fields())),
            (tag, _) => Err(unexpected(tag).into()),
        }
    }

    /// Runs `sql` (simple protocol) and returns its first row as text.
    pub fn query_row(
        &mut self,
        sql: &str,
        deadline: Instant,
    ) -> Result<Vec<Option<String>>, Failure> {
        self.set_deadline(deadline);
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

    /// Says goodbye (best effort, by `deadline`): without a Terminate the
    /// server logs "unexpected EOF on client connection".
    pub fn terminate(&mut self, deadline: Instant) {
        self.set_deadline(deadline);
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        if self.send(&out).is_ok() {
            self.transport.close_notify(deadline);
        }
    }
}

fn password(login: &Login) -> Result<&str, Failure> {
    login
        .password
        .as_ref()
        .map(crate::engines::Secret::expose)
        .ok_or_else(|| Failure::Auth("password required but none configured".into()))
}

fn nul_in_password() -> Failure {
    Failure::Auth("password contains a NUL byte".into())
}

fn malformed(what: &str, e: &dyn std::fmt::Display) -> Failure {
    Failure::BadHandshake(format!("{what}: {}", one_line(&e.to_string())))
}

pub fn unexpected(tag: u8) -> Failure {
    Failure::BadHandshake(format!(
        "unexpected message '{}'",
        char::from(tag).escape_default()
    ))
}

/// SQLSTATE and message of an `ErrorResponse`, each on one bounded line.
fn error_parts(mut fields: ErrorFields<'_>) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    while let Ok(Some(field)) = fields.next() {
        match field.type_() {
            // A SQLSTATE has five characters: a longer one must not crowd
            // out the message.
            b'C' => {
                code = one_line(&String::from_utf8_lossy(field.value_bytes()))
                    .chars()
                    .take(5)
                    .collect();
            }
            b'M' => message = one_line(&String::from_utf8_lossy(field.value_bytes())),
            _ => {}
        }
    }
    (code, message)
}

/// Refusals that only a change of credentials or settings cures are `Auth`,
/// which the caller backs off from instead of retrying every round.
pub fn startup_failure(fields: ErrorFields<'_>) -> Failure {
    let (code, message) = error_parts(fields);
    startup_failure_of(&code, message)
}

fn startup_failure_of(code: &str, message: String) -> Failure {
    if is_auth_code(code) {
        Failure::Auth(message)
    } else {
        Failure::ServerError(format!("{code} {message}"))
    }
}

/// Class 28 is "invalid authorization specification" (28P01 wrong
/// password, 28000 no `pg_hba.conf` entry); 3D000 is an unknown database.
pub fn is_auth_code(code: &str) -> bool {
    code.starts_with("28") || code == "3D000"
}

fn server_error(fields: ErrorFields<'_>) -> Failure {
    let (code, message) = error_parts(fields);
    Failure::ServerError(format!("{code} {message}"))
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
