//! The multi-process CPU backend: ranks are separate processes (or threads) that exchange
//! tensors over TCP, like PyTorch's gloo.
//!
//! **Rendezvous.** [`TcpComm::connect`] listens on an ephemeral port of the interface this
//! host uses to reach the [`Store`], publishes `tcp/addr/{rank}` there, and builds a full
//! mesh: each rank connects to every higher rank and says hello with its rank and the world
//! size; the higher rank checks and answers. Accepting runs on its own thread while the
//! rank connects upwards, so a missing rank is named as missing by every rank rather than
//! stalling the chain. One store serves one mesh.
//!
//! **Messages.** Per peer, one writer thread drains a queue of outgoing frames (so issuing
//! never blocks, and two ranks sending large buffers to each other at once cannot
//! deadlock) and one reader thread files every incoming message in a mailbox keyed by
//! (group, call number, sender), guarded by a mutex and a condvar. Every message carries
//! its call's header (operation, element count, dtype, label): each rank checks its peers'
//! headers against its own and reports a disagreement as [`Error::CollectiveMismatch`] on
//! both sides, as the thread backend does. Tensors travel as the little-endian bytes of
//! their dtype.
//!
//! **Algorithms.** Direct exchange: every call sends one message to every other member of
//! the group, even when it carries no data (a broadcast's non-roots, a barrier), so that
//! every rank knows who joined and can check that all called the same thing. All-gather
//! sends the whole input; reduce-scatter sends chunk `j` to rank `j`; all-reduce sends the
//! whole input and every rank reduces all of them. Reductions add the contributions in rank
//! order with the same candle operations as the thread backend, so both backends give
//! bit-identical results. Traffic per rank is `(n - 1)·len` per call: fine for a few ranks
//! on one host or a LAN; a ring would be the next step for many ranks.
//!
//! **Failures.** Every wait has a deadline; a call that times out names the ranks whose
//! message never arrived. Any error of a collective on this rank (timeout, mismatch, a
//! peer gone) aborts the mesh: peers are sent the reason and fail their pending and future
//! calls with it. A peer that drops its communicator says goodbye first: calls of groups
//! containing it then fail with "rank N closed its connection", while groups without it go
//! on (a finished rank does not break the others). A connection that ends without a
//! goodbye or fails aborts every call.

use super::collectives::{checked_issue, group_members, Collectives, OpKind, Pending, ReduceOp, Work};
use super::store::Store;
use crate::error::{Error, Result};
use candle_core::{CpuStorage, DType, Device, Shape, Storage, Tensor};
use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What connection errors are about.
const MESH: &str = "the TCP mesh";
/// Opens every hello, so a stray connection is told apart from a rank.
const MAGIC: u64 = u64::from_le_bytes(*b"fsdp-tcp");
/// Socket buffering: small frames go out in one write, large payloads bypass it.
const IO_BUFFER: usize = 64 << 10;
/// A label or a group longer than this is a corrupt stream, not a real message.
const MAX_LIST: usize = 1 << 20;

// ---------------------------------------------------------------------------------------
// The communicator

/// One rank's handle to one group of a TCP mesh.
pub struct TcpComm {
    mesh: Arc<Mesh>,
    group: GroupId,
    /// This rank's position in `group`.
    rank: usize,
    next_call: AtomicU64,
}

/// Which group a message belongs to: its global ranks (ascending) and which group over
/// these ranks it is (0 for the world, then one per `new_group` over them, counted on each
/// member, as in the thread backend), so messages of different groups never mix.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct GroupId {
    ranks: Arc<[usize]>,
    instance: u64,
}

impl TcpComm {
    /// Joins the mesh of `world_size` ranks that meet through `store`, as rank `rank`.
    ///
    /// Every rank must call this with the same `world_size`. `timeout` bounds the
    /// rendezvous and every later wait for peers. Fails with [`Error::CollectiveTimeout`]
    /// naming the ranks that did not show up in time.
    pub fn connect(store: &Store, rank: usize, world_size: usize, timeout: Duration) -> Result<TcpComm> {
        if world_size == 0 {
            return Err(Error::EmptyWorld);
        }
        if rank >= world_size {
            return Err(Error::NoSuchRank { rank, world_size });
        }
        if cfg!(target_endian = "big") {
            // Payloads are read back with candle's native-order `from_raw_buffer`.
            return Err(Error::Rank { rank, message: "the TCP backend runs on little-endian hosts only".into() });
        }
        let streams = if world_size == 1 { Vec::new() } else { rendezvous(store, rank, world_size, timeout)? };
        let mesh = Mesh::start(rank, world_size, timeout, streams)?;
        let group = GroupId { ranks: (0..world_size).collect(), instance: 0 };
        Ok(TcpComm { mesh: Arc::new(mesh), group, rank, next_call: AtomicU64::new(0) })
    }

