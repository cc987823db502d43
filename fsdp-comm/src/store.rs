//! A small TCP key-value store through which separate processes find each other (the idea
//! of torch's `TCPStore`): rank 0 hosts it at `MASTER_ADDR:MASTER_PORT`, every rank
//! connects, and ranks publish and wait for keys (the NCCL unique id, barriers, counters).
//!
//! Wire format: every message is a frame, a 4-byte big-endian length and that many bytes. A
//! request starts with an op byte, a reply with a status byte. The server runs one thread
//! per connection, so a `get` waiting on the server ties up only its own connection; the
//! client keeps a pool of connections, so clones used from several threads do not queue
//! behind each other's waits. Every client read and write has a timeout, and a server that
//! goes away closes its sockets, so a client gets an error rather than a hang.
//!
//! A [`Store`] can also be a client of PyTorch's c10d `TCPStore` (the store torchrun's
//! agent hosts), through [`Store::connect_c10d`]: the same calls, in another wire format
//! ([`super::c10d_store`]), with every key inside a namespace of its own.

use super::c10d_store;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Sent first on every connection, so a client that reached some other service says so.
const MAGIC: &[u8] = b"candle-fsdp store v1";
/// What the network and the server may take on top of any wait the request asks for;
/// beyond it a silent server counts as dead.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest frame either side accepts: a stray client's bytes must not become a huge
/// allocation.
const MAX_FRAME: usize = 256 << 20;
/// How often the accept loop looks for new connections and for its stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(10);
/// How long a client waits between attempts to reach a server that is not up yet.
const CONNECT_RETRY: Duration = Duration::from_millis(50);
/// How long a stopping server lets its connection threads finish the replies in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest wait a request may ask the server for (a sanity cap, not a policy).
const MAX_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);

mod op {
    pub const HELLO: u8 = 0;
    pub const SET: u8 = 1;
    /// Wait until one of several keys exists; reply with the first present one.
    pub const WAIT: u8 = 2;
    pub const ADD: u8 = 3;
    pub const SET_IF_ABSENT: u8 = 4;
}

mod status {
    pub const OK: u8 = 0;
    /// A wait ended without any of its keys appearing.
    pub const NOT_YET: u8 = 1;
    /// Followed by a UTF-8 message.
    pub const FAILED: u8 = 2;
}

// ---------------------------------------------------------------------------------------
// Server

/// Hosts a store. Dropping it stops serving: no new connections, waiting requests are
/// answered with an error, replies in flight are still delivered, then connections close.
pub struct StoreServer {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    accept_thread: Option<JoinHandle<()>>,
}

struct Shared {
    data: Mutex<HashMap<String, Vec<u8>>>,
    /// Signalled whenever `data` changes and when the server stops.
    changed: Condvar,
    stopping: AtomicBool,
    /// Clones of the open connections (by id), to close them when the server stops.
    connections: Mutex<HashMap<u64, TcpStream>>,
    /// The number of live connection threads, so a stopping server can let them finish.
    active: Mutex<usize>,
    drained: Condvar,
}

