//! Who reads what, in which order: ranks, shard order per epoch, epoch length, and the checkpoint state.
//!
//! # Read order
//! For epoch `e`, the global shard list is permuted by `(seed, e)` (when shard shuffling is on) and rank `r`
//! of `W` takes the shards at positions `r, r + W, r + 2W, ...` of that permutation. One *pass* is a sweep
//! over the rank's shards; pass 0 uses that order, later passes (only when an epoch must be filled, see
//! [`EpochSize`]) re-permute the same set by `(seed, e, pass, r)`. Inside a shard, samples come in file order.
//! Reader workers only prefetch: shard `t` of the sequence is read by worker `t mod R`, but the sequence
//! itself does not depend on `R`.
//!
//! # Equal batch counts across ranks
//! Distributed training hangs when one rank runs out of batches first, so with `world_size > 1` every rank
//! must yield the same number of batches per epoch. [`EpochSize`] chooses how; every rank computes the
//! same number without communicating, from the per-shard sample counts (a header-only scan of the shards,
//! done once per loader).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{DropReason, Error, Result};
use crate::rng::{SplitMix64, derive};
use crate::sample::SourcePos;

/// This process's place in a distributed job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct World {
    /// Rank of this process, `0..world_size`.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
}

impl Default for World {
    fn default() -> Self {
        Self { rank: 0, world_size: 1 }
    }
}

impl World {
    /// Resolves rank and world size: explicit values first, then `RANK`/`WORLD_SIZE` (torchrun), then
    /// `SLURM_PROCID`/`SLURM_NTASKS` (Slurm), else a single process.
    pub fn resolve(rank: Option<usize>, world_size: Option<usize>) -> Result<World> {
        Self::resolve_with(rank, world_size, |k| std::env::var(k).ok())
    }

    /// [`World::resolve`] with an explicit environment lookup (for tests).
    pub fn resolve_with(
        rank: Option<usize>,
        world_size: Option<usize>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<World> {
        let parse = |k: &str| env_number(&env, k);
        let from_env = match (parse("RANK")?, parse("WORLD_SIZE")?) {
            (Some(r), Some(w)) => Some((r, w)),
            _ => match (parse("SLURM_PROCID")?, parse("SLURM_NTASKS")?) {
                (Some(r), Some(w)) => Some((r, w)),
                _ => None,
            },
        };
        let (rank, world_size) = match (rank, world_size, from_env) {
            (Some(r), Some(w), _) => (r, w),
            (r, w, Some((er, ew))) => (r.unwrap_or(er), w.unwrap_or(ew)),
            (r, w, None) => (r.unwrap_or(0), w.unwrap_or(1)),
        };
        let world = World { rank, world_size };
        world.validate().map(|()| world)
    }

    /// The task index and count of an offline job fanned out by a scheduler (`juicer write`), as a world:
    /// explicit values first, then a Slurm job array (`SLURM_ARRAY_TASK_ID` − `SLURM_ARRAY_TASK_MIN` of
    /// `SLURM_ARRAY_TASK_COUNT`), then a Kubernetes Indexed Job (`JOB_COMPLETION_INDEX`; the count must be given,
    /// Kubernetes does not export it), then [`World::resolve`]'s variables.
    pub fn resolve_task(task: Option<usize>, tasks: Option<usize>) -> Result<World> {
        Self::resolve_task_with(task, tasks, |k| std::env::var(k).ok())
    }

    /// [`World::resolve_task`] with an explicit environment lookup (for tests).
    pub fn resolve_task_with(
        task: Option<usize>,
        tasks: Option<usize>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<World> {
        let parse = |k: &str| env_number(&env, k);
        let (rank, world_size) = if let (Some(r), Some(w)) = (task, tasks) {
            (r, w)
        } else if let (Some(id), Some(count)) = (parse("SLURM_ARRAY_TASK_ID")?, parse("SLURM_ARRAY_TASK_COUNT")?) {
            let min = parse("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let index = id.checked_sub(min).ok_or_else(|| {
                Error::Config(vec![format!("SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}")])
            })?;
            (task.unwrap_or(index), tasks.unwrap_or(count))
        } else if let Some(index) = parse("JOB_COMPLETION_INDEX")? {
            let count = tasks.ok_or_else(|| {
                Error::Config(vec![
                    "JOB_COMPLETION_INDEX is set (Kubernetes Indexed Job): give the task count (--world-size, the \
                     Job's `completions`)"
                        .into(),
                ])
            })?;
            (task.unwrap_or(index), count)
        } else {
            return Self::resolve_with(task, tasks, env);
        };
        let world = World { rank, world_size };
        world.validate().map(|()| world)
    }

    fn validate(&self) -> Result<()> {
        if self.world_size == 0 || self.rank >= self.world_size {
            return Err(Error::Config(vec![format!(
                "rank {} is not inside world size {}",
                self.rank, self.world_size
            )]));
        }
        Ok(())
    }
}

/// The number in environment variable `k`, if set.
fn env_number(env: &impl Fn(&str) -> Option<String>, k: &str) -> Result<Option<usize>> {
    env(k)
        .map(|v| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| Error::Config(vec![format!("environment variable {k}={v:?} is not a number")]))
        })
        .transpose()
}

