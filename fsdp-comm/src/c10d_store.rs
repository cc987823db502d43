//! A client of PyTorch's c10d `TCPStore` (PyTorch 2.2 and later), the store torchrun's
//! elastic agent hosts at `MASTER_ADDR:MASTER_PORT` and tells its workers to join
//! (`TORCHELASTIC_USE_AGENT_STORE=True`).
//!
//! The wire format, as PyTorch's `TCPStore.cpp` and its backends speak it: a request is a
//! query-type byte and its fields, integers in the host's (little-endian) byte order,
//! strings and values as a `u64` length and the bytes. A connection opens with VALIDATE
//! and a magic number, which the server does not answer. SET sends no reply; GET on a
//! missing key is not defined (the server may close the connection), so a value is read
//! only after CHECK said it exists. Waiting is polling CHECK, so a timeout never leaves a
//! server-side wait behind on the connection. Every key gets the `/` prefix PyTorch's
//! `TCPStore` gives it.

use std::io::{self, Read, Write};
use std::net::TcpStream;

const VALIDATION_MAGIC: u32 = 0x3C85_F7CE;

/// The query types of the protocol (`QueryType` in `TCPStoreBackend.hpp`).
mod query {
    pub const VALIDATE: u8 = 0;
    pub const SET: u8 = 1;
    pub const COMPARE_SET: u8 = 2;
    pub const GET: u8 = 3;
    pub const ADD: u8 = 4;
    pub const CHECK: u8 = 5;
}

/// CHECK's answer when every key exists (`CheckResponseType::READY`).
const READY: u8 = 0;

/// The prefix PyTorch's `TCPStore` puts before every key.
const KEY_PREFIX: &str = "/";

fn put_bytes(request: &mut Vec<u8>, bytes: &[u8]) {
    request.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    request.extend_from_slice(bytes);
}

fn put_key(request: &mut Vec<u8>, key: &str) {
    put_bytes(request, format!("{KEY_PREFIX}{key}").as_bytes());
}

fn read_array<const N: usize>(stream: &mut TcpStream) -> io::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    stream.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Values larger than this are taken for a stream out of step, not read.
const MAX_VALUE: u64 = 1 << 30;

fn read_bytes(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let len = u64::from_le_bytes(read_array(stream)?);
    if len > MAX_VALUE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a {len}-byte value from the store")));
    }
    let mut value = vec![0u8; len as usize];
    stream.read_exact(&mut value)?;
    Ok(value)
}

/// The opening of every connection: VALIDATE with the magic number, in one write (a
/// server that sees it split may take its first byte for a whole command).
pub(super) fn validate(stream: &mut TcpStream) -> io::Result<()> {
    let mut request = vec![query::VALIDATE];
    request.extend_from_slice(&VALIDATION_MAGIC.to_le_bytes());
    stream.write_all(&request)
}

pub(super) fn set(stream: &mut TcpStream, key: &str, value: &[u8]) -> io::Result<()> {
    let mut request = vec![query::SET];
    put_key(&mut request, key);
    put_bytes(&mut request, value);
    stream.write_all(&request)
}

/// Whether `key` exists now.
pub(super) fn check(stream: &mut TcpStream, key: &str) -> io::Result<bool> {
    let mut request = vec![query::CHECK];
    request.extend_from_slice(&1u64.to_le_bytes());
    put_key(&mut request, key);
    stream.write_all(&request)?;
    Ok(read_array::<1>(stream)?[0] == READY)
}

/// The value of `key`, which must exist ([`check`]).
pub(super) fn get(stream: &mut TcpStream, key: &str) -> io::Result<Vec<u8>> {
    let mut request = vec![query::GET];
    put_key(&mut request, key);
    stream.write_all(&request)?;
    read_bytes(stream)
}

/// Adds `delta` to the counter at `key` (created at 0); returns the new value.
pub(super) fn add(stream: &mut TcpStream, key: &str, delta: i64) -> io::Result<i64> {
    let mut request = vec![query::ADD];
    put_key(&mut request, key);
    request.extend_from_slice(&delta.to_le_bytes());
    stream.write_all(&request)?;
    Ok(i64::from_le_bytes(read_array(stream)?))
}

/// Sets `key` to `value` unless it exists; returns the value it holds afterwards
/// (COMPARE_SET with an empty expected value).
pub(super) fn set_if_absent(stream: &mut TcpStream, key: &str, value: &[u8]) -> io::Result<Vec<u8>> {
    let mut request = vec![query::COMPARE_SET];
    put_key(&mut request, key);
    put_bytes(&mut request, b"");
    put_bytes(&mut request, value);
    stream.write_all(&request)?;
    read_bytes(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of a SET and a CHECK, written out by hand from the protocol.
    #[test]
    fn requests_are_framed_as_pytorch_frames_them() {
        let mut request = vec![query::SET];
        put_key(&mut request, "k");
        put_bytes(&mut request, b"ab");
        assert_eq!(request, [1, 2, 0, 0, 0, 0, 0, 0, 0, b'/', b'k', 2, 0, 0, 0, 0, 0, 0, 0, b'a', b'b']);
        let mut validate = vec![query::VALIDATE];
        validate.extend_from_slice(&VALIDATION_MAGIC.to_le_bytes());
        assert_eq!(validate, [0, 0xCE, 0xF7, 0x85, 0x3C]);
    }
}