    fn aborted(&self, kind: OpKind, label: &str, reason: String) -> Error {
        Error::CollectiveAborted { rank: self.global_rank(), op: kind.to_string(), label: label.to_string(), reason }
    }

    fn issue(&self, kind: OpKind, input: Option<&Tensor>, label: &str) -> Result<Work> {
        let shared = &self.mesh.shared;
        let me = self.global_rank();
        let header = CallHeader {
            kind,
            len: input.map_or(0, |t| t.elem_count()),
            dtype: input.map(|t| t.dtype()),
            label: label.to_string(),
        };
        if let Some(dtype) = header.dtype {
            if dtype_code(Some(dtype)).is_none() {
                return Err(Error::CollectiveArgument {
                    rank: me,
                    op: kind.to_string(),
                    label: label.to_string(),
                    problem: format!("the TCP backend cannot send {dtype:?} tensors"),
                });
            }
        }
        // A departed peer is not checked here: it may have issued this call before it
        // left, and the wait finds out.
        if let Some(reason) = &shared.lock().aborted {
            return Err(self.aborted(kind, label, reason.clone()));
        }
        let call = self.next_call.fetch_add(1, Ordering::Relaxed);
        let sends_data = match kind {
            OpKind::Barrier => false,
            OpKind::Broadcast { root } => root == self.rank,
            _ => true,
        };
        let bytes = |t: &Tensor| le_bytes(t).map(Arc::new).map_err(|e| shared.fail(e.into()));
        // A reduce-scatter sends each peer only its chunk, so only those bytes are made;
        // the other calls send every peer the same bytes.
        let shared_payload = match input {
            Some(t) if sends_data && !matches!(kind, OpKind::ReduceScatter(_)) => Some(bytes(t)?),
            _ => None,
        };
        for (position, &peer) in self.group.ranks.iter().enumerate() {
            if peer == me {
                continue;
            }
            let payload = match (input, &shared_payload) {
                (_, Some(payload)) => payload.clone(),
                (Some(t), None) if sends_data => {
                    let chunk = t.elem_count() / self.size();
                    bytes(&t.narrow(0, position * chunk, chunk)?)?
                }
                _ => Arc::new(Vec::new()),
            };
            let head = data_head(&self.group, call, &header, payload.len());
            shared.send(peer, Outgoing::Data { head, payload });
        }
        Ok(Work::new(TcpPending {
            mesh: self.mesh.clone(),
            group: self.group.clone(),
            call,
            rank: self.rank,
            header,
            input: input.cloned(),
        }))
    }
}

impl Collectives for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.group.ranks.len()
    }

    fn global_rank(&self) -> usize {
        self.group.ranks[self.rank]
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn all_gather(&self, input: &Tensor, label: &str) -> Result<Work> {
        let kind = OpKind::AllGather;
        checked_issue(self, kind, input, label, || self.issue(kind, Some(input), label))
    }

    fn reduce_scatter(&self, input: &Tensor, op: ReduceOp, label: &str) -> Result<Work> {
        let kind = OpKind::ReduceScatter(op);
        checked_issue(self, kind, input, label, || self.issue(kind, Some(input), label))
    }

    fn all_reduce(&self, input: &Tensor, op: ReduceOp, label: &str) -> Result<Work> {
        let kind = OpKind::AllReduce(op);
        checked_issue(self, kind, input, label, || self.issue(kind, Some(input), label))
    }

    fn broadcast(&self, input: &Tensor, root: usize, label: &str) -> Result<Work> {
        let kind = OpKind::Broadcast { root };
        checked_issue(self, kind, input, label, || self.issue(kind, Some(input), label))
    }

    fn barrier(&self, label: &str) -> Result<()> {
        if self.size() > 1 {
            self.issue(OpKind::Barrier, None, label)?.wait()?;
        }
        Ok(())
    }

    /// Also sends `reason` to the peers, which fail their calls with it.
    fn abort(&self, reason: &str) {
        self.mesh.shared.abort(reason.to_string());
    }

    fn new_group(&self, global_ranks: &[usize]) -> Result<Box<dyn Collectives>> {
        let me = self.global_rank();
        let ranks = group_members(global_ranks, me, self.mesh.shared.world)?;
        let instance = {
            let mut state = self.mesh.shared.lock();
            let count = state.groups_created.entry(ranks.clone()).or_insert(0);
            *count += 1;
            *count
        };
        let rank = ranks.iter().position(|&r| r == me).expect("checked above");
        Ok(Box::new(TcpComm {
            mesh: self.mesh.clone(),
            group: GroupId { ranks, instance },
            rank,
            next_call: AtomicU64::new(0),
        }))
    }
}

// ---------------------------------------------------------------------------------------
// Waiting for a call

