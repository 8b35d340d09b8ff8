//! The TLS client as both engines start it after the server's yes ('S' to
//! PostgreSQL's SSLRequest, CLIENT_SSL from MySQL): every byte the server
//! sends goes to rustls and our certificate verifier, then one read and
//! write over the session and the goodbye.
//!
//! Options byte: bits 0-1 the verification (require without a CA file,
//! require with one, verify-ca, verify-full); bit 2 the host as an IP
//! address rather than a name.

use std::path::PathBuf;

use _core::net::{self, tls, Endpoint, SslMode, Tls, Transport};
use dbha_fuzz::{check, check_failure, deadline, Script};

/// The CA the seed corpus's server certificate is signed with (itself),
/// read where it is kept: the targets run where they were built.
fn ca_file() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/data/ca.pem"))
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some(script) = Script::parse(data) else {
            return;
        };
        let (mode, root_cert) = match script.bits(0, 2) {
            0 => (SslMode::Require, None),
            1 => (SslMode::Require, Some(ca_file())),
            2 => (SslMode::VerifyCa, Some(ca_file())),
            _ => (SslMode::VerifyFull, Some(ca_file())),
        };
        let host = if script.flag(2) {
            "127.0.0.1"
        } else {
            "localhost"
        };
        let plan = match tls::client(&Tls { mode, root_cert }, host, "ca") {
            Ok(plan) => plan,
            Err(failure) => return check_failure(&failure),
        };
        script.serve();
        let endpoint = Endpoint::Tcp {
            host: host.into(),
            port: 5432,
        };
        let Ok(wire) = net::connect(&endpoint, deadline()) else {
            return;
        };
        let started = Transport::start_tls(wire, &plan);
        check(started.as_ref().map(|_| "handshake done"));
        if let Ok(mut transport) = started {
            check(transport.send(b"ping").as_ref());
            let mut buf = [0u8; 4096];
            check(transport.receive(&mut buf).as_ref());
            transport.close_notify(deadline());
        }
    });
}
