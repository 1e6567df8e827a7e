//! The graph runtime: threads, bounded edges, micro-batching, reordering, metrics, shutdown.
//!
//! This is the only module that knows about threads and channels (crossbeam for the internal edges, a tokio
//! `mpsc` for the last edge so that the same run can be consumed blocking or async). It also owns the small
//! tokio runtime that drives async I/O clients (object storage) for the blocking shard readers: [`block_on`]
//! and [`Prefetch`]. Stages are plain
//! functions or [`crate::stage::Stage`] / [`crate::stage::BatchStage`] implementations; the runtime wires
//! them together.
//!
//! # Invariants
//! - Every edge is a bounded channel; a full edge blocks its sender (backpressure, never dropping).
//! - Items carry a sequence number assigned at the source. The source must take a *credit* per item and the
//!   ordered sink returns it once the item has left the graph in order, so at most `window` items are ever in
//!   flight between source and sink, and the sink's reorder buffer is bounded by the same number.
//! - Dropping the [`Run`] closes the last edge, raises the shutdown flag and joins every thread; a blocked
//!   sender or receiver wakes up because its peer disconnected.
//! - A panic in a stage thread is caught, recorded, raises the shutdown flag and surfaces as
//!   [`Error::Stage`] from the sink.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use crate::error::{Error, Result, SampleError, panic_message};
use crate::stage::{BatchStage, Stage};

/// An item travelling through the graph: sequence number, pass-through metadata and the payload or the
/// reason it was dropped upstream.
#[derive(Debug)]
pub struct Envelope<T, M> {
    /// Position in the output order, assigned by the source, dense from 0.
    pub seq: u64,
    /// Metadata carried untouched to the sink (checkpoint deltas).
    pub meta: M,
    /// The payload, or the failure that dropped it.
    pub body: std::result::Result<T, SampleError>,
}

impl<T, M> Envelope<T, M> {
    fn map_body<U>(self, f: impl FnOnce(T) -> std::result::Result<U, SampleError>) -> Envelope<U, M> {
        Envelope { seq: self.seq, meta: self.meta, body: self.body.and_then(f) }
    }
}

/// Live counters of one stage; read them with [`StageMetrics::snapshot`].
#[derive(Debug)]
pub struct StageMetrics {
    name: String,
    workers: usize,
    items_in: AtomicU64,
    items_out: AtomicU64,
    busy_ns: AtomicU64,
    blocked_ns: AtomicU64,
    starved_ns: AtomicU64,
    calls: AtomicU64,
    waiting_output: AtomicI64,
    waiting_input: AtomicI64,
    input_depth: Mutex<Option<Arc<AtomicI64>>>,
}

/// A point-in-time copy of a stage's counters.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StageSnapshot {
    /// Stage name.
    pub name: String,
    /// Worker threads of the stage.
    pub workers: usize,
    /// Items received.
    pub items_in: u64,
    /// Items sent downstream.
    pub items_out: u64,
    /// Processing calls (items for per-item stages, micro-batches for model stages).
    pub calls: u64,
    /// Time spent working, summed over workers.
    pub busy: Duration,
    /// Time spent waiting on a full downstream edge, summed over workers.
    pub blocked: Duration,
    /// Time spent waiting for input, summed over workers.
    pub starved: Duration,
    /// Items waiting in the stage's input edge now.
    pub queue_depth: u64,
    /// Workers blocked on a full downstream edge (or, for the source, on the in-flight window) right now.
    pub waiting_output: u64,
    /// Workers waiting for input right now.
    pub waiting_input: u64,
}

fn add(counter: &AtomicU64, since: Instant) {
    counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// Runs a blocking wait, counting it in a "waiting now" gauge and, once done, in a time counter.
fn waiting<R>(gauge: &AtomicI64, total: &AtomicU64, wait: impl FnOnce() -> R) -> R {
    let t = Instant::now();
    gauge.fetch_add(1, Ordering::Relaxed);
    let r = wait();
    gauge.fetch_sub(1, Ordering::Relaxed);
    add(total, t);
    r
}

impl StageMetrics {
    fn new(name: &str, workers: usize) -> Self {
        Self {
            name: name.to_string(),
            workers,
            items_in: AtomicU64::new(0),
            items_out: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            blocked_ns: AtomicU64::new(0),
            starved_ns: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            waiting_output: AtomicI64::new(0),
            waiting_input: AtomicI64::new(0),
            input_depth: Mutex::new(None),
        }
    }

    /// Records time spent working since `since`.
    pub fn busy_since(&self, since: Instant) {
        add(&self.busy_ns, since);
    }

    /// Counts one processing call.
    pub fn count_call(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    /// Copies the counters.
    pub fn snapshot(&self) -> StageSnapshot {
        let depth = self
            .input_depth
            .lock()
            .ok()
            .and_then(|d| d.as_ref().map(|d| d.load(Ordering::Relaxed).max(0) as u64))
            .unwrap_or(0);
        StageSnapshot {
            name: self.name.clone(),
            workers: self.workers,
            items_in: self.items_in.load(Ordering::Relaxed),
            items_out: self.items_out.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
            busy: Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed)),
            blocked: Duration::from_nanos(self.blocked_ns.load(Ordering::Relaxed)),
            starved: Duration::from_nanos(self.starved_ns.load(Ordering::Relaxed)),
            queue_depth: depth,
            waiting_output: self.waiting_output.load(Ordering::Relaxed).max(0) as u64,
            waiting_input: self.waiting_input.load(Ordering::Relaxed).max(0) as u64,
        }
    }
}

