//! Connections and socket I/O bounded by one deadline: every connect, read
//! and write waits at most what is left of it.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::{Endpoint, Failure};

/// What is left of `deadline`; a `Timeout` once less than a millisecond is.
/// (A socket timeout that rounds down to zero would mean "wait forever".)
pub fn remaining(deadline: Instant) -> Result<Duration, Failure> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|left| *left >= Duration::from_millis(1))
        .ok_or(Failure::Timeout)
}

/// Connects to the endpoint. A host name is resolved now (DNS changes are
/// followed) and every address is tried, IPv6 and IPv4, sharing the time
/// left so that one black-holed address cannot use up the whole deadline.
/// Only name resolution can overrun the deadline (the C library gives no way
/// to bound it); the checker bounds that from outside.
pub fn connect(endpoint: &Endpoint, deadline: Instant) -> Result<Wire, Failure> {
    #[cfg(fuzzing)]
    if let Some(prepared) = super::fuzzing::next() {
        return prepared.map(|socket| Wire {
            socket,
            deadline,
            resent_at_write: None,
        });
    }
    let socket = match endpoint {
        Endpoint::Unix(path) => connect_unix(path, deadline)?,
        Endpoint::Tcp { host, port } => {
            let addresses: Vec<SocketAddr> = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|e| Failure::Dns(super::one_line(&e.to_string())))?
                .collect();
            if addresses.is_empty() {
                return Err(Failure::Dns(format!("no address for {host}")));
            }
            let mut last_failure = Failure::Timeout;
            let mut connected = None;
            for (tried, address) in addresses.iter().enumerate() {
                let left = remaining(deadline)?;
                let share = left / u32::try_from(addresses.len() - tried).unwrap_or(1);
                match connect_tcp(*address, share) {
                    Ok(socket) => {
                        connected = Some(socket);
                        break;
                    }
                    Err(failure) => last_failure = failure,
                }
            }
            connected.ok_or(last_failure)?
        }
    };
    #[cfg(target_vendor = "apple")]
    socket.set_nosigpipe(true)?;
    Ok(Wire {
        socket,
        deadline,
        resent_at_write: None,
    })
}

fn connect_tcp(address: SocketAddr, timeout: Duration) -> Result<Socket, Failure> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    socket
        .connect_timeout(&address.into(), timeout)
        .map_err(|e| match e.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Failure::Unreachable,
            _ => e.into(),
        })?;
    Ok(socket)
}

fn connect_unix(path: &Path, deadline: Instant) -> Result<Socket, Failure> {
    let address = SockAddr::unix(path)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    match socket.connect_timeout(&address, remaining(deadline)?) {
        Ok(()) => Ok(socket),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(Failure::Network(format!("no socket at {}", path.display())))
        }
        Err(e) => Err(e.into()),
    }
}

/// Blocks SIGPIPE in the calling thread. Our own writes never raise it
/// (`MSG_NOSIGNAL`), but a library's may (the HTTP client's, through TLS):
/// blocked, the signal stays pending on this thread instead of killing a
/// host process that restored its default action, and the write fails
/// with `EPIPE`. Probe threads call this first.
pub fn block_sigpipe() {
    // SAFETY: a signal set on the stack, initialised by `sigemptyset`, and
    // this thread's own mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
    }
}

/// A connected socket and the deadline of the step under way. As `Read` and
/// `Write` (which rustls drives too) every call waits at most what is left of
/// the deadline, and a write to a server that hung up never raises SIGPIPE.
pub struct Wire {
    socket: Socket,
    deadline: Instant,
    /// TCP's count of resent segments when the last write began: a read
    /// that times out after it grew met a lossy link, not a silent server.
    resent_at_write: Option<u32>,
}

/// A read timed out while the network was losing the packets: TCP resent
/// some since the exchange began.
/// A hung server never causes that: its kernel acknowledges everything.
/// It becomes [`Failure::Unreachable`], which, unlike a silent server, does
/// not confirm an application's failure report on its own.
#[derive(Debug)]
pub struct PacketsLost;

impl std::fmt::Display for PacketsLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("timed out with packets lost on the way")
    }
}

impl std::error::Error for PacketsLost {}

/// Writing to a socket the server has closed must not raise SIGPIPE in the
/// host process: Django runs under servers that do not ignore it.
#[cfg(any(
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd",
    target_os = "netbsd",
    target_os = "openbsd"
))]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
/// Elsewhere `connect` sets `SO_NOSIGPIPE` on the socket instead.
#[cfg(not(any(
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd",
    target_os = "netbsd",
    target_os = "openbsd"
)))]
const SEND_FLAGS: libc::c_int = 0;

impl Wire {
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = deadline;
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    fn time_left(&self) -> io::Result<Duration> {
        remaining(self.deadline).map_err(|_| io::ErrorKind::TimedOut.into())
    }

    /// Writes all of `bytes` by the deadline.
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        self.write_all(bytes).map_err(Failure::from)
    }

    /// Fills `buf` by the deadline; a server that closes first is `Closed`.
    pub fn receive_exact(&mut self, buf: &mut [u8]) -> Result<(), Failure> {
        self.read_exact(buf).map_err(Failure::from)
    }

    /// Whether TCP resent segments since the last write began. (Not data
    /// merely unacknowledged: a server that stops reading closes its
    /// window, and the kernel's window probes go unacknowledged too.) Never
    /// for a Unix socket.
    fn losing_packets(&self) -> bool {
        let Some(resent_before) = self.resent_at_write else {
            return false;
        };
        total_resent(&self.socket).is_some_and(|resent| resent > resent_before)
    }
}