impl StoreServer {
    /// Listens at `addr` ("host:port"; port 0 picks a free port) and serves until dropped.
    pub fn bind(addr: &str) -> Result<Self> {
        let error = |message: String| Error::Rendezvous { rank: 0, addr: addr.to_string(), message };
        let listener = TcpListener::bind(addr).map_err(|e| error(format!("could not listen: {e}")))?;
        let local_addr = listener.local_addr().map_err(|e| error(format!("could not listen: {e}")))?;
        // Non-blocking accepts let the loop notice the stop flag without a wake-up connection.
        listener.set_nonblocking(true).map_err(|e| error(format!("could not listen: {e}")))?;
        let shared = Arc::new(Shared {
            data: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            stopping: AtomicBool::new(false),
            connections: Mutex::new(HashMap::new()),
            active: Mutex::new(0),
            drained: Condvar::new(),
        });
        let accept_thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("fsdp-store-{}", local_addr.port()))
                .spawn(move || accept_loop(listener, shared))
                .map_err(|e| error(format!("could not start the server thread: {e}")))?
        };
        Ok(Self { shared, local_addr, accept_thread: Some(accept_thread) })
    }

    /// The address actually bound (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
        }
        // Wake the waiting requests (they answer "shutting down"), then end every
        // connection's next read; a reply being written still goes out.
        {
            let _data = lock(&self.shared.data);
            self.shared.changed.notify_all();
        }
        for stream in lock(&self.shared.connections).values() {
            let _ = stream.shutdown(Shutdown::Read);
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let mut active = lock(&self.shared.active);
        while *active > 0 {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            active = self.shared.drained.wait_timeout(active, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        drop(active);
        for stream in lock(&self.shared.connections).values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut next_id = 0u64;
    while !shared.stopping.load(Ordering::SeqCst) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            // Nothing pending, or a transient failure (out of file descriptors): back off.
            Err(_) => {
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
        };
        let id = next_id;
        next_id += 1;
        let Ok(registered) = stream.try_clone() else {
            continue;
        };
        if stream.set_nonblocking(false).is_err() {
            continue;
        }
        lock(&shared.connections).insert(id, registered);
        *lock(&shared.active) += 1;
        let thread_shared = shared.clone();
        let spawned = std::thread::Builder::new().name("fsdp-store-conn".into()).spawn(move || {
            serve_connection(&thread_shared, stream);
            lock(&thread_shared.connections).remove(&id);
            *lock(&thread_shared.active) -= 1;
            thread_shared.drained.notify_all();
        });
        if spawned.is_err() {
            lock(&shared.connections).remove(&id);
            *lock(&shared.active) -= 1;
        }
    }
}

fn serve_connection(shared: &Shared, mut stream: TcpStream) {
    // No read timeout: a client's pooled connection may sit idle between calls. Writes time
    // out so a client that stopped reading cannot hold the thread.
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_nodelay(true);
    while let Ok(request) = read_frame(&mut stream) {
        let reply = match handle_request(shared, &request) {
            Ok(reply) => reply,
            Err(message) => [&[status::FAILED][..], message.as_bytes()].concat(),
        };
        if write_frame(&mut stream, &reply).is_err() {
            return;
        }
    }
}

fn handle_request(shared: &Shared, request: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let mut fields = Fields(request);
    match fields.u8()? {
        op::HELLO => {
            if fields.rest() == MAGIC {
                Ok(vec![status::OK])
            } else {
                Err("protocol mismatch: the client is not a candle-fsdp store client of this version".into())
            }
        }
        op::SET => {
            let key = fields.string()?;
            let value = fields.rest().to_vec();
            lock(&shared.data).insert(key, value);
            shared.changed.notify_all();
            Ok(vec![status::OK])
        }
        op::WAIT => {
            let wait = Duration::from_millis(fields.u64()?).min(MAX_WAIT);
            let count = fields.u32()? as usize;
            let keys = (0..count).map(|_| fields.string()).collect::<std::result::Result<Vec<_>, _>>()?;
            let deadline = Instant::now() + wait;
            let mut data = lock(&shared.data);
            loop {
                // Keys are looked at before the stop flag: a wait its key already satisfies
                // is answered even while the server stops.
                if let Some((index, value)) = keys.iter().enumerate().find_map(|(i, k)| data.get(k).map(|v| (i, v))) {
                    let mut reply = vec![status::OK];
                    reply.extend_from_slice(&(index as u32).to_be_bytes());
                    reply.extend_from_slice(value);
                    return Ok(reply);
                }
                if shared.stopping.load(Ordering::SeqCst) {
                    return Err("the store is shutting down (rank 0 finished or stopped)".into());
                }
                let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
                    return Ok(vec![status::NOT_YET]);
                };
                data = shared.changed.wait_timeout(data, left).unwrap_or_else(|e| e.into_inner()).0;
            }
        }
        op::ADD => {
            let key = fields.string()?;
            let delta = fields.i64()?;
            let mut data = lock(&shared.data);
            let current = match data.get(&key) {
                None => 0,
                Some(bytes) => std::str::from_utf8(bytes)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .ok_or_else(|| format!("key `{key}` holds a value that is not an integer counter"))?,
            };
            let new = current.checked_add(delta).ok_or_else(|| format!("counter `{key}` overflowed"))?;
            // Counters are stored as decimal text, so a `get` of a counter reads naturally.
            data.insert(key, new.to_string().into_bytes());
            shared.changed.notify_all();
            let mut reply = vec![status::OK];
            reply.extend_from_slice(&new.to_be_bytes());
            Ok(reply)
        }
        op::SET_IF_ABSENT => {
            let key = fields.string()?;
            let value = fields.rest();
            let mut data = lock(&shared.data);
            let stored = data.entry(key).or_insert_with(|| value.to_vec()).clone();
            shared.changed.notify_all();
            Ok([&[status::OK][..], &stored].concat())
        }
        other => Err(format!("unknown request {other}")),
    }
}

