//! The public face of the library: [`JuicerBuilder`] → [`Juicer`], consumed as a blocking iterator
//! ([`Juicer::iter`]), an async `Stream` ([`Juicer::stream`]) or through burn's `DataLoader` trait.
//!
//! A [`Juicer`] is the loader for a whole training run; each `iter()`/`stream()` call runs one epoch (the
//! next one, or the one a loaded [`LoaderState`] points into) on a fresh stage graph that lives exactly as
//! long as the returned iterator or stream.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderIterator, Progress};
use burn::data::dataset::DatasetError;
use burn::tensor::Device;
use futures::Stream;
use serde::Serialize;

use crate::batch::{JuicedBatch, JuicedBatcher};
use crate::decode::{DecodeConfig, Decoder};
use crate::device::DeviceSpec;
use crate::error::{Error, OnError, Result, SampleError};
use crate::graph::{Envelope, Graph, Inlet, Run, SinkLogic, SinkStep, StageSnapshot};
use crate::model::vit::{self, ViT};
use crate::plan::{EpochSize, LoaderState, ShardPlan, Trace, World};
use crate::reader::{ReadSetup, reader_worker, sequencer};
use crate::rng::hash_str;
use crate::sample::{Decoded, JuicedSample, RawSample};
use crate::source::{ReadOptions, Shard, resolve};
use crate::stage::{BatchStage, Stage};
use crate::text::EnrichStage;
use crate::text::enrich::{EnrichConfig, Enricher};
use crate::text::tokenizer::ClipTokenizer;
use crate::vision::cache::{CacheStats, Cached, ScoreCache, ScoreCacheConfig, fingerprint};
use crate::vision::prune::{KeepPolicy, PruneConfig};
use crate::vision::{
    AttentionScorer, CamScorer, Classifier, Extract, PlainScorer, PruneStage, Pruned, Scored, ScorerSpec, VisionConfig,
    Vocabulary,
};
use std::sync::atomic::Ordering;

/// Every knob of the pipeline. Build it through [`JuicerBuilder`]; the defaults suit a single GPU trainer.
#[derive(Debug, Clone)]
pub struct Config {
    /// Samples per batch (default 32).
    pub batch_size: usize,
    /// Seed of every random choice (default 0).
    pub seed: u64,
    /// Slots per edge of the stage graph (default 16).
    pub capacity: usize,
    /// Reader (shard prefetch) workers (default 2).
    pub reader_workers: usize,
    /// Decode workers (default: available cores).
    pub decode_workers: usize,
    /// Shuffle buffer capacity in samples; 0 or 1 keeps the read order (default 500).
    pub shuffle_buffer: usize,
    /// Shuffle the shard order per epoch (default true).
    pub shuffle_shards: bool,
    /// Epoch length policy across ranks (default [`EpochSize::Auto`]).
    pub epoch_size: EpochSize,
    /// Bad-sample policy (default [`OnError::Drop`]).
    pub on_error: OnError,
    /// Resize, crop and normalisation.
    pub decode: DecodeConfig,
    /// Patch side P in pixels (default 16).
    pub patch_size: usize,
    /// Stop after this many samples read per epoch.
    pub limit: Option<u64>,
    /// Only the samples with epoch positions in `start..end` (burn's `DataLoader::slice`).
    pub range: Option<(u64, u64)>,
    /// Shard reading options (HTTP retries, timeouts).
    pub read: ReadOptions,
    /// Entries per virtual shard of a folder + JSONL source (default 256).
    pub folder_shard_size: usize,
    /// Device the models run on and the batches are created on.
    pub device: DeviceSpec,
    /// The vision branch: scorer, keep policy, class extraction.
    pub vision: VisionConfig,
    /// The text branch: template, mix, context.
    pub text: EnrichConfig,
    /// Run only the stages up to this one (default: all). For benchmarks: `juicer bench --stages`.
    pub last_stage: LastStage,
}

/// How much of the stage graph runs: a prefix `decode → … → last`, then the batcher.
///
/// A truncated graph still yields [`JuicedSample`]s: after `decode` or `score` every patch is kept (patchified
/// by a `finish` stage), after `prune` only the kept ones; classes, enriched caption and tokens stay empty
/// until `extract` and `enrich` run. Used to measure what each stage adds (`juicer bench --stages`) and to
/// compare a prefix with other loaders that stop there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LastStage {
    /// Read, decode, resize, crop, normalise, patchify (all patches).
    Decode,
    /// + saliency scores (all patches kept).
    Score,
    /// + keep policy (kept patches only).
    Prune,
    /// + class extraction.
    Extract,
    /// + caption enrichment and tokenisation: the whole pipeline.
    #[default]
    Enrich,
}

