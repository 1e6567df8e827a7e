//! The ordered sink at the end of the stage graph: [`BatchSink`] mirrors the checkpoint state item by item,
//! accounts every sample (emitted or dropped with its reason), cuts batches, and applies the epoch's batch
//! target, limit and range; [`collation`] then has the batcher build each batch, on the collator threads the
//! graph runs behind the sink ([`crate::graph::Completion`]); [`Summary`] is what a run's counters add up to.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use burn::data::dataloader::batcher::Batcher;
use burn::tensor::Device;
use serde::Serialize;

use crate::error::{Error, OnError, SampleError, panic_message};
use crate::graph::{Completion, Envelope, SinkLogic, SinkStep, StageSnapshot};
use crate::plan::{LoaderState, Trace};
use crate::sample::JuicedSample;
use crate::vision::cache::CacheStats;

/// What the last edge carries to the consumer; the sink produces it with the batch's samples
/// (`Output<Vec<JuicedSample>>`), [`collation`] turns them into the batcher's batch.
pub(super) enum Output<O> {
    Batch { batch: O, dropped: Vec<SampleError>, state: Box<LoaderState> },
    Error { error: Error, state: Box<LoaderState> },
    End { dropped: Vec<SampleError>, state: Box<LoaderState> },
}

/// The ordered sink: checkpoint mirror, accounting, cutting batches.
pub(super) struct BatchSink {
    pub(super) batch_size: usize,
    pub(super) on_error: OnError,
    pub(super) target: Option<u64>,
    pub(super) limit: Option<u64>,
    pub(super) range: Option<(u64, u64)>,
    /// State at the last batch boundary: what the consumer may checkpoint.
    pub(super) boundary: LoaderState,
    /// State after the last item.
    pub(super) state: LoaderState,
    pub(super) pending: Vec<JuicedSample>,
    pub(super) dropped: Vec<SampleError>,
}

/// Samples on their way to the batcher.
type Cut = Output<Vec<JuicedSample>>;

impl BatchSink {
    fn flush(&mut self, complete: bool) -> Option<Cut> {
        if self.pending.is_empty() && self.dropped.is_empty() {
            return None;
        }
        self.state.epoch_complete = complete;
        if self.pending.is_empty() {
            // Drops after the last batch travel with the End marker.
            return None;
        }
        self.state.batches += 1;
        self.boundary = self.state.clone();
        Some(Output::Batch {
            batch: std::mem::take(&mut self.pending),
            dropped: std::mem::take(&mut self.dropped),
            state: Box::new(self.boundary.clone()),
        })
    }

    fn limit_reached(&self) -> bool {
        let read = self.state.samples_read;
        self.limit.is_some_and(|l| read >= l) || self.range.is_some_and(|(a, b)| read >= b.saturating_sub(a))
    }
}

impl SinkLogic for BatchSink {
    type In = JuicedSample;
    type Meta = Trace;
    type Out = Cut;

    fn accept(&mut self, env: Envelope<JuicedSample, Trace>) -> SinkStep<Cut> {
        if self.target.is_some_and(|t| self.state.batches >= t) {
            // A zero-batch epoch (a rank with fewer samples than one batch under DropRemainder).
            return SinkStep::Stop(self.finish(None));
        }
        self.state.apply(&env.meta);
        let position = self.state.drawn;
        self.state.drawn += 1;
        if let Some((a, _)) = self.range
            && position < a
        {
            return SinkStep::Continue(Vec::new());
        }
        self.state.samples_read += 1;
        let mut out = Vec::new();
        match env.body {
            Ok(s) => {
                self.state.samples_emitted += 1;
                self.state.patches_kept += s.positions.len() as u64;
                self.state.patches_total += (s.grid.0 * s.grid.1) as u64;
                self.state.classes += s.classes.len() as u64;
                self.state.classes_added += s.added.len() as u64;
                self.pending.push(s);
            }
            Err(e) => {
                *self.state.dropped.entry(e.reason.as_str().to_string()).or_default() += 1;
                match self.on_error {
                    OnError::Drop => self.dropped.push(e),
                    OnError::Fail => {
                        out.push(Output::Error { error: Error::Sample(e), state: Box::new(self.boundary.clone()) })
                    }
                }
            }
        }
        if self.pending.len() >= self.batch_size {
            let done = self.target.is_some_and(|t| self.state.batches + 1 >= t);
            out.extend(self.flush(done));
            if done {
                return SinkStep::Stop(out);
            }
        }
        if self.limit_reached() {
            out.extend(self.flush(true));
            self.state.epoch_complete = true;
            self.boundary = self.state.clone();
            out.push(Output::End {
                dropped: std::mem::take(&mut self.dropped),
                state: Box::new(self.boundary.clone()),
            });
            return SinkStep::Stop(out);
        }
        SinkStep::Continue(out)
    }

