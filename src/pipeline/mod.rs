//! The public face of the library: [`JuicerBuilder`] → [`Juicer`], consumed as a blocking iterator
//! ([`Juicer::iter`]), an async `Stream` ([`Juicer::stream`]) or through burn's `DataLoader` trait.
//!
//! A [`Juicer`] is the loader for a whole training run; each `iter()`/`stream()` call runs one epoch (the
//! next one, or the one a loaded [`LoaderState`] points into) on a fresh stage graph that lives exactly as
//! long as the returned iterator or stream.
//!
//! One concern per file:
//! - `mod.rs`: [`Juicer`] (shards, epochs, resume) and [`JuicerIter`] (one epoch in progress);
//! - `config.rs`: [`Config`] and [`LastStage`];
//! - `builder.rs`: [`JuicerBuilder`];
//! - `models.rs`: model loading at build time and the score cache's namespace;
//! - `topology.rs`: the stage graph of one epoch, wired in diagram order;
//! - `sink.rs`: the ordered sink (accounting, checkpoint mirror, batching) and [`Summary`];
//! - `loader.rs`: burn's `DataLoader` trait.

mod builder;
mod config;
mod loader;
mod models;
mod sink;
mod topology;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use burn::data::dataloader::batcher::Batcher;
use burn::tensor::Device;
use futures::Stream;

pub use builder::JuicerBuilder;
pub use config::{Config, LastStage};
use models::Models;
use sink::Output;
pub use sink::{MAX_LISTED_SHARD_FAILURES, ShardFailure, Summary};
use topology::EpochSetup;

use crate::error::{DropReason, Error, Result, SampleError};
use crate::graph::{Run, StageSnapshot};
use crate::plan::{ElasticState, LoaderState, ShardPlan, StateShape, World};
use crate::reader::Tasks;
use crate::rng::derive;
use crate::sample::JuicedSample;
use crate::sample::SourcePos;
use crate::source::{Manifest, Shard};

