//! [`JuicerBuilder`]: sources plus configuration verbs (as burn's `DataLoaderBuilder`), and the build step that
//! resolves the shards and the world, validates everything, and loads the models once.

use std::sync::{Arc, Mutex, OnceLock};

use burn::data::dataloader::batcher::Batcher;

use super::models::Models;
use super::{Config, Juicer, LastStage, Next, Shared};
use crate::batch::{JuicedBatch, JuicedBatcher};
use crate::device::DeviceSpec;
use crate::error::{Error, OnError, Result};
use crate::plan::{EpochSize, World};
use crate::rng::{derive, hash_str};
use crate::sample::JuicedSample;
use crate::source::{ReadOptions, Shard, resolve_counted};
use crate::vision::cache::ScoreCacheConfig;
use crate::vision::prune::{KeepPolicy, PruneConfig};
use crate::vision::{ExtractRule, ScorerSpec};

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
    verb!(/// Collator threads building batches behind the ordered sink (0: on the sink's thread).
        collate_workers: usize => collate_workers);
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
    verb!(/// Decode JPEGs at a reduced DCT scale when the crop allows (default on; see
        /// [`crate::decode::DecodeConfig::jpeg_draft`]).
        jpeg_draft: bool => decode.jpeg_draft);
    verb!(/// Largest image in pixels that is decoded; a larger one is dropped as `image_too_large` before any pixel
        /// is allocated (default Pillow's 89,478,485; see [`crate::decode::DecodeConfig::max_pixels`]).
        max_image_pixels: u64 => decode.max_pixels);
    verb!(/// Largest member (image; after gzip) read into memory; a larger one drops its sample as
        /// `member_too_large` before any byte of it is read (see [`crate::source::ReadLimits`]).
        max_member_bytes: u64 => read.limits.max_member_bytes);
    verb!(/// Largest caption in bytes (`member_too_large` above it).
        max_caption_bytes: u64 => read.limits.max_caption_bytes);
    verb!(/// Largest metadata (`.json`) document in bytes (`member_too_large` above it).
        max_meta_bytes: u64 => read.limits.max_meta_bytes);
    verb!(/// Deepest nesting of a metadata document (`invalid_meta` above it).
        max_json_depth: usize => read.limits.max_json_depth);
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
    verb!(/// How concepts are chosen: the tree rule (default) or the flat rule.
        extract: ExtractRule => vision.extract);
    verb!(/// Candidate classes per image of the flat rule.
        top_k: usize => vision.top_k);
    verb!(/// Minimum class probability of the flat rule.
        min_prob: f32 => vision.min_prob);
    verb!(/// Items per model micro-batch (0: 4 on the CPU, 16 on a GPU).
        micro_batch: usize => vision.micro_batch);
    verb!(/// Model threads (model replicas) per model stage (0: chosen from the device and the cores).
        model_workers: usize => vision.model_workers);
    /// Runs the `cam` scorer on a `side`×`side` downscale of each decoded image (see
    /// [`crate::vision::VisionConfig::score_size`]).
    pub fn score_size(mut self, side: usize) -> Self {
        self.config.vision.score_size = Some(side);
        self
    }
    verb!(/// CPU threads per model replica (0: the cores shared out among the replicas).
        intra_op_threads: usize => vision.intra_op_threads);
    verb!(/// Caption template with `{caption}` and `{classes}`.
        template: String => text.template);
    verb!(/// Probability of training on the enriched caption rather than the original.
        mix: f32 => text.mix);
    verb!(/// Runs only the stages up to this one (benchmarks).
        last_stage: LastStage => last_stage);

    /// Keeps the per-shard sample counts of the count scan in `dir` (see [`crate::source::CountCache`]).
    pub fn count_cache(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.config.count_cache = Some(dir.into());
        self
    }

    /// Scans shards for their counts every time (no count cache).
    pub fn no_count_cache(mut self) -> Self {
        self.config.count_cache = None;
        self
    }

    /// Sets one object-store option (an `object_store` config key such as `aws_endpoint`, `aws_region`,
    /// `aws_access_key_id`, `google_service_account`, `azure_storage_account_name`), overriding the
    /// `AWS_*`/`GOOGLE_*`/`AZURE_*` environment for `s3://`, `gs://` and `az://` sources.
    pub fn storage_option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.read.storage_options.push((key.into(), value.into()));
        self
    }

    /// Caches the scorer's outputs on disk (bounded) so that later epochs, and later runs over the same data
    /// with the same scorer and weights, skip the scoring model.
    pub fn score_cache(mut self, cache: ScoreCacheConfig) -> Self {
        self.config.vision.score_cache = Some(cache);
        self
    }

    /// The tree rule with this threshold on the calibrated summed probability (keeps the temperature).
    pub fn class_threshold(mut self, threshold: f32) -> Self {
        self.config.vision.extract = match self.config.vision.extract {
            ExtractRule::Tree { temperature, confident, .. } => ExtractRule::Tree { threshold, temperature, confident },
            ExtractRule::Flat => ExtractRule::Tree {
                threshold,
                temperature: crate::vision::extract::DEFAULT_TEMPERATURE,
                confident: crate::vision::extract::DEFAULT_CONFIDENT,
            },
        };
        self
    }

    /// The tree rule with this softmax temperature for calibrating the class probabilities (keeps the threshold).
    pub fn class_temperature(mut self, temperature: f32) -> Self {
        self.config.vision.extract = match self.config.vision.extract {
            ExtractRule::Tree { threshold, confident, .. } => ExtractRule::Tree { threshold, temperature, confident },
            ExtractRule::Flat => ExtractRule::Tree {
                threshold: crate::vision::extract::DEFAULT_THRESHOLD,
                temperature,
                confident: crate::vision::extract::DEFAULT_CONFIDENT,
            },
        };
        self
    }

    /// Under the tree rule, also names a second concept unrelated to the first when its summed probability
    /// reaches `threshold` and its evidence lies apart from the first one's.
    pub fn second_threshold(mut self, threshold: f32) -> Self {
        self.config.vision.second_threshold = Some(threshold);
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

    /// The classifier that names the classes ([`crate::vision::ClassifierSpec`]; default MobileNetV2, the cam
    /// scorer's own forward). An EfficientNet-Lite runs in the extract stage on each full image; the cam scorer
    /// keeps the embedded MobileNetV2 (or [`classifier_weights`](Self::classifier_weights)).
    ///
    /// Unless the extract rule was changed before this call, it becomes the tree rule calibrated for `spec`
    /// ([`crate::vision::extract::calibrated_rule`]); `extract` or `class_threshold` after this call override it.
    pub fn classifier(mut self, spec: crate::vision::ClassifierSpec) -> Self {
        if self.config.vision.extract == ExtractRule::default() {
            self.config.vision.extract = crate::vision::extract::calibrated_rule(&spec);
        }
        self.config.vision.classifier = spec;
        self
    }

    /// The classifier `--classifier NAME` / `classifier=` names, with its weights file (`--classifier-weights`):
    /// for `mobilenet-v2` the file replaces the embedded weights of the scorer and the class head alike
    /// ([`classifier_weights`](Self::classifier_weights)); an `efficientnet-lite*` needs it. Then as
    /// [`classifier`](Self::classifier).
    ///
    /// # Errors
    /// [`Error::Config`] for an unknown name or a Lite model without weights.
    pub fn classifier_named(self, name: &str, weights: Option<&std::path::Path>) -> Result<Self> {
        let spec = crate::vision::ClassifierSpec::parse(name, weights)?;
        let this = match (&spec, weights) {
            (crate::vision::ClassifierSpec::MobileNetV2, Some(w)) => self.classifier_weights(w),
            _ => self,
        };
        Ok(this.classifier(spec))
    }

    /// A JSON vocabulary `{"<class id or wnid>": "<name>" | ["<name>", ...]}` restricting and renaming the
    /// extracted concepts (see [`crate::vision::vocabulary`]).
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
        self.build_inner(batcher, false)
    }

    /// Builds a juicer without sources, for [`Juicer::juice`] over samples the caller holds: the models and
    /// every setting as [`JuicerBuilder::build_with`] loads them; `iter()` on it fails (no shards).
    pub fn build_inline<O, B>(self, batcher: B) -> Result<Juicer<O>>
    where
        B: Batcher<JuicedSample, O> + 'static,
        O: Send + 'static,
    {
        self.build_inner(batcher, true)
    }

    fn build_inner<O, B>(mut self, batcher: B, inline: bool) -> Result<Juicer<O>>
    where
        B: Batcher<JuicedSample, O> + 'static,
        O: Send + 'static,
    {
        let mut problems = self.config.problems();
        if self.sources.is_empty() && !inline {
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
        // Fresh I/O counters per loader (a cloned config would otherwise share them).
        self.config.read.stats = crate::source::IoStats::default();
        let (shards, known) = resolve_counted(&self.sources, self.config.folder_shard_size, &self.config.read)?;
        let (shards, known): (Arc<[Shard]>, Arc<[Option<u64>]>) = (shards.into(), known.into());
        if shards.len() < world.world_size && !inline {
            return Err(Error::Config(vec![format!(
                "{} shard(s) cannot be split across {} ranks: every rank needs at least one shard",
                shards.len(),
                world.world_size
            )]));
        }
        let fingerprint =
            format!("{:016x}", shards.iter().fold(hash_str(""), |h, s| derive(h, &[hash_str(&s.name())])));
        let device = self.config.device.resolve()?;
        let mut config = self.config;
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        if config.vision.model_workers == 0 {
            config.vision.model_workers = crate::vision::auto_model_workers(&device, cores);
        }
        if config.vision.micro_batch == 0 {
            config.vision.micro_batch = crate::vision::auto_micro_batch(&device);
        }
        if config.vision.intra_op_threads == 0 {
            config.vision.intra_op_threads =
                crate::device::auto_intra_op_threads(&device, cores, config.vision.model_workers);
        }
        let models = Models::load(&mut config, &device)?;
        Ok(Juicer {
            shared: Arc::new(Shared { shards, config, world, fingerprint, counts: OnceLock::new(), known, models }),
            batcher: Arc::new(batcher),
            device,
            next: Arc::new(Mutex::new(Next::Epoch(0))),
        })
    }
}

impl JuicedBatch {
    /// Starts a [`JuicerBuilder`].
    pub fn builder<S: Into<String>>(sources: impl IntoIterator<Item = S>) -> JuicerBuilder {
        JuicerBuilder::new(sources)
    }
}
