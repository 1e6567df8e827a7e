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

use crate::error::{Error, Result};
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
        let parse = |k: &str| -> Result<Option<usize>> {
            match env(k) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .map(Some)
                    .map_err(|_| Error::Config(vec![format!("environment variable {k}={v:?} is not a number")])),
            }
        };
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
        let parse = |k: &str| -> Result<Option<usize>> {
            env(k)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| Error::Config(vec![format!("environment variable {k}={v:?} is not a number")]))
                })
                .transpose()
        };
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
    /// Buffer slot the item was drawn from (`swap_remove`).
    pub slot: u32,
    /// Shuffle generator state after the draw.
    pub rng: u64,
    /// Next position the readers would read.
    pub cursor: SourcePos,
    /// The item's own position.
    pub pos: SourcePos,
}

/// Iterator state: everything needed to resume a rank's epoch exactly where a consumer stopped.
///
/// Serialise it with serde (JSON is small: the shuffle buffer is a list of positions, not samples).
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
    /// Shuffle generator state.
    pub shuffle_rng: u64,
    /// Positions of the samples in the shuffle buffer, in slot order.
    pub buffer: Vec<SourcePos>,
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
    pub const VERSION: u32 = 1;

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
            shuffle_rng: derive(seed, &[epoch, world.rank as u64, 0x5348]),
            buffer: Vec::new(),
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
        self.buffer.extend_from_slice(&trace.added);
        let slot = trace.slot as usize;
        if slot < self.buffer.len() {
            self.buffer.swap_remove(slot);
        }
        self.shuffle_rng = trace.rng;
        self.cursor = trace.cursor;
    }

    /// Total dropped samples.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
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
        s.apply(&Trace { added: vec![p(0), p(1), p(2)], slot: 0, rng: 1, cursor: p(3), pos: p(0) });
        assert_eq!(s.buffer, vec![p(2), p(1)]);
        s.apply(&Trace { added: vec![p(3)], slot: 1, rng: 2, cursor: p(4), pos: p(1) });
        assert_eq!(s.buffer, vec![p(2), p(3)]);
        assert_eq!(s.shuffle_rng, 2);
    }
}
