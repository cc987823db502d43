//! [`Watchdog`]: the thread that aborts communicators whose collectives overrun their
//! timeout or that report an asynchronous NCCL error, so that no rank waits for ever.

use super::communicator::Communicator;
use super::event::Event;
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// How often the watchdog looks at the collectives in flight.
pub(super) const WATCHDOG_PERIOD: Duration = Duration::from_millis(5);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a watched collective is.
enum Stage {
    /// Its NCCL call has not returned: it may block on the host (connection set-up).
    OnHost,
    /// Queued on the communication stream; complete when the event is.
    OnGpu(Arc<Event>),
    /// Its call failed when issued: nothing left to watch.
    Ended,
}

/// One collective, watched from before its NCCL call until its work on the GPU is
/// complete: the deadline runs from the call, so a call that never returns is caught too.
pub(super) struct Watched {
    stage: Mutex<Stage>,
    deadline: Instant,
    communicator: Weak<Communicator>,
    /// "rank 3: all_gather for unit `layers.2`".
    what: String,
}

impl Watched {
    /// The call returned; `done` completes with its work on the GPU.
    pub fn queued(&self, done: Arc<Event>) {
        *lock(&self.stage) = Stage::OnGpu(done);
    }

    /// The call failed when issued.
    pub fn ended(&self) {
        *lock(&self.stage) = Stage::Ended;
    }
}

pub(super) struct Watchdog {
    state: Arc<WatchdogState>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct WatchdogState {
    in_flight: Mutex<Vec<Arc<Watched>>>,
    communicators: Mutex<Vec<Weak<Communicator>>>,
    stop: AtomicBool,
}

impl Watchdog {
    pub fn start(rank: usize, timeout: Duration) -> Result<Self> {
        let state = Arc::new(WatchdogState::default());
        let shared = state.clone();
        let thread = std::thread::Builder::new()
            .name(format!("nccl-watchdog-{rank}"))
            .spawn(move || shared.run(timeout))
            .map_err(|e| Error::Rank { rank, message: format!("cannot start the NCCL watchdog thread: {e}") })?;
        Ok(Self { state, thread: Some(thread) })
    }

    /// Starts watching a collective whose NCCL call is about to be made.
    pub fn watch(&self, what: String, communicator: &Arc<Communicator>, timeout: Duration) -> Arc<Watched> {
        let watched = Arc::new(Watched {
            stage: Mutex::new(Stage::OnHost),
            deadline: Instant::now() + timeout,
            communicator: Arc::downgrade(communicator),
            what,
        });
        lock(&self.state.in_flight).push(watched.clone());
        watched
    }

    /// Polls `communicator` for asynchronous errors for as long as it lives.
    pub fn register(&self, communicator: &Arc<Communicator>) {
        lock(&self.state.communicators).push(Arc::downgrade(communicator));
    }
}

impl WatchdogState {
    fn run(&self, timeout: Duration) {
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(WATCHDOG_PERIOD);
            let now = Instant::now();
            let mut overdue = Vec::new();
            lock(&self.in_flight).retain(|watched| {
                let Some(communicator) = watched.communicator.upgrade() else {
                    return false;
                };
                let verdict = match &*lock(&watched.stage) {
                    Stage::Ended => return false,
                    Stage::OnHost if now < watched.deadline => return true,
                    Stage::OnHost => format!("{}: the NCCL call did not return within {timeout:?}", watched.what),
                    Stage::OnGpu(done) => match done.is_complete() {
                        Ok(true) => return false,
                        Ok(false) if now < watched.deadline => return true,
                        Ok(false) => format!("{} did not complete within {timeout:?}", watched.what),
                        Err(e) => format!("{} failed on the GPU: {e:?}", watched.what),
                    },
                };
                overdue.push((communicator, verdict));
                false
            });
            lock(&self.communicators).retain(|communicator| {
                let Some(communicator) = communicator.upgrade() else {
                    return false;
                };
                if let Some(error) = communicator.async_error() {
                    overdue.push((communicator, error));
                }
                true
            });
            for (communicator, reason) in overdue {
                tracing::error!(target: "candle_fsdp::nccl", "{reason}; aborting the communicator");
                communicator.abort(format!("{reason}; the communicator was aborted so that no rank hangs"));
            }
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
