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
use crate::plan::{LoaderState, SampleRange, ShardPlan, Trace};
use crate::rng::SplitMix64;
use crate::sample::{RawSample, SHARD_FAILED, SourcePos};
use crate::source::{ReadOptions, Shard, Start};

type Item = std::result::Result<RawSample, SampleError>;

/// One message from a reader worker.
pub enum ReadMsg {
    /// Sample `index` of the task's shard, with the byte offsets where it starts and where the next one
    /// starts, when known.
    Sample {
        /// Index of the sample in its shard.
        index: u32,
        /// Byte offset where the sample starts.
        start: Option<u64>,
        /// Byte offset where the next sample starts.
        end: Option<u64>,
        /// The sample or why it is unusable.
        item: Item,
    },
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

/// What a rank reads in one epoch: one task per shard (plan) or per sample range (elastic epoch).
#[derive(Debug, Clone)]
pub enum Tasks {
    /// Pass after pass over the rank's shards in the plan's order, each shard whole.
    Plan {
        /// This rank's shard order for the epoch.
        plan: ShardPlan,
        /// Passes the readers may make (1 unless an epoch target forces wrapping).
        max_passes: u32,
    },
    /// The sample ranges of an elastic epoch, in order, once (see [`LoaderState::ranges`]).
    Ranges(Vec<SampleRange>),
}

/// What the readers and the sequencer share.
pub struct ReadSetup {
    /// The resolved global shard list.
    pub shards: Arc<[Shard]>,
    /// What this rank reads in the epoch.
    pub tasks: Tasks,
    /// HTTP and read options.
    pub opts: ReadOptions,
    /// First position to read.
    pub start: SourcePos,
    /// Byte offset where the sample at `start` starts, when known.
    pub start_offset: Option<u64>,
    /// Shutdown flag of the graph.
    pub shutdown: Arc<AtomicBool>,
}

impl ReadSetup {
    fn per_pass(&self) -> u64 {
        match &self.tasks {
            Tasks::Plan { plan, .. } => plan.shards_per_pass() as u64,
            Tasks::Ranges(ranges) => ranges.len() as u64,
        }
    }

    fn first_task(&self) -> u64 {
        u64::from(self.start.pass) * self.per_pass() + u64::from(self.start.shard)
    }

    fn end_task(&self) -> u64 {
        match &self.tasks {
            Tasks::Plan { max_passes, .. } => u64::from(*max_passes) * self.per_pass(),
            Tasks::Ranges(ranges) => ranges.len() as u64,
        }
    }

    fn task_pos(&self, t: u64) -> (u32, u32) {
        let per = self.per_pass().max(1);
        ((t / per) as u32, (t % per) as u32)
    }

    /// Global index of the shard at `shard` of pass `pass`.
    fn global(&self, pass: u32, shard: u32) -> Option<usize> {
        match &self.tasks {
            Tasks::Plan { plan, .. } => plan.shard_at(pass, shard as usize),
            Tasks::Ranges(ranges) => ranges.get(shard as usize).map(|r| r.shard),
        }
    }

    fn shard(&self, pass: u32, shard: u32) -> Option<&Shard> {
        self.global(pass, shard).and_then(|g| self.shards.get(g))
    }

    /// Where task `t` starts reading its shard: the resume cursor for the first task, else the task's start.
    fn task_start(&self, t: u64) -> (u32, Option<u64>) {
        let range = match &self.tasks {
            Tasks::Ranges(ranges) if t < self.end_task() => ranges.get(self.task_pos(t).1 as usize),
            _ => None,
        };
        let (index, offset) = range.map_or((0, None), |r| (r.start, r.offset));
        if t == self.first_task() && self.start.index >= index {
            (self.start.index, if self.start.index == index { self.start_offset.or(offset) } else { self.start_offset })
        } else {
            (index, offset)
        }
    }

