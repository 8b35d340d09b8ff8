//! The MySQL client/server protocol's packets: framing over a transport,
//! the greeting, text result sets and error packets. Every length and count
//! a server sends is bounded before it is trusted.
//!
//! Built here rather than with `mysql_common`, which would add serde, regex
//! and more to every LTO build for the few packets a probe needs.

use std::fmt;
use std::time::Instant;

use crate::net::tls::ClientTls;
use crate::net::{one_line, Failure, Transport, Wire};

pub const CLIENT_LONG_PASSWORD: u32 = 1;
pub const CLIENT_CONNECT_WITH_DB: u32 = 1 << 3;
pub const CLIENT_PROTOCOL_41: u32 = 1 << 9;
pub const CLIENT_SSL: u32 = 1 << 11;
pub const CLIENT_TRANSACTIONS: u32 = 1 << 13;
pub const CLIENT_SECURE_CONNECTION: u32 = 1 << 15;
pub const CLIENT_PLUGIN_AUTH: u32 = 1 << 19;

pub const COM_QUIT: u8 = 0x01;
const COM_QUERY: u8 = 0x03;

/// A payload of this length continues in the next packet.
const MAX_PACKET: usize = 0xff_ffff;
/// Our replies are a few hundred bytes; anything far bigger is garbage, or
/// a server trying to make us allocate.
const MAX_REPLY: usize = 1 << 20;
const MAX_COLUMNS: usize = 4096;
/// No probe query returns more than a row per replication channel.
const MAX_ROWS: usize = 1024;
/// Greetings are small; anything bigger is not a MySQL server.
const MAX_GREETING: usize = 16 * 1024;

/// The connection: a transport, buffered input and the packet sequence number.
pub struct Conn {
    transport: Transport,
    input: Vec<u8>,
    consumed: usize,
    pub seq: u8,
}