/// Sending end of a bounded edge, instrumented: counts items and time blocked on a full edge.
pub struct Outlet<T> {
    tx: Sender<T>,
    depth: Arc<AtomicI64>,
    owner: Arc<StageMetrics>,
    shutdown: Arc<AtomicBool>,
}

impl<T> Clone for Outlet<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            depth: self.depth.clone(),
            owner: self.owner.clone(),
            shutdown: self.shutdown.clone(),
        }
    }
}

/// How often a blocked wait looks at the shutdown flag. A blocked thread normally wakes because its peer
/// disconnected; the flag covers cycles of waits (a panicked stage) where no peer ever goes away.
const POLL: Duration = Duration::from_millis(25);

impl<T> Outlet<T> {
    /// Sends, blocking while the edge is full. Returns `false` when the receiving side is gone (shutdown).
    pub fn send(&self, item: T) -> bool {
        let ok = match self.tx.try_send(item) {
            Ok(()) => true,
            Err(TrySendError::Disconnected(_)) => false,
            Err(TrySendError::Full(item)) => waiting(&self.owner.waiting_output, &self.owner.blocked_ns, || {
                let mut item = item;
                loop {
                    match self.tx.send_timeout(item, POLL) {
                        Ok(()) => return true,
                        Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return false,
                        Err(crossbeam_channel::SendTimeoutError::Timeout(back)) => {
                            if self.shutdown.load(Ordering::Relaxed) {
                                return false;
                            }
                            item = back;
                        }
                    }
                }
            }),
        };
        if ok {
            self.depth.fetch_add(1, Ordering::Relaxed);
            self.owner.items_out.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }
}

/// Receiving end of a bounded edge, instrumented: counts items and time starved for input.
pub struct Inlet<T> {
    rx: Receiver<T>,
    depth: Arc<AtomicI64>,
    owner: Arc<StageMetrics>,
    shutdown: Arc<AtomicBool>,
}

impl<T> Clone for Inlet<T> {
    fn clone(&self) -> Self {
        Self {
            rx: self.rx.clone(),
            depth: self.depth.clone(),
            owner: self.owner.clone(),
            shutdown: self.shutdown.clone(),
        }
    }
}

/// Waits on `rx` until an item, a disconnection or (checked every [`POLL`]) the shutdown flag.
fn recv_or_shutdown<T>(rx: &Receiver<T>, shutdown: &AtomicBool) -> Option<T> {
    loop {
        match rx.recv_timeout(POLL) {
            Ok(x) => return Some(x),
            Err(RecvTimeoutError::Disconnected) => return None,
            Err(RecvTimeoutError::Timeout) => {
                if shutdown.load(Ordering::Relaxed) {
                    return None;
                }
            }
        }
    }
}

impl<T> Inlet<T> {
    fn got(&self, item: T) -> T {
        self.depth.fetch_sub(1, Ordering::Relaxed);
        self.owner.items_in.fetch_add(1, Ordering::Relaxed);
        item
    }

    /// Receives, blocking while the edge is empty; `None` once every sender is gone and the edge is drained.
    pub fn recv(&self) -> Option<T> {
        if let Ok(item) = self.rx.try_recv() {
            return Some(self.got(item));
        }
        let r =
            waiting(&self.owner.waiting_input, &self.owner.starved_ns, || recv_or_shutdown(&self.rx, &self.shutdown));
        r.map(|item| self.got(item))
    }

    /// Receives until `deadline`.
    pub fn recv_deadline(&self, deadline: Instant) -> std::result::Result<T, RecvTimeoutError> {
        let r = waiting(&self.owner.waiting_input, &self.owner.starved_ns, || self.rx.recv_deadline(deadline));
        r.map(|item| self.got(item))
    }
}

/// In-flight limit shared by the source and the ordered sink (see the module invariants).
#[derive(Clone)]
pub struct Credits {
    take: Receiver<()>,
    give: Sender<()>,
}

impl Credits {
    fn new(window: usize) -> Self {
        let (give, take) = crossbeam_channel::bounded(window.max(1));
        for _ in 0..window.max(1) {
            let _ = give.try_send(());
        }
        Self { take, give }
    }
}

/// The source's handle: assigns sequence numbers, takes a credit per item and sends.
pub struct Emitter<T, M> {
    out: Outlet<Envelope<T, M>>,
    credits: Receiver<()>,
    next_seq: u64,
    shutdown: Arc<AtomicBool>,
}

impl<T, M> Emitter<T, M> {
    /// Emits the next item in output order. Blocks for a credit and for room on the edge. Returns `false`
    /// when the graph is shutting down: the source should return.
    pub fn emit(&mut self, meta: M, body: std::result::Result<T, SampleError>) -> bool {
        if self.shutdown.load(Ordering::Relaxed) {
            return false;
        }
        let credit = match self.credits.try_recv() {
            Ok(()) => true,
            Err(_) => {
                let owner = &self.out.owner;
                waiting(&owner.waiting_output, &owner.blocked_ns, || {
                    recv_or_shutdown(&self.credits, &self.shutdown).is_some()
                })
            }
        };
        if !credit {
            return false;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.out.send(Envelope { seq, meta, body })
    }

    /// Whether the graph is shutting down.
    pub fn is_shutdown(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }

    /// The stage metrics of the source, for busy-time accounting.
    pub fn metrics(&self) -> &StageMetrics {
        &self.out.owner
    }
}

/// What the ordered sink's handler wants after an item.
pub enum SinkStep<O> {
    /// Send these outputs and continue.
    Continue(Vec<O>),
    /// Send these outputs and stop the run.
    Stop(Vec<O>),
}

/// Pipeline-specific logic of the last stage; called strictly in sequence order.
pub trait SinkLogic: Send + 'static {
    /// Payload type arriving at the sink.
    type In: Send + 'static;
    /// Metadata type of the envelopes.
    type Meta: Send + 'static;
    /// Output sent to the consumer.
    type Out: Send + 'static;
    /// Handles the next item in order.
    fn accept(&mut self, item: Envelope<Self::In, Self::Meta>) -> SinkStep<Self::Out>;
    /// Called once the input is exhausted (or a stage failed); returns the final outputs.
    fn finish(&mut self, failure: Option<Error>) -> Vec<Self::Out>;
}

/// How the ordered sink's outputs become what the consumer receives: `complete` (collating a batch) runs on
/// `workers` threads of a `collate` stage of their own, or on the sink's thread when `workers` is 0. Either
/// way the consumer receives the outputs in the order the sink produced them: each collator completes one
/// output at a time and hands it over only when every earlier one has been handed over, so no reorder buffer
/// is needed, and at most `workers` outputs wait for collators and `workers` are being completed.
pub struct Completion<S, O> {
    /// Collator threads (0: complete on the sink's thread).
    pub workers: usize,
    /// Turns a sink output into what the consumer receives. It must not panic: a panic ends the run as if
    /// the consumer's stream had ended (the sink's logic turns failures into outputs of its own).
    pub complete: Arc<dyn Fn(S) -> O + Send + Sync>,
}

impl<S: Send + 'static> Completion<S, S> {
    /// The outputs as the sink's logic produced them, on the sink's thread.
    pub fn identity() -> Self {
        Self { workers: 0, complete: Arc::new(|s| s) }
    }
}