    /// Index after the last sample task `t` reads from its shard; `u32::MAX` reads to the shard's end.
    fn task_end(&self, t: u64) -> u32 {
        const TO_THE_END: u32 = u32::MAX;
        match &self.tasks {
            Tasks::Plan { .. } => TO_THE_END,
            Tasks::Ranges(ranges) => ranges.get(self.task_pos(t).1 as usize).and_then(|r| r.end).unwrap_or(TO_THE_END),
        }
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
    while t < setup.end_task() {
        if setup.shutdown.load(Ordering::Relaxed) {
            return;
        }
        let (pass, s) = setup.task_pos(t);
        let Some(shard) = setup.shard(pass, s) else { return };
        let (first_index, offset) = setup.task_start(t);
        let end = setup.task_end(t);
        match shard.open_at(Start { index: first_index as usize, offset }, &setup.opts) {
            Err(e) => {
                if !out.send(Tagged { task: t, msg: ReadMsg::Failed(e) }) {
                    return;
                }
            }
            Ok(mut reader) => {
                let mut index = first_index;
                while index < end {
                    if setup.shutdown.load(Ordering::Relaxed) {
                        return;
                    }
                    let start = reader.next_offset();
                    let Some(item) = reader.next() else { break };
                    let msg = ReadMsg::Sample { index, start, end: reader.next_offset(), item };
                    if !out.send(Tagged { task: t, msg }) {
                        return;
                    }
                    index += 1;
                }
                if !out.send(Tagged { task: t, msg: ReadMsg::End }) {
                    return;
                }
            }
        }
        t += n;
    }
}

/// The canonical sequence of samples, pulled task by task from the reader workers.
struct Ordered<'a> {
    setup: &'a ReadSetup,
    inlets: Vec<Inlet<Tagged>>,
    task: u64,
    cursor: SourcePos,
    /// Byte offset where the sample at `cursor` starts, when known.
    cursor_offset: Option<u64>,
    /// The pass being read: the next pass only starts once the shuffle buffer has drained this one, so a pass
    /// never mixes with its repetition.
    pass: u32,
}

/// What the canonical sequence yields next.
enum Next {
    /// A sample at its position, with the byte offset where it starts.
    Item(SourcePos, Option<u64>, Item),
    /// The shard could not be opened where the checkpoint says: the epoch cannot go on.
    Fatal(Error),
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
                ReadMsg::Sample { index, start, end, item } => {
                    let pos = SourcePos { pass, shard, index };
                    self.cursor = SourcePos { pass, shard, index: index + 1 };
                    self.cursor_offset = end;
                    return Next::Item(pos, start, item);
                }
                ReadMsg::Failed(Error::State(m)) => return Next::Fatal(Error::State(m)),
                ReadMsg::End | ReadMsg::Failed(_) => {
                    self.task += 1;
                    let (p, s) = self.setup.task_pos(self.task);
                    let (index, offset) = self.setup.task_start(self.task);
                    self.cursor = SourcePos { pass: p, shard: s, index };
                    self.cursor_offset = offset;
                    if let ReadMsg::Failed(e) = msg {
                        let err = match self.setup.shard(pass, shard) {
                            Some(sh) => ReadSetup::unreadable(sh, &e),
                            None => SampleError::new("?", DropReason::UnreadableShard, e.to_string()),
                        };
                        return Next::Item(SourcePos { pass, shard, index: SHARD_FAILED }, None, Err(err));
                    }
                }
            }
        }
        Next::Done
    }
}

/// Re-reads the samples at `positions` (a checkpointed shuffle buffer), in the given order. Each shard is opened
/// once, at its first buffered sample: at that sample's byte offset when the state knows it.
fn refill(setup: &ReadSetup, state: &LoaderState) -> Result<Vec<(SourcePos, Option<u64>, Item)>> {
    let positions = &state.buffer;
    let mut by_shard: BTreeMap<(u32, u32), Vec<u32>> = BTreeMap::new();
    let mut offsets: BTreeMap<SourcePos, u64> = BTreeMap::new();
    for (i, p) in positions.iter().enumerate() {
        by_shard.entry((p.pass, p.shard)).or_default().push(p.index);
        if let Some(o) = state.buffer_offset(i) {
            offsets.insert(*p, o);
        }
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
        let offset = offsets.get(&SourcePos { pass, shard: s, index: first }).copied();
        let reader = shard.open_at(Start { index: first as usize, offset }, &setup.opts)?;
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
            found.remove(p).map(|item| (*p, offsets.get(p).copied(), item)).ok_or_else(|| {
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
    let mut buf = if resume.buffer.is_empty() { Vec::new() } else { refill(setup, resume)? };
    let mut rng = SplitMix64::new(resume.shuffle_rng);
    let pass = buf.iter().map(|(p, _, _)| p.pass).max().unwrap_or(setup.start.pass);
    let mut input = Ordered {
        setup,
        inlets,
        task: setup.first_task(),
        cursor: setup.start,
        cursor_offset: setup.start_offset,
        pass,
    };
    let capacity = capacity.max(1);
    let mut added = Vec::new();
    let mut added_offsets = Vec::new();
    let mut done = false;
    loop {
        let mut pass_end = false;
        while buf.len() < capacity && !done && !pass_end {
            match input.next() {
                Next::Item(pos, offset, item) => {
                    added.push(pos);
                    added_offsets.push(offset);
                    buf.push((pos, offset, item));
                }
                Next::Fatal(e) => return Err(e),
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
        let (pos, _, item) = buf.swap_remove(slot);
        let trace = Trace {
            added: std::mem::take(&mut added),
            added_offsets: std::mem::take(&mut added_offsets),
            slot: slot as u32,
            rng: rng.state(),
            cursor: input.cursor,
            cursor_offset: input.cursor_offset,
            pos,
        };
        if !emitter.emit(trace, item) {
            return Ok(());
        }
    }
}