/// What a rank says it is calling; sent with every message so that ranks can check that
/// they agree.
#[derive(Clone, Debug)]
struct CallHeader {
    kind: OpKind,
    len: usize,
    dtype: Option<DType>,
    label: String,
}

impl CallHeader {
    /// The label is not compared: it only serves messages.
    fn agrees(&self, other: &CallHeader) -> bool {
        self.kind == other.kind && self.len == other.len && self.dtype == other.dtype
    }

    /// "all_reduce of 4 F32 elements", or "barrier" (as the thread backend says it).
    fn describe(&self) -> String {
        match self.dtype {
            Some(dtype) => format!("{} of {} {dtype:?} elements", self.kind, self.len),
            None => self.kind.to_string(),
        }
    }
}

/// A message from a peer: its header and its bytes.
struct Message {
    header: CallHeader,
    payload: Vec<u8>,
}

/// Where a message is filed: group, call number and the sender's global rank.
type MessageKey = (GroupId, u64, usize);

struct TcpPending {
    mesh: Arc<Mesh>,
    group: GroupId,
    call: u64,
    /// This rank's position in the group.
    rank: usize,
    header: CallHeader,
    input: Option<Tensor>,
}

impl TcpPending {
    fn global_rank(&self) -> usize {
        self.group.ranks[self.rank]
    }

    fn key(&self, sender: usize) -> MessageKey {
        (self.group.clone(), self.call, sender)
    }

    fn aborted(&self, reason: String) -> Error {
        Error::CollectiveAborted {
            rank: self.global_rank(),
            op: self.header.kind.to_string(),
            label: self.header.label.clone(),
            reason,
        }
    }