/// How long an epoch is, per rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EpochSize {
    /// `Exhaust` for a single process, `DropRemainder` for several.
    Auto,
    /// One pass over the rank's shards; the last batch may be partial. Ranks may differ in batch count, so
    /// this is only safe with one process.
    Exhaust,
    /// Every rank yields `floor(min_r samples_r / batch_size)` batches: the remainder of the longer ranks is
    /// dropped (it comes first in another epoch, since shard order changes per epoch). Dropped samples are
    /// never read, so they are not in the accounting.
    DropRemainder,
    /// Every rank yields `ceil(max_r samples_r / batch_size)` batches: shorter ranks wrap around and repeat
    /// samples from a re-shuffled pass over their shards.
    RepeatRemainder,
    /// Exactly this many batches per rank and epoch, wrapping around as needed.
    Batches(u64),
}

impl EpochSize {
    /// Whether the epoch length depends on per-shard sample counts.
    pub fn needs_counts(self, world_size: usize) -> bool {
        match self {
            EpochSize::Exhaust | EpochSize::Batches(_) => false,
            EpochSize::Auto => world_size > 1,
            EpochSize::DropRemainder | EpochSize::RepeatRemainder => true,
        }
    }
}

/// Where a rank's reading stands; carried per item so the consumer can checkpoint exactly.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trace {
    /// Positions read into the shuffle buffer just before this item was drawn.
    pub added: Vec<SourcePos>,
    /// Byte offset in its shard where each of `added` starts, when known (same length as `added`).
    pub added_offsets: Vec<Option<u64>>,
    /// Buffer slot the item was drawn from (`swap_remove`).
    pub slot: u32,
    /// Shuffle generator state after the draw.
    pub rng: u64,
    /// Next position the readers would read.
    pub cursor: SourcePos,
    /// Byte offset in its shard where the sample at `cursor` starts, when known.
    pub cursor_offset: Option<u64>,
    /// The item's own position.
    pub pos: SourcePos,
}

/// A run of samples of one shard, `start..end` in file order: a unit of work of an elastic epoch (see
/// [`LoaderState::merge`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleRange {
    /// Index of the shard in the global shard list.
    pub shard: usize,
    /// Index of the first sample.
    pub start: u32,
    /// Index after the last sample; `None`: to the end of the shard.
    pub end: Option<u32>,
    /// Byte offset in the shard where sample `start` starts, when known.
    pub offset: Option<u64>,
}

/// Iterator state: everything needed to resume a rank's epoch exactly where a consumer stopped.
///
/// Serialise it with serde (JSON is small: the shuffle buffer is a list of positions, not samples).
///
/// # Versions
/// Version 2 added byte offsets (`cursor_offset`, `buffer_offsets`), the plan's shape (`n_shards`,
/// `shuffle_shards`) and elastic epochs (`ranges`); all of them default when absent, so a version-1 state
/// still resumes (by skipping samples instead of seeking, and without [`LoaderState::merge`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    /// Format version.
    pub version: u32,
    /// Seed of the run.
    pub seed: u64,
    /// Epoch the state belongs to.
    pub epoch: u64,
    /// Rank and world size.
    pub world: World,
    /// Fingerprint of the shard list (names, order); a state only resumes the same sources.
    pub sources: String,
    /// Shuffle buffer capacity the state was taken with.
    pub shuffle_buffer: usize,
    /// True once the epoch has ended; resuming then starts the next epoch.
    pub epoch_complete: bool,
    /// Next position the readers read.
    pub cursor: SourcePos,
    /// Byte offset in its shard where the sample at `cursor` starts, when known: a resume opens the shard
    /// there with one ranged read instead of skipping `cursor.index` samples.
    #[serde(default)]
    pub cursor_offset: Option<u64>,
    /// Shuffle generator state.
    pub shuffle_rng: u64,
    /// Positions of the samples in the shuffle buffer, in slot order.
    pub buffer: Vec<SourcePos>,
    /// Byte offset where each buffered sample starts, when known (slot order; empty in a version-1 state).
    #[serde(default)]
    pub buffer_offsets: Vec<Option<u64>>,
    /// Shards in the global list (absent in a version-1 state).
    #[serde(default)]
    pub n_shards: Option<usize>,
    /// Whether the shard order is shuffled per epoch (absent in a version-1 state).
    #[serde(default)]
    pub shuffle_shards: Option<bool>,
    /// The sample ranges this rank reads in an elastic epoch (one resumed on another world size, see
    /// [`LoaderState::merge`]), in read order; `None` in an epoch that follows the plan. In an elastic epoch a
    /// position's `shard` is the index of its range in this list, and `pass` is 0.
    #[serde(default)]
    pub ranges: Option<Vec<SampleRange>>,
    /// Items drawn from the shuffle buffer so far this epoch (the epoch position of the next one).
    pub drawn: u64,
    /// Samples taken in so far this epoch (emitted + dropped; with a slice, only those inside it).
    pub samples_read: u64,
    /// Samples emitted in batches so far this epoch.
    pub samples_emitted: u64,
    /// Batches yielded so far this epoch.
    pub batches: u64,
    /// Dropped samples so far this epoch, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Patches kept in emitted samples so far this epoch.
    #[serde(default)]
    pub patches_kept: u64,
    /// Patches of emitted samples so far this epoch (kept or not).
    #[serde(default)]
    pub patches_total: u64,
    /// Classes extracted for emitted samples so far this epoch.
    #[serde(default)]
    pub classes: u64,
    /// Classes added to captions so far this epoch.
    #[serde(default)]
    pub classes_added: u64,
}

