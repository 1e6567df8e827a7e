//! How long an epoch is: the sample count of every shard (from a manifest or folder source, the count cache or a
//! header-only scan, once per loader) and, from the counts and the epoch policy ([`crate::EpochSize`]), the
//! samples and batches this rank reads in an epoch, and how many sweeps of its shard list that may take.

use super::{Juicer, SCAN_JOBS};
use crate::error::{Error, Result};
use crate::plan::ShardPlan;
use crate::source::{Manifest, Shard};

impl<O: Send + 'static> Juicer<O> {
    /// Sample count of every shard, done once and cached: from the manifest (or folder JSONL) where the sources
    /// give it, else from the count cache ([`crate::Config::count_cache`]) or a header-only scan of the shards whose
    /// count is unknown, [`SCAN_JOBS`] at a time, with a progress line on a terminal.
    pub fn shard_counts(&self) -> Result<Vec<usize>> {
        self.shared
            .counts
            .get_or_init(|| {
                let s = &self.shared;
                let unknown: Vec<Shard> =
                    s.shards.iter().zip(s.known.iter()).filter(|(_, k)| k.is_none()).map(|(x, _)| x.clone()).collect();
                let mut scanned = if unknown.is_empty() {
                    Vec::new()
                } else {
                    let n = unknown.len();
                    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
                    // The library's one progress line: a scan over many remote shards takes a while.
                    let progress = |done: usize| {
                        if terminal && (done == n || done.is_multiple_of(16)) {
                            eprint!(
                                "\rjuicer: counting samples (no manifest): {done}/{n} shards{}",
                                if done == n { "\n" } else { "" }
                            );
                        }
                    };
                    let cache = s.config.count_cache.as_deref();
                    Manifest::index_cached(&unknown, &s.config.read, SCAN_JOBS, cache, &progress)
                        .map_err(|e| e.to_string())?
                        .shards
                }
                .into_iter();
                s.known
                    .iter()
                    .map(|k| match k {
                        Some(n) => Ok(*n as usize),
                        None => scanned.next().map(|m| m.nsamples as usize).ok_or_else(|| "scan incomplete".into()),
                    })
                    .collect::<std::result::Result<Vec<_>, String>>()
            })
            .clone()
            .map_err(|e| Error::Config(vec![format!("counting samples per shard: {e}")]))
    }

    /// Batches every rank yields in `epoch` when ranks are kept equal (`None`: each rank reads its shards once).
    pub(super) fn target_batches(&self, counts: &[usize], epoch: u64) -> Option<u64> {
        let cfg = &self.shared.config;
        let w = self.shared.world;
        ShardPlan::target_batches(
            cfg.epoch_size,
            counts,
            cfg.seed,
            epoch,
            w.world_size,
            cfg.shuffle_shards,
            cfg.batch_size,
        )
    }

    /// Samples in this rank's shards in `epoch`.
    pub(super) fn rank_samples(&self, counts: &[usize], epoch: u64) -> u64 {
        let cfg = &self.shared.config;
        let w = self.shared.world;
        ShardPlan::rank_sets(counts.len(), cfg.seed, epoch, w.world_size, cfg.shuffle_shards)[w.rank]
            .iter()
            .map(|&s| counts[s] as u64)
            .sum()
    }

    /// Samples this rank reads in `epoch` (from the shard counts and the epoch policy).
    pub fn epoch_samples(&self, epoch: u64) -> Result<u64> {
        let cfg = &self.shared.config;
        let counts = self.shard_counts()?;
        let n = match self.target_batches(&counts, epoch) {
            Some(b) => b * cfg.batch_size as u64,
            None => self.rank_samples(&counts, epoch),
        };
        let n = match cfg.range {
            Some((a, b)) => n.min(b).saturating_sub(a),
            None => n,
        };
        Ok(cfg.limit.map_or(n, |l| n.min(l)))
    }

    /// Batches this rank yields in `epoch`: exact when ranks are kept equal (a batch target); otherwise the
    /// batches its samples fill, the last one possibly short (samples dropped as bad make it fewer).
    pub fn epoch_batches(&self, epoch: u64) -> Result<u64> {
        Ok(self.epoch_samples(epoch)?.div_ceil(self.shared.config.batch_size.max(1) as u64))
    }

    /// Batches this rank must yield in `epoch` when ranks are kept equal, and how many sweeps of its shard list
    /// may be needed to reach them.
    pub(super) fn epoch_target(&self, epoch: u64) -> Result<(Option<u64>, u32)> {
        let s = &self.shared;
        let cfg = &s.config;
        let needs_counts = cfg.epoch_size.needs_counts(s.world.world_size);
        let counts = if needs_counts { self.shard_counts()? } else { vec![0; s.shards.len()] };
        let target = self.target_batches(&counts, epoch);
        let max_passes = match target {
            None => 1,
            Some(t) => {
                let rank_count = if needs_counts { self.rank_samples(&counts, epoch) } else { 0 };
                let need = t * cfg.batch_size as u64;
                if rank_count == 0 { 64 } else { (need.div_ceil(rank_count) + 1).min(1 << 16) as u32 }
            }
        };
        Ok((target, max_passes))
    }
}
