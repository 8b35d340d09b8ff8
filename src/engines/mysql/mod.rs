//! MySQL and MariaDB: the `role` probe's session (logged in once, TLS
//! optional, then asked `read_only`, the replica lag and GTID positions every
//! round), and the `handshake` probe (the server's greeting).

mod auth;
mod packets;
mod session;

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::engines::{Observation, Server, Session};
use crate::net::tls::{self, ClientTls};
use crate::net::{self, Endpoint, Failure, SslMode};
use packets::{Conn, CLIENT_CONNECT_WITH_DB, CLIENT_LONG_PASSWORD, CLIENT_PLUGIN_AUTH};
use packets::{CLIENT_PROTOCOL_41, CLIENT_SECURE_CONNECTION, CLIENT_SSL, CLIENT_TRANSACTIONS};
use session::{LagQuery, MySqlSession};

/// How long the goodbye may take when a session is dropped.
const QUIT_TIMEOUT: Duration = Duration::from_millis(50);

pub fn open_session(server: &Server, deadline: Instant) -> Result<Box<dyn Session>, Failure> {
    Ok(Box::new(open(server, deadline)?))
}

/// The `handshake` probe: the greeting MySQL and MariaDB send on connect.
/// An error packet in its place (too many connections, host blocked) means
/// the server will not serve us.
pub fn handshake(endpoint: &Endpoint, deadline: Instant) -> Result<(), Failure> {
    Conn::new(net::connect(endpoint, deadline)?)
        .read_greeting()
        .map(drop)
}

fn open(server: &Server, deadline: Instant) -> Result<MySqlSession, Failure> {
    let tls = tls_plan(server)?;
    let mut conn = Conn::new(net::connect(&server.endpoint, deadline)?);
    let greeting = conn.read_greeting()?;
    let required = CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION;
    if greeting.capabilities & required != required {
        return Err(Failure::BadHandshake(format!(
            "server {} predates protocol 4.1 authentication",
            greeting.version
        )));
    }
    let mut capabilities = required
        | greeting.capabilities & (CLIENT_LONG_PASSWORD | CLIENT_TRANSACTIONS | CLIENT_PLUGIN_AUTH);
    if !server.login.database.is_empty() {
        capabilities |= CLIENT_CONNECT_WITH_DB;
    }
    let mut encrypted = false;
    if let Some(tls) = tls {
        if greeting.capabilities & CLIENT_SSL != 0 {
            capabilities |= CLIENT_SSL;
            conn.write_packet(&auth::ssl_request(capabilities))?;
            conn = conn.start_tls(&tls.client)?;
            encrypted = true;
        } else if tls.required {
            return Err(Failure::Tls("the server does not offer TLS".into()));
        }
    }
    // The server accepts a cleartext password over TLS or a unix socket.
    let secure = encrypted || matches!(server.endpoint, Endpoint::Unix(_));
    auth::authenticate(&mut conn, &greeting, capabilities, &server.login, secure)?;
    Ok(MySqlSession {
        conn,
        lag_query: LagQuery::Replica,
        endpoint: server.endpoint.to_string(),
    })
}

impl Session for MySqlSession {
    fn observe(&mut self, deadline: Instant) -> Result<Observation, Failure> {
        MySqlSession::observe(self, deadline)
    }

    fn socket(&self) -> RawFd {
        self.conn.transport().as_raw_fd()
    }

    /// An idle MySQL session hears from the server only when it ends (a
    /// `KILL`, a shutdown, `wait_timeout`): whatever came, the session is over.
    fn on_readable(&mut self, deadline: Instant) -> Result<(), Failure> {
        self.conn.set_deadline(deadline);
        let packet = self.conn.read_packet()?;
        Err(match packet.first() {
            Some(0xff) => Failure::ServerError(packets::ServerError::parse(&packet)?.to_string()),
            _ => Failure::BadHandshake("the server spoke while the session was idle".into()),
        })
    }
}

impl Drop for MySqlSession {
    fn drop(&mut self) {
        // Best effort: spares the server log an "aborted connection" line.
        self.conn.quit(Instant::now() + QUIT_TIMEOUT);
    }
}

struct TlsPlan {
    client: ClientTls,
    /// False for prefer/allow: plain text if the server offers no TLS.
    required: bool,
}