impl LoaderState {
    /// Format version written by this build.
    pub const VERSION: u32 = 2;
    /// Oldest format version this build reads.
    pub const MIN_VERSION: u32 = 1;

    /// The state at the start of `epoch`.
    pub fn start(seed: u64, epoch: u64, world: World, sources: String, shuffle_buffer: usize) -> Self {
        Self {
            version: Self::VERSION,
            seed,
            epoch,
            world,
            sources,
            shuffle_buffer,
            epoch_complete: false,
            cursor: SourcePos { pass: 0, shard: 0, index: 0 },
            cursor_offset: None,
            shuffle_rng: derive(seed, &[epoch, world.rank as u64, 0x5348]),
            buffer: Vec::new(),
            buffer_offsets: Vec::new(),
            n_shards: None,
            shuffle_shards: None,
            ranges: None,
            drawn: 0,
            samples_read: 0,
            samples_emitted: 0,
            batches: 0,
            dropped: BTreeMap::new(),
            patches_kept: 0,
            patches_total: 0,
            classes: 0,
            classes_added: 0,
        }
    }

    /// Applies one item's trace: mirrors the shuffle buffer exactly as the reader side changed it.
    pub fn apply(&mut self, trace: &Trace) {
        // Offsets stay aligned with the buffer (a version-1 state resumed has none for its buffer).
        self.buffer_offsets.resize(self.buffer.len(), None);
        self.buffer.extend_from_slice(&trace.added);
        self.buffer_offsets.extend((0..trace.added.len()).map(|i| trace.added_offsets.get(i).copied().flatten()));
        let slot = trace.slot as usize;
        if slot < self.buffer.len() {
            self.buffer.swap_remove(slot);
            self.buffer_offsets.swap_remove(slot);
        }
        self.shuffle_rng = trace.rng;
        self.cursor = trace.cursor;
        self.cursor_offset = trace.cursor_offset;
    }

    /// The byte offset of buffered sample `i` (slot order), when known.
    pub fn buffer_offset(&self, i: usize) -> Option<u64> {
        if self.buffer_offsets.len() == self.buffer.len() { self.buffer_offsets[i] } else { None }
    }

    /// Total dropped samples.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }
}

/// What a resumed state must fit: the shape of the loader's plan for the state's epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateShape {
    /// Shards in the loader's global list.
    pub n_shards: usize,
    /// Whether the loader shuffles the shard order.
    pub shuffle_shards: bool,
    /// The loader's shuffle buffer capacity.
    pub shuffle_buffer: usize,
    /// The loader's batch size.
    pub batch_size: usize,
    /// Shards per pass of this rank in the state's epoch (the plan's; ignored in an elastic epoch).
    pub shards_per_pass: usize,
    /// Sweeps of the rank's shards the epoch may take (the plan's; ignored in an elastic epoch).
    pub max_passes: u32,
}

/// Room left above any counter of a valid state: a state counting past it is tampered with (a real epoch does
/// not read 2^62 samples), and counting on from it must not overflow.
const COUNTER_CEILING: u64 = 1 << 62;

