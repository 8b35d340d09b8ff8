//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL asks for it, without
//! channel binding.
//!
//! Our own rather than postgres-protocol's, which refuses more than 100,000
//! iterations: PostgreSQL 16 lets `scram_iterations` go far higher, and the
//! application (libpq) logs in fine there. Here the key derivation is bounded
//! by the probe's deadline instead, and by `MAX_ITERATIONS`. The derived key
//! is cached per password, salt and count, so a reconnecting probe pays for
//! it once.

use std::time::Instant;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::net::Failure;

type HmacSha256 = Hmac<Sha256>;

/// Far above any real server's count (PostgreSQL's default is 4096); a
/// server asking more is refused before any work.
pub const MAX_ITERATIONS: u32 = 10_000_000;
/// The client nonce of fuzzing builds (see `client_nonce`).
#[cfg(fuzzing)]
pub const FUZZING_NONCE: &str = "ZnV6emluZ25vbmNlZnV6emlu";
/// Iterations between two looks at the deadline.
const DEADLINE_STRIDE: u32 = 4096;

/// One SCRAM exchange, from the client-first message to the server's proof.
pub struct Scram {
    password: Vec<u8>,
    nonce: String,
    /// The client-first message without its GS2 header.
    client_first_bare: String,
    /// Set once the server's first message is answered.
    expected_server_signature: Option<[u8; 32]>,
}

impl Scram {
    /// Starts an exchange; returns it and the client-first message.
    pub fn start(password: &str) -> Result<(Self, Vec<u8>), Failure> {
        // PostgreSQL takes the user from the startup message: "n=" is empty.
        Ok(Self::with_nonce(password, "", client_nonce()?))
    }

    fn with_nonce(password: &str, user: &str, nonce: String) -> (Self, Vec<u8>) {
        let client_first_bare = format!("n={user},r={nonce}");
        let message = format!("n,,{client_first_bare}").into_bytes();
        let scram = Self {
            password: normalize(password),
            nonce,
            client_first_bare,
            expected_server_signature: None,
        };
        (scram, message)
    }

    /// Answers the server-first message with the client-final message.
    pub fn respond(&mut self, server_first: &[u8], deadline: Instant) -> Result<Vec<u8>, Failure> {
        let text = std::str::from_utf8(server_first).map_err(|_| malformed("not UTF-8"))?;
        let (mut nonce, mut salt, mut iterations) = (None, None, None);
        for attribute in text.split(',') {
            match attribute.split_once('=') {
                Some(("r", value)) => nonce = Some(value),
                Some(("s", value)) => salt = Some(value),
                Some(("i", value)) => iterations = Some(value),
                Some(("m", _)) => return Err(malformed("mandatory extension")),
                _ => {}
            }
        }
        let nonce = nonce.ok_or_else(|| malformed("no nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(Failure::Auth(
                "SCRAM: the server's nonce is not ours".into(),
            ));
        }
        let salt = STANDARD
            .decode(salt.ok_or_else(|| malformed("no salt"))?)
            .map_err(|_| malformed("salt is not base64"))?;
        let iterations: u32 = iterations
            .ok_or_else(|| malformed("no iteration count"))?
            .parse()
            .map_err(|_| malformed("bad iteration count"))?;
        if iterations == 0 || iterations > MAX_ITERATIONS {
            return Err(Failure::Auth(format!(
                "SCRAM: the server asks {iterations} iterations (at most {MAX_ITERATIONS} are done)"
            )));
        }
        let salted = salted_password(&self.password, &salt, iterations, deadline)?;
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        // "biws" is base64 of the GS2 header "n,,": no channel binding.
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature)
            .map(|(key, sig)| key ^ sig)
            .collect();
        let server_key = hmac(&salted, b"Server Key");
        self.expected_server_signature = Some(hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", STANDARD.encode(proof)).into_bytes())
    }

    /// Checks the server-final message: the server proves it knows the
    /// password too.
    pub fn finish(&self, server_final: &[u8]) -> Result<(), Failure> {
        let text = std::str::from_utf8(server_final).map_err(|_| malformed("not UTF-8"))?;
        if let Some(error) = text.strip_prefix("e=") {
            return Err(Failure::Auth(format!(
                "SCRAM: {}",
                crate::net::one_line(error)
            )));
        }
        let verifier = text
            .split(',')
            .find_map(|a| a.strip_prefix("v="))
            .ok_or_else(|| malformed("no server signature"))?;
        let verifier = STANDARD
            .decode(verifier)
            .map_err(|_| malformed("server signature is not base64"))?;
        match self.expected_server_signature {
            Some(expected) if verifier == expected => Ok(()),
            _ => Err(Failure::Auth(
                "SCRAM: server not verified: wrong server signature".into(),
            )),
        }
    }
}

#[cfg(not(fuzzing))]
fn client_nonce() -> Result<String, Failure> {
    let mut random = [0u8; 18];
    getrandom::getrandom(&mut random)
        .map_err(|e| Failure::Internal(format!("no random numbers for SCRAM: {e}")))?;
    Ok(STANDARD.encode(random))
}

/// A fuzzer cannot guess a random nonce: fuzzing builds use a known one, so
/// that fuzzed server answers get past the nonce check.
#[cfg(fuzzing)]
#[allow(clippy::unnecessary_wraps)]
fn client_nonce() -> Result<String, Failure> {
    Ok(FUZZING_NONCE.into())
}

