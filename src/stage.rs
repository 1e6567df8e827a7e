//! Stage traits: what a step of the pipeline does to one item or one micro-batch.
//!
//! Stages are plain synchronous code. They never see a channel, a thread or a runtime: the graph runtime
//! ([`crate::graph`]) calls them. Two shapes exist, as in vector's `FunctionTransform` / `TaskTransform`
//! split:
//! - [`Stage`]: a per-item function run on a pool of N workers (decode, prune, enrich). `Sync`, shared by
//!   reference between workers.
//! - [`BatchStage`]: a stateful micro-batch processor that owns a model on one device (score, extract). Built
//!   on its own thread by a factory, never shared.
//!
//! A failure on one item is a [`SampleError`]: the item is dropped and counted downstream, the stage goes on.

use crate::error::SampleError;

/// A per-item stage.
pub trait Stage: Send + Sync + 'static {
    /// Input item.
    type In: Send + 'static;
    /// Output item.
    type Out: Send + 'static;
    /// Name used in metrics and thread names.
    fn name(&self) -> &'static str;
    /// Processes one item.
    fn process(&self, item: Self::In) -> Result<Self::Out, SampleError>;
}

/// A micro-batch stage owning per-device state (a model).
pub trait BatchStage: Send + 'static {
    /// Input item.
    type In: Send + 'static;
    /// Output item.
    type Out: Send + 'static;
    /// Processes a micro-batch; must return exactly one result per input, in input order.
    fn process_batch(&mut self, items: Vec<Self::In>) -> Vec<Result<Self::Out, SampleError>>;
}