    /// Waits until every peer's message arrived; returns them by group position (`None`
    /// at this rank's own position).
    fn collect(&self) -> Result<Vec<Option<Message>>> {
        let shared = &self.mesh.shared;
        let me = self.global_rank();
        let deadline = Instant::now() + shared.timeout;
        let peers: Vec<usize> = self.group.ranks.iter().copied().filter(|&r| r != me).collect();
        let mut state = shared.lock();
        loop {
            // A disagreement wins over everything else, as in the thread backend: it is
            // the cause of the abort it triggers on the peers.
            for &peer in &peers {
                if let Some(message) = state.mailbox.get(&self.key(peer)) {
                    if !message.header.agrees(&self.header) {
                        let error = Error::CollectiveMismatch {
                            rank: me,
                            op: self.header.describe(),
                            label: self.header.label.clone(),
                            other: format!("rank {peer}'s {} for {}", message.header.describe(), message.header.label),
                        };
                        drop(state);
                        return Err(shared.fail(error));
                    }
                }
            }
            let missing: Vec<usize> =
                peers.iter().copied().filter(|&p| !state.mailbox.contains_key(&self.key(p))).collect();
            if missing.is_empty() {
                let messages = self
                    .group
                    .ranks
                    .iter()
                    .map(|&r| if r == me { None } else { state.mailbox.remove(&self.key(r)) })
                    .collect();
                return Ok(messages);
            }
            if let Some(reason) = &state.aborted {
                return Err(self.aborted(reason.clone()));
            }
            if let Some(&gone) = missing.iter().find(|&&p| state.departed[p]) {
                drop(state);
                return Err(shared.fail(self.aborted(format!("rank {gone} closed its connection"))));
            }
            let now = Instant::now();
            if now >= deadline {
                let error = Error::CollectiveTimeout {
                    rank: me,
                    op: self.header.kind.to_string(),
                    label: self.header.label.clone(),
                    timeout: shared.timeout,
                    missing,
                };
                drop(state);
                return Err(shared.fail(error));
            }
            state = shared.arrived.wait_timeout(state, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// A peer's contribution as a tensor of `len` elements of this call's dtype.
    fn decode(&self, sender: usize, message: &Message, len: usize, input: &Tensor) -> Result<Tensor> {
        let dtype = input.dtype();
        let expected = len * dtype.size_in_bytes();
        if message.payload.len() != expected {
            return Err(self.aborted(format!(
                "rank {sender} sent {} bytes, expected {expected} ({len} {dtype:?} elements)",
                message.payload.len()
            )));
        }
        Ok(Tensor::from_raw_buffer(&message.payload, dtype, &[len], input.device())?)
    }

    /// This rank's result from the contributions, computed as the thread backend does.
    fn combine(&self, messages: Vec<Option<Message>>) -> Result<Tensor> {
        let Some(input) = &self.input else {
            return Ok(Tensor::zeros(0, DType::F32, &Device::Cpu)?);
        };
        let n = self.group.ranks.len();
        let len = input.elem_count();
        // Every rank's contribution of `len` elements in rank order, this rank's own being
        // `mine`, shaped like `shape`; each message is decoded when its turn comes and let
        // go after, so only one decoded part lives at a time.
        let contributions = |messages: Vec<Option<Message>>, len: usize, mine: Tensor, shape: Shape| {
            messages.into_iter().zip(self.group.ranks.iter()).map(move |(message, &sender)| -> Result<Tensor> {
                match message {
                    None => Ok(mine.reshape(shape.clone())?),
                    Some(message) => Ok(self.decode(sender, &message, len, input)?.reshape(shape.clone())?),
                }
            })
        };
        let result = match self.header.kind {
            OpKind::AllGather => {
                let rows = input.dim(0)?;
                let mut dims = input.dims().to_vec();
                dims[0] = n * rows;
                let output = Tensor::zeros(dims, input.dtype(), input.device())?;
                for (position, part) in contributions(messages, len, input.clone(), input.shape().clone()).enumerate() {
                    output.slice_set(&part?, 0, position * rows)?;
                }
                output
            }
            OpKind::ReduceScatter(op) => {
                let chunk = len / n;
                let mine = input.narrow(0, self.rank * chunk, chunk)?;
                reduce(contributions(messages, chunk, mine, Shape::from(chunk)), n, op)?.contiguous()?
            }
            OpKind::AllReduce(op) => reduce(contributions(messages, len, input.clone(), input.shape().clone()), n, op)?,
            OpKind::Broadcast { root } if root == self.rank => input.copy()?,
            OpKind::Broadcast { root } => {
                let sender = self.group.ranks[root];
                let message = messages.into_iter().nth(root).flatten().expect("the root's message");
                self.decode(sender, &message, len, input)?.reshape(input.shape())?
            }
            OpKind::Barrier => Tensor::zeros(0, DType::F32, &Device::Cpu)?,
        };
        Ok(result)
    }
}

/// Sums the `n` parts in rank order, exactly as the thread backend's `reduce` (the same
/// candle operations in the same order), so both backends give bit-identical results.
fn reduce(mut parts: impl Iterator<Item = Result<Tensor>>, n: usize, op: ReduceOp) -> Result<Tensor> {
    let mut total = parts.next().expect("a group has a member")?;
    for part in parts {
        total = (total + part?)?;
    }
    Ok(match op {
        ReduceOp::Sum => total,
        ReduceOp::Avg => (total / n as f64)?,
    })
}

impl Pending for TcpPending {
    fn wait(self: Box<Self>) -> Result<Tensor> {
        let messages = self.collect()?;
        self.combine(messages).map_err(|error| self.mesh.shared.fail(error))
    }
}

// ---------------------------------------------------------------------------------------
// The mesh: shared state and the threads that move bytes

/// The connections of one rank; dropped with its last communicator (and pending work).
struct Mesh {
    shared: Arc<Shared>,
    writers: Vec<JoinHandle<()>>,
}

/// What the communicators and the reader and writer threads share.
struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    /// Signalled on every arrival, departure and abort.
    arrived: Condvar,
    /// Each peer's writer queue, by global rank (`None` for this rank).
    outboxes: Vec<Option<Sender<Outgoing>>>,
}

struct State {
    mailbox: HashMap<MessageKey, Message>,
    aborted: Option<String>,
    /// By global rank: the peer said goodbye (dropped its communicator).
    departed: Vec<bool>,
    /// How many groups over each rank set this rank has created.
    groups_created: HashMap<Arc<[usize]>, u64>,
    /// This rank's mesh is being dropped: connection errors are expected now.
    closing: bool,
}

/// A frame for a writer thread.
enum Outgoing {
    /// A collective's message: its encoded head, then the payload (shared by the peers
    /// that get the same bytes).
    Data {
        head: Vec<u8>,
        payload: Arc<Vec<u8>>,
    },
    Abort(String),
    Bye,
}

/// A frame read from a peer.
enum Incoming {
    Data(GroupId, u64, Message),
    Abort(String),
    Bye,
}

impl Mesh {
    /// Starts a reader and a writer thread per peer; `streams` is indexed by global rank.
    fn start(me: usize, world: usize, timeout: Duration, streams: Vec<Option<TcpStream>>) -> Result<Mesh> {
        let io_error = |e: io::Error| Error::CollectiveAborted {
            rank: me,
            op: "connect".into(),
            label: MESH.into(),
            reason: format!("could not start the connection threads: {e}"),
        };
        let mut outboxes = Vec::with_capacity(world);
        let mut inboxes = Vec::with_capacity(world);
        for peer in 0..world {
            if peer == me {
                outboxes.push(None);
                inboxes.push(None);
            } else {
                let (sender, receiver) = channel();
                outboxes.push(Some(sender));
                inboxes.push(Some(receiver));
            }
        }
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(State {
                mailbox: HashMap::new(),
                aborted: None,
                departed: vec![false; world],
                groups_created: HashMap::new(),
                closing: false,
            }),
            arrived: Condvar::new(),
            outboxes,
        });
        let mut mesh = Mesh { shared: shared.clone(), writers: Vec::new() };
        for (peer, (stream, inbox)) in streams.into_iter().zip(inboxes).enumerate() {
            let (Some(stream), Some(inbox)) = (stream, inbox) else {
                continue;
            };
            // Idle time between collectives is normal, so reads never time out; a write
            // that makes no progress for a whole timeout means the peer is stuck.
            stream.set_read_timeout(None).map_err(io_error)?;
            stream.set_write_timeout(Some(timeout)).map_err(io_error)?;
            let write_half = stream.try_clone().map_err(io_error)?;
            let reader_shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("tcp-recv-{me}-from-{peer}"))
                .spawn(move || read_loop(&reader_shared, peer, stream))
                .map_err(io_error)?;
            let writer_shared = shared.clone();
            let writer = std::thread::Builder::new()
                .name(format!("tcp-send-{me}-to-{peer}"))
                .spawn(move || write_loop(&writer_shared, peer, write_half, inbox))
                .map_err(io_error)?;
            mesh.writers.push(writer);
        }
        Ok(mesh)
    }
}

