//! The source side of the graph: reader workers prefetch shards, the sequencer restores the canonical read
//! order, runs the bounded shuffle buffer and emits items with their checkpoint [`Trace`].
//!
//! Reader worker `r` of `R` reads tasks `t ≡ r (mod R)`, where task `t` is shard `t mod S` of pass `t / S`
//! (`S` shards per pass, see [`crate::plan`]). The sequencer consumes task `t` entirely from worker `t mod R`
//! before moving to `t + 1`, so the sample order is the same for every `R`.
//!
//! Shuffle: like webdataset's `shuffle(bufsize)`, fill the buffer to capacity, draw a uniformly random slot
//! (`swap_remove`), repeat; drain at the end. Each emitted item records which positions entered the buffer
//! since the previous draw and the drawn slot, so the consumer can mirror the buffer's contents without
//! holding samples and checkpoint it as a list of positions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{DropReason, Error, Result, SampleError};
use crate::graph::{Emitter, Inlet, Outlet};
use crate::plan::{LoaderState, ShardPlan, Trace};
use crate::rng::SplitMix64;
use crate::sample::{RawSample, SourcePos};
use crate::source::{ReadOptions, Shard};

/// Index marking a whole-shard failure instead of a sample.
pub const SHARD_FAILED: u32 = u32::MAX;

type Item = std::result::Result<RawSample, SampleError>;

/// One message from a reader worker.
pub enum ReadMsg {
    /// Sample `index` of the task's shard.
    Sample(u32, Item),
    /// The task's shard is finished.
    End,
    /// The task's shard could not be opened.
    Failed(Error),
}

/// A message tagged with its task number.
pub struct Tagged {
    task: u64,
    msg: ReadMsg,
}

/// What the readers and the sequencer share.
pub struct ReadSetup {
    /// The resolved global shard list.
    pub shards: Arc<[Shard]>,
    /// This rank's shard order for the epoch.
    pub plan: ShardPlan,
    /// HTTP and read options.
    pub opts: ReadOptions,
    /// Passes the readers may make (1 unless an epoch target forces wrapping).
    pub max_passes: u32,
    /// First position to read.
    pub start: SourcePos,
    /// Shutdown flag of the graph.
    pub shutdown: Arc<AtomicBool>,
}

impl ReadSetup {
    fn per_pass(&self) -> u64 {
        self.plan.shards_per_pass() as u64
    }

    fn first_task(&self) -> u64 {
        u64::from(self.start.pass) * self.per_pass() + u64::from(self.start.shard)
    }

    fn end_task(&self) -> u64 {
        u64::from(self.max_passes) * self.per_pass()
    }

    fn task_pos(&self, t: u64) -> (u32, u32) {
        let per = self.per_pass().max(1);
        ((t / per) as u32, (t % per) as u32)
    }

    fn shard(&self, pass: u32, shard: u32) -> Option<&Shard> {
        self.plan.pass_order(pass).get(shard as usize).and_then(|&g| self.shards.get(g))
    }

    fn unreadable(shard: &Shard, e: &Error) -> SampleError {
        SampleError::new(shard.name(), DropReason::UnreadableShard, e.to_string())
    }
}

/// Body of reader worker `r` of `n`.
pub fn reader_worker(setup: Arc<ReadSetup>, r: usize, n: usize, out: Outlet<Tagged>) {
    let n = n.max(1) as u64;
    let first = setup.first_task();
    let mut t = first + ((r as u64 + n - first % n) % n);
    let mut orders: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    while t < setup.end_task() {
        if setup.shutdown.load(Ordering::Relaxed) {
            return;
        }
        let (pass, s) = setup.task_pos(t);
        let order = orders.entry(pass).or_insert_with(|| setup.plan.pass_order(pass));
        let Some(shard) = order.get(s as usize).and_then(|&g| setup.shards.get(g)) else { return };
        let skip = if t == first { setup.start.index as usize } else { 0 };
        match shard.open(skip, &setup.opts) {
            Err(e) => {
                if !out.send(Tagged { task: t, msg: ReadMsg::Failed(e) }) {
                    return;
                }
            }
            Ok(reader) => {
                for (i, item) in reader.enumerate() {
                    if setup.shutdown.load(Ordering::Relaxed) {
                        return;
                    }
                    if !out.send(Tagged { task: t, msg: ReadMsg::Sample((skip + i) as u32, item) }) {
                        return;
                    }
                }
                if !out.send(Tagged { task: t, msg: ReadMsg::End }) {
                    return;
                }
            }
        }
        orders.retain(|&p, _| p >= pass);
        t += n;
    }
}

/// The canonical sequence of samples, pulled task by task from the reader workers.
struct Ordered<'a> {
    setup: &'a ReadSetup,
    inlets: Vec<Inlet<Tagged>>,
    task: u64,
    cursor: SourcePos,
    /// The pass being read: the next pass only starts once the shuffle buffer has drained this one, so a pass
    /// never mixes with its repetition.
    pass: u32,
}

/// What the canonical sequence yields next.
enum Next {
    Item(SourcePos, Item),
    /// The current pass is fully read; more passes remain.
    PassEnd,
    /// Nothing more: all passes read, or the readers are gone (shutdown).
    Done,
}