/// What TLS the server's `ssl_mode` asks for; `None` for none. Unix sockets
/// never use TLS.
fn tls_plan(server: &Server) -> Result<Option<TlsPlan>, Failure> {
    let host = match &server.endpoint {
        Endpoint::Tcp { host, .. } if server.tls.mode != SslMode::Disable => host,
        _ => return Ok(None),
    };
    Ok(Some(TlsPlan {
        client: tls::client(&server.tls, host, "OPTIONS[\"ssl\"][\"ca\"]")?,
        required: !matches!(server.tls.mode, SslMode::Allow | SslMode::Prefer),
    }))
}

#[cfg(test)]
mod tests {
    use super::auth::*;
    use super::packets::*;
    use super::session::ROLE_SQL;
    use super::*;
    use crate::engines::{Login, Role, Secret};
    use crate::net::{one_line, Tls};
    use rsa::Oaep;
    use sha1::Sha1;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};
    use std::thread;

    const SCRAMBLE: &[u8; 20] = b"0123456789ABCDEFGHIJ";
    const PASSWORD: &str = "hunter2";
    const SHORT: Duration = Duration::from_millis(300);

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    fn node(endpoint: Endpoint, user: &str, password: Option<&str>) -> Server {
        Server {
            endpoint,
            login: Login {
                user: user.into(),
                password: password.map(Secret::new),
                database: String::new(),
                fallback_database: None,
            },
            tls: Tls::DISABLED,
        }
    }

    fn connect(server: &Server, deadline: Instant) -> Result<Box<dyn Session>, Failure> {
        open_session(server, deadline)
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
            position: None,
            upstream_timeline: None,
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
        let mut session = open(&node(tcp(port), "probe", Some(PASSWORD)), soon()).unwrap();
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

    // --- hostile servers -------------------------------------------------------------------

    /// The default SIGPIPE disposition, as in a host process that does not ignore it (Rust's
    /// test harness does): a write that raised SIGPIPE would now kill the test process.
    fn default_sigpipe() {
        // SAFETY: sets a signal disposition; no handler runs.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }

    /// Waits (at most 5 s) until the peer's hang-up is visible on `socket`.
    fn wait_readable(socket: RawFd) {
        let mut fds = libc::pollfd {
            fd: socket,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one live pollfd.
        let ready = unsafe { libc::poll(&raw mut fds, 1, 5000) };
        assert_eq!(ready, 1, "the server's hang-up never arrived");
    }

    /// A server that logs us in, then runs `then` and hangs up.
    fn logged_in_then(then: fn(&mut TcpStream)) -> ServerLogin {
        let login = native_login("");
        Box::new(move |stream| {
            assert!(login(stream));
            then(stream);
            false
        })
    }

    #[test]
    fn a_server_that_hangs_up_on_our_writes_raises_no_sigpipe() {
        default_sigpipe();
        // It greets and hangs up at once: the handshake response, megabytes long for a huge
        // user name, meets a closed socket (the RST it draws makes the next write EPIPE).
        let hang_up: ServerLogin = Box::new(|stream| {
            send(
                stream,
                0,
                &greeting_payload("10.11.6-MariaDB", SERVER_CAPS, NATIVE_PASSWORD),
            );
            false
        });
        let (port, _) = scripted(hang_up, Box::new(|_| Vec::new()));
        let user = "u".repeat(8 << 20);
        let result = connect(&node(tcp(port), &user, Some(PASSWORD)), soon());
        assert_eq!(result.err(), Some(Failure::Closed));

        // Logged in, then the server hangs up: every later write (the query, again, the
        // COM_QUIT on drop) goes to a closed socket.
        let (port, _) = scripted(logged_in_then(|_| {}), Box::new(|_| Vec::new()));
        let mut session = connect(&node(tcp(port), "probe", Some(PASSWORD)), soon()).unwrap();
        wait_readable(session.socket());
        for _ in 0..3 {
            assert_eq!(session.observe(soon()), Err(Failure::Closed));
            thread::sleep(Duration::from_millis(10));
        }
        drop(session);
        // Still alive.
    }

    /// Logs in, answers queries like `standby_answers`, but answers `endless` with a result
    /// set whose rows (each `value` in the second column) never end: it writes until the
    /// client hangs up, and returns how many rows it wrote.
    fn flooding(endless: &'static str, value: String) -> (u16, thread::JoinHandle<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let limit = Some(Duration::from_secs(10));
            stream.set_read_timeout(limit).unwrap();
            stream.set_write_timeout(limit).unwrap();
            assert!(native_login("")(&mut stream));
            let answer = standby_answers(Vec::new());
            while let Some((_, command)) = receive(&mut stream) {
                let sql = String::from_utf8_lossy(&command[1..]).into_owned();
                if sql != endless {
                    for (seq, reply) in (1..).zip(answer(&sql)) {
                        send(&mut stream, seq, &reply);
                    }
                    continue;
                }
                let mut head = result_set(&["Variable_name", "Value"], &[]);
                head.pop(); // the EOF that would end the rows
                let mut seq = 1u8;
                for packet in &head {
                    send(&mut stream, seq, packet);
                    seq = seq.wrapping_add(1);
                }
                let mut row = Vec::new();
                lenenc_str(&mut row, "read_only");
                row.push(0xfc);
                row.extend_from_slice(&u16::try_from(value.len()).unwrap().to_le_bytes());
                row.extend_from_slice(value.as_bytes());
                let mut framed = row.len().to_le_bytes()[..4].to_vec();
                for written in 0.. {
                    framed[3] = seq;
                    seq = seq.wrapping_add(1);
                    if stream
                        .write_all(&framed)
                        .and_then(|()| stream.write_all(&row))
                        .is_err()
                    {
                        return written;
                    }
                }
            }
            0
        });
        (port, server)
    }

    #[test]
    fn endless_result_sets_fail_at_the_row_and_size_caps() {
        // Either cap ends the read: the failure names both.
        for (endless, value) in [
            // Small rows: the row count cap (1024) comes first.
            (ROLE_SQL, "ON".to_owned()),
            // Rows of 3 KB: the size cap (1 MB) comes first.
            (ROLE_SQL, "x".repeat(3000)),
            // The replica status of a standby.
            ("SHOW SLAVE STATUS", "7".to_owned()),
        ] {
            let (port, server) = flooding(endless, value);
            let mut session = connect(&node(tcp(port), "probe", Some(PASSWORD)), soon()).unwrap();
            let started = Instant::now();
            let result = session.observe(started + Duration::from_secs(10));
            let took = started.elapsed();
            assert!(
                matches!(&result, Err(Failure::BadHandshake(m)) if m.starts_with("a result of over")),
                "{endless}: {result:?}"
            );
            assert!(took < Duration::from_secs(2), "{endless}: took {took:?}");
            drop(session);
            // The server stops once we hang up.
            let written = server.join().unwrap();
            assert!(written > 300, "{endless}: only {written} rows");
        }
    }

    #[test]
    fn endless_column_definitions_fail_at_the_size_cap() {
        // 4096 columns (the most accepted), each of 1 MB: all kept, they would be 4 GB. The
        // server stops at 64 and waits, so that a client without the cap times out instead.
        let login = native_login("");
        let (port, _) = scripted(
            Box::new(move |stream| {
                assert!(login(stream));
                receive(stream).unwrap();
                send(stream, 1, &[0xfc, 0x00, 0x10]);
                let mut column = vec![0u8; 4];
                for part in ["def", "", "", ""] {
                    lenenc_str(&mut column, part);
                }
                for _ in 0..2 {
                    // The name and the original name, with three-byte lengths.
                    column.extend_from_slice(&[0xfd, 0x20, 0xa1, 0x07]);
                    column.resize(column.len() + 500_000, b'c');
                }
                column.extend_from_slice(&[0x0c, 45, 0, 0, 1, 0, 0, 253, 0, 0, 0, 0, 0]);
                let length = u32::try_from(column.len() - 4).unwrap().to_le_bytes();
                column[..3].copy_from_slice(&length[..3]);
                for _ in 0..64 {
                    if stream.write_all(&column).is_err() {
                        break;
                    }
                }
                let _ = stream.read_to_end(&mut Vec::new());
                false
            }),
            Box::new(|_| Vec::new()),
        );
        let mut session = connect(&node(tcp(port), "probe", Some(PASSWORD)), soon()).unwrap();
        let started = Instant::now();
        let result = session.observe(started + Duration::from_secs(5));
        assert!(
            matches!(&result, Err(Failure::BadHandshake(m)) if m.starts_with("a result of over")),
            "{result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    /// About 900 KB of server text: many lines, carriage returns, escapes, and a marker far
    /// past what may be quoted.
    fn huge_text() -> String {
        let mut text = String::from("Access denied for user 'probe'\n");
        while text.len() < 900_000 {
            text.push_str("\r\n[ERROR] a forged log line\n\t\x1b[0m");
        }
        text.push_str("END-OF-TEXT");
        text
    }

    /// `failure` reads as one bounded line: no line breaks or control characters, at most
    /// one quote of server text (`one_line`'s bound) after a short prefix, no password.
    fn assert_one_bounded_line(failure: &Failure) {
        let quote = one_line(&"x".repeat(10_000)).chars().count();
        let text = failure.to_string();
        assert!(!text.chars().any(char::is_control), "{text:?}");
        assert!(text.chars().count() <= quote + 30, "{text:?}");
        assert!(!text.contains(PASSWORD) && !text.contains("END-OF-TEXT"));
    }

    #[test]
    fn huge_multi_line_errors_are_quoted_on_one_bounded_line() {
        // A login refusal: of the credentials (1045) and of the server (1040).
        for code in [1045, 1040] {
            let refusal = error(code, &huge_text());
            let login: ServerLogin = Box::new(move |stream| {
                send(
                    stream,
                    0,
                    &greeting_payload("8.0.36", SERVER_CAPS, NATIVE_PASSWORD),
                );
                receive(stream).unwrap();
                send(stream, 2, &refusal);
                false
            });
            let (port, _) = scripted(login, Box::new(|_| Vec::new()));
            let failure = connect(&node(tcp(port), "probe", Some(PASSWORD)), soon())
                .err()
                .unwrap();
            match code {
                1045 => assert!(matches!(failure, Failure::Auth(_)), "{failure:?}"),
                _ => assert!(matches!(failure, Failure::ServerError(_)), "{failure:?}"),
            }
            assert_one_bounded_line(&failure);
        }

        // A query error.
        let huge = huge_text();
        let (port, _) = scripted(
            native_login(""),
            Box::new(move |_| vec![error(1064, &huge)]),
        );
        let mut session = connect(&node(tcp(port), "probe", Some(PASSWORD)), soon()).unwrap();
        let failure = session.observe(soon()).err().unwrap();
        assert!(
            matches!(&failure, Failure::ServerError(m) if m.starts_with("1064 Access denied")),
            "{failure:?}"
        );
        assert_one_bounded_line(&failure);

        // An error in the greeting's place is refused by its size alone.
        let greeting = error(1040, &huge_text());
        let login: ServerLogin = Box::new(move |stream| {
            let mut packet = greeting.len().to_le_bytes()[..4].to_vec();
            packet[3] = 0;
            packet.extend_from_slice(&greeting);
            // The client hangs up after the header.
            let _ = stream.write_all(&packet);
            false
        });
        let (port, _) = scripted(login, Box::new(|_| Vec::new()));
        let failure = connect(&node(tcp(port), "probe", Some(PASSWORD)), soon())
            .err()
            .unwrap();
        assert!(matches!(failure, Failure::BadHandshake(_)), "{failure:?}");
        assert_one_bounded_line(&failure);
    }

    #[test]
    fn an_idle_session_ends_when_the_server_speaks() {
        // The server hangs up (wait_timeout, a restart).
        let (port, _) = scripted(logged_in_then(|_| {}), Box::new(|_| Vec::new()));
        let mut session = connect(&node(tcp(port), "probe", Some(PASSWORD)), soon()).unwrap();
        wait_readable(session.socket());
        assert_eq!(session.on_readable(soon()), Err(Failure::Closed));

        // KILL: an error packet, then the hang-up.
        let killed =
            logged_in_then(|stream| send(stream, 0, &error(1927, "Connection was killed")));
        let (port, _) = scripted(killed, Box::new(|_| Vec::new()));
        let mut session = connect(&node(tcp(port), "probe", Some(PASSWORD)), soon()).unwrap();
        wait_readable(session.socket());
        assert_eq!(
            session.on_readable(soon()),
            Err(Failure::ServerError("1927 Connection was killed".into()))
        );

        // Anything else unasked is no MySQL session any more either.
        let (port, _) = scripted(
            logged_in_then(|stream| send(stream, 0, &ok())),
            Box::new(|_| Vec::new()),
        );
        let mut session = connect(&node(tcp(port), "probe", Some(PASSWORD)), soon()).unwrap();
        assert!(matches!(
            session.on_readable(soon()),
            Err(Failure::BadHandshake(_))
        ));
    }
}
