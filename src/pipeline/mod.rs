//! The public face of the library: [`JuicerBuilder`] → [`Juicer`], consumed as a blocking iterator
//! ([`Juicer::iter`]), an async `Stream` ([`Juicer::stream`]) or through burn's `DataLoader` trait.
//!
//! A [`Juicer`] is the loader for a whole training run; each `iter()`/`stream()` call runs one epoch (the
//! next one, or the one a loaded [`LoaderState`] points into) on a fresh stage graph that lives exactly as
//! long as the returned iterator or stream.
//!
//! One concern per file:
//! - `mod.rs`: [`Juicer`] (the loader's handle: shards, `iter`/`stream`, `juice` over in-memory samples);
//! - `epochs.rs`: shard sample counts, samples and batches per rank and epoch;
//! - `resume.rs`: the epoch counter, exact and elastic resumption from checkpointed states;
//! - `iter.rs`: [`JuicerIter`] (one epoch in progress: iterator, stream, state, summary);
//! - `config.rs`: [`Config`] and [`LastStage`];
//! - `builder.rs`: [`JuicerBuilder`];
//! - `models.rs`: model loading at build time and the score cache's namespace;
//! - `topology.rs`: the stage graph of one epoch, wired in diagram order;
//! - `sink.rs`: the ordered sink (accounting, checkpoint mirror, cutting batches), the collation behind it and
//!   [`Summary`];
//! - `loader.rs`: burn's `DataLoader` trait.

mod builder;
mod config;
mod epochs;
mod iter;
mod loader;
mod models;
mod resume;
mod sink;
mod topology;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use burn::data::dataloader::batcher::Batcher;
use burn::tensor::Device;
use futures::Stream;

pub use builder::JuicerBuilder;
pub use config::{Config, LastStage};
pub use iter::JuicerIter;
use models::Models;
pub use sink::{MAX_LISTED_SHARD_FAILURES, ShardFailure, Summary};
use topology::EpochSetup;

use crate::error::{Error, Result, SampleError};
use crate::plan::{LoaderState, ShardPlan, World};
use crate::reader::Tasks;
use crate::sample::JuicedSample;
use crate::source::Shard;

/// Shards whose sample count is scanned at a time when the sources give none (no manifest).
pub const SCAN_JOBS: usize = 8;

#[derive(Debug)]
struct Shared {
    shards: Arc<[Shard]>,
    config: Config,
    world: World,
    fingerprint: String,
    counts: OnceLock<std::result::Result<Vec<usize>, String>>,
    /// Per shard, the sample count the sources gave (manifest, folder JSONL), if any.
    known: Arc<[Option<u64>]>,
    models: Models,
}

#[derive(Debug, Clone)]
enum Next {
    Epoch(u64),
    Resume(Box<LoaderState>),
}

/// The loader. Cheap to clone handles share the sources and the epoch counter.
pub struct Juicer<O> {
    shared: Arc<Shared>,
    batcher: Arc<dyn Batcher<JuicedSample, O>>,
    device: Device,
    next: Arc<Mutex<Next>>,
}

impl<O> Clone for Juicer<O> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            batcher: self.batcher.clone(),
            device: self.device.clone(),
            next: self.next.clone(),
        }
    }
}

impl<O> std::fmt::Debug for Juicer<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Juicer").field("shared", &self.shared).field("device", &self.device).finish()
    }
}

