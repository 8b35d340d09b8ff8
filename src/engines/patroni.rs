//! Patroni's REST API: which node holds the cluster's leader lock, as the
//! distributed store decided it. Not a database protocol: the cluster
//! manager's view, over one kept HTTP connection per node (ureq), answers
//! parsed with `serde_json`. It needs no database credentials.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value as Json;
use ureq::tls::{Certificate, RootCerts, TlsConfig};
use ureq::Agent;

use super::{Observation, Role, Secret};
use crate::net::{one_line, remaining, Failure};

/// The most of an answer read: Patroni's status document is about 1 kB.
const MAX_ANSWER: u64 = 64 * 1024;

/// How often a node promoting under the lock is asked again (Patroni's
/// promotion takes about 0.1 s).
const PROMOTING_POLL: Duration = Duration::from_millis(10);

/// One node's Patroni REST API.
#[derive(Clone, PartialEq, Eq)]
pub struct Api {
    /// `http://host:port` or `https://host:port`, nothing after.
    pub url: String,
    /// Basic authentication (Patroni's `restapi.authentication`).
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// CA certificates (PEM) for an `https` URL; the Mozilla roots (webpki-roots) without.
    pub ca_file: Option<PathBuf>,
}

impl fmt::Debug for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Api")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// Asks one node's Patroni who it is, over a kept connection.
pub struct Client {
    agent: Agent,
    leader_url: String,
    /// The `Authorization` header: a secret, never logged.
    authorization: Option<Secret>,
}

impl Client {
    pub fn new(api: &Api) -> Result<Self, Failure> {
        let mut tls = TlsConfig::builder()
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()));
        if let Some(path) = &api.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                Failure::Tls(format!(
                    "cannot read {}: {}",
                    path.display(),
                    one_line(&e.to_string())
                ))
            })?;
            let certificates = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<Vec<Certificate<'static>>, _>>()
                .map_err(|e| {
                    Failure::Tls(format!("{}: {}", path.display(), one_line(&e.to_string())))
                })?;
            if certificates.is_empty() {
                return Err(Failure::Tls(format!(
                    "no certificate in {}",
                    path.display()
                )));
            }
            tls = tls.root_certs(RootCerts::Specific(Arc::new(certificates)));
        }
        let agent: Agent = Agent::config_builder()
            .tls_config(tls.build())
            // A 503 (not the leader) is an answer, not an error.
            .http_status_as_error(false)
            .max_idle_connections_per_host(1)
            .max_idle_age(Duration::from_secs(60))
            .user_agent("django-dbha")
            .build()
            .into();
        let authorization = api.user.as_ref().map(|user| {
            let password = api.password.as_ref().map_or("", Secret::expose);
            let pair =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            Secret::new(format!("Basic {pair}"))
        });
        Ok(Self {
            agent,
            leader_url: format!("{}/leader", api.url),
            authorization,
        })
    }

    /// `GET /leader`: 200 only on the node holding the leader lock; either
    /// way the body is the node's status document (role, state, timeline,
    /// WAL positions). A node that has just taken the lock and is still
    /// promoting is asked again every `PROMOTING_POLL` until it is
    /// writable: the writes can move the moment it is. All within
    /// `deadline`.
    pub fn observe(&self, deadline: Instant) -> Result<Observation, Failure> {
        loop {
            let (status, body) = self.get_leader(deadline)?;
            let observation = interpret(status, &body);
            // A standby holding the lock: parsed again only then, rarely.
            let promoting = status == 200
                && matches!(&observation, Ok(o) if o.role == Some(Role::Standby))
                && is_promoting(&body);
            let next = Instant::now() + PROMOTING_POLL;
            if !promoting || next + PROMOTING_POLL >= deadline {
                return observation;
            }
            std::thread::sleep(PROMOTING_POLL);
        }
    }

    fn get_leader(&self, deadline: Instant) -> Result<(u16, Vec<u8>), Failure> {
        let mut request = self
            .agent
            .get(&self.leader_url)
            .config()
            .timeout_global(Some(remaining(deadline)?))
            .build();
        if let Some(authorization) = &self.authorization {
            request = request.header("Authorization", authorization.expose());
        }
        let mut response = request.call().map_err(failure)?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .read_to_vec()
            .map_err(failure)?;
        Ok((status, body))
    }
}

