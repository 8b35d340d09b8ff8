//! PostgreSQL: the `role` probe's session (logged in once, then asked role,
//! lag, timeline and WAL position every round), the `handshake` probe, and
//! the check that the postmaster still starts new sessions.

mod scram;
mod session;

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use postgres_protocol::message::backend::Message;

use crate::engines::{Observation, Role, Server, Session};
use crate::net::{self, Endpoint, Failure};
use session::{ssl_request_answer, startup_message, Connection, SSL_REQUEST};

/// Role, replay lag (seconds), timeline, WAL position and a standby's
/// upstream timeline, in one round trip.
///
/// `pg_is_in_recovery()` is read once (a volatile function keeps the
/// subquery from being flattened), so a promotion mid-statement cannot mix
/// answers. A standby is caught up (lag 0) while its WAL receiver is connected
/// and has replayed all it received; otherwise its lag is the age of the last
/// replayed commit, which keeps growing while it is cut off from its primary,
/// and is NULL (unknown) if it has replayed nothing since it started. A
/// primary's lag is 0: reads there are never stale. Its timeline is the one in
/// the name of the WAL file it writes. The position is the primary's WAL
/// insert location (past every commit made so far, also asynchronous ones) or
/// the standby's replay location, in bytes. PostgreSQL 10 or later.
///
/// An insert location right after a page header (24 bytes into a page, 40
/// into a segment) is where the next record will go, past a header nothing
/// has been written after: it counts as the page's start, where a standby
/// that replayed everything stands. Otherwise an idle primary (after a WAL
/// switch, say) would look ahead of every standby for good.
///
/// A standby's upstream timeline is the one its WAL receiver streams (NULL
/// without a receiver, or for a user not allowed to see it): a standby
/// still streaming from a primary that a promotion left behind is on an
/// older timeline than the writer, and replays writes that are lost.
const ROLE_QUERY: &str = "\
SELECT standby,
       CASE WHEN NOT standby THEN 0
            WHEN pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn()
                 AND EXISTS (SELECT FROM pg_stat_wal_receiver) THEN 0
            ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())
       END,
       CASE WHEN NOT standby
            THEN ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint
       END,
       CASE WHEN standby THEN pg_last_wal_replay_lsn() - '0/0'::pg_lsn
            ELSE (SELECT CASE WHEN at % page = 24 OR at % segment = 40 THEN at - at % page
                              ELSE at END
                  FROM (SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn AS at,
                               current_setting('wal_block_size')::numeric AS page,
                               pg_size_bytes(current_setting('wal_segment_size')) AS segment)
                       AS wal)
       END,
       CASE WHEN standby THEN (SELECT received_tli FROM pg_stat_wal_receiver) END
FROM (SELECT pg_is_in_recovery() AS standby) AS recovery";

/// How long dropping a session may spend saying goodbye.
const TERMINATE_WAIT: Duration = Duration::from_millis(50);

pub fn open_session(server: &Server, deadline: Instant) -> Result<Box<dyn Session>, Failure> {
    Ok(Box::new(PgSession {
        connection: session::log_in(server, deadline)?,
    }))
}

/// The `handshake` probe: an SSLRequest, which the postmaster answers (`S`
/// or `N`) itself before any authentication; a client that then hangs up
/// leaves no complaint in the server log.
pub fn handshake(endpoint: &Endpoint, deadline: Instant) -> Result<(), Failure> {
    let mut wire = net::connect(endpoint, deadline)?;
    wire.send(&SSL_REQUEST)?;
    let mut answer = [0u8; 1];
    wire.receive_exact(&mut answer)?;
    match answer[0] {
        b'S' | b'N' => Ok(()),
        other => Err(ssl_request_answer(other)),
    }
}