/// Shards whose sample count is scanned at a time when the sources give none (no manifest).
pub const SCAN_JOBS: usize = 8;
use crate::vision::cache::ScoreCache;

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

    /// Sample count of every shard, done once and cached: from the manifest (or folder JSONL) where the sources
    /// give it, else from the count cache ([`Config::count_cache`]) or a header-only scan of the shards whose
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
    fn target_batches(&self, counts: &[usize], epoch: u64) -> Option<u64> {
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
    fn rank_samples(&self, counts: &[usize], epoch: u64) -> u64 {
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

    /// The epoch the next `iter()`/`stream()` runs (or continues, after [`Juicer::resume`]).
    pub fn next_epoch(&self) -> Result<u64> {
        match &*self.next.lock().map_err(|_| Error::State("loader lock poisoned".into()))? {
            Next::Epoch(e) => Ok(*e),
            Next::Resume(s) => Ok(s.epoch),
        }
    }

    /// The state the next `iter()`/`stream()` starts from: a loaded one, or the start of the next epoch.
    pub fn next_state(&self) -> Result<LoaderState> {
        let next = self.next.lock().map_err(|_| Error::State("loader lock poisoned".into()))?.clone();
        Ok(match next {
            Next::Epoch(e) => self.fresh_state(e),
            Next::Resume(s) => *s,
        })
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

    /// Makes the next `iter()`/`stream()` run `epoch` from its start, unless a state loaded by
    /// [`Juicer::resume`] points into that same epoch, which then continues where it stopped: the `set_epoch(n)`
    /// that PyTorch samplers and Lightning call before every epoch, also after loading a checkpoint.
    pub fn set_epoch(&self, epoch: u64) -> Result<()> {
        let mut next = self.next.lock().map_err(|_| Error::State("loader lock poisoned".into()))?;
        if !matches!(&*next, Next::Resume(s) if s.epoch == epoch) {
            *next = Next::Epoch(epoch);
        }
        Ok(())
    }

    /// Makes the next `iter()`/`stream()` continue exactly from `state` (taken from [`JuicerIter::state`]).
    pub fn resume(&self, state: LoaderState) -> Result<()> {
        let s = &self.shared;
        let mut problems = Vec::new();
        if !(LoaderState::MIN_VERSION..=LoaderState::VERSION).contains(&state.version) {
            problems.push(format!(
                "state version {} (this build reads {} to {})",
                state.version,
                LoaderState::MIN_VERSION,
                LoaderState::VERSION
            ));
        }
        if state.seed != s.config.seed {
            problems.push(format!("seed {} (loader has {})", state.seed, s.config.seed));
        }
        if state.world != s.world {
            problems.push(format!("world {:?} (loader has {:?})", state.world, s.world));
        }
        if state.sources != s.fingerprint {
            problems.push("the shard list differs from the one the state was taken with".into());
        }
        if state.shuffle_buffer != s.config.shuffle_buffer {
            problems.push(format!("shuffle buffer {} (loader has {})", state.shuffle_buffer, s.config.shuffle_buffer));
        }
        if problems.is_empty() {
            // The state is this loader's: now its positions and counters must fit the epoch's plan.
            problems.extend(state.problems(&self.state_shape(&state)?));
        }
        if !problems.is_empty() {
            return Err(Error::State(problems.join("; ")));
        }
        let next = if state.epoch_complete { Next::Epoch(state.epoch + 1) } else { Next::Resume(Box::new(state)) };
        *self.next.lock().map_err(|_| Error::State("loader lock poisoned".into()))? = next;
        Ok(())
    }

    /// The shape of this loader's plan for `state`'s epoch, which the state's positions must fit.
    fn state_shape(&self, state: &LoaderState) -> Result<StateShape> {
        let s = &self.shared;
        let cfg = &s.config;
        let (shards_per_pass, max_passes) = match state.ranges {
            Some(_) => (0, 1),
            None => {
                let plan = ShardPlan::new(s.shards.len(), cfg.seed, state.epoch, s.world, cfg.shuffle_shards)?;
                (plan.shards_per_pass(), self.epoch_target(state.epoch)?.1)
            }
        };
        Ok(StateShape {
            n_shards: s.shards.len(),
            shuffle_shards: cfg.shuffle_shards,
            shuffle_buffer: cfg.shuffle_buffer,
            batch_size: cfg.batch_size,
            shards_per_pass,
            max_passes,
        })
    }

    /// Continues from checkpointed states, whichever kind they are: one state of this juicer's world and rank
    /// resumes exactly ([`Juicer::resume`]); otherwise the states (every rank of another world, or of this one)
    /// are merged ([`LoaderState::merge`]) and the epoch continues on this world ([`Juicer::resume_elastic`]).
    pub fn resume_from(&self, mut states: Vec<LoaderState>) -> Result<()> {
        if states.len() == 1 && states[0].world == self.shared.world {
            return self.resume(states.remove(0));
        }
        self.resume_elastic(&LoaderState::merge(&states)?)
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

    fn fresh_state(&self, epoch: u64) -> LoaderState {
        let s = &self.shared;
        LoaderState {
            n_shards: Some(s.shards.len()),
            shuffle_shards: Some(s.config.shuffle_shards),
            ..LoaderState::start(s.config.seed, epoch, s.world, s.fingerprint.clone(), s.config.shuffle_buffer)
        }
    }

    /// Makes the next `iter()`/`stream()` continue an epoch that ranks of another world size stopped in, from
    /// their states combined by [`LoaderState::merge`]: every sample of the epoch they had not emitted yet is
    /// emitted exactly once across this juicer's world.
    ///
    /// The remaining samples ([`ElasticState::remaining`]) are cut into one contiguous piece per rank of this
    /// world, of nearly equal sample counts ([`ElasticState::pieces`], using [`Juicer::shard_counts`]); this rank
    /// reads its piece, range by range (each opened at its byte offset where the merged state knows it), through
    /// its shuffle buffer, and the epoch ends when the piece is exhausted: no samples are dropped or repeated to
    /// equalise ranks in that epoch, and batch counts across ranks differ by at most one (plus the effect of
    /// dropped bad samples). The epochs after it follow this world's plan, exactly as a fresh run of this world
    /// would. When every old rank had completed the epoch, the next epoch starts.
    ///
    /// The rank's state during the resumed epoch ([`JuicerIter::state`], holding its range list) resumes with
    /// [`Juicer::resume`] on the same world, and merges again with [`LoaderState::merge`].
    ///
    /// What is bit-identical: the samples the old ranks emitted before the checkpoint are what they were;
    /// the epochs after the resumed one are those of a fresh run on this world. What cannot be: the order of
    /// the resumed epoch's remaining samples matches neither world's plan (its shuffle buffers are new).
    pub fn resume_elastic(&self, merged: &ElasticState) -> Result<()> {
        let s = &self.shared;
        let mut problems = Vec::new();
        if !(LoaderState::MIN_VERSION..=LoaderState::VERSION).contains(&merged.version) {
            problems.push(format!(
                "merged state version {} (this build reads up to {})",
                merged.version,
                LoaderState::VERSION
            ));
        }
        if merged.seed != s.config.seed {
            problems.push(format!("seed {} (loader has {})", merged.seed, s.config.seed));
        }
        if merged.sources != s.fingerprint || merged.n_shards != s.shards.len() {
            problems.push("the shard list differs from the one the states were taken with".into());
        }
        if !problems.is_empty() {
            return Err(Error::State(problems.join("; ")));
        }
        let next = if merged.epoch_complete {
            Next::Epoch(merged.epoch.saturating_add(1))
        } else {
            let counts = self.shard_counts()?;
            let w = s.world;
            let piece = merged.pieces(&counts, w.world_size)?.swap_remove(w.rank);
            let mut state = self.fresh_state(merged.epoch);
            if let Some(first) = piece.first() {
                state.cursor = SourcePos { pass: 0, shard: 0, index: first.start };
                state.cursor_offset = first.offset;
            }
            state.shuffle_rng = derive(s.config.seed, &[merged.epoch, w.rank as u64, w.world_size as u64, 0x454c_4153]);
            state.ranges = Some(piece);
            Next::Resume(Box::new(state))
        };
        *self.next.lock().map_err(|_| Error::State("loader lock poisoned".into()))? = next;
        Ok(())
    }

    /// Batches this rank must yield in `epoch` when ranks are kept equal, and how many sweeps of its shard list
    /// may be needed to reach them.
    fn epoch_target(&self, epoch: u64) -> Result<(Option<u64>, u32)> {
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
            forwards: s.models.classifier.forwards(),
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

/// One epoch in progress. Dropping it stops the stage graph and joins its threads.
pub struct JuicerIter<O> {
    run: Run<Output<O>>,
    forwards: Arc<std::sync::atomic::AtomicU64>,
    io: crate::source::IoStats,
    score_cache: Option<Arc<ScoreCache>>,
    state: LoaderState,
    dropped: Vec<SampleError>,
    /// The first unreadable shards ([`Summary::unreadable_shards`]).
    unreadable: Vec<ShardFailure>,
    started: Instant,
    /// When this iterator last gave the allocator's free pages back ([`crate::device::release_free_memory`]).
    trimmed: Instant,
    total: Option<u64>,
    finished: bool,
}

impl<O> JuicerIter<O> {
    /// Checkpoint state after the last batch (or error) this iterator returned. Pass it to
    /// [`Juicer::resume`] to continue exactly from here.
    pub fn state(&self) -> &LoaderState {
        &self.state
    }

    /// Takes the samples dropped so far (since the last call), in order.
    pub fn take_dropped(&mut self) -> Vec<SampleError> {
        std::mem::take(&mut self.dropped)
    }

    /// Per-stage metrics snapshot.
    pub fn metrics(&self) -> Vec<StageSnapshot> {
        self.run.metrics()
    }

    /// Counters so far (per epoch, continued across a resume).
    pub fn summary(&self) -> Summary {
        Summary {
            epoch: self.state.epoch,
            read: self.state.samples_read,
            emitted: self.state.samples_emitted,
            dropped: self.state.dropped.clone(),
            batches: self.state.batches,
            patches_kept: self.state.patches_kept,
            patches_total: self.state.patches_total,
            classes: self.state.classes,
            classes_added: self.state.classes_added,
            classifier_images: self.forwards.load(Ordering::Relaxed),
            io: self.io.snapshot(),
            score_cache: self.score_cache.as_ref().map(|c| c.stats()),
            elapsed: self.started.elapsed(),
            stages: self.run.metrics(),
            unreadable_shards: self.unreadable.clone(),
        }
    }

    /// Notes the unreadable shards among `dropped` for the summary.
    fn note_unreadable<'a>(&mut self, dropped: impl IntoIterator<Item = &'a SampleError>) {
        for e in dropped {
            if e.reason == DropReason::UnreadableShard && self.unreadable.len() < MAX_LISTED_SHARD_FAILURES {
                self.unreadable.push(ShardFailure { shard: e.key.clone(), reason: e.detail.clone() });
            }
        }
    }

    /// A gauge of the graph's running threads. It reads 0 once dropping the iterator (or the stream made from
    /// it) has joined them all.
    pub fn thread_gauge(&self) -> Arc<std::sync::atomic::AtomicI64> {
        self.run.live_threads()
    }

    /// Turns the iterator into an async `Stream`. Dropping the stream stops and joins the stage threads.
    pub fn into_stream(mut self) -> impl Stream<Item = Result<O>> + Send + 'static
    where
        O: Send + 'static,
    {
        async_stream::stream! {
            while let Some(item) = self.next_async().await {
                yield item;
            }
        }
    }

    fn handle(&mut self, out: Option<Output<O>>) -> Option<Result<O>> {
        match out? {
            Output::Batch { batch, dropped, state } => {
                self.state = *state;
                self.note_unreadable(&dropped);
                self.dropped.extend(dropped);
                if self.trimmed.elapsed() >= crate::device::TRIM_EVERY {
                    crate::device::release_free_memory();
                    self.trimmed = Instant::now();
                }
                Some(Ok(batch))
            }
            Output::Error { error, state } => {
                self.state = *state;
                if let Error::Sample(e) = &error {
                    self.note_unreadable([e]);
                }
                Some(Err(error))
            }
            Output::End { dropped, state } => {
                self.state = *state;
                self.note_unreadable(&dropped);
                self.dropped.extend(dropped);
                self.finished = true;
                None
            }
        }
    }

    /// Async version of `next()`.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future before it completes loses no batch.
    pub async fn next_async(&mut self) -> Option<Result<O>> {
        if self.finished {
            return None;
        }
        let out = self.run.recv().await;
        self.handle(out)
    }
}

impl<O> Iterator for JuicerIter<O> {
    type Item = Result<O>;

    fn next(&mut self) -> Option<Result<O>> {
        if self.finished {
            return None;
        }
        let out = self.run.blocking_recv();
        self.handle(out)
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