impl Drop for Mesh {
    /// Says goodbye to every peer after everything queued for it, and waits until it is
    /// written (each write is bounded by the timeout): a process that exits right after
    /// its last collective must still deliver its part of it.
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        for outbox in self.shared.outboxes.iter().flatten() {
            let _ = outbox.send(Outgoing::Bye);
        }
        for writer in self.writers.drain(..) {
            let _ = writer.join();
        }
        // The readers end when their peers close; they hold only the shared state.
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code that can panic runs under this lock, so the state stays consistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn send(&self, peer: usize, frame: Outgoing) {
        if let Some(outbox) = &self.outboxes[peer] {
            // Fails only if the writer has stopped, after a write error that aborted the
            // mesh already.
            let _ = outbox.send(frame);
        }
    }

    /// Fails this rank's pending and future calls with `reason` (the first sticks);
    /// returns whether this was the first reason.
    fn abort_locally(&self, reason: String) -> bool {
        let mut state = self.lock();
        let first = state.aborted.is_none();
        state.aborted.get_or_insert(reason);
        self.arrived.notify_all();
        first
    }

    /// Aborts here and tells every peer, so they fail fast instead of timing out.
    fn abort(&self, reason: String) {
        if self.abort_locally(reason.clone()) {
            for peer in 0..self.world {
                self.send(peer, Outgoing::Abort(reason.clone()));
            }
        }
    }

    /// An error of this rank's collective: aborts the mesh with it and returns it.
    fn fail(&self, error: Error) -> Error {
        self.abort(error.to_string());
        error
    }

    fn closing(&self) -> bool {
        self.lock().closing
    }
}

/// Files every message from `peer` until it says goodbye or its connection ends.
fn read_loop(shared: &Shared, peer: usize, stream: TcpStream) {
    let mut input = BufReader::with_capacity(IO_BUFFER, stream);
    let reason = loop {
        match read_frame(&mut input) {
            Ok(Incoming::Data(group, call, message)) => {
                let mut state = shared.lock();
                if !state.closing {
                    state.mailbox.insert((group, call, peer), message);
                    shared.arrived.notify_all();
                }
            }
            Ok(Incoming::Abort(reason)) => {
                shared.abort_locally(reason);
            }
            Ok(Incoming::Bye) => {
                shared.lock().departed[peer] = true;
                shared.arrived.notify_all();
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                break format!("rank {peer} closed its connection without saying goodbye (did its process die?)")
            }
            Err(e) => break format!("the connection to rank {peer} failed: {e}"),
        }
    };
    if !shared.closing() {
        shared.abort_locally(reason);
    }
}

