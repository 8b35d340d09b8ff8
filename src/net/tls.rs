//! The TLS client configuration for one server: rustls with libpq's
//! verification levels (MySQL's `ssl_mode` maps onto them).

use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::{Failure, SslMode, Tls};

/// What a session needs to start TLS with one server.
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
}

/// The TLS client for `host` under `tls`. The chain is verified with
/// `require` and stricter when a CA file is given (as libpq does), and is
/// required for `verify-ca` and `verify-full`; the host name only with
/// `verify-full`. `ca_setting` names the setting that gives the CA file.
pub fn client(tls: &Tls, host: &str, ca_setting: &str) -> Result<ClientTls, Failure> {
    let verifies = matches!(
        tls.mode,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
    );
    let roots = match &tls.root_cert {
        Some(path) if verifies => Some(load_roots(path, ca_setting)?),
        None if matches!(tls.mode, SslMode::VerifyCa | SslMode::VerifyFull) => {
            return Err(Failure::Tls(format!(
                "verifying the server certificate needs a CA file ({ca_setting})"
            )))
        }
        _ => None,
    };
    let check_name = tls.mode == SslMode::VerifyFull;
    let name = match ServerName::try_from(host.to_owned()) {
        Ok(name) => name,
        Err(_) if check_name => {
            return Err(Failure::Tls(format!(
                "cannot verify the host name {host:?}"
            )))
        }
        // Only used for SNI, which is then left out.
        Err(_) => ServerName::IpAddress(Ipv4Addr::UNSPECIFIED.into()),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let checks = Verifier {
        roots,
        check_name,
        algorithms: provider.signature_verification_algorithms,
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Failure::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(checks))
        .with_no_client_auth();
    Ok(ClientTls {
        config: Arc::new(config),
        name,
    })
}

struct Roots {
    store: RootCertStore,
    /// The certificates as given: a server certificate listed here is
    /// trusted as is (the self-signed set-up of the PostgreSQL docs, which
    /// webpki alone rejects as a CA certificate used by a server).
    listed: Vec<CertificateDer<'static>>,
}

fn load_roots(path: &Path, ca_setting: &str) -> Result<Roots, Failure> {
    let unreadable = |e: &dyn fmt::Display| {
        Failure::Tls(format!("cannot read {ca_setting} {}: {e}", path.display()))
    };
    let listed = CertificateDer::pem_file_iter(path)
        .map_err(|e| unreadable(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unreadable(&e))?;
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(listed.iter().cloned());
    if added == 0 {
        return Err(unreadable(&"no usable certificate"));
    }
    Ok(Roots { store, listed })
}

/// No verification without roots; else the chain, and the host name when
/// asked. Handshake signatures are checked in every mode.
struct Verifier {
    roots: Option<Roots>,
    check_name: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field(
                "roots",
                &self.roots.as_ref().map(|roots| roots.listed.len()),
            )
            .field("check_name", &self.check_name)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = ParsedCertificate::try_from(end_entity)?;
        if !roots
            .listed
            .iter()
            .any(|listed| listed.as_ref() == end_entity.as_ref())
        {
            verify_server_cert_signed_by_trust_anchor(
                &cert,
                &roots.store,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        if self.check_name {
            verify_server_name(&cert, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