impl LastStage {
    /// Every prefix, shortest first.
    pub const ALL: [LastStage; 5] =
        [LastStage::Decode, LastStage::Score, LastStage::Prune, LastStage::Extract, LastStage::Enrich];

    /// The stage's name as in metrics and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            LastStage::Decode => "decode",
            LastStage::Score => "score",
            LastStage::Prune => "prune",
            LastStage::Extract => "extract",
            LastStage::Enrich => "enrich",
        }
    }
}

impl std::str::FromStr for LastStage {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        LastStage::ALL
            .into_iter()
            .find(|l| l.name() == s)
            .ok_or_else(|| Error::Config(vec![format!("unknown stage `{s}` (decode, score, prune, extract, enrich)")]))
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            batch_size: 32,
            seed: 0,
            capacity: 16,
            reader_workers: 2,
            decode_workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            shuffle_buffer: 500,
            shuffle_shards: true,
            epoch_size: EpochSize::Auto,
            on_error: OnError::Drop,
            decode: DecodeConfig::default(),
            patch_size: 16,
            limit: None,
            range: None,
            read: ReadOptions::default(),
            folder_shard_size: 256,
            device: DeviceSpec::Auto,
            vision: VisionConfig::default(),
            text: EnrichConfig::default(),
            last_stage: LastStage::Enrich,
        }
    }
}

impl Config {
    /// Every problem with this configuration (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut p = self.decode.validate();
        p.extend(self.vision.problems());
        p.extend(self.text.problems());
        if self.batch_size == 0 {
            p.push("batch_size must be at least 1".into());
        }
        if self.capacity == 0 {
            p.push("capacity must be at least 1".into());
        }
        if self.reader_workers == 0 || self.decode_workers == 0 {
            p.push("reader_workers and decode_workers must be at least 1".into());
        }
        if self.patch_size == 0 {
            p.push("patch_size must be at least 1".into());
        } else if !self.decode.image_size.is_multiple_of(self.patch_size) {
            p.push(format!(
                "image_size {} is not a multiple of patch_size {}",
                self.decode.image_size, self.patch_size
            ));
        }
        if self.folder_shard_size == 0 {
            p.push("folder_shard_size must be at least 1".into());
        }
        if let Some((a, b)) = self.range
            && a > b
        {
            p.push(format!("range {a}..{b} is reversed"));
        }
        p
    }
}

/// Builder of a [`Juicer`]: sources plus configuration verbs, as burn's `DataLoaderBuilder`.
#[derive(Debug, Clone)]
pub struct JuicerBuilder {
    sources: Vec<String>,
    config: Config,
    rank: Option<usize>,
    world_size: Option<usize>,
}

macro_rules! verb {
    ($(#[$doc:meta])* $name:ident: $ty:ty => $($field:ident).+) => {
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.config.$($field).+ = value;
            self
        }
    };
}

impl JuicerBuilder {
    /// Starts a builder over shard specifications (paths, globs, brace ranges, URLs, folder + JSONL).
    pub fn new<S: Into<String>>(sources: impl IntoIterator<Item = S>) -> Self {
        Self {
            sources: sources.into_iter().map(Into::into).collect(),
            config: Config::default(),
            rank: None,
            world_size: None,
        }
    }

