//! Waiting on a kept session's socket and a doorbell at once, so that a
//! probe thread notices the moment a server closes its session, not at the
//! next round.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Creates a doorbell: the [`Bell`] rings (becomes readable) whenever the
/// [`Ringer`] rings it, and hangs up when the ringer is dropped. A socket
/// pair, not a pipe: ringing a bell whose thread is gone must not raise
/// SIGPIPE (`MSG_NOSIGNAL` exists for sockets only).
pub fn doorbell() -> io::Result<(Ringer, Bell)> {
    let mut fds = [0; 2];
    let kind = libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    if unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded: both descriptors are open and now ours.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((Ringer(write), Bell(read)))
}

pub struct Ringer(OwnedFd);

impl Ringer {
    pub fn ring(&self) {
        // A full buffer already rings, a gone bell needs none: errors lose
        // nothing.
        // SAFETY: sends one byte from a live buffer on our own socket.
        let _ = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                [1u8].as_ptr().cast(),
                1,
                libc::MSG_NOSIGNAL,
            )
        };
    }
}

pub struct Bell(OwnedFd);

/// What woke a [`Bell::wait`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Woken {
    /// The bell rang (it is silenced again).
    pub rung: bool,
    /// The ringer is gone: time to stop.
    pub hung_up: bool,
    /// The watched socket is readable or closed.
    pub socket: bool,
}

impl Bell {
    /// Blocks until the bell rings, its ringer hangs up, or `socket` (if
    /// any) becomes readable or is closed by the peer.
    pub fn wait(&self, socket: Option<RawFd>) -> io::Result<Woken> {
        let mut fds = [
            libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: socket.unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: `fds` is a live array of two pollfd; poll ignores fd -1.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if ready >= 0 {
                break;
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
        let (bell, watched) = (fds[0].revents, fds[1].revents);
        let mut woken = Woken {
            socket: watched != 0,
            ..Woken::default()
        };
        if bell & libc::POLLIN != 0 {
            let mut buf = [0u8; 64];
            // SAFETY: reads into a live buffer of the given length.
            match unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } {
                0 => woken.hung_up = true,
                n if n > 0 => woken.rung = true,
                _ => {}
            }
        }
        if bell & (libc::POLLHUP | libc::POLLERR) != 0 && !woken.rung {
            woken.hung_up = true;
        }
        Ok(woken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::thread;
    use std::time::Duration;

    #[test]
    fn rings_hangs_up_and_sees_the_socket() {
        let (ringer, bell) = doorbell().unwrap();
        ringer.ring();
        ringer.ring();
        let woken = bell.wait(None).unwrap();
        assert!(woken.rung && !woken.hung_up && !woken.socket);

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            server.write_all(b"x").unwrap();
        });
        let woken = bell.wait(Some(client.as_raw_fd())).unwrap();
        assert_eq!(
            woken,
            Woken {
                socket: true,
                ..Woken::default()
            }
        );

        drop(ringer);
        assert!(bell.wait(None).unwrap().hung_up);
    }

    #[test]
    fn ringing_a_gone_bell_raises_no_sigpipe() {
        let (ringer, bell) = doorbell().unwrap();
        drop(bell);
        // SAFETY: sets a signal disposition; no handler runs.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
        for _ in 0..3 {
            ringer.ring();
        }
    }
}
