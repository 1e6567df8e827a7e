//! [`Config`]: every knob of the pipeline, with its defaults and validation, and [`LastStage`], how much of the
//! stage graph runs.

use serde::Serialize;

use crate::decode::DecodeConfig;
use crate::device::DeviceSpec;
use crate::error::{Error, OnError, Result};
use crate::plan::EpochSize;
use crate::source::ReadOptions;
use crate::text::enrich::EnrichConfig;
use crate::vision::VisionConfig;

/// Every knob of the pipeline. Build it through [`super::JuicerBuilder`]; the defaults suit a single GPU trainer.
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
    /// Collator threads that build batches (the batcher's `batch`) behind the ordered sink, in parallel, in
    /// order; 0 builds them on the sink's thread (default one per four cores, 1 to 4).
    pub collate_workers: usize,
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
    /// Directory of the on-disk cache of per-shard sample counts ([`crate::source::CountCache`]), used when
    /// counts are needed and no manifest gives them (default: [`crate::source::default_cache_dir`]; `None`
    /// scans every time).
    pub count_cache: Option<std::path::PathBuf>,
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
/// A truncated graph still yields [`crate::JuicedSample`]s: after `decode` or `score` every patch is kept (patchified
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
            collate_workers: default_collate_workers(std::thread::available_parallelism().map_or(2, |n| n.get())),
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
            count_cache: crate::source::default_cache_dir(),
            device: DeviceSpec::Auto,
            vision: VisionConfig::default(),
            text: EnrichConfig::default(),
            last_stage: LastStage::Enrich,
        }
    }
}

/// Collator threads for a machine with `cores` cores: one per four cores, at least one and at most four.
/// Collating is a copy per kept patch (about 0.3 MB a sample at 224 px, all patches kept): one thread managed
/// about 6,700 samples/s of it beside the sink's bookkeeping (`--stages decode` on 16 cores, 70 % busy at
/// 4,710 samples/s), so four keep ahead of any decode rate measured, and one still takes the copy off the
/// sink's thread on a small machine.
pub fn default_collate_workers(cores: usize) -> usize {
    (cores / 4).clamp(1, 4)
}

impl Config {
    /// Every problem with this configuration (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut p = self.decode.validate();
        p.extend(self.read.limits.validate());
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
        if let Some(s) = self.vision.score_size {
            if !(32..=self.decode.image_size).contains(&s) {
                p.push(format!("score_size {s} must be between 32 and image_size {}", self.decode.image_size));
            }
            if self.vision.scorer != crate::vision::ScorerSpec::Cam {
                p.push(format!("score_size applies to the cam scorer, not `{}`", self.vision.scorer.name()));
            }
        }
        if let Some((a, b)) = self.range
            && a > b
        {
            p.push(format!("range {a}..{b} is reversed"));
        }
        p
    }
}