/// Whose turn it is to hand an output to the consumer (the collators' ticket counter), and the ticket whose
/// collator died, if one did: every later ticket's turn can no longer come.
struct Turn {
    next: Mutex<u64>,
    moved: std::sync::Condvar,
    died_at: AtomicU64,
}

impl Default for Turn {
    fn default() -> Self {
        Self { next: Mutex::new(0), moved: std::sync::Condvar::new(), died_at: AtomicU64::new(u64::MAX) }
    }
}

impl Turn {
    /// Waits until `ticket` is next; `false` if it never will be (the collator of an earlier ticket died, or
    /// the consumer is gone).
    fn wait_for<O>(&self, ticket: u64, tx: &tokio::sync::mpsc::Sender<O>) -> bool {
        let Ok(mut next) = self.next.lock() else { return false };
        loop {
            if *next == ticket {
                return true;
            }
            if ticket > self.died_at.load(Ordering::SeqCst) || tx.is_closed() {
                return false;
            }
            next = match self.moved.wait_timeout(next, POLL) {
                Ok((guard, _)) => guard,
                Err(_) => return false,
            };
        }
    }

    /// Hands the turn to the next ticket.
    fn advance(&self) {
        if let Ok(mut next) = self.next.lock() {
            *next += 1;
        }
        self.moved.notify_all();
    }
}

/// Sends `o` on the last edge, counting the wait on a full edge in `m`. `false` once the consumer is gone.
fn deliver<O>(tx: &tokio::sync::mpsc::Sender<O>, m: &StageMetrics, o: O) -> bool {
    let ok = match tx.try_send(o) {
        Ok(()) => true,
        Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => false,
        Err(tokio::sync::mpsc::error::TrySendError::Full(o)) => {
            waiting(&m.waiting_output, &m.blocked_ns, || tx.blocking_send(o).is_ok())
        }
    };
    if ok {
        m.items_out.fetch_add(1, Ordering::Relaxed);
    }
    ok
}

/// One collator thread ([`Completion`]): takes numbered outputs, completes them, hands them over in ticket
/// order. Returns when the sink is done and the queue drained, or when the consumer is gone.
fn collator<S, O>(
    queue: &Receiver<(u64, S)>,
    tx: &tokio::sync::mpsc::Sender<O>,
    turn: &Turn,
    complete: &(dyn Fn(S) -> O + Send + Sync),
    m: &StageMetrics,
) {
    // The sink raises the shutdown flag when its logic stops the run, with outputs still queued here: the
    // queue is drained until the sink hangs up, not until the flag.
    while let Ok((ticket, s)) = waiting(&m.waiting_input, &m.starved_ns, || queue.recv()) {
        m.items_in.fetch_add(1, Ordering::Relaxed);
        let t = Instant::now();
        let done = catch_unwind(AssertUnwindSafe(|| complete(s)));
        m.busy_since(t);
        m.count_call();
        let Ok(o) = done else {
            turn.died_at.store(ticket, Ordering::SeqCst);
            turn.moved.notify_all();
            std::panic::resume_unwind(Box::new(format!("completing output {ticket} panicked")));
        };
        if !waiting(&m.waiting_output, &m.blocked_ns, || turn.wait_for(ticket, tx)) {
            return;
        }
        let sent = deliver(tx, m, o);
        turn.advance();
        if !sent {
            return;
        }
    }
}

/// A running graph. Dropping it shuts everything down and joins every thread.
pub struct Graph {
    capacity: usize,
    shutdown: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    stages: Vec<Arc<StageMetrics>>,
    failures: Arc<Mutex<Vec<Error>>>,
    live: Arc<AtomicI64>,
}

