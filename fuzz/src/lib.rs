//! What the fuzz targets share. A fuzz input is an options byte, then what
//! the server sends on each connection the code under test opens, split by
//! [`NEXT_CONNECTION`], and on each connection into turns by [`NEXT_TURN`].
//! Each connection is one end of a unix socket pair handed to
//! `net::connect` through the crate's fuzzing seam; the server's next turn
//! is written to the other end whenever the client is about to wait for
//! bytes that have not come, and end-of-file after the last. So the
//! engines' own code, from connect to goodbye, runs unchanged on one
//! thread, with no network and no waiting.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use _core::engines::Session;
use _core::net::fuzzing::{self, Prepared};
use _core::net::{Failure, MAX_QUOTE};

/// No probe needs more than a few MiB live at once, whatever the server
/// sends (the largest, a MySQL result of 1 MiB, is about 25 MiB parsed): an
/// allocation that would take the targets past this aborts, so afl-fuzz
/// saves the input as a crash. (run.py's `-m` limit backs this up.)
pub const MAX_LIVE_BYTES: usize = 64 << 20;

/// The system allocator, counting live bytes against [`MAX_LIVE_BYTES`].
pub struct Capped;

static LIVE: AtomicUsize = AtomicUsize::new(0);

impl Capped {
    fn reserve(size: usize) {
        if LIVE.fetch_add(size, Ordering::Relaxed).saturating_add(size) > MAX_LIVE_BYTES {
            // No allocation (so no panic, whose message allocates) in here.
            let message = b"allocation past MAX_LIVE_BYTES: unbounded allocation?\n";
            let _ = std::io::stderr().write_all(message);
            std::process::abort();
        }
    }
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::reserve(layout.size());
        // SAFETY: the caller's layout, as given.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::reserve(layout.size());
        // SAFETY: the caller's layout, as given.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: allocated by `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            Self::reserve(new_size - layout.size());
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        // SAFETY: allocated by `System` with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;

/// Splits the server's bytes between successive connections (a retry
/// without TLS, a fallback database).
pub const NEXT_CONNECTION: &[u8] = b"\n--next connection--\n";
/// Splits a connection's bytes into the server's turns: the next is sent
/// only once the client has read all before and waits for more (an answer
/// to a query, the TLS handshake after the client's TLS request).
pub const NEXT_TURN: &[u8] = b"\n--next turn--\n";
/// Connects past these are refused.
const MAX_CONNECTIONS: usize = 4;

/// Every step's deadline. The targets never wait on the network, so this
/// bounds only work, such as a SCRAM key derivation, well inside
/// afl-fuzz's `-t`.
pub const STEP: Duration = Duration::from_millis(50);

pub fn deadline() -> Instant {
    Instant::now() + STEP
}

/// One fuzz input taken apart.
pub struct Script<'a> {
    pub options: u8,
    pub connections: Vec<&'a [u8]>,
}

fn split<'a>(mut data: &'a [u8], separator: &[u8], most: usize) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    while parts.len() + 1 < most {
        let Some(at) = data.windows(separator.len()).position(|w| w == separator) else {
            break;
        };
        parts.push(&data[..at]);
        data = &data[at + separator.len()..];
    }
    parts.push(data);
    parts
}

impl<'a> Script<'a> {
    pub fn parse(data: &'a [u8]) -> Option<Self> {
        let (&options, rest) = data.split_first()?;
        Some(Self {
            options,
            connections: split(rest, NEXT_CONNECTION, MAX_CONNECTIONS),
        })
    }

    /// Option bits `shift..shift + width` as a number.
    pub fn bits(&self, shift: u32, width: u32) -> u8 {
        (self.options >> shift) & ((1 << width) - 1)
    }

    pub fn flag(&self, bit: u32) -> bool {
        self.bits(bit, 1) == 1
    }

    /// Makes the script's connections the next ones `net::connect` returns
    /// on this thread, each with its server playing its turns.
    pub fn serve(&self) {
        let mut prepared = Vec::new();
        for bytes in &self.connections {
            let Ok((client, server)) = UnixStream::pair() else {
                continue;
            };
            let _ = server.set_nonblocking(true);
            let mut server = Server {
                socket: server,
                turns: split(bytes, NEXT_TURN, usize::MAX)
                    .into_iter()
                    .map(<[u8]>::to_vec)
                    .collect(),
            };
            prepared.push(Prepared {
                client: client.into(),
                on_wait: Box::new(move || server.next_move()),
            });
        }
        fuzzing::prepare(prepared);
    }
}

/// The server end of a scripted connection.
struct Server {
    socket: UnixStream,
    turns: VecDeque<Vec<u8>>,
}

impl Server {
    /// Sends (more of) the next turn that has bytes, as much as the socket
    /// buffer takes; end-of-file once all are sent.
    fn next_move(&mut self) {
        while let Some(turn) = self.turns.front_mut() {
            if turn.is_empty() {
                self.turns.pop_front();
                continue;
            }
            match self.socket.write(turn) {
                Ok(sent) => {
                    turn.drain(..sent);
                    if turn.is_empty() {
                        self.turns.pop_front();
                    }
                    return;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // The client went away: it reads no more.
                Err(_) => break,
            }
        }
        let _ = self.socket.shutdown(Shutdown::Write);
    }
}

/// The invariants of every failure the probes report: a status line of at
/// most `MAX_QUOTE` characters that server text cannot break into lines.
pub fn check_failure(failure: &Failure) {
    let text = failure.to_string();
    assert!(
        text.chars().count() <= MAX_QUOTE,
        "a reason longer than {MAX_QUOTE} characters: {text:?}"
    );
    assert!(
        !text.chars().any(char::is_control),
        "a control character in a reason: {text:?}"
    );
    let _ = failure.kind();
}

/// Checks a probe's result: its failure, if any. With `DBHA_FUZZ_SHOW` set
/// in the environment, also prints it: to see how far a seed gets, run a
/// target outside afl-fuzz with the seed on standard input.
pub fn check<T: std::fmt::Debug>(result: Result<T, &Failure>) {
    if *SHOW.get_or_init(|| std::env::var_os("DBHA_FUZZ_SHOW").is_some()) {
        eprintln!("{result:?}");
    }
    if let Err(failure) = result {
        check_failure(failure);
    }
}

static SHOW: OnceLock<bool> = OnceLock::new();

/// A kept session's life as the `role` probe lives it: asked, woken by
/// what the server sends unasked, asked again; then dropped (its goodbye).
/// A failure ends it, as it does the real probe's.
pub fn rounds(opened: Result<Box<dyn Session>, Failure>) {
    check(opened.as_ref().map(|_| "logged in"));
    let Ok(mut session) = opened else {
        return;
    };
    let first = session.observe(deadline());
    check(first.as_ref());
    let Ok(observation) = first else {
        return;
    };
    let _ = observation.to_string();
    let woken = session.on_readable(deadline());
    check(woken.as_ref());
    if woken.is_ok() {
        check(session.observe(deadline()).as_ref());
    }
}
