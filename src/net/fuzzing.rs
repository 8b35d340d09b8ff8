//! Fuzzing builds only (`cargo afl` compiles with `--cfg fuzzing`): the fuzz
//! targets under `fuzz/` hand [`super::connect`] connected sockets whose
//! other end plays a scripted server, so the engines' own code, from connect
//! to goodbye, reads fuzzed server bytes unchanged. Normal builds have none
//! of it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use socket2::Socket;

use super::Failure;

/// A connection a fuzz target prepared: the client's end, and the server's
/// next move, made whenever the client is about to wait for bytes that have
/// not come (so a script's server speaks in turns, and no read ever waits).
pub struct Prepared {
    pub client: OwnedFd,
    pub on_wait: Box<dyn FnMut()>,
}

#[derive(Default)]
struct Script {
    queue: VecDeque<Prepared>,
    /// The connections handed out: their sockets and servers' next moves.
    live: Vec<(RawFd, Box<dyn FnMut()>)>,
}

thread_local! {
    /// `None` until a target takes over connecting on this thread.
    static SCRIPT: RefCell<Option<Script>> = const { RefCell::new(None) };
}

/// From now on, connects on this thread get these connections in order,
/// then `Refused`: no connect reaches the network. The previous ones' server
/// moves are dropped.
pub fn prepare(connections: impl IntoIterator<Item = Prepared>) {
    let script = Script {
        queue: connections.into_iter().collect(),
        live: Vec::new(),
    };
    // Dropped outside the borrow: their servers' sockets close.
    let previous = SCRIPT.with_borrow_mut(|current| current.replace(script));
    drop(previous);
}

/// The next prepared socket, `Refused` once they are used up; `None` if no
/// target took over connecting.
pub(super) fn next() -> Option<Result<Socket, Failure>> {
    SCRIPT.with_borrow_mut(|script| {
        let script = script.as_mut()?;
        Some(match script.queue.pop_front() {
            Some(Prepared { client, on_wait }) => {
                script.live.push((client.as_raw_fd(), on_wait));
                Ok(Socket::from(client))
            }
            None => Err(Failure::Refused),
        })
    })
}

/// Called before every read: if nothing waits on `socket`, the server
/// makes its next move.
pub(super) fn before_read(socket: &Socket) {
    let fd = socket.as_raw_fd();
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one live pollfd, without waiting.
    if unsafe { libc::poll(&raw mut poll, 1, 0) } != 0 {
        return;
    }
    SCRIPT.with_borrow_mut(|script| {
        let on_wait = script
            .as_mut()
            .and_then(|script| script.live.iter_mut().rev().find(|(live, _)| *live == fd));
        if let Some((_, on_wait)) = on_wait {
            on_wait();
        }
    });
}