impl Graph {
    /// A new graph whose edges hold `capacity` items each.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            shutdown: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            stages: Vec::new(),
            failures: Arc::new(Mutex::new(Vec::new())),
            live: Arc::new(AtomicI64::new(0)),
        }
    }

    /// Edge capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The shutdown flag, for stages with long operations that should check it.
    pub fn shutdown_flag(&self) -> Arc<AtomicBool> {
        self.shutdown.clone()
    }

    /// Registers a stage's metrics.
    pub fn stage(&mut self, name: &str, workers: usize) -> Arc<StageMetrics> {
        let m = Arc::new(StageMetrics::new(name, workers));
        self.stages.push(m.clone());
        m
    }

    /// A bounded edge from stage `from` to stage `to`, with `capacity` slots.
    pub fn edge<T>(&self, from: &Arc<StageMetrics>, to: &Arc<StageMetrics>, capacity: usize) -> (Outlet<T>, Inlet<T>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
        let depth = Arc::new(AtomicI64::new(0));
        if let Ok(mut d) = to.input_depth.lock() {
            *d = Some(depth.clone());
        }
        (
            Outlet { tx, depth: depth.clone(), owner: from.clone(), shutdown: self.shutdown.clone() },
            Inlet { rx, depth, owner: to.clone(), shutdown: self.shutdown.clone() },
        )
    }

    /// Threads started and not yet finished (for tests of cancellation).
    pub fn live_threads(&self) -> Arc<AtomicI64> {
        self.live.clone()
    }

    /// Spawns a named thread. An `Err` it returns, or a panic, is recorded (a panic as [`Error::Stage`], an
    /// error as itself, so a typed error such as [`Error::State`] reaches the consumer unchanged) and raises
    /// the shutdown flag; the sink reports the first one.
    pub fn spawn(&mut self, name: &str, body: impl FnOnce() -> Result<()> + Send + 'static) -> Result<()> {
        let failures = self.failures.clone();
        let shutdown = self.shutdown.clone();
        let live = self.live.clone();
        let stage = name.to_string();
        live.fetch_add(1, Ordering::SeqCst);
        let handle = std::thread::Builder::new()
            .name(format!("juicer-{name}"))
            .spawn(move || {
                let failure = match catch_unwind(AssertUnwindSafe(body)) {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e),
                    Err(panic) => {
                        let detail = panic_message(&*panic).unwrap_or_else(|| "panicked".to_string());
                        Some(Error::Stage { stage, detail })
                    }
                };
                if let Some(e) = failure {
                    if let Ok(mut f) = failures.lock() {
                        f.push(e);
                    }
                    shutdown.store(true, Ordering::SeqCst);
                }
                live.fetch_sub(1, Ordering::SeqCst);
            })
            .map_err(|e| Error::io(format!("spawning thread for stage `{name}`"), e))?;
        self.threads.push(handle);
        Ok(())
    }

    /// Starts the source stage: `body` runs on its own thread and emits items through an [`Emitter`];
    /// at most `window` items are in flight between it and the ordered sink. An `Err` from `body` ends the
    /// run with that error (see [`Graph::spawn`]).
    pub fn source<T, M>(
        &mut self,
        me: Arc<StageMetrics>,
        window: usize,
        body: impl FnOnce(&mut Emitter<T, M>) -> Result<()> + Send + 'static,
    ) -> Result<(Inlet<Envelope<T, M>>, Credits)>
    where
        T: Send + 'static,
        M: Send + 'static,
    {
        let name = me.name.clone();
        let next = Arc::new(StageMetrics::new("", 0));
        let (out, inlet) = self.edge(&me, &next, self.capacity);
        let credits = Credits::new(window);
        let mut emitter = Emitter { out, credits: credits.take.clone(), next_seq: 0, shutdown: self.shutdown.clone() };
        self.spawn(&name, move || body(&mut emitter))?;
        Ok((inlet, credits))
    }

    fn retarget<T>(inlet: Inlet<T>, to: &Arc<StageMetrics>) -> Inlet<T> {
        if let Ok(mut d) = to.input_depth.lock() {
            *d = Some(inlet.depth.clone());
        }
        Inlet { rx: inlet.rx, depth: inlet.depth, owner: to.clone(), shutdown: inlet.shutdown }
    }

    /// A per-item stage on `workers` threads sharing one input edge. Failed items pass through untouched.
    pub fn map<S, M>(
        &mut self,
        input: Inlet<Envelope<S::In, M>>,
        stage: Arc<S>,
        workers: usize,
    ) -> Result<Inlet<Envelope<S::Out, M>>>
    where
        S: Stage,
        M: Send + 'static,
    {
        let workers = workers.max(1);
        let me = self.stage(stage.name(), workers);
        let input = Self::retarget(input, &me);
        let next = Arc::new(StageMetrics::new("", 0));
        let (out, inlet) = self.edge(&me, &next, self.capacity);
        for w in 0..workers {
            let (input, out, stage, me) = (input.clone(), out.clone(), stage.clone(), me.clone());
            let shutdown = self.shutdown.clone();
            self.spawn(&format!("{}-{w}", stage.name()), move || {
                while let Some(env) = input.recv() {
                    if shutdown.load(Ordering::Relaxed) {
                        break;
                    }
                    let t = Instant::now();
                    let env = env.map_body(|x| stage.process(x));
                    me.count_call();
                    me.busy_since(t);
                    if !out.send(env) {
                        break;
                    }
                }
                Ok(())
            })?;
        }
        Ok(inlet)
    }

    /// A model stage: one dedicated thread per factory (one per device). Each thread builds its stage with
    /// its factory (on that thread), then collects micro-batches of up to `micro_batch` items, waiting at most
    /// `max_wait` after the first item of a batch. Build errors of any factory are returned here.
    pub fn model<S, M, F>(
        &mut self,
        name: &str,
        input: Inlet<Envelope<S::In, M>>,
        factories: Vec<F>,
        micro_batch: usize,
        max_wait: Duration,
    ) -> Result<Inlet<Envelope<S::Out, M>>>
    where
        S: BatchStage,
        M: Send + 'static,
        F: FnOnce() -> Result<S> + Send + 'static,
    {
        let me = self.stage(name, factories.len().max(1));
        let input = Self::retarget(input, &me);
        let next = Arc::new(StageMetrics::new("", 0));
        let (out, inlet) = self.edge(&me, &next, self.capacity);
        let micro_batch = micro_batch.max(1);
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<()>>(factories.len());
        let n = factories.len();
        for (d, factory) in factories.into_iter().enumerate() {
            let (input, out, me, ready) = (input.clone(), out.clone(), me.clone(), ready_tx.clone());
            let shutdown = self.shutdown.clone();
            self.spawn(&format!("{name}-dev{d}"), move || {
                let mut stage = match factory() {
                    Ok(s) => {
                        let _ = ready.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return Ok(());
                    }
                };
                drop(ready);
                while let Some(first) = input.recv() {
                    let deadline = Instant::now() + max_wait;
                    let mut batch = vec![first];
                    while batch.len() < micro_batch {
                        match input.recv_deadline(deadline) {
                            Ok(x) => batch.push(x),
                            Err(_) => break,
                        }
                    }
                    if shutdown.load(Ordering::Relaxed) {
                        break;
                    }
                    let t = Instant::now();
                    let done = run_batch(&mut stage, batch);
                    me.count_call();
                    me.busy_since(t);
                    for env in done {
                        if !out.send(env) {
                            return Ok(());
                        }
                    }
                }
                Ok(())
            })?;
        }
        drop(ready_tx);
        let mut errors = Vec::new();
        for _ in 0..n {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(e),
                Err(_) => errors.push(Error::Stage { stage: name.into(), detail: "model thread died".into() }),
            }
        }
        match errors.len() {
            0 => Ok(inlet),
            1 => Err(errors.remove(0)),
            _ => Err(Error::Config(errors.iter().map(|e| e.to_string()).collect())),
        }
    }

    /// The ordered sink: reorders by sequence number, calls `logic` in order, returns a credit per item, has each
    /// output completed ([`Completion`]) and sends the outputs, in the order `logic` produced them, on the last
    /// edge (a tokio channel of `capacity`), which the [`Run`] reads.
    pub fn sink<L: SinkLogic, O: Send + 'static>(
        mut self,
        input: Inlet<Envelope<L::In, L::Meta>>,
        credits: Credits,
        mut logic: L,
        completion: Completion<L::Out, O>,
    ) -> Result<Run<O>> {
        let me = self.stage("batch", 1);
        let input = Self::retarget(input, &me);
        let (tx, rx) = tokio::sync::mpsc::channel::<O>(self.capacity);
        let failures = self.failures.clone();
        let give = credits.give.clone();
        drop(credits);
        let shutdown = self.shutdown.clone();
        let m = me.clone();
        let Completion { workers, complete } = completion;
        // With collators, outputs go to them as numbered jobs; without, they are completed here.
        let jobs = if workers > 0 {
            let (jobs, queue) = crossbeam_channel::bounded::<(u64, L::Out)>(workers);
            let collate = self.stage("collate", workers);
            let turn = Arc::new(Turn::default());
            for w in 0..workers {
                let (queue, tx, turn, complete, c) =
                    (queue.clone(), tx.clone(), turn.clone(), complete.clone(), collate.clone());
                self.spawn(&format!("collate-{w}"), move || {
                    collator(&queue, &tx, &turn, complete.as_ref(), &c);
                    Ok(())
                })?;
            }
            Some(jobs)
        } else {
            None
        };
        self.spawn("batch", move || {
            let mut ticket = 0u64;
            let mut send = |o: L::Out| -> bool {
                let Some(jobs) = &jobs else {
                    let t = Instant::now();
                    let o = complete(o);
                    m.busy_since(t);
                    return deliver(&tx, &m, o);
                };
                let job = (ticket, o);
                ticket += 1;
                let ok = match jobs.try_send(job) {
                    Ok(()) => true,
                    Err(TrySendError::Disconnected(_)) => false,
                    Err(TrySendError::Full(job)) => {
                        waiting(&m.waiting_output, &m.blocked_ns, || jobs.send(job).is_ok())
                    }
                };
                if ok {
                    m.items_out.fetch_add(1, Ordering::Relaxed);
                }
                ok
            };
            let mut pending: BTreeMap<u64, Envelope<L::In, L::Meta>> = BTreeMap::new();
            let mut next = 0u64;
            'outer: while let Some(env) = input.recv() {
                pending.insert(env.seq, env);
                while let Some(env) = pending.remove(&next) {
                    next += 1;
                    let t = Instant::now();
                    let step = logic.accept(env);
                    m.count_call();
                    m.busy_since(t);
                    let _ = give.try_send(());
                    let (outs, stop) = match step {
                        SinkStep::Continue(o) => (o, false),
                        SinkStep::Stop(o) => (o, true),
                    };
                    for o in outs {
                        if !send(o) {
                            break 'outer;
                        }
                    }
                    if stop {
                        shutdown.store(true, Ordering::SeqCst);
                        drop(give);
                        return Ok(());
                    }
                }
            }
            // Input exhausted: every upstream thread has finished (or died).
            let failure = failures.lock().ok().and_then(|mut f| if f.is_empty() { None } else { Some(f.remove(0)) });
            for o in logic.finish(failure) {
                if !send(o) {
                    break;
                }
            }
            Ok(())
        })?;
        Ok(Run { rx, graph: self })
    }

    /// Snapshots of every stage, in graph order.
    pub fn metrics(&self) -> Vec<StageSnapshot> {
        self.stages.iter().map(|s| s.snapshot()).collect()
    }

    fn stop(&mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run_batch<S: BatchStage, M>(stage: &mut S, batch: Vec<Envelope<S::In, M>>) -> Vec<Envelope<S::Out, M>> {
    let mut heads = Vec::with_capacity(batch.len());
    let mut inputs = Vec::new();
    for env in batch {
        match env.body {
            Ok(x) => {
                inputs.push(x);
                heads.push((env.seq, env.meta, None));
            }
            Err(e) => heads.push((env.seq, env.meta, Some(e))),
        }
    }
    let n_in = inputs.len();
    let mut outputs = if n_in > 0 { stage.process_batch(inputs) } else { Vec::new() }.into_iter();
    let mut produced = 0usize;
    heads
        .into_iter()
        .map(|(seq, meta, err)| {
            let body = match err {
                Some(e) => Err(e),
                None => {
                    produced += 1;
                    outputs.next().unwrap_or_else(|| {
                        Err(SampleError::new(
                            format!("#{seq}"),
                            crate::error::DropReason::StageFailed,
                            format!("model stage returned fewer outputs than inputs ({n_in})"),
                        ))
                    })
                }
            };
            Envelope { seq, meta, body }
        })
        .collect()
}

/// A started graph: the consumer end of the last edge plus the threads. Dropping it stops and joins all.
pub struct Run<O> {
    rx: tokio::sync::mpsc::Receiver<O>,
    graph: Graph,
}

impl<O> Run<O> {
    /// Blocking receive of the next output (`None` at the end).
    ///
    /// Must not be called from inside an async runtime; use [`Run::recv`] there.
    pub fn blocking_recv(&mut self) -> Option<O> {
        self.rx.blocking_recv()
    }

    /// Async receive of the next output (`None` at the end).
    ///
    /// # Cancel safety
    /// Cancel safe: if the future is dropped before it completes, no output is lost.
    pub async fn recv(&mut self) -> Option<O> {
        self.rx.recv().await
    }

    /// Per-stage metrics.
    pub fn metrics(&self) -> Vec<StageSnapshot> {
        self.graph.metrics()
    }

    /// Gauge of graph threads still running.
    pub fn live_threads(&self) -> Arc<AtomicI64> {
        self.graph.live.clone()
    }
}

impl<O> Drop for Run<O> {
    fn drop(&mut self) {
        // Close first so a sink blocked on the full last edge wakes up, then join everything.
        self.rx.close();
        self.graph.shutdown.store(true, Ordering::SeqCst);
        while self.rx.try_recv().is_ok() {}
        self.graph.stop();
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Async I/O for blocking readers.
//
// Object-store clients are async (tokio + hyper). Shard readers are blocking `Read`s on graph threads, so the
// graph owns one small tokio runtime for that I/O and two bridges: `block_on` runs one future to completion,
// `Prefetch` pumps a stream into a bounded queue (read-ahead) that a blocking reader drains. Both work from any
// thread, inside a user's async runtime too (they block the calling thread, never enter the caller's runtime).
// ---------------------------------------------------------------------------------------------------------------

/// Worker threads of the I/O runtime: the futures it drives only wait on sockets.
const IO_THREADS: usize = 2;

/// The process-wide runtime that drives async I/O clients (object storage), started on first use.
fn io_runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: std::sync::OnceLock<std::result::Result<tokio::runtime::Runtime, String>> =
        std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(IO_THREADS)
                .thread_name("juicer-io")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| Error::Stage { stage: "io".into(), detail: format!("cannot start the I/O runtime: {e}") })
}

/// Runs `future` on the I/O runtime and blocks the calling thread until it completes.
pub fn block_on<F>(future: F) -> Result<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let task = io_runtime()?.spawn(future);
    futures::executor::block_on(task)
        .map_err(|e| Error::Stage { stage: "io".into(), detail: format!("I/O task failed: {e}") })
}