impl Conn {
    pub fn new(wire: Wire) -> Self {
        Self {
            transport: Transport::Plain(wire),
            input: Vec::with_capacity(4096),
            consumed: 0,
            seq: 0,
        }
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    pub fn set_deadline(&mut self, deadline: Instant) {
        self.transport.set_deadline(deadline);
    }

    /// Switches to TLS (after the SSL request packet was sent).
    pub fn start_tls(self, plan: &ClientTls) -> Result<Self, Failure> {
        // Plaintext that arrived before the handshake would otherwise pass
        // as protected.
        if self.consumed < self.input.len() {
            return Err(Failure::BadHandshake(
                "data before the TLS handshake".into(),
            ));
        }
        let Transport::Plain(wire) = self.transport else {
            return Err(Failure::Internal("TLS started twice".into()));
        };
        Ok(Self {
            transport: Transport::start_tls(wire, plan)?,
            input: Vec::with_capacity(4096),
            consumed: 0,
            seq: self.seq,
        })
    }

    /// Reads one logical packet, joining the continuation packets of a long
    /// payload.
    pub fn read_packet(&mut self) -> Result<Vec<u8>, Failure> {
        let mut payload = Vec::new();
        loop {
            let mut header = [0u8; 4];
            self.read_exact(&mut header)?;
            let len =
                usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
            self.seq = header[3].wrapping_add(1);
            if payload.len() + len > MAX_REPLY {
                return Err(Failure::BadHandshake(format!(
                    "reply of over {MAX_REPLY} bytes"
                )));
            }
            let start = payload.len();
            payload.resize(start + len, 0);
            self.read_exact(&mut payload[start..])?;
            if len < MAX_PACKET {
                return Ok(payload);
            }
        }
    }

    /// The greeting the server sends on connect, or the error packet a
    /// refusing server sends instead.
    pub fn read_greeting(&mut self) -> Result<Greeting, Failure> {
        let mut header = [0u8; 4];
        self.read_exact(&mut header)?;
        let length =
            usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
        if length == 0 || length > MAX_GREETING {
            return Err(Failure::BadHandshake(format!("greeting of {length} bytes")));
        }
        self.seq = header[3].wrapping_add(1);
        let mut payload = vec![0u8; length];
        self.read_exact(&mut payload)?;
        parse_greeting(&payload)
    }

    pub fn write_packet(&mut self, payload: &[u8]) -> Result<(), Failure> {
        if payload.len() >= MAX_PACKET {
            return Err(Failure::Internal("packet too large".into()));
        }
        let mut packet = Vec::with_capacity(4 + payload.len());
        packet.extend_from_slice(&payload.len().to_le_bytes()[..3]);
        packet.push(self.seq);
        packet.extend_from_slice(payload);
        self.seq = self.seq.wrapping_add(1);
        self.transport.send(&packet)
    }

    /// Runs a text-protocol query by `deadline`; the inner error is the
    /// server's refusal, after which the connection is still usable.
    pub fn query(
        &mut self,
        sql: &str,
        deadline: Instant,
    ) -> Result<Result<ResultSet, ServerError>, Failure> {
        self.set_deadline(deadline);
        self.seq = 0;
        let mut command = Vec::with_capacity(1 + sql.len());
        command.push(COM_QUERY);
        command.extend_from_slice(sql.as_bytes());
        self.write_packet(&command)?;
        let first = self.read_packet()?;
        match first.first() {
            Some(0xff) => return Ok(Err(ServerError::parse(&first)?)),
            Some(0x00) => return Ok(Ok(ResultSet::default())),
            _ => {}
        }
        let count = Cursor(&first)
            .lenenc()?
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| (1..=MAX_COLUMNS).contains(n))
            .ok_or_else(|| Failure::BadHandshake("bad column count".into()))?;
        let mut columns = Vec::with_capacity(count);
        let mut size = first.len();
        for _ in 0..count {
            let packet = self.read_packet()?;
            size += packet.len();
            // Column definitions count too: 4096 of up to 1 MiB each would
            // otherwise all be kept, as fast as the server sends them.
            if size > MAX_REPLY {
                return Err(too_big());
            }
            columns.push(column_name(&packet)?);
        }
        // Without CLIENT_DEPRECATE_EOF an EOF packet ends the column
        // definitions and the rows.
        if !is_eof(&self.read_packet()?) {
            return Err(Failure::BadHandshake(
                "expected EOF after the columns".into(),
            ));
        }
        let mut rows = Vec::new();
        loop {
            let packet = self.read_packet()?;
            if is_eof(&packet) {
                return Ok(Ok(ResultSet { columns, rows }));
            }
            if packet.first() == Some(&0xff) {
                return Ok(Err(ServerError::parse(&packet)?));
            }
            size += packet.len();
            if rows.len() == MAX_ROWS || size > MAX_REPLY {
                return Err(too_big());
            }
            rows.push(parse_row(&packet, count)?);
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), Failure> {
        while self.input.len() - self.consumed < buf.len() {
            self.fill()?;
        }
        let end = self.consumed + buf.len();
        buf.copy_from_slice(&self.input[self.consumed..end]);
        self.consumed = end;
        Ok(())
    }

    /// Reads whatever has arrived (a whole result set, usually) in one go.
    fn fill(&mut self) -> Result<(), Failure> {
        self.input.drain(..self.consumed);
        self.consumed = 0;
        let mut chunk = [0u8; 4096];
        let n = self.transport.receive(&mut chunk)?;
        self.input.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Sends `COM_QUIT` and a TLS close (best effort, by `deadline`).
    pub fn quit(&mut self, deadline: Instant) {
        self.set_deadline(deadline);
        self.seq = 0;
        if self.write_packet(&[COM_QUIT]).is_ok() {
            self.transport.close_notify(deadline);
        }
    }
}

fn too_big() -> Failure {
    Failure::BadHandshake(format!(
        "a result of over {MAX_ROWS} rows or {MAX_REPLY} bytes"
    ))
}

#[derive(Debug, PartialEq, Eq)]
pub struct Greeting {
    pub version: String,
    pub capabilities: u32,
    pub scramble: Vec<u8>,
    pub plugin: String,
}

/// Parses the protocol 10 greeting, or the error packet a refusing server
/// sends instead (too many connections, host blocked).
pub fn parse_greeting(payload: &[u8]) -> Result<Greeting, Failure> {
    let body = match payload.split_first() {
        Some((0x0a, body)) => body,
        Some((0xff, _)) => {
            return Err(Failure::ServerError(
                ServerError::parse(payload)?.to_string(),
            ))
        }
        Some((other, _)) => {
            return Err(Failure::BadHandshake(format!(
                "expected a MySQL greeting, got first byte 0x{other:02x}"
            )))
        }
        None => return Err(Failure::BadHandshake("empty greeting".into())),
    };
    let mut c = Cursor(body);
    let version = one_line(&String::from_utf8_lossy(c.nul_terminated()?));
    c.take(4)?; // connection id
    let mut scramble = c.take(8)?.to_vec();
    c.take(1)?;
    let mut capabilities = u32::from(c.u16()?);
    let mut plugin = String::new();
    if !c.0.is_empty() {
        c.take(3)?; // character set, status
        capabilities |= u32::from(c.u16()?) << 16;
        let data_len = usize::from(c.u8()?);
        c.take(10)?;
        if capabilities & CLIENT_SECURE_CONNECTION != 0 {
            // At least 13 bytes, the last a NUL that is not part of the scramble.
            let part = c.take(data_len.saturating_sub(8).max(13).min(c.0.len()))?;
            scramble.extend_from_slice(part.strip_suffix(&[0]).unwrap_or(part));
        }
        if capabilities & CLIENT_PLUGIN_AUTH != 0 {
            plugin = one_line(&String::from_utf8_lossy(c.nul_terminated_or_rest()));
        }
    }
    Ok(Greeting {
        version,
        capabilities,
        scramble,
        plugin,
    })
}

/// A text-protocol result set: column names and rows of nullable values.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ResultSet {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
}

/// An error packet: the server refused what we asked. The message is one
/// bounded line (it reaches status lines, exceptions and logs).
#[derive(Debug, PartialEq, Eq)]
pub struct ServerError {
    pub code: u16,
    pub message: String,
}

impl ServerError {
    pub fn parse(payload: &[u8]) -> Result<Self, Failure> {
        let mut c = Cursor(payload);
        c.take(1)?;
        let code = c.u16()?;
        // Protocol 4.1 adds '#' and a five-character SQLSTATE (not in a
        // greeting's place).
        if c.0.first() == Some(&b'#') && c.0.len() >= 6 {
            c.take(6)?;
        }
        Ok(Self {
            code,
            message: one_line(&String::from_utf8_lossy(c.0)),
        })
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.message)
    }
}