impl LoaderState {
    /// Parses a state serialised as JSON (as `serde_json::to_vec(&state)` writes it). A malformed state (a
    /// negative or overflowing number, a missing field, a wrong type) is [`Error::State`] naming the field's
    /// path (`cursor.index: invalid value: integer `-1`, expected u32 ...`).
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let state: Self = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { "the state".to_string() } else { path };
            Error::State(format!("{field}: {}", e.inner()))
        })?;
        de.end().map_err(|e| Error::State(format!("the state: {e}")))?;
        Ok(state)
    }

    /// Every inconsistency of this state's positions and counters with `shape` and with itself, each naming
    /// its field; empty when the state can resume. Called by [`crate::Juicer::resume`] after the identity checks
    /// (version, seed, world, shard list), so a tampered state is an error before any thread starts, never a
    /// panic or a silently different stream.
    pub fn problems(&self, shape: &StateShape) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(n) = self.n_shards
            && n != shape.n_shards
        {
            p.push(format!("n_shards {n} (loader has {})", shape.n_shards));
        }
        if let Some(s) = self.shuffle_shards
            && s != shape.shuffle_shards
        {
            p.push(format!("shuffle_shards {s} (loader has {})", shape.shuffle_shards));
        }
        if self.buffer.len() > shape.shuffle_buffer.max(1) {
            p.push(format!(
                "buffer holds {} positions, more than the shuffle buffer's {}",
                self.buffer.len(),
                shape.shuffle_buffer
            ));
        }
        if !self.buffer_offsets.is_empty() && self.buffer_offsets.len() != self.buffer.len() {
            p.push(format!(
                "buffer_offsets has {} entries for {} buffered positions",
                self.buffer_offsets.len(),
                self.buffer.len()
            ));
        }
        // Where positions may lie: the readers' tasks are `pass * shards + shard`, `0..passes * shards`, and the
        // cursor may sit on the task after the last one (the epoch's reading is done); buffered samples were
        // read at or before the cursor's task.
        let (passes, shards) = match &self.ranges {
            Some(ranges) => (1u64, ranges.len().max(1) as u64),
            None => (u64::from(shape.max_passes.max(1)), shape.shards_per_pass.max(1) as u64),
        };
        let c = self.cursor;
        let task = |pass: u32, shard: u32| u64::from(pass) * shards + u64::from(shard);
        if u64::from(c.shard) >= shards || task(c.pass, c.shard) > passes * shards {
            p.push(format!(
                "cursor pass {} shard {} is outside the plan ({passes} pass(es) of {shards} shard(s))",
                c.pass, c.shard
            ));
        }
        let misplaced = |b: &SourcePos| u64::from(b.shard) >= shards || task(b.pass, b.shard) > task(c.pass, c.shard);
        if let Some(i) = self.buffer.iter().position(misplaced) {
            let b = self.buffer[i];
            p.push(format!(
                "buffer[{i}] pass {} shard {} index {} is not a position read before the cursor (pass {} shard {})",
                b.pass, b.shard, b.index, c.pass, c.shard
            ));
        }
        let bad_range = |r: &SampleRange| r.shard >= shape.n_shards || r.end.is_some_and(|e| e < r.start);
        if let Some(ranges) = &self.ranges
            && let Some(i) = ranges.iter().position(bad_range)
        {
            let r = ranges[i];
            p.push(format!(
                "ranges[{i}] shard {} samples {}..{:?} is not a range of the loader's {} shard(s)",
                r.shard, r.start, r.end, shape.n_shards
            ));
        }
        for (name, v) in [
            ("epoch", self.epoch),
            ("drawn", self.drawn),
            ("samples_read", self.samples_read),
            ("batches", self.batches),
            ("patches_total", self.patches_total),
            ("classes", self.classes),
        ] {
            if v >= COUNTER_CEILING {
                p.push(format!("{name} {v} is beyond any real epoch"));
            }
        }
        let dropped = self.dropped.values().try_fold(0u64, |a, &n| a.checked_add(n));
        match dropped {
            Some(d) if self.samples_emitted.checked_add(d) == Some(self.samples_read) => {}
            _ => p.push(format!(
                "samples_read {} is not samples_emitted {} + dropped {}",
                self.samples_read,
                self.samples_emitted,
                dropped.map_or_else(|| "(overflowing)".to_string(), |d| d.to_string())
            )),
        }
        if let Some(name) = self.dropped.keys().find(|k| !DropReason::ALL.iter().any(|r| r.as_str() == k.as_str())) {
            p.push(format!("dropped: `{name}` is not a drop reason"));
        }
        if self.samples_read > self.drawn {
            p.push(format!("samples_read {} is more than drawn {}", self.samples_read, self.drawn));
        }
        if self.samples_emitted > self.batches.saturating_mul(shape.batch_size as u64) {
            p.push(format!(
                "samples_emitted {} do not fit in {} batch(es) of {}",
                self.samples_emitted, self.batches, shape.batch_size
            ));
        }
        if self.patches_kept > self.patches_total || self.classes_added > self.classes {
            p.push(format!(
                "patches_kept {} / patches_total {} or classes_added {} / classes {} is inconsistent",
                self.patches_kept, self.patches_total, self.classes_added, self.classes
            ));
        }
        p
    }
}

/// The shard order of one rank for one epoch.
#[derive(Debug, Clone)]
pub struct ShardPlan {
    n_shards: usize,
    seed: u64,
    epoch: u64,
    world: World,
    shuffle: bool,
    rank_set: Vec<usize>,
}

impl ShardPlan {
    /// Plans epoch `epoch` for `world` over `n_shards` shards.
    pub fn new(n_shards: usize, seed: u64, epoch: u64, world: World, shuffle: bool) -> Result<Self> {
        if n_shards < world.world_size {
            return Err(Error::Config(vec![format!(
                "{n_shards} shard(s) cannot be split across {} ranks: every rank needs at least one shard",
                world.world_size
            )]));
        }
        let rank_set = Self::rank_sets(n_shards, seed, epoch, world.world_size, shuffle).swap_remove(world.rank);
        Ok(Self { n_shards, seed, epoch, world, shuffle, rank_set })
    }