/// A stream pumped on the I/O runtime into a bounded queue of `depth` items, drained by a blocking iterator.
///
/// The pump runs ahead of the reader by at most `depth` items (backpressure, as every edge). Dropping the
/// `Prefetch` stops the pump.
pub struct Prefetch<T> {
    rx: tokio::sync::mpsc::Receiver<T>,
    pump: tokio::task::JoinHandle<()>,
}

impl<T: Send + 'static> Prefetch<T> {
    /// Starts pumping `stream`.
    pub fn new(stream: futures::stream::BoxStream<'static, T>, depth: usize) -> Result<Self> {
        use futures::StreamExt;
        let (tx, rx) = tokio::sync::mpsc::channel(depth.max(1));
        let mut stream = stream;
        let pump = io_runtime()?.spawn(async move {
            while let Some(item) = stream.next().await {
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        });
        Ok(Self { rx, pump })
    }
}

impl<T> Iterator for Prefetch<T> {
    type Item = T;

    /// Blocks until the next item; `None` once the stream ended.
    fn next(&mut self) -> Option<T> {
        futures::executor::block_on(self.rx.recv())
    }
}

impl<T> Drop for Prefetch<T> {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::DropReason;

    /// Collects every payload in order.
    struct Collect;

    impl SinkLogic for Collect {
        type In = u64;
        type Meta = ();
        type Out = std::result::Result<u64, String>;

