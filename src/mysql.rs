//! The MySQL/MariaDB `role` probe: logs in once (TLS optional), then asks `read_only` and the
//! replica lag over that same connection every round.
//! Packets are built here: `mysql_common` would add serde, regex and more to every LTO build.

use std::fmt;
use std::io::{self, Read, Write};
use std::iter;
use std::time::{Duration, Instant};

use rsa::pkcs8::DecodePublicKey;
use rsa::{Oaep, RsaPublicKey};
use rustls::ClientConnection;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::SubjectPublicKeyInfoDer;
use sha1::{Digest, Sha1};
use sha2::Sha256;
use socket2::Socket;

use crate::config::{Endpoint, Login, Node, SslMode};
use crate::probe::{self, remaining, Failure, Observation, Role, Session};
use crate::tls::{self, ClientTls};

const CLIENT_LONG_PASSWORD: u32 = 1;
const CLIENT_CONNECT_WITH_DB: u32 = 1 << 3;
const CLIENT_PROTOCOL_41: u32 = 1 << 9;
const CLIENT_SSL: u32 = 1 << 11;
const CLIENT_TRANSACTIONS: u32 = 1 << 13;
const CLIENT_SECURE_CONNECTION: u32 = 1 << 15;
const CLIENT_PLUGIN_AUTH: u32 = 1 << 19;

/// A payload of this length continues in the next packet.
const MAX_PACKET: usize = 0xff_ffff;
/// Our replies are a few hundred bytes; anything far bigger is garbage.
const MAX_REPLY: usize = 1 << 20;
const MAX_COLUMNS: usize = 4096;
/// Understood by every MySQL and MariaDB version we can talk to.
const UTF8MB4_GENERAL_CI: u8 = 45;

const COM_QUIT: u8 = 0x01;
const COM_QUERY: u8 = 0x03;

const NATIVE_PASSWORD: &str = "mysql_native_password";
const CACHING_SHA2_PASSWORD: &str = "caching_sha2_password";

/// Works on MySQL and MariaDB (which has no `super_read_only`) and needs no privilege.
const ROLE_SQL: &str =
    "SHOW GLOBAL VARIABLES WHERE Variable_name IN ('read_only', 'super_read_only')";

const ER_PARSE_ERROR: u16 = 1064;
/// Refusals that are about the server (too many connections, host blocked, shutting down,
/// per-user limits), not about our credentials: no authentication back-off for these.
const NOT_CREDENTIALS: [u16; 6] = [1040, 1041, 1053, 1129, 1203, 1226];
/// Missing privilege for the replica status query.
const NO_PRIVILEGE: [u16; 3] = [1044, 1142, 1227];

/// How long the goodbye may take when a session is dropped.
const QUIT_TIMEOUT: Duration = Duration::from_millis(50);
/// socket2 turns a sub-microsecond timeout into "block forever".
const MIN_TIMEOUT: Duration = Duration::from_millis(1);

pub fn connect(node: &Node, deadline: Instant) -> Result<Box<dyn Session>, Failure> {
    Ok(Box::new(MySqlSession::open(node, deadline)?))
}

struct MySqlSession {
    conn: Conn,
    lag_query: LagQuery,
    alias: String,
}

/// Which statement reads the replica status on this server, learned once per session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LagQuery {
    /// MariaDB ≥ 10.5, MySQL ≥ 8.0.22.
    Replica,
    Slave,
    /// The probe user may not read it: lag stays unknown, and we stop asking.
    Forbidden,
}

impl MySqlSession {
    fn open(node: &Node, deadline: Instant) -> Result<Self, Failure> {
        let tls = tls_plan(node)?;
        let mut conn = Conn::new(probe::connect(&node.endpoint, deadline)?);
        let greeting = parse_greeting(&conn.read_packet(deadline)?)?;
        let required = CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION;
        if greeting.capabilities & required != required {
            return Err(Failure::BadHandshake(format!(
                "server {} predates protocol 4.1 authentication",
                greeting.version
            )));
        }
        let mut capabilities = required
            | greeting.capabilities
                & (CLIENT_LONG_PASSWORD | CLIENT_TRANSACTIONS | CLIENT_PLUGIN_AUTH);
        if !node.login.database.is_empty() {
            capabilities |= CLIENT_CONNECT_WITH_DB;
        }
        let mut encrypted = false;
        if let Some(tls) = tls {
            if greeting.capabilities & CLIENT_SSL != 0 {
                capabilities |= CLIENT_SSL;
                conn.write_packet(&ssl_request(capabilities), deadline)?;
                conn.start_tls(&tls, deadline)?;
                encrypted = true;
            } else if tls.required {
                return Err(Failure::Tls("the server does not offer TLS".into()));
            }
        }
        // The server accepts a cleartext password over TLS or a unix socket.
        let secure = encrypted || matches!(node.endpoint, Endpoint::Unix(_));
        authenticate(
            &mut conn,
            &greeting,
            capabilities,
            &node.login,
            secure,
            deadline,
        )?;
        Ok(Self {
            conn,
            lag_query: LagQuery::Replica,
            alias: node.alias.clone(),
        })
    }

    fn replica_lag(&mut self, deadline: Instant) -> Result<Option<Duration>, Failure> {
        loop {
            let sql = match self.lag_query {
                LagQuery::Replica => "SHOW REPLICA STATUS",
                LagQuery::Slave => "SHOW SLAVE STATUS",
                LagQuery::Forbidden => return Ok(None),
            };
            match self.conn.query(sql, deadline)? {
                Ok(status) => return Ok(lag_from(&status)),
                Err(e) if e.code == ER_PARSE_ERROR && self.lag_query == LagQuery::Replica => {
                    self.lag_query = LagQuery::Slave;
                }
                Err(e) if NO_PRIVILEGE.contains(&e.code) => {
                    log::info!("{}: replica lag unknown: {}", self.alias, e.message);
                    self.lag_query = LagQuery::Forbidden;
                    return Ok(None);
                }
                // Lag is extra information: its absence must not fail the probe.
                Err(_) => return Ok(None),
            }
        }
    }
}

impl Session for MySqlSession {
    fn observe(&mut self, deadline: Instant) -> Result<Observation, Failure> {
        let variables = self
            .conn
            .query(ROLE_SQL, deadline)?
            .map_err(|e| Failure::ServerError(e.to_string()))?;
        let role = role_from(&variables)?;
        // Only a standby's lag matters to routing; a primary gets one query per round.
        let lag = match role {
            Role::Standby => self.replica_lag(deadline)?,
            Role::Primary => None,
        };
        Ok(Observation {
            role: Some(role),
            lag,
            timeline: None,
        })
    }
}

impl Drop for MySqlSession {
    fn drop(&mut self) {
        // Best effort: spares the server log an "aborted connection" line.
        let deadline = Instant::now() + QUIT_TIMEOUT;
        self.conn.seq = 0;
        let _ = self.conn.write_packet(&[COM_QUIT], deadline);
        if let Some(tls) = &mut self.conn.tls {
            tls.send_close_notify();
            let _ = send_tls(&mut self.conn.socket, tls, deadline);
        }
    }
}

