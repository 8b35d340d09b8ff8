//! Why a probe failed, in words short and safe enough for a status line.

use std::fmt;
use std::io;

use super::socket::PacketsLost;

/// Why a probe failed, short enough for a status line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    Dns(String),
    Refused,
    Timeout,
    /// A timeout the network caused: a TCP connect got no answer (SYNs lost
    /// or dropped), or a read timed out while TCP was resending. The host, or
    /// the path to it, is silent or losing packets; a hung server is not
    /// (its kernel answers and acknowledges for it).
    Unreachable,
    /// Two witnesses disagree: Patroni and the server itself on its role.
    Conflict(String),
    /// Any other connect or I/O error, as the OS words it.
    Network(String),
    /// The server closed the connection before it answered.
    Closed,
    /// The server answered something that is not its protocol.
    BadHandshake(String),
    /// The server answered with an error (e.g. too many connections).
    ServerError(String),
    /// The server refused our credentials (the message is the server's; it
    /// never contains the password).
    Auth(String),
    /// TLS could not be set up or the certificate did not verify.
    Tls(String),
    /// The kept session answers, but a fresh connection fails: the server
    /// takes no new sessions (a stuck postmaster, no free connection slot).
    NoNewSessions(Box<Failure>),
    /// A bug: the probe panicked. Reported rather than hidden.
    Internal(String),
}

impl Failure {
    /// Every [`Failure::kind`], in a fixed order: counters index by it.
    pub const KINDS: [&'static str; 13] = [
        "dns",
        "refused",
        "timeout",
        "network",
        "closed",
        "bad_handshake",
        "server_error",
        "auth",
        "tls",
        "no_new_sessions",
        "internal",
        "unreachable",
        "conflict",
    ];

    /// A short stable name for the kind of failure (a metrics label).
    pub fn kind(&self) -> &'static str {
        Self::KINDS[self.kind_index()]
    }

    /// The position of [`Failure::kind`] in [`Failure::KINDS`].
    pub fn kind_index(&self) -> usize {
        match self {
            Self::Dns(_) => 0,
            Self::Refused => 1,
            Self::Timeout => 2,
            Self::Network(_) => 3,
            Self::Closed => 4,
            Self::BadHandshake(_) => 5,
            Self::ServerError(_) => 6,
            Self::Auth(_) => 7,
            Self::Tls(_) => 8,
            Self::NoNewSessions(_) => 9,
            Self::Internal(_) => 10,
            Self::Unreachable => 11,
            Self::Conflict(_) => 12,
        }
    }
}

impl fmt::Display for Failure {
    /// The reason as a status line shows it: at most `MAX_QUOTE` characters
    /// in all, the prefix and every quote of server text together (an error
    /// quotes both a code and a message, each up to `MAX_QUOTE`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Self::Dns(e) => format!("DNS failure: {e}"),
            Self::Refused => return f.write_str("connection refused"),
            Self::Timeout => return f.write_str("timeout"),
            Self::Unreachable => {
                return f.write_str("timeout (the network lost packets, or the host is gone)")
            }
            Self::Network(e) => format!("network error: {e}"),
            Self::Closed => return f.write_str("closed by server before answering"),
            Self::BadHandshake(e) => format!("bad handshake: {e}"),
            Self::ServerError(e) => format!("server error: {e}"),
            Self::Auth(e) => format!("authentication failed: {e}"),
            Self::Tls(e) => format!("TLS: {e}"),
            Self::NoNewSessions(e) => {
                format!("new connections fail ({e}) while the open session answers")
            }
            Self::Internal(e) => format!("internal error: {e}"),
            Self::Conflict(e) => format!("conflict: {e}"),
        };
        if text.chars().count() <= MAX_QUOTE {
            return f.write_str(&text);
        }
        let cut = text
            .char_indices()
            .nth(MAX_QUOTE - 1)
            .map_or(text.len(), |(at, _)| at);
        write!(f, "{}…", &text[..cut])
    }
}