impl Ordered<'_> {
    fn next(&mut self) -> Next {
        while self.task < self.setup.end_task() {
            if self.setup.task_pos(self.task).0 > self.pass {
                return Next::PassEnd;
            }
            let inlet = &self.inlets[(self.task % self.inlets.len() as u64) as usize];
            let Some(Tagged { task, msg }) = inlet.recv() else { return Next::Done };
            if task != self.task {
                // Cannot happen: each worker sends its tasks in order. Stop rather than misorder.
                return Next::Done;
            }
            let (pass, shard) = self.setup.task_pos(task);
            match msg {
                ReadMsg::Sample(index, item) => {
                    let pos = SourcePos { pass, shard, index };
                    self.cursor = SourcePos { pass, shard, index: index + 1 };
                    return Next::Item(pos, item);
                }
                ReadMsg::End | ReadMsg::Failed(_) => {
                    self.task += 1;
                    let (p, s) = self.setup.task_pos(self.task);
                    self.cursor = SourcePos { pass: p, shard: s, index: 0 };
                    if let ReadMsg::Failed(e) = msg {
                        let err = match self.setup.shard(pass, shard) {
                            Some(sh) => ReadSetup::unreadable(sh, &e),
                            None => SampleError::new("?", DropReason::UnreadableShard, e.to_string()),
                        };
                        return Next::Item(SourcePos { pass, shard, index: SHARD_FAILED }, Err(err));
                    }
                }
            }
        }
        Next::Done
    }
}

/// Re-reads the samples at `positions` (a checkpointed shuffle buffer), in the given order.
fn refill(setup: &ReadSetup, positions: &[SourcePos]) -> Result<Vec<(SourcePos, Item)>> {
    let mut by_shard: BTreeMap<(u32, u32), Vec<u32>> = BTreeMap::new();
    for p in positions {
        by_shard.entry((p.pass, p.shard)).or_default().push(p.index);
    }
    let mut found: BTreeMap<SourcePos, Item> = BTreeMap::new();
    for ((pass, s), mut wanted) in by_shard {
        wanted.sort_unstable();
        let shard = setup
            .shard(pass, s)
            .ok_or_else(|| Error::State(format!("buffered position pass {pass} shard {s} is outside the plan")))?;
        let first = wanted[0];
        if first == SHARD_FAILED {
            let err = match shard.open(0, &setup.opts) {
                Err(e) => ReadSetup::unreadable(shard, &e),
                Ok(_) => SampleError::new(shard.name(), DropReason::UnreadableShard, "failed earlier".to_string()),
            };
            found.insert(SourcePos { pass, shard: s, index: SHARD_FAILED }, Err(err));
            continue;
        }
        let last = *wanted.iter().filter(|&&i| i != SHARD_FAILED).max().unwrap_or(&first);
        let reader = shard.open(first as usize, &setup.opts)?;
        for (i, item) in reader.enumerate() {
            let index = first + i as u32;
            if wanted.binary_search(&index).is_ok() {
                found.insert(SourcePos { pass, shard: s, index }, item);
            }
            if index >= last {
                break;
            }
        }
    }
    positions
        .iter()
        .map(|p| {
            found.remove(p).map(|item| (*p, item)).ok_or_else(|| {
                Error::State(format!(
                    "buffered sample pass {} shard {} index {} no longer exists in the source",
                    p.pass, p.shard, p.index
                ))
            })
        })
        .collect()
}

/// The sequencer: canonical order → shuffle buffer → emitter. `resume` rebuilds the buffer first.
pub fn sequencer(
    setup: &ReadSetup,
    inlets: Vec<Inlet<Tagged>>,
    resume: &LoaderState,
    capacity: usize,
    emitter: &mut Emitter<RawSample, Trace>,
) -> Result<()> {
    let mut buf = if resume.buffer.is_empty() { Vec::new() } else { refill(setup, &resume.buffer)? };
    let mut rng = SplitMix64::new(resume.shuffle_rng);
    let pass = buf.iter().map(|(p, _)| p.pass).max().unwrap_or(setup.start.pass);
    let mut input = Ordered { setup, inlets, task: setup.first_task(), cursor: setup.start, pass };
    let capacity = capacity.max(1);
    let mut added = Vec::new();
    let mut done = false;
    loop {
        let mut pass_end = false;
        while buf.len() < capacity && !done && !pass_end {
            match input.next() {
                Next::Item(pos, item) => {
                    added.push(pos);
                    buf.push((pos, item));
                }
                Next::PassEnd => pass_end = true,
                Next::Done => done = true,
            }
        }
        if buf.is_empty() {
            if pass_end && !emitter.is_shutdown() {
                input.pass += 1;
                continue;
            }
            return Ok(());
        }
        let slot = rng.below(buf.len());
        let (pos, item) = buf.swap_remove(slot);
        let trace =
            Trace { added: std::mem::take(&mut added), slot: slot as u32, rng: rng.state(), cursor: input.cursor, pos };
        if !emitter.emit(trace, item) {
            return Ok(());
        }
    }
}