fn malformed(what: &str) -> Failure {
    Failure::BadHandshake(format!("SCRAM: {what}"))
}

/// `SASLprep` when the password allows it, else the raw bytes (PostgreSQL
/// does the same: passwords need not be valid `SASLprep` input).
fn normalize(password: &str) -> Vec<u8> {
    stringprep::saslprep(password).map_or_else(
        |_| password.as_bytes().to_vec(),
        |prepared| prepared.into_owned().into_bytes(),
    )
}

fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
    keyed(key)
        .chain_update(message)
        .finalize()
        .into_bytes()
        .into()
}

fn keyed(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length: this cannot fail.
    <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

/// Recently derived keys: (SHA-256 of the password, salt, count, key).
type Derived = ([u8; 32], Vec<u8>, u32, [u8; 32]);
static DERIVED: Mutex<Vec<Derived>> = Mutex::new(Vec::new());
const DERIVED_KEPT: usize = 16;

/// PBKDF2-HMAC-SHA-256 of one block (RFC 5802's `Hi`), looking at the
/// deadline every `DEADLINE_STRIDE` iterations.
fn salted_password(
    password: &[u8],
    salt: &[u8],
    iterations: u32,
    deadline: Instant,
) -> Result<[u8; 32], Failure> {
    let digest: [u8; 32] = Sha256::digest(password).into();
    if let Some((.., key)) = DERIVED
        .lock()
        .iter()
        .find(|(d, s, i, _)| *d == digest && s == salt && *i == iterations)
    {
        return Ok(*key);
    }
    let prf = keyed(password);
    let mut block: [u8; 32] = prf
        .clone()
        .chain_update(salt)
        .chain_update(1u32.to_be_bytes())
        .finalize()
        .into_bytes()
        .into();
    let mut key = block;
    for i in 1..iterations {
        if i % DEADLINE_STRIDE == 0 && Instant::now() >= deadline {
            return Err(Failure::Timeout);
        }
        block = prf
            .clone()
            .chain_update(block)
            .finalize()
            .into_bytes()
            .into();
        for (k, b) in key.iter_mut().zip(block) {
            *k ^= b;
        }
    }
    let mut derived = DERIVED.lock();
    if derived.len() == DERIVED_KEPT {
        derived.remove(0);
    }
    derived.push((digest, salt.to_vec(), iterations, key));
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    /// RFC 7677's example exchange (user "user", password "pencil").
    #[test]
    fn rfc7677_test_vector() {
        let (mut scram, first) = Scram::with_nonce("pencil", "user", "rOprNGfwEbeRWgbNEkqO".into());
        assert_eq!(first, b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let server_first =
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let client_final = scram.respond(server_first, later()).unwrap();
        assert_eq!(
            String::from_utf8(client_final).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
             p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        scram
            .finish(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
    }

    #[test]
    fn rejects_what_is_not_a_proper_exchange() {
        let (mut scram, _) = Scram::with_nonce("pw", "", "abc".into());
        for bad in [
            &b"r=xyz,s=c2FsdA==,i=4096"[..],
            b"r=abc,s=c2FsdA==,i=4096",
            b"r=abcd,s=!!,i=4096",
            b"r=abcd,s=c2FsdA==",
            b"r=abcd,s=c2FsdA==,i=0",
            b"r=abcd,s=c2FsdA==,i=4294967295",
            b"\xff",
        ] {
            assert!(scram.respond(bad, later()).is_err(), "{bad:?}");
        }
        let (mut scram, _) = Scram::with_nonce("pw", "", "abc".into());
        scram.respond(b"r=abcd,s=c2FsdA==,i=1", later()).unwrap();
        assert!(matches!(scram.finish(b"v=AAAA"), Err(Failure::Auth(_))));
        assert!(
            matches!(scram.finish(b"e=invalid-proof"), Err(Failure::Auth(m)) if m.contains("invalid-proof"))
        );
    }

    #[test]
    fn many_iterations_are_done_or_stopped_by_the_deadline() {
        let (mut scram, _) = Scram::with_nonce("pw", "", "n".into());
        // 600,000 iterations (a PostgreSQL 16 `scram_iterations`) fit a deadline.
        let started = Instant::now();
        scram
            .respond(
                b"r=nn,s=c2FsdDE=,i=600000",
                started + Duration::from_secs(30),
            )
            .unwrap();
        // Cached: the same password, salt and count cost nothing next time.
        let again = Instant::now();
        let (mut scram, _) = Scram::with_nonce("pw", "", "n".into());
        scram
            .respond(b"r=nn,s=c2FsdDE=,i=600000", again + Duration::from_secs(30))
            .unwrap();
        assert!(again.elapsed() < Duration::from_millis(50));
        // A count past the deadline is a timeout, not a stall.
        let (mut scram, _) = Scram::with_nonce("pw", "", "n".into());
        let stopped = Instant::now();
        let result = scram.respond(
            b"r=nn,s=c2FsdDI=,i=9000000",
            stopped + Duration::from_millis(100),
        );
        assert_eq!(result, Err(Failure::Timeout));
        assert!(stopped.elapsed() < Duration::from_secs(1));
    }
}