/// Writes `peer`'s queue in order until the goodbye.
fn write_loop(shared: &Shared, peer: usize, stream: TcpStream, inbox: Receiver<Outgoing>) {
    let mut output = BufWriter::with_capacity(IO_BUFFER, stream);
    while let Ok(frame) = inbox.recv() {
        let bye = matches!(frame, Outgoing::Bye);
        if let Err(e) = write_frame(&mut output, &frame).and_then(|()| output.flush()) {
            if !shared.closing() {
                shared.abort_locally(format!("sending to rank {peer} failed: {e}"));
            }
            return;
        }
        if bye {
            // The peer reads end-of-stream after the goodbye; our reader goes on until
            // the peer closes its side.
            let _ = output.get_ref().shutdown(std::net::Shutdown::Write);
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Rendezvous

/// The store key under which rank `rank` publishes its listening address.
fn addr_key(rank: usize) -> String {
    format!("tcp/addr/{rank}")
}

/// Connects this rank to every other; the streams by global rank (`None` for this rank).
fn rendezvous(store: &Store, me: usize, world: usize, timeout: Duration) -> Result<Vec<Option<TcpStream>>> {
    let deadline = Instant::now() + timeout;
    let failed = |what: &str, e: &dyn std::fmt::Display| Error::CollectiveAborted {
        rank: me,
        op: "connect".into(),
        label: MESH.into(),
        reason: format!("{what}: {e}"),
    };
    let ip = local_ip_toward(store.addr())
        .map_err(|e| failed(&format!("cannot tell this host's address toward the store at {}", store.addr()), &e))?;
    let listener = TcpListener::bind((ip, 0)).map_err(|e| failed(&format!("cannot listen on {ip}"), &e))?;
    let addr = listener.local_addr().map_err(|e| failed("cannot read the listening address", &e))?;
    store.set(&addr_key(me), addr.to_string().as_bytes())?;

    let stop = AtomicBool::new(false);
    let (lower, upper) = std::thread::scope(|scope| {
        let acceptor = scope.spawn(|| accept_lower(&listener, me, world, deadline, &stop));
        let upper = connect_upper(store, me, world, deadline);
        if upper.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        let lower = acceptor.join().unwrap_or_else(|_| Err(io::Error::other("the accepting thread panicked")));
        (lower, upper)
    });
    let upper = upper?;
    let lower = match lower {
        Ok(lower) => lower,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(Error::Rank { rank: me, message: e.to_string() })
        }
        Err(e) => return Err(failed("accepting the lower ranks failed", &e)),
    };
    let mut streams: Vec<Option<TcpStream>> = lower;
    streams.push(None);
    streams.extend(upper);
    let missing: Vec<usize> = (0..world).filter(|&r| r != me && streams[r].is_none()).collect();
    if !missing.is_empty() {
        return Err(Error::CollectiveTimeout { rank: me, op: "connect".into(), label: MESH.into(), timeout, missing });
    }
    Ok(streams)
}

/// The address of this host's interface toward `store_addr` (no packet is sent).
fn local_ip_toward(store_addr: &str) -> io::Result<IpAddr> {
    let target = store_addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the address resolves to nothing"))?;
    let any: IpAddr = if target.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
    let socket = UdpSocket::bind((any, 0))?;
    socket.connect(target)?;
    Ok(socket.local_addr()?.ip())
}

/// The time left until `deadline`, at least a millisecond (a zero socket timeout is an
/// error, not "now").
fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// Connects to every higher rank; by position `r - me - 1`, `None` where rank `r` did not
/// publish its address or answer before the deadline.
fn connect_upper(store: &Store, me: usize, world: usize, deadline: Instant) -> Result<Vec<Option<TcpStream>>> {
    let mut streams = Vec::with_capacity(world - me - 1);
    for peer in me + 1..world {
        // Once the deadline has passed, each remaining rank still gets a look, so that
        // every missing rank is named, not only the first.
        let key = addr_key(peer);
        let Some((_, addr)) = store.wait_any(&[&key], deadline.saturating_duration_since(Instant::now()))? else {
            streams.push(None);
            continue;
        };
        let failed = |what: String| Error::CollectiveAborted {
            rank: me,
            op: "connect".into(),
            label: MESH.into(),
            reason: format!("rank {peer}: {what}"),
        };
        let addr: SocketAddr = String::from_utf8_lossy(&addr)
            .parse()
            .map_err(|e| failed(format!("the store holds no valid address for it: {e}")))?;
        let stream = TcpStream::connect_timeout(&addr, remaining(deadline))
            .map_err(|e| failed(format!("cannot connect to {addr}: {e}")))?;
        let greeted = (|| {
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(remaining(deadline)))?;
            (&stream).write_all(&hello(me, world))?;
            read_hello(&mut &stream)
        })();
        match greeted {
            Ok((rank, size)) if rank == peer && size == world => streams.push(Some(stream)),
            Ok((rank, size)) => {
                return Err(failed(format!(
                    "{addr} answered as rank {rank} of a world of {size}, not rank {peer} of {world}"
                )))
            }
            Err(e) if is_timeout(&e) => streams.push(None),
            Err(e) => return Err(failed(format!("the hello to {addr} failed: {e}"))),
        }
    }
    Ok(streams)
}

/// Accepts a connection from every lower rank; by rank, `None` where one did not come
/// before the deadline. A connection that is not a rank of this world is dropped.
fn accept_lower(
    listener: &TcpListener,
    me: usize,
    world: usize,
    deadline: Instant,
    stop: &AtomicBool,
) -> io::Result<Vec<Option<TcpStream>>> {
    let mut streams: Vec<Option<TcpStream>> = (0..me).map(|_| None).collect();
    // Polled, so that the deadline and `stop` are honoured.
    listener.set_nonblocking(true)?;
    while streams.iter().any(Option::is_none) && Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(e) => return Err(e),
        };
        let greeted = (|| {
            stream.set_nonblocking(false)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(remaining(deadline)))?;
            read_hello(&mut &stream)
        })();
        match greeted {
            Ok((rank, size)) if rank < me && size == world => {
                if streams[rank].is_some() {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("two processes connected as rank {rank}"),
                    ));
                }
                (&stream).write_all(&hello(me, world))?;
                streams[rank] = Some(stream);
            }
            Ok((rank, size)) => {
                tracing::warn!(rank = me, "ignoring a connection from rank {rank} of a world of {size}")
            }
            Err(e) => tracing::warn!(rank = me, "ignoring a connection that sent no valid hello: {e}"),
        }
    }
    Ok(streams)
}