impl From<io::Error> for Failure {
    /// rustls reports its own errors (a certificate that does not verify, an
    /// alert) inside `io::Error`s; everything else is the OS's.
    fn from(e: io::Error) -> Self {
        if let Some(tls) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Self::Tls(one_line(&tls.to_string()));
        }
        let lost = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<PacketsLost>());
        if lost.is_some() {
            return Self::Unreachable;
        }
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Self::Refused,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Self::Timeout,
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Self::Closed,
            _ => Self::Network(one_line(&e.to_string())),
        }
    }
}

impl From<rustls::Error> for Failure {
    fn from(e: rustls::Error) -> Self {
        Self::Tls(one_line(&e.to_string()))
    }
}

/// Server text is quoted in status lines, exceptions and logs: at most this
/// many characters; and so is a whole reason, quotes and prefix together.
pub const MAX_QUOTE: usize = 300;

/// `text` as one bounded line: runs of whitespace and control characters
/// (newlines that would forge log lines, escapes, NULs) become one space,
/// and anything past `MAX_QUOTE` characters is cut with an ellipsis. It
/// looks at no more of `text` than it keeps, however long `text` is.
pub fn one_line(text: &str) -> String {
    let mut line = String::new();
    let mut kept = 0;
    let mut gap = false;
    for c in text.chars() {
        if c.is_whitespace() || c.is_control() {
            gap = !line.is_empty();
            continue;
        }
        if kept + usize::from(gap) + 1 > MAX_QUOTE {
            line.push('…');
            break;
        }
        if gap {
            line.push(' ');
            gap = false;
            kept += 1;
        }
        line.push(c);
        kept += 1;
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_quotes() {
        assert_eq!(one_line("a\n  b\tc "), "a b c");
        assert_eq!(
            one_line("\n\nx\r\n[fake] log line\x1b[0m\0"),
            "x [fake] log line [0m"
        );
        let long = "é".repeat(MAX_QUOTE + 10);
        assert_eq!(one_line(&long).chars().count(), MAX_QUOTE + 1);
        let huge = "line\n".repeat(200_000);
        let quoted = one_line(&huge);
        assert!(quoted.chars().count() <= MAX_QUOTE + 1);
        assert!(!quoted.contains('\n'));
    }

    #[test]
    fn a_reason_is_at_most_one_quote_long_in_all() {
        let quote = one_line(&"x\n".repeat(1000));
        for failure in [
            Failure::ServerError(format!("{quote} {quote}")),
            Failure::Auth(quote.clone()),
            Failure::NoNewSessions(Box::new(Failure::BadHandshake(quote.clone()))),
        ] {
            let text = failure.to_string();
            assert_eq!(text.chars().count(), MAX_QUOTE, "{text}");
            assert!(text.ends_with('…'), "{text}");
        }
        let short = Failure::ServerError("53300 sorry, too many clients already".into());
        assert_eq!(
            short.to_string(),
            "server error: 53300 sorry, too many clients already"
        );
        let exact = Failure::Auth("é".repeat(MAX_QUOTE - "authentication failed: ".len()));
        assert_eq!(exact.to_string().chars().count(), MAX_QUOTE);
        assert!(!exact.to_string().ends_with('…'));
    }

    #[test]
    fn kinds_are_stable_names() {
        assert_eq!(Failure::Timeout.kind(), "timeout");
        assert_eq!(Failure::Dns("x".into()).kind(), "dns");
        let no_new = Failure::NoNewSessions(Box::new(Failure::Refused));
        assert_eq!(no_new.kind(), "no_new_sessions");
        assert_eq!(Failure::Internal(String::new()).kind(), "internal");
        assert_eq!(Failure::Unreachable.kind(), "unreachable");
        assert_eq!(
            Failure::Unreachable.to_string(),
            "timeout (the network lost packets, or the host is gone)"
        );
    }

    #[test]
    fn io_errors_map_to_failures() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(Failure::from(refused), Failure::Refused);
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(Failure::from(reset), Failure::Closed);
        let tls = io::Error::new(io::ErrorKind::InvalidData, rustls::Error::DecryptError);
        assert!(matches!(Failure::from(tls), Failure::Tls(_)));
    }
}