/// Reads the fields of a request in order.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("malformed request: too short".into());
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn i64(&mut self) -> std::result::Result<i64, String> {
        Ok(i64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let len = self.u32()? as usize;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| "malformed request: a key is not UTF-8".to_string())
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

// ---------------------------------------------------------------------------------------
// Client

/// A client of a store. Clones share one pool of connections; it is `Send + Sync`.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Client>,
}

struct Client {
    addr: String,
    rank: usize,
    protocol: Protocol,
    /// Connections not in use. A call takes one (or opens one) and puts it back after a
    /// clean exchange; a connection that failed is dropped.
    idle: Mutex<Vec<TcpStream>>,
}

/// Which store the client speaks to.
enum Protocol {
    /// A [`StoreServer`].
    Native,
    /// PyTorch's c10d `TCPStore`; every key goes under `namespace`.
    C10d { namespace: String },
}

/// Why a connection could not be opened.
enum OpenError {
    /// Nothing answered (yet): worth retrying while the server may still be starting.
    Unreachable(String),
    /// Something answered that is not a store of this version.
    NotAStore(String),
}

impl Store {
    /// Connects, retrying until `timeout` (the server may not be up yet). `rank` is for messages.
    pub fn connect(addr: &str, rank: usize, timeout: Duration) -> Result<Self> {
        Self::connect_by(addr, rank, Instant::now() + timeout, timeout)
    }

    /// [`Store::connect`] with a deadline; `timeout` is the whole wait it belongs to, for the message.
    pub(crate) fn connect_by(addr: &str, rank: usize, deadline: Instant, timeout: Duration) -> Result<Self> {
        Self::connect_with(Protocol::Native, addr, rank, deadline, timeout)
    }

    /// Connects to PyTorch's c10d `TCPStore` at `addr` (torchrun's agent store), retrying
    /// until `deadline`; every key of this client lives under `namespace` (e.g. the run id
    /// and the restart attempt, so an attempt never reads the keys of the one before).
    pub(crate) fn connect_c10d(
        addr: &str,
        rank: usize,
        namespace: &str,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Self> {
        let protocol = Protocol::C10d { namespace: namespace.trim_end_matches('/').to_string() + "/" };
        Self::connect_with(protocol, addr, rank, deadline, timeout)
    }

    fn connect_with(protocol: Protocol, addr: &str, rank: usize, deadline: Instant, timeout: Duration) -> Result<Self> {
        let client = Client { addr: addr.to_string(), rank, protocol, idle: Mutex::new(Vec::new()) };
        let store = Store { inner: Arc::new(client) };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match store.open(left.clamp(Duration::from_millis(1), IO_TIMEOUT)) {
                Ok(stream) => {
                    lock(&store.inner.idle).push(stream);
                    return Ok(store);
                }
                Err(OpenError::NotAStore(message)) => return Err(store.error(message)),
                Err(OpenError::Unreachable(last)) => {
                    if Instant::now() + CONNECT_RETRY >= deadline {
                        return Err(store.error(format!(
                            "no rendezvous store answered within {timeout:?} (last attempt: {last}); is rank 0 \
                             running, with the same MASTER_ADDR and MASTER_PORT?"
                        )));
                    }
                    std::thread::sleep(CONNECT_RETRY);
                }
            }
        }
    }