    /// Replaces the whole configuration.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    verb!(/// Samples per batch.
        batch_size: usize => batch_size);
    verb!(/// Seed of every random choice.
        seed: u64 => seed);
    verb!(/// Slots per graph edge.
        capacity: usize => capacity);
    verb!(/// Shard prefetch workers.
        reader_workers: usize => reader_workers);
    verb!(/// Decode workers.
        decode_workers: usize => decode_workers);
    verb!(/// Shuffle buffer capacity (0 keeps the read order).
        shuffle_buffer: usize => shuffle_buffer);
    verb!(/// Shuffle shard order per epoch.
        shuffle_shards: bool => shuffle_shards);
    verb!(/// Epoch length policy.
        epoch_size: EpochSize => epoch_size);
    verb!(/// Bad-sample policy.
        on_error: OnError => on_error);
    verb!(/// Model input side (resize + centre crop).
        image_size: usize => decode.image_size);
    verb!(/// Patch side in pixels.
        patch_size: usize => patch_size);
    verb!(/// Device for the batches.
        device: DeviceSpec => device);
    verb!(/// Shard reading options.
        read_options: ReadOptions => read);
    verb!(/// Saliency scorer.
        scorer: ScorerSpec => vision.scorer);
    verb!(/// Keep policy and bounds.
        prune: PruneConfig => vision.prune);
    verb!(/// Candidate classes per image.
        top_k: usize => vision.top_k);
    verb!(/// Minimum class probability.
        min_prob: f32 => vision.min_prob);
    verb!(/// Items per model micro-batch.
        micro_batch: usize => vision.micro_batch);
    verb!(/// Model threads (model replicas) per model stage.
        model_workers: usize => vision.model_workers);
    verb!(/// Caption template with `{caption}` and `{classes}`.
        template: String => text.template);
    verb!(/// Probability of training on the enriched caption rather than the original.
        mix: f32 => text.mix);
    verb!(/// Runs only the stages up to this one (benchmarks).
        last_stage: LastStage => last_stage);

    /// Caches the scorer's outputs on disk (bounded) so that later epochs, and later runs over the same data
    /// with the same scorer and weights, skip the scoring model.
    pub fn score_cache(mut self, cache: ScoreCacheConfig) -> Self {
        self.config.vision.score_cache = Some(cache);
        self
    }

    /// Keeps this fraction of the patches (the `ratio` policy).
    pub fn keep_ratio(mut self, ratio: f32) -> Self {
        self.config.vision.prune.policy = KeepPolicy::Ratio(ratio);
        self
    }

    /// MobileNetV2 weights (safetensors, torchvision names) instead of the embedded ones.
    pub fn classifier_weights(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.config.vision.classifier_weights = Some(path.into());
        self
    }

    /// A JSON vocabulary `{"<class id>": "<name>"}` restricting and renaming the extracted classes.
    pub fn vocabulary(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.config.vision.vocabulary = Some(path.into());
        self
    }

    /// Stops each epoch after `n` samples.
    pub fn limit(mut self, n: u64) -> Self {
        self.config.limit = Some(n);
        self
    }

    /// Sets the rank explicitly (else `RANK`, then `SLURM_PROCID`).
    pub fn rank(mut self, rank: usize) -> Self {
        self.rank = Some(rank);
        self
    }

    /// Sets the world size explicitly (else `WORLD_SIZE`, then `SLURM_NTASKS`).
    pub fn world_size(mut self, world_size: usize) -> Self {
        self.world_size = Some(world_size);
        self
    }

    /// Builds a loader producing [`JuicedBatch`]es with the default [`JuicedBatcher`].
    pub fn build(self) -> Result<Juicer<JuicedBatch>> {
        self.build_with(JuicedBatcher::default())
    }

    /// Builds a loader whose batches come from the user's burn `Batcher`.
    pub fn build_with<O, B>(self, batcher: B) -> Result<Juicer<O>>
    where
        B: Batcher<JuicedSample, O> + 'static,
        O: Send + 'static,
    {
        let mut problems = self.config.problems();
        if self.sources.is_empty() {
            problems.push("no sources given".into());
        }
        let world = match World::resolve(self.rank, self.world_size) {
            Ok(w) => Some(w),
            Err(Error::Config(p)) => {
                problems.extend(p);
                None
            }
            Err(e) => return Err(e),
        };
        if !problems.is_empty() {
            return Err(Error::Config(problems));
        }
        let world = world.unwrap_or_default();
        let shards: Arc<[Shard]> = resolve(&self.sources, self.config.folder_shard_size)?.into();
        if shards.len() < world.world_size {
            return Err(Error::Config(vec![format!(
                "{} shard(s) cannot be split across {} ranks: every rank needs at least one shard",
                shards.len(),
                world.world_size
            )]));
        }
        let fingerprint =
            format!("{:016x}", shards.iter().fold(hash_str(""), |h, s| crate::rng::derive(h, &[hash_str(&s.name())])));
        let device = self.config.device.resolve()?;
        let mut config = self.config;
        let models = Models::load(&mut config, &device)?;
        Ok(Juicer {
            shared: Arc::new(Shared { shards, config, world, fingerprint, counts: OnceLock::new(), models }),
            batcher: Arc::new(batcher),
            device,
            next: Arc::new(Mutex::new(Next::Epoch(0))),
        })
    }
}