impl<O: Send + 'static> Juicer<O> {
    /// The resolved shard list.
    pub fn shards(&self) -> &[Shard] {
        &self.shared.shards
    }

    /// This process's rank and world size.
    pub fn world(&self) -> World {
        self.shared.world
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The device batches are created on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether [`Juicer::shard_counts`] answers without reading any shard: a manifest (or folder source) gave
    /// every count, or they were counted already.
    pub fn counts_are_known(&self) -> bool {
        self.shared.counts.get().is_some() || self.shared.known.iter().all(Option::is_some)
    }

    /// Juices samples that do not come from a shard (bytes in memory, e.g. one batch of another pipeline) into
    /// one batch, on the calling thread: the stages an epoch's graph runs, in the same order, models in
    /// micro-batches, without the score cache; enrichment draws as in epoch 0. Returns the batch of the samples
    /// that made it, in input order, and the dropped ones, each naming its key (under [`OnError::Fail`], the
    /// first bad sample is the error instead).
    ///
    /// [`OnError::Fail`]: crate::OnError::Fail
    pub fn juice(&self, samples: Vec<crate::sample::RawSample>) -> Result<(O, Vec<SampleError>)> {
        let s = &self.shared;
        let results = topology::juice_inline(&s.config, &s.models, &self.device, 0, samples)?;
        let mut kept = Vec::with_capacity(results.len());
        let mut dropped = Vec::new();
        for r in results {
            match r {
                Ok(x) => kept.push(x),
                Err(e) if s.config.on_error == crate::OnError::Fail => return Err(Error::Sample(e)),
                Err(e) => dropped.push(e),
            }
        }
        Ok((self.batcher.batch(kept, &self.device), dropped))
    }

    /// Runs the next epoch (or the resumed one) as a blocking iterator.
    pub fn iter(&self) -> Result<JuicerIter<O>> {
        let next = {
            let mut guard = self.next.lock().map_err(|_| Error::State("loader lock poisoned".into()))?;
            let next = guard.clone();
            *guard = Next::Epoch(match &next {
                Next::Epoch(e) => e + 1,
                Next::Resume(s) => s.epoch.saturating_add(1),
            });
            next
        };
        let state = match next {
            Next::Epoch(e) => self.fresh_state(e),
            Next::Resume(s) => *s,
        };
        self.start(state)
    }

    /// Runs one given epoch from its start, leaving the epoch counter alone.
    pub fn iter_epoch(&self, epoch: u64) -> Result<JuicerIter<O>> {
        self.start(self.fresh_state(epoch))
    }

    /// Runs the next epoch as an async `Stream`. Dropping the stream stops and joins the stage threads; the
    /// join is synchronous but short (threads notice within one 25 ms poll), so dropping inside a task blocks
    /// that worker thread only briefly.
    pub fn stream(&self) -> Result<impl Stream<Item = Result<O>> + Send + 'static> {
        Ok(self.iter()?.into_stream())
    }

    fn start(&self, state: LoaderState) -> Result<JuicerIter<O>> {
        let s = &self.shared;
        if s.shards.is_empty() {
            return Err(Error::Config(vec![
                "no shards to iterate (built with `build_inline`, for `juice` only)".into(),
            ]));
        }
        let cfg = &s.config;
        let (tasks, target) = match &state.ranges {
            // An elastic epoch: the rank's piece, once, to its end.
            Some(ranges) => (Tasks::Ranges(ranges.clone()), None),
            None => {
                let plan = ShardPlan::new(s.shards.len(), cfg.seed, state.epoch, s.world, cfg.shuffle_shards)?;
                let (target, max_passes) = self.epoch_target(state.epoch)?;
                (Tasks::Plan { plan, max_passes }, target)
            }
        };
        let first_state = state.clone();
        let piece_samples = state
            .ranges
            .as_ref()
            .map(|r| r.iter().map(|x| u64::from(x.end.unwrap_or(x.start).saturating_sub(x.start))).sum::<u64>());
        let run = topology::run_epoch(EpochSetup {
            shards: s.shards.clone(),
            config: cfg,
            models: &s.models,
            tasks,
            target,
            state,
            batcher: self.batcher.clone(),
            device: self.device.clone(),
        })?;
        let total = piece_samples.or_else(|| {
            s.counts.get().and_then(|c| c.as_ref().ok()).and_then(|_| self.epoch_samples(first_state.epoch).ok())
        });
        Ok(JuicerIter {
            run,
            forwards: s.models.cam.forwards(),
            io: s.config.read.stats.clone(),
            score_cache: s.models.score_cache.clone(),
            state: first_state,
            dropped: Vec::new(),
            unreadable: Vec::new(),
            started: Instant::now(),
            trimmed: Instant::now(),
            total,
            finished: false,
        })
    }
}

impl Shared {
    fn clone_config(&self) -> Shared {
        Shared {
            shards: self.shards.clone(),
            config: self.config.clone(),
            world: self.world,
            fingerprint: self.fingerprint.clone(),
            counts: self.counts.get().cloned().map(OnceLock::from).unwrap_or_default(),
            known: self.known.clone(),
            models: self.models.clone(),
        }
    }
}