    /// The shards (global indices) of every rank for an epoch, each in pass-0 order.
    pub fn rank_sets(n_shards: usize, seed: u64, epoch: u64, world_size: usize, shuffle: bool) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..n_shards).collect();
        if shuffle {
            SplitMix64::new(derive(seed, &[epoch, 0x5348_4152])).shuffle(&mut order);
        }
        let mut sets = vec![Vec::new(); world_size.max(1)];
        for (i, s) in order.into_iter().enumerate() {
            sets[i % world_size.max(1)].push(s);
        }
        sets
    }

    /// Shards per pass for this rank.
    pub fn shards_per_pass(&self) -> usize {
        self.rank_set.len()
    }

    /// Number of shards in the global list.
    pub fn n_shards(&self) -> usize {
        self.n_shards
    }

    /// Global index of the shard at position `i` of `pass`'s order (no copy of the order for pass 0, which every
    /// epoch reads; a repeat pass computes its order).
    pub fn shard_at(&self, pass: u32, i: usize) -> Option<usize> {
        if pass == 0 || !self.shuffle { self.rank_set.get(i).copied() } else { self.pass_order(pass).get(i).copied() }
    }

    /// Global shard indices of this rank in the order of `pass`.
    pub fn pass_order(&self, pass: u32) -> Vec<usize> {
        let mut order = self.rank_set.clone();
        if pass > 0 && self.shuffle {
            SplitMix64::new(derive(self.seed, &[self.epoch, u64::from(pass), self.world.rank as u64]))
                .shuffle(&mut order);
        }
        order
    }

    /// Batches per epoch for this rank under `size`, given every shard's sample count (`None` when the
    /// epoch simply ends with the data, i.e. [`EpochSize::Exhaust`]).
    pub fn target_batches(
        size: EpochSize,
        counts: &[usize],
        seed: u64,
        epoch: u64,
        world_size: usize,
        shuffle: bool,
        batch_size: usize,
    ) -> Option<u64> {
        let per_rank = || -> Vec<u64> {
            Self::rank_sets(counts.len(), seed, epoch, world_size, shuffle)
                .iter()
                .map(|set| set.iter().map(|&s| counts[s] as u64).sum())
                .collect()
        };
        let bs = batch_size.max(1) as u64;
        match size {
            EpochSize::Exhaust => None,
            EpochSize::Auto if world_size <= 1 => None,
            EpochSize::Auto | EpochSize::DropRemainder => Some(per_rank().into_iter().min().unwrap_or(0) / bs),
            EpochSize::RepeatRemainder => Some(per_rank().into_iter().max().unwrap_or(0).div_ceil(bs)),
            EpochSize::Batches(n) => Some(n),
        }
    }
}

/// The samples of one epoch that remain after the ranks of one world stopped at the same step: what
/// [`LoaderState::merge`] makes of their states and [`crate::Juicer::resume_elastic`] continues on another world.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ElasticState {
    /// Format version ([`LoaderState::VERSION`]).
    pub version: u32,
    /// Seed of the run.
    pub seed: u64,
    /// The epoch the states belong to.
    pub epoch: u64,
    /// Fingerprint of the shard list.
    pub sources: String,
    /// Shards in the global list.
    pub n_shards: usize,
    /// World size the states were taken on.
    pub from_world_size: usize,
    /// True when every rank had finished the epoch: resuming starts the next one.
    pub epoch_complete: bool,
    /// Samples each old rank emitted this epoch before the checkpoint, by old rank.
    pub emitted: Vec<u64>,
    /// The samples not yet emitted (nor dropped), in global shard indices, in the order they are dealt out:
    /// buffered samples (coalesced into runs, by shard), then the rest of the shards the ranks were reading, then
    /// the shards no rank had started, each group by global shard.
    pub remaining: Vec<SampleRange>,
}