#[derive(Debug)]
struct Shared {
    shards: Arc<[Shard]>,
    config: Config,
    world: World,
    fingerprint: String,
    counts: OnceLock<std::result::Result<Vec<usize>, String>>,
    models: Models,
}

/// Models loaded (and checked) at build time, cloned into each epoch's model threads.
#[derive(Clone)]
struct Models {
    classifier: Classifier,
    tokenizer: &'static ClipTokenizer,
    enricher: Enricher,
    vit: Option<ViT>,
    vocabulary: Vocabulary,
    /// Mean/std of the decoded pixels when they are not ImageNet's (attention preprocessing).
    input_norm: Option<([f32; 3], [f32; 3])>,
    /// The scorer's output cache, when configured.
    score_cache: Option<Arc<ScoreCache>>,
}

impl std::fmt::Debug for Models {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Models").field("classifier", &self.classifier).field("vit", &self.vit.is_some()).finish()
    }
}

impl Models {
    /// Loads the classifier and, for the attention scorer, the ViT; adapts the decode settings to the scorer's
    /// preprocessing (ViT mean/std and input size, patch size).
    fn load(config: &mut Config, device: &Device) -> Result<Self> {
        let v = &config.vision;
        let classifier = Classifier::load(v.classifier_weights.as_deref(), device)?;
        let mut vocabulary = Vocabulary::imagenet();
        if let Some(path) = &v.vocabulary {
            vocabulary = vocabulary.restrict_with(path)?;
        }
        let (vit, input_norm) = match &v.scorer {
            ScorerSpec::Attention(dir) => {
                let (vit, pre) = vit::load_dir(dir, device)?;
                config.decode.mean = pre.mean;
                config.decode.std = pre.std;
                config.decode.image_size = pre.image_size;
                config.patch_size = vit.config().patch_size;
                (Some(vit), Some((pre.mean, pre.std)))
            }
            _ => (None, None),
        };
        if config.vision.scorer == ScorerSpec::None {
            config.vision.prune.policy = KeepPolicy::Ratio(1.0);
        }
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(Error::Config(problems));
        }
        let tokenizer = ClipTokenizer::shared()?;
        let enricher = Enricher::new(config.text.clone(), config.seed)?;
        let score_cache = match &config.vision.score_cache {
            Some(c) if matches!(config.vision.scorer, ScorerSpec::Cam | ScorerSpec::Attention(_)) => {
                Some(Arc::new(ScoreCache::open(c, &cache_namespace(config)?)?))
            }
            _ => None,
        };
        Ok(Self { classifier, tokenizer, enricher, vit, vocabulary, input_norm, score_cache })
    }
}

/// Everything that changes a scorer's output, as a string: the score cache's namespace.
fn cache_namespace(config: &Config) -> Result<String> {
    let v = &config.vision;
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| Error::io(format!("reading `{}`", p.display()), e));
    let weights = match &v.scorer {
        ScorerSpec::Attention(dir) => {
            let mut h = fingerprint(&read(&dir.join("model.safetensors"))?);
            h ^= fingerprint(&read(&dir.join("config.json"))?).rotate_left(1);
            h
        }
        _ => match &v.classifier_weights {
            Some(p) => fingerprint(&read(p)?),
            None => fingerprint(crate::model::mobilenet_v2::embedded_weights()),
        },
    };
    let d = &config.decode;
    Ok(format!(
        "juicer score cache v1; scorer={}; weights={weights:016x}; image_size={}; resize_size={:?}; mean={:?}; \
         std={:?}; patch={}; cam_top={}; top_k={}",
        v.scorer.name(),
        d.image_size,
        d.resize_size,
        d.mean,
        d.std,
        config.patch_size,
        v.cam_top,
        v.top_k
    ))
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