/// Whether a lock holder's status document says it is still a replica: the
/// moment between Patroni taking the lock and PostgreSQL's promotion.
/// (A standby cluster's leader is a `standby_leader`, for good.)
fn is_promoting(body: &[u8]) -> bool {
    serde_json::from_slice::<Json>(body)
        .is_ok_and(|document| document.get("role").and_then(Json::as_str) == Some("replica"))
}

fn failure(e: ureq::Error) -> Failure {
    match e {
        ureq::Error::Timeout(_) => Failure::Timeout,
        ureq::Error::Io(e) => e.into(),
        ureq::Error::HostNotFound => Failure::Dns("no address for the Patroni host".into()),
        ureq::Error::BodyExceedsLimit(_) => {
            Failure::BadHandshake(format!("Patroni's answer is over {MAX_ANSWER} bytes"))
        }
        ureq::Error::Tls(e) => Failure::Tls(one_line(e)),
        ureq::Error::Rustls(e) => Failure::Tls(one_line(&e.to_string())),
        other => Failure::Network(one_line(&format!("Patroni: {other}"))),
    }
}

/// What `GET /leader` said: the status code tells whether the node holds
/// the leader lock, the body what its PostgreSQL is doing.
pub fn interpret(status: u16, body: &[u8]) -> Result<Observation, Failure> {
    match status {
        200 | 503 => {}
        401 | 403 => {
            return Err(Failure::Auth(format!(
                "Patroni refused the REST API credentials (HTTP {status})"
            )))
        }
        _ => {
            return Err(Failure::ServerError(format!(
                "Patroni answered HTTP {status}"
            )))
        }
    }
    let document: Json = serde_json::from_slice(body).map_err(|e| {
        Failure::BadHandshake(one_line(&format!("Patroni's answer is not JSON: {e}")))
    })?;
    let text = |name: &str| document.get(name).and_then(Json::as_str).unwrap_or("");
    let state = text("state");
    if state != "running" {
        let state = if state.is_empty() { "unknown" } else { state };
        return Err(Failure::ServerError(one_line(&format!(
            "Patroni: PostgreSQL is {state}"
        ))));
    }
    let wal = |name: &str| {
        document
            .get("xlog")
            .and_then(|x| x.get(name))
            .and_then(Json::as_u64)
    };
    let timeline = document.get("timeline").and_then(Json::as_u64);
    let tagged = |tag: &str| {
        document
            .get("tags")
            .and_then(|tags| tags.get(tag))
            .and_then(Json::as_bool)
            == Some(true)
    };
    let holds_lock = status == 200;
    match (text("role"), holds_lock) {
        ("master" | "primary", true) => Ok(Observation {
            role: Some(Role::Primary),
            timeline,
            position: wal("location"),
            ..Observation::default()
        }),
        ("master" | "primary", false) => Err(Failure::Conflict(
            "Patroni: a primary without the leader lock".into(),
        )),
        // A standby cluster's leader, or a replica: its lag is measured from
        // its replay position against the writer's (the checker's log).
        ("replica" | "standby_leader" | "standby-leader", _) => Ok(Observation {
            role: Some(Role::Standby),
            // Tagged `noloadbalance`, Patroni's `/replica` refuses it: it
            // serves no reads here either (a standby's unknown lag).
            lag: (!tagged("noloadbalance")).then_some(Duration::ZERO),
            timeline,
            position: wal("replayed_location"),
            upstream_timeline: None,
        }),
        // Between states ("demoted", "uninitialized"): no role to route by.
        (role, _) => Err(Failure::ServerError(one_line(&format!(
            "Patroni: the node is {role:?}"
        )))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::thread;

    const LEADER: &str = r#"{"state": "running", "role": "master", "server_version": 150018,
        "xlog": {"location": 67109016}, "timeline": 3, "pause": false,
        "patroni": {"version": "3.0.2", "scope": "demo"}}"#;
    const REPLICA: &str = r#"{"state": "running", "role": "replica", "timeline": 3,
        "xlog": {"received_location": 67109016, "replayed_location": 67108960,
                 "replayed_timestamp": null, "paused": false}}"#;

    #[test]
    fn the_lock_holder_is_the_primary_and_replicas_are_standbys() {
        let leader = interpret(200, LEADER.as_bytes()).unwrap();
        assert_eq!(leader.role, Some(Role::Primary));
        assert_eq!(
            (leader.timeline, leader.position),
            (Some(3), Some(67_109_016))
        );
        let replica = interpret(503, REPLICA.as_bytes()).unwrap();
        assert_eq!(replica.role, Some(Role::Standby));
        assert_eq!(replica.position, Some(67_108_960));
        assert_eq!(replica.lag, Some(Duration::ZERO));
    }

    #[test]
    fn a_replica_tagged_noloadbalance_serves_no_reads() {
        let tagged = br#"{"state": "running", "role": "replica", "tags": {"noloadbalance": true}}"#;
        let replica = interpret(503, tagged).unwrap();
        assert_eq!((replica.role, replica.lag), (Some(Role::Standby), None));
    }

    #[test]
    fn anything_else_is_a_failure_that_says_why() {
        let no_lock = interpret(503, LEADER.as_bytes()).unwrap_err();
        assert_eq!(no_lock.kind(), "conflict");
        let stopped = br#"{"state": "stopped", "role": "replica"}"#;
        assert_eq!(
            interpret(503, stopped).unwrap_err().to_string(),
            "server error: Patroni: PostgreSQL is stopped"
        );
        assert_eq!(interpret(401, b"").unwrap_err().kind(), "auth");
        assert_eq!(interpret(500, b"").unwrap_err().kind(), "server_error");
        assert_eq!(
            interpret(200, b"<html>").unwrap_err().kind(),
            "bad_handshake"
        );
        assert_eq!(interpret(200, b"[1]").unwrap_err().kind(), "server_error");
        let demoted = br#"{"state": "running", "role": "demoted"}"#;
        assert_eq!(
            interpret(503, demoted).unwrap_err().to_string(),
            "server error: Patroni: the node is \"demoted\""
        );
        let huge = format!(r#"{{"state": "{}\n{}"}}"#, "x".repeat(5000), "y");
        let said = interpret(503, huge.as_bytes()).unwrap_err().to_string();
        assert!(
            said.chars().count() <= 300 && !said.contains('\n'),
            "{said}"
        );
    }

    /// A Patroni stand-in answering `GET /leader` with `status` and `body`
    /// on kept connections; counts the connections and keeps the last
    /// request's headers.
    fn patroni(
        status: u16,
        body: &'static str,
    ) -> (String, Arc<AtomicUsize>, Arc<parking_lot::Mutex<String>>) {
        answering(&[(status, body)])
    }

    /// Like `patroni`, answering each request with the next of `answers`
    /// (the last one again once they run out).
    fn answering(
        answers: &[(u16, &'static str)],
    ) -> (String, Arc<AtomicUsize>, Arc<parking_lot::Mutex<String>>) {
        let answers = Arc::new(parking_lot::Mutex::new(answers.to_vec()));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let headers = Arc::new(parking_lot::Mutex::new(String::new()));
        let (count, seen) = (Arc::clone(&connections), Arc::clone(&headers));
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                count.fetch_add(1, Ordering::SeqCst);
                let seen = Arc::clone(&seen);
                let answers = Arc::clone(&answers);
                thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    loop {
                        let mut request = String::new();
                        loop {
                            let mut line = String::new();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            request.push_str(&line);
                        }
                        *seen.lock() = request;
                        let (status, body) = {
                            let mut answers = answers.lock();
                            if answers.len() > 1 {
                                answers.remove(0)
                            } else {
                                answers[0]
                            }
                        };
                        let answer = format!(
                            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n\
                             Content-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if stream.write_all(answer.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, connections, headers)
    }

    fn api(url: String) -> Api {
        Api {
            url,
            user: None,
            password: None,
            ca_file: None,
        }
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(500)
    }

    #[test]
    fn one_kept_connection_answers_every_probe() {
        let (url, connections, headers) = patroni(200, LEADER);
        let client = Client::new(&api(url)).unwrap();
        for _ in 0..5 {
            assert_eq!(client.observe(soon()).unwrap().role, Some(Role::Primary));
        }
        assert_eq!(connections.load(Ordering::SeqCst), 1);
        assert!(headers.lock().starts_with("GET /leader HTTP/1.1"));
        assert!(!headers.lock().to_lowercase().contains("authorization"));
    }

    #[test]
    fn a_lock_holder_still_promoting_is_asked_again_until_writable() {
        let (url, connections, _) = answering(&[(200, REPLICA), (200, REPLICA), (200, LEADER)]);
        let client = Client::new(&api(url)).unwrap();
        let observation = client.observe(soon()).unwrap();
        assert_eq!(observation.role, Some(Role::Primary), "within one probe");
        assert_eq!(connections.load(Ordering::SeqCst), 1);

        // Not writable by the deadline: what it is then.
        let (url, _, _) = patroni(200, REPLICA);
        let client = Client::new(&api(url)).unwrap();
        let started = Instant::now();
        assert_eq!(client.observe(soon()).unwrap().role, Some(Role::Standby));
        assert!(started.elapsed() < Duration::from_millis(600));
        // A replica without the lock is asked once.
        let (url, connections, _) = answering(&[(503, REPLICA), (200, LEADER)]);
        let client = Client::new(&api(url)).unwrap();
        assert_eq!(client.observe(soon()).unwrap().role, Some(Role::Standby));
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn basic_authentication_is_sent_and_never_shown() {
        let (url, _, headers) = patroni(503, REPLICA);
        let secret = "pässwörd-7";
        let client = Client::new(&Api {
            user: Some("dbha".into()),
            password: Some(Secret::new(secret)),
            ..api(url)
        })
        .unwrap();
        assert_eq!(client.observe(soon()).unwrap().role, Some(Role::Standby));
        let expected = base64::engine::general_purpose::STANDARD.encode(format!("dbha:{secret}"));
        assert!(
            headers.lock().contains(&format!("Basic {expected}")),
            "{}",
            headers.lock()
        );
        let shown = format!(
            "{:?}",
            Api {
                user: Some("dbha".into()),
                password: Some(Secret::new(secret)),
                ..api(String::new())
            }
        );
        assert!(!shown.contains(secret), "{shown}");
    }

    #[test]
    fn a_silent_or_absent_patroni_fails_within_the_deadline() {
        // Accepted by the kernel, never answered: a hung Patroni.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = Client::new(&api(format!("http://{}", silent.local_addr().unwrap()))).unwrap();
        let started = Instant::now();
        assert_eq!(client.observe(soon()), Err(Failure::Timeout));
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );

        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = Client::new(&api(format!("http://127.0.0.1:{port}"))).unwrap();
        let refused = client.observe(soon()).unwrap_err();
        assert!(
            matches!(refused, Failure::Refused | Failure::Network(_)),
            "{refused:?}"
        );
    }

    #[test]
    fn an_endless_answer_is_cut_off() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let _ = stream.read(&mut [0; 1024]);
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
            let chunk = format!("4000\r\n{}\r\n", "x".repeat(0x4000));
            while stream.write_all(chunk.as_bytes()).is_ok() {}
        });
        let client = Client::new(&api(url)).unwrap();
        let cut = client
            .observe(Instant::now() + Duration::from_secs(5))
            .unwrap_err();
        assert_eq!(cut.kind(), "bad_handshake", "{cut:?}");
    }
}