        fn accept(&mut self, item: Envelope<u64, ()>) -> SinkStep<Self::Out> {
            SinkStep::Continue(vec![item.body.map_err(|e| e.key)])
        }

        fn finish(&mut self, failure: Option<Error>) -> Vec<Self::Out> {
            failure.map(|e| Err(e.to_string())).into_iter().collect()
        }
    }

    /// Doubles its inputs and records micro-batch sizes.
    struct Doubler(Arc<Mutex<Vec<usize>>>);

    impl BatchStage for Doubler {
        type In = u64;
        type Out = u64;

        fn process_batch(&mut self, items: Vec<u64>) -> Vec<std::result::Result<u64, SampleError>> {
            if let Ok(mut s) = self.0.lock() {
                s.push(items.len());
            }
            items.into_iter().map(|x| Ok(2 * x)).collect()
        }
    }

    fn source_of(graph: &mut Graph, n: u64, gate: Option<Receiver<()>>) -> (Inlet<Envelope<u64, ()>>, Credits) {
        let me = graph.stage("source", 1);
        graph
            .source(me, 64, move |em: &mut Emitter<u64, ()>| {
                for i in 0..n {
                    if i == 1
                        && let Some(g) = &gate
                    {
                        // Wait until the first item has gone all the way through.
                        let _ = g.recv();
                    }
                    let body = if i == 3 { Err(SampleError::new("bad", DropReason::StageFailed, "x")) } else { Ok(i) };
                    if !em.emit((), body) {
                        return Ok(());
                    }
                }
                Ok(())
            })
            .unwrap()
    }

