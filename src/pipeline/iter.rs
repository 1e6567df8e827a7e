//! [`JuicerIter`]: one epoch in progress, read as a blocking `Iterator`, with `next_async`, or as a `Stream`;
//! the checkpoint state after each batch, the dropped samples, the run's [`Summary`] and per-stage metrics.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use futures::Stream;

use super::sink::{MAX_LISTED_SHARD_FAILURES, Output, ShardFailure, Summary};
use crate::error::{DropReason, Error, Result, SampleError};
use crate::graph::{Run, StageSnapshot};
use crate::plan::LoaderState;
use crate::vision::cache::ScoreCache;

/// One epoch in progress. Dropping it stops the stage graph and joins its threads.
pub struct JuicerIter<O> {
    pub(super) run: Run<Output<O>>,
    pub(super) forwards: Arc<std::sync::atomic::AtomicU64>,
    pub(super) io: crate::source::IoStats,
    pub(super) score_cache: Option<Arc<ScoreCache>>,
    pub(super) state: LoaderState,
    pub(super) dropped: Vec<SampleError>,
    /// The first unreadable shards ([`Summary::unreadable_shards`]).
    pub(super) unreadable: Vec<ShardFailure>,
    pub(super) started: Instant,
    /// When this iterator last gave the allocator's free pages back ([`crate::device::release_free_memory`]).
    pub(super) trimmed: Instant,
    pub(super) total: Option<u64>,
    pub(super) finished: bool,
}

impl<O> JuicerIter<O> {
    /// Checkpoint state after the last batch (or error) this iterator returned. Pass it to
    /// [`crate::Juicer::resume`] to continue exactly from here.
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
