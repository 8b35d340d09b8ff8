//! Fuzzing builds only (`cargo afl` compiles with `--cfg fuzzing`): the fuzz
//! targets under `fuzz/` hand [`super::connect`] connected sockets whose
//! other end holds the fuzzed server bytes, so the engines' own code, from
//! connect to goodbye, reads them unchanged. Normal builds have none of it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::OwnedFd;

use socket2::Socket;

use super::Failure;

thread_local! {
    /// `None` until a target takes over connecting on this thread.
    static PREPARED: RefCell<Option<VecDeque<Socket>>> = const { RefCell::new(None) };
}

/// From now on, connects on this thread get these sockets in order, then
/// `Refused`: no connect reaches the network.
pub fn prepare(sockets: impl IntoIterator<Item = OwnedFd>) {
    let queue = sockets.into_iter().map(Socket::from).collect();
    PREPARED.with_borrow_mut(|prepared| *prepared = Some(queue));
}

/// The next prepared socket, `Refused` once they are used up; `None` if no
/// target took over connecting.
pub(super) fn next() -> Option<Result<Socket, Failure>> {
    PREPARED.with_borrow_mut(|prepared| {
        prepared
            .as_mut()
            .map(|queue| queue.pop_front().ok_or(Failure::Refused))
    })
}