fn role_from(variables: &ResultSet) -> Result<Role, Failure> {
    let mut seen = false;
    let mut read_only = false;
    for row in &variables.rows {
        if let [Some(name), value] = row.as_slice() {
            let name = name.to_ascii_lowercase();
            if name == "read_only" || name == "super_read_only" {
                seen |= name == "read_only";
                // Newer MariaDB has values beyond ON/OFF (NO_LOCK...): all of them are read-only.
                read_only |= value
                    .as_deref()
                    .is_some_and(|v| !v.eq_ignore_ascii_case("OFF") && v != "0");
            }
        }
    }
    if !seen {
        return Err(Failure::BadHandshake(
            "the server did not report read_only".into(),
        ));
    }
    Ok(if read_only {
        Role::Standby
    } else {
        Role::Primary
    })
}

/// The largest lag over the replication channels; unknown if any channel's is (SQL thread
/// stopped) or if the server replicates from no one.
fn lag_from(status: &ResultSet) -> Option<Duration> {
    let column = status
        .columns
        .iter()
        .position(|c| c == "Seconds_Behind_Source" || c == "Seconds_Behind_Master")?;
    let mut lag = None;
    for row in &status.rows {
        let seconds: u64 = row.get(column)?.as_deref()?.trim().parse().ok()?;
        lag = lag.max(Some(Duration::from_secs(seconds)));
    }
    lag
}

// --- login -------------------------------------------------------------------------------------

#[derive(Debug, PartialEq, Eq)]
struct Greeting {
    version: String,
    capabilities: u32,
    scramble: Vec<u8>,
    plugin: String,
}

/// Parses the protocol 10 greeting, or the error packet a refusing server sends instead.
fn parse_greeting(payload: &[u8]) -> Result<Greeting, Failure> {
    let body = match payload.split_first() {
        Some((0x0a, body)) => body,
        Some((0xff, _)) => {
            return Err(Failure::ServerError(
                ServerError::parse(payload)?.to_string(),
            ))
        }
        Some((other, _)) => {
            return Err(Failure::BadHandshake(format!(
                "expected a MySQL greeting, got first byte 0x{other:02x}"
            )))
        }
        None => return Err(Failure::BadHandshake("empty greeting".into())),
    };
    let mut c = Cursor(body);
    let version = String::from_utf8_lossy(c.nul_terminated()?).into_owned();
    c.take(4)?; // connection id
    let mut scramble = c.take(8)?.to_vec();
    c.take(1)?;
    let mut capabilities = u32::from(c.u16()?);
    let mut plugin = String::new();
    if !c.0.is_empty() {
        c.take(3)?; // character set, status
        capabilities |= u32::from(c.u16()?) << 16;
        let data_len = usize::from(c.u8()?);
        c.take(10)?;
        if capabilities & CLIENT_SECURE_CONNECTION != 0 {
            // At least 13 bytes, the last a NUL that is not part of the scramble.
            let part = c.take(data_len.saturating_sub(8).max(13).min(c.0.len()))?;
            scramble.extend_from_slice(part.strip_suffix(&[0]).unwrap_or(part));
        }
        if capabilities & CLIENT_PLUGIN_AUTH != 0 {
            plugin = String::from_utf8_lossy(c.nul_terminated_or_rest()).into_owned();
        }
    }
    Ok(Greeting {
        version,
        capabilities,
        scramble,
        plugin,
    })
}

/// The fixed head of both the SSL request and the handshake response.
fn ssl_request(capabilities: u32) -> Vec<u8> {
    let mut packet = Vec::with_capacity(128);
    packet.extend_from_slice(&capabilities.to_le_bytes());
    packet.extend_from_slice(&(1u32 << 24).to_le_bytes()); // max packet size
    packet.push(UTF8MB4_GENERAL_CI);
    packet.extend_from_slice(&[0; 23]);
    packet
}

/// `HandshakeResponse41`.
fn handshake_response(
    capabilities: u32,
    login: &Login,
    auth: &[u8],
    plugin: &str,
) -> Result<Vec<u8>, Failure> {
    let mut packet = ssl_request(capabilities);
    packet.extend_from_slice(login.user.as_bytes());
    packet.push(0);
    let auth_len = u8::try_from(auth.len())
        .map_err(|_| Failure::Internal("authentication response too long".into()))?;
    packet.push(auth_len);
    packet.extend_from_slice(auth);
    if capabilities & CLIENT_CONNECT_WITH_DB != 0 {
        packet.extend_from_slice(login.database.as_bytes());
        packet.push(0);
    }
    if capabilities & CLIENT_PLUGIN_AUTH != 0 {
        packet.extend_from_slice(plugin.as_bytes());
        packet.push(0);
    }
    Ok(packet)
}

fn authenticate(
    conn: &mut Conn,
    greeting: &Greeting,
    capabilities: u32,
    login: &Login,
    secure: bool,
    deadline: Instant,
) -> Result<(), Failure> {
    let password = login
        .password
        .as_ref()
        .map_or(&b""[..], |p| p.expose().as_bytes());
    // An unknown default plugin: answer as the classic one and let the server switch us.
    let mut plugin = match greeting.plugin.as_str() {
        CACHING_SHA2_PASSWORD => CACHING_SHA2_PASSWORD.to_owned(),
        _ => NATIVE_PASSWORD.to_owned(),
    };
    let mut scramble = greeting.scramble.clone();
    let auth = auth_response(&plugin, password, &scramble)?;
    conn.write_packet(
        &handshake_response(capabilities, login, &auth, &plugin)?,
        deadline,
    )?;
    // OK, error, or a few rounds of plugin switches and extra data; never more.
    for _ in 0..6 {
        let reply = conn.read_packet(deadline)?;
        match reply.split_first() {
            Some((0x00, _)) => return Ok(()),
            Some((0xff, _)) => return Err(login_refused(&ServerError::parse(&reply)?)),
            Some((0xfe, [])) => {
                return Err(Failure::Auth(
                    "the server wants the pre-4.1 password hash, which is not supported".into(),
                ))
            }
            Some((0xfe, rest)) => {
                let mut c = Cursor(rest);
                plugin = String::from_utf8_lossy(c.nul_terminated_or_rest()).into_owned();
                scramble = c.0.strip_suffix(&[0]).unwrap_or(c.0).to_vec();
                conn.write_packet(&auth_response(&plugin, password, &scramble)?, deadline)?;
            }
            Some((0x01, more)) if plugin == CACHING_SHA2_PASSWORD => match more.first() {
                // Fast authentication succeeded (the server had our hash cached); OK follows.
                Some(0x03) => {}
                // Full authentication: the server needs the password itself.
                Some(0x04) => {
                    let answer = if secure {
                        password.iter().copied().chain(iter::once(0)).collect()
                    } else {
                        conn.write_packet(&[0x02], deadline)?;
                        let key = conn.read_packet(deadline)?;
                        match key.split_first() {
                            Some((0x01, pem)) => encrypt_password(password, &scramble, pem)?,
                            Some((0xff, _)) => {
                                return Err(login_refused(&ServerError::parse(&key)?))
                            }
                            _ => {
                                return Err(Failure::BadHandshake(
                                    "expected the server's public key".into(),
                                ))
                            }
                        }
                    };
                    conn.write_packet(&answer, deadline)?;
                }
                _ => return Err(Failure::BadHandshake("unexpected caching_sha2 data".into())),
            },
            Some((first, _)) => {
                return Err(Failure::BadHandshake(format!(
                    "unexpected packet 0x{first:02x} during login"
                )))
            }
            None => return Err(Failure::BadHandshake("empty packet during login".into())),
        }
    }
    Err(Failure::BadHandshake("login did not finish".into()))
}