impl LoaderState {
    /// Combines the states of all `W` ranks of one world, taken at the same step of the same epoch (a trainer
    /// gathers them, e.g. with `torch.distributed.all_gather_object`), into the epoch's remaining samples, so
    /// that [`crate::Juicer::resume_elastic`] can continue the epoch on another world size.
    ///
    /// The states must share seed, epoch, shard list and world size, and be exactly one per rank `0..W`;
    /// otherwise [`Error::State`] says what differs. Per rank, what remains is: the samples in its shuffle
    /// buffer (read, not yet emitted), the rest of the shard its cursor is in (from the cursor's index, with its
    /// byte offset), and its shards not yet started. Only pass 0 of an epoch can be merged: a rank that wrapped
    /// around into a repeat pass (under [`EpochSize::RepeatRemainder`] or [`EpochSize::Batches`]) has already
    /// emitted some samples twice, so "what remains" is no longer a set of samples (error). A rank whose epoch
    /// is complete contributes nothing; when every rank is complete the result says so and resuming it starts
    /// the next epoch. A whole-shard failure sitting in a shuffle buffer is not carried over (it was a drop).
    ///
    /// Merging states of an elastic epoch (taken after a [`crate::Juicer::resume_elastic`]) works the same way.
    pub fn merge(states: &[LoaderState]) -> Result<ElasticState> {
        let first = states.first().ok_or_else(|| Error::State("no loader states to merge".into()))?;
        let w = first.world.world_size;
        let mut problems = Vec::new();
        for s in states {
            let r = s.world.rank;
            if !(Self::MIN_VERSION..=Self::VERSION).contains(&s.version) {
                problems.push(format!(
                    "rank {r}: state version {} (this build reads up to {})",
                    s.version,
                    Self::VERSION
                ));
            }
            if s.seed != first.seed {
                problems.push(format!("rank {r}: seed {} (rank {} has {})", s.seed, first.world.rank, first.seed));
            }
            if s.epoch != first.epoch {
                problems.push(format!("rank {r}: epoch {} (rank {} has {})", s.epoch, first.world.rank, first.epoch));
            }
            if s.sources != first.sources {
                problems.push(format!("rank {r}: the shard list differs from rank {}'s", first.world.rank));
            }
            if s.world.world_size != w {
                problems
                    .push(format!("rank {r}: world size {} (rank {} has {w})", s.world.world_size, first.world.rank));
            }
            if s.n_shards != first.n_shards || s.shuffle_shards != first.shuffle_shards {
                problems
                    .push(format!("rank {r}: shard count or shard shuffling differs from rank {}'s", first.world.rank));
            }
        }
        let mut seen = vec![0usize; w];
        for s in states {
            if let Some(n) = seen.get_mut(s.world.rank) {
                *n += 1;
            }
        }
        let missing: Vec<usize> = (0..w).filter(|&r| seen[r] == 0).collect();
        let twice: Vec<usize> = (0..w).filter(|&r| seen[r] > 1).collect();
        if !missing.is_empty() {
            problems.push(format!("no state for rank(s) {missing:?} of world size {w}"));
        }
        if !twice.is_empty() {
            problems.push(format!("several states for rank(s) {twice:?}"));
        }
        if states.iter().any(|s| s.world.rank >= w) {
            problems.push(format!("a state's rank is outside world size {w}"));
        }
        if !problems.is_empty() {
            return Err(Error::State(format!("cannot merge the loader states: {}", problems.join("; "))));
        }
        let (Some(n_shards), Some(shuffle)) = (first.n_shards, first.shuffle_shards) else {
            return Err(Error::State(
                "cannot merge loader states of format version 1 (they lack the shard count); take them with this build"
                    .into(),
            ));
        };
        let mut merged = ElasticState {
            version: Self::VERSION,
            seed: first.seed,
            epoch: first.epoch,
            sources: first.sources.clone(),
            n_shards,
            from_world_size: w,
            epoch_complete: states.iter().all(|s| s.epoch_complete),
            emitted: vec![0; w],
            remaining: Vec::new(),
        };
        for s in states {
            merged.emitted[s.world.rank] = s.samples_emitted;
        }
        if merged.epoch_complete {
            return Ok(merged);
        }
        let sets = ShardPlan::rank_sets(n_shards, first.seed, first.epoch, w, shuffle);
        let mut singles: Vec<(usize, u32, Option<u64>)> = Vec::new();
        let mut partial = Vec::new();
        let mut whole = Vec::new();
        let mut ordered: Vec<&LoaderState> = states.iter().collect();
        ordered.sort_by_key(|s| s.world.rank);
        for s in ordered {
            if s.epoch_complete {
                continue;
            }
            let r = s.world.rank;
            // A cursor at the very start of pass 1 has read nothing of it: pass 0 is all read, not wrapped.
            let wrapped = s.buffer.iter().any(|p| p.pass > 0)
                || s.cursor.pass > 1
                || (s.cursor.pass == 1 && (s.cursor.shard, s.cursor.index) != (0, 0));
            if wrapped {
                return Err(Error::State(format!(
                    "rank {r} has wrapped around into repeat pass {} of epoch {}: some samples were emitted twice, so \
                     the epoch's remaining samples are not defined; resume on the same world, or merge at an epoch \
                     boundary",
                    s.cursor.pass.max(s.buffer.iter().map(|p| p.pass).max().unwrap_or(0)),
                    s.epoch
                )));
            }
            let tasks: Vec<SampleRange> = match &s.ranges {
                Some(ranges) => ranges.clone(),
                None => sets[r].iter().map(|&g| SampleRange { shard: g, start: 0, end: None, offset: None }).collect(),
            };
            let task = |i: u32| {
                tasks.get(i as usize).copied().ok_or_else(|| {
                    Error::State(format!("rank {r}: position in shard {i} is outside its {} shard(s)", tasks.len()))
                })
            };
            for (i, p) in s.buffer.iter().enumerate() {
                if p.index == crate::sample::SHARD_FAILED {
                    continue;
                }
                singles.push((task(p.shard)?.shard, p.index, s.buffer_offset(i)));
            }
            let k = if s.cursor.pass > 0 { tasks.len() } else { s.cursor.shard as usize };
            if let Some(t) = tasks.get(k) {
                if s.cursor.index > t.start {
                    let rest = SampleRange { start: s.cursor.index, offset: s.cursor_offset, ..*t };
                    if rest.end.is_none_or(|e| rest.start < e) {
                        partial.push(rest);
                    }
                } else {
                    let rest = if s.cursor.index == t.start && s.cursor_offset.is_some() {
                        SampleRange { offset: s.cursor_offset, ..*t }
                    } else {
                        *t
                    };
                    if rest.start == 0 && rest.end.is_none() { whole.push(rest) } else { partial.push(rest) }
                }
            }
            for t in tasks.iter().skip(k + 1) {
                if t.start == 0 && t.end.is_none() { whole.push(*t) } else { partial.push(*t) }
            }
        }
        singles.sort_unstable_by_key(|&(g, i, _)| (g, i));
        let mut buffered: Vec<SampleRange> = Vec::new();
        for (g, i, offset) in singles {
            match buffered.last_mut() {
                Some(last) if last.shard == g && last.end == Some(i) => last.end = Some(i + 1),
                _ => buffered.push(SampleRange { shard: g, start: i, end: Some(i + 1), offset }),
            }
        }
        partial.sort_unstable_by_key(|t| (t.shard, t.start));
        whole.sort_unstable_by_key(|t| t.shard);
        merged.remaining = buffered.into_iter().chain(partial).chain(whole).collect();
        Ok(merged)
    }
}