fn hello(rank: usize, world: usize) -> [u8; 16] {
    let mut bytes = [0; 16];
    bytes[..8].copy_from_slice(&MAGIC.to_le_bytes());
    bytes[8..12].copy_from_slice(&(rank as u32).to_le_bytes());
    bytes[12..].copy_from_slice(&(world as u32).to_le_bytes());
    bytes
}

/// The (rank, world size) of a hello.
fn read_hello(input: &mut impl Read) -> io::Result<(usize, usize)> {
    if read_u64(input)? != MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a candle-fsdp TCP hello"));
    }
    Ok((read_u32(input)? as usize, read_u32(input)? as usize))
}

// ---------------------------------------------------------------------------------------
// Wire format (little-endian)
//
// data:  1, group size u32, group ranks u32 each, group instance u64, call u64,
//        op tag u8, op argument u64, dtype code u8, element count u64, label (u32 length,
//        UTF-8), payload length u64, payload
// abort: 2, reason (u32 length, UTF-8)
// bye:   3

const DATA: u8 = 1;
const ABORT: u8 = 2;
const BYE: u8 = 3;

/// The dtypes that travel, with their codes (`None`: a barrier's missing tensor).
fn dtype_code(dtype: Option<DType>) -> Option<u8> {
    Some(match dtype {
        None => 0,
        Some(DType::U8) => 1,
        Some(DType::U32) => 2,
        Some(DType::I16) => 3,
        Some(DType::I32) => 4,
        Some(DType::I64) => 5,
        Some(DType::BF16) => 6,
        Some(DType::F16) => 7,
        Some(DType::F32) => 8,
        Some(DType::F64) => 9,
        Some(_) => return None,
    })
}

fn dtype_of_code(code: u8) -> io::Result<Option<DType>> {
    [None, Some(DType::U8), Some(DType::U32), Some(DType::I16), Some(DType::I32), Some(DType::I64)]
        .into_iter()
        .chain([Some(DType::BF16), Some(DType::F16), Some(DType::F32), Some(DType::F64)])
        .find(|&d| dtype_code(d) == Some(code))
        .ok_or_else(|| invalid(format!("unknown dtype code {code}")))
}

fn op_code(kind: OpKind) -> (u8, u64) {
    let reduce = |op| match op {
        ReduceOp::Sum => 0,
        ReduceOp::Avg => 1,
    };
    match kind {
        OpKind::AllGather => (0, 0),
        OpKind::ReduceScatter(op) => (1, reduce(op)),
        OpKind::AllReduce(op) => (2, reduce(op)),
        OpKind::Broadcast { root } => (3, root as u64),
        OpKind::Barrier => (4, 0),
    }
}

