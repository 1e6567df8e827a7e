//! # juicer
//!
//! A streaming dataloader middleware that *juices* image-text pairs inside the training loop: it scores every
//! image patch for saliency, keeps the salient ones, extracts the object classes the image shows and folds
//! them into the caption (the DataJuicer method, arXiv 2503.14559), while the trainer consumes batches.
//!
//! Every stage runs: sources, decode, the vision branch (score with the embedded MobileNetV2 CAM or a
//! HuggingFace ViT's attention, prune, extract), the text branch (enrich the caption with the classes it does
//! not mention, CLIP tokens) and batching.
//!
//! ```no_run
//! use juicer::{DeviceSpec, JuicedBatch};
//!
//! # fn main() -> juicer::Result<()> {
//! let loader = JuicedBatch::builder(["fixtures/shards/gcompris-{000000..000002}.tar"])
//!     .batch_size(16)
//!     .seed(7)
//!     .device(DeviceSpec::Auto)
//!     .build()?;
//! let mut epoch = loader.iter()?;
//! while let Some(batch) = epoch.next() {
//!     let batch = batch?; // patches [B, K, 3·P·P], positions [B, K], patch_mask [B, K]
//!     let _ = batch.patches.dims();
//! }
//! let checkpoint = serde_json::to_string(epoch.state()).expect("state serialises");
//! # let _ = checkpoint;
//! # Ok(())
//! # }
//! ```
//!
//! # Architecture
//!
//! ## Bird's eye view
//! ```text
//!  shards ──► read ──► shuffle ──► decode ──► [score ──► prune ──► extract ──► enrich] ──► batch ──► collate ──► trainer
//!  (tar, http,  R workers  1 thread   N workers   model      CPU       model       CPU        1 thread  C threads   Iterator /
//!   folder)   prefetch   sequencer  (CPU pool)  thread/dev           thread/dev            reorder,  batcher,    Stream /
//!                        + buffer                                                          account,  in order    burn DataLoader
//!                                                                                          cut
//! ```
//! Every arrow is a bounded channel. A trainer that stops reading makes every stage upstream block in turn;
//! nothing buffers without bound. The bracketed stages are the juicing branch (vision: score, prune, extract;
//! text: enrich).
//!
//! One epoch is one run of the graph. [`Juicer::iter`] (or [`Juicer::stream`], or burn's
//! `DataLoader::iter`) builds the graph for the next epoch; the returned [`JuicerIter`] owns it and joins every
//! thread when dropped.
//!
//! ## Code map
//! Every stage of the diagram is one file, its configuration beside its runtime:
//!
//! | stage | file | config | runtime |
//! |---|---|---|---|
//! | read | `src/reader.rs` (+ [`source`]) | [`source::ReadOptions`] | reader workers (shard prefetch) |
//! | shuffle | `src/reader.rs` | [`Config::shuffle_buffer`] | the sequencer, the graph's source |
//! | decode | `src/decode.rs` | [`decode::DecodeConfig`] | [`decode::DecodeStage`] |
//! | score | `src/vision/score.rs` | [`ScorerSpec`] | [`vision::CamScorer`], [`vision::AttentionScorer`], [`vision::PlainScorer`] |
//! | prune | `src/vision/prune.rs` | [`PruneConfig`], [`KeepPolicy`] | [`vision::PruneStage`] |
//! | extract | `src/vision/extract.rs` | [`vision::ExtractRule`], [`vision::Vocabulary`] | [`vision::Extract`] |
//! | enrich | `src/text/enrich.rs` | [`text::enrich::EnrichConfig`] | [`text::EnrichStage`] over [`text::enrich::Enricher`] |
//! | batch | `src/pipeline/sink.rs` | [`Config::batch_size`] | the ordered sink (reorder, checkpoint mirror, accounting, cutting batches) |
//! | collate | `src/pipeline/sink.rs` + `src/batch.rs` | [`Config::collate_workers`] | collator threads running the batcher ([`JuicedBatcher`] by default), outputs in order |
//!
//! By module:
//! - [`pipeline`]: **API boundary.** `mod.rs`: [`Juicer`] (the loader: shards, `iter`/`stream`, `juice`);
//!   `epochs.rs`: shard counts, samples and batches per rank and epoch; `resume.rs`: the epoch counter, exact
//!   and elastic resumption; `iter.rs`: [`JuicerIter`] (one epoch; `Iterator`, `next_async`, `into_stream`,
//!   `state`, `summary`); `config.rs`: [`Config`],
//!   [`LastStage`]; `builder.rs`: [`JuicerBuilder`] (verbs as burn's `DataLoaderBuilder`); `models.rs`: models
//!   loaded once at build time, the score cache's namespace; `topology.rs`: the stage graph of one epoch, wired in
//!   diagram order, and the same stages run inline over in-memory samples ([`Juicer::juice`]); `sink.rs`: the
//!   ordered sink (checkpoint mirror, accounting, cutting batches), the collation behind it and [`Summary`]; `loader.rs`: burn's `DataLoader`
//!   trait.
//! - [`graph`]: the runtime. Bounded instrumented edges ([`graph::Outlet`]/[`graph::Inlet`]), per-item stages on
//!   N workers, model stages on one thread per device with micro-batching, the credit window, the reorder sink
//!   and its collators ([`graph::Completion`]: parallel, delivered in order), per-stage metrics, shutdown; thread bodies return [`Result`], and the first error reaches the consumer
//!   typed. **Invariant:** the only module that knows threads, crossbeam and tokio.
//! - [`stage`]: the [`stage::Stage`] (per item) and [`stage::BatchStage`] (per micro-batch, owns a model)
//!   traits. **Invariant:** stages never touch a channel.
//! - [`reader`]: reader workers (shard prefetch) and the sequencer (canonical order + shuffle buffer), which emits
//!   each item with its checkpoint [`plan::Trace`].
//! - [`plan`]: ranks ([`World`]: explicit, torchrun, Slurm), the per-epoch shard order and rank split
//!   ([`plan::ShardPlan`]), epoch length across ranks ([`EpochSize`]), and the checkpoint [`LoaderState`]
//!   (parsed with [`LoaderState::from_json`], checked against the plan's [`StateShape`] before it resumes).
//! - [`source`]: `mod.rs` ([`source::Shard`], [`source::ReadOptions`], the I/O counters), `tar.rs` (the
//!   WebDataset grouping rules), `http.rs` (`http(s)://` streamed with Range-resume), `object.rs` (S3, GCS,
//!   Azure, `file://` through `object_store`: ETag-pinned ranged resume, counted retries, listing globs),
//!   `folder.rs` (folder + JSONL), `spec.rs` (globs, brace ranges), `manifest.rs` (wids shard lists),
//!   `pack.rs` ([`source::ShardWriter`]), `limits.rs` ([`source::ReadLimits`]: member, caption and metadata
//!   bytes, JSON nesting, checked before allocating). **Invariant:** a sample is read whole or reported as
//!   `Truncated`, never short.
//! - [`decode`]: bytes → RGB (libjpeg-turbo at a reduced DCT scale where the crop allows, libwebp, `image`) →
//!   torchvision `Resize`+`CenterCrop` → normalised `[3, S, S]`; the decode stage; the one copy of the
//!   ImageNet and CLIP normalisation constants.
//! - [`patch`]: the patch grid, [`patch::patchify`] and its inverse (a leaf the stages and the sample types share).
//! - [`sample`]: the item each edge carries ([`RawSample`] → [`Decoded`] → [`Scored`](sample::Scored) →
//!   [`Pruned`](sample::Pruned) → [`JuicedSample`]) and CLIP's token context ([`sample::CONTEXT`]).
//! - [`batch`]: [`HostBatch::collate`] (host buffers; [`ArrayBatcher`]), [`JuicedBatch`] and the default
//!   [`JuicedBatcher`]. **Invariant:** burn appears only here, in
//!   [`device`], in the loader API of [`pipeline`] (`Batcher`, `DataLoader`), in [`model`], in the model
//!   stages of [`vision`] and in [`write`](mod@write)'s host-only `Batcher`.
//! - [`device`]: `cpu` (flex), `wgpu[:N]`, `cuda[:N]` (the `cuda` feature), `auto` (never a software Vulkan
//!   adapter); [`device::IntraOp`], the CPU thread pool of one model replica.
//! - [`vision`]: `score.rs`, `prune.rs`, `extract.rs` (the stages above; extract's tree rule names the most
//!   specific WordNet concept the calibrated probabilities support), `vocabulary.rs` (names, synonyms, the
//!   hierarchy, restrictions, shared with the text branch), [`vision::hierarchy`] (the embedded WordNet is-a tree
//!   over the ImageNet classes), [`vision::labels`] (hand labels and the precision of extracted concepts against
//!   them), [`vision::cam`] (CAM maths on the host), [`vision::cache`] (the
//!   bounded on-disk score cache: later epochs skip the scoring model; a wrong hit is impossible by construction,
//!   since entries are keyed by sample key and decoded pixels inside a namespace of scorer, weights, class head
//!   and preprocessing).
//! - [`text`]: OpenAI CLIP's BPE tokenizer on HF `tokenizers` (loaded once per process), the enrich stage
//!   (mentions through the vocabulary's synonyms, hyponyms and hypernyms, plurals, templates, deterministic
//!   `mix`, context-overflow policy), [`text::nouns`] (WordNet's noun lemmas → the hierarchy concepts a caption
//!   already names, with lemmatisation; embedded) and [`text::phrase`] (words, articles, lists, sentence ends). **Invariant:** knows
//!   no model; the vocabulary is handed to it.
//! - [`model`]: burn models: torchvision MobileNetV2 (embedded ImageNet weights), EfficientNet-Lite0/1/2
//!   ([`model::efficientnet_lite`], the stronger class head of `--classifier`; weights from a file), a
//!   HuggingFace ViT, and a small trainable CLIP over kept patches + positions ([`model::clip`], used by
//!   `examples/train_clip`); one safetensors framing reader with the classifiers' strict header check
//!   ([`model::safetensors`]); MobileNetV2's depthwise and 1×1 layers as host-memory
//!   kernels for the CPU backend ([`model::depthwise`], [`model::pointwise`]), EfficientNet-Lite's k×k depthwise
//!   layers likewise ([`model::depthwise_same`]). **Invariant:** weights are validated tensor by tensor
//!   when loaded; a bad file never loads partially.
//! - [`bench`](mod@bench): the throughput harness of `juicer bench`: a warm-up and a measured window per pipeline
//!   (one per device), per-stage busy/blocked/starved shares from the graph's counters and the bottleneck,
//!   process CPU time and peak RSS ([`bench::probe`]), synthetic shards ([`bench::synthetic`]), the timeline plot
//!   (`bench/plot.rs`), and the per-layer profile of the scorer's MobileNetV2 forward on one device
//!   ([`bench::layers`], `juicer bench --layers`).
//! - [`error`], [`rng`]: the one error enum and drop reasons, SplitMix64.
//! - [`fuzzing`]: the cargo-fuzz targets' bodies (`fuzz/`), plain functions that `tests/fuzz.rs` also replays
//!   over every committed corpus and regression input.
//! - [`show`]: renders a sample (input | kept patches | saliency heat map, classes, caption) and collects what
//!   `juicer show` draws ([`show::ShowRun`]).
//! - [`write`](mod@write): offline juicing into WebDataset shards for `juicer write` (kept-patch mosaic
//!   `KEY.png`, enriched `KEY.txt`, original `KEY.orig.txt`, classes and scores `KEY.json`) through a
//!   host-only batcher.
//! - `python/`: the Python package (pyo3 + maturin; its own crate in this workspace): `python/src/lib.rs`
//!   (`Loader`, `Epoch`, zero-copy `Array`s over [`HostBatch`] buffers, fork check), `python/src/options.rs`
//!   (keyword options → [`JuicerBuilder`]), `python/python/juicer/__init__.py` (the `IterableDataset`,
//!   `state_dict`, `juice`).
//! - `src/main.rs`: the `juicer` CLI (`run`, `show`, `pack`, `write`, `bench`); parses arguments, calls the
//!   library, prints. The only place `anyhow` is used.
//! - **Imports point down.** Modules import what they use by its own path (`crate::error::{Error, Result}`),
//!   never through the re-exports below, which exist for users.
//!
//! ## Invariants
//! - **Bounded.** Every edge has `capacity` slots; the source takes a credit per item and the sink returns it
//!   when the item leaves in order, so at most `6·capacity + 4·workers + 2·micro_batch·model_workers + 1` items are between
//!   the shuffle and the sink, and the sink's reorder buffer never holds more. Behind the sink, at most
//!   `2·collate_workers` batches wait for or sit in collators, then `capacity` on the last edge.
//! - **Deterministic.** The output is a function of the seed, the epoch and the sources, not of worker counts:
//!   reader worker `r` only prefetches tasks `t ≡ r (mod R)`, the sequencer consumes tasks in order, sequence
//!   numbers are assigned after the shuffle and the sink restores their order.
//! - **Accounted.** Every sample read ends emitted or dropped with a [`DropReason`]; `read = emitted + dropped`
//!   holds in every [`Summary`] and [`LoaderState`]. A whole shard that cannot be opened counts once as
//!   `unreadable_shard`.
//! - **Resumable.** Each item carries the shuffle-buffer delta (positions added, slot drawn, generator state,
//!   reader cursor). The sink mirrors the buffer as positions, and the state handed out at a batch boundary
//!   rebuilds the exact buffer: the batches after a resume equal those of an uninterrupted run.
//! - **Equal ranks.** With `world_size > 1` every rank yields the same number of batches per epoch
//!   ([`EpochSize`]), computed by every rank alike from per-shard sample counts.
//! - **Joined.** Dropping an iterator or stream, also while stages are blocked, stops and joins every thread.

#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod batch;
pub mod bench;
pub mod decode;
pub mod device;
pub mod error;
pub mod fuzzing;
pub mod graph;
pub mod model;
pub mod patch;
pub mod pipeline;
pub mod plan;
pub mod reader;
pub mod rng;
pub mod sample;
pub mod show;
pub mod source;
pub mod stage;
pub mod text;
pub mod vision;
pub mod write;

pub use batch::{ArrayBatcher, HostBatch, JuicedBatch, JuicedBatcher};
pub use device::DeviceSpec;
pub use error::{DropReason, Error, OnError, Result, SampleError};
pub use pipeline::{Config, Juicer, JuicerBuilder, JuicerIter, LastStage, ShardFailure, Summary};
pub use plan::{ElasticState, EpochSize, LoaderState, SampleRange, StateShape, World};
pub use sample::{Class, Decoded, JuicedSample, RawSample, SourcePos};
pub use vision::ScorerSpec;
pub use vision::prune::{KeepPolicy, PruneConfig};