impl ElasticState {
    /// Cuts the remaining samples into `world_size` contiguous pieces of nearly equal sample counts (they
    /// differ by at most one), given every shard's sample count; piece `r` is what rank `r` reads. Ranges are
    /// resolved against the counts (an open end becomes the shard's count) and empty ones left out; a range
    /// cut in two keeps its byte offset on the first part only.
    pub fn pieces(&self, counts: &[usize], world_size: usize) -> Result<Vec<Vec<SampleRange>>> {
        if counts.len() != self.n_shards {
            return Err(Error::State(format!(
                "the merged state has {} shards, the loader {}",
                self.n_shards,
                counts.len()
            )));
        }
        let mut resolved = Vec::with_capacity(self.remaining.len());
        for r in &self.remaining {
            let count = u32::try_from(counts.get(r.shard).copied().unwrap_or(0)).unwrap_or(u32::MAX);
            let end = r.end.unwrap_or(count);
            if end > count || r.start > end {
                return Err(Error::State(format!(
                    "shard {} has {count} samples, but the merged state needs samples {}..{end}: the shard changed",
                    r.shard, r.start
                )));
            }
            if r.start < end {
                resolved.push(SampleRange { end: Some(end), ..*r });
            }
        }
        let len = |r: &SampleRange| u64::from(r.end.unwrap_or(r.start) - r.start);
        let total: u64 = resolved.iter().map(len).sum();
        let world = world_size.max(1) as u64;
        let mut pieces = vec![Vec::new(); world_size.max(1)];
        let mut queue = resolved.into_iter();
        let mut current: Option<SampleRange> = None;
        for (rank, piece) in pieces.iter_mut().enumerate() {
            let r = rank as u64;
            let mut want = total * (r + 1) / world - total * r / world;
            while want > 0 {
                let Some(range) = current.take().or_else(|| queue.next()) else { break };
                let n = len(&range);
                if n <= want {
                    piece.push(range);
                    want -= n;
                } else {
                    let cut = range.start + want as u32;
                    piece.push(SampleRange { end: Some(cut), ..range });
                    current = Some(SampleRange { start: cut, offset: None, ..range });
                    want = 0;
                }
            }
        }
        Ok(pieces)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_tasks_from_slurm_kubernetes_or_flags() {
        let slurm = [("SLURM_ARRAY_TASK_ID", "7"), ("SLURM_ARRAY_TASK_MIN", "5"), ("SLURM_ARRAY_TASK_COUNT", "3")];
        assert_eq!(World::resolve_task_with(None, None, env(&slurm)).unwrap(), World { rank: 2, world_size: 3 });
        let k8s = [("JOB_COMPLETION_INDEX", "1")];
        assert_eq!(World::resolve_task_with(None, Some(4), env(&k8s)).unwrap(), World { rank: 1, world_size: 4 });
        assert!(World::resolve_task_with(None, None, env(&k8s)).is_err(), "Kubernetes gives no count");
        assert_eq!(World::resolve_task_with(Some(0), Some(2), env(&slurm)).unwrap(), World { rank: 0, world_size: 2 });
        assert_eq!(World::resolve_task_with(None, None, env(&[])).unwrap(), World::default());
        let bad = [("SLURM_ARRAY_TASK_ID", "3"), ("SLURM_ARRAY_TASK_COUNT", "3")];
        assert!(World::resolve_task_with(None, None, env(&bad)).is_err(), "index 3 of 3");
    }

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn world_precedence() {
        let torch = [("RANK", "2"), ("WORLD_SIZE", "4"), ("SLURM_PROCID", "1"), ("SLURM_NTASKS", "8")];
        assert_eq!(World::resolve_with(None, None, env(&torch)).unwrap(), World { rank: 2, world_size: 4 });
        assert_eq!(World::resolve_with(Some(0), Some(2), env(&torch)).unwrap(), World { rank: 0, world_size: 2 });
        let slurm = [("SLURM_PROCID", "1"), ("SLURM_NTASKS", "8")];
        assert_eq!(World::resolve_with(None, None, env(&slurm)).unwrap(), World { rank: 1, world_size: 8 });
        assert_eq!(World::resolve_with(None, None, env(&[])).unwrap(), World::default());
        assert!(World::resolve_with(Some(3), Some(3), env(&[])).is_err());
        assert!(World::resolve_with(None, None, env(&[("RANK", "x"), ("WORLD_SIZE", "2")])).is_err());
    }

    #[test]
    fn rank_sets_partition_the_shards() {
        let sets = ShardPlan::rank_sets(10, 3, 1, 3, true);
        let mut all: Vec<usize> = sets.concat();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_ne!(sets, ShardPlan::rank_sets(10, 3, 2, 3, true), "order changes with the epoch");
    }

    #[test]
    fn target_batches_policies() {
        // 3 shards of 10, 10, 5 samples over 2 ranks without shuffle: rank 0 gets shards 0 and 2 (15), rank 1 gets 10.
        let counts = [10, 10, 5];
        let t = |s| ShardPlan::target_batches(s, &counts, 0, 0, 2, false, 4);
        assert_eq!(t(EpochSize::DropRemainder), Some(2));
        assert_eq!(t(EpochSize::Auto), Some(2));
        assert_eq!(t(EpochSize::RepeatRemainder), Some(4));
        assert_eq!(t(EpochSize::Batches(7)), Some(7));
        assert_eq!(t(EpochSize::Exhaust), None);
        assert_eq!(ShardPlan::target_batches(EpochSize::Auto, &counts, 0, 0, 1, false, 4), None);
    }

    #[test]
    fn state_mirror_follows_swap_remove() {
        let p = |i| SourcePos { pass: 0, shard: 0, index: i };
        let mut s = LoaderState::start(0, 0, World::default(), String::new(), 3);
        let t = |added: Vec<SourcePos>, slot, rng, cursor, pos| {
            let added_offsets = added.iter().map(|q: &SourcePos| Some(u64::from(q.index) * 1024)).collect();
            Trace { added, added_offsets, slot, rng, cursor, cursor_offset: None, pos }
        };
        s.apply(&t(vec![p(0), p(1), p(2)], 0, 1, p(3), p(0)));
        assert_eq!(s.buffer, vec![p(2), p(1)]);
        assert_eq!(s.buffer_offsets, vec![Some(2048), Some(1024)]);
        s.apply(&t(vec![p(3)], 1, 2, p(4), p(1)));
        assert_eq!(s.buffer, vec![p(2), p(3)]);
        assert_eq!(s.buffer_offsets, vec![Some(2048), Some(3072)]);
        assert_eq!(s.shuffle_rng, 2);
    }

    #[test]
    fn pieces_are_contiguous_and_nearly_equal() {
        let r = |shard, start, end, offset| SampleRange { shard, start, end, offset };
        let merged = ElasticState {
            version: LoaderState::VERSION,
            seed: 0,
            epoch: 0,
            sources: String::new(),
            n_shards: 3,
            from_world_size: 2,
            epoch_complete: false,
            emitted: vec![0, 0],
            remaining: vec![
                r(0, 2, Some(4), Some(10)),
                r(1, 3, None, Some(99)),
                r(2, 0, None, None),
                r(0, 9, None, None),
            ],
        };
        // 2 + 7 + 5 + 0 (shard 0 has 9 samples) = 14 samples over 3 ranks: 4, 5, 5.
        let pieces = merged.pieces(&[9, 10, 5], 3).unwrap();
        assert_eq!(pieces[0], vec![r(0, 2, Some(4), Some(10)), r(1, 3, Some(5), Some(99))]);
        assert_eq!(pieces[1], vec![r(1, 5, Some(10), None)]);
        assert_eq!(pieces[2], vec![r(2, 0, Some(5), None)]);
        assert!(merged.pieces(&[9, 2, 5], 3).unwrap_err().to_string().contains("shard changed"));
        assert_eq!(merged.pieces(&[9, 10, 5], 20).unwrap().iter().filter(|p| !p.is_empty()).count(), 14);
    }
}