    #[test]
    fn model_stage_micro_batches_in_order_and_passes_failures_through() {
        let mut g = Graph::new(16);
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let (inlet, credits) = source_of(&mut g, 10, None);
        let s2 = sizes.clone();
        let out = g.model("double", inlet, vec![move || Ok(Doubler(s2))], 4, Duration::from_secs(5)).unwrap();
        let mut run = g.sink(out, credits, Collect, Completion::identity()).unwrap();
        let mut got = Vec::new();
        while let Some(x) = run.blocking_recv() {
            got.push(x);
        }
        let expected: Vec<_> = (0..10u64).map(|i| if i == 3 { Err("bad".to_string()) } else { Ok(2 * i) }).collect();
        assert_eq!(got, expected);
        let sizes = sizes.lock().unwrap().clone();
        assert!(sizes.iter().all(|&s| (1..=4).contains(&s)), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 9, "the failed item never reaches the model");
    }

    #[test]
    fn model_stage_flushes_a_partial_batch_after_max_wait() {
        // The source sends one item and waits until it comes out of the sink: only a flush after
        // `max_wait` lets that happen, since the model wants 8 items.
        let mut g = Graph::new(16);
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let (gate_tx, gate_rx) = crossbeam_channel::bounded(1);
        let (inlet, credits) = source_of(&mut g, 3, Some(gate_rx));
        let s2 = sizes.clone();
        let out = g.model("double", inlet, vec![move || Ok(Doubler(s2))], 8, Duration::from_millis(20)).unwrap();
        let mut run = g.sink(out, credits, Collect, Completion::identity()).unwrap();
        assert_eq!(run.blocking_recv(), Some(Ok(0)));
        assert_eq!(sizes.lock().unwrap().first(), Some(&1));
        gate_tx.send(()).unwrap();
        assert_eq!(run.blocking_recv(), Some(Ok(2)));
    }

    #[test]
    fn model_factories_run_one_thread_per_device_and_report_build_errors() {
        let mut g = Graph::new(4);
        let (inlet, _credits) = source_of(&mut g, 0, None);
        let factories: Vec<Box<dyn FnOnce() -> Result<Doubler> + Send>> = vec![
            Box::new(|| Ok(Doubler(Arc::default()))),
            Box::new(|| Err(Error::Config(vec!["weights: tensor `w` missing".into()]))),
        ];
        let err = g.model("m", inlet, factories, 2, Duration::from_millis(1)).err().expect("build error");
        assert!(err.to_string().contains("tensor `w` missing"), "{err}");
    }

    struct Panicky;

    impl Stage for Panicky {
        type In = u64;
        type Out = u64;

        fn name(&self) -> &'static str {
            "panicky"
        }

