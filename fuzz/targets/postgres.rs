//! PostgreSQL, everything that reads the server: the SSLRequest answer (and
//! after an 'S' the TLS handshake), start-up, authentication (cleartext,
//! MD5, SCRAM-SHA-256), the role query's answer, unsolicited messages, the
//! `handshake` probe and the new-session check.
//!
//! Options byte: bits 0-1 sslmode (disable, allow, prefer, require); bit 2
//! a password; bit 3 a fallback database; bits 4-5 what runs (session,
//! handshake probe, new-session check, session); bit 6 a unix socket.

use _core::engines::{Engine, Login, Secret, Server};
use _core::net::{Endpoint, SslMode, Tls};
use dbha_fuzz::{check, deadline, rounds, Script};

fn server(script: &Script) -> Server {
    let endpoint = if script.flag(6) {
        Endpoint::Unix("/nonexistent/.s.PGSQL.5432".into())
    } else {
        Endpoint::Tcp {
            host: "localhost".into(),
            port: 5432,
        }
    };
    let mode = [
        SslMode::Disable,
        SslMode::Allow,
        SslMode::Prefer,
        SslMode::Require,
    ][usize::from(script.bits(0, 2))];
    Server {
        endpoint,
        login: Login {
            user: "dbha".into(),
            password: script.flag(2).then(|| Secret::new("pencil")),
            database: "postgres".into(),
            fallback_database: script.flag(3).then(|| "app".into()),
        },
        tls: Tls {
            mode,
            root_cert: None,
        },
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some(script) = Script::parse(data) else {
            return;
        };
        let server = server(&script);
        script.serve();
        let engine = Engine::PostgreSql;
        match script.bits(4, 2) {
            1 => check(engine.handshake(&server.endpoint, deadline()).as_ref()),
            2 => check(engine.check_new_sessions(&server, deadline()).as_ref()),
            _ => rounds(engine.open_session(&server, deadline())),
        }
    });
}
