//! The sanitizer of server text (`one_line`) and the failure reasons that
//! quote it: whatever a server sends, a reason is one line of at most
//! `MAX_QUOTE` characters.

use _core::net::{one_line, Failure, MAX_QUOTE};
use dbha_fuzz::check_failure;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let text = String::from_utf8_lossy(data);
        let line = one_line(&text);
        assert!(line.chars().count() <= MAX_QUOTE + 1, "{line:?}");
        assert!(
            !line
                .chars()
                .any(|c| c.is_control() || (c.is_whitespace() && c != ' ')),
            "{line:?}"
        );
        assert!(!line.starts_with(' ') && !line.ends_with(' '), "{line:?}");
        assert!(!line.contains("  "), "{line:?}");
        for failure in [
            Failure::ServerError(format!("{line} {line}")),
            Failure::Auth(line.clone()),
            Failure::NoNewSessions(Box::new(Failure::BadHandshake(line))),
        ] {
            check_failure(&failure);
        }
    });
}