    /// Stores `value` under `key`, replacing any previous value, and wakes the clients
    /// waiting for it.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        if let Some(key) = self.c10d_key(key) {
            return self.c10d_call(&format!("set `{key}`"), |s| c10d_store::set(s, &key, value));
        }
        let mut request = vec![op::SET];
        put_str(&mut request, key);
        request.extend_from_slice(value);
        self.call(&format!("set `{key}`"), &request, Duration::ZERO)?;
        Ok(())
    }

    /// Waits until `key` exists (at most `timeout`) and returns its value.
    pub fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        match self.wait_any(&[key], timeout)? {
            Some((_, value)) => Ok(value),
            None => Err(self.error(format!("key `{key}` did not appear within {timeout:?}"))),
        }
    }

    /// The value of `key` if it exists now, without waiting.
    pub fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.wait_any(&[key], Duration::ZERO)?.map(|(_, value)| value))
    }

    /// Waits until one of `keys` exists (at most `timeout`); returns which one (the first
    /// present in the list order) and its value, or `None` when the time ran out.
    pub fn wait_any(&self, keys: &[&str], timeout: Duration) -> Result<Option<(usize, Vec<u8>)>> {
        if matches!(self.inner.protocol, Protocol::C10d { .. }) {
            return self.c10d_wait_any(keys, timeout);
        }
        let wait = timeout.min(MAX_WAIT);
        let mut request = vec![op::WAIT];
        request.extend_from_slice(&(wait.as_millis() as u64).to_be_bytes());
        request.extend_from_slice(&(keys.len() as u32).to_be_bytes());
        for key in keys {
            put_str(&mut request, key);
        }
        let what = match keys {
            [key] => format!("get `{key}`"),
            _ => format!("wait for one of {}", keys.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")),
        };
        let reply = self.call(&what, &request, wait)?;
        match reply.split_first() {
            Some((&status::OK, rest)) if rest.len() >= 4 => {
                let index = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
                Ok(Some((index, rest[4..].to_vec())))
            }
            Some((&status::NOT_YET, _)) => Ok(None),
            _ => Err(self.error(format!("{what}: malformed reply from the store"))),
        }
    }

    /// Adds `delta` to the integer counter at `key` (created at 0) and returns the new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        if let Some(key) = self.c10d_key(key) {
            return self.c10d_call(&format!("add to `{key}`"), |s| c10d_store::add(s, &key, delta));
        }
        let mut request = vec![op::ADD];
        put_str(&mut request, key);
        request.extend_from_slice(&delta.to_be_bytes());
        let reply = self.call(&format!("add to `{key}`"), &request, Duration::ZERO)?;
        match reply.get(1..9) {
            Some(bytes) => Ok(i64::from_be_bytes(bytes.try_into().expect("8 bytes"))),
            None => Err(self.error(format!("add to `{key}`: malformed reply from the store"))),
        }
    }

    /// Stores `value` at `key` unless the key exists; returns the value the key holds
    /// afterwards (`value` when this call created it). Lets ranks claim a name atomically.
    pub fn set_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>> {
        if let Some(key) = self.c10d_key(key) {
            return self.c10d_call(&format!("set `{key}` if absent"), |s| c10d_store::set_if_absent(s, &key, value));
        }
        let mut request = vec![op::SET_IF_ABSENT];
        put_str(&mut request, key);
        request.extend_from_slice(value);
        let reply = self.call(&format!("set `{key}` if absent"), &request, Duration::ZERO)?;
        Ok(reply[1..].to_vec())
    }

    /// Every one of `world_size` callers of the same `name` returns once all have arrived;
    /// else a timeout error that says how many arrived. A name can be used again once a
    /// barrier on it completed (the callers of each round are counted separately).
    pub fn barrier(&self, name: &str, world_size: usize, timeout: Duration) -> Result<()> {
        if world_size == 0 {
            return Err(self.error(format!("barrier `{name}`: a world of 0 ranks")));
        }
        let ws = world_size as i64;
        let count_key = format!("barrier/{name}/arrived");
        let arrived = self.add(&count_key, 1)?;
        // Arrivals count on across rounds; round r holds arrivals r*ws+1 ..= (r+1)*ws.
        let round = (arrived - 1) / ws;
        let done_key = format!("barrier/{name}/{round}/done");
        if arrived % ws == 0 {
            self.set(&done_key, b"")?;
        }
        if self.wait_any(&[&done_key], timeout)?.is_some() {
            return Ok(());
        }
        let now = self.add(&count_key, 0)?;
        let here = (now - round * ws).clamp(0, ws);
        Err(self.error(format!("barrier `{name}`: only {here} of {world_size} ranks arrived within {timeout:?}")))
    }

    /// The rank this client was connected with (for messages).
    pub fn rank(&self) -> usize {
        self.inner.rank
    }

    /// The store's address, as this client was given it.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// An error naming this client's rank and the store's address.
    pub(crate) fn error(&self, message: String) -> Error {
        Error::Rendezvous { rank: self.inner.rank, addr: self.inner.addr.clone(), message }
    }

    /// `key` inside this client's namespace, under the c10d protocol (`None` otherwise).
    fn c10d_key(&self, key: &str) -> Option<String> {
        match &self.inner.protocol {
            Protocol::C10d { namespace } => Some(format!("{namespace}{key}")),
            Protocol::Native => None,
        }
    }

    /// A pooled connection, or a new one.
    fn connection(&self, what: &str) -> Result<TcpStream> {
        if let Some(stream) = lock(&self.inner.idle).pop() {
            return Ok(stream);
        }
        self.open(IO_TIMEOUT).map_err(|e| match e {
            OpenError::Unreachable(m) => {
                self.error(format!("{what}: could not reach the store ({m}); did rank 0 exit?"))
            }
            OpenError::NotAStore(m) => self.error(format!("{what}: {m}")),
        })
    }

    /// Opens a connection in this client's protocol.
    fn open(&self, timeout: Duration) -> std::result::Result<TcpStream, OpenError> {
        match self.inner.protocol {
            Protocol::Native => open(&self.inner.addr, timeout),
            Protocol::C10d { .. } => open_c10d(&self.inner.addr, timeout),
        }
    }

    /// Runs one c10d exchange on a pooled connection; a connection that failed is dropped.
    fn c10d_call<T>(&self, what: &str, exchange: impl FnOnce(&mut TcpStream) -> io::Result<T>) -> Result<T> {
        let mut stream = self.connection(what)?;
        let result =
            exchange(&mut stream).map_err(|e| self.error(format!("{what}: {}", describe_io(&e, IO_TIMEOUT))))?;
        lock(&self.inner.idle).push(stream);
        Ok(result)
    }

    /// [`Store::wait_any`] over c10d: polls CHECK (no wait stays pending on the server when
    /// the time runs out), then reads the first key present.
    fn c10d_wait_any(&self, keys: &[&str], timeout: Duration) -> Result<Option<(usize, Vec<u8>)>> {
        let deadline = Instant::now() + timeout.min(MAX_WAIT);
        let mut pause = Duration::from_millis(1);
        loop {
            for (index, key) in keys.iter().enumerate() {
                let key = self.c10d_key(key).expect("a c10d client");
                let what = format!("get `{key}`");
                let present = self.c10d_call(&what, |s| {
                    if c10d_store::check(s, &key)? {
                        c10d_store::get(s, &key).map(Some)
                    } else {
                        Ok(None)
                    }
                })?;
                if let Some(value) = present {
                    return Ok(Some((index, value)));
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Sends `request` and returns the reply (status byte first); a FAILED reply becomes an
    /// error. `wait` is how long the server may legitimately take before answering.
    fn call(&self, what: &str, request: &[u8], wait: Duration) -> Result<Vec<u8>> {
        if request.len() > MAX_FRAME {
            return Err(self.error(format!("{what}: the value is larger than the {MAX_FRAME}-byte limit")));
        }
        let mut stream = self.connection(what)?;
        let exchange = stream
            .set_read_timeout(Some(wait + IO_TIMEOUT))
            .and_then(|()| write_frame(&mut stream, request))
            .and_then(|()| read_frame(&mut stream));
        let reply = exchange.map_err(|e| self.error(format!("{what}: {}", describe_io(&e, wait + IO_TIMEOUT))))?;
        lock(&self.inner.idle).push(stream);
        match reply.split_first() {
            Some((&status::FAILED, message)) => {
                Err(self.error(format!("{what}: the store refused: {}", String::from_utf8_lossy(message))))
            }
            Some(_) => Ok(reply),
            None => Err(self.error(format!("{what}: empty reply from the store"))),
        }
    }
}

/// Opens one connection to `addr` and checks that a store answers there.
fn open(addr: &str, timeout: Duration) -> std::result::Result<TcpStream, OpenError> {
    let targets: Vec<SocketAddr> =
        addr.to_socket_addrs().map_err(|e| OpenError::Unreachable(format!("cannot resolve `{addr}`: {e}")))?.collect();
    let mut last = format!("`{addr}` resolves to no address");
    for target in targets {
        let mut stream = match TcpStream::connect_timeout(&target, timeout) {
            Ok(stream) => stream,
            Err(e) => {
                last = format!("{target}: {e}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let setup = stream
            .set_write_timeout(Some(IO_TIMEOUT))
            .and_then(|()| stream.set_read_timeout(Some(IO_TIMEOUT)))
            .and_then(|()| write_frame(&mut stream, &[&[op::HELLO][..], MAGIC].concat()));
        if let Err(e) = setup {
            last = format!("{target}: {e}");
            continue;
        }
        return match read_frame(&mut stream) {
            Ok(reply) if reply.first() == Some(&status::OK) => Ok(stream),
            // A server that is stopping (or just closed) is as good as absent.
            Err(e) if is_closed(&e) => {
                last = format!("{target}: the connection was closed during the handshake");
                continue;
            }
            _ => Err(OpenError::NotAStore(format!(
                "the service at {target} is not a candle-fsdp store (is something else using MASTER_PORT?)"
            ))),
        };
    }
    Err(OpenError::Unreachable(last))
}

/// Opens one connection to a c10d `TCPStore` at `addr` and sends its opening. The server
/// does not answer it, so a wrong service shows only at the first request.
fn open_c10d(addr: &str, timeout: Duration) -> std::result::Result<TcpStream, OpenError> {
    let targets: Vec<SocketAddr> =
        addr.to_socket_addrs().map_err(|e| OpenError::Unreachable(format!("cannot resolve `{addr}`: {e}")))?.collect();
    let mut last = format!("`{addr}` resolves to no address");
    for target in targets {
        let opened = TcpStream::connect_timeout(&target, timeout).and_then(|mut stream| {
            stream.set_nodelay(true)?;
            stream.set_write_timeout(Some(IO_TIMEOUT))?;
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            c10d_store::validate(&mut stream)?;
            Ok(stream)
        });
        match opened {
            Ok(stream) => return Ok(stream),
            Err(e) => last = format!("{target}: {e}"),
        }
    }
    Err(OpenError::Unreachable(last))
}

fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

fn describe_io(e: &io::Error, limit: Duration) -> String {
    if is_closed(e) {
        format!("the store closed the connection ({e}); did rank 0 exit?")
    } else if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
        format!("the store did not answer within {limit:?}")
    } else {
        format!("talking to the store failed: {e}")
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn write_frame(stream: &mut TcpStream, payload: &[u8]) -> io::Result<()> {
    // One buffer, one write: a frame is not split into a length and a body packet.
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    stream.write_all(&frame)?;
    stream.flush()
}

fn read_frame(stream: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a {len}-byte message is over the {MAX_FRAME}-byte limit"),
        ));
    }
    let mut payload = vec![0; len];
    stream.read_exact(&mut payload)?;
    Ok(payload)
}

/// Locks a mutex, ignoring poisoning: the guarded data stays consistent because no
/// critical section here can panic halfway through an update.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A value unique to this call across processes and threads, for telling apart two
/// claimants of the same name.
pub(crate) fn unique_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}-{}-{}", std::process::id(), nanos, COUNTER.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> (StoreServer, String) {
        let server = StoreServer::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().to_string();
        (server, addr)
    }

    #[test]
    fn set_get_add_and_set_if_absent() {
        let (_server, addr) = server();
        let store = Store::connect(&addr, 0, Duration::from_secs(5)).unwrap();
        store.set("a", b"hello").unwrap();
        assert_eq!(store.get("a", Duration::from_secs(1)).unwrap(), b"hello");
        assert_eq!(store.try_get("missing").unwrap(), None);
        assert_eq!(store.add("n", 5).unwrap(), 5);
        assert_eq!(store.add("n", -2).unwrap(), 3);
        assert_eq!(store.get("n", Duration::ZERO).unwrap(), b"3");
        assert_eq!(store.set_if_absent("c", b"first").unwrap(), b"first");
        assert_eq!(store.set_if_absent("c", b"second").unwrap(), b"first");
        let err = store.add("a", 1).unwrap_err().to_string();
        assert!(err.contains("not an integer"), "{err}");
    }

    #[test]
    fn waiting_get_does_not_block_other_clients_or_clones() {
        let (_server, addr) = server();
        let store = Store::connect(&addr, 1, Duration::from_secs(5)).unwrap();
        let waiter = {
            let store = store.clone();
            std::thread::spawn(move || store.get("late", Duration::from_secs(5)))
        };
        std::thread::sleep(Duration::from_millis(100));
        // The same client (another pooled connection) and another client still get through.
        let started = Instant::now();
        store.set("other", b"x").unwrap();
        let second = Store::connect(&addr, 2, Duration::from_secs(5)).unwrap();
        assert_eq!(second.get("other", Duration::from_secs(1)).unwrap(), b"x");
        assert!(started.elapsed() < Duration::from_secs(1));
        second.set("late", b"now").unwrap();
        assert_eq!(waiter.join().unwrap().unwrap(), b"now");
    }

    #[test]
    fn get_timeout_names_rank_address_and_key() {
        let (_server, addr) = server();
        let store = Store::connect(&addr, 2, Duration::from_secs(5)).unwrap();
        let err = store.get("nccl-id/world", Duration::from_millis(200)).unwrap_err().to_string();
        assert_eq!(err, format!("rank 2: rendezvous at {addr}: key `nccl-id/world` did not appear within 200ms"));
    }

    #[test]
    fn barrier_releases_all_and_is_reusable_and_counts_on_timeout() {
        let (_server, addr) = server();
        let stores: Vec<Store> =
            (0..3).map(|rank| Store::connect(&addr, rank, Duration::from_secs(5)).unwrap()).collect();
        for _round in 0..2 {
            std::thread::scope(|scope| {
                let handles: Vec<_> =
                    stores.iter().map(|s| scope.spawn(|| s.barrier("step", 3, Duration::from_secs(5)))).collect();
                for h in handles {
                    h.join().unwrap().unwrap();
                }
            });
        }
        let err = std::thread::scope(|scope| {
            let other = scope.spawn(|| stores[1].barrier("partial", 3, Duration::from_millis(300)));
            let mine = stores[0].barrier("partial", 3, Duration::from_millis(300));
            assert!(other.join().unwrap().is_err());
            mine.unwrap_err().to_string()
        });
        assert!(err.contains("barrier `partial`: only 2 of 3 ranks arrived within 300ms"), "{err}");
    }

    #[test]
    fn server_going_away_mid_call_is_an_error_not_a_hang() {
        let (server, addr) = server();
        let store = Store::connect(&addr, 1, Duration::from_secs(5)).unwrap();
        let waiter = {
            let store = store.clone();
            std::thread::spawn(move || store.get("never", Duration::from_secs(30)))
        };
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        drop(server);
        let err = waiter.join().unwrap().unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
        assert!(err.starts_with(&format!("rank 1: rendezvous at {addr}: get `never`")), "{err}");
        let err = store.set("k", b"v").unwrap_err().to_string();
        assert!(err.contains("rank 1") && err.contains("set `k`"), "{err}");
    }

    #[test]
    fn connect_retries_until_the_server_is_up_and_times_out_otherwise() {
        let port = {
            let probe = TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let addr = format!("127.0.0.1:{port}");
        let err = Store::connect(&addr, 3, Duration::from_millis(300)).err().unwrap().to_string();
        assert!(err.starts_with(&format!("rank 3: rendezvous at {addr}: no rendezvous store answered")), "{err}");
        let late = {
            let addr = addr.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                StoreServer::bind(&addr).unwrap()
            })
        };
        let store = Store::connect(&addr, 3, Duration::from_secs(5)).unwrap();
        let _server = late.join().unwrap();
        store.set("up", b"1").unwrap();
    }

    #[test]
    fn something_else_on_the_port_is_reported() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        let err = Store::connect(&addr, 0, Duration::from_secs(2)).err().unwrap().to_string();
        assert!(err.contains("not a candle-fsdp store"), "{err}");
    }
}