fn op_of_code(tag: u8, argument: u64) -> io::Result<OpKind> {
    let reduce = || match argument {
        0 => Ok(ReduceOp::Sum),
        1 => Ok(ReduceOp::Avg),
        _ => Err(invalid(format!("unknown reduction {argument}"))),
    };
    Ok(match tag {
        0 => OpKind::AllGather,
        1 => OpKind::ReduceScatter(reduce()?),
        2 => OpKind::AllReduce(reduce()?),
        3 => OpKind::Broadcast { root: argument as usize },
        4 => OpKind::Barrier,
        _ => return Err(invalid(format!("unknown operation {tag}"))),
    })
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn put_u32(out: &mut Vec<u8>, value: usize) {
    out.extend_from_slice(&(value as u32).to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, value: &str) {
    put_u32(out, value.len());
    out.extend_from_slice(value.as_bytes());
}

/// A data frame up to its payload.
fn data_head(group: &GroupId, call: u64, header: &CallHeader, payload_len: usize) -> Vec<u8> {
    let mut head = Vec::with_capacity(64 + 4 * group.ranks.len() + header.label.len());
    head.push(DATA);
    put_u32(&mut head, group.ranks.len());
    for &rank in group.ranks.iter() {
        put_u32(&mut head, rank);
    }
    put_u64(&mut head, group.instance);
    put_u64(&mut head, call);
    let (tag, argument) = op_code(header.kind);
    head.push(tag);
    put_u64(&mut head, argument);
    head.push(dtype_code(header.dtype).expect("checked when issued"));
    put_u64(&mut head, header.len as u64);
    put_str(&mut head, &header.label);
    put_u64(&mut head, payload_len as u64);
    head
}

fn write_frame(output: &mut impl Write, frame: &Outgoing) -> io::Result<()> {
    match frame {
        Outgoing::Data { head, payload } => {
            output.write_all(head)?;
            output.write_all(payload)
        }
        Outgoing::Abort(reason) => {
            let mut bytes = vec![ABORT];
            put_str(&mut bytes, reason);
            output.write_all(&bytes)
        }
        Outgoing::Bye => output.write_all(&[BYE]),
    }
}

fn read_u8(input: &mut impl Read) -> io::Result<u8> {
    let mut bytes = [0; 1];
    input.read_exact(&mut bytes)?;
    Ok(bytes[0])
}

fn read_u32(input: &mut impl Read) -> io::Result<u32> {
    let mut bytes = [0; 4];
    input.read_exact(&mut bytes)?;
    Ok(u32::from_le_bytes(bytes))
}

fn read_u64(input: &mut impl Read) -> io::Result<u64> {
    let mut bytes = [0; 8];
    input.read_exact(&mut bytes)?;
    Ok(u64::from_le_bytes(bytes))
}

/// A length of something small (a label, a group), refused when absurd.
fn read_count(input: &mut impl Read) -> io::Result<usize> {
    let count = read_u32(input)? as usize;
    if count > MAX_LIST {
        return Err(invalid(format!("a count of {count} in a frame header")));
    }
    Ok(count)
}

fn read_string(input: &mut impl Read) -> io::Result<String> {
    let mut bytes = vec![0; read_count(input)?];
    input.read_exact(&mut bytes)?;
    String::from_utf8(bytes).map_err(|e| invalid(e.to_string()))
}

fn read_frame(input: &mut impl Read) -> io::Result<Incoming> {
    match read_u8(input)? {
        DATA => {
            let size = read_count(input)?;
            let ranks = (0..size).map(|_| read_u32(input).map(|r| r as usize)).collect::<io::Result<Vec<_>>>()?;
            let group = GroupId { ranks: ranks.into(), instance: read_u64(input)? };
            let call = read_u64(input)?;
            let tag = read_u8(input)?;
            let kind = op_of_code(tag, read_u64(input)?)?;
            let dtype = dtype_of_code(read_u8(input)?)?;
            let len = read_u64(input)? as usize;
            let label = read_string(input)?;
            let payload_len = read_u64(input)? as usize;
            let mut payload = vec![0; payload_len];
            input.read_exact(&mut payload)?;
            Ok(Incoming::Data(group, call, Message { header: CallHeader { kind, len, dtype, label }, payload }))
        }
        ABORT => Ok(Incoming::Abort(read_string(input)?)),
        BYE => Ok(Incoming::Bye),
        tag => Err(invalid(format!("unknown frame type {tag}"))),
    }
}

/// A tensor's elements as little-endian bytes of its dtype, in row-major order.
fn le_bytes(tensor: &Tensor) -> candle_core::Result<Vec<u8>> {
    let flat = tensor.to_device(&Device::Cpu)?.flatten_all()?.contiguous()?;
    let (storage, layout) = flat.storage_and_layout();
    let (start, end) = layout.contiguous_offsets().expect("made contiguous above");
    let Storage::Cpu(storage) = &*storage else { unreachable!("moved to the CPU above") };
    Ok(match storage {
        CpuStorage::U8(v) => v[start..end].to_vec(),
        CpuStorage::U32(v) => each_le(&v[start..end], u32::to_le_bytes),
        CpuStorage::I16(v) => each_le(&v[start..end], i16::to_le_bytes),
        CpuStorage::I32(v) => each_le(&v[start..end], i32::to_le_bytes),
        CpuStorage::I64(v) => each_le(&v[start..end], i64::to_le_bytes),
        CpuStorage::BF16(v) => each_le(&v[start..end], |x| x.to_le_bytes()),
        CpuStorage::F16(v) => each_le(&v[start..end], |x| x.to_le_bytes()),
        CpuStorage::F32(v) => each_le(&v[start..end], f32::to_le_bytes),
        CpuStorage::F64(v) => each_le(&v[start..end], f64::to_le_bytes),
        _ => candle_core::bail!("the TCP backend cannot send {:?} tensors", flat.dtype()),
    })
}

fn each_le<T: Copy, const N: usize>(values: &[T], bytes: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().map(|&value| bytes(value)).collect::<Vec<[u8; N]>>().into_flattened()
}