pub fn is_eof(packet: &[u8]) -> bool {
    packet.first() == Some(&0xfe) && packet.len() < 9
}

/// The `name` of a column definition (after catalog, schema, table,
/// original table).
pub fn column_name(packet: &[u8]) -> Result<String, Failure> {
    let mut c = Cursor(packet);
    for _ in 0..4 {
        c.lenenc_bytes()?;
    }
    let name = c.lenenc_bytes()?.unwrap_or_default();
    Ok(String::from_utf8_lossy(name).into_owned())
}

pub fn parse_row(packet: &[u8], columns: usize) -> Result<Vec<Option<String>>, Failure> {
    let mut c = Cursor(packet);
    (0..columns)
        .map(|_| {
            Ok(c.lenenc_bytes()?
                .map(|v| String::from_utf8_lossy(v).into_owned()))
        })
        .collect()
}

/// Reads a packet front to back; running short is a protocol error, never a
/// panic.
pub struct Cursor<'a>(pub &'a [u8]);

impl<'a> Cursor<'a> {
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Failure> {
        if self.0.len() < n {
            return Err(Failure::BadHandshake("truncated packet".into()));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, Failure> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, Failure> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    /// A length-encoded integer; `None` is SQL NULL (0xfb).
    pub fn lenenc(&mut self) -> Result<Option<u64>, Failure> {
        let width = match self.u8()? {
            0xfb => return Ok(None),
            0xfc => 2,
            0xfd => 3,
            0xfe => 8,
            0xff => return Err(Failure::BadHandshake("bad length prefix".into())),
            small => return Ok(Some(u64::from(small))),
        };
        let mut bytes = [0u8; 8];
        bytes[..width].copy_from_slice(self.take(width)?);
        Ok(Some(u64::from_le_bytes(bytes)))
    }

    pub fn lenenc_bytes(&mut self) -> Result<Option<&'a [u8]>, Failure> {
        match self.lenenc()? {
            None => Ok(None),
            Some(n) => {
                let n = usize::try_from(n)
                    .map_err(|_| Failure::BadHandshake("truncated packet".into()))?;
                self.take(n).map(Some)
            }
        }
    }

    pub fn nul_terminated(&mut self) -> Result<&'a [u8], Failure> {
        let end = self
            .0
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| Failure::BadHandshake("truncated greeting".into()))?;
        let text = self.take(end)?;
        self.take(1)?;
        Ok(text)
    }

    /// Some servers omit the NUL after the last string of a packet.
    pub fn nul_terminated_or_rest(&mut self) -> &'a [u8] {
        let end = self.0.iter().position(|&b| b == 0);
        let text = &self.0[..end.unwrap_or(self.0.len())];
        self.0 = &self.0[end.map_or(self.0.len(), |e| e + 1)..];
        text
    }
}