impl JuicedBatch {
    /// Starts a [`JuicerBuilder`].
    pub fn builder<S: Into<String>>(sources: impl IntoIterator<Item = S>) -> JuicerBuilder {
        JuicerBuilder::new(sources)
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

    /// Sample count of every shard (header-only scan, done once and cached).
    pub fn shard_counts(&self) -> Result<Vec<usize>> {
        self.shared
            .counts
            .get_or_init(|| {
                self.shared
                    .shards
                    .iter()
                    .map(|s| s.count_samples(&self.shared.config.read))
                    .collect::<Result<Vec<_>>>()
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(|e| Error::Config(vec![format!("counting samples per shard: {e}")]))
    }

    /// Samples this rank reads in `epoch` (from the shard counts and the epoch policy).
    pub fn epoch_samples(&self, epoch: u64) -> Result<u64> {
        let cfg = &self.shared.config;
        let counts = self.shard_counts()?;
        let w = self.shared.world;
        let n = match ShardPlan::target_batches(
            cfg.epoch_size,
            &counts,
            cfg.seed,
            epoch,
            w.world_size,
            cfg.shuffle_shards,
            cfg.batch_size,
        ) {
            Some(b) => b * cfg.batch_size as u64,
            None => ShardPlan::rank_sets(counts.len(), cfg.seed, epoch, w.world_size, cfg.shuffle_shards)[w.rank]
                .iter()
                .map(|&s| counts[s] as u64)
                .sum(),
        };
        let n = match cfg.range {
            Some((a, b)) => n.min(b).saturating_sub(a),
            None => n,
        };
        Ok(cfg.limit.map_or(n, |l| n.min(l)))
    }

    /// Makes the next `iter()`/`stream()` continue exactly from `state` (taken from [`JuicerIter::state`]).
    pub fn resume(&self, state: LoaderState) -> Result<()> {
        let s = &self.shared;
        let mut problems = Vec::new();
        if state.version != LoaderState::VERSION {
            problems.push(format!("state version {} (this build reads {})", state.version, LoaderState::VERSION));
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
        if !problems.is_empty() {
            return Err(Error::State(problems.join("; ")));
        }
        let next = if state.epoch_complete { Next::Epoch(state.epoch + 1) } else { Next::Resume(Box::new(state)) };
        *self.next.lock().map_err(|_| Error::State("loader lock poisoned".into()))? = next;
        Ok(())
    }

    /// Runs the next epoch (or the resumed one) as a blocking iterator.
    pub fn iter(&self) -> Result<JuicerIter<O>> {
        let next = {
            let mut guard = self.next.lock().map_err(|_| Error::State("loader lock poisoned".into()))?;
            let next = guard.clone();
            *guard = Next::Epoch(match &next {
                Next::Epoch(e) => e + 1,
                Next::Resume(s) => s.epoch + 1,
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
        LoaderState::start(s.config.seed, epoch, s.world, s.fingerprint.clone(), s.config.shuffle_buffer)
    }

    fn start(&self, state: LoaderState) -> Result<JuicerIter<O>> {
        let s = &self.shared;
        let cfg = &s.config;
        let w = s.world;
        let plan = ShardPlan::new(s.shards.len(), cfg.seed, state.epoch, w, cfg.shuffle_shards)?;
        let needs_counts = cfg.epoch_size.needs_counts(w.world_size);
        let counts = if needs_counts { self.shard_counts()? } else { vec![0; s.shards.len()] };
        let target = ShardPlan::target_batches(
            cfg.epoch_size,
            &counts,
            cfg.seed,
            state.epoch,
            w.world_size,
            cfg.shuffle_shards,
            cfg.batch_size,
        );
        let max_passes = match target {
            None => 1,
            Some(t) => {
                let rank_count: u64 = if needs_counts {
                    ShardPlan::rank_sets(counts.len(), cfg.seed, state.epoch, w.world_size, cfg.shuffle_shards)[w.rank]
                        .iter()
                        .map(|&i| counts[i] as u64)
                        .sum()
                } else {
                    0
                };
                let need = t * cfg.batch_size as u64;
                if rank_count == 0 { 64 } else { (need.div_ceil(rank_count) + 1).min(1 << 16) as u32 }
            }
        };

        let mut graph = Graph::new(cfg.capacity);
        let setup = Arc::new(ReadSetup {
            shards: s.shards.clone(),
            plan,
            opts: cfg.read.clone(),
            max_passes,
            start: state.cursor,
            shutdown: graph.shutdown_flag(),
        });
        let readers = graph.stage("read", cfg.reader_workers);
        let shuffle = graph.stage("shuffle", 1);
        let n_readers = cfg.reader_workers;
        let mut inlets = Vec::with_capacity(n_readers);
        for r in 0..n_readers {
            let (out, inlet) = graph.edge(&readers, &shuffle, cfg.capacity);
            inlets.push(inlet);
            let setup = setup.clone();
            graph.spawn(&format!("read-{r}"), move || reader_worker(setup, r, n_readers, out))?;
        }
        // Items in flight between the shuffle and the sink are bounded by the edges and workers between them.
        // Six edges (shuffle→decode→score→prune→extract→enrich→sink), four per-item pools, up to two
        // micro-batches.
        let window =
            6 * cfg.capacity + 4 * cfg.decode_workers + 2 * cfg.vision.micro_batch * cfg.vision.model_workers + 1;
        let resume = state.clone();
        let capacity = cfg.shuffle_buffer;
        let seq_setup = setup.clone();
        let (decoded_in, credits) = graph.source(shuffle, window, move |emitter| {
            if let Err(e) = sequencer(&seq_setup, inlets, &resume, capacity, emitter) {
                // Surface a resume failure as a stage failure: the sink reports it.
                panic!("{e}");
            }
        })?;
        let decoded =
            graph.map(decoded_in, Arc::new(DecodeStage(Decoder::new(cfg.decode.clone()))), cfg.decode_workers)?;
        let v = &cfg.vision;
        let m = &s.models;
        let workers = cfg.decode_workers;
        let patch = cfg.patch_size;
        let last = cfg.last_stage;
        let tail = if last == LastStage::Decode {
            graph.map(decoded, Arc::new(Finish::<Decoded>::new(patch)), workers)?
        } else {
            let scored = match &v.scorer {
                ScorerSpec::Cam => {
                    let stage =
                        CamScorer { classifier: m.classifier.clone(), patch, cam_top: v.cam_top, top_k: v.top_k };
                    score_stage(&mut graph, decoded, stage, m.score_cache.as_ref(), patch, v)?
                }
                ScorerSpec::Attention(_) => {
                    let vit =
                        m.vit.clone().ok_or_else(|| Error::Config(vec!["attention scorer without a ViT".into()]))?;
                    let stage = AttentionScorer { vit, device: self.device.clone() };
                    score_stage(&mut graph, decoded, stage, m.score_cache.as_ref(), patch, v)?
                }
                ScorerSpec::Random => {
                    graph.map(decoded, Arc::new(PlainScorer { seed: Some(cfg.seed), patch }), workers)?
                }
                ScorerSpec::None => graph.map(decoded, Arc::new(PlainScorer { seed: None, patch }), workers)?,
            };
            if last == LastStage::Score {
                graph.map(scored, Arc::new(Finish::<Scored>::new(patch)), workers)?
            } else {
                let pruned = graph.map(scored, Arc::new(PruneStage(v.prune)), workers)?;
                if last == LastStage::Prune {
                    graph.map(pruned, Arc::new(Finish::<Pruned>::new(patch)), workers)?
                } else {
                    let extract = Extract {
                        classifier: None,
                        top_k: v.top_k,
                        min_prob: v.min_prob,
                        margin: v.margin,
                        vocabulary: m.vocabulary.clone(),
                        input_norm: m.input_norm,
                    };
                    let juiced = if v.scorer == ScorerSpec::Cam {
                        // The cam scorer's forward already produced the class candidates: extract is plain CPU work.
                        graph.map(pruned, Arc::new(extract), workers)?
                    } else {
                        let extract = Extract { classifier: Some(m.classifier.clone()), ..extract };
                        graph.model(
                            "extract",
                            pruned,
                            replicas(&extract, v.model_workers),
                            v.micro_batch,
                            v.max_wait,
                        )?
                    };
                    if last == LastStage::Extract {
                        juiced
                    } else {
                        let enrich =
                            EnrichStage { enricher: m.enricher.clone(), tokenizer: m.tokenizer, epoch: state.epoch };
                        graph.map(juiced, Arc::new(enrich), workers)?
                    }
                }
            }
        };
        let first_state = state.clone();
        let sink = BatchSink {
            batcher: self.batcher.clone(),
            device: self.device.clone(),
            batch_size: cfg.batch_size,
            on_error: cfg.on_error,
            target,
            limit: cfg.limit,
            range: cfg.range,
            boundary: state.clone(),
            state,
            pending: Vec::new(),
            dropped: Vec::new(),
        };
        let run = graph.sink(tail, credits, sink)?;
        let total = self
            .shared
            .counts
            .get()
            .and_then(|c| c.as_ref().ok())
            .map(|_| ())
            .and_then(|()| self.epoch_samples(first_state.epoch).ok());
        let forwards = s.models.classifier.forwards();
        let score_cache = s.models.score_cache.clone();
        Ok(JuicerIter {
            run,
            forwards,
            score_cache,
            state: first_state,
            dropped: Vec::new(),
            started: Instant::now(),
            total,
            finished: false,
        })
    }
}

/// One factory per model thread, each building its own copy of `stage` (a burn module clone shares the
/// weights' storage until a thread writes to it, which these stages never do).
fn replicas<S: Clone + Send + 'static>(stage: &S, n: usize) -> Vec<impl FnOnce() -> Result<S> + Send + 'static> {
    (0..n.max(1))
        .map(|_| {
            let s = stage.clone();
            move || Ok(s)
        })
        .collect()
}

/// Adds a model scorer as the `score` stage, behind the score cache when there is one.
fn score_stage<S>(
    graph: &mut Graph,
    decoded: Inlet<Envelope<Decoded, Trace>>,
    stage: S,
    cache: Option<&Arc<ScoreCache>>,
    patch: usize,
    v: &VisionConfig,
) -> Result<Inlet<Envelope<Scored, Trace>>>
where
    S: BatchStage<In = Decoded, Out = Scored> + Clone,
{
    match cache {
        Some(cache) => {
            let stage = Cached { inner: stage, cache: cache.clone(), patch };
            graph.model("score", decoded, replicas(&stage, v.model_workers), v.micro_batch, v.max_wait)
        }
        None => graph.model("score", decoded, replicas(&stage, v.model_workers), v.micro_batch, v.max_wait),
    }
}

/// The decode stage: bytes → normalised pixels.
struct DecodeStage(Decoder);

impl Stage for DecodeStage {
    type In = RawSample;
    type Out = Decoded;

    fn name(&self) -> &'static str {
        "decode"
    }

    fn process(&self, raw: RawSample) -> std::result::Result<Decoded, SampleError> {
        self.0.decode(raw)
    }
}

/// Ends a graph truncated by [`Config::last_stage`]: turns what the last stage produced into the sample the
/// batcher takes ([`Pruned::into_juiced`]). Keeps every patch before prune, the kept ones after it; no classes,
/// no tokens.
struct Finish<T> {
    patch: usize,
    _in: std::marker::PhantomData<fn(T)>,
}

impl<T> Finish<T> {
    fn new(patch: usize) -> Self {
        Self { patch, _in: std::marker::PhantomData }
    }
}

/// Keeps every patch of a scored sample.
fn keep_all(scored: Scored) -> Pruned {
    let kept = (0..(scored.grid.0 * scored.grid.1) as u32).collect();
    Pruned { scored, kept }
}

impl Stage for Finish<Decoded> {
    type In = Decoded;
    type Out = JuicedSample;

    fn name(&self) -> &'static str {
        "finish"
    }

    fn process(&self, d: Decoded) -> std::result::Result<JuicedSample, SampleError> {
        let grid = crate::decode::grid(d.size, self.patch);
        let scored = Scored { sample: d, grid, patch: self.patch, scores: Vec::new(), candidates: None };
        Ok(keep_all(scored).into_juiced(Vec::new()))
    }
}

impl Stage for Finish<Scored> {
    type In = Scored;
    type Out = JuicedSample;

    fn name(&self) -> &'static str {
        "finish"
    }

    fn process(&self, s: Scored) -> std::result::Result<JuicedSample, SampleError> {
        Ok(keep_all(s).into_juiced(Vec::new()))
    }
}

impl Stage for Finish<Pruned> {
    type In = Pruned;
    type Out = JuicedSample;

    fn name(&self) -> &'static str {
        "finish"
    }

    fn process(&self, p: Pruned) -> std::result::Result<JuicedSample, SampleError> {
        Ok(p.into_juiced(Vec::new()))
    }
}

/// What the last edge carries to the consumer.
enum Output<O> {
    Batch { batch: O, dropped: Vec<SampleError>, state: Box<LoaderState> },
    Error { error: Error, state: Box<LoaderState> },
    End { dropped: Vec<SampleError>, state: Box<LoaderState> },
}

/// The ordered sink: checkpoint mirror, accounting, batching.
struct BatchSink<O> {
    batcher: Arc<dyn Batcher<JuicedSample, O>>,
    device: Device,
    batch_size: usize,
    on_error: OnError,
    target: Option<u64>,
    limit: Option<u64>,
    range: Option<(u64, u64)>,
    /// State at the last batch boundary: what the consumer may checkpoint.
    boundary: LoaderState,
    /// State after the last item.
    state: LoaderState,
    pending: Vec<JuicedSample>,
    dropped: Vec<SampleError>,
}

impl<O> BatchSink<O> {
    fn flush(&mut self, complete: bool) -> Option<Output<O>> {
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
        let items = std::mem::take(&mut self.pending);
        let batch = self.batcher.batch(items, &self.device);
        Some(Output::Batch {
            batch,
            dropped: std::mem::take(&mut self.dropped),
            state: Box::new(self.boundary.clone()),
        })
    }

    fn limit_reached(&self) -> bool {
        let read = self.state.samples_read;
        self.limit.is_some_and(|l| read >= l) || self.range.is_some_and(|(a, b)| read >= b.saturating_sub(a))
    }
}

impl<O: Send + 'static> SinkLogic for BatchSink<O> {
    type In = JuicedSample;
    type Meta = Trace;
    type Out = Output<O>;

    fn accept(&mut self, env: Envelope<JuicedSample, Trace>) -> SinkStep<Output<O>> {
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

    fn finish(&mut self, failure: Option<Error>) -> Vec<Output<O>> {
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
    /// Score cache counters since the loader was built (all epochs), when a cache is configured.
    pub score_cache: Option<CacheStats>,
    /// Wall time since the epoch started.
    pub elapsed: Duration,
    /// Per-stage counters.
    pub stages: Vec<StageSnapshot>,
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

/// One epoch in progress. Dropping it stops the stage graph and joins its threads.
pub struct JuicerIter<O> {
    run: Run<Output<O>>,
    forwards: Arc<std::sync::atomic::AtomicU64>,
    score_cache: Option<Arc<ScoreCache>>,
    state: LoaderState,
    dropped: Vec<SampleError>,
    started: Instant,
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
            score_cache: self.score_cache.as_ref().map(|c| c.stats()),
            elapsed: self.started.elapsed(),
            stages: self.run.metrics(),
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
                self.dropped.extend(dropped);
                Some(Ok(batch))
            }
            Output::Error { error, state } => {
                self.state = *state;
                Some(Err(error))
            }
            Output::End { dropped, state } => {
                self.state = *state;
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

impl<O> DataLoaderIterator<O> for LoaderIter<O> {
    fn progress(&self) -> Progress {
        match &self.0 {
            Ok(it) => {
                Progress::new(it.state.samples_read as usize, it.total.unwrap_or(0) as usize, Some("samples".into()))
            }
            Err(_) => Progress::new(0, 0, None),
        }
    }
}

/// Adapter of [`JuicerIter`] to burn's `DataLoaderIterator` (errors become `DatasetError`).
struct LoaderIter<O>(std::result::Result<JuicerIter<O>, Option<Error>>);

impl<O> Iterator for LoaderIter<O> {
    type Item = std::result::Result<O, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.0 {
            Ok(it) => it.next().map(|r| r.map_err(DatasetError::new)),
            Err(e) => e.take().map(|e| Err(DatasetError::new(e))),
        }
    }
}

impl<O: Send + 'static> DataLoader<O> for Juicer<O> {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<O> + 'a> {
        // `progress().items_total` needs the shard counts; burn's trainers show it from the first step.
        let _ = self.shard_counts();
        Box::new(LoaderIter(Juicer::iter(self).map_err(Some)))
    }

    fn num_items(&self) -> usize {
        let epoch = match self.next.lock().map(|n| n.clone()) {
            Ok(Next::Epoch(e)) => e,
            Ok(Next::Resume(s)) => s.epoch,
            Err(_) => 0,
        };
        self.epoch_samples(epoch).unwrap_or(0) as usize
    }

    fn to_device(&self, device: &Device) -> Arc<dyn DataLoader<O>> {
        let mut j = self.clone();
        j.device = device.clone();
        Arc::new(j)
    }

    /// A loader over the samples at epoch positions `start..end` only (positions after the shuffle).
    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<O>> {
        let mut shared = (*self.shared).clone_config();
        shared.config.range = Some((start as u64, end as u64));
        Arc::new(Juicer {
            shared: Arc::new(shared),
            batcher: self.batcher.clone(),
            device: self.device.clone(),
            next: Arc::new(Mutex::new(Next::Epoch(0))),
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
            models: self.models.clone(),
        }
    }
}