/// TCP's count of the segments it resent on this connection; `None` for a
/// socket that is not TCP.
#[cfg(target_os = "linux")]
fn total_resent(socket: &Socket) -> Option<u32> {
    // SAFETY: `tcp_info` is plain integers, valid zeroed; the kernel fills
    // at most `length` bytes of it and says how many.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut length = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>()).ok()?;
    // SAFETY: a valid socket, and a buffer of `length` bytes.
    let status = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut length,
        )
    };
    (status == 0).then_some(info.tcpi_total_retrans)
}

#[cfg(not(target_os = "linux"))]
fn total_resent(_socket: &Socket) -> Option<u32> {
    None
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        #[cfg(fuzzing)]
        super::fuzzing::before_read(&self.socket);
        loop {
            let read = self
                .time_left()
                .and_then(|left| self.socket.set_read_timeout(Some(left)))
                .and_then(|()| self.socket.read(buf));
            match read {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                    ) && self.losing_packets() =>
                {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, PacketsLost));
                }
                result => return result,
            }
        }
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.resent_at_write = total_resent(&self.socket);
        loop {
            self.socket.set_write_timeout(Some(self.time_left()?))?;
            match self.socket.send_with_flags(buf, SEND_FLAGS) {
                Ok(0) if !buf.is_empty() => return Err(io::ErrorKind::WriteZero.into()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                result => return result,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Wire {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::unix::net::UnixListener;
    use std::thread;

    const SHORT: Duration = Duration::from_millis(300);

    fn tcp(host: &str, port: u16) -> Endpoint {
        Endpoint::Tcp {
            host: host.into(),
            port,
        }
    }

    fn soon() -> Instant {
        Instant::now() + SHORT
    }

    #[test]
    fn refused_and_listening() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(connect(&tcp("127.0.0.1", port), soon()).is_ok());
        drop(listener);
        assert_eq!(
            connect(&tcp("127.0.0.1", port), soon()).err(),
            Some(Failure::Refused)
        );
    }

    #[test]
    fn every_resolved_address_is_tried() {
        // "localhost" may resolve to ::1 first; the server is on IPv4 only.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(connect(&tcp("localhost", port), soon()).is_ok());
    }

    #[test]
    fn unresolvable_host_is_a_dns_failure() {
        // A name with an empty label is rejected by the resolver itself,
        // without asking any DNS server.
        let result = connect(&tcp("bad..name", 5432), soon());
        assert!(matches!(result, Err(Failure::Dns(_))), "{:?}", result.err());
    }

    #[test]
    fn reads_end_at_the_deadline_and_at_a_close() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // Accepted by the kernel from the backlog, never answered.
        let mut silent = connect(&tcp("127.0.0.1", port), soon()).unwrap();
        let started = Instant::now();
        assert_eq!(silent.receive_exact(&mut [0; 1]), Err(Failure::Timeout));
        let took = started.elapsed();
        assert!(took >= SHORT.saturating_sub(Duration::from_millis(20)) && took < SHORT * 3);

        // A question to a server that never answers: its kernel acknowledges
        // the bytes, so this is the server's silence, not the network's.
        let mut hung = connect(&tcp("127.0.0.1", port), soon()).unwrap();
        hung.send(b"SELECT 1").unwrap();
        assert_eq!(hung.receive_exact(&mut [0; 1]), Err(Failure::Timeout));
        // Nor is a server that stopped reading: its closed window leaves the
        // kernel's window probes unacknowledged, which is not loss.
        let mut full = connect(&tcp("127.0.0.1", port), soon()).unwrap();
        let flood = vec![0u8; 16 << 20];
        assert_eq!(full.send(&flood), Err(Failure::Timeout));
        full.set_deadline(soon());
        assert_eq!(full.receive_exact(&mut [0; 1]), Err(Failure::Timeout));

        let closing = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closing.local_addr().unwrap().port();
        thread::spawn(move || drop(closing.accept().unwrap()));
        let mut wire = connect(&tcp("127.0.0.1", port), soon()).unwrap();
        assert_eq!(wire.receive_exact(&mut [0; 1]), Err(Failure::Closed));
    }

    #[test]
    fn writes_to_a_closed_peer_fail_without_sigpipe() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut wire = connect(&tcp("127.0.0.1", port), soon()).unwrap();
        drop(listener.accept().unwrap());
        drop(listener);
        // The default disposition, as in a host process that does not ignore
        // SIGPIPE (Rust's test harness does).
        // SAFETY: sets a signal disposition; no handler runs.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
        wire.set_deadline(Instant::now() + Duration::from_secs(2));
        // The first write may be accepted locally; a later one gets EPIPE,
        // which with the default SIGPIPE disposition would kill the test.
        let failure = (0..100)
            .find_map(|_| wire.send(&vec![0; 65536]).err())
            .expect("writes to a closed peer keep failing");
        assert_eq!(failure, Failure::Closed);
    }

    #[test]
    fn unix_sockets() {
        let dir = std::env::temp_dir().join(format!("dbha-socket-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(".s.PGSQL.5432");
        let _ = std::fs::remove_file(&path);
        let _listener = UnixListener::bind(&path).unwrap();
        assert!(connect(&Endpoint::Unix(path.clone()), soon()).is_ok());
        let missing = connect(&Endpoint::Unix(dir.join("nope")), soon());
        assert!(matches!(missing, Err(Failure::Network(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
