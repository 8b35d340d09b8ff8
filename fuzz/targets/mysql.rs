//! MySQL/MariaDB, everything that reads the server: the greeting (or the
//! error packet in its place), TLS after the SSL request, login with
//! `mysql_native_password` and `caching_sha2_password` (fast, full with a
//! cleartext password over TLS or a unix socket, full with the server's RSA
//! key), auth switches, and the role and replica-status queries' answers
//! (column definitions, rows, OK, ERR, EOF).
//!
//! Options byte: bits 0-1 ssl_mode (disabled, preferred, required,
//! allow); bit 2 a password; bit 3 a database; bits 4-5 what runs (session,
//! handshake probe, new-session check, session); bit 6 a unix socket.

use _core::engines::{Engine, Login, Secret, Server};
use _core::net::{Endpoint, SslMode, Tls};
use dbha_fuzz::{check, deadline, rounds, Script};

fn server(script: &Script) -> Server {
    let endpoint = if script.flag(6) {
        Endpoint::Unix("/nonexistent/mysqld.sock".into())
    } else {
        Endpoint::Tcp {
            host: "localhost".into(),
            port: 3306,
        }
    };
    let mode = [
        SslMode::Disable,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::Allow,
    ][usize::from(script.bits(0, 2))];
    Server {
        endpoint,
        login: Login {
            user: "dbha".into(),
            password: script.flag(2).then(|| Secret::new("hunter2")),
            database: if script.flag(3) {
                "shop".into()
            } else {
                String::new()
            },
            fallback_database: None,
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
        let engine = Engine::MySql;
        match script.bits(4, 2) {
            1 => check(engine.handshake(&server.endpoint, deadline()).as_ref()),
            2 => check(engine.check_new_sessions(&server, deadline()).as_ref()),
            _ => rounds(engine.open_session(&server, deadline())),
        }
    });
}