/// Whether a new session would start: a start-up packet on a fresh
/// connection, answered by the backend the postmaster forks for it. Any
/// authentication request means yes, and so does a refusal of who we are
/// (`pg_hba.conf`, an unknown database): the server is taking sessions. No
/// answer (a stuck postmaster), a refused connection, or an error such as
/// 53300 (no free connection slot) or 57P03 (starting up, shutting down)
/// means no. It never logs in.
pub fn check_new_sessions(server: &Server, deadline: Instant) -> Result<(), Failure> {
    let mut connection = Connection::plain(net::connect(&server.endpoint, deadline)?);
    connection.send(&startup_message(&server.login)?)?;
    let result = match connection.receive()? {
        (_, Message::ErrorResponse(body)) => match session::startup_failure(body.fields()) {
            Failure::Auth(_) => Ok(()),
            refusal => Err(refusal),
        },
        (_, Message::AuthenticationOk) => {
            connection.terminate(Instant::now() + TERMINATE_WAIT);
            Ok(())
        }
        (b'R', _) => Ok(()),
        (tag, _) => Err(session::unexpected(tag)),
    };
    result
}

struct PgSession {
    connection: Connection,
}

impl Session for PgSession {
    fn observe(&mut self, deadline: Instant) -> Result<Observation, Failure> {
        let row = self.connection.query_row(ROLE_QUERY, deadline)?;
        parse_role_row(&row)
    }

    fn socket(&self) -> RawFd {
        self.connection.transport().as_raw_fd()
    }

    fn on_readable(&mut self, deadline: Instant) -> Result<(), Failure> {
        self.connection.set_deadline(deadline);
        self.connection.take_unsolicited()
    }
}

impl Drop for PgSession {
    fn drop(&mut self) {
        // Best effort: a server that is gone gets nothing.
        self.connection.terminate(Instant::now() + TERMINATE_WAIT);
    }
}