    fn finish(&mut self, failure: Option<Error>) -> Vec<Cut> {
        let mut out = Vec::new();
        if let Some(e) = failure {
            out.push(Output::Error { error: e, state: Box::new(self.boundary.clone()) });
            return out;
        }
        // With a batch target a partial batch would make ranks unequal; without one the last batch may be short.
        if self.target.is_none() {
            out.extend(self.flush(true));
        }
        self.state.epoch_complete = true;
        self.boundary = self.state.clone();
        out.push(Output::End { dropped: std::mem::take(&mut self.dropped), state: Box::new(self.boundary.clone()) });
        out
    }
}

/// Has `batcher` build each cut batch on `device`, on `workers` collator threads (0: the sink's thread). A
/// batcher that panics (a user's `Batcher` may) turns its batch into an [`Error::Stage`] output for the
/// consumer, with the state at that batch's boundary, instead of ending the stream unexplained.
pub(super) fn collation<O: Send + 'static>(
    batcher: Arc<dyn Batcher<JuicedSample, O>>,
    device: Device,
    workers: usize,
) -> Completion<Cut, Output<O>> {
    let complete = move |cut: Cut| match cut {
        Output::Batch { batch: items, dropped, state } => {
            let keys = (items.first().map(|s| s.key.clone()), items.last().map(|s| s.key.clone()));
            match catch_unwind(AssertUnwindSafe(|| batcher.batch(items, &device))) {
                Ok(batch) => Output::Batch { batch, dropped, state },
                Err(panic) => {
                    let why = panic_message(&*panic).unwrap_or_else(|| "a panic".into());
                    let (first, last) = keys;
                    let detail = format!(
                        "the batcher failed on the batch of samples {} to {}: {why}",
                        first.unwrap_or_default(),
                        last.unwrap_or_default()
                    );
                    Output::Error { error: Error::Stage { stage: "collate".into(), detail }, state }
                }
            }
        }
        Output::Error { error, state } => Output::Error { error, state },
        Output::End { dropped, state } => Output::End { dropped, state },
    };
    Completion { workers, complete: Arc::new(complete) }
}

/// Counters of a run, for the CLI summary and for tests. `read == emitted + dropped` always.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Epoch.
    pub epoch: u64,
    /// Samples taken in (emitted + dropped).
    pub read: u64,
    /// Samples emitted in batches.
    pub emitted: u64,
    /// Dropped samples by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Batches yielded.
    pub batches: u64,
    /// Patches kept in emitted samples.
    pub patches_kept: u64,
    /// Patches of emitted samples, kept or not.
    pub patches_total: u64,
    /// Classes extracted for emitted samples.
    pub classes: u64,
    /// Classes added to captions.
    pub classes_added: u64,
    /// Images forwarded through the classifier backbone since the loader was built (all epochs).
    pub classifier_images: u64,
    /// Remote reads since the loader was built (all epochs): requests, retries, give-ups, bytes.
    pub io: crate::source::IoSnapshot,
    /// Score cache counters since the loader was built (all epochs), when a cache is configured.
    pub score_cache: Option<CacheStats>,
    /// Wall time since the epoch started.
    pub elapsed: Duration,
    /// Per-stage counters.
    pub stages: Vec<StageSnapshot>,
    /// The first [`MAX_LISTED_SHARD_FAILURES`] shards that could not be opened or parsed (each also counted once
    /// under `unreadable_shard` in `dropped`), in the order they failed.
    pub unreadable_shards: Vec<ShardFailure>,
}

/// How many unreadable shards [`Summary::unreadable_shards`] lists by name (all are counted).
pub const MAX_LISTED_SHARD_FAILURES: usize = 10;

/// A shard that could not be opened or parsed, and why (`not a tar archive: …`, `HTTP 404`, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShardFailure {
    /// The shard's name (path or URL).
    pub shard: String,
    /// What went wrong.
    pub reason: String,
}

impl Summary {
    /// Kept share of the patches of emitted samples.
    pub fn kept_ratio(&self) -> f64 {
        if self.patches_total == 0 { 0.0 } else { self.patches_kept as f64 / self.patches_total as f64 }
    }

    /// Total dropped samples.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }
}
