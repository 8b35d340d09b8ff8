//! One byte stream over a [`Wire`], plain or TLS: the single place rustls is
//! driven, so every engine gets the same deadlines and error mapping.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use rustls::{ClientConnection, StreamOwned};

use super::tls::ClientTls;
use super::{Failure, Wire};

pub enum Transport {
    Plain(Wire),
    Tls(Box<StreamOwned<ClientConnection, Wire>>),
}

impl Transport {
    /// Starts TLS on `wire` (after the engine's own TLS request was
    /// accepted) and completes the handshake by the wire's deadline.
    pub fn start_tls(wire: Wire, plan: &ClientTls) -> Result<Self, Failure> {
        let client = ClientConnection::new(Arc::clone(&plan.config), plan.name.clone())?;
        let mut stream = Box::new(StreamOwned::new(client, wire));
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock)?;
        }
        Ok(Self::Tls(stream))
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }

    pub fn deadline(&self) -> Instant {
        match self {
            Self::Plain(wire) => wire.deadline(),
            Self::Tls(stream) => stream.sock.deadline(),
        }
    }

    fn wire(&mut self) -> &mut Wire {
        match self {
            Self::Plain(wire) => wire,
            Self::Tls(stream) => &mut stream.sock,
        }
    }

    /// The deadline of the next reads and writes.
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.wire().set_deadline(deadline);
    }

    /// Sends all of `bytes`.
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        match self {
            Self::Plain(wire) => wire.send(bytes),
            Self::Tls(stream) => {
                stream.write_all(bytes)?;
                Ok(stream.flush()?)
            }
        }
    }

    /// Reads what has arrived into `buf` (at least one byte); a server that
    /// closed the connection is `Closed`.
    pub fn receive(&mut self, buf: &mut [u8]) -> Result<usize, Failure> {
        let read = match self {
            Self::Plain(wire) => wire.read(buf),
            Self::Tls(stream) => stream.read(buf),
        };
        match read? {
            0 => Err(Failure::Closed),
            n => Ok(n),
        }
    }

    /// Tells a TLS peer we are leaving (best effort, by `deadline`).
    pub fn close_notify(&mut self, deadline: Instant) {
        self.set_deadline(deadline);
        if let Self::Tls(stream) = self {
            stream.conn.send_close_notify();
            let _ = stream.flush();
        }
    }
}

impl AsRawFd for Transport {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Plain(wire) => wire.as_raw_fd(),
            Self::Tls(stream) => stream.sock.as_raw_fd(),
        }
    }
}
