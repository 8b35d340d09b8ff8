//! Patroni's REST answers: the status code (the first two bytes) and the
//! JSON body (the rest) become an observation or a failure that says why in
//! one line, whatever a node's API sends.

use _core::engines::patroni::interpret;
use dbha_fuzz::check_failure;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let (status, body) = match data {
            [high, low, body @ ..] => (u16::from_be_bytes([*high, *low]), body),
            _ => (200, data),
        };
        if let Err(failure) = interpret(status, body) {
            check_failure(&failure);
        }
    });
}
