//! Logging in to MySQL/MariaDB: the handshake response and the
//! `mysql_native_password` and `caching_sha2_password` exchanges, including
//! the RSA-encrypted password of a full authentication without TLS.

use std::iter;

use rsa::pkcs8::DecodePublicKey;
use rsa::{Oaep, RsaPublicKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::SubjectPublicKeyInfoDer;
use sha1::{Digest, Sha1};
use sha2::Sha256;

use super::packets::{
    Conn, Cursor, Greeting, ServerError, CLIENT_CONNECT_WITH_DB, CLIENT_PLUGIN_AUTH,
};
use crate::engines::Login;
use crate::net::Failure;

/// Understood by every MySQL and MariaDB version we can talk to.
const UTF8MB4_GENERAL_CI: u8 = 45;

pub const NATIVE_PASSWORD: &str = "mysql_native_password";
pub const CACHING_SHA2_PASSWORD: &str = "caching_sha2_password";

/// Refusals that are about the server (too many connections, host blocked,
/// shutting down, per-user limits), not about our credentials: no
/// authentication back-off for these.
const NOT_CREDENTIALS: [u16; 6] = [1040, 1041, 1053, 1129, 1203, 1226];

/// The fixed head of both the SSL request and the handshake response.
pub fn ssl_request(capabilities: u32) -> Vec<u8> {
    let mut packet = Vec::with_capacity(128);
    packet.extend_from_slice(&capabilities.to_le_bytes());
    packet.extend_from_slice(&(1u32 << 24).to_le_bytes()); // max packet size
    packet.push(UTF8MB4_GENERAL_CI);
    packet.extend_from_slice(&[0; 23]);
    packet
}

/// `HandshakeResponse41`.
pub fn handshake_response(
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

pub fn authenticate(
    conn: &mut Conn,
    greeting: &Greeting,
    capabilities: u32,
    login: &Login,
    secure: bool,
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
    conn.write_packet(&handshake_response(capabilities, login, &auth, &plugin)?)?;
    // OK, error, or a few rounds of plugin switches and extra data; never more.
    for _ in 0..6 {
        let reply = conn.read_packet()?;
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
                plugin = crate::net::one_line(&String::from_utf8_lossy(c.nul_terminated_or_rest()));
                scramble = c.0.strip_suffix(&[0]).unwrap_or(c.0).to_vec();
                conn.write_packet(&auth_response(&plugin, password, &scramble)?)?;
            }
            Some((0x01, more)) if plugin == CACHING_SHA2_PASSWORD => match more.first() {
                // Fast authentication succeeded (the server had our hash cached); OK follows.
                Some(0x03) => {}
                // Full authentication: the server needs the password itself.
                Some(0x04) => {
                    let answer = if secure {
                        password.iter().copied().chain(iter::once(0)).collect()
                    } else {
                        conn.write_packet(&[0x02])?;
                        let key = conn.read_packet()?;
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
                    conn.write_packet(&answer)?;
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

pub fn auth_response(plugin: &str, password: &[u8], scramble: &[u8]) -> Result<Vec<u8>, Failure> {
    match plugin {
        NATIVE_PASSWORD => Ok(native_password(password, scramble)),
        CACHING_SHA2_PASSWORD => Ok(caching_sha2_password(password, scramble)),
        other => Err(Failure::Auth(format!(
            "unsupported authentication plugin {other}"
        ))),
    }
}

/// SHA1(password) XOR SHA1(scramble + SHA1(SHA1(password))); nothing for no password.
pub fn native_password(password: &[u8], scramble: &[u8]) -> Vec<u8> {
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
pub fn caching_sha2_password(password: &[u8], scramble: &[u8]) -> Vec<u8> {
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
pub fn encrypt_password(password: &[u8], scramble: &[u8], pem: &[u8]) -> Result<Vec<u8>, Failure> {
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