fn login_refused(e: &ServerError) -> Failure {
    if NOT_CREDENTIALS.contains(&e.code) {
        Failure::ServerError(e.to_string())
    } else {
        Failure::Auth(e.message.clone())
    }
}

fn auth_response(plugin: &str, password: &[u8], scramble: &[u8]) -> Result<Vec<u8>, Failure> {
    match plugin {
        NATIVE_PASSWORD => Ok(native_password(password, scramble)),
        CACHING_SHA2_PASSWORD => Ok(caching_sha2_password(password, scramble)),
        other => Err(Failure::Auth(format!(
            "unsupported authentication plugin {other}"
        ))),
    }
}

/// SHA1(password) XOR SHA1(scramble + SHA1(SHA1(password))); nothing for no password.
fn native_password(password: &[u8], scramble: &[u8]) -> Vec<u8> {
    if password.is_empty() {
        return Vec::new();
    }
    let hash = Sha1::digest(password);
    let mix = Sha1::new()
        .chain_update(scramble)
        .chain_update(Sha1::digest(hash))
        .finalize();
    hash.iter().zip(mix.iter()).map(|(a, b)| a ^ b).collect()
}

/// SHA256(password) XOR SHA256(SHA256(SHA256(password)) + scramble).
fn caching_sha2_password(password: &[u8], scramble: &[u8]) -> Vec<u8> {
    if password.is_empty() {
        return Vec::new();
    }
    let hash = Sha256::digest(password);
    let mix = Sha256::new()
        .chain_update(Sha256::digest(hash))
        .chain_update(scramble)
        .finalize();
    hash.iter().zip(mix.iter()).map(|(a, b)| a ^ b).collect()
}

/// Full `caching_sha2_password` authentication without TLS: the NUL-terminated password XOR the
/// scramble, RSA-OAEP (SHA-1, as OpenSSL's default) encrypted for the server's key.
fn encrypt_password(password: &[u8], scramble: &[u8], pem: &[u8]) -> Result<Vec<u8>, Failure> {
    if scramble.is_empty() {
        return Err(Failure::BadHandshake("empty scramble".into()));
    }
    let key = SubjectPublicKeyInfoDer::from_pem_slice(pem)
        .ok()
        .and_then(|der| RsaPublicKey::from_public_key_der(der.as_ref()).ok())
        .ok_or_else(|| Failure::BadHandshake("the server's public key is not RSA PEM".into()))?;
    let message: Vec<u8> = password
        .iter()
        .chain(iter::once(&0))
        .zip(scramble.iter().cycle())
        .map(|(p, s)| p ^ s)
        .collect();
    key.encrypt(&mut rsa::rand_core::OsRng, Oaep::new::<Sha1>(), &message)
        .map_err(|e| Failure::Auth(format!("cannot encrypt the password for the server: {e}")))
}

// --- TLS ---------------------------------------------------------------------------------------

struct TlsPlan {
    client: ClientTls,
    /// False for prefer/allow: plain text if the server offers no TLS.
    required: bool,
}

/// What TLS the node's `ssl_mode` asks for; `None` for none. Unix sockets never use TLS.
fn tls_plan(node: &Node) -> Result<Option<TlsPlan>, Failure> {
    let host = match &node.endpoint {
        Endpoint::Tcp { host, .. } if node.tls.mode != SslMode::Disable => host,
        _ => return Ok(None),
    };
    Ok(Some(TlsPlan {
        client: tls::client(&node.tls, host, "OPTIONS[\"ssl\"][\"ca\"]")?,
        required: !matches!(node.tls.mode, SslMode::Allow | SslMode::Prefer),
    }))
}

fn tls_failure(e: &rustls::Error) -> Failure {
    Failure::Tls(e.to_string())
}

// --- wire --------------------------------------------------------------------------------------

/// The connection: socket, optional TLS on it, buffered input and the packet sequence number.
struct Conn {
    socket: Socket,
    tls: Option<Box<ClientConnection>>,
    input: Vec<u8>,
    consumed: usize,
    seq: u8,
}

impl Conn {
    fn new(socket: Socket) -> Self {
        Self {
            socket,
            tls: None,
            input: Vec::with_capacity(4096),
            consumed: 0,
            seq: 0,
        }
    }

    fn start_tls(&mut self, plan: &TlsPlan, deadline: Instant) -> Result<(), Failure> {
        // Plaintext that arrived before the handshake would otherwise pass as protected.
        if self.consumed < self.input.len() {
            return Err(Failure::BadHandshake(
                "data before the TLS handshake".into(),
            ));
        }
        let mut tls = ClientConnection::new(plan.client.config.clone(), plan.client.name.clone())
            .map_err(|e| tls_failure(&e))?;
        while tls.is_handshaking() {
            if tls.wants_write() {
                send_tls(&mut self.socket, &mut tls, deadline)?;
            } else if tls.wants_read() {
                receive_tls(&mut self.socket, &mut tls, deadline)?;
            } else {
                return Err(Failure::Tls("handshake stalled".into()));
            }
        }
        send_tls(&mut self.socket, &mut tls, deadline)?;
        self.tls = Some(Box::new(tls));
        Ok(())
    }

    /// Reads one logical packet, joining the continuation packets of a long payload.
    fn read_packet(&mut self, deadline: Instant) -> Result<Vec<u8>, Failure> {
        let mut payload = Vec::new();
        loop {
            let mut header = [0u8; 4];
            self.read_exact(&mut header, deadline)?;
            let len =
                usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
            self.seq = header[3].wrapping_add(1);
            if payload.len() + len > MAX_REPLY {
                return Err(Failure::BadHandshake(format!(
                    "reply of over {MAX_REPLY} bytes"
                )));
            }
            let start = payload.len();
            payload.resize(start + len, 0);
            self.read_exact(&mut payload[start..], deadline)?;
            if len < MAX_PACKET {
                return Ok(payload);
            }
        }
    }

    fn write_packet(&mut self, payload: &[u8], deadline: Instant) -> Result<(), Failure> {
        if payload.len() >= MAX_PACKET {
            return Err(Failure::Internal("packet too large".into()));
        }
        let mut packet = Vec::with_capacity(4 + payload.len());
        packet.extend_from_slice(&payload.len().to_le_bytes()[..3]);
        packet.push(self.seq);
        packet.extend_from_slice(payload);
        self.seq = self.seq.wrapping_add(1);
        self.write_all(&packet, deadline)
    }