/// The role query's row: `[in recovery, lag seconds, timeline, position]`.
fn parse_role_row(row: &[Option<String>]) -> Result<Observation, Failure> {
    let bad = |what: &str| {
        Failure::BadHandshake(net::one_line(&format!(
            "role query returned {what}: {row:?}"
        )))
    };
    let [standby, lag, timeline, position, upstream] = row else {
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
    let timeline_of = |column: &Option<String>| -> Result<Option<u64>, Failure> {
        column
            .as_deref()
            .map(|text| {
                text.parse::<u32>()
                    .map(u64::from)
                    .map_err(|_| bad("a timeline that is not a number"))
            })
            .transpose()
    };
    let timeline = timeline_of(timeline)?;
    let upstream_timeline = timeline_of(upstream)?;
    let position = match position.as_deref() {
        None => None,
        Some(text) => Some(
            text.parse::<u64>()
                .map_err(|_| bad("a WAL position that is not a number"))?,
        ),
    };
    Ok(Observation {
        role: Some(role),
        lag,
        timeline,
        position,
        upstream_timeline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engines::{Login, Secret};
    use crate::net::{SslMode, Tls};
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use hmac::Mac;
    use postgres_protocol::authentication::md5_hash;
    use session::is_auth_code;
    use sha2::{Digest, Sha256};
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::{mpsc, OnceLock};
    use std::thread;

    fn node(port: u16, mode: SslMode, password: Option<&str>) -> Server {
        Server {
            endpoint: Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
            login: Login {
                user: "u".into(),
                password: password.map(Secret::new),
                database: "postgres".into(),
                fallback_database: None,
            },
            tls: Tls {
                mode,
                root_cert: None,
            },
        }
    }

    fn connect(server: &Server, deadline: Instant) -> Result<Box<dyn Session>, Failure> {
        open_session(server, deadline)
    }

    fn soon(millis: u64) -> Instant {
        Instant::now() + Duration::from_millis(millis)
    }

    fn row(values: &[Option<&str>]) -> Vec<Option<String>> {
        values.iter().map(|v| v.map(str::to_owned)).collect()
    }

    #[test]
    fn role_rows() {
        let primary = parse_role_row(&row(&[
            Some("f"),
            Some("0"),
            Some("3"),
            Some("50331808"),
            None,
        ]))
        .unwrap();
        assert_eq!(
            primary,
            Observation {
                role: Some(Role::Primary),
                lag: Some(Duration::ZERO),
                timeline: Some(3),
                position: Some(50_331_808),
                upstream_timeline: None,
            }
        );
        let standby = parse_role_row(&row(&[
            Some("t"),
            Some("2.500000"),
            None,
            Some("7"),
            Some("2"),
        ]))
        .unwrap();
        assert_eq!(standby.upstream_timeline, Some(2));
        assert_eq!(standby.role, Some(Role::Standby));
        assert_eq!(standby.lag, Some(Duration::from_millis(2500)));
        assert_eq!((standby.timeline, standby.position), (None, Some(7)));
        // Nothing replayed yet: unknown; clock skew: clamped.
        assert_eq!(
            parse_role_row(&row(&[Some("t"), None, None, None, None]))
                .unwrap()
                .lag,
            None
        );
        assert_eq!(
            parse_role_row(&row(&[Some("t"), Some("-0.004"), None, None, None]))
                .unwrap()
                .lag,
            Some(Duration::ZERO)
        );
        // Timelines go up to 2^32 - 1.
        assert_eq!(
            parse_role_row(&row(&[
                Some("f"),
                Some("0"),
                Some("4294967295"),
                None,
                None
            ]))
            .unwrap()
            .timeline,
            Some(u64::from(u32::MAX))
        );
        for bad in [
            row(&[Some("x"), Some("0"), None, None, None]),
            row(&[None, Some("0"), None, None, None]),
            row(&[Some("t"), Some("soon"), None, None, None]),
            row(&[Some("t"), Some("NaN"), None, None, None]),
            row(&[Some("f"), Some("0"), Some("-1"), None, None]),
            row(&[Some("f"), Some("0"), Some("1"), Some("0/0"), None]),
            row(&[Some("f"), Some("0"), Some("1")]),
        ] {
            assert!(
                matches!(parse_role_row(&bad), Err(Failure::BadHandshake(_))),
                "{bad:?}"
            );
        }
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
            // Every scripted server ends, whatever the client does.
            let limit = Some(Duration::from_secs(30));
            stream.set_read_timeout(limit).unwrap();
            stream.set_write_timeout(limit).unwrap();
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
    fn the_maintenance_database_refused_the_login_falls_back_to_name() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = thread::spawn(move || {
            let mut asked = Vec::new();
            for refusal in ["3D000", "28P01"] {
                let (mut stream, _) = listener.accept().unwrap();
                let startup = String::from_utf8_lossy(&read_startup(&mut stream)).into_owned();
                asked.push(startup.contains("database\0postgres\0"));
                if asked.len() == 1 {
                    let reply = error(refusal, "database \"postgres\" does not exist");
                    stream.write_all(&reply).unwrap();
                } else {
                    let mut reply = auth(0, b"");
                    reply.extend(ready());
                    stream.write_all(&reply).unwrap();
                    let _ = stream.read(&mut [0u8; 64]);
                }
            }
            asked
        });
        let mut with_name = node(port, SslMode::Disable, None);
        with_name.login.fallback_database = Some("app".into());
        assert!(connect(&with_name, soon(2000)).is_ok());
        assert_eq!(
            server.join().unwrap(),
            [true, false],
            "postgres first, then NAME"
        );

        // A refused password is not about the database: no second attempt.
        let (port, _) = serve(|stream| {
            read_startup(stream);
            stream
                .write_all(&error("28P01", "password authentication failed"))
                .unwrap();
        });
        let mut wrong = node(port, SslMode::Disable, Some("x"));
        wrong.login.fallback_database = Some("app".into());
        assert!(matches!(connect(&wrong, soon(2000)), Err(Failure::Auth(_))));
    }

    #[test]
    fn one_connection_answers_every_round_and_says_goodbye() {
        let (port, received) = serve(|stream| {
            greet(stream);
            for answer in [
                [Some("f"), Some("0"), Some("2"), Some("100"), None],
                [Some("t"), Some("1.25"), None, Some("90"), None],
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

    // --- SCRAM-SHA-256 with many iterations, server side -------------------

    const SCRAM_PASSWORD: &str = "correct horse battery staple";
    /// Not the salt of scram.rs's tests: the client's key cache must not
    /// answer for it.
    const SCRAM_SALT: &[u8] = b"dbha: 600k iterations";
    /// What PostgreSQL 16's `scram_iterations` allows, and far past the
    /// 100,000 postgres-protocol accepts.
    const SCRAM_ITERATIONS: u32 = 600_000;

    type HmacSha256 = hmac::Hmac<Sha256>;

    fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap();
        mac.update(message);
        mac.finalize().into_bytes().into()
    }

    /// PBKDF2-HMAC-SHA-256, one 32-byte block: RFC 5802's `Hi`.
    fn pbkdf2(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
        let prf = <HmacSha256 as Mac>::new_from_slice(password).unwrap();
        let mut block: [u8; 32] = prf
            .clone()
            .chain_update(salt)
            .chain_update(1u32.to_be_bytes())
            .finalize()
            .into_bytes()
            .into();
        let mut key = block;
        for _ in 1..iterations {
            block = prf
                .clone()
                .chain_update(block)
                .finalize()
                .into_bytes()
                .into();
            key.iter_mut().zip(block).for_each(|(k, b)| *k ^= b);
        }
        key
    }

    /// The server's `SaltedPassword` for `SCRAM_PASSWORD`; with
    /// `SCRAM_ITERATIONS`, derived once (unoptimised in a test build, that
    /// takes seconds: `prepare_salted_password` starts it early).
    fn server_salted_password(iterations: u32) -> [u8; 32] {
        static SALTED: OnceLock<[u8; 32]> = OnceLock::new();
        let derive = || pbkdf2(SCRAM_PASSWORD.as_bytes(), SCRAM_SALT, iterations);
        if iterations == SCRAM_ITERATIONS {
            *SALTED.get_or_init(derive)
        } else {
            derive()
        }
    }

    /// Derives the server's key while the client derives its own.
    fn prepare_salted_password() {
        thread::spawn(|| server_salted_password(SCRAM_ITERATIONS));
    }

    #[test]
    fn pbkdf2_of_the_scripted_server_matches_known_vectors() {
        // PBKDF2-HMAC-SHA256("password", "salt", c, 32): the widely
        // published SHA-256 counterparts of RFC 6070's vectors.
        let hex = |key: [u8; 32]| {
            key.iter().fold(String::new(), |mut out, b| {
                use std::fmt::Write as _;
                let _ = write!(out, "{b:02x}");
                out
            })
        };
        assert_eq!(
            hex(pbkdf2(b"password", b"salt", 1)),
            "120fb6cffcf8b32c43e7225256c4f837a86548c92ccc35480805987cb70be17b"
        );
        assert_eq!(
            hex(pbkdf2(b"password", b"salt", 4096)),
            "c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a"
        );
    }

    /// Runs SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL does for
    /// `SCRAM_PASSWORD` with `iterations`: checks the client's proof
    /// (refusing it with 28P01 if wrong), then proves itself, with a wrong
    /// signature if `forge`.
    fn scram_server(stream: &mut TcpStream, iterations: u32, forge: bool) {
        read_startup(stream);
        stream.write_all(&auth(10, b"SCRAM-SHA-256\0\0")).unwrap();
        // SASLInitialResponse: mechanism, length, client-first message.
        let (tag, body) = read_message(stream);
        assert_eq!(tag, b'p');
        let end = body.iter().position(|&b| b == 0).unwrap();
        assert_eq!(&body[..end], b"SCRAM-SHA-256");
        let length = i32::from_be_bytes(body[end + 1..end + 5].try_into().unwrap());
        let client_first = std::str::from_utf8(&body[end + 5..]).unwrap().to_owned();
        assert_eq!(usize::try_from(length).unwrap(), client_first.len());
        let client_first_bare = client_first.strip_prefix("n,,").unwrap();
        let client_nonce = client_first_bare.strip_prefix("n=,r=").unwrap();
        assert!(client_nonce.len() >= 16, "{client_first}");
        assert!(client_nonce
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b','));

        let nonce = format!("{client_nonce}Zx9+server/nonce");
        let server_first = format!("r={nonce},s={},i={iterations}", STANDARD.encode(SCRAM_SALT));
        stream
            .write_all(&auth(11, server_first.as_bytes()))
            .unwrap();

        let (tag, client_final) = read_message(stream);
        assert_eq!(tag, b'p');
        let client_final = String::from_utf8(client_final).unwrap();
        let (without_proof, proof) = client_final.rsplit_once(",p=").unwrap();
        assert_eq!(without_proof, format!("c=biws,r={nonce}"));
        let proof = STANDARD.decode(proof).unwrap();
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let salted = server_salted_password(iterations);
        let stored_key: [u8; 32] = Sha256::digest(hmac_sha256(&salted, b"Client Key")).into();
        let client_signature = hmac_sha256(&stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof
            .iter()
            .zip(client_signature)
            .map(|(p, s)| p ^ s)
            .collect();
        if proof.len() != 32 || Sha256::digest(&client_key).as_slice() != stored_key {
            let refusal = error("28P01", "password authentication failed for user \"u\"");
            stream.write_all(&refusal).unwrap();
            return;
        }
        let server_key = hmac_sha256(&salted, b"Server Key");
        let mut signature = hmac_sha256(&server_key, auth_message.as_bytes());
        if forge {
            signature[7] ^= 0x40;
        }
        let mut reply = auth(12, format!("v={}", STANDARD.encode(signature)).as_bytes());
        reply.extend(auth(0, b""));
        reply.extend(message(b'K', &[0, 0, 0, 7, 0, 0, 0, 9]));
        reply.extend(ready());
        stream.write_all(&reply).unwrap();
    }

    #[test]
    fn scram_with_600k_iterations_logs_in_and_checks_the_server() {
        prepare_salted_password();
        let (port, received) = serve(|stream| scram_server(stream, SCRAM_ITERATIONS, false));
        let began = Instant::now();
        let session = connect(
            &node(port, SslMode::Disable, Some(SCRAM_PASSWORD)),
            began + Duration::from_secs(30),
        );
        assert!(session.is_ok(), "{:?}", session.err());
        assert!(began.elapsed() < Duration::from_secs(30));
        drop(session);
        assert_eq!(received.recv().unwrap(), message(b'X', b""));

        // A server that does not know the password cannot prove it does.
        let (port, _) = serve(|stream| scram_server(stream, SCRAM_ITERATIONS, true));
        let failure = connect(
            &node(port, SslMode::Disable, Some(SCRAM_PASSWORD)),
            soon(30_000),
        )
        .err()
        .unwrap();
        assert_eq!(
            failure,
            Failure::Auth("SCRAM: server not verified: wrong server signature".into())
        );

        // And the scripted server does check the proof: a wrong password is
        // refused (with PostgreSQL's default count, to spare a derivation).
        let (port, _) = serve(|stream| scram_server(stream, 4096, false));
        let failure = connect(&node(port, SslMode::Disable, Some("wrong")), soon(30_000))
            .err()
            .unwrap();
        assert_eq!(
            failure,
            Failure::Auth("password authentication failed for user \"u\"".into())
        );
    }

    // --- hostile servers ---------------------------------------------------

    /// About 900 KB of server text: many lines, carriage returns, escapes,
    /// and a marker far past what may be quoted.
    fn huge_text() -> String {
        let mut text = String::from("terminating connection\n");
        while text.len() < 900_000 {
            text.push_str("\r\n[ERROR] a forged log line\n\t\x1b[0m");
        }
        text.push_str("END-OF-TEXT");
        text
    }

    /// A FATAL `ErrorResponse` of ~900 KB (under the 1 MB message cap), its
    /// message and detail many lines long.
    fn huge_error(code: &str) -> Vec<u8> {
        let body = format!(
            "SFATAL\0VFATAL\0C{code}\0M{}\0Done\ntwo\0Hhint\r\n\0\0",
            huge_text()
        );
        message(b'E', body.as_bytes())
    }

    /// `failure` reads as one bounded line: no line breaks or control
    /// characters, one quote of server text (`one_line`'s bound) after the
    /// SQLSTATE and a short prefix, no password.
    fn assert_one_bounded_line(failure: &Failure) {
        let quote = net::one_line(&"x".repeat(10_000)).chars().count();
        let text = failure.to_string();
        assert!(!text.chars().any(char::is_control), "{text:?}");
        assert!(text.chars().count() <= quote + 30, "{text:?}");
        assert!(!text.contains("hunter2") && !text.contains("END-OF-TEXT"));
    }

    #[test]
    fn huge_multi_line_errors_are_quoted_on_one_bounded_line() {
        // Refusing the login, or the session after authentication.
        for (code, auth_first) in [("28P01", false), ("53300", true), ("3D000", true)] {
            let (port, _) = serve(move |stream| {
                read_startup(stream);
                let mut reply = if auth_first { auth(0, b"") } else { Vec::new() };
                reply.extend(huge_error(code));
                stream.write_all(&reply).unwrap();
            });
            let failure = connect(&node(port, SslMode::Disable, Some("hunter2")), soon(2000))
                .err()
                .unwrap();
            match code {
                "53300" => assert!(
                    matches!(&failure, Failure::ServerError(m) if m.starts_with("53300 terminating connection [ERROR]")),
                    "{failure:?}"
                ),
                _ => assert!(
                    matches!(&failure, Failure::Auth(m) if m.starts_with("terminating connection [ERROR]")),
                    "{failure:?}"
                ),
            }
            assert_one_bounded_line(&failure);
        }

        // The answer to a query; also with a SQLSTATE of 60 kB.
        for code in ["57P01".to_owned(), "57P01\n".repeat(10_000)] {
            let (port, _) = serve(move |stream| {
                greet(stream);
                read_message(stream);
                stream.write_all(&huge_error(&code)).unwrap();
            });
            let mut session = connect(&node(port, SslMode::Disable, None), soon(2000)).unwrap();
            let failure = session.observe(soon(2000)).err().unwrap();
            assert!(
                matches!(&failure, Failure::ServerError(m) if m.starts_with("57P01 terminating")),
                "{failure:?}"
            );
            assert_one_bounded_line(&failure);
        }

        // The check for new sessions.
        let (port, _) = serve(|stream| {
            read_startup(stream);
            stream.write_all(&huge_error("53300")).unwrap();
        });
        let failure = check_new_sessions(&node(port, SslMode::Disable, None), soon(2000))
            .err()
            .unwrap();
        assert!(matches!(failure, Failure::ServerError(_)), "{failure:?}");
        assert_one_bounded_line(&failure);
    }

    #[test]
    fn new_sessions_are_checked_without_logging_in() {
        let answering = |reply: Vec<u8>| {
            serve(move |stream| {
                let startup = read_startup(stream);
                assert!(String::from_utf8_lossy(&startup).contains("user\0u\0"));
                stream.write_all(&reply).unwrap();
            })
        };
        // Asked for a password (SASL, md5): the backend was forked.
        for request in [auth(10, b"SCRAM-SHA-256\0\0"), auth(5, &[1, 2, 3, 4])] {
            let (port, received) = answering(request);
            let server = node(port, SslMode::Disable, Some("hunter2"));
            assert_eq!(check_new_sessions(&server, soon(2000)), Ok(()));
            // Nothing more was sent: no password, no login.
            assert_eq!(received.recv().unwrap(), b"");
        }
        // Trust: logged in at once, and said goodbye.
        let (port, received) = answering(auth(0, b""));
        assert_eq!(
            check_new_sessions(&node(port, SslMode::Disable, None), soon(2000)),
            Ok(())
        );
        assert_eq!(received.recv().unwrap(), message(b'X', b""));

        // Refusals of who we are: the server takes sessions, not ours.
        for code in ["28P01", "28000", "3D000"] {
            let (port, _) = answering(error(code, "no pg_hba.conf entry"));
            assert_eq!(
                check_new_sessions(&node(port, SslMode::Disable, None), soon(2000)),
                Ok(()),
                "{code}"
            );
        }
        // Refusals of anyone: no new sessions.
        for code in ["53300", "57P03"] {
            let (port, _) = answering(error(code, "sorry, too many clients already"));
            let result = check_new_sessions(&node(port, SslMode::Disable, None), soon(2000));
            assert!(
                matches!(&result, Err(Failure::ServerError(s)) if s.contains(code)),
                "{result:?}"
            );
        }
        let (port, _) = answering(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec());
        assert!(matches!(
            check_new_sessions(&node(port, SslMode::Disable, None), soon(2000)),
            Err(Failure::BadHandshake(_))
        ));

        // A stuck postmaster: the kernel accepts, nobody answers.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let began = Instant::now();
        assert_eq!(
            check_new_sessions(&node(port, SslMode::Disable, None), soon(300)),
            Err(Failure::Timeout)
        );
        let took = began.elapsed();
        assert!(
            took >= Duration::from_millis(290) && took < Duration::from_millis(600),
            "{took:?}"
        );
        drop(listener);
    }

    /// Serves a login, then, once the client is idle (told on the returned
    /// sender), or at once with the greeting (`with_greeting`), writes
    /// `unasked`; then `then` runs.
    fn idle_then(
        unasked: Vec<u8>,
        with_greeting: bool,
        then: fn(&mut TcpStream),
    ) -> (u16, mpsc::Sender<()>) {
        let (idle, is_idle) = mpsc::channel();
        let (port, _) = serve(move |stream| {
            if with_greeting {
                let mut login = Vec::new();
                read_startup(stream);
                login.extend(auth(0, b""));
                login.extend(ready());
                login.extend(&unasked);
                stream.write_all(&login).unwrap();
            } else {
                greet(stream);
                is_idle.recv_timeout(Duration::from_secs(10)).unwrap();
                stream.write_all(&unasked).unwrap();
            }
            then(stream);
        });
        (port, idle)
    }

    #[test]
    fn an_idle_session_hears_notices_and_its_end() {
        // A notice and a parameter change: the session lives on.
        let mut notices = message(b'N', b"SWARNING\0C01000\0Mcheckpoints too frequent\0\0");
        notices.extend(message(b'S', b"in_hot_standby\0on\0"));
        let (port, idle) = idle_then(notices, false, |stream| {
            read_message(stream);
            let mut reply = message(b'T', &[0, 0]);
            reply.extend(data_row(&[Some("t"), Some("0"), None, Some("5"), None]));
            reply.extend(message(b'C', b"SELECT 1\0"));
            reply.extend(ready());
            stream.write_all(&reply).unwrap();
        });
        let mut session = connect(&node(port, SslMode::Disable, None), soon(2000)).unwrap();
        idle.send(()).unwrap();
        let began = Instant::now();
        assert_eq!(session.on_readable(soon(2000)), Ok(()));
        assert!(began.elapsed() < Duration::from_millis(500));
        assert_eq!(
            session.observe(soon(2000)).unwrap().role,
            Some(Role::Standby)
        );

        // pg_terminate_backend(): FATAL 57P01, then the server hangs up;
        // the error may also have come in with the last answer.
        let terminated = error(
            "57P01",
            "terminating connection due to administrator command",
        );
        for with_greeting in [false, true] {
            let (port, idle) = idle_then(terminated.clone(), with_greeting, |stream| {
                stream.shutdown(std::net::Shutdown::Write).unwrap();
            });
            let mut session = connect(&node(port, SslMode::Disable, None), soon(2000)).unwrap();
            // (Not waited for with the greeting.)
            let _ = idle.send(());
            let result = session.on_readable(soon(2000));
            assert!(
                matches!(&result, Err(Failure::ServerError(s)) if s.starts_with("57P01")),
                "with the greeting: {with_greeting}: {result:?}"
            );
            assert_eq!(
                result,
                Err(Failure::ServerError(
                    "57P01 terminating connection due to administrator command".into()
                ))
            );
        }

        // The server just hangs up.
        let (port, _) = serve(|stream| {
            greet(stream);
            stream.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut session = connect(&node(port, SslMode::Disable, None), soon(2000)).unwrap();
        assert_eq!(session.on_readable(soon(2000)), Err(Failure::Closed));

        // Anything else unasked is out of step.
        let (port, _) = serve(|stream| {
            greet(stream);
            stream.write_all(&ready()).unwrap();
        });
        let mut session = connect(&node(port, SslMode::Disable, None), soon(2000)).unwrap();
        assert!(matches!(
            session.on_readable(soon(2000)),
            Err(Failure::BadHandshake(_))
        ));
    }
}