        fn process(&self, x: u64) -> std::result::Result<u64, SampleError> {
            if x == 5 {
                panic!("boom at 5");
            }
            Ok(x)
        }
    }

    #[test]
    fn a_panicking_stage_surfaces_as_an_error_and_the_graph_winds_down() {
        let mut g = Graph::new(2);
        let (inlet, credits) = source_of(&mut g, 100, None);
        let out = g.map(inlet, Arc::new(Panicky), 2).unwrap();
        let mut run = g.sink(out, credits, Collect, Completion::identity()).unwrap();
        let live = run.live_threads();
        let mut last = None;
        while let Some(x) = run.blocking_recv() {
            last = Some(x);
        }
        let last = last.unwrap();
        assert!(matches!(&last, Err(m) if m.contains("boom at 5")), "{last:?}");
        drop(run);
        assert_eq!(live.load(Ordering::SeqCst), 0);
    }

    /// Records the failure the sink finishes with, typed.
    struct Keep(Arc<Mutex<Option<Error>>>);

    impl SinkLogic for Keep {
        type In = u64;
        type Meta = ();
        type Out = ();

        fn accept(&mut self, _: Envelope<u64, ()>) -> SinkStep<()> {
            SinkStep::Continue(Vec::new())
        }

        fn finish(&mut self, failure: Option<Error>) -> Vec<()> {
            *self.0.lock().unwrap() = failure;
            Vec::new()
        }
    }

    #[test]
    fn a_source_error_reaches_the_sink_as_the_same_typed_error() {
        let mut g = Graph::new(2);
        let me = g.stage("source", 1);
        let (inlet, credits) = g
            .source(me, 8, |em: &mut Emitter<u64, ()>| {
                em.emit((), Ok(1));
                Err(Error::State("position past the shard's end".into()))
            })
            .unwrap();
        let seen = Arc::new(Mutex::new(None));
        let mut run = g.sink(inlet, credits, Keep(seen.clone()), Completion::identity()).unwrap();
        while run.blocking_recv().is_some() {}
        let live = run.live_threads();
        drop(run);
        assert_eq!(live.load(Ordering::SeqCst), 0);
        let seen = seen.lock().unwrap().take();
        assert!(matches!(&seen, Some(Error::State(m)) if m.contains("past the shard's end")), "{seen:?}");
    }

    /// Stops the run after `stop_at` items, with outputs still on their way to the collators.
    struct StopAt(u64);

    impl SinkLogic for StopAt {
        type In = u64;
        type Meta = ();
        type Out = u64;

        fn accept(&mut self, item: Envelope<u64, ()>) -> SinkStep<u64> {
            match item.body {
                Ok(x) if x + 1 >= self.0 => SinkStep::Stop(vec![x, u64::MAX]),
                Ok(x) => SinkStep::Continue(vec![x]),
                Err(_) => SinkStep::Continue(vec![u64::MAX]),
            }
        }

        fn finish(&mut self, _: Option<Error>) -> Vec<u64> {
            vec![u64::MAX]
        }
    }

    /// Completes slowly, and more slowly for even items, so collators finish out of order.
    fn uneven() -> Arc<dyn Fn(u64) -> String + Send + Sync> {
        Arc::new(|x| {
            std::thread::sleep(Duration::from_millis(if x % 2 == 0 { 6 } else { 1 }));
            format!("#{x}")
        })
    }

    #[test]
    fn collators_complete_in_parallel_and_deliver_in_order() {
        for workers in [1, 3] {
            let mut g = Graph::new(2);
            let (inlet, credits) = source_of(&mut g, 40, None);
            let complete = uneven();
            let mut run = g
                .sink(
                    inlet,
                    credits,
                    StopAt(u64::MAX),
                    Completion { workers, complete: Arc::new(move |x| complete(x)) },
                )
                .unwrap();
            let live = run.live_threads();
            let mut got = Vec::new();
            while let Some(x) = run.blocking_recv() {
                got.push(x);
            }
            let mut want: Vec<String> =
                (0..40).map(|i| if i == 3 { u64::MAX } else { i }).map(|i| format!("#{i}")).collect();
            want.push(format!("#{}", u64::MAX)); // finish()
            assert_eq!(got, want, "{workers} collators");
            let collate = run.metrics().into_iter().find(|s| s.name == "collate").unwrap();
            assert_eq!((collate.workers, collate.items_in, collate.items_out), (workers, 41, 41));
            drop(run);
            assert_eq!(live.load(Ordering::SeqCst), 0);
        }
    }

    #[test]
    fn collators_deliver_what_was_queued_when_the_sink_stops_the_run() {
        let mut g = Graph::new(2);
        let (inlet, credits) = source_of(&mut g, 1000, None);
        let complete = uneven();
        let mut run = g
            .sink(inlet, credits, StopAt(10), Completion { workers: 4, complete: Arc::new(move |x| complete(x)) })
            .unwrap();
        let mut got = Vec::new();
        while let Some(x) = run.blocking_recv() {
            got.push(x);
        }
        assert_eq!(got.len(), 11, "every output before the stop, then the end marker: {got:?}");
        assert_eq!(got.last().map(String::as_str), Some(format!("#{}", u64::MAX).as_str()));
    }

    #[test]
    fn dropping_the_run_joins_collators_blocked_on_the_consumer() {
        let mut g = Graph::new(1);
        let (inlet, credits) = source_of(&mut g, 1000, None);
        let mut run = g
            .sink(inlet, credits, StopAt(u64::MAX), Completion { workers: 3, complete: Arc::new(|x: u64| x) })
            .unwrap();
        assert_eq!(run.blocking_recv(), Some(0));
        std::thread::sleep(Duration::from_millis(50)); // collators fill the last edge and block on it
        let live = run.live_threads();
        drop(run);
        assert_eq!(live.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_panicking_collator_ends_the_run_and_every_thread() {
        let mut g = Graph::new(2);
        let (inlet, credits) = source_of(&mut g, 1000, None);
        let complete: Arc<dyn Fn(u64) -> u64 + Send + Sync> =
            Arc::new(|x| if x == 7 { panic!("collating 7") } else { x });
        let mut run = g.sink(inlet, credits, StopAt(u64::MAX), Completion { workers: 2, complete }).unwrap();
        let mut got = Vec::new();
        while let Some(x) = run.blocking_recv() {
            got.push(x);
        }
        assert_eq!(got, [0, 1, 2, u64::MAX, 4, 5, 6], "outputs up to the one that panicked, in order");
        let live = run.live_threads();
        drop(run);
        assert_eq!(live.load(Ordering::SeqCst), 0);
    }
}