    /// Runs a text-protocol query; the inner error is the server's refusal, after which the
    /// connection is still usable.
    fn query(
        &mut self,
        sql: &str,
        deadline: Instant,
    ) -> Result<Result<ResultSet, ServerError>, Failure> {
        self.seq = 0;
        let mut command = Vec::with_capacity(1 + sql.len());
        command.push(COM_QUERY);
        command.extend_from_slice(sql.as_bytes());
        self.write_packet(&command, deadline)?;
        let first = self.read_packet(deadline)?;
        match first.first() {
            Some(0xff) => return Ok(Err(ServerError::parse(&first)?)),
            Some(0x00) => return Ok(Ok(ResultSet::default())),
            _ => {}
        }
        let count = Cursor(&first)
            .lenenc()?
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| (1..=MAX_COLUMNS).contains(n))
            .ok_or_else(|| Failure::BadHandshake("bad column count".into()))?;
        let mut columns = Vec::with_capacity(count);
        for _ in 0..count {
            columns.push(column_name(&self.read_packet(deadline)?)?);
        }
        // Without CLIENT_DEPRECATE_EOF an EOF packet ends the column definitions and the rows.
        let eof = self.read_packet(deadline)?;
        if !is_eof(&eof) {
            return Err(Failure::BadHandshake(
                "expected EOF after the columns".into(),
            ));
        }
        let mut rows = Vec::new();
        loop {
            let packet = self.read_packet(deadline)?;
            if is_eof(&packet) {
                return Ok(Ok(ResultSet { columns, rows }));
            }
            if packet.first() == Some(&0xff) {
                return Ok(Err(ServerError::parse(&packet)?));
            }
            rows.push(parse_row(&packet, count)?);
        }
    }

    fn read_exact(&mut self, buf: &mut [u8], deadline: Instant) -> Result<(), Failure> {
        while self.input.len() - self.consumed < buf.len() {
            self.fill(deadline)?;
        }
        let end = self.consumed + buf.len();
        buf.copy_from_slice(&self.input[self.consumed..end]);
        self.consumed = end;
        Ok(())
    }

    /// Reads whatever has arrived (a whole result set, usually) in one go.
    fn fill(&mut self, deadline: Instant) -> Result<(), Failure> {
        self.input.drain(..self.consumed);
        self.consumed = 0;
        let mut chunk = [0u8; 4096];
        let n = match &mut self.tls {
            None => read_plain(&mut self.socket, &mut chunk, deadline)?,
            Some(tls) => read_tls(&mut self.socket, tls, &mut chunk, deadline)?,
        };
        self.input.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    fn write_all(&mut self, bytes: &[u8], deadline: Instant) -> Result<(), Failure> {
        if let Some(tls) = &mut self.tls {
            tls.writer().write_all(bytes)?;
            return send_tls(&mut self.socket, tls, deadline);
        }
        let mut rest = bytes;
        while !rest.is_empty() {
            self.socket.set_write_timeout(Some(timeout(deadline)?))?;
            match self.socket.write(rest) {
                Ok(0) => return Err(Failure::Closed),
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// What is left of the deadline, as a socket timeout.
fn timeout(deadline: Instant) -> Result<Duration, Failure> {
    Ok(remaining(deadline)?.max(MIN_TIMEOUT))
}

fn read_plain(socket: &mut Socket, buf: &mut [u8], deadline: Instant) -> Result<usize, Failure> {
    loop {
        socket.set_read_timeout(Some(timeout(deadline)?))?;
        match socket.read(buf) {
            Ok(0) => return Err(Failure::Closed),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn read_tls(
    socket: &mut Socket,
    tls: &mut ClientConnection,
    buf: &mut [u8],
    deadline: Instant,
) -> Result<usize, Failure> {
    loop {
        match tls.reader().read(buf) {
            Ok(0) => return Err(Failure::Closed),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                receive_tls(socket, tls, deadline)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// One socket read into the TLS layer, and whatever it answers (alerts, handshake messages).
fn receive_tls(
    socket: &mut Socket,
    tls: &mut ClientConnection,
    deadline: Instant,
) -> Result<(), Failure> {
    let n = loop {
        socket.set_read_timeout(Some(timeout(deadline)?))?;
        match tls.read_tls(socket) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    };
    if let Err(e) = tls.process_new_packets() {
        // Tell the server why we hang up (the alert is queued), then fail.
        let _ = send_tls(socket, tls, deadline);
        return Err(tls_failure(&e));
    }
    if n == 0 {
        return Err(Failure::Closed);
    }
    send_tls(socket, tls, deadline)
}

fn send_tls(
    socket: &mut Socket,
    tls: &mut ClientConnection,
    deadline: Instant,
) -> Result<(), Failure> {
    while tls.wants_write() {
        socket.set_write_timeout(Some(timeout(deadline)?))?;
        match tls.write_tls(socket) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

// --- packets -----------------------------------------------------------------------------------

/// A text-protocol result set: column names and rows of nullable values.
#[derive(Debug, Default, PartialEq, Eq)]
struct ResultSet {
    columns: Vec<String>,
    rows: Vec<Vec<Option<String>>>,
}

/// An error packet: the server refused what we asked.
#[derive(Debug, PartialEq, Eq)]
struct ServerError {
    code: u16,
    message: String,
}

impl ServerError {
    fn parse(payload: &[u8]) -> Result<Self, Failure> {
        let mut c = Cursor(payload);
        c.take(1)?;
        let code = c.u16()?;
        // Protocol 4.1 adds '#' and a five-character SQLSTATE (not in a greeting's place).
        if c.0.first() == Some(&b'#') && c.0.len() >= 6 {
            c.take(6)?;
        }
        Ok(Self {
            code,
            message: String::from_utf8_lossy(c.0).trim().to_owned(),
        })
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.message)
    }
}

fn is_eof(packet: &[u8]) -> bool {
    packet.first() == Some(&0xfe) && packet.len() < 9
}

/// The `name` of a column definition (after catalog, schema, table, original table).
fn column_name(packet: &[u8]) -> Result<String, Failure> {
    let mut c = Cursor(packet);
    for _ in 0..4 {
        c.lenenc_bytes()?;
    }
    let name = c.lenenc_bytes()?.unwrap_or_default();
    Ok(String::from_utf8_lossy(name).into_owned())
}

fn parse_row(packet: &[u8], columns: usize) -> Result<Vec<Option<String>>, Failure> {
    let mut c = Cursor(packet);
    (0..columns)
        .map(|_| {
            Ok(c.lenenc_bytes()?
                .map(|v| String::from_utf8_lossy(v).into_owned()))
        })
        .collect()
}

/// Reads a packet front to back; running short is a protocol error, never a panic.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Failure> {
        if self.0.len() < n {
            return Err(Failure::BadHandshake("truncated packet".into()));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, Failure> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Failure> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    /// A length-encoded integer; `None` is SQL NULL (0xfb).
    fn lenenc(&mut self) -> Result<Option<u64>, Failure> {
        let width = match self.u8()? {
            0xfb => return Ok(None),
            0xfc => 2,
            0xfd => 3,
            0xfe => 8,
            0xff => return Err(Failure::BadHandshake("bad length prefix".into())),
            small => return Ok(Some(u64::from(small))),
        };
        let mut bytes = [0u8; 8];
        bytes[..width].copy_from_slice(self.take(width)?);
        Ok(Some(u64::from_le_bytes(bytes)))
    }

    fn lenenc_bytes(&mut self) -> Result<Option<&'a [u8]>, Failure> {
        match self.lenenc()? {
            None => Ok(None),
            Some(n) => {
                let n = usize::try_from(n)
                    .map_err(|_| Failure::BadHandshake("truncated packet".into()))?;
                self.take(n).map(Some)
            }
        }
    }

    fn nul_terminated(&mut self) -> Result<&'a [u8], Failure> {
        let end = self
            .0
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| Failure::BadHandshake("truncated greeting".into()))?;
        let text = self.take(end)?;
        self.take(1)?;
        Ok(text)
    }

    /// Some servers omit the NUL after the last string of a packet.
    fn nul_terminated_or_rest(&mut self) -> &'a [u8] {
        let end = self.0.iter().position(|&b| b == 0);
        let text = &self.0[..end.unwrap_or(self.0.len())];
        self.0 = &self.0[end.map_or(self.0.len(), |e| e + 1)..];
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Engine, ProbeKind, Secret, Tls};
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};
    use std::thread;

    const SCRAMBLE: &[u8; 20] = b"0123456789ABCDEFGHIJ";
    const PASSWORD: &str = "hunter2";
    const SHORT: Duration = Duration::from_millis(300);

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    fn node(endpoint: Endpoint, user: &str, password: Option<&str>) -> Node {
        Node {
            alias: "db".into(),
            group: 0,
            engine: Engine::MySql,
            endpoint,
            probe: ProbeKind::Role,
            login: Login {
                user: user.into(),
                password: password.map(Secret::new),
                database: String::new(),
            },
            tls: Tls {
                mode: SslMode::Disable,
                root_cert: None,
            },
        }
    }

    fn tcp(port: u16) -> Endpoint {
        Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port,
        }
    }

    #[test]
    fn scrambles_match_vectors_computed_with_hashlib() {
        // hashlib: sha1(pw) ^ sha1(scramble + sha1(sha1(pw)))
        assert_eq!(
            hex(&native_password(PASSWORD.as_bytes(), SCRAMBLE)),
            "b826249d33e812e1da31d49a8c91ac9d9babaf85"
        );
        // hashlib: sha256(pw) ^ sha256(sha256(sha256(pw)) + scramble)
        assert_eq!(
            hex(&caching_sha2_password(PASSWORD.as_bytes(), SCRAMBLE)),
            "3ef40d77f15305fab3112656b261cba82ef8bebb2ab08b621236fd978af3f2db"
        );
        assert!(native_password(b"", SCRAMBLE).is_empty());
        assert!(caching_sha2_password(b"", SCRAMBLE).is_empty());
        assert!(matches!(
            auth_response("client_ed25519", b"x", SCRAMBLE),
            Err(Failure::Auth(_))
        ));
    }

    #[test]
    fn greetings_of_mariadb_and_mysql() {
        let mariadb = greeting_payload("5.5.5-10.11.6-MariaDB", SERVER_CAPS, NATIVE_PASSWORD);
        assert_eq!(
            parse_greeting(&mariadb).unwrap(),
            Greeting {
                version: "5.5.5-10.11.6-MariaDB".into(),
                capabilities: SERVER_CAPS,
                scramble: SCRAMBLE.to_vec(),
                plugin: NATIVE_PASSWORD.into(),
            }
        );
        // MySQL 8 may end the packet without the plugin name's NUL.
        let mut mysql = greeting_payload("8.0.36", SERVER_CAPS | CLIENT_SSL, CACHING_SHA2_PASSWORD);
        mysql.pop();
        let greeting = parse_greeting(&mysql).unwrap();
        assert_eq!(greeting.plugin, CACHING_SHA2_PASSWORD);
        assert_eq!(greeting.capabilities & CLIENT_SSL, CLIENT_SSL);
        // A 4.0-era greeting ends after the capability flags.
        let old = greeting_payload("4.0.1", CLIENT_LONG_PASSWORD, "");
        let greeting = parse_greeting(&old[..1 + 6 + 4 + 8 + 1 + 2]).unwrap();
        assert_eq!(greeting.scramble, &SCRAMBLE[..8]);
        assert_eq!(greeting.plugin, "");

        assert_eq!(
            parse_greeting(b"\xff\x10\x04Too many connections"),
            Err(Failure::ServerError("1040 Too many connections".into()))
        );
        assert_eq!(
            parse_greeting(b"\xff\x69\x04#HY000Host 'x' is blocked"),
            Err(Failure::ServerError("1129 Host 'x' is blocked".into()))
        );
        for garbage in [
            &b""[..],
            b"\x0a5.7",
            b"\x0a5.7\x00\x01",
            b"HTTP/1.1",
            b"\xff\x01",
        ] {
            assert!(
                matches!(parse_greeting(garbage), Err(Failure::BadHandshake(_))),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn handshake_response_layout() {
        let mut login = node(tcp(1), "app", Some(PASSWORD)).login;
        login.database = "shop".into();
        let caps = CLIENT_PROTOCOL_41
            | CLIENT_SECURE_CONNECTION
            | CLIENT_PLUGIN_AUTH
            | CLIENT_CONNECT_WITH_DB;
        let packet = handshake_response(caps, &login, b"\x01\x02", NATIVE_PASSWORD).unwrap();
        let mut expected = caps.to_le_bytes().to_vec();
        expected.extend_from_slice(&[0, 0, 0, 1, 45]);
        expected.extend_from_slice(&[0; 23]);
        expected.extend_from_slice(b"app\0\x02\x01\x02shop\0mysql_native_password\0");
        assert_eq!(packet, expected);
        assert_eq!(ssl_request(caps), expected[..32]);

        let packet = handshake_response(CLIENT_PROTOCOL_41, &login, b"", "x").unwrap();
        assert_eq!(&packet[32..], b"app\0\0");
    }

    #[test]
    fn packet_pieces() {
        let mut c = Cursor(b"\x05\xfb\xfc\x10\x01\xfd\x01\x02\x03\xfe\x01\0\0\0\0\0\0\x80");
        assert_eq!(c.lenenc().unwrap(), Some(5));
        assert_eq!(c.lenenc().unwrap(), None);
        assert_eq!(c.lenenc().unwrap(), Some(0x110));
        assert_eq!(c.lenenc().unwrap(), Some(0x03_0201));
        assert_eq!(c.lenenc().unwrap(), Some(0x8000_0000_0000_0001));
        assert!(c.lenenc().is_err());
        assert!(Cursor(b"\xff").lenenc().is_err());
        assert!(Cursor(b"\x05ab").lenenc_bytes().is_err());

        assert_eq!(
            ServerError::parse(b"\xff\x15\x04#28000Access denied").unwrap(),
            ServerError {
                code: 1045,
                message: "Access denied".into()
            }
        );
        assert!(ServerError::parse(b"\xff\x15\x04").is_ok());
        assert!(ServerError::parse(b"\xff\x15").is_err());
        assert!(ServerError::parse(b"\xff").is_err());

        assert_eq!(column_name(&column_definition("Value")).unwrap(), "Value");
        assert!(column_name(b"\x03def").is_err());
        assert_eq!(
            parse_row(b"\x02ON\xfb\x00", 3).unwrap(),
            [Some("ON".to_owned()), None, Some(String::new())]
        );
        assert!(parse_row(b"\x02ON", 2).is_err());
        assert!(is_eof(&eof()));
        assert!(!is_eof(&ok()));
        assert!(!is_eof(&[0xfe; 9]));
    }

    fn variables(pairs: &[(&str, &str)]) -> ResultSet {
        ResultSet {
            columns: vec!["Variable_name".into(), "Value".into()],
            rows: pairs
                .iter()
                .map(|(n, v)| vec![Some((*n).to_owned()), Some((*v).to_owned())])
                .collect(),
        }
    }

    #[test]
    fn role_from_read_only_and_super_read_only() {
        let role = |pairs: &[(&str, &str)]| role_from(&variables(pairs));
        assert_eq!(role(&[("read_only", "OFF")]), Ok(Role::Primary));
        assert_eq!(role(&[("read_only", "ON")]), Ok(Role::Standby));
        assert_eq!(role(&[("read_only", "NO_LOCK")]), Ok(Role::Standby));
        assert_eq!(
            role(&[("read_only", "OFF"), ("super_read_only", "OFF")]),
            Ok(Role::Primary)
        );
        assert_eq!(
            role(&[("super_read_only", "ON"), ("read_only", "OFF")]),
            Ok(Role::Standby)
        );
        assert!(matches!(role(&[]), Err(Failure::BadHandshake(_))));
    }

    #[test]
    fn lag_from_replica_status() {
        let status = |column: &str, values: &[Option<&str>]| ResultSet {
            columns: vec!["Replica_IO_State".into(), column.into()],
            rows: values
                .iter()
                .map(|v| vec![Some(String::new()), v.map(str::to_owned)])
                .collect(),
        };
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(
            lag_from(&status("Seconds_Behind_Source", &[Some("0")])),
            secs(0)
        );
        assert_eq!(
            lag_from(&status("Seconds_Behind_Master", &[Some("12")])),
            secs(12)
        );
        assert_eq!(
            lag_from(&status("Seconds_Behind_Source", &[Some("3"), Some("9")])),
            secs(9)
        );
        assert_eq!(lag_from(&status("Seconds_Behind_Master", &[None])), None);
        assert_eq!(
            lag_from(&status("Seconds_Behind_Master", &[Some("1"), None])),
            None
        );
        assert_eq!(lag_from(&status("Seconds_Behind_Master", &[])), None);
        assert_eq!(lag_from(&ResultSet::default()), None);
    }

    // --- a scripted server -----------------------------------------------------------------

    const SERVER_CAPS: u32 = CLIENT_LONG_PASSWORD
        | CLIENT_CONNECT_WITH_DB
        | CLIENT_PROTOCOL_41
        | CLIENT_TRANSACTIONS
        | CLIENT_SECURE_CONNECTION
        | CLIENT_PLUGIN_AUTH;

    fn greeting_payload(version: &str, caps: u32, plugin: &str) -> Vec<u8> {
        let mut p = vec![0x0a];
        p.extend_from_slice(version.as_bytes());
        p.push(0);
        p.extend_from_slice(&7u32.to_le_bytes());
        p.extend_from_slice(&SCRAMBLE[..8]);
        p.push(0);
        p.extend_from_slice(&caps.to_le_bytes()[..2]);
        p.extend_from_slice(&[45, 2, 0]);
        p.extend_from_slice(&caps.to_le_bytes()[2..]);
        p.push(21);
        p.extend_from_slice(&[0; 10]);
        p.extend_from_slice(&SCRAMBLE[8..]);
        p.push(0);
        p.extend_from_slice(plugin.as_bytes());
        p.push(0);
        p
    }

    fn ok() -> Vec<u8> {
        vec![0, 0, 0, 2, 0, 0, 0]
    }

    fn eof() -> Vec<u8> {
        vec![0xfe, 0, 0, 2, 0]
    }

    fn error(code: u16, message: &str) -> Vec<u8> {
        let mut p = vec![0xff];
        p.extend_from_slice(&code.to_le_bytes());
        p.extend_from_slice(b"#HY000");
        p.extend_from_slice(message.as_bytes());
        p
    }

    fn lenenc_str(out: &mut Vec<u8>, s: &str) {
        out.push(u8::try_from(s.len()).unwrap());
        out.extend_from_slice(s.as_bytes());
    }

    fn column_definition(name: &str) -> Vec<u8> {
        let mut p = Vec::new();
        for part in ["def", "", "", "", name, name] {
            lenenc_str(&mut p, part);
        }
        p.extend_from_slice(&[0x0c, 45, 0, 0, 1, 0, 0, 253, 0, 0, 0, 0, 0]);
        p
    }

    fn result_set(columns: &[&str], rows: &[&[Option<&str>]]) -> Vec<Vec<u8>> {
        let mut packets = vec![vec![u8::try_from(columns.len()).unwrap()]];
        packets.extend(columns.iter().map(|c| column_definition(c)));
        packets.push(eof());
        for row in rows {
            let mut p = Vec::new();
            for value in *row {
                match value {
                    Some(v) => lenenc_str(&mut p, v),
                    None => p.push(0xfb),
                }
            }
            packets.push(p);
        }
        packets.push(eof());
        packets
    }

    fn send(stream: &mut TcpStream, seq: u8, payload: &[u8]) {
        let mut packet = payload.len().to_le_bytes()[..3].to_vec();
        packet.push(seq);
        packet.extend_from_slice(payload);
        stream.write_all(&packet).unwrap();
    }

    fn receive(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
        let mut header = [0u8; 4];
        stream.read_exact(&mut header).ok()?;
        let len = usize::from(header[0]) | usize::from(header[1]) << 8;
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).ok()?;
        Some((header[3], payload))
    }

    struct Response {
        capabilities: u32,
        user: String,
        auth: Vec<u8>,
        database: Option<String>,
        plugin: String,
    }

    fn parse_response(payload: &[u8]) -> Response {
        let mut c = Cursor(payload);
        let caps = c.take(4).unwrap();
        let capabilities = u32::from_le_bytes([caps[0], caps[1], caps[2], caps[3]]);
        c.take(28).unwrap();
        let user = String::from_utf8(c.nul_terminated().unwrap().to_vec()).unwrap();
        let auth_len = usize::from(c.u8().unwrap());
        let auth = c.take(auth_len).unwrap().to_vec();
        let database = (capabilities & CLIENT_CONNECT_WITH_DB != 0)
            .then(|| String::from_utf8(c.nul_terminated().unwrap().to_vec()).unwrap());
        let plugin = String::from_utf8(c.nul_terminated_or_rest().to_vec()).unwrap();
        Response {
            capabilities,
            user,
            auth,
            database,
            plugin,
        }
    }

    type ServerLogin = Box<dyn FnOnce(&mut TcpStream) -> bool + Send>;
    type Answer = Box<dyn Fn(&str) -> Vec<Vec<u8>> + Send>;

    /// One connection: `login` runs the handshake (false: hang up), then every query is
    /// answered by `answer` and logged, as is the `COM_QUIT`.
    fn scripted(login: ServerLogin, answer: Answer) -> (u16, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let seen = log.clone();
        thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            if !login(&mut stream) {
                return;
            }
            while let Some((seq, command)) = receive(&mut stream) {
                assert_eq!(seq, 0);
                if command == [COM_QUIT] {
                    seen.lock().unwrap().push("QUIT".to_owned());
                    return;
                }
                let sql = String::from_utf8_lossy(&command[1..]).into_owned();
                let replies = answer(&sql);
                seen.lock().unwrap().push(sql);
                for (seq, reply) in (1..).zip(replies) {
                    send(&mut stream, seq, &reply);
                }
            }
        });
        (port, log)
    }

    /// A `mysql_native_password` login that checks what the client sent.
    fn native_login(database: &'static str) -> ServerLogin {
        Box::new(move |stream| {
            send(
                stream,
                0,
                &greeting_payload("10.11.6-MariaDB", SERVER_CAPS, NATIVE_PASSWORD),
            );
            let (seq, payload) = receive(stream).unwrap();
            assert_eq!(seq, 1);
            let response = parse_response(&payload);
            assert_eq!(response.user, "probe");
            assert_eq!(
                response.auth,
                native_password(PASSWORD.as_bytes(), SCRAMBLE)
            );
            assert_eq!(response.plugin, NATIVE_PASSWORD);
            assert_eq!(
                response.database.as_deref(),
                Some(database).filter(|d| !d.is_empty())
            );
            assert_eq!(response.capabilities & CLIENT_SSL, 0);
            send(stream, 2, &ok());
            true
        })
    }

    fn standby_answers(replica_status: Vec<Vec<u8>>) -> Answer {
        Box::new(move |sql| match sql {
            ROLE_SQL => result_set(
                &["Variable_name", "Value"],
                &[&[Some("read_only"), Some("ON")]],
            ),
            "SHOW REPLICA STATUS" => vec![error(1064, "You have an error in your SQL syntax")],
            "SHOW SLAVE STATUS" => replica_status.clone(),
            other => vec![error(1064, &format!("unexpected {other}"))],
        })
    }

    #[test]
    fn observes_on_one_connection_and_says_goodbye() {
        let status = result_set(
            &["Slave_IO_State", "Seconds_Behind_Master"],
            &[&[Some("Waiting"), Some("7")]],
        );
        let (port, log) = scripted(native_login("shop"), standby_answers(status));
        let mut probe = node(tcp(port), "probe", Some(PASSWORD));
        probe.login.database = "shop".into();
        let mut session = connect(&probe, soon()).unwrap();
        let expected = Observation {
            role: Some(Role::Standby),
            lag: Some(Duration::from_secs(7)),
            timeline: None,
        };
        assert_eq!(session.observe(soon()), Ok(expected));
        assert_eq!(session.observe(soon()), Ok(expected));
        drop(session);
        thread::sleep(Duration::from_millis(100));
        // SHOW REPLICA STATUS failed to parse once and was not asked again.
        assert_eq!(
            *log.lock().unwrap(),
            [
                ROLE_SQL,
                "SHOW REPLICA STATUS",
                "SHOW SLAVE STATUS",
                ROLE_SQL,
                "SHOW SLAVE STATUS",
                "QUIT"
            ]
        );
    }

    #[test]
    fn a_forbidden_replica_status_is_not_asked_again() {
        let answer: Answer = Box::new(|sql| match sql {
            ROLE_SQL => result_set(
                &["Variable_name", "Value"],
                &[
                    &[Some("read_only"), Some("OFF")],
                    &[Some("super_read_only"), Some("ON")],
                ],
            ),
            _ => vec![error(
                1227,
                "Access denied; you need the REPLICATION CLIENT privilege",
            )],
        });
        let (port, log) = scripted(native_login(""), answer);
        let mut session =
            MySqlSession::open(&node(tcp(port), "probe", Some(PASSWORD)), soon()).unwrap();
        for _ in 0..2 {
            let seen = session.observe(soon()).unwrap();
            assert_eq!((seen.role, seen.lag), (Some(Role::Standby), None));
        }
        assert_eq!(session.lag_query, LagQuery::Forbidden);
        assert_eq!(
            *log.lock().unwrap(),
            [ROLE_SQL, "SHOW REPLICA STATUS", ROLE_SQL]
        );
    }

    #[test]
    fn a_primary_is_not_asked_for_lag_and_query_errors_fail_the_round() {
        let answer: Answer = Box::new(|sql| match sql {
            ROLE_SQL => result_set(
                &["Variable_name", "Value"],
                &[&[Some("read_only"), Some("OFF")]],
            ),
            _ => vec![error(1927, "Connection was killed")],
        });
        let (port, log) = scripted(native_login(""), answer);
        let mut session = connect(&node(tcp(port), "probe", Some(PASSWORD)), soon()).unwrap();
        let seen = session.observe(soon()).unwrap();
        assert_eq!((seen.role, seen.lag), (Some(Role::Primary), None));
        assert_eq!(*log.lock().unwrap(), [ROLE_SQL]);

        let answer: Answer = Box::new(|_| vec![error(1927, "Connection was killed")]);
        let (port, _) = scripted(native_login(""), answer);
        let mut session = connect(&node(tcp(port), "probe", Some(PASSWORD)), soon()).unwrap();
        assert_eq!(
            session.observe(soon()),
            Err(Failure::ServerError("1927 Connection was killed".into()))
        );
    }

    fn refusing_login(code: u16, message: &'static str) -> ServerLogin {
        Box::new(move |stream| {
            send(
                stream,
                0,
                &greeting_payload("8.0.36", SERVER_CAPS, CACHING_SHA2_PASSWORD),
            );
            receive(stream).unwrap();
            send(stream, 2, &error(code, message));
            false
        })
    }

    #[test]
    fn login_refusals() {
        let no_answers: fn() -> Answer = || Box::new(|_| Vec::new());
        let denied = "Access denied for user 'probe'@'localhost' (using password: YES)";
        let (port, _) = scripted(refusing_login(1045, denied), no_answers());
        let result = connect(&node(tcp(port), "probe", Some(PASSWORD)), soon());
        let Err(failure) = result else {
            panic!("logged in")
        };
        assert_eq!(failure, Failure::Auth(denied.into()));
        assert!(!failure.to_string().contains(PASSWORD));

        let (port, _) = scripted(refusing_login(1049, "Unknown database 'x'"), no_answers());
        let result = connect(&node(tcp(port), "probe", Some(PASSWORD)), soon());
        assert!(matches!(result, Err(Failure::Auth(m)) if m == "Unknown database 'x'"));

        let (port, _) = scripted(refusing_login(1040, "Too many connections"), no_answers());
        let result = connect(&node(tcp(port), "probe", Some(PASSWORD)), soon());
        assert!(
            matches!(result, Err(Failure::ServerError(ref m)) if m == "1040 Too many connections"),
            "{:?}",
            result.err()
        );

        let greeting_error: ServerLogin = Box::new(|stream| {
            send(stream, 0, b"\xff\x69\x04Host '127.0.0.1' is blocked");
            false
        });
        let (port, _) = scripted(greeting_error, no_answers());
        let result = connect(&node(tcp(port), "probe", None), soon());
        assert!(matches!(result, Err(Failure::ServerError(m)) if m.starts_with("1129 ")));
    }

    #[test]
    fn caching_sha2_fast_auth_and_auth_switch() {
        let login: ServerLogin = Box::new(|stream| {
            send(
                stream,
                0,
                &greeting_payload("8.0.36", SERVER_CAPS, CACHING_SHA2_PASSWORD),
            );
            let (_, payload) = receive(stream).unwrap();
            let response = parse_response(&payload);
            assert_eq!(response.plugin, CACHING_SHA2_PASSWORD);
            assert_eq!(
                response.auth,
                caching_sha2_password(PASSWORD.as_bytes(), SCRAMBLE)
            );
            // Switch to the classic plugin with a new scramble.
            let mut switch = b"\xfemysql_native_password\0".to_vec();
            switch.extend_from_slice(b"abcdefghijklmnopqrst\0");
            send(stream, 2, &switch);
            let (seq, auth) = receive(stream).unwrap();
            assert_eq!(seq, 3);
            assert_eq!(
                auth,
                native_password(PASSWORD.as_bytes(), b"abcdefghijklmnopqrst")
            );
            send(stream, 4, &[0x01, 0x03]);
            send(stream, 5, &ok());
            true
        });
        // Fast-auth data after a switch to native is not caching_sha2's: refused.
        let (port, _) = scripted(login, Box::new(|_| Vec::new()));
        let result = connect(&node(tcp(port), "probe", Some(PASSWORD)), soon());
        assert!(matches!(result, Err(Failure::BadHandshake(_))));

        let login: ServerLogin = Box::new(|stream| {
            send(
                stream,
                0,
                &greeting_payload("8.0.36", SERVER_CAPS, CACHING_SHA2_PASSWORD),
            );
            receive(stream).unwrap();
            send(stream, 2, &[0x01, 0x03]);
            send(stream, 3, &ok());
            true
        });
        let (port, _) = scripted(login, standby_answers(Vec::new()));
        assert!(connect(&node(tcp(port), "probe", Some(PASSWORD)), soon()).is_ok());
    }

    fn base64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    fn public_pem(key: &rsa::RsaPrivateKey) -> String {
        use rsa::pkcs8::EncodePublicKey;
        let der = key.to_public_key().to_public_key_der().unwrap();
        let body = base64(der.as_bytes());
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|l| std::str::from_utf8(l).unwrap())
            .collect();
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            lines.join("\n")
        )
    }

    #[test]
    fn caching_sha2_full_auth_without_tls_encrypts_for_the_server_key() {
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 1024).unwrap();
        let pem = public_pem(&key);
        let login: ServerLogin = Box::new(move |stream| {
            send(
                stream,
                0,
                &greeting_payload("8.0.36", SERVER_CAPS, CACHING_SHA2_PASSWORD),
            );
            receive(stream).unwrap();
            send(stream, 2, &[0x01, 0x04]);
            assert_eq!(receive(stream).unwrap(), (3, vec![0x02]));
            let mut reply = vec![0x01];
            reply.extend_from_slice(pem.as_bytes());
            send(stream, 4, &reply);
            let (seq, encrypted) = receive(stream).unwrap();
            assert_eq!(seq, 5);
            let plain = key.decrypt(Oaep::new::<Sha1>(), &encrypted).unwrap();
            let password: Vec<u8> = plain
                .iter()
                .zip(SCRAMBLE.iter().cycle())
                .map(|(p, s)| p ^ s)
                .collect();
            assert_eq!(password, b"hunter2\0");
            send(stream, 6, &ok());
            true
        });
        let (port, _) = scripted(login, Box::new(|_| Vec::new()));
        assert!(connect(&node(tcp(port), "probe", Some(PASSWORD)), soon()).is_ok());

        assert!(matches!(
            encrypt_password(
                b"pw",
                SCRAMBLE,
                b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
            ),
            Err(Failure::BadHandshake(_))
        ));
    }

    #[test]
    fn tls_plans_follow_ssl_mode() {
        let plain: ServerLogin = Box::new(|stream| {
            send(
                stream,
                0,
                &greeting_payload("10.11.6-MariaDB", SERVER_CAPS, NATIVE_PASSWORD),
            );
            let (_, payload) = receive(stream).unwrap();
            assert_eq!(parse_response(&payload).capabilities & CLIENT_SSL, 0);
            send(stream, 2, &ok());
            true
        });
        let (port, _) = scripted(plain, Box::new(|_| Vec::new()));
        let mut prefer = node(tcp(port), "probe", None);
        prefer.tls.mode = SslMode::Prefer;
        assert!(connect(&prefer, soon()).is_ok());

        let (port, _) = scripted(refusing_login(1045, "no"), Box::new(|_| Vec::new()));
        let mut require = node(tcp(port), "probe", None);
        require.tls.mode = SslMode::Require;
        assert!(matches!(
            connect(&require, soon()),
            Err(Failure::Tls(m)) if m.contains("does not offer TLS")
        ));

        let mut verify = node(tcp(1), "probe", None);
        verify.tls.mode = SslMode::VerifyFull;
        assert!(matches!(connect(&verify, soon()), Err(Failure::Tls(_))));
        verify.tls.root_cert = Some("/nonexistent/ca.pem".into());
        assert!(
            matches!(connect(&verify, soon()), Err(Failure::Tls(m)) if m.contains("/nonexistent"))
        );

        let mut unix = node(Endpoint::Unix("/tmp/x.sock".into()), "probe", None);
        unix.tls.mode = SslMode::Require;
        assert!(tls_plan(&unix).unwrap().is_none());
        let mut by_name = node(tcp(1), "probe", None);
        by_name.tls.mode = SslMode::Require;
        assert!(tls_plan(&by_name).unwrap().unwrap().required);
        by_name.tls.mode = SslMode::Allow;
        assert!(!tls_plan(&by_name).unwrap().unwrap().required);
    }

    #[test]
    fn a_silent_server_is_a_timeout_by_the_deadline() {
        // Never accepted: the kernel completes the TCP handshake, nobody greets.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let started = Instant::now();
        let result = connect(&node(tcp(port), "probe", None), started + SHORT);
        assert!(matches!(result, Err(Failure::Timeout)));
        assert!(
            started.elapsed() < SHORT * 2,
            "took {:?}",
            started.elapsed()
        );

        let slow: Answer = Box::new(|_| {
            thread::sleep(Duration::from_secs(2));
            Vec::new()
        });
        let (port, _) = scripted(native_login(""), slow);
        let mut session = connect(&node(tcp(port), "probe", Some(PASSWORD)), soon()).unwrap();
        let started = Instant::now();
        assert_eq!(session.observe(started + SHORT), Err(Failure::Timeout));
        let took = started.elapsed();
        assert!(took >= SHORT && took < SHORT * 2, "took {took:?}");
        drop(listener);
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().fold(String::new(), |mut out, b| {
            use std::fmt::Write as _;
            let _ = write!(out, "{b:02x}");
            out
        })
    }
}
